"""From continuous embeddings to readable tokens: the projections of ADMM's z-step (docs/method.md
section 4), each a class that conf/projector/<option>.yaml names in `_target_`.

`Projector` is what every projection offers the ADMM loop, and `Projected` what it returns: the tokens,
and for the matching-aware ones the exact features and NLL of the rows they picked, which the loop then
need not compute again. `MatchingContext` holds what ADMM's inner steps and the matching-aware
projections share: the matched gradient, one objective per group of rows (a class's round each,
optimised side by side) and the classifier prompt.

The projections share one incremental decode (`decode`): the LM reads `lm_prefix` and the tokens chosen
so far through its KV cache, one batched step per position, and a projector-specific rule picks each
row's next token from the final hidden state.

- nearest (`Nearest`): the allowed token with the highest cosine to the embedding; ignores the LM.
- topk_lm (`TopkLM`, the paper's): among the top-k allowed tokens by cosine, the one the LM likes best.
  On SmolLM2 it ignores x (docs/method.md section 9).
- matching_lm (`MatchingLM`, `project_matching_lm`, the default) and matching_lm_exact
  (`ExactMatchingLM`, `project_matching_lm_exact`): among the top-k tokens by cosine to x + u that are
  also among the LM's `lm_topk` likely next tokens, or the current token, the one with the best LM
  log-probability minus `match_weight` x the change of the set's discrete matching loss. matching_lm
  estimates each position's best alternative to first order and checks the `swaps_per_row` most
  promising per row exactly in one batched pass, their combination in a second: about as much as two
  inner steps, at any matched gradient. matching_lm_exact goes left to right, `exact_candidates` per row
  and position checked exactly; with a deeper matched gradient every candidate runs the whole network.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import DynamicCache

from gradmm.data.models import LM, mean_nll
from gradmm.method.gradients import GradFeatures, Objective, cat_features, replacement_distances
from gradmm.method.matched_gradient import MatchedGradient


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


_WORD = re.compile(r" [A-Za-z]+")
_PUNCTUATION = {".", ",", "!", "?", "'s", "'t", " -", ":"}


@functools.lru_cache(maxsize=8)
def _allowed_ids(tokenizer, min_zipf: float) -> tuple[int, ...]:
    from wordfreq import zipf_frequency

    special = set(tokenizer.all_special_ids)
    allowed = []
    for token_id in range(len(tokenizer)):
        if token_id in special:
            continue
        piece = tokenizer.decode([token_id])
        if piece in _PUNCTUATION:
            allowed.append(token_id)
        # A leading space marks a word start; wordfreq rejects fragments such as " mitig".
        elif _WORD.fullmatch(piece) and zipf_frequency(piece[1:].lower(), "en") >= min_zipf:
            allowed.append(token_id)
    return tuple(allowed)


def allowed_vocabulary(tokenizer, vocab_rows: int, min_zipf: float = 3.0) -> torch.Tensor:
    """Boolean mask over embedding rows: whole English words (with their leading space) and basic
    punctuation. Special ids and rows past the tokenizer (unused padding rows) are never allowed."""
    mask = torch.zeros(vocab_rows, dtype=torch.bool)
    mask[list(_allowed_ids(tokenizer, min_zipf))] = True
    return mask


def random_allowed_tokens(allowed: torch.Tensor, n_rows: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """n_rows x length tokens drawn uniformly from the allowed vocabulary (on the CPU)."""
    allowed_ids = allowed.cpu().nonzero().squeeze(-1)
    return allowed_ids[torch.randint(len(allowed_ids), (n_rows, length), generator=generator)]


ChooseFn = Callable[[int, torch.Tensor], torch.Tensor]


@torch.no_grad()
def decode(
    lm: LM, prefix_ids: list[int], n_rows: int, length: int, choose: ChooseFn, *, reuse_cache: bool = True
) -> torch.Tensor:
    """Left-to-right decode: `choose(t, hidden)` returns each row's token at t from the final hidden
    state (rows x d) that predicts it. The output layer is left to `choose`: a rule that looks at a
    few candidates scores those alone, which on SmolLM2 saves a third of every step.

    reuse_cache=False re-runs the model over the whole prefix at every position (the reference code's
    way, same tokens): kept as the baseline the benchmark compares the KV-cached decode against.
    """
    ids = torch.tensor([prefix_ids] * n_rows, device=lm.device)
    cache = DynamicCache(config=lm.model.config) if reuse_cache else None
    step = ids
    tokens = torch.empty(n_rows, length, dtype=torch.long, device=lm.device)
    for t in range(length):
        with lm.autocast():
            hidden = lm.decoder(input_ids=step, cache=cache, use_cache=reuse_cache).last_hidden_state[:, -1]
        tokens[:, t] = choose(t, hidden)
        step = tokens[:, t : t + 1] if reuse_cache else torch.cat([ids, tokens[:, : t + 1]], dim=1)
    return tokens


@torch.no_grad()
def cosine_topk_ids(lm: LM, points: torch.Tensor, allowed: torch.Tensor, k: int) -> torch.Tensor:
    """B x L x k ids of the k allowed tokens closest in cosine to each point (B x L x d)."""
    # Against the allowed rows only: on SmolLM2 about half the vocabulary, and of the similarity
    # matmul, which is the projection's largest after the decode itself.
    allowed_ids = allowed.to(lm.input_embeddings.device).nonzero().squeeze(-1)
    emb = lm.input_embeddings[allowed_ids].float()
    emb = emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    sims = (points.float() / points.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)) @ emb.T
    return allowed_ids[sims.topk(min(k, len(allowed_ids)), dim=-1).indices]


def cosine_topk_mask(lm: LM, points: torch.Tensor, allowed: torch.Tensor, k: int) -> torch.Tensor:
    """The same as a B x L x V mask."""
    top = cosine_topk_ids(lm, points, allowed, k)
    mask = torch.zeros(*points.shape[:2], lm.input_embeddings.shape[0], dtype=torch.bool, device=top.device)
    return mask.scatter_(-1, top, True)


def project_nearest(lm: LM, points: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    return cosine_topk_ids(lm, points, allowed, 1)[..., 0]


def project_topk_lm(
    lm: LM,
    points: torch.Tensor,
    allowed: torch.Tensor,
    topk: int,
    prefix_ids: list[int],
    *,
    reuse_cache: bool = True,
):
    pool = cosine_topk_ids(lm, points, allowed, topk)  # B x L x k
    weight, bias = lm.output_weight, lm.output_bias

    def choose(t: int, hidden: torch.Tensor) -> torch.Tensor:
        # The LM's favourite among the k candidates: their logits alone, whose argmax is the
        # log-probabilities' (the normaliser is shared), instead of the whole vocabulary's.
        candidates = pool[:, t]
        with lm.autocast():
            logits = (weight[candidates] @ hidden[:, :, None]).squeeze(-1)
            if bias is not None:
                logits = logits + bias[candidates]
        return candidates.gather(-1, logits.float().argmax(dim=-1, keepdim=True)).squeeze(-1)

    return decode(lm, prefix_ids, points.shape[0], points.shape[1], choose, reuse_cache=reuse_cache)


@dataclass(frozen=True)
class Nearest:
    """The nearest allowed token by cosine; no LM."""

    def __call__(self, lm, points, current, allowed, ctx, prefix_ids):
        return Projected(project_nearest(lm, points, allowed))


@dataclass(frozen=True)
class TopkLM:
    """The paper's: among the top-k allowed tokens by cosine, the LM's favourite."""

    topk: int

    def __call__(self, lm, points, current, allowed, ctx, prefix_ids):
        return Projected(project_topk_lm(lm, points, allowed, self.topk, prefix_ids))


def sample_sequences(
    lm: LM,
    n_rows: int,
    length: int,
    allowed: torch.Tensor,
    prefix_ids: list[int],
    *,
    temperature: float,
    lm_topk: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """LM samples restricted to the allowed vocabulary: a readable starting point for ADMM."""
    allowed = allowed.to(lm.device)

    def choose(t: int, hidden: torch.Tensor) -> torch.Tensor:
        logits = lm.next_token_logprobs(hidden).masked_fill(~allowed, -float("inf")) / temperature
        threshold = logits.topk(lm_topk, dim=-1).values[:, -1:]
        probs = torch.softmax(logits.masked_fill(logits < threshold, -float("inf")), dim=-1)
        return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(lm.device)

    return decode(lm, prefix_ids, n_rows, length, choose)


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


def project_matching_lm_exact(
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


@dataclass(frozen=True)
class ExactMatchingLM:
    """topk_lm's candidates that the LM also likes, scored by LM log-probability minus match_weight x the
    exact change of the discrete matching loss, position by position (project_matching_lm_exact): with a
    deeper matched gradient every candidate runs the whole network, about 3x the inner steps of an outer
    step on a CPU (experiments/results/benchmark.md)."""

    topk: int
    lm_topk: int
    exact_candidates: int
    match_weight: float

    def __call__(self, lm, points, current, allowed, ctx, prefix_ids):
        return Projected(project_matching_lm_exact(
            lm, points, current, allowed, ctx, topk=self.topk, lm_topk=self.lm_topk,
            exact_candidates=self.exact_candidates, match_weight=self.match_weight, prefix_ids=prefix_ids))



def best_row_mix(ctx: MatchingContext, options: list[GradFeatures], gains: torch.Tensor,
                 match_weight: float) -> torch.Tensor:
    """Which option each row takes: options[0] holds the rows as they are, options[o] an alternative for
    every row, gains (B x O) each option's LM log-probability gain over the row as it is. Hill climbing
    over single-row changes maximises the summed gains minus match_weight x each group's exact matching
    loss; every mix is scored from the Gram sums of the rows' options, never by a pass through the model.
    Returns each row's option index (B)."""
    size = len(options[0]) // ctx.n_groups
    pick = torch.zeros(len(options[0]), dtype=torch.long, device=gains.device)
    for g, objective in enumerate(ctx.objectives):
        rows = slice(g * size, (g + 1) * size)
        mix = _RowMix(cat_features([option.select(rows) for option in options]), objective, gains[rows],
                      match_weight)
        pick[rows] = mix.hill_climb()
    return pick


