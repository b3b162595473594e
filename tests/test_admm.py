"""ADMM: initialisation (many candidates drawn in one batch, the best-matching batch kept), rho in the
inner loss, the dual update, the best iterate, and generation against random tokens."""

import dataclasses

import pytest
import torch
from omegaconf import open_dict

from gradmm.method.admm import (
    AdmmParams,
    Initialisation,
    initial_tokens,
    inner_step,
    run_round,
    select_matching_subset,
    start_round,
)
from gradmm.method.gradients import GradFeatures, Objective, OutputLayer, mean_gradient, set_distance
from gradmm.method.matched_gradient import OutputLayerGradient
from gradmm.method.projectors import (
    MatchingContext,
    Nearest,
    Projected,
    allowed_vocabulary,
    random_allowed_tokens,
    sample_sequences,
)
from gradmm.pipeline import run_job
from gradmm.stages.generate import round_settings


def test_greedy_subset_recovers_the_rows_whose_mean_gradient_is_the_target():
    # One-hot hidden states make the six per-row gradients orthogonal: only rows 1 and 4 together
    # reach the target exactly, and each alone is the closest single row.
    feats = GradFeatures.single(a=torch.tensor([[1.0, -1.0]] * 6, dtype=torch.float64),
                         h=torch.eye(6, dtype=torch.float64))
    target = mean_gradient(feats.select(torch.tensor([1, 4])))
    picked = select_matching_subset(feats, Objective(target), 2)
    assert sorted(picked.tolist()) == [1, 4]
    assert set_distance(feats.select(picked), target, "cosine") < 1e-12


def test_selection_keeps_batch_size_distinct_rows_and_never_a_worse_first_pick():
    torch.manual_seed(0)
    feats = GradFeatures.single(a=torch.randn(12, 2, dtype=torch.float64), h=torch.randn(12, 5, dtype=torch.float64))
    target = [torch.randn(2, 5, dtype=torch.float64)]
    picked = select_matching_subset(feats, Objective(target, "l2"), 4)
    assert len(set(picked.tolist())) == 4
    singles = torch.stack([set_distance(feats.select(torch.tensor([i])), target, "l2") for i in range(12)])
    assert picked[0] == singles.argmin()


@pytest.mark.slow
def test_init_candidates_draw_one_batched_sample_and_keep_its_best_matching_rows(tiny_cfg, tiny_lm_factory):
    lm = tiny_lm_factory(dtype="float64")
    allowed = allowed_vocabulary(lm.tokenizer, lm.input_embeddings.shape[0])
    head = OutputLayer.build(lm.output_weight, None, [3309, 1109], "label_words")
    hidden = torch.randn(6, lm.output_weight.shape[1], dtype=lm.dtype)
    target = mean_gradient(head.features(hidden, torch.ones(6, dtype=torch.long)))
    ctx = MatchingContext(OutputLayerGradient(head), [Objective(target)], [1], prompt_ids=[657, 436])
    with open_dict(tiny_cfg):
        tiny_cfg.generation.init_candidates = 16
    gen = tiny_cfg.generation

    _, init, _ = round_settings(tiny_cfg)
    z = initial_tokens(lm, init, ctx, allowed, [42], torch.Generator().manual_seed(3))

    pool = sample_sequences(lm, 16, gen.seq_len, allowed, [42], temperature=gen.init_temperature,
                            lm_topk=tiny_cfg.projector.lm_topk, generator=torch.Generator().manual_seed(3))
    best = pool[select_matching_subset(ctx.features(lm, pool), ctx.objectives[0], gen.batch_size)]
    assert z.shape == (gen.batch_size, gen.seq_len)
    assert torch.equal(z, best)
    first_batch = set_distance(ctx.features(lm, pool[: gen.batch_size]), target)
    assert set_distance(ctx.features(lm, z), target) <= first_batch


def _context(lm):
    """One group of the tiny model's label-word head, matched against a random class-1 target."""
    head = OutputLayer.build(lm.output_weight, None, [3309, 1109], "label_words")
    hidden = torch.randn(6, lm.output_weight.shape[1], dtype=lm.dtype, generator=torch.Generator().manual_seed(1))
    target = mean_gradient(head.features(hidden, torch.ones(6, dtype=torch.long)))
    return MatchingContext(OutputLayerGradient(head), [Objective(target)], [1], prompt_ids=[657, 436])


