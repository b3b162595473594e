"""The one word-set similarity, as the filter and the leakage audit use it."""

from gradmm.data.text import jaccard, words
from gradmm.privacy.leakage import leakage_report
from gradmm.stages.filter import filter_examples


def test_jaccard_of_word_sets():
    assert jaccard(set(words("A dull, dull film")), set(words("a DULL movie"))) == 2 / 4
    assert jaccard({"a"}, set()) == 0.0
    assert jaccard(set(), set()) == 1.0, "two texts without a word have equal word sets"


def test_the_filter_keeps_one_of_two_wordless_texts():
    rows = [{"text": text, "label": 0, "grad_distance": d, "log_ppl": 1.0}
            for text, d in (("...", 0.1), ("!!", 0.2), ("some words", 0.3))]
    kept, dropped, *_ = filter_examples(rows, None, 1, 10, 0.8, 0.0)
    assert [r["text"] for r in kept] == ["...", "some words"] and dropped["duplicate"] == 1


def test_the_leakage_audit_reads_the_same_similarity():
    rows, _ = leakage_report(["the acting is superb", "?!"], ["The acting is superb.", "..."])
    assert rows[0]["nearest_jaccard"] == 1.0
    assert (rows[1]["nearest_real"], rows[1]["nearest_jaccard"]) == ("...", 1.0)
