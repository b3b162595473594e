"""DP targets: calibration, noise, clipping, isolation from the real data, config rejections, and the
leakage audit."""

import json
import math

import pytest
import torch
from conftest import TINY, compose_config, quotas

import gradmm.pipeline as pipeline
import gradmm.stages.generate as generate
from gradmm.config.validation import ConfigError, validate
from gradmm.data.tasks import Example, Setup, load_split, stratified_sample
from gradmm.method.gradients import GradFeatures, OutputLayer, mean_gradient
from gradmm.privacy import dp, leakage, ledger
from gradmm.runs.target_cache import mechanism

DP = [*TINY, "privacy=dp", "privacy.delta=1e-3"]
EVAL = ["evaluate.steps=2", "evaluate.eval_every=2", "evaluate.batch_size=4", "evaluate.n_dev=8",
        "evaluate.max_eval=8", "evaluate.n_train=8", "evaluate.seeds=[0]", "evaluate.lrs=[1e-3]"]


def _analytic_gaussian_sigma(epsilon: float, delta: float) -> float:
    """The exact noise multiplier of one Gaussian release (Balle & Wang 2018, Theorem 8), by bisection:
    delta(sigma) = Phi(1/(2 sigma) - epsilon sigma) - e^epsilon Phi(-1/(2 sigma) - epsilon sigma)."""
    phi = lambda x: 0.5 * math.erfc(-x / math.sqrt(2))  # noqa: E731

    def spent_delta(sigma):
        return phi(0.5 / sigma - epsilon * sigma) - math.exp(epsilon) * phi(-0.5 / sigma - epsilon * sigma)

    lo, hi = 1e-3, 1e3
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if spent_delta(mid) > delta else (lo, mid)
    return hi


@pytest.mark.slow
@pytest.mark.parametrize("epsilon,delta", [(0.5, 1e-5), (1.0, 1e-5), (4.0, 1e-6), (8.0, 1e-3)])
def test_noise_multiplier_is_the_smallest_that_meets_the_budget(epsilon, delta):
    sigma = dp.noise_multiplier(epsilon, delta)
    assert ledger.composed_epsilon((sigma,), delta) <= epsilon * (1 + 1e-3)
    assert ledger.composed_epsilon((sigma * 0.97,), delta) > epsilon
    # The accountant's discretisation is pessimistic: never below the exact value, and close to it.
    exact = _analytic_gaussian_sigma(epsilon, delta)
    assert exact * (1 - 1e-3) <= sigma <= exact * 1.02


def test_clipping_bounds_each_examples_gradient_norm():
    feats = GradFeatures.single(torch.randn(20, 3, dtype=torch.float64), torch.randn(20, 5, dtype=torch.float64))
    original = torch.stack([mean_gradient(feats.select([i]))[0].norm() for i in range(20)])
    bound = original.median().item()
    clipped = dp.clip(feats, bound)
    norms = torch.stack([mean_gradient(clipped.select([i]))[0].norm() for i in range(20)])
    small = original <= bound
    assert torch.allclose(norms[small], original[small])
    assert torch.allclose(norms[~small], torch.full_like(norms[~small], bound))


@pytest.mark.parametrize("relation,factor", [("add_remove", 1), ("replace_one", 2)])
def test_released_noise_has_the_calibrated_standard_deviation(relation, factor):
    cfg = compose_config([*DP, "privacy.epsilon=2", "privacy.clip=0.5", f"privacy.relation={relation}"])
    feats = GradFeatures.single(torch.randn(8, 2, dtype=torch.float64), torch.randn(8, 6, dtype=torch.float64))
    labels = [0, 1] * 4
    clean = [mean_gradient(dp.clip(feats, 0.5).select(torch.tensor(labels) == k)) for k in range(2)]
    releases = [dp.release_targets(feats, labels, mechanism(cfg), quotas(cfg)) for _ in range(300)]
    # n_k = 4: back to the noise on the sum
    noise = torch.stack([torch.stack([r.targets[k][0] - clean[k][0] for k in range(2)]) for r in releases]) * 4
    expected = dp.noise_multiplier(2.0, cfg.privacy.delta) * 0.5 * factor
    assert releases[0].facts["noise_std"] == pytest.approx(expected)
    # The noise comes from the OS's entropy, unseeded, so each bound sits six standard errors out (a false
    # alarm once in ~1e9 runs, or ~1e-6 over the 276 correlations) yet far inside what a wrong std,
    # shared noise or a bias would give.
    draws = noise.numel()
    assert abs(noise.std().item() / expected - 1) < 6 / math.sqrt(2 * draws)
    assert abs(noise.mean().item()) < 6 * expected / math.sqrt(draws)
    # Independent across classes and coordinates.
    flat = noise.reshape(300, -1)
    assert torch.corrcoef(flat.T).fill_diagonal_(0).abs().max() < 6 / math.sqrt(300)


