"""ADMM over synthetic input embeddings (docs/method.md section 3), for a batch of one or more groups.

A group is one round of one class: B sequences matched against that class's objective. Several groups
can run side by side in one batch (`generation.rounds_per_batch`, for accelerators that a batch of B
leaves idle); their losses, gradient clipping and best iterates are kept apart, so each group follows
the same path it would alone (up to the float rounding of a larger batch).

x: continuous embeddings of the sequences (the prompt positions are appended as constants, so they
stay pinned); z: the same sequences as vocabulary tokens; u: the scaled dual. Each outer step runs
inner Adam steps on matching(x) + rho/2 * mean_t ||x_t - z_t + u_t||^2 (per group, a per-token mean,
so rho does not scale with B and L), then z = Project(x + u) and u += x - z. Each group returns its z
with the lowest discrete matching loss, which is what the method is judged by.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from gradmm.data.models import LM, mean_nll
from gradmm.method.gradients import GradFeatures, Objective
from gradmm.method.projectors import MatchingContext, Projector, random_allowed_tokens, sample_sequences


@dataclass(frozen=True)
class AdmmParams:
    """The x-step's optimiser and the ADMM penalty (docs/method.md section 3). outer_steps=0 keeps
    the initialisation: the control that shows what the matching adds."""

    rho: float
    outer_steps: int
    inner_steps: int
    lr: float
    grad_clip: float
    # Checkpoint the round in progress every this many outer steps.
    checkpoint_every: int
    # End the round after this many outer steps in a row that lower no group's best discrete loss.
    patience: int | None


@dataclass(frozen=True)
class Initialisation:
    """Where a round starts: `method` lm_sample (LM samples restricted to the allowed vocabulary, at
    `temperature` among the LM's `lm_topk` likeliest) or random (allowed tokens); with `candidates`,
    that many are drawn and the `batch_size` whose mean gradient best matches the target kept."""

    method: str
    batch_size: int
    seq_len: int
    temperature: float
    lm_topk: int
    candidates: int | None


class NumericalFault(RuntimeError):
    """NaN or inf in the matching loss or the embeddings."""


@dataclass
class RoundResult:
    """One group's best iterate."""

    tokens: torch.Tensor  # B x L
    grad_distance: float  # its discrete matching loss
    best_outer_step: int


@dataclass
class RoundState:
    """Everything needed to continue a round exactly where it stopped (saved with torch.save)."""

    next_step: int
    x: torch.Tensor
    u: torch.Tensor
    z: torch.Tensor
    optimizer: dict
    best: list[RoundResult]  # per group
    records: list[dict] = field(default_factory=list)  # per group and outer step, with its "group"
    # The global torch RNG states: nothing in a round draws from them today, but a library call that
    # did would otherwise make a resumed round differ from an uninterrupted one.
    rng: dict = field(default_factory=dict)


def rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def matching_loss_continuous(lm: LM, ctx: MatchingContext, x: torch.Tensor) -> torch.Tensor:
    """Each group's matching loss of the continuous embeddings x (G values)."""
    return ctx.group_losses(ctx.embedding_features(lm, x))


def inner_step(lm: LM, ctx: MatchingContext, x, z_emb, u, optimizer,
               admm: AdmmParams) -> tuple[torch.Tensor, torch.Tensor]:
    """One x-step: a forward and a backward to x (the weights need no gradient), then Adam with each
    group's gradient clipped on its own. Returns the summed loss and each group's matching loss, both
    at x before the step; a non-finite loss leaves x and the optimizer untouched for the caller to stop."""
    optimizer.zero_grad(set_to_none=True)
    groups = ctx.n_groups
    match = matching_loss_continuous(lm, ctx, x)
    penalty = (x - z_emb + u).pow(2).sum(-1).view(groups, -1).mean(1)
    loss = (match + admm.rho / 2 * penalty).sum()
    if torch.isfinite(loss):
        loss.backward()
        per_group = x.grad.view(groups, -1)
        # torch.nn.utils.clip_grad_norm_'s rule, per group.
        per_group.mul_((admm.grad_clip / (per_group.norm(dim=1, keepdim=True) + 1e-6)).clamp(max=1.0))
        optimizer.step()
    return loss.detach(), match.detach()


def initial_tokens(lm: LM, init: Initialisation, ctx: MatchingContext, allowed: torch.Tensor, prefix_ids,
                   generator) -> torch.Tensor:
    """One group's starting sequences (ctx holds that group alone)."""
    n_candidates = init.candidates or init.batch_size
    if init.method == "lm_sample":
        candidates = sample_sequences(lm, n_candidates, init.seq_len, allowed, prefix_ids,
                                      temperature=init.temperature, lm_topk=init.lm_topk, generator=generator)
    else:
        candidates = random_allowed_tokens(allowed, n_candidates, init.seq_len, generator).to(lm.device)
    if n_candidates == init.batch_size:
        return candidates
    with torch.no_grad():
        feats = ctx.features(lm, candidates)
    return candidates[select_matching_subset(feats, ctx.objectives[0], init.batch_size)]


def select_matching_subset(feats: GradFeatures, objective: Objective, size: int) -> torch.Tensor:
    """Indices of `size` rows chosen greedily, each the one that most lowers the matching loss of
    those chosen so far (the best subset is a combinatorial search). Every pick scores all remaining
    rows at once from the pairwise Gram sums, as `replacement_distances` does for swaps."""
    kernel = feats.kernel(feats)
    row_inner = objective.row_inners(feats)
    in_set = torch.zeros(len(feats), dtype=torch.bool, device=kernel.device)
    order: list[int] = []
    pair_sum, inner_sum = kernel.new_zeros(()), row_inner.new_zeros(row_inner.shape[1:])
    for m in range(1, size + 1):
        pairs = pair_sum + 2 * kernel[:, in_set].sum(1) + kernel.diagonal()
        scores = objective.from_sums((inner_sum + row_inner) / m, pairs / m**2)
        best = int(scores.masked_fill(in_set, float("inf")).argmin())
        pair_sum, inner_sum = pairs[best], inner_sum + row_inner[best]
        in_set[best] = True
        order.append(best)
    return torch.tensor(order)


def start_round(lm: LM, admm: AdmmParams, init: Initialisation, ctx: MatchingContext, allowed, prefix_ids,
                generators: list[torch.Generator]) -> RoundState:
    """Each group's initial tokens (from its own generator, so a group starts the same in any batch),
    x = their embeddings, u = 0; recorded as outer step 0."""
    started = time.perf_counter()
    z = torch.cat([initial_tokens(lm, init, ctx.group(g), allowed, prefix_ids, generator)
                   for g, generator in enumerate(generators)])
    x = lm.input_embeddings[z].detach().float().clone()
    optimizer = torch.optim.Adam([x.requires_grad_(True)], lr=admm.lr)
    with torch.no_grad():
        distances = ctx.group_losses(ctx.features(lm, z)).tolist()
        log_ppl = _group_means(mean_nll(lm, prefix_ids, z.tolist()), ctx.n_groups)
    seconds = time.perf_counter() - started
    records = [{"group": g, "outer_step": 0, "grad_distance_x": d, "grad_distance_z": d, "log_ppl_z": log_ppl[g],
                "primal_residual": 0.0, "seconds": seconds} for g, d in enumerate(distances)]
    best = [RoundResult(tokens, d, 0) for tokens, d in zip(z.chunk(ctx.n_groups), distances, strict=True)]
    return RoundState(1, x.detach(), torch.zeros_like(x), z, optimizer.state_dict(), best, records,
                      rng_state(lm.device))


def _group_means(values: torch.Tensor, n_groups: int) -> list[float]:
    """Means over each group's rows of a per-row (or per-row-and-more) tensor."""
    return values.reshape(n_groups, -1).float().mean(1).tolist()


def run_round(
    lm: LM,
    admm: AdmmParams,
    project: Projector,
    ctx: MatchingContext,
    allowed: torch.Tensor,
    prefix_ids: list[int],
    state: RoundState,
    on_outer_step: Callable[[dict], None] = lambda record: None,
    on_checkpoint: Callable[[RoundState], None] = lambda state: None,
) -> list[RoundResult]:
    """Runs outer steps state.next_step..admm.outer_steps; `state` may come from a checkpoint.
    Returns each group's best iterate.

    on_outer_step receives each group's record of each outer step. on_checkpoint receives the state
    after every `admm.checkpoint_every` outer steps, and after the last finished one when a
    KeyboardInterrupt (SIGINT, or SIGTERM turned into one) stops the round. A round continued from any
    of these states is bit-identical to an uninterrupted one.
    """
    emb = lm.input_embeddings
    groups = ctx.n_groups
    x = state.x.clone().requires_grad_(True)
    u, z, best = state.u.clone(), state.z.clone(), list(state.best)
    optimizer = torch.optim.Adam([x], lr=admm.lr)
    optimizer.load_state_dict(state.optimizer)
    if state.rng:
        set_rng_state(state.rng, lm.device)
    latest, saved_step = state, state.next_step - 1
    try:
        for outer in range(state.next_step, admm.outer_steps + 1):
            if admm.patience is not None and outer - 1 - max(b.best_outer_step for b in best) >= admm.patience:
                break
            started = time.perf_counter()
            z_emb = emb[z].float()
            for _ in range(admm.inner_steps):
                loss, match = inner_step(lm, ctx, x, z_emb, u, optimizer, admm)
                if not torch.isfinite(loss):
                    raise NumericalFault(f"matching loss became {loss.item()} at outer step {outer}")
            if x.is_cuda:
                torch.cuda.synchronize(x.device)
            inner_s = time.perf_counter() - started
            with torch.no_grad():
                if not torch.isfinite(x).all():
                    raise NumericalFault(f"synthetic embeddings became non-finite at outer step {outer}")
                # At the last inner step, before its update: one pass through the model less per outer step.
                grad_distance_x = match.tolist()
                projection_started = time.perf_counter()
                projected = project(lm, x + u, z, allowed, ctx, prefix_ids)
                z = projected.tokens
                if z.is_cuda:  # kernels run asynchronously: without this the time is the launch's
                    torch.cuda.synchronize(z.device)
                projection_s = time.perf_counter() - projection_started
                z_emb = emb[z].float()
                u += x - z_emb
                feats_z = ctx.features(lm, z) if projected.features is None else projected.features
                grad_distance_z = ctx.group_losses(feats_z).tolist()
                if not all(math.isfinite(d) for d in grad_distance_z):
                    raise NumericalFault(f"token matching loss became {grad_distance_z} at step {outer}")
                nll_z = mean_nll(lm, prefix_ids, z.tolist()) if projected.nll is None else projected.nll
                log_ppl_z = _group_means(nll_z, groups)
                primal_residual = _group_means((x - z_emb).norm(dim=-1), groups)
            seconds = time.perf_counter() - started
            records = []
            for g, tokens in enumerate(z.chunk(groups)):
                if grad_distance_z[g] < best[g].grad_distance:
                    best[g] = RoundResult(tokens.clone(), grad_distance_z[g], outer)
                records.append({
                    "group": g,
                    "outer_step": outer,
                    "grad_distance_x": grad_distance_x[g],
                    "grad_distance_z": grad_distance_z[g],
                    "log_ppl_z": log_ppl_z[g],
                    "primal_residual": primal_residual[g],
                    "seconds": seconds,
                    "inner_seconds": inner_s,
                    "projection_seconds": projection_s,
                })
            state.records.extend(records)
            # Copies: Adam updates its moment tensors in place, and x, u, z move on.
            latest = RoundState(outer + 1, x.detach().clone(), u.clone(), z.clone(),
                                copy.deepcopy(optimizer.state_dict()), list(best), list(state.records),
                                rng_state(lm.device))
            for record in records:
                on_outer_step(record)
            if outer < admm.outer_steps and outer % admm.checkpoint_every == 0:
                on_checkpoint(latest)
                saved_step = outer
    except KeyboardInterrupt:
        if latest.next_step - 1 > saved_step:
            on_checkpoint(latest)
        raise
    return best