def _params(**changes):
    return dataclasses.replace(AdmmParams(rho=0.5, outer_steps=3, inner_steps=2, lr=0.01, grad_clip=1.0,
                                          checkpoint_every=1, patience=None), **changes)


def test_rho_weighs_the_penalty_in_the_inner_loss(tiny_lm_factory):
    """The x-step minimises matching + rho/2 * mean_t ||x_t - z_t + u_t||^2: the loss it reports grows
    with rho by exactly that penalty."""
    lm = tiny_lm_factory(dtype="float64")
    ctx = _context(lm)
    z = torch.randint(100, 2000, (4, 5), generator=torch.Generator().manual_seed(0))
    z_emb = lm.input_embeddings[z].double()
    u = 0.01 * torch.randn(z_emb.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    x0 = z_emb + 0.1 * torch.randn(z_emb.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    losses = {}
    for rho in (0.0, 3.0):
        x = x0.clone().requires_grad_(True)
        losses[rho] = inner_step(lm, ctx, x, z_emb, u, torch.optim.Adam([x], lr=0.01), _params(rho=rho))[0].item()
    penalty = (x0 - z_emb + u).pow(2).sum(-1).mean().item()
    assert losses[3.0] - losses[0.0] == pytest.approx(3.0 / 2 * penalty, rel=1e-9)


def _round(lm, ctx, admm, project):
    allowed = allowed_vocabulary(lm.tokenizer, lm.input_embeddings.shape[0])
    init = Initialisation("random", batch_size=4, seq_len=5, temperature=1.0, lm_topk=50, candidates=None)
    state = start_round(lm, admm, init, ctx, allowed, [42], [torch.Generator().manual_seed(5)])
    checkpoints = []
    results = run_round(lm, admm, project, ctx, allowed, [42], state, on_checkpoint=checkpoints.append)
    return state, checkpoints, results


def test_the_dual_accumulates_x_minus_z(tiny_lm_factory):
    lm = tiny_lm_factory(dtype="float64")
    _, checkpoints, _ = _round(lm, _context(lm), _params(), Nearest())
    emb = lm.input_embeddings
    first, second = checkpoints  # after outer steps 1 and 2
    assert torch.allclose(first.u, first.x - emb[first.z].float(), atol=1e-12)
    assert not torch.allclose(second.u, second.x - emb[second.z].float(), atol=1e-6), "u carries over"


class _RandomProjector:
    """Random allowed tokens at every outer step: discrete losses that go up and down."""

    def __init__(self, seed):
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, lm, points, current, allowed, ctx, prefix_ids):
        return Projected(random_allowed_tokens(allowed, *current.shape, self.generator))


def test_the_best_iterate_is_kept_not_the_last(tiny_lm_factory):
    lm = tiny_lm_factory(dtype="float64")
    state, _, (result,) = _round(lm, _context(lm), _params(outer_steps=6), _RandomProjector(seed=0))
    distances = [r["grad_distance_z"] for r in state.records]
    best_step = min(range(len(distances)), key=distances.__getitem__)
    assert best_step not in (0, len(distances) - 1), "this seed must make the best neither the start nor the end"
    assert (result.best_outer_step, result.grad_distance) == (best_step, distances[best_step])
    ctx = _context(lm)
    assert ctx.group_losses(ctx.features(lm, result.tokens)).item() == pytest.approx(distances[best_step])


@pytest.mark.slow
def test_generation_matches_the_targets_better_than_random_tokens(tiny_cfg, tmp_path):
    tiny_cfg.admm.outer_steps, tiny_cfg.admm.inner_steps = 3, 5
    summary = run_job(tiny_cfg, tmp_path)
    assert summary["grad_distance_set"] < summary["random_baseline"]["grad_distance_set"]


def test_patience_ends_a_round_after_outer_steps_that_find_nothing_better(tiny_lm_factory):
    """A projector that never moves z finds nothing better than the start: with patience 1 the round
    stops after one outer step, without it it runs them all; the best iterate is the same."""
    lm = tiny_lm_factory(dtype="float64")
    ctx = _context(lm)

    def keep(lm, points, current, allowed, ctx, prefix_ids):
        return Projected(current)

    patient, _, kept = _round(lm, ctx, _params(outer_steps=4, patience=1), keep)
    full, _, all_steps = _round(lm, ctx, _params(outer_steps=4), keep)
    assert [r["outer_step"] for r in patient.records] == [0, 1]
    assert [r["outer_step"] for r in full.records] == [0, 1, 2, 3, 4]
    assert torch.equal(kept[0].tokens, all_steps[0].tokens)
