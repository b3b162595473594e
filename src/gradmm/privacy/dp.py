"""Differentially private targets (docs/method.md section 5): the release of the per-class targets.

What is protected: the private dataset D is the generator's real examples (the stratified sample of
`generation.n_real` from the training split). The guarantee covers everything a privacy=dp job derives
from D: the targets, the synthetic texts, their scores, filtering, logged metrics and W&B. The number of
examples per class is public: it is the class's quota in that stratified sample, a function of the
config alone. Where D's rows sit in the training file (row numbers) is not protected either: the
evaluation uses them, and only them, to keep its dev split disjoint from D. The rest of the training
split and the evaluation split are the benchmark harness, outside D.

The mechanism. Class k's target is released as
    T_k = (sum_{b in D, class k} clip_C(g_b) + N(0, (sigma * Delta)^2 I)) / n_k,
where g_b is example b's gradient of the matched parameter group (conf/matching: a block's linear layers
by default, or the output layer), held in Gram form (gradmm.method.gradients.GradFeatures), clip_C rescales it
to Frobenius norm at most C (the norm comes from the Gram sums, so clipping rescales feature rows: no
per-example pass through the model), and n_k is the public quota, so dividing by it is post-processing.

Neighbouring relation and sensitivity. The per-class counts n_k are public and fixed, so the natural
relation is `replace_one` (the default): D and D' differ in one example, swapped for any other; that
moves one class's clipped sum by up to 2C (same class) or two sums by C each (other class: sqrt(2) C in
all), so Delta = 2C. `add_remove` (D' has one example more or fewer; Delta = C) is offered too. Either
way the mechanism is defined on every neighbour: it never checks a class's count against its quota (an
error there would itself be an output that differs between neighbours); it always divides by the public
quota. Every example belongs to exactly one class, so the per-class releases act on disjoint parts of
D and compose in parallel: the whole release is one Gaussian mechanism with noise multiplier sigma, which
dp-accounting calibrates for (epsilon, delta). Releases over the same examples compose in the privacy
ledger (gradmm.privacy.ledger), which states the total.

The noise. It is never a function of the (public) config seed, which would let anyone subtract it, nor
of a seeded pseudo-random generator: a Mersenne Twister's state can be recovered from its outputs.
Following Opacus's secure mode, every uniform variate is 53 bits from the operating system's CSPRNG
(os.urandom), turned into normals by Box-Muller, and each noise coordinate is the sum of four such
normals halved (Holohan and Braghin 2021): smoothing the low-order bits that floating-point attacks on
Gaussian samplers read (Mironov 2012). It is a mitigation, as in Opacus, not a proof against them.

Why dp-accounting: Google's maintained accountant library, with privacy-loss-distribution accounting
(tight for one Gaussian release) and a generic calibration routine, in pure Python. Opacus would bring a
DP-SGD training stack we do not use, and prv-accountant only accounts, it does not calibrate.

After the release nothing may read D: `PrivateExamples.seal` keeps only the row numbers, and reading an
example's text or label raises `PrivacyError`. The leakage audit (gradmm.privacy.leakage) is the one, explicit,
exception: a post-hoc check that reloads D to measure what the synthetic texts share with it; its result is never fed
back into generation. Under privacy=dp it runs only when asked (privacy.audit_dir), and writes there,
outside the job directory: nothing of it reaches summary.json, stdout or W&B.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import dp_accounting
import torch
from dp_accounting import pld

from gradmm.method.gradients import GradFeatures
from gradmm.privacy.ledger import MECHANISM, SENSITIVITY, composed_epsilon

ACCOUNTANT = "dp_accounting.pld.PLDAccountant"


class PrivacyError(RuntimeError):
    """The private examples were read after the private release."""


def _refuse(*args, **kwargs):
    raise PrivacyError(
        "the real examples are not readable after the private release (privacy=dp): "
        "use the noisy targets or public configuration instead"
    )


class RedactedExample:
    """A private example after the release: where it was in its split, not what it was."""

    __slots__ = ("index",)
    text = property(_refuse)
    label = property(_refuse)

    def __init__(self, index: int):
        self.index = index


class PrivateExamples:
    """The generator's real examples under privacy=dp: readable until `seal()`, then redacted."""

    def __init__(self, examples: list):
        self._examples: list | None = list(examples)
        self._indices = [ex.index for ex in examples]

    def seal(self) -> None:
        self._examples = None

    @property
    def sealed(self) -> bool:
        return self._examples is None

    def _view(self) -> list:
        return [RedactedExample(i) for i in self._indices] if self.sealed else self._examples

    def __len__(self) -> int:  # n_real: public
        return len(self._indices)

    def __iter__(self):
        return iter(self._view())

    def __getitem__(self, item):
        return self._view()[item]


