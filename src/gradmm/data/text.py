"""Texts as words: the one tokenisation into lower-case words and the one word-set similarity, shared by
the filter's near-duplicate rule and the leakage audit so that both mean the same thing by "similar"."""

from __future__ import annotations

import re

_WORDS = re.compile(r"[a-z0-9']+")


def words(text: str) -> list[str]:
    return _WORDS.findall(text.lower())


def jaccard(a: set[str] | frozenset[str], b: set[str] | frozenset[str]) -> float:
    """|a & b| / |a | b|. Two empty sets are equal sets, so 1: two texts without a word are duplicates."""
    return len(a & b) / len(a | b) if a or b else 1.0
