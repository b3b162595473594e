"""Scoring a batch of sequences against the matching objective: what the matching-aware steps share.

`MatchingContext` holds what ADMM's inner steps and the matching-aware projections
(gradmm.matching_projection) need: the matched gradient, one objective per group of rows (a class's
round each, optimised side by side) and the classifier prompt. `Projector` is what every projection
(gradmm.projection, gradmm.matching_projection) offers the ADMM loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from gradmm.gradients import GradFeatures, Objective, replacement_distances
from gradmm.matched import MatchedGradient
from gradmm.models import LM


@dataclass
class MatchingContext:
    """What the matching-aware steps need to score a batch of sequences: one or more groups of equal
    size (a class's round each, optimised side by side), each matched against its own objective.
    Row i belongs to group i // (rows / groups). The groups' losses are independent of each other."""

    matched: MatchedGradient
    objectives: list[Objective]
    labels: list[int]
    prompt_ids: list[int]

    @property
    def n_groups(self) -> int:
        return len(self.objectives)

    def group(self, g: int) -> MatchingContext:
        return MatchingContext(self.matched, [self.objectives[g]], [self.labels[g]], self.prompt_ids)

    def row_labels(self, n_rows: int, device) -> torch.Tensor:
        return torch.tensor(self.labels, device=device).repeat_interleave(n_rows // self.n_groups)

    def with_prompt(self, text_tokens: torch.Tensor) -> torch.Tensor:
        """The classifier's input: each row's text tokens, then the prompt (no lm_prefix)."""
        prompt = torch.tensor(self.prompt_ids, device=text_tokens.device)
        return torch.cat([text_tokens, prompt.expand(len(text_tokens), -1)], dim=1)

    def features(self, lm: LM, text_tokens: torch.Tensor) -> GradFeatures:
        return self.matched.features(lm, self.row_labels(len(text_tokens), text_tokens.device),
                                     input_ids=self.with_prompt(text_tokens))

    def embedding_features(self, lm: LM, text_embeddings: torch.Tensor) -> GradFeatures:
        """Features of continuous text embeddings (prompt appended), differentiable with respect to them
        unless gradients are off (then a deeper gradient's backward keeps no graph)."""
        prompt = lm.input_embeddings[torch.tensor(self.prompt_ids, device=text_embeddings.device)]
        inputs = torch.cat([text_embeddings.to(lm.dtype), prompt.expand(text_embeddings.shape[0], -1, -1)], dim=1)
        labels = self.row_labels(len(text_embeddings), text_embeddings.device)
        return self.matched.features(lm, labels, inputs_embeds=inputs, differentiable=torch.is_grad_enabled())

    def group_losses(self, feats: GradFeatures) -> torch.Tensor:
        """Each group's matching loss (G values)."""
        size = len(feats) // self.n_groups
        return torch.stack([
            objective(feats.select(slice(g * size, (g + 1) * size))) for g, objective in enumerate(self.objectives)
        ])

    def replacement_losses(self, feats: GradFeatures, candidates: GradFeatures, rows: torch.Tensor) -> torch.Tensor:
        """The loss of row rows[j]'s group after that row is replaced with candidate j, for every j."""
        size = len(feats) // self.n_groups
        losses = torch.empty(len(rows), dtype=feats.deltas[0].dtype, device=rows.device)
        for g, objective in enumerate(self.objectives):
            mine = (rows // size == g).nonzero().squeeze(-1)
            if len(mine):
                block = feats.select(slice(g * size, (g + 1) * size))
                losses[mine] = replacement_distances(block, candidates.select(mine), rows[mine] - g * size, objective)
        return losses

    def distance_gradient(self, lm: LM, text_tokens: torch.Tensor) -> torch.Tensor:
        """d(matching loss)/d(input embedding) at each text position: B x L x d (one backward)."""
        return self.features_and_gradient(lm, text_tokens)[1]

    def features_and_gradient(self, lm: LM, text_tokens: torch.Tensor) -> tuple[GradFeatures, torch.Tensor]:
        """The rows' features (plain values) and d(matching loss)/d(input embedding), from one pass."""
        with torch.enable_grad():
            emb = lm.input_embeddings[text_tokens].detach().requires_grad_(True)
            feats = self.embedding_features(lm, emb)
            (grad,) = torch.autograd.grad(self.group_losses(feats).sum(), emb)
        return GradFeatures([d.detach() for d in feats.deltas], [x.detach() for x in feats.inputs]), grad



@dataclass
class Projected:
    """A projection's tokens (B x L), with what the projection already measured of them: their matched
    gradient features and each row's mean token NLL given the LM prefix. The ADMM loop scores z from
    these instead of running z through the model again; a projector that did not measure them leaves
    them None."""

    tokens: torch.Tensor
    features: GradFeatures | None = None
    nll: torch.Tensor | None = None


class Projector(Protocol):
    """z = Project(x + u): tokens for `points` (B x L x d), given the current tokens and the context."""

    def __call__(self, lm: LM, points: torch.Tensor, current: torch.Tensor, allowed: torch.Tensor,
                 ctx: MatchingContext, prefix_ids: list[int]) -> Projected: ...
