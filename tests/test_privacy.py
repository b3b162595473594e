"""DP targets: calibration, noise, clipping, isolation from real data, and the leakage audit."""

import pytest
import torch

from conftest import TINY, compose_config
from gradmm import privacy
from gradmm.gradients import GradFeatures, OutputLayer, mean_gradient
from gradmm.pipeline import run_job


@pytest.mark.parametrize("epsilon,delta", [(0.5, 1e-5), (1.0, 1e-5), (4.0, 1e-6), (8.0, 1e-3)])
def test_noise_multiplier_is_the_smallest_that_meets_the_budget(epsilon, delta):
    sigma = privacy.noise_multiplier(epsilon, delta)
    assert privacy.spent_epsilon(sigma, delta) <= epsilon * (1 + 1e-3)
    assert privacy.spent_epsilon(sigma * 0.97, delta) > epsilon


def test_more_privacy_needs_more_noise():
    sigmas = [privacy.noise_multiplier(e, 1e-5) for e in (0.5, 1, 4, 8)]
    assert sigmas == sorted(sigmas, reverse=True)


def test_clipping_bounds_each_examples_gradient_norm():
    feats = GradFeatures(torch.randn(20, 3, dtype=torch.float64), torch.randn(20, 5, dtype=torch.float64) * 3)
    clipped = privacy.clip(feats, 1.0)
    norms = torch.stack([mean_gradient(clipped.select([i])).norm() for i in range(20)])
    original = torch.stack([mean_gradient(feats.select([i])).norm() for i in range(20)])
    assert (norms <= 1 + 1e-12).all()
    small = original <= 1
    assert torch.allclose(norms[small], original[small])


@pytest.mark.parametrize("relation,factor", [("add_remove", 1), ("replace_one", 2)])
def test_released_noise_has_the_calibrated_standard_deviation(relation, factor):
    cfg = compose_config([*TINY, "privacy=dp", "privacy.epsilon=2", "privacy.clip=0.5", f"privacy.relation={relation}"])
    feats = GradFeatures(torch.randn(8, 2, dtype=torch.float64), torch.randn(8, 6, dtype=torch.float64))
    labels = [0, 1] * 4
    clean = [mean_gradient(privacy.clip(feats, 0.5).select(torch.tensor(labels) == k)) for k in range(2)]
    draws = torch.stack([
        privacy.release_targets(feats, labels, 2, cfg, torch.Generator().manual_seed(s)).targets[0] - clean[0]
        for s in range(300)
    ]) * 4  # n_k = 4: back to the noise on the sum
    expected = privacy.noise_multiplier(2.0, cfg.privacy.delta) * 0.5 * factor
    assert abs(draws.std().item() / expected - 1) < 0.05
    assert abs(draws.mean().item()) < 0.05 * expected


def test_real_data_is_unreachable_after_the_release(tmp_path, monkeypatch):
    import gradmm.pipeline as pipeline

    seen = {}
    real_generate_rounds = pipeline.generate_rounds

    def spy(cfg, setup, *args, **kwargs):
        seen["real"] = setup.real
        return real_generate_rounds(cfg, setup, *args, **kwargs)

    monkeypatch.setattr(pipeline, "generate_rounds", spy)
    cfg = compose_config([*TINY, "privacy=dp", "privacy.delta=1e-3", f"paths.output_root={tmp_path}"])
    summary = run_job(cfg, tmp_path / "job")  # would raise PrivacyError if anything touched real data
    assert isinstance(seen["real"], privacy.RealDataReleased)
    for touch in (lambda r: list(r), len, lambda r: r[0], bool):
        with pytest.raises(privacy.PrivacyError):
            touch(seen["real"])
    assert summary["real_examples"] is None
    assert summary["privacy"]["spent_epsilon"] <= 1.0 * (1 + 1e-3)
    assert summary["privacy"]["accountant"] == privacy.ACCOUNTANT


def test_private_targets_differ_from_the_exact_ones(tiny_lm_factory):
    cfg = compose_config([*TINY, "privacy=dp", "privacy.delta=1e-3"])
    lm = tiny_lm_factory()
    head = OutputLayer.build(lm.output_weight, None, [3309, 1109], "label_words")
    feats = head.features(torch.randn(6, lm.output_weight.shape[1], dtype=lm.dtype), torch.tensor([0, 1] * 3))
    released = privacy.release_targets(feats, [0, 1] * 3, 2, cfg, torch.Generator().manual_seed(0)).targets
    exact = [mean_gradient(privacy.clip(feats, 1.0).select(torch.tensor([0, 1] * 3) == k)) for k in range(2)]
    assert not torch.allclose(released[0], exact[0])


def _brute_force_ngram(a, b):
    return max((n for n in range(1, len(a) + 1) for i in range(len(a) - n + 1)
                if any(a[i:i + n] == b[j:j + n] for j in range(len(b) - n + 1))), default=0)


def test_longest_shared_ngram_against_brute_force():
    g = torch.Generator().manual_seed(0)
    vocab = ["a", "b", "c", "d"]
    for _ in range(50):
        a = [vocab[i] for i in torch.randint(4, (int(torch.randint(0, 9, (1,), generator=g)),), generator=g)]
        b = [vocab[i] for i in torch.randint(4, (int(torch.randint(0, 9, (1,), generator=g)),), generator=g)]
        assert privacy.longest_shared_ngram(a, b) == _brute_force_ngram(a, b)


def test_leakage_report_flags_copied_text():
    real = ["the acting is superb and the story moves along at a brisk pace", "a dull film"]
    synthetic = ["i think the acting is superb and the story moves along nicely", "completely new words here"]
    rows, figures = privacy.leakage_report(synthetic, real)
    assert rows[0]["longest_shared_ngram"] == 8 and rows[0]["nearest_real"] == real[0]
    assert rows[1]["longest_shared_ngram"] == 0
    assert figures == {"max_shared_ngram": 8, "mean_shared_ngram": 4.0, "n_sharing_8gram": 1}
