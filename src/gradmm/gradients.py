"""Closed-form last-layer gradients and the matching loss (method.md section 2).

For one example with final hidden state h, output rows W (and bias c), p = softmax(W h + c) and label
y, the output-layer gradient is (p - e_y) h^T (and p - e_y for c). A set of examples is therefore
represented by `GradFeatures` (a_b = p_b - e_y, h_b) and its mean gradient G = (1/N) sum_b a_b h_b^T is
never materialised inside the optimisation: inner products and norms come from Gram matrices.

With `label_words` loss the softmax runs over the label words' logits only (the classifier the
fine-tuning stage trains), so a has one entry per class; with `full_vocab` it is the next-token loss
over the whole vocabulary. A bias, where the model has one, is folded in by appending 1 to h.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class GradFeatures:
    a: torch.Tensor  # N x K: dL/dlogits for the K output rows the loss reads
    h: torch.Tensor  # N x d': final hidden states (with a trailing 1 when the output layer has a bias)

    def __len__(self) -> int:
        return self.a.shape[0]

    def cat(self, other: GradFeatures) -> GradFeatures:
        return GradFeatures(torch.cat([self.a, other.a]), torch.cat([self.h, other.h]))

    def select(self, index) -> GradFeatures:
        return GradFeatures(self.a[index], self.h[index])


@dataclass
class OutputLayer:
    """The K output rows the loss reads (all V rows for full_vocab) and the label -> row map."""

    weight: torch.Tensor  # K x d
    bias: torch.Tensor | None
    label_rows: torch.Tensor  # C: the row of each class's label token

    @classmethod
    def build(cls, weight, bias, label_token_ids: list[int], loss: str) -> OutputLayer:
        ids = torch.tensor(label_token_ids, device=weight.device)
        if loss == "label_words":
            return cls(weight[ids], None if bias is None else bias[ids], torch.arange(len(ids), device=ids.device))
        if loss == "full_vocab":
            return cls(weight, bias, ids)
        raise ValueError(f"matching.loss={loss!r} is not one of label_words, full_vocab.")

    def features(self, hidden: torch.Tensor, labels: torch.Tensor) -> GradFeatures:
        # Float32 at least, whatever the model runs in: kept in bf16, SmolLM2's features put its gradient
        # distances up to 6.5e-3 from float32's (benchmarks/bench.py), about a finished set's distance.
        hidden = _at_least_fp32(hidden)
        logits = hidden @ self.weight.T.to(hidden.dtype)
        if self.bias is not None:
            logits = logits + self.bias.to(hidden.dtype)
            hidden = torch.cat([hidden, torch.ones_like(hidden[:, :1])], dim=1)
        a = torch.softmax(logits, dim=-1)
        a = a - torch.nn.functional.one_hot(self.label_rows[labels], a.shape[1]).to(a.dtype)
        return GradFeatures(a, hidden)

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The task loss whose gradient the features describe (used by fine-tuning and the tests)."""
        logits = hidden @ self.weight.T
        if self.bias is not None:
            logits = logits + self.bias
        return torch.nn.functional.cross_entropy(_at_least_fp32(logits), self.label_rows[labels])


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """Softmax in bf16 loses the small probabilities the gradient is made of; float64 stays float64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def mean_gradient(feats: GradFeatures) -> torch.Tensor:
    """G = (1/N) sum_b a_b h_b^T, materialised: only for targets, which are computed once."""
    return feats.a.T @ feats.h / len(feats)


def inner_with(feats: GradFeatures, target: torch.Tensor) -> torch.Tensor:
    """<G, T> for the set's mean gradient G."""
    return (feats.a * (feats.h @ target.T)).sum() / len(feats)


def sq_norm(feats: GradFeatures) -> torch.Tensor:
    """||G||^2 = (1/N^2) sum_{b,b'} <a_b, a_b'> <h_b, h_b'>."""
    return ((feats.a @ feats.a.T) * (feats.h @ feats.h.T)).sum() / len(feats) ** 2


