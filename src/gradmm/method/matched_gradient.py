"""What generation matches: the gradient of the task loss with respect to a chosen set of matrices.

- `OutputLayerGradient`: the output layer (the paper's choice), in closed form from final hidden states.
  First order only: the inner step differentiates it once through the network.
- `ParameterGradient`: linear layers chosen by module-name patterns (e.g. the MLPs of blocks 13-18),
  or LoRA adapters on them. docs/method.md section 11: on SmolLM2 / SST-2 the output layer's gradient
  carries almost no class information and the middle blocks' does. A linear layer's per-example
  gradient is sum_t d_t x_t^T over positions, so one batched forward and one backward to the layers'
  outputs give every example's gradient as `GradFeatures` (the Gram-matrix form, never out x in per
  example). The inner step then differentiates the matching loss through that backward: second order,
  which needs eager attention on the CPU (SDPA has no double backward there).

A LoRA adapter y += s B A x, at initialisation (B = 0), has gradient dL/dB = s sum_t d_t (A x_t)^T and
dL/dA = 0: the layer's gradient seen through a fixed random projection A of its inputs (rank r). The
scale s cancels in both distances, so it is left out.

`build_matched_gradient` builds the option `matching.kind` names (`MATCHED_GRADIENTS`).
"""

from __future__ import annotations

import math
import re
from typing import Protocol

import torch
from tqdm.auto import tqdm

from gradmm.data.models import LM
from gradmm.method.gradients import GradFeatures, OutputLayer, at_least_fp32, cat_features


class MatchedGradient(Protocol):
    second_order: bool  # the inner step differentiates through a backward
    reuses_prefix_cache: bool  # a candidate's features need only the positions from its change on

    def features(self, lm: LM, labels: torch.Tensor, *, input_ids=None, inputs_embeds=None, lengths=None,
                 differentiable: bool = False) -> GradFeatures: ...

    def describe(self) -> str: ...


class OutputLayerGradient:
    second_order = False
    reuses_prefix_cache = True  # features depend on the last position's hidden state alone

    def __init__(self, head: OutputLayer):
        self.head = head

    def features(self, lm: LM, labels: torch.Tensor, *, input_ids=None, inputs_embeds=None, lengths=None,
                 differentiable: bool = False) -> GradFeatures:
        hidden = lm.last_hidden(input_ids=input_ids, inputs_embeds=inputs_embeds, lengths=lengths)
        return self.head.features(hidden, labels)

    def describe(self) -> str:
        return f"output layer ({self.head.weight.shape[0]} rows)"


class ParameterGradient:
    second_order = True
    reuses_prefix_cache = False  # a token changes the backward signal at every earlier position too

    def __init__(self, head: OutputLayer, modules: dict[str, torch.nn.Linear],
                 lora: dict[str, torch.Tensor] | None = None):
        self.head, self.modules, self.lora = head, modules, lora

    def features(self, lm: LM, labels: torch.Tensor, *, input_ids=None, inputs_embeds=None, lengths=None,
                 differentiable: bool = False) -> GradFeatures:
        """differentiable=True keeps the graph through the backward (for the inner step's second order);
        otherwise the features are plain values, also under torch.no_grad()."""
        captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        handles = [module.register_forward_hook(_capture(captured, name)) for name, module in self.modules.items()]
        try:
            with torch.enable_grad():
                if inputs_embeds is None:
                    inputs_embeds = lm.input_embeddings[input_ids]
                if not inputs_embeds.requires_grad:
                    # The backward to the layers' outputs needs a graph, and the weights are frozen.
                    inputs_embeds = inputs_embeds.detach().requires_grad_(True)
                hidden = lm.last_hidden(inputs_embeds=inputs_embeds, lengths=lengths)
                # Summed, so that each example's output gradients are its own loss's.
                loss = self.head.loss(hidden, labels, reduction="sum")
                outputs = [captured[name][1] for name in self.modules]
                deltas = torch.autograd.grad(loss, outputs, create_graph=differentiable)
        finally:
            for handle in handles:
                handle.remove()
        inputs = [captured[name][0] for name in self.modules]
        if not differentiable:
            inputs = [x.detach() for x in inputs]
        deltas = [at_least_fp32(d) for d in deltas]
        inputs = [_with_bias_column(at_least_fp32(x), module.bias is not None)
                  for x, module in zip(inputs, self.modules.values(), strict=True)]
        if self.lora is not None:
            inputs = [x @ self.lora[name].T.to(x.dtype) for x, name in zip(inputs, self.modules, strict=True)]
        return GradFeatures(deltas, inputs)

    def describe(self) -> str:
        kind = f"LoRA rank {next(iter(self.lora.values())).shape[0]} on " if self.lora else ""
        n_params = sum(m.weight.numel() for m in self.modules.values())
        return f"{kind}{len(self.modules)} linear layers ({n_params / 1e6:.3g}M weights)"


