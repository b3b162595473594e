"""The leakage audit: what synthetic texts share with the real examples the generator saw, word for
word (the longest shared n-gram) and as word sets (the nearest real text by Jaccard similarity).
A post-hoc check, never fed back into generation (gradmm.privacy.dp says when it may run).
"""

from __future__ import annotations

import difflib

from gradmm.data.text import jaccard, words


def longest_shared_ngram(a: list[str], b: list[str]) -> tuple[int, int]:
    """(length, start in a) of the longest run of consecutive words common to a and b."""
    match = difflib.SequenceMatcher(None, a, b, autojunk=False).find_longest_match(0, len(a), 0, len(b))
    return match.size, match.a


def leakage_report(synthetic: list[str], real: list[str]) -> tuple[list[dict], dict]:
    """Per synthetic text: the longest word n-gram it shares with any real text (and which), and the
    nearest real text by word-set Jaccard similarity; plus the summary figures."""
    real_words = [words(t) for t in real]
    real_sets = [set(w) for w in real_words]
    rows = []
    for text in synthetic:
        w = words(text)
        shared = [longest_shared_ngram(w, r) for r in real_words]
        best = max(range(len(real)), key=lambda j: shared[j][0])
        size, start = shared[best]
        overlap = [jaccard(set(w), s) for s in real_sets]
        nearest = max(range(len(real)), key=overlap.__getitem__)
        rows.append({
            "text": text,
            "longest_shared_ngram": size,
            "shared_ngram": " ".join(w[start:start + size]),
            "shared_with": real[best] if size else None,
            "nearest_real": real[nearest],
            "nearest_jaccard": overlap[nearest],
        })
    lengths = [r["longest_shared_ngram"] for r in rows]
    return rows, {
        "max_shared_ngram": max(lengths, default=0),
        "mean_shared_ngram": sum(lengths) / max(1, len(lengths)),
        "n_sharing_8gram": sum(n >= 8 for n in lengths),
    }
