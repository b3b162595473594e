"""Keep the best synthetic examples (method.md section 6).

Rules, in order: drop texts the model, as a zero-shot classifier with the task's verbalizer, assigns to
another class; rank each class by the example's own gradient distance (plus `log_ppl_weight` x its
log-perplexity); drop exact and near duplicates (word-set Jaccard similarity at or above
`near_duplicate`, keeping the better-ranked one); balance the classes and keep at most `n_per_class`.
"""

from __future__ import annotations

import re

_WORDS = re.compile(r"[a-z0-9']+")


def word_set(text: str) -> frozenset[str]:
    return frozenset(_WORDS.findall(text.lower()))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def filter_examples(rows: list[dict], predictions: list[int] | None, n_classes: int, n_per_class: int,
                    near_duplicate: float, log_ppl_weight: float) -> tuple[list[dict], dict]:
    """Returns the kept rows (ranked within class, classes in order) and how many each rule dropped."""
    dropped = {"misclassified": 0, "duplicate": 0, "balance": 0}
    candidates = []
    for i, row in enumerate(rows):
        if predictions is not None and predictions[i] != row["label"]:
            dropped["misclassified"] += 1
        else:
            candidates.append(row)
    per_class: list[list[dict]] = [[] for _ in range(n_classes)]
    kept_words: list[frozenset[str]] = []
    ranked = sorted(candidates, key=lambda r: r["grad_distance"] + log_ppl_weight * r["log_ppl"])
    for row in ranked:
        words = word_set(row["text"])
        if any(jaccard(words, other) >= near_duplicate for other in kept_words):
            dropped["duplicate"] += 1
            continue
        kept_words.append(words)
        per_class[row["label"]].append(row)
    quota = min(n_per_class, min(len(c) for c in per_class))
    for c in per_class:
        dropped["balance"] += len(c) - quota
    return [row for c in per_class for row in c[:quota]], dropped
