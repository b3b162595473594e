"""Which parameter group's gradient carries the classes: pick what generation matches before spending on it.

    python experiments/class_signal.py                          # SST-2, the embedded model, 50 real examples
    python experiments/class_signal.py task=rotten_tomatoes generation.n_real=100
    python experiments/class_signal.py --out experiments/results/class_signal.json

Generation can only pass on to the synthetic texts what the per-class targets say about the classes. For
every parameter group (each block, its attention and its MLP, ranges of blocks, all attention, all MLPs,
every linear layer, LoRA adapters on the best groups, and the output layer), this computes the targets
from the job's real examples exactly as generation does (the mean gradient of the task loss per class)
and asks how well they classify held-out rows: training-split rows that are neither the generator's
examples nor the evaluation's dev split (the evaluation split is never read). Each row goes to the class
k whose target its own gradient, taken with label k, matches best by cosine; "calibrated" centres each
class's scores over the rows first, as the filter's zero-shot classifier is centred.

One forward and one backward per row and class give every linear layer's per-example gradient in the
Gram form (gradmm.method.matched_gradient), so every group's cosine is a sum of per-layer pieces: all groups cost about
as much as one. Reference points: the calibrated zero-shot classifier, the nearest class mean of the
final hidden states. Near 1/n_classes means matching that group is nearly blind to the classes.
Prints and writes one JSON object whose `groups` list is sorted by calibrated accuracy.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from gradmm.config.schemas import register_configs
from gradmm.config.validation import validate
from gradmm.data.models import load_lm
from gradmm.data.tasks import load_split, stratified_sample
from gradmm.method.gradients import GradFeatures, OutputLayer, class_targets, example_distances
from gradmm.method.matched_gradient import (
    OutputLayerGradient,
    ParameterGradient,
    lora_projections,
    select_linear_modules,
    text_features,
)
from gradmm.pipeline import prepare
from gradmm.runs.manifest import code_version
from gradmm.stages.classifier import Classifier
from gradmm.stages.evaluate import make_splits
from gradmm.stages.generate import matched_gradient

REPO = Path(__file__).resolve().parents[1]
N_HELD_OUT = 150
LORA_RANK = 8
BATCH = 8
_BLOCK = re.compile(r".*layers\.(\d+)\.(self_attn|mlp)\.")


def accuracy(scores: torch.Tensor, labels: torch.Tensor) -> dict:
    calibrated = scores - scores.mean(0)
    return {"raw": (scores.argmax(1) == labels).float().mean().item(),
            "calibrated": (calibrated.argmax(1) == labels).float().mean().item()}


def layer_groups(names: list[str]) -> dict[str, list[int]]:
    """Group name -> indices into `names` (the model's block linear layers)."""
    parsed = [(_BLOCK.match(n), n) for n in names]
    blocks = sorted({int(m.group(1)) for m, _ in parsed})
    groups: dict[str, list[int]] = {}
    for b in blocks:
        groups[f"block {b}"] = [i for i, (m, _) in enumerate(parsed) if int(m.group(1)) == b]
        for part, short in (("self_attn", "attention"), ("mlp", "MLP")):
            groups[f"block {b} {short}"] = [i for i, (m, _) in enumerate(parsed)
                                            if int(m.group(1)) == b and m.group(2) == part]
    third = max(1, len(blocks) // 3)
    for start in range(0, len(blocks), third):
        span = blocks[start : start + third]
        groups[f"blocks {span[0]}-{span[-1]}"] = [i for i, (m, _) in enumerate(parsed) if int(m.group(1)) in span]
        groups[f"blocks {span[0]}-{span[-1]} MLP"] = [i for i, (m, _) in enumerate(parsed)
                                                      if int(m.group(1)) in span and m.group(2) == "mlp"]
    groups["all attention"] = [i for i, (m, _) in enumerate(parsed) if m.group(2) == "self_attn"]
    groups["all MLPs"] = [i for i, (m, _) in enumerate(parsed) if m.group(2) == "mlp"]
    groups["every block linear layer"] = list(range(len(names)))
    return groups


def per_layer_pieces(lm, matched: ParameterGradient, real_inputs, real_labels, held_inputs, n_classes):
    """Per class k, layer m and held-out row n: <g_n^k, T_k>_m and ||g_n^k||^2_m, where g_n^k is row n's
    gradient taken with label k; and ||T_k||^2_m. Targets and rows are batched through text_features."""
    targets = class_targets(text_features(lm, matched, real_inputs, real_labels, BATCH), real_labels, n_classes)
    inner = torch.zeros(n_classes, len(matched.modules), len(held_inputs), dtype=torch.float64)
    norm2 = torch.zeros_like(inner)
    for start in range(0, len(held_inputs), BATCH):
        chunk = held_inputs[start : start + BATCH]
        ids, lengths = lm.pad(chunk)
        for k in range(n_classes):
            labels = torch.full((len(chunk),), k, device=ids.device)
            with torch.no_grad():
                feats = matched.features(lm, labels, input_ids=ids, lengths=lengths)
            for m, (d, x, t) in enumerate(zip(feats.deltas, feats.inputs, targets[k], strict=True)):
                layer = GradFeatures([d], [x])
                inner[k, m, start : start + len(chunk)] = layer.inners([t]).double().cpu()
                norm2[k, m, start : start + len(chunk)] = layer.self_kernel().double().cpu()
    target_norm2 = torch.tensor([[(t * t).sum().item() for t in target] for target in targets], dtype=torch.float64)
    return inner, norm2, target_norm2, targets


def group_record(name: str, layers: list[int], pieces, labels: torch.Tensor, n_params: int) -> dict:
    inner, norm2, target_norm2, _ = pieces
    cosine = inner[:, layers].sum(1) / (norm2[:, layers].sum(1).sqrt() * target_norm2[:, layers].sum(1).sqrt()[:, None])
    n_classes = target_norm2.shape[0]
    targets_cos = [[(_target_dot(pieces, a, b, layers) / (target_norm2[a, layers].sum() * target_norm2[b, layers].sum())
                     .sqrt()).item() for b in range(n_classes)] for a in range(n_classes)]
    return {"group": name, "n_params": n_params, **{f"accuracy_{k}": v for k, v in accuracy(cosine.T, labels).items()},
            "cos_between_class_targets": targets_cos}


def _target_dot(pieces, a: int, b: int, layers: list[int]) -> torch.Tensor:
    targets = pieces[3]
    return torch.tensor(sum((targets[a][m] * targets[b][m]).sum().item() for m in layers), dtype=torch.float64)


def main(overrides: list[str], out: Path | None = None) -> dict:
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    validate(cfg)
    setup = prepare(cfg)
    lm = load_lm(cfg.model, cfg.paths.cache_dir)
    n_classes = len(cfg.task.label_names)
    train = load_split(cfg, cfg.task.train_split)
    splits = make_splits(train, [], setup.real, cfg.evaluate.n_dev, n_classes, cfg.seed)
    held_out = stratified_sample(splits.pool, N_HELD_OUT, n_classes, cfg.seed + 5)
    labels = torch.tensor([ex.label for ex in held_out])

    def encode(examples):
        return setup.verbalizer.encode(lm.tokenizer, [ex.text for ex in examples])

    real_inputs, held_inputs = encode(setup.real), encode(held_out)
    real_labels = [ex.label for ex in setup.real]
    head = OutputLayer.build(lm.output_weight, lm.output_bias, setup.verbalizer.label_token_ids, cfg.matching.loss)
    lm.model.set_attn_implementation("eager")  # matched_gradient would for a deep group; same numbers

    modules = select_linear_modules(lm.model, [r".*layers\.\d+\.(self_attn|mlp)\.\w+"])
    names = list(modules)
    pieces = per_layer_pieces(lm, ParameterGradient(head, modules), real_inputs, real_labels, held_inputs, n_classes)
    sizes = [m.weight.numel() for m in modules.values()]
    records = [group_record(name, layers, pieces, labels, sum(sizes[i] for i in layers))
               for name, layers in layer_groups(names).items()]

    # LoRA on the best few multi-layer groups: the same gradient through a random rank-r view of the inputs.
    best = sorted((r for r in records if len(layer_groups(names)[r["group"]]) > 1),
                  key=lambda r: -r["accuracy_calibrated"])[:3]
    for record in best:
        chosen = {names[i]: modules[names[i]] for i in layer_groups(names)[record["group"]]}
        lora = ParameterGradient(head, chosen, lora_projections(chosen, LORA_RANK, cfg.matching.lora_seed))
        lora_pieces = per_layer_pieces(lm, lora, real_inputs, real_labels, held_inputs, n_classes)
        n_params = sum(LORA_RANK * m.out_features for m in chosen.values())
        records.append(group_record(f"LoRA r={LORA_RANK} on {record['group']}", list(range(len(chosen))),
                                    lora_pieces, labels, n_params))

    # The output layer in closed form, and whatever the job's own matching config selects.
    output_layer = OutputLayerGradient(head)
    for name, matched in (("", output_layer), ("this config's matching: ", matched_gradient(cfg, setup, lm))):
        targets = class_targets(text_features(lm, matched, real_inputs, real_labels, BATCH), real_labels, n_classes)
        scores = torch.stack([-example_distances(text_features(lm, matched, held_inputs, [k] * len(held_inputs), BATCH),
                                                 targets[k]).cpu() for k in range(n_classes)], 1)
        records.append({"group": name + matched.describe(),
                        **{f"accuracy_{k}": v for k, v in accuracy(scores.double(), labels).items()}})

    final = text_features(lm, output_layer, held_inputs, labels.tolist(), BATCH).inputs[0][:, 0]
    real_hidden = text_features(lm, output_layer, real_inputs, real_labels, BATCH).inputs[0][:, 0]
    real_labels_t = torch.tensor(real_labels)
    centroids = torch.stack([real_hidden[real_labels_t == k].mean(0) for k in range(n_classes)])
    zero_shot = Classifier(lm, setup.verbalizer).scores([ex.text for ex in held_out])
    result = {
        "command": "python experiments/class_signal.py " + " ".join(overrides),
        "code_version": code_version(REPO),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "task": cfg.task.name,
        "model": cfg.model.name,
        "loss": cfg.matching.loss,
        "n_real": len(setup.real),
        "n_held_out": len(held_out),
        "held_out_from": "training split, outside the generator's examples and the dev split",
        "zero_shot": accuracy(zero_shot.cpu(), labels),
        "hidden_centroid": accuracy(-torch.cdist(final.cpu(), centroids.cpu()), labels),
        "groups": sorted(records, key=lambda r: -r["accuracy_calibrated"]),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "experiments" / "results" / "class_signal.json")
    args, hydra_overrides = parser.parse_known_args(sys.argv[1:])
    main(hydra_overrides, args.out)
