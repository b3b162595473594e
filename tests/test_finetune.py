"""Evaluation protocol: disjoint splits, fine-tuning that learns and restores, the stage end to end."""

import json

import pytest
import torch
from conftest import TINY, compose_config, load_script

from gradmm.config.validation import ConfigError, validate
from gradmm.data.models import load_lm
from gradmm.data.tasks import load_split, stratified_sample
from gradmm.method.fine_tuning import checkpoint_applied
from gradmm.pipeline import prepare, run_job
from gradmm.runs import manifest
from gradmm.stages import evaluate
from gradmm.stages.classifier import Classifier, few_shot_demonstrations
from gradmm.stages.evaluate import make_splits, train_and_select

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


@pytest.mark.slow
def test_no_evaluation_or_generator_example_reaches_training_or_selection(tmp_path, monkeypatch):
    cfg = compose_config([*TINY, "stages=[generate,filter,evaluate]", *EVAL, f"paths.output_root={tmp_path}",
                          "evaluate.train_on=real_random", "evaluate.baselines=[real_seen]",
                          "filter.classifier=none"])
    seen_by_training = []

    real_train_and_select = evaluate.train_and_select
    real_predict = Classifier.predict
    scored = []

    def spy(lm, verbalizer, train, dev, *args, **kwargs):
        seen_by_training.append(({e.text for e in train}, {e.text for e in dev}))
        return real_train_and_select(lm, verbalizer, train, dev, *args, **kwargs)

    def predict_spy(self, texts, prefix=()):
        scored.append(set(texts))
        return real_predict(self, texts, prefix)

    monkeypatch.setattr(evaluate, "train_and_select", spy)
    monkeypatch.setattr(Classifier, "predict", predict_spy)
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
    # Apart from dev scoring during selection, the evaluation split is scored exactly once per trained
    # model (and nothing else ever is).
    dev_texts = set().union(*(dev for _, dev in seen_by_training))
    final_scores = [texts for texts in scored if texts & evaluation_texts]
    assert len(final_scores) == 4
    assert all(texts <= evaluation_texts for texts in final_scores)
    assert all(texts <= dev_texts for texts in scored if not texts & evaluation_texts)


@pytest.mark.slow
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
    with checkpoint_applied(lm, selected["checkpoint"]):
        assert train_loss() < start
    assert all(torch.equal(v, lm.model.state_dict()[k]) for k, v in before.items()), "weights restored"


@pytest.mark.slow
def test_lora_trains_adapters_only_and_removes_them():
    pytest.importorskip("peft")
    cfg = compose_config([*TINY, *EVAL, "evaluate.steps=20", "evaluate.eval_every=10", "evaluate.lrs=[3e-2]",
                          "evaluate/method=lora", "evaluate.method.r=4"])
    validate(cfg)
    setup = prepare(cfg)
    lm = load_lm(cfg.model, cfg.paths.cache_dir)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    classifier = Classifier(lm, setup.verbalizer)
    labels = torch.tensor([e.label for e in setup.real])

    def train_loss():
        ids, lengths = lm.pad(setup.verbalizer.encode(lm.tokenizer, [e.text for e in setup.real]))
        with torch.no_grad():
            return classifier.head().loss(lm.last_hidden(input_ids=ids, lengths=lengths), labels).item()

    start = train_loss()
    selected = train_and_select(lm, setup.verbalizer, setup.real, setup.real, cfg, 2, seed=0)
    assert selected["checkpoint"]["method"] == "lora"
    assert all("lora" in k for k in selected["checkpoint"]["weights"])
    with checkpoint_applied(lm, selected["checkpoint"]):
        assert train_loss() < start
    after = lm.model.state_dict()
    assert after.keys() == before.keys(), "adapters removed"
    assert all(torch.equal(v, after[k]) for k, v in before.items()), "base weights untouched"


def test_classifier_scores_are_the_lm_logits_of_the_label_words(tiny_lm_factory, tiny_cfg):
    """Batched, right-padded scoring (with and without in-context demonstrations) against one
    unpadded forward pass per text through the whole LM."""
    lm = tiny_lm_factory()
    setup = prepare(tiny_cfg)
    classifier = Classifier(lm, setup.verbalizer, batch_size=3)
    texts = ["a fine film", "dull and far too long for what it is", "ok", "the cast is great"]
    demos = few_shot_demonstrations(setup.real, 2, 2, seed=0)
    for prefix in ([], classifier.demonstrations(demos)):
        inputs = [prefix + ids for ids in setup.verbalizer.encode(lm.tokenizer, texts)]
        with torch.no_grad():
            brute = torch.stack([lm.model(input_ids=torch.tensor([ids])).logits[0, -1] for ids in inputs])
        expected = brute[:, setup.verbalizer.label_token_ids]
        assert torch.allclose(classifier.logits(inputs), expected, atol=1e-8)
        assert classifier.predict(texts, prefix).tolist() == expected.argmax(-1).tolist()


