"""Differentially private targets (method.md section 5) and the leakage audit.

The mechanism. Class k's target is released as
    T_k = (sum_{b in class k} clip_C(g_b) + N(0, (sigma * Delta)^2 I)) / n_k,
where g_b = a_b h_b^T is example b's closed-form last-layer gradient, clip_C rescales it to Frobenius
norm at most C (its norm is ||a_b|| * ||h_b||, so clipping rescales the feature rows: no per-example
pass through the model), and n_k is the class's quota in the stratified sample of generation.n_real:
a function of the config alone, hence public, and the divisor whatever the data.

Neighbouring relation and sensitivity: `add_remove` (default; dp-accounting's default relation): one
real example more or less changes one class's sum by at most C, so Delta = C. `replace_one`: one
example swapped for another changes it by at most 2C, so Delta = 2C. Every example belongs to exactly one
class, so the per-class releases act on disjoint data and compose in parallel: the whole release is
one Gaussian mechanism with noise multiplier sigma, which dp-accounting calibrates for (epsilon, delta).

Why dp-accounting: Google's maintained accountant library with privacy-loss-distribution accounting
(tight for a single Gaussian release) and a generic calibration routine, pure Python; Opacus brings a
DP-SGD training stack we do not use, and prv-accountant only accounts, it does not calibrate.

After the release nothing in generation may read real data: `RealDataReleased` replaces the real
examples, and any access raises. The leakage audit is the one exception, explicitly: it reloads the
examples to measure what the synthetic texts share with them, and its result is never fed back.
"""

from __future__ import annotations

from dataclasses import dataclass

import dp_accounting
import torch
from dp_accounting import pld
from omegaconf import DictConfig

from gradmm.gradients import GradFeatures, mean_gradient

ACCOUNTANT = "dp_accounting.pld.PLDAccountant"


class PrivacyError(RuntimeError):
    """Real data was reached after the private release."""


class RealDataReleased:
    """Stands in for the real examples after the private release: every use raises."""

    def _refuse(self, *args, **kwargs):
        raise PrivacyError(
            "the real examples are not reachable after the private release (privacy=dp): "
            "use the noisy targets or public configuration instead"
        )

    __iter__ = __len__ = __getitem__ = __bool__ = _refuse


def noise_multiplier(epsilon: float, delta: float) -> float:
    """Smallest sigma for which one Gaussian mechanism (noise std = sigma x sensitivity) is
    (epsilon, delta)-DP under the privacy-loss-distribution accountant."""
    return float(dp_accounting.calibrate_dp_mechanism(pld.PLDAccountant, dp_accounting.GaussianDpEvent,
                                                      epsilon, delta))


def spent_epsilon(sigma: float, delta: float) -> float:
    accountant = pld.PLDAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(sigma))
    return float(accountant.get_epsilon(delta))


def clip(feats: GradFeatures, max_norm: float) -> GradFeatures:
    norms = feats.a.norm(dim=1) * feats.h.norm(dim=1)
    scale = (max_norm / norms.clamp_min(1e-12)).clamp(max=1.0)
    return GradFeatures(feats.a * scale[:, None], feats.h)


@dataclass
class Release:
    targets: list[torch.Tensor]
    facts: dict


def release_targets(feats: GradFeatures, labels: list[int], n_classes: int, cfg: DictConfig,
                    generator: torch.Generator) -> Release:
    p = cfg.privacy
    sigma = noise_multiplier(p.epsilon, p.delta)
    sensitivity = p.clip * (2 if p.relation == "replace_one" else 1)
    clipped = clip(feats, p.clip)
    labels_t = torch.tensor(labels, device=feats.a.device)
    targets = []
    for k in range(n_classes):
        rows = labels_t == k
        n_k = int(rows.sum())  # the public quota: see the module docstring
        total = mean_gradient(clipped.select(rows)) * n_k
        noise = torch.randn(total.shape, generator=generator, dtype=torch.float64) * (sigma * sensitivity)
        targets.append((total + noise.to(total)) / n_k)
    facts = {
        "epsilon": p.epsilon,
        "delta": p.delta,
        "spent_epsilon": spent_epsilon(sigma, p.delta),
        "noise_multiplier": sigma,
        "noise_std": sigma * sensitivity,
        "clip": p.clip,
        "relation": p.relation,
        "accountant": ACCOUNTANT,
    }
    return Release(targets, facts)


def _words(text: str) -> list[str]:
    return text.lower().split()


def longest_shared_ngram(a: list[str], b: list[str]) -> int:
    """Length of the longest run of consecutive words common to both."""
    best, previous = 0, [0] * (len(b) + 1)
    for x in a:
        current = [0] * (len(b) + 1)
        for j, y in enumerate(b, 1):
            if x == y:
                current[j] = previous[j - 1] + 1
                best = max(best, current[j])
        previous = current
    return best


def leakage_report(synthetic: list[str], real: list[str]) -> tuple[list[dict], dict]:
    """Per synthetic text, the longest word n-gram it shares with any real text and the real text
    sharing the most distinct words with it (Jaccard); plus summary figures."""
    real_words = [_words(t) for t in real]
    real_sets = [set(w) for w in real_words]
    rows = []
    for text in synthetic:
        words = _words(text)
        shared = [longest_shared_ngram(words, r) for r in real_words]
        overlap = [len(set(words) & s) / max(1, len(set(words) | s)) for s in real_sets]
        nearest = max(range(len(real)), key=overlap.__getitem__)
        rows.append({"text": text, "longest_shared_ngram": max(shared, default=0),
                     "nearest_real": real[nearest], "nearest_jaccard": overlap[nearest]})
    lengths = [r["longest_shared_ngram"] for r in rows]
    return rows, {
        "max_shared_ngram": max(lengths, default=0),
        "mean_shared_ngram": sum(lengths) / max(1, len(lengths)),
        "n_sharing_8gram": sum(n >= 8 for n in lengths),
    }
