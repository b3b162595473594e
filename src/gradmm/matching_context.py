"""Scoring a batch of sequences against the matching objective, and the projection that uses it.

`MatchingContext` holds what the matching-aware steps need: the matched gradient, one objective per
group of rows (a class's round each, optimised side by side) and the classifier prompt. matching_lm
(`MatchingLM`, `project_matching_lm`): among the top-k by cosine that are also among the LM's `lm_topk`
likely next tokens, or the current token, the one that maximises LM log-probability minus
`match_weight` x the exact change of the set's discrete matching loss. The paper's projection ignores
x on SmolLM2 (docs/method.md section 9); this one is pulled toward lower discrete loss, which is what
the method is judged by. `exact_candidates` per row and position, pre-ranked by a first-order estimate,
are scored exactly in one batched run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import DynamicCache

from gradmm.gradients import GradFeatures, Objective, replacement_distances
from gradmm.matched import MatchedGradient
from gradmm.models import LM
from gradmm.projection import cosine_topk_mask, decode


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
        with torch.enable_grad():
            emb = lm.input_embeddings[text_tokens].detach().requires_grad_(True)
            loss = self.group_losses(self.embedding_features(lm, emb)).sum()
            (grad,) = torch.autograd.grad(loss, emb)
        return grad


class _MatchingScorer:
    """Features of B sequences under edits at one position. For the output layer, the KV cache of the
    whole current sequences (matching input: text then prompt, no lm_prefix) is kept so that a
    candidate at position t only runs positions t.. through the model: the decided positions < t are
    shared by every candidate of a row, and positions > t still hold `current`. A deeper matched
    gradient depends on every position's backward signal, so its candidates run whole."""

    def __init__(self, lm: LM, ctx: MatchingContext, tokens: torch.Tensor):
        self.lm, self.ctx = lm, ctx
        self.cached = ctx.matched.reuses_prefix_cache
        self.labels = ctx.row_labels(len(tokens), tokens.device)
        self.feats, self.kv = self.run(tokens, torch.arange(tokens.shape[0], device=tokens.device), 0)

    def run(self, tokens: torch.Tensor, rows: torch.Tensor, t: int) -> tuple[GradFeatures, list]:
        """Features of `tokens` (N x L), whose positions < t equal those of rows `rows` of the cache."""
        ids = self.ctx.with_prompt(tokens)
        if not self.cached:
            return self.ctx.matched.features(self.lm, self.labels[rows], input_ids=ids), []
        config = self.lm.model.config
        if t == 0:
            cache = DynamicCache(config=config)
        else:
            cache = DynamicCache([(k[rows, :, :t], v[rows, :, :t]) for k, v in self.kv], config=config)
        with self.lm.autocast():
            hidden = self.lm.decoder(input_ids=ids[:, t:], cache=cache, use_cache=True).last_hidden_state[:, -1]
        return self.ctx.matched.head.features(hidden, self.labels[rows]), [(layer.keys, layer.values)
                                                                             for layer in cache.layers]

    def accept(self, rows: torch.Tensor, feats: GradFeatures, kv: list, picks: torch.Tensor) -> None:
        """Rows `rows` now hold the sequences that produced entries `picks` of (feats, kv)."""
        self.feats.assign(rows, feats, picks)
        for (k, v), (k_new, v_new) in zip(self.kv, kv, strict=True):
            k[rows], v[rows] = k_new[picks], v_new[picks]