def set_distance(feats: GradFeatures, target: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """Distance between the set's mean gradient and the target: the quantity generation minimises.

    cosine: 1 - cos(G, T). l2: ||G - T|| / ||T||, relative so that tasks and models compare.
    """
    return distance_from_sums(inner_with(feats, target), sq_norm(feats), target, kind)


def distance_from_sums(inner: torch.Tensor, g2: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """The set distance from <G, T> and ||G||^2, so batched variants can update those sums instead."""
    t2 = (target * target).sum()
    if kind == "cosine":
        return 1 - inner / (g2.clamp_min(1e-30).sqrt() * t2.sqrt())
    if kind == "l2":
        return (g2 - 2 * inner + t2).clamp_min(0).sqrt() / t2.sqrt()
    raise ValueError(f"matching.distance={kind!r} is not one of cosine, l2.")


def example_distances(feats: GradFeatures, target: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """Each example's own gradient against the target (N values), batched."""
    inner = (feats.a * (feats.h @ target.T)).sum(dim=1)
    g2 = (feats.a * feats.a).sum(dim=1) * (feats.h * feats.h).sum(dim=1)
    return distance_from_sums(inner, g2, target, kind)


@dataclass
class Objective:
    """The matching loss of one class's synthetic set, whose mean gradient is G.

    The class term is distance(G, T) against the class target T. Fine-tuning, though, follows the
    gradient of batches that mix the classes, and with label words the class targets nearly cancel
    in that mix (on SmolLM2 / SST-2, cos(T_0, -T_1) = 0.99): what tells the classes apart is their
    small difference, which a per-class cosine does not see (it ignores the scale of G, and a few
    percent of error in either class swamps the mix). With union_weight > 0 the loss adds
    union_weight x distance(G + O, T + O), where O is the sum of the other classes' targets: the
    balanced union of all classes against its target, the other classes counted at their targets, so
    each class's set can still be optimised on its own. On SmolLM2 / SST-2 that term trained worse
    models (README, the CPU comparison), so the configs leave it off.
    """

    target: torch.Tensor
    distance: str = "cosine"
    others: torch.Tensor | None = None
    union_weight: float = 0.0

    def __post_init__(self):
        if self.union_weight and self.others is None:
            raise ValueError("an Objective with union_weight > 0 needs the other classes' targets (others).")
        # T + O and the constants of the union term, once: with full_vocab they are vocab x hidden.
        if self.union_weight:
            self._union = self.target + self.others
            self._others_dot_union = (self.others * self._union).sum()
            self._others_sq = (self.others * self.others).sum()

    def row_inners(self, feats: GradFeatures) -> torch.Tensor:
        """N x M: each row's <a_b h_b^T, X> for X = T (and O when the union term is on)."""
        matrices = [self.target] + ([self.others] if self.union_weight else [])
        return torch.stack([(feats.a * (feats.h @ m.T)).sum(1) for m in matrices], dim=-1)

    def from_sums(self, inner: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
        """The loss from the mean of `row_inners` (... x M) and ||G||^2 (...): batched variants
        update those sums instead of recomputing them."""
        loss = distance_from_sums(inner[..., 0], g2, self.target, self.distance)
        if self.union_weight:
            union_inner = inner[..., 0] + inner[..., 1] + self._others_dot_union
            union_g2 = g2 + 2 * inner[..., 1] + self._others_sq
            loss = loss + self.union_weight * distance_from_sums(union_inner, union_g2, self._union, self.distance)
        return loss

    def __call__(self, feats: GradFeatures) -> torch.Tensor:
        return self.from_sums(self.row_inners(feats).mean(0), sq_norm(feats))


def replacement_distances(
    current: GradFeatures, candidates: GradFeatures, rows: torch.Tensor, objective: Objective
) -> torch.Tensor:
    """The objective after replacing row rows[j] of `current` with candidate j, for every j at once.

    Exact (no linearisation) and O(J * N) given the features: it updates the Gram sums of
    `sq_norm` and the inner products of `Objective.row_inners` instead of recomputing them per candidate.
    """
    n = len(current)
    kernel = (current.a @ current.a.T) * (current.h @ current.h.T)  # N x N
    total = kernel.sum()
    cross_new = (candidates.a @ current.a.T) * (candidates.h @ current.h.T)  # J x N
    self_new = (candidates.a * candidates.a).sum(1) * (candidates.h * candidates.h).sum(1)
    row_sum_old = kernel[rows].sum(1)
    k_old_old = kernel[rows, rows]
    k_new_old = cross_new[torch.arange(len(rows)), rows]
    # Sum over pairs after the swap: drop row r's pairs, add the candidate's pairs with the other rows.
    new_total = total - 2 * row_sum_old + k_old_old + 2 * (cross_new.sum(1) - k_new_old) + self_new
    per_row_inner = objective.row_inners(current)
    inner = (per_row_inner.sum(0) - per_row_inner[rows] + objective.row_inners(candidates)) / n
    return objective.from_sums(inner, new_total / n**2)


def balanced_union_distance(feats: GradFeatures, labels: torch.Tensor, targets: list[torch.Tensor],
                            kind: str = "cosine") -> torch.Tensor:
    """Distance between the mean over classes of each class's mean gradient and the mean of the
    class targets: the gradient of a class-balanced batch, which is what fine-tuning follows."""
    present = [k for k in range(len(targets)) if (labels == k).any()]
    counts = torch.stack([(labels == k).sum() for k in present]).to(feats.a.dtype)
    # Rows reweighted so that the plain mean over them is the mean of the class means.
    weight = torch.zeros(len(feats), dtype=feats.a.dtype, device=feats.a.device)
    for k, n_k in zip(present, counts, strict=True):
        weight[labels == k] = len(feats) / (len(present) * n_k)
    union_target = torch.stack([targets[k] for k in present]).mean(0)
    return set_distance(GradFeatures(feats.a * weight[:, None], feats.h), union_target, kind)


@torch.no_grad()
def text_features(lm, head: OutputLayer, inputs: list[list[int]], labels: list[int], batch_size: int = 32):
    """Features of classifier inputs (token ids, prompt included), batched over right-padded rows."""
    parts = []
    for start in range(0, len(inputs), batch_size):
        ids, lengths = lm.pad(inputs[start : start + batch_size])
        hidden = lm.last_hidden(input_ids=ids, lengths=lengths)
        parts.append(head.features(hidden, torch.tensor(labels[start : start + batch_size], device=ids.device)))
    return GradFeatures(torch.cat([p.a for p in parts]), torch.cat([p.h for p in parts]))


def class_targets(feats: GradFeatures, labels: list[int], n_classes: int) -> list[torch.Tensor]:
    """Per class, the mean last-layer gradient of its real examples."""
    labels_t = torch.tensor(labels, device=feats.a.device)
    return [mean_gradient(feats.select(labels_t == k)) for k in range(n_classes)]
