"""ADMM over synthetic input embeddings (method.md section 3), one round of one class at a time.

x: continuous embeddings of B sequences (the prompt positions are appended as constants, so they
stay pinned); z: the same sequences as vocabulary tokens; u: the scaled dual. Each outer step runs
inner Adam steps on matching(x) + rho/2 * mean_t ||x_t - z_t + u_t||^2 (a per-token mean, so rho does
not scale with B and L), then z = Project(x + u) and u += x - z. The round returns the z with the
lowest discrete matching loss, which is what the method is judged by.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from gradmm.gradients import set_distance
from gradmm.models import LM, mean_nll
from gradmm.projection import (
    MatchingContext,
    project_matching_lm,
    project_nearest,
    project_topk_lm,
    sample_sequences,
)


class NumericalFault(RuntimeError):
    """NaN or inf in the matching loss or the embeddings."""


@dataclass
class RoundResult:
    tokens: torch.Tensor  # B x L, best iterate
    grad_distance: float  # its discrete set distance
    best_outer_step: int


def matching_loss_continuous(lm: LM, ctx: MatchingContext, x: torch.Tensor) -> torch.Tensor:
    prompt = lm.input_embeddings[torch.tensor(ctx.prompt_ids, device=x.device)]
    inputs = torch.cat([x.to(lm.dtype), prompt.expand(x.shape[0], -1, -1)], dim=1)
    hidden = lm.last_hidden(inputs_embeds=inputs)
    labels = torch.full((x.shape[0],), ctx.label, device=x.device)
    return set_distance(ctx.head.features(hidden.float(), labels), ctx.target.float(), ctx.distance)


def initial_tokens(lm: LM, cfg: DictConfig, allowed: torch.Tensor, prefix_ids, generator) -> torch.Tensor:
    gen = cfg.generation
    if gen.init == "lm_sample":
        return sample_sequences(
            lm, gen.batch_size, gen.seq_len, allowed, prefix_ids,
            temperature=gen.init_temperature, lm_topk=cfg.projector.lm_topk, generator=generator,
        )
    allowed_ids = allowed.nonzero().squeeze(-1)
    picks = torch.randint(len(allowed_ids), (gen.batch_size, gen.seq_len), generator=generator)
    return allowed_ids[picks].to(lm.device)


def project(lm: LM, cfg: DictConfig, points, current, allowed, ctx, prefix_ids) -> torch.Tensor:
    proj = cfg.projector
    if proj.name == "nearest":
        return project_nearest(lm, points, allowed)
    if proj.name == "topk_lm":
        return project_topk_lm(lm, points, allowed, proj.topk, prefix_ids)
    return project_matching_lm(
        lm, points, current, allowed, ctx,
        topk=proj.topk, lm_topk=proj.lm_topk, exact_candidates=proj.exact_candidates,
        match_weight=proj.match_weight, prefix_ids=prefix_ids,
    )


def run_round(
    lm: LM,
    cfg: DictConfig,
    ctx: MatchingContext,
    allowed: torch.Tensor,
    prefix_ids: list[int],
    generator: torch.Generator,
    on_outer_step: Callable[[dict], None] = lambda record: None,
) -> RoundResult:
    admm = cfg.admm
    emb = lm.input_embeddings
    z = initial_tokens(lm, cfg, allowed, prefix_ids, generator)
    x = emb[z].detach().float().clone().requires_grad_(True)
    u = torch.zeros_like(x)
    optimizer = torch.optim.Adam([x], lr=admm.lr)
    with torch.no_grad():
        best = RoundResult(z.clone(), set_distance(ctx.features(lm, z), ctx.target, ctx.distance).item(), -1)

    for outer in range(admm.outer_steps):
        started = time.perf_counter()
        z_emb = emb[z].float()
        for _ in range(admm.inner_steps):
            optimizer.zero_grad(set_to_none=True)
            match = matching_loss_continuous(lm, ctx, x)
            penalty = (x - z_emb + u).pow(2).sum(-1).mean()
            loss = match + admm.rho / 2 * penalty
            if not torch.isfinite(loss):
                raise NumericalFault(f"matching loss became {loss.item()} at outer step {outer}")
            loss.backward()
            torch.nn.utils.clip_grad_norm_([x], admm.grad_clip)
            optimizer.step()
        with torch.no_grad():
            if not torch.isfinite(x).all():
                raise NumericalFault(f"synthetic embeddings became non-finite at outer step {outer}")
            grad_distance_x = matching_loss_continuous(lm, ctx, x).item()
            z = project(lm, cfg, x + u, z, allowed, ctx, prefix_ids)
            z_emb = emb[z].float()
            u += x - z_emb
            grad_distance_z = set_distance(ctx.features(lm, z), ctx.target, ctx.distance).item()
            log_ppl_z = mean_nll(lm, prefix_ids, z.tolist()).mean().item()
            primal_residual = (x - z_emb).norm(dim=-1).mean().item()
        if grad_distance_z < best.grad_distance:
            best = RoundResult(z.clone(), grad_distance_z, outer)
        on_outer_step({
            "outer_step": outer,
            "grad_distance_x": grad_distance_x,
            "grad_distance_z": grad_distance_z,
            "log_ppl_z": log_ppl_z,
            "primal_residual": primal_residual,
            "seconds": time.perf_counter() - started,
        })
    return best
