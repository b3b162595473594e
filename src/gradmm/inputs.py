"""What the stages read besides the model: the task's token-level view and the generator's real examples."""

from __future__ import annotations

from dataclasses import dataclass

from gradmm import privacy
from gradmm.tasks import Example, Verbalizer


@dataclass
class Setup:
    """Everything tokenizer-level, checked before the model is loaded."""

    verbalizer: Verbalizer
    prefix_ids: list[int]
    # Under privacy=dp a `privacy.PrivateExamples`, sealed by the private release.
    real: list[Example] | privacy.PrivateExamples
