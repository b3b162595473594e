"""What fine-tuning trains, one class per option of conf/evaluate/method/ (built from its yaml's
`_target_`): a new method is a subclass of `FineTuning` plus one yaml file.

A method is built from its settings alone, so validation can build it (and hear its complaints)
before any model is loaded; `bind` then attaches it to the model it will train.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch

from gradmm.data.models import LM


class FineTuning:
    """The trained parameters of one fine-tuning run, its checkpoints, and putting a checkpoint in place.
    `name` is what summaries and checkpoints call the method."""

    name: ClassVar[str]

    def bind(self, lm: LM) -> None:
        self.lm = lm

    def start(self, seed: int) -> list[torch.nn.Parameter]:
        """The parameters to train from the model's original state; `seed` seeds any new ones."""
        raise NotImplementedError

    def checkpoint(self) -> dict:
        raise NotImplementedError

    def close(self) -> None:
        """Leaves the model as `bind` found it."""
        raise NotImplementedError

    @classmethod
    @contextmanager
    def applied(cls, lm: LM, checkpoint: dict) -> Iterator[None]:
        raise NotImplementedError
        yield


@dataclass
class FullWeights(FineTuning):
    """Every weight trains; checkpoints are whole state dicts, and the original weights are restored
    afterwards (reloading the model would take far longer)."""

    name: ClassVar[str] = "full"

    def bind(self, lm: LM) -> None:
        self.lm, self.original = lm, _copy_state(lm.model.state_dict())

    def start(self, seed: int) -> list[torch.nn.Parameter]:
        self.lm.model.load_state_dict(self.original)
        for p in self.lm.model.parameters():
            p.requires_grad_(True)
        return list(self.lm.model.parameters())

    def checkpoint(self) -> dict:
        return {"method": self.name, "weights": _copy_state(self.lm.model.state_dict())}

    def close(self) -> None:
        self.lm.model.load_state_dict(self.original)
        for p in self.lm.model.parameters():
            p.requires_grad_(False)

    @classmethod
    @contextmanager
    def applied(cls, lm: LM, checkpoint: dict) -> Iterator[None]:
        original = _copy_state(lm.model.state_dict())
        try:
            lm.model.load_state_dict(checkpoint["weights"])
            yield
        finally:
            lm.model.load_state_dict(original)


@dataclass
class LoRA(FineTuning):
    """Low-rank adapters on every linear layer but the output layer (peft's "all-linear"); the base
    weights never change, checkpoints hold the adapters only."""

    r: int
    alpha: float
    name: ClassVar[str] = "lora"

    def __post_init__(self):
        problems = [f"evaluate.method.{key}={value!r} must be positive."
                    for key, value in (("r", self.r), ("alpha", self.alpha)) if not value > 0]
        if importlib.util.find_spec("peft") is None:
            problems.append("evaluate/method=lora needs peft: pip install -e '.[lora]'.")
        if problems:
            raise ValueError(" ".join(problems))
        self.peft_model = None

    @staticmethod
    def _config(r: int, alpha: float):
        from peft import LoraConfig

        return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules="all-linear")

    def start(self, seed: int) -> list[torch.nn.Parameter]:
        from peft import get_peft_model

        self.close()
        # The adapters' random initialisation is part of the training seed.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            # get_peft_model injects the adapters into lm.model's own modules, so LM.last_hidden uses them.
            self.peft_model = get_peft_model(self.lm.model, self._config(self.r, self.alpha))
        return [p for p in self.lm.model.parameters() if p.requires_grad]

    def checkpoint(self) -> dict:
        from peft import get_peft_model_state_dict

        adapters = _copy_state(get_peft_model_state_dict(self.peft_model))
        return {"method": self.name, "r": self.r, "alpha": self.alpha, "weights": adapters}

    def close(self) -> None:
        if self.peft_model is not None:
            self.peft_model.unload()
            self.peft_model = None

    @classmethod
    @contextmanager
    def applied(cls, lm: LM, checkpoint: dict) -> Iterator[None]:
        from peft import get_peft_model, set_peft_model_state_dict

        peft_model = get_peft_model(lm.model, cls._config(checkpoint["r"], checkpoint["alpha"]))
        try:
            set_peft_model_state_dict(peft_model, checkpoint["weights"])
            yield
        finally:
            peft_model.unload()


def method_named(name: str) -> type[FineTuning]:
    """The FineTuning subclass whose checkpoints carry `name`."""
    methods = {cls.name: cls for cls in FineTuning.__subclasses__()}
    if name not in methods:
        raise ValueError(f"a checkpoint of fine-tuning method {name!r}; the methods are {', '.join(methods)}.")
    return methods[name]


@contextmanager
def checkpoint_applied(lm: LM, checkpoint: dict) -> Iterator[None]:
    """The model with a checkpoint from `gradmm.stages.evaluate.train_and_select` in place; the original
    model on exit."""
    with method_named(checkpoint["method"]).applied(lm, checkpoint):
        yield


def _copy_state(state: dict) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