def _capture(captured: dict, name: str):
    def hook(module, args, output):
        captured[name] = (args[0], output)
    return hook


def _with_bias_column(x: torch.Tensor, has_bias: bool) -> torch.Tensor:
    return torch.cat([x, torch.ones_like(x[..., :1])], dim=-1) if has_bias else x


def select_linear_modules(model: torch.nn.Module, patterns: list[str]) -> dict[str, torch.nn.Linear]:
    """The linear layers whose full module name matches any of the regular expressions `patterns`."""
    compiled = [re.compile(p) for p in patterns]
    chosen = {name: m for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and any(p.fullmatch(name) for p in compiled)}
    if not chosen:
        examples = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)][:6]
        raise ValueError(f"matching.modules={patterns} selects no linear layer of the model; "
                         f"module names look like {examples}.")
    return chosen


def lora_projections(modules: dict[str, torch.nn.Linear], rank: int, seed: int) -> dict[str, torch.Tensor]:
    """A fixed random A (rank x in) per layer, initialised as peft initialises lora_A (Kaiming-uniform
    with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in))), from one seed so that targets and generation agree."""
    generator = torch.Generator().manual_seed(seed)
    projections = {}
    for name, module in modules.items():
        fan_in = module.in_features + (1 if module.bias is not None else 0)
        bound = 1 / math.sqrt(module.in_features)
        a = (torch.rand(rank, fan_in, generator=generator, dtype=torch.float64) * 2 - 1) * bound
        projections[name] = a.to(module.weight.device, torch.promote_types(module.weight.dtype, torch.float32))
    return projections


def build_matched_gradient(lm: LM, head: OutputLayer, kind: str, modules: list[str], lora_rank: int,
                           lora_seed: int) -> MatchedGradient:
    if kind == "output_layer":
        return OutputLayerGradient(head)
    if kind not in MATCHED_GRADIENTS:
        raise ValueError(f"matching.kind={kind!r} is not one of {', '.join(MATCHED_GRADIENTS)}.")
    chosen = select_linear_modules(lm.model, modules)
    return ParameterGradient(head, chosen, lora_projections(chosen, lora_rank, lora_seed) if kind == "lora" else None)


MATCHED_GRADIENTS = ("output_layer", "parameters", "lora")


def text_features(lm: LM, matched: MatchedGradient, inputs: list[list[int]], labels: list[int],
                  batch_size: int = 32) -> GradFeatures:
    """Features of classifier inputs (token ids, prompt included), batched over right-padded rows."""
    parts = []
    # A deeper gradient costs a backward per batch: minutes for a few hundred texts on a CPU.
    starts = tqdm(range(0, len(inputs), batch_size), desc=f"gradients of {len(inputs)} texts", unit="batch",
                  leave=False, disable=len(inputs) <= batch_size)
    for start in starts:
        ids, lengths = lm.pad(inputs[start : start + batch_size])
        with torch.no_grad():
            feats = matched.features(lm, torch.tensor(labels[start : start + batch_size], device=ids.device),
                                     input_ids=ids, lengths=lengths)
        # Batches are padded to their own longest row; zero positions add nothing to any Gram sum.
        parts.append(_pad_positions(feats, max(len(s) for s in inputs)))
    return cat_features(parts)


def _pad_positions(feats: GradFeatures, length: int) -> GradFeatures:
    """Every matrix's positions padded with zeros to `length` (the output layer's single one stays)."""
    def pad(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, 0, 0, length - t.shape[1])) if t.shape[1] > 1 else t
    return GradFeatures([pad(d) for d in feats.deltas], [pad(x) for x in feats.inputs])
