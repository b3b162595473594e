"""Initialisation: many candidates drawn in one batch, the best-matching batch kept."""

import torch
from omegaconf import open_dict

from gradmm.admm import initial_tokens, select_matching_subset
from gradmm.generate import round_settings
from gradmm.gradients import GradFeatures, Objective, OutputLayer, mean_gradient, set_distance
from gradmm.matched import OutputLayerGradient
from gradmm.matching_context import MatchingContext
from gradmm.projection import allowed_vocabulary, sample_sequences


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
