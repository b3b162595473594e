"""The closed form of docs/method.md section 2 against plain autograd, in float64."""

import pytest
import torch

from gradmm.method.gradients import (
    GradFeatures,
    Objective,
    OutputLayer,
    balanced_union_distance,
    example_distances,
    mean_gradient,
    replacement_distances,
    set_distance,
)

LABEL_IDS = [3309, 1109]  # " bad", " great" in SmolLM2's tokenizer


def _reference_gradient(lm, head_weight, head_bias, rows, hidden, labels, loss):
    """dL/dW (and dL/dc) by autograd through the output projection only, as a V x d (or K x d) matrix."""
    weight = head_weight.detach().clone().requires_grad_(True)
    bias = None if head_bias is None else head_bias.detach().clone().requires_grad_(True)
    logits = hidden @ weight.T + (0 if bias is None else bias)
    if loss == "label_words":
        logits = logits[:, rows]
        target = labels
    else:
        target = torch.tensor(rows, device=hidden.device)[labels]
    value = torch.nn.functional.cross_entropy(logits, target)
    params = [weight] + ([bias] if bias is not None else [])
    grads = torch.autograd.grad(value, params, create_graph=True)
    if loss == "label_words":
        grads = [g[rows] for g in grads]
    if bias is None:
        return grads[0]
    return torch.cat([grads[0], grads[1][:, None]], dim=1)


def _close(a, b, rtol=1e-6):
    return (a - b).norm() <= rtol * b.norm()


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("loss", ["label_words", "full_vocab"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_closed_form_matches_autograd(tiny_lm_factory, tied, loss, with_bias):
    lm = tiny_lm_factory(tied=tied)
    weight = lm.output_weight
    bias = torch.randn(weight.shape[0], dtype=weight.dtype) * 0.1 if with_bias else None
    head = OutputLayer.build(weight, bias, LABEL_IDS, loss)
    tokens = torch.randint(0, 1000, (5, 7))
    labels = torch.tensor([0, 1, 1, 0, 1])
    target = torch.randn(head.weight.shape[0], weight.shape[1] + (1 if with_bias else 0), dtype=torch.float64)

    x = lm.input_embeddings[tokens].detach().clone().requires_grad_(True)
    hidden = lm.last_hidden(inputs_embeds=x)

    reference = _reference_gradient(lm, weight, bias, LABEL_IDS, hidden, labels, loss)
    feats = head.features(hidden, labels)
    assert _close(mean_gradient(feats)[0], reference)
    for kind in ("cosine", "l2"):
        if kind == "cosine":
            expected = 1 - (reference * target).sum() / (reference.norm() * target.norm())
        else:
            expected = (reference - target).norm() / target.norm()
        closed = set_distance(feats, [target], kind)
        assert torch.allclose(closed, expected, rtol=1e-9, atol=1e-12)
        (g_closed,) = torch.autograd.grad(closed, x, retain_graph=True)
        (g_reference,) = torch.autograd.grad(expected, x, retain_graph=True)
        assert _close(g_closed, g_reference), kind
    # The union term's gradient to the embeddings, against autograd through the materialised gradient.
    others = torch.randn_like(target)
    union = target + others
    expected = 1 - ((reference + others) * union).sum() / ((reference + others).norm() * union.norm())
    closed = Objective([target], "cosine", [others], union_weight=1.0)(feats) - set_distance(feats, [target])
    assert torch.allclose(closed, expected, rtol=1e-9, atol=1e-12)
    (g_closed,) = torch.autograd.grad(closed, x, retain_graph=True)
    (g_reference,) = torch.autograd.grad(expected, x, retain_graph=True)
    assert _close(g_closed, g_reference)


def test_task_loss_gradient_is_the_feature_outer_product(tiny_lm_factory):
    lm = tiny_lm_factory(tied=False)
    head = OutputLayer.build(lm.output_weight, None, LABEL_IDS, "label_words")
    hidden = torch.randn(4, lm.output_weight.shape[1], dtype=torch.float64)
    labels = torch.tensor([1, 0, 0, 1])
    w = head.weight.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(OutputLayer(w, None, head.label_rows).loss(hidden, labels), w)
    assert _close(mean_gradient(head.features(hidden, labels))[0], grad)


@pytest.mark.parametrize("loss", ["label_words", "full_vocab"])
def test_features_of_a_bfloat16_model_are_computed_in_float32(loss):
    """Only the model's own rounding remains: the features of bf16 weights and hidden states are those of
    the same values upcast to float32 (rounded back to bf16 they lost 6.5e-3 of SmolLM2's distance)."""
    weight, bias = torch.randn(40, 8).bfloat16(), torch.randn(40).bfloat16()
    hidden, labels = torch.randn(5, 8).bfloat16(), torch.tensor([0, 1, 1, 0, 1])
    feats = OutputLayer.build(weight, bias, [3, 7], loss).features(hidden, labels)
    upcast = OutputLayer.build(weight.float(), bias.float(), [3, 7], loss).features(hidden.float(), labels)
    assert feats.deltas[0].dtype == feats.inputs[0].dtype == torch.float32
    assert torch.allclose(feats.deltas[0], upcast.deltas[0], atol=1e-6)
    assert torch.equal(feats.inputs[0], upcast.inputs[0])


def test_example_distances_equal_singleton_sets():
    feats = GradFeatures.single(torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64))
    target = [torch.randn(3, 5, dtype=torch.float64)]
    for kind in ("cosine", "l2"):
        batched = example_distances(feats, target, kind)
        single = torch.stack([set_distance(feats.select([i]), target, kind) for i in range(6)])
        assert torch.allclose(batched, single)


def _objectives(target, others):
    for kind in ("cosine", "l2"):
        yield Objective(target, kind)
        yield Objective(target, kind, others, union_weight=0.7)


def test_objective_equals_its_definition_on_materialised_gradients():
    feats = GradFeatures.single(torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64))
    target, others = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    (g,) = mean_gradient(feats)
    for kind in ("cosine", "l2"):
        def distance(x, t, kind=kind):
            if kind == "cosine":
                return 1 - (x * t).sum() / (x.norm() * t.norm())
            return (x - t).norm() / t.norm()

        assert torch.allclose(Objective([target], kind)(feats), distance(g, target))
        union = Objective([target], kind, [others], union_weight=0.7)(feats)
        assert torch.allclose(union, distance(g, target) + 0.7 * distance(g + others, target + others))