def test_release_divides_by_the_public_quota_whatever_the_counts():
    """The counts are public constants of the mechanism, so a neighbour with another count (one example
    added, removed, or replaced by one of another class) is released, not refused: an error would be an
    output that tells the neighbours apart."""
    cfg = compose_config(DP)  # n_real=8, two classes: quotas 4 and 4
    feats = GradFeatures.single(torch.randn(8, 2, dtype=torch.float64), torch.randn(8, 6, dtype=torch.float64))
    zero = lambda shape, std: torch.zeros(shape, dtype=torch.float64)  # noqa: E731
    for labels in ([0, 1] * 4, [0] * 5 + [1] * 3, [0] * 8):
        release = dp.release_targets(feats, labels, mechanism(cfg), quotas(cfg), noise=zero)
        assert release.facts["class_counts"] == [4, 4]
        sums = dp.clip(feats, 1.0).select(torch.tensor(labels) == 0).total()
        assert torch.allclose(release.targets[0][0], sums[0] / 4)


def test_private_targets_differ_from_the_exact_ones(tiny_lm_factory):
    cfg = compose_config(DP)
    lm = tiny_lm_factory()
    head = OutputLayer.build(lm.output_weight, None, [3309, 1109], "label_words")
    labels = [0, 1] * 4
    feats = head.features(torch.randn(8, lm.output_weight.shape[1], dtype=lm.dtype), torch.tensor(labels))
    released = dp.release_targets(feats, labels, mechanism(cfg), quotas(cfg)).targets
    again = dp.release_targets(feats, labels, mechanism(cfg), quotas(cfg)).targets
    exact = [mean_gradient(dp.clip(feats, 1.0).select(torch.tensor(labels) == k)) for k in range(2)]
    assert not torch.allclose(released[0][0], exact[0][0])
    assert not torch.allclose(released[0][0], again[0][0])  # the noise is not a function of the config


def test_sealed_examples_keep_their_row_numbers_and_nothing_else():
    real = dp.PrivateExamples([Example("a fine film", 1, 7), Example("a dull film", 0, 3)])
    assert [ex.text for ex in real] == ["a fine film", "a dull film"]
    dp.seal(real)
    assert dp.is_sealed(real) and len(real) == 2
    assert [ex.index for ex in real] == [7, 3]
    for read in (lambda: real[0].text, lambda: real[1].label, lambda: [ex.text for ex in real],
                 lambda: stratified_sample(list(real), 2, 2, 0)):
        with pytest.raises(dp.PrivacyError):
            read()


def _dp_job_cfg(tmp_path, *extra):
    # filter.classifier=none: the noise is fresh OS entropy in every run, and the tiny random model, as a
    # zero-shot classifier, then sometimes rejects a whole class, leaving nothing to fine-tune on. The
    # classifiers read only synthetic text; the one that would read real data (few_shot) is refused
    # under privacy=dp by validate (tested below).
    return compose_config([
        *DP, "stages=[generate,filter,evaluate]", *EVAL, "filter.classifier=none",
        "evaluate.train_on=synthetic_filtered", "evaluate.baselines=[zero_shot,real_random]",
        f"paths.output_root={tmp_path}", f"paths.target_cache_dir={tmp_path / 'targets'}", *extra,
    ])


@pytest.mark.slow
def test_no_stage_reads_real_data_after_the_release(tmp_path, monkeypatch):
    """Every stage after the release gets sealed examples, so reading one raises; the job completes,
    its outputs hold no real text, and W&B gets the release facts but not the audit."""
    cfg = _dp_job_cfg(tmp_path)
    validate(cfg)
    stages = {"generate_rounds": generate, "score_and_write": generate, "filter_stage": pipeline,
              "evaluate_stage": pipeline}
    sealed_at_call = {}

    def spy_on(name, original):
        def spy(*args, **kwargs):
            (setup,) = [a for a in args if isinstance(a, Setup)]
            sealed_at_call[name] = dp.is_sealed(setup.real)
            return original(*args, **kwargs)
        return spy

    for name, module in stages.items():
        monkeypatch.setattr(module, name, spy_on(name, getattr(module, name)))
    to_wandb = {}
    monkeypatch.setattr(pipeline.Tracker, "summary", lambda self, values: to_wandb.update(values))

    summary = pipeline.run_job(cfg, tmp_path / "job")

    assert sealed_at_call == dict.fromkeys(stages, True)
    assert summary["real_examples"] is None
    assert summary["privacy"]["spent_epsilon"] <= cfg.privacy.epsilon * (1 + 1e-3)
    assert summary["privacy"]["accountant"] == dp.ACCOUNTANT
    assert "accuracy" in summary and "privacy" in to_wandb and "leakage" not in to_wandb
    assert "DP guarantee" in summary["leakage"]["audit"]
    real = stratified_sample(load_split(cfg, "train"), cfg.generation.n_real, 2, cfg.seed)
    released = [p for p in (tmp_path / "job").rglob("*") if p.is_file() and p.name != "leakage.jsonl"
                and p.suffix in (".json", ".jsonl", ".yaml")]
    for path in released:
        content = path.read_text()
        assert not any(ex.text in content for ex in real if len(ex.text.split()) >= 4), path


