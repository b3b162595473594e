"""Every matched gradient against plain autograd, in float64: per-example gradients, the set distance and
its (second-order) gradient to the input embeddings, LoRA against peft, and the projector's exact scores."""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from gradmm.data.models import LM
from gradmm.method.gradients import Objective, OutputLayer, mean_gradient, replacement_distances, set_distance, vdot
from gradmm.method.matched_gradient import (
    ParameterGradient,
    build_matched_gradient,
    lora_projections,
    select_linear_modules,
)
from gradmm.method.projectors import MatchingContext, allowed_vocabulary, project_matching_lm_exact

LABEL_IDS = [3309, 1109]
MLP_AND_QUERY = [r"model\.layers\.1\.mlp\.(up|down)_proj", r"model\.layers\.0\.self_attn\.q_proj"]


@pytest.fixture(scope="module")
def biased_lm(tiny_lm_factory):
    """The tiny model's tokenizer with attention biases (as Qwen has), so the bias column is covered."""
    base = tiny_lm_factory(dtype="float64")
    config = LlamaConfig(vocab_size=base.model.config.vocab_size, hidden_size=16, intermediate_size=24,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
                         attn_implementation="eager")
    model = LlamaForCausalLM(config).to(torch.float64).eval().requires_grad_(False)
    return LM(model=model, tokenizer=base.tokenizer, device=torch.device("cpu"), dtype=torch.float64)


def _head(lm, loss="label_words"):
    return OutputLayer.build(lm.output_weight, lm.output_bias, LABEL_IDS, loss)


def _reference(lm, head, modules, embeds, labels, lengths=None):
    """Per-example gradients of the chosen weights (and biases), flattened, by autograd per example."""
    params = [p for m in modules.values() for p in ([m.weight] + ([m.bias] if m.bias is not None else []))]
    for p in params:
        p.requires_grad_(True)
    try:
        hidden = lm.last_hidden(inputs_embeds=embeds, lengths=lengths)
        losses = head.loss(hidden, labels, reduction="none")
        rows = [torch.cat([g.flatten() for g in torch.autograd.grad(losses[i], params, create_graph=True)])
                for i in range(len(labels))]
    finally:
        for p in params:
            p.requires_grad_(False)
    return torch.stack(rows)


def _flatten(gradient, modules):
    """Our gradient (per layer: out x (in [+1 bias column])) in the reference's order: weight, then bias."""
    parts = []
    for g, m in zip(gradient, modules.values(), strict=True):
        if m.bias is not None:
            parts += [g[:, :-1].flatten(), g[:, -1]]
        else:
            parts.append(g.flatten())
    return torch.cat(parts)


@pytest.mark.parametrize("loss", ["label_words", "full_vocab"])
@pytest.mark.parametrize("padded", [False, True])
def test_parameter_gradients_equal_autograd_per_example(biased_lm, loss, padded):
    lm, head = biased_lm, _head(biased_lm, loss)
    modules = select_linear_modules(lm.model, MLP_AND_QUERY)
    assert len(modules) == 3 and any(m.bias is not None for m in modules.values())
    matched = ParameterGradient(head, modules)
    ids = torch.randint(0, 1000, (5, 7))
    labels = torch.tensor([0, 1, 1, 0, 1])
    lengths = torch.tensor([7, 4, 6, 7, 3]) if padded else None
    feats = matched.features(lm, labels, input_ids=ids, lengths=lengths)
    reference = _reference(lm, head, modules, lm.input_embeddings[ids], labels, lengths)
    if padded:  # each row's gradient is that of its unpadded text alone
        alone = _reference(lm, head, modules, lm.input_embeddings[ids[1:2, :4]], labels[1:2])
        assert torch.allclose(reference[1], alone[0], rtol=1e-9, atol=1e-12)
    for i in range(5):
        assert torch.allclose(_flatten(mean_gradient(feats.select([i])), modules), reference[i], rtol=1e-9, atol=1e-12)
    assert torch.allclose(feats.kernel(feats), reference @ reference.T, rtol=1e-9, atol=1e-12)
    assert torch.allclose(feats.self_kernel(), (reference * reference).sum(1), rtol=1e-9, atol=1e-12)
    target = [torch.randn_like(g) for g in mean_gradient(feats)]
    assert torch.allclose(feats.inners(target), reference @ _flatten(target, modules), rtol=1e-9, atol=1e-12)
    expected = 1 - torch.nn.functional.cosine_similarity(reference.mean(0), _flatten(target, modules), dim=0)
    assert torch.allclose(set_distance(feats, target), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["cosine", "l2"])
def test_second_order_matching_loss_gradient_equals_autograd(tiny_lm_factory, kind):
    """The inner step's gradient to the embeddings goes through the backward: check it against autograd
    through the materialised parameter gradient (create_graph), the plain definition."""
    lm = tiny_lm_factory(dtype="float64")
    head = _head(lm)
    modules = select_linear_modules(lm.model, [r"model\.layers\.\d\.mlp\.gate_proj", r".*\.o_proj"])
    matched = ParameterGradient(head, modules)
    labels = torch.tensor([1, 1, 1, 1])
    x = lm.input_embeddings[torch.randint(0, 1000, (4, 6))].detach().clone().requires_grad_(True)
    target = [torch.randn(m.out_features, m.in_features, dtype=torch.float64) for m in modules.values()]

    ours = set_distance(matched.features(lm, labels, inputs_embeds=x, differentiable=True), target, kind)
    (g_ours,) = torch.autograd.grad(ours, x)

    weights = [m.weight for m in modules.values()]
    for w in weights:
        w.requires_grad_(True)
    try:
        loss = head.loss(lm.last_hidden(inputs_embeds=x), labels)
        grad = torch.cat([g.flatten() for g in torch.autograd.grad(loss, weights, create_graph=True)])
    finally:
        for w in weights:
            w.requires_grad_(False)
    t = torch.cat([g.flatten() for g in target])
    if kind == "cosine":
        expected = 1 - (grad @ t) / (grad.norm() * t.norm())
    else:
        expected = (grad - t).norm() / t.norm()
    (g_expected,) = torch.autograd.grad(expected, x)
    assert torch.allclose(ours, expected, rtol=1e-9, atol=1e-12)
    # Not 1e-12: the model's eager attention takes its softmax in float32 even in a float64 model.
    assert (g_ours - g_expected).norm() <= 1e-6 * g_expected.norm()


