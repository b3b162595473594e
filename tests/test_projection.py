"""Projectors against brute force, and the allowed vocabulary."""

import pytest
import torch

from gradmm.method.gradients import Objective, OutputLayer, mean_gradient
from gradmm.method.matched_gradient import OutputLayerGradient
from gradmm.method.projectors import (
    MatchingContext,
    allowed_vocabulary,
    cosine_topk_mask,
    project_matching_lm_exact,
    project_nearest,
    project_topk_lm,
)

PREFIX = [21465, 42]  # "Review:"


def _brute_force_topk_lm(lm, points, allowed, topk):
    """Re-runs the model on the whole prefix at every position: the paper code's way."""
    pool = cosine_topk_mask(lm, points, allowed, topk)
    tokens = torch.empty(points.shape[:2], dtype=torch.long)
    for b in range(points.shape[0]):
        for t in range(points.shape[1]):
            ids = torch.tensor([PREFIX + tokens[b, :t].tolist()])
            logits = lm.model(input_ids=ids).logits[0, -1]
            tokens[b, t] = logits.masked_fill(~pool[b, t], -float("inf")).argmax()
    return tokens


@pytest.mark.parametrize("tied", [True, False])
def test_topk_lm_equals_brute_force(tiny_lm_factory, tied):
    """The decode scores only the k candidates' logits; brute force takes the whole vocabulary's."""
    lm = tiny_lm_factory(tied=tied, dtype="float64")
    allowed = allowed_vocabulary(lm.tokenizer, lm.input_embeddings.shape[0])
    points = torch.randn(3, 6, lm.input_embeddings.shape[1], dtype=torch.float64)
    fast = project_topk_lm(lm, points, allowed, 50, PREFIX)
    assert torch.equal(fast, _brute_force_topk_lm(lm, points, allowed, 50))


def test_nearest_is_the_allowed_argmax_cosine(tiny_lm_factory):
    lm = tiny_lm_factory(dtype="float64")
    allowed = allowed_vocabulary(lm.tokenizer, lm.input_embeddings.shape[0])
    emb = lm.input_embeddings
    picks = allowed.nonzero().squeeze(-1)[torch.randint(int(allowed.sum()), (2, 5))]
    # Exactly an allowed embedding projects to itself.
    assert torch.equal(project_nearest(lm, emb[picks], allowed), picks)
    points = torch.randn(2, 5, emb.shape[1], dtype=torch.float64)
    sims = torch.nn.functional.cosine_similarity(points[:, :, None], emb[None, None], dim=-1)
    expected = sims.masked_fill(~allowed, -2).argmax(-1)
    assert torch.equal(project_nearest(lm, points, allowed), expected)


def _context(lm, label=1, union_weight=0.0):
    head = OutputLayer.build(lm.output_weight, None, [3309, 1109], "label_words")
    hidden = torch.randn(12, lm.output_weight.shape[1], dtype=lm.dtype)
    targets = [mean_gradient(head.features(hidden[6 * k : 6 * k + 6], torch.full((6,), k))) for k in (0, 1)]
    objective = Objective(targets[label], "cosine", targets[1 - label], union_weight)
    return MatchingContext(OutputLayerGradient(head), [objective], [label], prompt_ids=[657, 436])


def test_matching_lm_without_matching_weight_keeps_the_paper_projection(tiny_lm_factory):
    """With match_weight 0 the rule is topk_lm's (LM's favourite in the cosine pool), and the current
    token only wins when the LM prefers it: starting from topk_lm's tokens, nothing changes."""
    lm = tiny_lm_factory(dtype="float64")
    allowed = allowed_vocabulary(lm.tokenizer, lm.input_embeddings.shape[0])
    points = torch.randn(3, 5, lm.input_embeddings.shape[1], dtype=torch.float64)
    plain = project_topk_lm(lm, points, allowed, 40, PREFIX)
    guided = project_matching_lm_exact(
        lm, points, plain, allowed, _context(lm), topk=40, lm_topk=len(allowed), exact_candidates=3,
        match_weight=0.0, prefix_ids=PREFIX,
    )
    assert torch.equal(guided, plain)


def test_matching_lm_with_large_weight_lowers_the_discrete_loss(tiny_lm_factory):
    lm = tiny_lm_factory(dtype="float64")
    allowed = allowed_vocabulary(lm.tokenizer, lm.input_embeddings.shape[0])
    ctx = _context(lm)
    points = torch.randn(4, 6, lm.input_embeddings.shape[1], dtype=torch.float64)
    current = project_nearest(lm, points, allowed)
    before = ctx.group_losses(ctx.features(lm, current)).item()
    kwargs = dict(topk=len(allowed), lm_topk=len(allowed), exact_candidates=4, prefix_ids=PREFIX)
    plain = project_matching_lm_exact(lm, points, current, allowed, ctx, match_weight=0.0, **kwargs)
    guided = project_matching_lm_exact(lm, points, current, allowed, ctx, match_weight=1e6, **kwargs)
    after_plain = ctx.group_losses(ctx.features(lm, plain)).item()
    after_guided = ctx.group_losses(ctx.features(lm, guided)).item()
    assert after_guided < min(before, after_plain)


def test_allowed_vocabulary_is_whole_words(tiny_lm_factory):
    tok = tiny_lm_factory().tokenizer
    mask = allowed_vocabulary(tok, len(tok) + 64)
    ids = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
    for word in [" movie", " great", " bad", " the", " film", ","]:
        assert mask[ids(word)[0]], word
    for fragment in [" mitig", " algorith"]:
        (token,) = ids(fragment)
        assert not mask[token], fragment
    assert not mask[tok.all_special_ids].any()
    assert not mask[len(tok):].any(), "rows past the tokenizer are unused"
    pieces = [tok.decode([i]) for i in mask.nonzero().squeeze(-1).tolist()]
    words = [p for p in pieces if p.startswith(" ") and p[1:].isalpha()]
    assert len(words) > 5000
    # Anything else is a short punctuation mark ("," "." "'s" ...), never a word fragment.
    assert all(len(p.strip()) <= 2 and not p.strip().isalnum() for p in set(pieces) - set(words))