class _RowMix:
    """One group's rows, each with O options (features option-major: row i's option o is o * size + i)."""

    def __init__(self, feats: GradFeatures, objective: Objective, gains: torch.Tensor, match_weight: float):
        self.kernel, self.inners = feats.kernel(feats), objective.row_inners(feats)
        self.objective, self.gains, self.match_weight = objective, gains, match_weight
        self.size, self.n_options = gains.shape
        self.index = torch.arange(self.size, device=gains.device)

    def scores(self, choices: torch.Tensor) -> torch.Tensor:
        """Each mix's summed gain minus match_weight x its exact loss (choices: M x size option indices)."""
        picks = self.index + self.size * choices
        pairs = self.kernel[picks[:, :, None], picks[:, None, :]].sum((1, 2))
        loss = self.objective.from_sums(self.inners[picks].mean(1), pairs / self.size**2)
        return self.gains.gather(1, choices.T).sum(0) - self.match_weight * loss

    def hill_climb(self) -> torch.Tensor:
        mine = torch.zeros(self.size, dtype=torch.long, device=self.gains.device)
        current = self.scores(mine[None])[0]
        options = torch.arange(self.n_options, device=mine.device)
        while True:
            # Every mix that differs from `mine` in one row.
            moves = mine[None].repeat(self.size * self.n_options, 1)
            moves[torch.arange(len(moves)), self.index.repeat_interleave(self.n_options)] = options.repeat(self.size)
            scores = self.scores(moves)
            best = int(scores.argmax())
            if scores[best] <= current:
                return mine
            mine, current = moves[best], scores[best]


