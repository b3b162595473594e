"""Evaluation protocol: disjoint splits, fine-tuning that learns and restores, the stage end to end."""

import json

import pytest
import torch

from conftest import TINY, compose_config
from gradmm import finetune
from gradmm.finetune import Classifier, make_splits, train_and_select
from gradmm.models import load_lm
from gradmm.pipeline import prepare, run_job
from gradmm.tasks import load_split, stratified_sample

EVAL = [
    "evaluate.steps=4", "evaluate.eval_every=2", "evaluate.batch_size=4", "evaluate.n_dev=12",
    "evaluate.max_eval=16", "evaluate.n_train=8", "evaluate.seeds=[0,1]", "evaluate.lrs=[1e-3,1e-4]",
    "evaluate.few_shot_k=2",
]


def test_splits_are_disjoint_from_each_other_and_from_the_generator():
    cfg = compose_config(TINY)
    train, evaluation = load_split(cfg, "train"), load_split(cfg, "validation")
    generator = stratified_sample(train, 50, 2, 0)
    splits = make_splits(train, evaluation, generator, 200, 2, 0)
    seen, dev, pool = ({e.index for e in part} for part in (generator, splits.dev, splits.pool))
    assert not seen & dev and not seen & pool and not dev & pool
    assert len(seen) + len(dev) + len(pool) == len(train)


def test_no_evaluation_or_generator_example_reaches_training_or_selection(tmp_path, monkeypatch):
    cfg = compose_config([*TINY, "stages=[generate,filter,evaluate]", *EVAL, f"paths.output_root={tmp_path}",
                          "evaluate.train_on=real_random", "evaluate.baselines=[real_seen]"])
    seen_by_training = []

    real_train_and_select = finetune.train_and_select

    def spy(lm, verbalizer, train, dev, *args, **kwargs):
        seen_by_training.append(({e.text for e in train}, {e.text for e in dev}))
        return real_train_and_select(lm, verbalizer, train, dev, *args, **kwargs)

    import gradmm.pipeline as pipeline

    monkeypatch.setattr(pipeline, "train_and_select", spy)
    run_job(cfg, tmp_path / "job")
    evaluation_texts = {e.text for e in load_split(cfg, "validation")}
    generator_texts = {e.text for e in prepare(cfg).real}
    assert len(seen_by_training) == 4  # real_random and real_seen, two seeds each
    for i, (train, dev) in enumerate(seen_by_training):
        assert not train & evaluation_texts and not dev & evaluation_texts
        assert not dev & generator_texts
        if i < 2:  # real_random: a fresh subset, never the generator's examples
            assert not train & generator_texts
        else:  # real_seen: exactly the generator's examples
            assert train == generator_texts


def test_fine_tuning_lowers_the_loss_and_restores_the_weights(tiny_cfg):
    cfg = compose_config([*TINY, *EVAL, "evaluate.steps=30", "evaluate.eval_every=10", "evaluate.lrs=[3e-3]"])
    setup = prepare(cfg)
    lm = load_lm(cfg.model, cfg.paths.cache_dir)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    train = setup.real
    classifier = Classifier(lm, setup.verbalizer)

    def train_loss():
        ids, lengths = lm.pad(setup.verbalizer.encode(lm.tokenizer, [e.text for e in train]))
        with torch.no_grad():
            return classifier.head().loss(lm.last_hidden(input_ids=ids, lengths=lengths),
                                          torch.tensor([e.label for e in train])).item()

    start = train_loss()
    selected = train_and_select(lm, setup.verbalizer, train, train, cfg, 2, seed=0)
    assert all(torch.equal(v, lm.model.state_dict()[k]) for k, v in before.items()), "weights restored"
    assert not all(p.requires_grad for p in lm.model.parameters())
    lm.model.load_state_dict(selected["state"])
    assert train_loss() < start


def test_evaluate_stage_end_to_end_and_resume(tmp_path, monkeypatch):
    import gradmm.pipeline as pipeline

    cfg = compose_config([*TINY, "stages=[generate,filter,evaluate]", *EVAL, f"paths.output_root={tmp_path}",
                          "evaluate.baselines=[zero_shot,few_shot,real_seen,real_random]", "filter.classifier=none"])
    summary = run_job(cfg, tmp_path / "job")
    assert 0 <= summary["accuracy"] <= 1 and summary["accuracy_std"] >= 0
    assert set(summary["baselines"]) == {"zero_shot", "few_shot", "real_seen", "real_random"}
    assert len(summary["per_class_accuracy"]) == 2
    assert (tmp_path / "job" / "synthetic_filtered.jsonl").is_file()
    written = json.loads((tmp_path / "job" / "summary.json").read_text())
    assert written["accuracy"] == summary["accuracy"]

    # Re-running the finished job trains nothing again.
    monkeypatch.setattr(pipeline, "train_and_select", lambda *a, **k: pytest.fail("retrained"))
    assert run_job(cfg, tmp_path / "job")["accuracy"] == summary["accuracy"]
    monkeypatch.undo()

    # A later job evaluates the same synthetic data another way, without generating.
    other = compose_config([*TINY, "stages=[evaluate]", *EVAL, f"paths.output_root={tmp_path}",
                            f"data.synthetic_from={tmp_path / 'job'}", "evaluate.train_on=synthetic",
                            "evaluate.baselines=[zero_shot]", "evaluate.seeds=[0]"])
    result = run_job(other, tmp_path / "other")
    assert result["evaluation"]["train_on"] == "synthetic" and "n_synthetic" not in result