@pytest.mark.parametrize("overrides,named", [
    (["evaluate.method._target_=gradmm.method.fine_tuning.Adapters"], "gradmm.method.fine_tuning.Adapters"),
    (["evaluate/method=lora", "evaluate.method.r=0"], "evaluate.method.r=0"),
    (["+evaluate.method.rank=4"], "unexpected keyword argument 'rank'"),
    (["filter.classifier=few_shot", "filter.few_shot_k=0", "stages=[generate,filter]"], "filter.few_shot_k"),
    (["privacy=dp", "filter.classifier=few_shot", "stages=[generate,filter]"], "few_shot"),
    (["stages=[generate,evaluate]", "evaluate.train_on=synthetic_filtered"], "filter stage"),
    (["stages=[generate,evaluate]", "evaluate.train_on=real_random", "evaluate.n_train=99999"],
     "evaluate.n_train"),
    (["evaluate.baselines=[zero_shot,zero_shot]"], "evaluate.baselines"),
])
def test_bad_stage_settings_fail_before_any_model_loads(overrides, named):
    with pytest.raises(ConfigError) as error:
        validate(compose_config([*TINY, *overrides]))
    assert named in str(error.value)


def test_evaluating_an_unfiltered_job_as_filtered_is_refused(tmp_path):
    (tmp_path / "synthetic.jsonl").write_text('{"text": "x", "label": 0}\n')
    cfg = compose_config([*TINY, "stages=[evaluate]", f"data.synthetic_from={tmp_path}",
                          "evaluate.train_on=synthetic_filtered"])
    with pytest.raises(ConfigError, match="synthetic_filtered.jsonl"):
        validate(cfg)