def test_a_leak_after_the_release_fails(tmp_path, monkeypatch):
    """The negative control: a scoring step that reads the real examples again is stopped."""
    def leaky_score(cfg, out_dir, setup, *args, **kwargs):
        return {"real_texts": [ex.text for ex in setup.real]}

    monkeypatch.setattr(generate, "score_and_write", leaky_score)
    with pytest.raises(dp.PrivacyError):
        pipeline.run_job(_dp_job_cfg(tmp_path, "stages=[generate]"), tmp_path / "job")


EVALUATE = ["stages=[generate,evaluate]", "evaluate.train_on=synthetic"]


@pytest.mark.parametrize("overrides,named", [
    (["privacy.epsilon=0"], "privacy.epsilon"),
    (["privacy.epsilon=1000"], "privacy.epsilon"),
    (["privacy.delta=0"], "privacy.delta"),
    (["privacy.delta=0.2"], "1/generation.n_real"),
    (["privacy.clip=-1"], "privacy.clip"),
    (["privacy.relation=swap"], "privacy.relation"),
    (["cache_targets=false"], "cache_targets"),
    (["stages=[generate,evaluate]", "evaluate.train_on=real_seen"], "evaluate.train_on"),
    ([*EVALUATE, "evaluate.baselines=[few_shot]"], "few_shot"),
    ([*EVALUATE, "evaluate.baselines=[real_seen]"], "real_seen"),
    (["stages=[generate,filter]", "filter.classifier=few_shot"], "filter.classifier=few_shot"),
])
def test_configs_that_void_the_guarantee_are_rejected(overrides, named):
    with pytest.raises(ConfigError) as error:
        validate(compose_config([*DP, *overrides]))
    assert named in str(error.value)


def test_the_same_settings_are_fine_without_privacy():
    validate(compose_config([*TINY, "cache_targets=false", "stages=[generate,evaluate]",
                             "evaluate.train_on=real_seen", "evaluate.baselines=[few_shot]"]))


def _brute_force_ngram(a, b):
    return max((n for n in range(1, len(a) + 1) for i in range(len(a) - n + 1)
                if any(a[i:i + n] == b[j:j + n] for j in range(len(b) - n + 1))), default=0)


def test_longest_shared_ngram_against_brute_force():
    g = torch.Generator().manual_seed(0)
    vocab = ["a", "b", "c", "d"]

    def sentence():
        length = int(torch.randint(0, 12, (1,), generator=g))
        return [vocab[i] for i in torch.randint(4, (length,), generator=g)]

    for _ in range(200):
        a, b = sentence(), sentence()
        size, start = leakage.longest_shared_ngram(a, b)
        assert size == _brute_force_ngram(a, b)
        if size:
            assert a[start:start + size] in [b[j:j + size] for j in range(len(b) - size + 1)]
        else:
            assert not set(a) & set(b), "no shared n-gram means no shared word"


def test_leakage_report_flags_copied_text():
    real = ["The acting is superb, and the story moves along at a brisk pace.", "A dull film."]
    synthetic = ["i think the acting is superb and the story moves well", "completely new words here"]
    rows, figures = leakage.leakage_report(synthetic, real)
    assert rows[0]["longest_shared_ngram"] == 8 and rows[0]["nearest_real"] == real[0]
    assert rows[0]["shared_ngram"] == "the acting is superb and the story moves"
    assert rows[0]["shared_with"] == real[0]
    assert rows[1]["longest_shared_ngram"] == 0 and rows[1]["shared_with"] is None
    assert figures == {"max_shared_ngram": 8, "mean_shared_ngram": 4.0, "n_sharing_8gram": 1}


@pytest.mark.slow
def test_leakage_audit_is_written_for_a_non_private_run(tiny_cfg, tmp_path):
    summary = pipeline.run_job(tiny_cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "leakage.jsonl").read_text().splitlines()]
    assert len(rows) == summary["n_synthetic"]
    assert summary["leakage"]["max_shared_ngram"] == max(r["longest_shared_ngram"] for r in rows)
    assert "DP guarantee" not in summary["leakage"]["audit"]