def project_matching_lm(
    lm: LM,
    points: torch.Tensor,
    current: torch.Tensor,
    allowed: torch.Tensor,
    ctx: MatchingContext,
    *,
    topk: int,
    lm_topk: int,
    exact_candidates: int,
    match_weight: float,
    prefix_ids: list[int],
    incremental: bool = True,
) -> torch.Tensor:
    """`current` (B x L tokens, the previous z) fills the positions not yet decoded when a candidate's
    matching loss is evaluated, so every candidate is scored on a complete sequence.

    incremental=False scores every candidate with a full forward of its whole sequence; the default
    picks the same tokens (up to float rounding) while running only the candidates that can win and
    change a row (valid, not the current token, whose change is exactly 0), from position t on.
    """
    n_rows, length = current.shape
    pool = cosine_topk_mask(lm, points, allowed, topk)
    emb = lm.input_embeddings
    grad = ctx.distance_gradient(lm, current)  # first-order pre-ranking only
    chosen = current.clone()
    scorer = _MatchingScorer(lm, ctx, chosen) if incremental else None
    feats = scorer.feats if incremental else ctx.features(lm, chosen)
    row_ids = torch.arange(n_rows, device=current.device)
    group_size = n_rows // ctx.n_groups

    def choose(t: int, hidden: torch.Tensor) -> torch.Tensor:
        nonlocal feats
        logprobs = lm.next_token_logprobs(hidden)
        likely = torch.zeros_like(pool[:, t]).scatter_(-1, logprobs.topk(lm_topk, dim=-1).indices, True)
        candidates_mask = pool[:, t] & likely
        # An empty intersection falls back to the cosine pool alone (topk_lm's rule).
        empty = ~candidates_mask.any(dim=-1, keepdim=True)
        candidates_mask = torch.where(empty, pool[:, t], candidates_mask)
        g = grad[:, t].float()
        first_order = (emb.float() @ g.T).T - (emb[chosen[:, t]].float() * g).sum(-1, keepdim=True)
        ranking = (logprobs - match_weight * first_order).masked_fill(~candidates_mask, -float("inf"))
        # The current token always competes (its matching change is 0), so a position only changes
        # when a candidate is better on LM log-probability plus matching: z does not drift at random.
        ranking.scatter_(-1, chosen[:, t : t + 1], float("inf"))
        cand = ranking.topk(exact_candidates, dim=-1).indices  # B x J
        keep = cand == chosen[:, t : t + 1]
        valid = candidates_mask.gather(-1, cand) | keep
        base = ctx.group_losses(feats)[row_ids // group_size, None]  # B x 1: each row's group loss
        if incremental:
            rows, slots = (valid & ~keep).nonzero(as_tuple=True)
            dist = base.expand(n_rows, exact_candidates).clone()
            if len(rows):
                trial = chosen[rows]
                trial[:, t] = cand[rows, slots]
                trial_feats, trial_kv = scorer.run(trial, rows, t)
                dist[rows, slots] = ctx.replacement_losses(feats, trial_feats, rows)
        else:
            trial = chosen.repeat_interleave(exact_candidates, dim=0)
            trial[:, t] = cand.reshape(-1)
            trial_feats = ctx.features(lm, trial)  # row-major copies keep every group's rows together
            rows = row_ids.repeat_interleave(exact_candidates)
            dist = ctx.replacement_losses(feats, trial_feats, rows).view(n_rows, -1)
        score = logprobs.gather(-1, cand) - match_weight * (dist - base)
        best = score.masked_fill(~valid, -float("inf")).argmax(dim=-1)
        if incremental:
            changed = (~keep.gather(-1, best[:, None])).squeeze(-1).nonzero().squeeze(-1)
            if len(changed):
                entry = torch.full_like(cand, -1)
                entry[rows, slots] = torch.arange(len(rows), device=cand.device)
                scorer.accept(changed, trial_feats, trial_kv, entry[changed, best[changed]])
        else:
            feats = trial_feats.select(row_ids * exact_candidates + best)
        chosen[:, t] = cand.gather(-1, best[:, None]).squeeze(-1)
        return chosen[:, t]

    return decode(lm, prefix_ids, n_rows, length, choose)


class Projector(Protocol):
    """z = Project(x + u): tokens for `points` (B x L x d), given the current tokens and the context."""

    def __call__(self, lm: LM, points: torch.Tensor, current: torch.Tensor, allowed: torch.Tensor,
                 ctx: MatchingContext, prefix_ids: list[int]) -> torch.Tensor: ...


@dataclass(frozen=True)
class MatchingLM:
    """topk_lm's candidates that the LM also likes, scored by LM log-probability minus match_weight x the
    exact change of the discrete matching loss (project_matching_lm)."""

    topk: int = 200
    lm_topk: int = 50
    exact_candidates: int = 4
    match_weight: float = 5000.0

    def __call__(self, lm, points, current, allowed, ctx, prefix_ids):
        return project_matching_lm(lm, points, current, allowed, ctx, topk=self.topk, lm_topk=self.lm_topk,
                                   exact_candidates=self.exact_candidates, match_weight=self.match_weight,
                                   prefix_ids=prefix_ids)