@torch.no_grad()
def sequence_logprobs(lm: LM, prefix_ids: list[int], tokens: torch.Tensor) -> torch.Tensor:
    """B x L x V: the LM's log-probabilities at each text position, given `prefix_ids` and the tokens before."""
    prefix = torch.tensor(prefix_ids, device=tokens.device).expand(len(tokens), -1)
    ids = torch.cat([prefix, tokens], dim=1)
    with lm.autocast():
        hidden = lm.decoder(input_ids=ids[:, :-1]).last_hidden_state[:, len(prefix_ids) - 1 :]
    return lm.next_token_logprobs(hidden)


def project_matching_lm(
    lm: LM,
    points: torch.Tensor,
    current: torch.Tensor,
    allowed: torch.Tensor,
    ctx: MatchingContext,
    *,
    topk: int,
    lm_topk: int,
    match_weight: float,
    prefix_ids: list[int],
    swaps_per_row: int,
) -> Projected:
    """Propose in one pass, check in two. Each position's best alternative to its current token (among
    topk_lm's candidates that the LM also likes) is ranked by LM log-probability minus match_weight x a
    first-order estimate of the matching loss's change, from one gradient at `current`. Each row's
    `swaps_per_row` most promising single swaps are scored exactly in one batched pass; a row's swaps
    that pay are combined, and that row checked exactly in a second pass. Each row then keeps its
    tokens, takes its best single swap or the combination, whichever mix scores best (`best_row_mix`).
    Returns the tokens with their exact features and mean token NLL, measured on the way."""
    n_rows, length = current.shape
    device = current.device
    emb = lm.input_embeddings
    row_ids = torch.arange(n_rows, device=device)
    labels = ctx.row_labels(n_rows, device)
    current_feats, grad = ctx.features_and_gradient(lm, current)
    base = ctx.group_losses(current_feats)[row_ids // (n_rows // ctx.n_groups)]
    with torch.no_grad():
        logprobs = sequence_logprobs(lm, prefix_ids, current)  # B x L x V
        current_lp = logprobs.gather(-1, current[..., None]).squeeze(-1)
        candidates = cosine_topk_mask(lm, points, allowed, topk)
        likely = torch.zeros_like(candidates).scatter_(-1, logprobs.topk(lm_topk, dim=-1).indices, True)
        candidates = torch.where((candidates & likely).any(-1, keepdim=True), candidates & likely, candidates)
        candidates.scatter_(-1, current[..., None], False)
        first_order = grad.float() @ emb.float().T - (grad.float() * emb[current].float()).sum(-1, keepdim=True)
        score = (logprobs - match_weight * first_order).masked_fill(~candidates, -float("inf"))
        predicted, alternative = score.max(-1)  # B x L
        predicted = predicted - current_lp

        m = min(swaps_per_row, length)
        promising, positions = predicted.topk(m, dim=-1)  # B x m
        rows, slots = (promising > 0).nonzero(as_tuple=True)
        if not len(rows):
            return Projected(current, current_feats, -current_lp.mean(-1))
        t = positions[rows, slots]
        trials = current[rows].clone()
        trials[torch.arange(len(rows), device=device), t] = alternative[rows, t]
        trial_feats = ctx.matched.features(lm, labels[rows], input_ids=ctx.with_prompt(trials))
        gain = logprobs[rows, t, alternative[rows, t]] - current_lp[rows, t]
        exact = gain - match_weight * (ctx.replacement_losses(current_feats, trial_feats, rows) - base[rows])

        # Per row: its best single swap, and all its swaps that pay combined.
        best_single = torch.full((n_rows,), -1, dtype=torch.long, device=device)
        best_exact = torch.full((n_rows,), -float("inf"), device=device, dtype=exact.dtype)
        for j in range(len(rows)):
            if exact[j] > best_exact[rows[j]]:
                best_exact[rows[j]], best_single[rows[j]] = exact[j], j
        paying = exact > 0
        combined = current.clone()
        combined[rows[paying], t[paying]] = alternative[rows[paying], t[paying]]
        has_single = best_single >= 0
        single = current.clone()
        single[has_single] = trials[best_single[has_single]]
        single_feats = current_feats.select(row_ids)
        single_feats.assign(row_ids[has_single], trial_feats, best_single[has_single])
        combined_feats = ctx.matched.features(lm, labels, input_ids=ctx.with_prompt(combined))
        options = torch.stack([current, single, combined], dim=1)  # B x 3 x L
        changed_lp = -mean_nll(lm, prefix_ids, options[:, 1:].flatten(0, 1).tolist()).to(device) * length
        gains = torch.cat([torch.zeros(n_rows, 1, device=device),
                           changed_lp.view(n_rows, 2) - current_lp.sum(-1, keepdim=True)], dim=1)
    option_feats = [current_feats, single_feats, combined_feats]
    pick = best_row_mix(ctx, option_feats, gains, match_weight)
    feats = current_feats.select(row_ids)
    for o in (1, 2):
        taken = (pick == o).nonzero().squeeze(-1)
        feats.assign(taken, option_feats[o], taken)
    logprob = torch.cat([current_lp.sum(-1, keepdim=True), changed_lp.view(n_rows, 2)], dim=1)
    return Projected(options[row_ids, pick], feats, -logprob[row_ids, pick] / length)


@dataclass(frozen=True)
class MatchingLM:
    """topk_lm's candidates that the LM also likes, ranked by a first-order estimate of the matching
    loss; the most promising single swaps per row checked exactly in one batched pass, their combination
    in another (project_matching_lm)."""

    topk: int
    lm_topk: int
    match_weight: float
    swaps_per_row: int

    def __call__(self, lm, points, current, allowed, ctx, prefix_ids):
        return project_matching_lm(lm, points, current, allowed, ctx, topk=self.topk, lm_topk=self.lm_topk,
                                   match_weight=self.match_weight, prefix_ids=prefix_ids,
                                   swaps_per_row=self.swaps_per_row)