@pytest.mark.slow
def test_evaluate_stage_end_to_end_and_resume(tmp_path, monkeypatch):

    cfg = compose_config([*TINY, "stages=[generate,filter,evaluate]", *EVAL, f"paths.output_root={tmp_path}",
                          "evaluate.baselines=[zero_shot,few_shot,real_seen,real_random]",
                          "filter.classifier=none"])
    summary = run_job(cfg, tmp_path / "job")
    assert 0 <= summary["accuracy"] <= 1 and summary["accuracy_std"] >= 0
    assert set(summary["baselines"]) == {"zero_shot", "few_shot", "real_seen", "real_random"}
    assert len(summary["per_class_accuracy"]) == 2
    assert (tmp_path / "job" / "synthetic_filtered.jsonl").is_file()
    written = json.loads((tmp_path / "job" / "summary.json").read_text())
    assert written["accuracy"] == summary["accuracy"]

    # Re-running the finished job trains nothing again.
    monkeypatch.setattr(evaluate, "train_and_select", lambda *a, **k: pytest.fail("retrained"))
    assert run_job(cfg, tmp_path / "job")["accuracy"] == summary["accuracy"]
    monkeypatch.undo()

    records = [json.loads(line) for line in (tmp_path / "job" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("stage") == "filter" and "dropped/duplicate" in r for r in records)
    curve = [r for r in records if r.get("stage") == "evaluate" and "dev_accuracy" in r]
    assert {(r["method"], r["seed"], r["lr"]) for r in curve} == {
        (m, s, lr) for m in ("synthetic_filtered", "real_seen", "real_random")
        for s in (0, 1) for lr in (1e-3, 1e-4)
    }

    # A later job filters and evaluates the same synthetic data another way, without generating.
    other = compose_config([*TINY, "stages=[filter,evaluate]", *EVAL, f"paths.output_root={tmp_path}",
                            f"data.synthetic_from={tmp_path / 'job'}", "evaluate.train_on=synthetic",
                            "filter.classifier=few_shot", "evaluate.baselines=[zero_shot]",
                            "evaluate.seeds=[0]"])
    validate(other)
    result = run_job(other, tmp_path / "other")
    assert result["evaluation"]["train_on"] == "synthetic" and "n_synthetic" not in result
    n_generated = len((tmp_path / "job" / "synthetic.jsonl").read_text().splitlines())
    assert result["evaluation"]["n_train"] == n_generated
    assert (tmp_path / "other" / "synthetic_filtered.jsonl").is_file()


@pytest.mark.slow
def test_reproduce_cpu_writes_every_method_and_resumes_per_trained_model(tmp_path, monkeypatch):
    reproduce = load_script("experiments/reproduce_cpu.py")
    # The preset's selection (init_candidates) stays: the admm and selection rows differ only by the ADMM steps.
    kept = [o for o in (*TINY, *EVAL)
            if not o.startswith(("stages=", "evaluate.seeds=", "evaluate.lrs=", "generation.init_candidates="))]
    small = [*kept, "evaluate.seeds=[0]", "evaluate.lrs=[1e-3]", "generation.rounds=2",
             "filter.n_per_class=3", "filter.classifier=none", f"paths.output_root={tmp_path}"]
    with pytest.raises(SystemExit):  # a reduced protocol may not pass for the full one
        reproduce.main(small)
    args = ["--name", "tiny", "--results-dir", str(tmp_path / "results"), *small]
    results = reproduce.main(args)
    assert set(results) == {"admm", "admm_filtered", "selection", "selection_filtered", "lm_samples",
                            "lm_samples_filtered", "real_seen", "real_random_100", "real_random_1000", "zero_shot",
                            "few_shot"}
    # The preset selects 4 of 64 LM samples by the tiny model's block 1, then TINY's 2 ADMM steps; the
    # selection row takes no ADMM step.
    block = r"parameters: model\.layers\.1\..+ (label_words); "
    assert results["admm"]["matched"] == block + "best 4 of 64 LM samples, ADMM 2x2 (rho 0.5, matching_lm)"
    assert results["selection"]["matched"] == block + "best 4 of 64 LM samples"
    assert results["lm_samples"]["matched"] == "none (LM samples)" and results["real_seen"]["matched"] == "-"
    assert all(r["code_version"] for r in results.values())
    assert all(0 <= r["mean"] <= 1 and r["std"] >= 0 for r in results.values())
    assert results["admm_filtered"]["n_train"] <= 6 and results["real_seen"]["n_train"] == 8
    assert results["real_random_1000"]["n_train"] == 1000 and results["zero_shot"]["n_train"] == 0
    assert json.loads((tmp_path / "results" / "tiny.json").read_text()) == results
    assert "NOT the full protocol" in (tmp_path / "results" / "tiny.md").read_text()

    # Interrupted before the real_seen model was saved: the re-run trains only that one. The job's
    # summary and manifest are then those its last finished stage wrote, without the evaluation.
    saved = next(tmp_path.glob("runs/*/*/evaluation/real_seen_seed0.json"))
    saved.unlink()
    summary = json.loads((saved.parent.parent / "summary.json").read_text())
    evaluated = ("accuracy", "accuracy_std", "per_class_accuracy", "evaluation", "baselines")
    manifest.save(saved.parent.parent, {k: v for k, v in summary.items() if k not in evaluated})
    trained = []
    real = evaluate.train_and_select
    monkeypatch.setattr(evaluate, "train_and_select", lambda lm, v, train, *a, **k: (
        trained.append(len(train)), real(lm, v, train, *a, **k))[1])
    again = reproduce.main(args)
    assert trained == [8]

    def figures(row):
        return {k: v for k, v in row.items() if k != "measured"}

    assert figures(again["admm"]) == figures(results["admm"])
    # A row is dated by the run that trained its models, not by the call that collected it.
    assert again["admm"]["measured"] == results["admm"]["measured"]
    assert again["admm"]["generated_by"]["code_version"] == again["admm"]["code_version"]
    assert "generated_by" not in again["real_seen"]

    # --only re-measures the named sets and keeps every other row of the results file.
    with pytest.raises(SystemExit):
        reproduce.main(["--only", "admm,real_everything", *args])
    results_file = tmp_path / "results" / "tiny.json"
    edited = {**again, "real_seen": {**again["real_seen"], "mean": 0.123},
              "admm": {**again["admm"], "mean": 2}}
    results_file.write_text(json.dumps(edited))
    only = reproduce.main(["--only", "admm", *args])
    assert only["real_seen"]["mean"] == 0.123, "a row not named is kept from the file"
    assert figures(only["admm"]) == figures(again["admm"]), "a named row is measured again (resumed)"
    assert json.loads(results_file.read_text()) == only