def seal(examples) -> None:
    """Ends access to the private examples (privacy=dp); plain lists (privacy=none) stay readable."""
    if isinstance(examples, PrivateExamples):
        examples.seal()


def is_sealed(examples) -> bool:
    return isinstance(examples, PrivateExamples) and examples.sealed


@functools.cache  # a root search over accountants: seconds, and a pure function
def noise_multiplier(epsilon: float, delta: float) -> float:
    """Smallest sigma for which one Gaussian mechanism (noise std = sigma x sensitivity) is
    (epsilon, delta)-DP under the privacy-loss-distribution accountant."""
    return float(dp_accounting.calibrate_dp_mechanism(pld.PLDAccountant, dp_accounting.GaussianDpEvent,
                                                      epsilon, delta))


def clip(feats: GradFeatures, max_norm: float) -> GradFeatures:
    """Each example's gradient rescaled to Frobenius norm at most max_norm."""
    norms = feats.self_kernel().clamp_min(0).sqrt()
    return feats.scaled((max_norm / norms.clamp_min(1e-30)).clamp(max=1.0))


_CHUNK = 1 << 20  # normals drawn at a time: bounds the memory of a full-vocabulary release


def _secure_uniform(n: int) -> torch.Tensor:
    """n floats uniform on (0, 1), 53 bits each, from the operating system's CSPRNG."""
    bits = torch.frombuffer(bytearray(os.urandom(8 * n)), dtype=torch.int64) & ((1 << 53) - 1)
    return (bits.double() + 0.5) / 2.0**53


def _secure_normal(n: int) -> torch.Tensor:
    """2n standard normals: Box-Muller on n pairs of secure uniforms."""
    radius, angle = torch.sqrt(-2 * torch.log(_secure_uniform(n))), 2 * math.pi * _secure_uniform(n)
    return torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])


def secure_gaussian(shape: tuple[int, ...], std: float) -> torch.Tensor:
    """N(0, std^2) noise of `shape` (float64), each coordinate the halved sum of four secure normals."""
    n = math.prod(shape)
    out = torch.empty(n, dtype=torch.float64)
    for start in range(0, n, _CHUNK):
        m = min(_CHUNK, n - start)
        out[start:start + m] = _secure_normal(2 * m).reshape(4, m).sum(0) / 2
    return (out * std).reshape(shape)


@dataclass(frozen=True)
class Mechanism:
    """The privacy settings a release is made under (privacy.epsilon, delta, clip, relation)."""

    epsilon: float
    delta: float
    clip: float
    relation: str


@dataclass
class Release:
    targets: list[list[torch.Tensor]]
    facts: dict  # for summary.json and W&B


def release_facts(p: Mechanism) -> dict:
    """What a release under these privacy settings is, known before any noise is drawn: what the ledger
    records and the budget is checked against."""
    sigma = noise_multiplier(p.epsilon, p.delta)
    sensitivity = p.clip * SENSITIVITY[p.relation]
    return {"epsilon": p.epsilon, "delta": p.delta, "spent_epsilon": composed_epsilon((sigma,), p.delta),
            "noise_multiplier": sigma, "noise_std": sigma * sensitivity, "clip": p.clip, "relation": p.relation,
            "sensitivity": sensitivity, "mechanism": MECHANISM, "accountant": ACCOUNTANT}


def release_targets(feats: GradFeatures, labels: list[int], mechanism: Mechanism, quotas: list[int],
                    noise: Callable[[tuple[int, ...], float], torch.Tensor] = secure_gaussian) -> Release:
    """Per class, the clipped gradient sum plus calibrated Gaussian noise, over the public per-class
    quotas. Defined for any class counts (see the neighbouring relation above); `noise(shape, std)` is
    for tests only."""
    facts = release_facts(mechanism)
    clipped = clip(feats, mechanism.clip)
    labels_t = torch.tensor(labels, device=feats.deltas[0].device)
    targets = []
    for k, quota in enumerate(quotas):
        members = clipped.select(labels_t == k)
        targets.append([(total + noise(tuple(total.shape), facts["noise_std"]).to(total)) / quota
                        for total in members.total()])
    return Release(targets, {**facts, "class_counts": quotas})
