"""Per-example gradients as sums of outer products, and the matching loss (docs/method.md sections 2, 11).

Every matched matrix W (an output layer, a linear layer of a block, a LoRA adapter) is used as y = W x
at one or more positions t, so one example's gradient is sum_t d_t x_t^T with d_t = dL/dy_t. A set of
examples is therefore represented by `GradFeatures`: per matrix, D (N x T x out) and X (N x T x in).
Inner products between per-example gradients, and with a materialised target, come from Gram matrices
of D and X, never from an N x out x in tensor; only targets (computed once) are materialised.

The output layer is the case T = 1 with a closed form (`OutputLayer`): d = p - e_y, x = h, the final
hidden state. With `label_words` loss the softmax runs over the label words' logits only (the
classifier the fine-tuning stage trains); with `full_vocab` it is the next-token loss over the whole
vocabulary. A bias, where the model has one, is folded in by appending 1 to x.

A gradient (a target, a class sum) is a list of tensors, one per matched matrix (`Gradient`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Gradient = list  # list[torch.Tensor]: one out x in matrix per matched matrix


def vdot(u: Gradient, v: Gradient) -> torch.Tensor:
    return sum((a * b).sum() for a, b in zip(u, v, strict=True))


def vadd(u: Gradient, v: Gradient) -> Gradient:
    return [a + b for a, b in zip(u, v, strict=True)]


def vsum(gradients: list[Gradient]) -> Gradient:
    total = gradients[0]
    for g in gradients[1:]:
        total = vadd(total, g)
    return total


@dataclass
class GradFeatures:
    """N examples' gradients: example i's gradient of matrix m is sum_t deltas[m][i, t] inputs[m][i, t]^T."""

    deltas: list[torch.Tensor]  # per matrix: N x T x out
    inputs: list[torch.Tensor]  # per matrix: N x T x in

    @classmethod
    def single(cls, a: torch.Tensor, h: torch.Tensor) -> GradFeatures:
        """One matrix read at one position per example: gradient a_i h_i^T (the output layer's form)."""
        return cls([a[:, None]], [h[:, None]])

    def __len__(self) -> int:
        return self.deltas[0].shape[0]

    def select(self, index) -> GradFeatures:
        return GradFeatures([d[index] for d in self.deltas], [x[index] for x in self.inputs])

    def scaled(self, weights: torch.Tensor) -> GradFeatures:
        """Example i's gradient times weights[i]."""
        w = weights[:, None, None]
        return GradFeatures([d * w.to(d.dtype) for d in self.deltas], list(self.inputs))

    def assign(self, rows: torch.Tensor, other: GradFeatures, picks: torch.Tensor) -> None:
        """In place: rows `rows` now hold the examples `picks` of `other`."""
        for mine, theirs in zip(self.deltas + self.inputs, other.deltas + other.inputs, strict=True):
            mine[rows] = theirs[picks]

    def kernel(self, other: GradFeatures) -> torch.Tensor:
        """N x M: <gradient i of self, gradient j of other>."""
        total = 0
        for d, x, d2, x2 in zip(self.deltas, self.inputs, other.deltas, other.inputs, strict=True):
            if d.shape[1] == d2.shape[1] == 1:
                total = total + (d[:, 0] @ d2[:, 0].T) * (x[:, 0] @ x2[:, 0].T)
                continue
            n, t, m, s = d.shape[0], d.shape[1], d2.shape[0], d2.shape[1]
            pairs = (d.reshape(n * t, -1) @ d2.reshape(m * s, -1).T) * (x.reshape(n * t, -1) @ x2.reshape(m * s, -1).T)
            total = total + pairs.view(n, t, m, s).sum((1, 3))
        return total

    def self_kernel(self) -> torch.Tensor:
        """N: each example's squared gradient norm."""
        total = 0
        for d, x in zip(self.deltas, self.inputs, strict=True):
            if d.shape[1] == 1:
                total = total + (d[:, 0] * d[:, 0]).sum(1) * (x[:, 0] * x[:, 0]).sum(1)
            else:
                total = total + (d @ d.transpose(1, 2) * (x @ x.transpose(1, 2))).sum((1, 2))
        return total

    def inners(self, gradient: Gradient) -> torch.Tensor:
        """N: <gradient i, `gradient`>."""
        total = 0
        for d, x, g in zip(self.deltas, self.inputs, gradient, strict=True):
            g = g.to(x.dtype)
            if d.shape[1] == 1:
                total = total + (d[:, 0] * (x[:, 0] @ g.T)).sum(1)
            else:
                total = total + torch.einsum("ito,ito->i", d, x @ g.T)
        return total

    def total(self) -> Gradient:
        """The sum of the N gradients, materialised."""
        return [d[:, 0].T @ x[:, 0] if d.shape[1] == 1 else torch.einsum("nto,nti->oi", d, x)
                for d, x in zip(self.deltas, self.inputs, strict=True)]

    def sq_norm_of_sum(self) -> torch.Tensor:
        """||sum_i G_i||^2, from the Gram sums or from the materialised sum, whichever is cheaper."""
        total = 0
        for d, x in zip(self.deltas, self.inputs, strict=True):
            rows = d.shape[0] * d.shape[1]
            if d.shape[1] > 1 and rows * (d.shape[2] + x.shape[2]) > d.shape[2] * x.shape[2]:
                g = torch.einsum("nto,nti->oi", d, x)
                total = total + (g * g).sum()
            else:
                total = total + GradFeatures([d], [x]).kernel(GradFeatures([d], [x])).sum()
        return total


def cat_features(parts: list[GradFeatures]) -> GradFeatures:
    """Row-wise concatenation (every part has the same positions per matrix)."""
    n = len(parts[0].deltas)
    return GradFeatures([torch.cat([p.deltas[m] for p in parts]) for m in range(n)],
                        [torch.cat([p.inputs[m] for p in parts]) for m in range(n)])


@dataclass
class OutputLayer:
    """The K output rows the loss reads (all V rows for full_vocab) and the label -> row map. Also the
    classifier head every matched gradient differentiates: its loss is the task loss."""

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
        hidden = at_least_fp32(hidden)
        logits = hidden @ self.weight.T.to(hidden.dtype)
        if self.bias is not None:
            logits = logits + self.bias.to(hidden.dtype)
            hidden = torch.cat([hidden, torch.ones_like(hidden[:, :1])], dim=1)
        a = torch.softmax(logits, dim=-1)
        a = a - torch.nn.functional.one_hot(self.label_rows[labels], a.shape[1]).to(a.dtype)
        return GradFeatures.single(a, hidden)

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """The task loss whose gradient every matched gradient describes (and fine-tuning optimises)."""
        logits = hidden @ self.weight.T.to(hidden.dtype)
        if self.bias is not None:
            logits = logits + self.bias.to(hidden.dtype)
        return torch.nn.functional.cross_entropy(at_least_fp32(logits), self.label_rows[labels], reduction=reduction)


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """Softmax in bf16 loses the small probabilities the gradient is made of; float64 stays float64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def mean_gradient(feats: GradFeatures) -> Gradient:
    """G = (1/N) sum_i G_i, materialised: only for targets, which are computed once."""
    return [g / len(feats) for g in feats.total()]


def sq_norm(feats: GradFeatures) -> torch.Tensor:
    """||G||^2 = (1/N^2) sum_{i,j} <G_i, G_j>."""
    return feats.sq_norm_of_sum() / len(feats) ** 2


def set_distance(feats: GradFeatures, target: Gradient, kind: str = "cosine") -> torch.Tensor:
    """Distance between the set's mean gradient and the target: the quantity generation minimises.

    cosine: 1 - cos(G, T). l2: ||G - T|| / ||T||, relative so that tasks and models compare.
    """
    return distance_from_sums(feats.inners(target).mean(), sq_norm(feats), target, kind)


def distance_from_sums(inner: torch.Tensor, g2: torch.Tensor, target: Gradient, kind: str) -> torch.Tensor:
    """The set distance from <G, T> and ||G||^2, so batched variants can update those sums instead."""
    t2 = vdot(target, target)
    if kind == "cosine":
        return 1 - inner / (g2.clamp_min(1e-30).sqrt() * t2.sqrt())
    if kind == "l2":
        return (g2 - 2 * inner + t2).clamp_min(0).sqrt() / t2.sqrt()
    raise ValueError(f"matching.distance={kind!r} is not one of cosine, l2.")


def example_distances(feats: GradFeatures, target: Gradient, kind: str = "cosine") -> torch.Tensor:
    """Each example's own gradient against the target (N values), batched."""
    return distance_from_sums(feats.inners(target), feats.self_kernel(), target, kind)


@dataclass
class Objective:
    """The matching loss of one class's synthetic set, whose mean gradient is G.

    The class term is distance(G, T) against the class target T. Fine-tuning, though, follows the
    gradient of batches that mix the classes, and with label words the output-layer targets nearly
    cancel in that mix (on SmolLM2 / SST-2, cos(T_0, -T_1) = 0.99). With union_weight > 0 the loss adds
    union_weight x distance(G + O, T + O), where O is the sum of the other classes' targets: the
    balanced union of all classes against its target, the other classes counted at their targets, so
    each class's set can still be optimised on its own. On SmolLM2 / SST-2 that term trained worse
    models (experiments/results/cpu_comparison.md), so the configs leave it off.
    """

    target: Gradient
    distance: str = "cosine"
    others: Gradient | None = None
    union_weight: float = 0.0

    def __post_init__(self):
        if self.union_weight and self.others is None:
            raise ValueError("an Objective with union_weight > 0 needs the other classes' targets (others).")
        # T + O and the constants of the union term, once: with full_vocab they are vocab x hidden.
        if self.union_weight:
            self._union = vadd(self.target, self.others)
            self._others_dot_union = vdot(self.others, self._union)
            self._others_sq = vdot(self.others, self.others)

    def row_inners(self, feats: GradFeatures) -> torch.Tensor:
        """N x M: each row's <G_i, X> for X = T (and O when the union term is on)."""
        gradients = [self.target] + ([self.others] if self.union_weight else [])
        return torch.stack([feats.inners(g) for g in gradients], dim=-1)

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

    Exact (no linearisation) and O(J * N) kernel entries: it updates the Gram sums of `sq_norm` and the
    inner products of `Objective.row_inners` instead of recomputing them per candidate.
    """
    n = len(current)
    kernel = current.kernel(current)  # N x N
    total = kernel.sum()
    cross_new = candidates.kernel(current)  # J x N
    self_new = candidates.self_kernel()
    row_sum_old = kernel[rows].sum(1)
    k_old_old = kernel[rows, rows]
    k_new_old = cross_new[torch.arange(len(rows)), rows]
    # Sum over pairs after the swap: drop row r's pairs, add the candidate's pairs with the other rows.
    new_total = total - 2 * row_sum_old + k_old_old + 2 * (cross_new.sum(1) - k_new_old) + self_new
    per_row_inner = objective.row_inners(current)
    inner = (per_row_inner.sum(0) - per_row_inner[rows] + objective.row_inners(candidates)) / n
    return objective.from_sums(inner, new_total / n**2)


def balanced_union_distance(feats: GradFeatures, labels: torch.Tensor, targets: list[Gradient],
                            kind: str = "cosine") -> torch.Tensor:
    """Distance between the mean over classes of each class's mean gradient and the mean of the
    class targets: the gradient of a class-balanced batch, which is what fine-tuning follows."""
    present = [k for k in range(len(targets)) if (labels == k).any()]
    dtype = feats.deltas[0].dtype
    counts = torch.stack([(labels == k).sum() for k in present]).to(dtype)
    # Rows reweighted so that the plain mean over them is the mean of the class means.
    weight = torch.zeros(len(feats), dtype=dtype, device=labels.device)
    for k, n_k in zip(present, counts, strict=True):
        weight[labels == k] = len(feats) / (len(present) * n_k)
    union_target = [g / len(present) for g in vsum([targets[k] for k in present])]
    return set_distance(feats.scaled(weight), union_target, kind)


def class_targets(feats: GradFeatures, labels: list[int], n_classes: int) -> list[Gradient]:
    """Per class, the mean gradient of its real examples."""
    labels_t = torch.tensor(labels, device=feats.deltas[0].device)
    return [mean_gradient(feats.select(labels_t == k)) for k in range(n_classes)]
