import torch

from gradmm.pipeline import prepare
from gradmm.reporting.tracking import Tracker
from gradmm.runs import files
from gradmm.stages.classifier import Classifier
from gradmm.stages.filter import filter_examples, filter_stage


def _row(text, label, d, ppl=5.0):
    return {"text": text, "label": label, "grad_distance": d, "log_ppl": ppl}


def test_misclassified_texts_are_dropped():
    rows = [_row("good fun", 1, 0.1), _row("awful mess", 0, 0.1), _row("bad bad", 1, 0.05)]
    kept, dropped, _ = filter_examples(rows, [1, 0, 0], 2, 5, 0.8, 0.0)
    assert [r["text"] for r in kept] == ["awful mess", "good fun"]
    assert dropped["misclassified"] == 1


def test_ranked_by_own_distance_then_balanced_to_the_smallest_class():
    rows = [_row(f"negative text {i}", 0, d) for i, d in enumerate([0.3, 0.1, 0.2])]
    rows += [_row(f"positive words {i}", 1, d) for i, d in enumerate([0.5, 0.4])]
    kept, dropped, _ = filter_examples(rows, None, 2, 10, 0.99, 0.0)
    assert [r["grad_distance"] for r in kept] == [0.1, 0.2, 0.4, 0.5]
    assert dropped["balance"] == 1


def test_perplexity_weight_changes_the_ranking():
    rows = [_row("alpha one", 0, 0.10, ppl=9.0), _row("beta two", 0, 0.12, ppl=3.0), _row("gamma", 1, 0.1)]
    kept, *_ = filter_examples(rows, None, 2, 1, 0.99, 0.0)
    assert kept[0]["text"] == "alpha one"
    kept, *_ = filter_examples(rows, None, 2, 1, 0.99, 0.1)
    assert kept[0]["text"] == "beta two"


def test_exact_and_near_duplicates_keep_the_better_ranked_copy():
    rows = [
        _row("the film was a total delight", 1, 0.2),
        _row("The film was a total delight!", 1, 0.1),  # exact duplicate up to case and punctuation
        _row("the film was a total delight today", 1, 0.3),  # near duplicate (6 of 7 words shared)
        _row("nothing in common here", 1, 0.4),
        _row("dull", 0, 0.1), _row("boring", 0, 0.2), _row("slow", 0, 0.3),
    ]
    kept, dropped, _ = filter_examples(rows, None, 2, 3, 0.8, 0.0)
    assert [r["grad_distance"] for r in kept if r["label"] == 1] == [0.1, 0.4]
    assert dropped["duplicate"] == 2


def test_keeps_at_most_n_per_class():
    rows = [_row(f"word{i} x{i}", i % 2, i / 10) for i in range(10)]
    kept, *_ = filter_examples(rows, None, 2, 2, 0.8, 0.0)
    assert len(kept) == 4


def test_the_classifier_is_calibrated_by_its_mean_score_over_the_set(tiny_cfg, tiny_lm_factory, tmp_path,
                                                                    monkeypatch):
    """A classifier biased towards one label word assigns every text to that class; centred by its mean
    score over the set, it tells the texts apart, so the filter keeps texts of both classes."""
    rows = [_row(f"text number {i}", label, 0.1 * i) for i, label in enumerate([0, 0, 1, 1])]
    files.write_jsonl(tmp_path / "synthetic.jsonl", rows)
    biased = torch.tensor([[5.0, 1.0], [5.0, 0.0], [5.0, 3.0], [5.0, 2.5]])  # argmax: class 0 for all
    monkeypatch.setattr(Classifier, "scores", lambda self, texts, prefix=(): biased)
    tiny_cfg.filter.classifier = "zero_shot"
    lm = tiny_lm_factory()
    result = filter_stage(tiny_cfg, prepare(tiny_cfg, lm.tokenizer), lm, tmp_path, tmp_path,
                          Tracker(tiny_cfg, tmp_path, active=False))
    assert result["dropped"]["misclassified"] == 0 and result["n_kept"] == 4