def test_objective_union_term_sees_the_scale_that_the_class_term_ignores():
    feats = GradFeatures.single(torch.randn(5, 2, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64))
    target = mean_gradient(feats)
    others = [-0.9 * target[0] + 0.1 * torch.randn(2, 4, dtype=torch.float64)]
    doubled = feats.scaled(torch.full((5,), 2.0, dtype=torch.float64))
    assert Objective(target)(doubled) < 1e-12
    assert Objective(target, others=others, union_weight=1.0)(doubled) > 0.1


def test_replacement_distances_equal_recomputed_sets():
    current = GradFeatures.single(torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64))
    candidates = GradFeatures.single(torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 4, dtype=torch.float64))
    rows = torch.tensor([0, 0, 2, 4, 4, 1, 3])
    target, others = [torch.randn(3, 4, dtype=torch.float64)], [torch.randn(3, 4, dtype=torch.float64)]
    for objective in _objectives(target, others):
        fast = replacement_distances(current, candidates, rows, objective)
        for j, r in enumerate(rows.tolist()):
            swapped = current.select(torch.arange(5))
            swapped.assign(torch.tensor([r]), candidates, torch.tensor([j]))
            assert torch.allclose(fast[j], objective(swapped))


def test_balanced_union_distance_weighs_each_class_mean_equally():
    feats = GradFeatures.single(torch.randn(7, 2, dtype=torch.float64), torch.randn(7, 4, dtype=torch.float64))
    labels = torch.tensor([0, 0, 0, 0, 0, 1, 1])
    targets = [[torch.randn(2, 4, dtype=torch.float64)], [torch.randn(2, 4, dtype=torch.float64)]]
    union = (mean_gradient(feats.select(labels == 0))[0] + mean_gradient(feats.select(labels == 1))[0]) / 2
    both = targets[0][0] + targets[1][0]
    expected = 1 - (union * both).sum() / (union.norm() * both.norm())
    assert torch.allclose(balanced_union_distance(feats, labels, targets), expected)
