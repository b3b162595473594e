"""Projectors against brute force, and the allowed vocabulary."""

import pytest
import torch

from gradmm.gradients import Objective, OutputLayer, mean_gradient
from gradmm.matched import OutputLayerGradient
from gradmm.matching_context import MatchingContext, project_matching_lm
from gradmm.projection import allowed_vocabulary, cosine_topk_mask, project_nearest, project_topk_lm

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
    guided = project_matching_lm(
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
    plain = project_matching_lm(lm, points, current, allowed, ctx, match_weight=0.0, **kwargs)
    guided = project_matching_lm(lm, points, current, allowed, ctx, match_weight=1e6, **kwargs)
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
        fast = project_matching_lm(lm, points, current, allowed, ctx, **kwargs)
        plain = project_matching_lm(lm, points, current, allowed, ctx, incremental=False, **kwargs)
        assert torch.equal(fast, plain), weight
        changed_any |= bool((fast != current).any())
    assert changed_any
    naive = project_topk_lm(lm, points, allowed, 40, PREFIX, reuse_cache=False)
    assert torch.equal(naive, project_topk_lm(lm, points, allowed, 40, PREFIX))