def test_lora_gradient_at_initialisation_equals_peft(tiny_lm_factory):
    peft = pytest.importorskip("peft")
    lm = tiny_lm_factory(dtype="float64")
    head = _head(lm)
    patterns = [r"model\.layers\.\d\.mlp\.down_proj", r"model\.layers\.1\.self_attn\.v_proj"]
    modules = select_linear_modules(lm.model, patterns)
    lora = lora_projections(modules, rank=4, seed=3)
    matched = ParameterGradient(head, modules, lora)
    ids, labels = torch.randint(0, 1000, (3, 6)), torch.tensor([0, 1, 0])
    ours = mean_gradient(matched.features(lm, labels, input_ids=ids))

    model = copy.deepcopy(lm.model)
    config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=list(modules), lora_dropout=0.0)
    # peft creates its adapters in float32, which would round our A.
    wrapped = peft.get_peft_model(model, config).to(torch.float64)
    adapters = {}
    for name, module in wrapped.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            short = name.removeprefix("base_model.model.")
            module.lora_A["default"].weight.data.copy_(lora[short])
            adapters[short] = module.lora_B["default"].weight
    assert set(adapters) == set(modules)
    peft_lm = LM(model=wrapped.base_model.model, tokenizer=lm.tokenizer, device=lm.device, dtype=lm.dtype)
    loss = head.loss(peft_lm.last_hidden(input_ids=ids), labels)
    expected = torch.autograd.grad(loss, [adapters[name] for name in modules])
    for g, e in zip(ours, expected, strict=True):
        # The eager attention's float32 softmax rounds the backward below it, whatever the model's dtype.
        assert (g - e).norm() <= 1e-6 * e.norm()


def test_unknown_kind_and_empty_selection_are_named(tiny_lm_factory):
    lm = tiny_lm_factory(dtype="float64")
    with pytest.raises(ValueError, match="matching.kind='mlp'.*output_layer, parameters, lora"):
        build_matched_gradient(lm, _head(lm), "mlp", [], 8, 0)
    with pytest.raises(ValueError, match=r"selects no linear layer.*model\.layers\.0"):
        build_matched_gradient(lm, _head(lm), "parameters", ["layers.0.mlp"], 8, 0)


@pytest.mark.parametrize("kind", ["parameters", "lora"])
def test_projector_exact_scores_equal_recomputation(tiny_lm_factory, kind):
    """The matching-aware projector's change scores for a deeper gradient: every swap's loss from the
    Gram updates equals the loss of the swapped set recomputed from scratch, and the projection picks
    the same tokens whether candidates are scored incrementally or whole."""
    lm = tiny_lm_factory(dtype="float64")
    matched = build_matched_gradient(lm, _head(lm), kind, [r"model\.layers\.1\.mlp\..*"], 4, 0)
    real = matched.features(lm, torch.tensor([1] * 6), input_ids=torch.randint(0, 1000, (6, 9)))
    objective = Objective(mean_gradient(real), "cosine")
    ctx = MatchingContext(matched, [objective], [1], prompt_ids=[657, 436])
    current = torch.randint(0, 1000, (4, 5))
    candidates = torch.randint(0, 1000, (3, 5))
    rows = torch.tensor([0, 2, 3])
    feats, cand_feats = ctx.features(lm, current), ctx.features(lm, candidates)
    fast = replacement_distances(feats, cand_feats, rows, objective)
    for j, r in enumerate(rows.tolist()):
        swapped = current.clone()
        swapped[r] = candidates[j]
        assert torch.allclose(fast[j], objective(ctx.features(lm, swapped)), rtol=1e-9, atol=1e-12)

    allowed = allowed_vocabulary(lm.tokenizer, lm.input_embeddings.shape[0])
    points = lm.input_embeddings[current] + 0.3 * torch.randn(4, 5, lm.input_embeddings.shape[1], dtype=torch.float64)
    options = dict(topk=30, lm_topk=30, exact_candidates=3, match_weight=50.0, prefix_ids=[21465, 42])
    incremental = project_matching_lm_exact(lm, points, current, allowed, ctx, **options)
    whole = project_matching_lm_exact(lm, points, current, allowed, ctx, incremental=False, **options)
    assert torch.equal(incremental, whole)


def test_targets_are_lists_of_matrices_and_compose(tiny_lm_factory):
    lm = tiny_lm_factory(dtype="float64")
    matched = build_matched_gradient(lm, _head(lm), "parameters", [r"model\.layers\.0\.mlp\.up_proj"], 8, 0)
    feats = matched.features(lm, torch.tensor([0, 1]), input_ids=torch.randint(0, 1000, (2, 4)))
    target = mean_gradient(feats)
    assert [tuple(g.shape) for g in target] == [(lm.model.config.intermediate_size, lm.model.config.hidden_size)]
    assert torch.allclose(vdot(target, target), feats.kernel(feats).sum() / 4)