def test_fast_paths_pick_the_same_tokens_as_the_plain_ones(tiny_lm_factory):
    """The KV-cached matching scorer (decided prefix reused, hopeless candidates skipped) and the cached
    decode choose exactly what full re-computation chooses, whether rows change or not."""
    lm = tiny_lm_factory(dtype="float64")
    allowed = allowed_vocabulary(lm.tokenizer, lm.input_embeddings.shape[0])
    points = torch.randn(5, 7, lm.input_embeddings.shape[1], dtype=torch.float64)
    current = project_nearest(lm, points, allowed)
    changed_any = False
    for weight, lm_topk, ctx in [(0.0, 30, _context(lm)), (50.0, 30, _context(lm)), (1e6, len(allowed), _context(lm)),
                                 (1e6, len(allowed), _context(lm, union_weight=1.0))]:
        kwargs = dict(topk=60, lm_topk=lm_topk, exact_candidates=3, match_weight=weight, prefix_ids=PREFIX)
        fast = project_matching_lm_exact(lm, points, current, allowed, ctx, **kwargs)
        plain = project_matching_lm_exact(lm, points, current, allowed, ctx, incremental=False, **kwargs)
        assert torch.equal(fast, plain), weight
        changed_any |= bool((fast != current).any())
    assert changed_any
    naive = project_topk_lm(lm, points, allowed, 40, PREFIX, reuse_cache=False)
    assert torch.equal(naive, project_topk_lm(lm, points, allowed, 40, PREFIX))


def test_best_row_mix_equals_exhaustive_search_on_two_groups(tiny_lm_factory):
    """Each row keeps its tokens or takes one of two alternatives. Scored by recomputing the loss from
    scratch, the chosen mix of each group is the best of all 3^3 mixes, or at least one that no single
    row's change improves (a hill climb's promise), and never worse than keeping every row."""
    import itertools

    from gradmm.method.projectors import best_row_mix

    lm = tiny_lm_factory(dtype="float64")
    ctx = _context(lm)
    ctx = MatchingContext(ctx.matched, [ctx.objectives[0], _context(lm, label=0).objectives[0]], [1, 0],
                          ctx.prompt_ids)
    generator = torch.Generator().manual_seed(4)
    options = torch.randint(100, 2000, (3, 6, 5), generator=generator)  # option x row x position
    feats = [ctx.features(lm, tokens) for tokens in options]
    gains = torch.randn(6, 3, dtype=torch.float64, generator=generator) * 0.05
    gains[:, 0] = 0
    weight = 20.0
    pick = best_row_mix(ctx, feats, gains, weight)

    def score(group, choice):
        rows = range(3 * group, 3 * group + 3)
        tokens = torch.stack([options[o, r] for o, r in zip(choice, rows, strict=True)])
        loss = ctx.objectives[group](ctx.group(group).features(lm, tokens))
        return sum(gains[r, o] for o, r in zip(choice, rows, strict=True)) - weight * loss

    exhaustive_hits = 0
    for group in (0, 1):
        chosen = pick[3 * group : 3 * group + 3].tolist()
        found = score(group, chosen)
        neighbours = [chosen[:r] + [o] + chosen[r + 1 :] for r in range(3) for o in range(3)]
        assert all(found >= score(group, other) - 1e-9 for other in neighbours)
        assert found >= score(group, [0, 0, 0]) - 1e-9
        exhaustive_hits += bool(found >= max(score(group, c) for c in itertools.product(range(3), repeat=3)) - 1e-9)
    assert exhaustive_hits >= 1


def test_matching_lm_never_scores_below_the_current_tokens(tiny_lm_factory):
    """The exact check only accepts a mix that scores at least as well as keeping every row: LM
    log-probability minus match_weight x the exact discrete matching loss, recomputed from scratch."""
    from gradmm.data.models import mean_nll
    from gradmm.method.projectors import project_matching_lm

    lm = tiny_lm_factory(dtype="float64")
    allowed = allowed_vocabulary(lm.tokenizer, lm.input_embeddings.shape[0])
    ctx = _context(lm)
    weight = 200.0
    changed = 0
    for seed in range(3):
        generator = torch.Generator().manual_seed(seed)
        current = allowed.nonzero().squeeze(-1)[torch.randint(int(allowed.sum()), (4, 6), generator=generator)]
        points = torch.randn(4, 6, lm.input_embeddings.shape[1], dtype=torch.float64, generator=generator)
        result = project_matching_lm(lm, points, current, allowed, ctx, topk=len(allowed), lm_topk=60,
                                     match_weight=weight, prefix_ids=PREFIX, swaps_per_row=4)
        projected = result.tokens
        # What it measured on the way is what the ADMM loop records for z: it must be z's own.
        assert torch.allclose(ctx.group_losses(result.features), ctx.group_losses(ctx.features(lm, projected)),
                              rtol=1e-9, atol=1e-12)
        assert torch.allclose(result.nll, mean_nll(lm, PREFIX, projected.tolist()), rtol=1e-9, atol=1e-12)

        def score(tokens):
            logprob = -mean_nll(lm, PREFIX, tokens.tolist()).sum() * tokens.shape[1]
            return logprob - weight * ctx.group_losses(ctx.features(lm, tokens)).sum()

        assert score(projected) >= score(current) - 1e-9
        changed += int((projected != current).sum())
    assert changed > 0  # the check is not passed by never moving
