"""Keep the best synthetic examples (docs/method.md section 6).

Rules, in order: drop texts the model, as a zero-shot or few-shot classifier with the task's
verbalizer (`gradmm.stages.classifier.Classifier`, the classifier evaluation measures; its scores calibrated by
their mean over the set), assigns to another class;
rank each class by the example's own gradient distance (plus `log_ppl_weight` x its log-perplexity);
drop exact and near duplicates (word-set Jaccard similarity at or above `near_duplicate`, keeping
the better-ranked one); balance the classes and keep at most `n_per_class`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from gradmm.data.models import LM
from gradmm.data.text import jaccard, words
from gradmm.reporting.tracking import Tracker
from gradmm.runs import files
from gradmm.stages.classifier import Classifier, few_shot_demonstrations

if TYPE_CHECKING:
    from gradmm.data.tasks import Setup

def filter_examples(rows: list[dict], predictions: list[int] | None, n_classes: int, n_per_class: int,
                    near_duplicate: float, log_ppl_weight: float) -> tuple[list[dict], dict, list[str | None]]:
    """Returns the kept rows (ranked within class, classes in order), how many each rule dropped, and
    per input row the rule that dropped it (None where it was kept)."""
    dropped_by: list[str | None] = [None] * len(rows)
    candidates = []
    for i, row in enumerate(rows):
        if predictions is not None and predictions[i] != row["label"]:
            dropped_by[i] = "misclassified"
        else:
            candidates.append(i)
    per_class: list[list[int]] = [[] for _ in range(n_classes)]
    kept_words: list[frozenset[str]] = []
    ranked = sorted(candidates, key=lambda i: rows[i]["grad_distance"] + log_ppl_weight * rows[i]["log_ppl"])
    for i in ranked:
        text_words = frozenset(words(rows[i]["text"]))
        if any(jaccard(text_words, other) >= near_duplicate for other in kept_words):
            dropped_by[i] = "duplicate"
            continue
        kept_words.append(text_words)
        per_class[rows[i]["label"]].append(i)
    quota = min(n_per_class, min(len(c) for c in per_class))
    for c in per_class:
        for i in c[quota:]:
            dropped_by[i] = "balance"
    dropped = {rule: dropped_by.count(rule) for rule in ("misclassified", "duplicate", "balance")}
    return [rows[i] for c in per_class for i in c[:quota]], dropped, dropped_by


def filter_stage(cfg: DictConfig, setup: Setup, lm: LM, source: Path, out_dir: Path,
                 tracker: Tracker) -> dict:
    """Filters source/synthetic.jsonl into out_dir/synthetic_filtered.jsonl; returns the counts."""
    rows = files.read_jsonl(source / "synthetic.jsonl")
    n_classes, flt = len(cfg.task.label_names), cfg.filter
    predictions = None
    if flt.classifier != "none":
        classifier = Classifier(lm, setup.verbalizer)
        prefix: list[int] = []
        if flt.classifier == "few_shot":
            # Demonstrations from the generator's own real examples: no further real data is touched
            # (config.validate refuses this under privacy=dp, where even those are off limits).
            demos = few_shot_demonstrations(setup.real, flt.few_shot_k, n_classes, cfg.seed)
            prefix = classifier.demonstrations(demos)
        scores = classifier.scores([row["text"] for row in rows], prefix)
        # Calibrated by the mean score of each label word over the set (contextual calibration): an
        # untuned model's bias towards one label word (SmolLM2 zero-shot on SST-2) otherwise assigns
        # every text to one class, and balancing then empties the whole set.
        predictions = (scores - scores.mean(0)).argmax(-1).tolist()
    kept, dropped, dropped_by = filter_examples(rows, predictions, n_classes, flt.n_per_class,
                                                flt.near_duplicate, flt.log_ppl_weight)
    files.write_jsonl(out_dir / "synthetic_filtered.jsonl", kept)
    result = {"n_in": len(rows), "n_kept": len(kept), "dropped": dropped}
    tracker.log({"stage": "filter", "n_in": len(rows), "n_kept": len(kept),
                 **{f"dropped/{rule}": n for rule, n in dropped.items()}})
    tracker.log_texts("filter", rows, dropped_by)
    return result
