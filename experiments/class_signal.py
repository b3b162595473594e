"""How much class information the matched gradients carry, before any generation is spent on them.

    python experiments/class_signal.py                        # SST-2, the embedded model, 50 real examples
    python experiments/class_signal.py task=rotten_tomatoes generation.n_real=100

Generation can only pass on to the synthetic texts what the per-class targets say about the classes.
This script computes the targets from the job's real examples, exactly as generation does, and asks
how well they classify held-out real examples (training-split rows that are neither the generator's
examples nor the evaluation's dev split; the evaluation split is not read):

- target probe: each example goes to the class k whose target its own gradient, taken with label k,
  matches best (cosine), with and without calibration (scores centred by their mean over the set, as
  the filter's classifier is);
- hidden-state centroid: nearest class mean of the final hidden states the gradients are built from;
- zero-shot: the model's own label-word classifier, calibrated the same way (the filter's classifier).

It also reports the held-out rows' own distances to the targets (per class and for the class-balanced
union): what real data that the targets did not see reaches, next to which a synthetic set's figures
in summary.json can be read.

Near 1/n_classes for the target probe means the matching objective is nearly blind to the classes on
this model, whatever generation achieves on it. Prints one JSON object.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from gradmm.config import register_configs, validate
from gradmm.finetune import Classifier, make_splits
from gradmm.gradients import (
    balanced_union_distance,
    class_targets,
    example_distances,
    set_distance,
    text_features,
)
from gradmm.models import load_lm
from gradmm.pipeline import matching_head, prepare
from gradmm.tasks import load_split, stratified_sample

REPO = Path(__file__).resolve().parents[1]
N_HELD_OUT = 400


def accuracy(scores: torch.Tensor, labels: torch.Tensor) -> dict:
    calibrated = scores - scores.mean(0)
    return {"raw": (scores.argmax(1) == labels).float().mean().item(),
            "calibrated": (calibrated.argmax(1) == labels).float().mean().item()}


def main(overrides: list[str]) -> dict:
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    validate(cfg)
    setup = prepare(cfg)
    lm = load_lm(cfg.model, cfg.paths.cache_dir)
    n_classes = len(cfg.task.label_names)
    head = matching_head(cfg, setup, lm)

    train = load_split(cfg, cfg.task.train_split)
    splits = make_splits(train, [], setup.real, cfg.evaluate.n_dev, n_classes, cfg.seed)
    held_out = stratified_sample(splits.pool, N_HELD_OUT, n_classes, cfg.seed + 5)
    labels = torch.tensor([ex.label for ex in held_out], device=lm.device)

    def encode(examples):
        return setup.verbalizer.encode(lm.tokenizer, [ex.text for ex in examples])

    real_labels = [ex.label for ex in setup.real]
    real = text_features(lm, head, encode(setup.real), real_labels)
    targets = class_targets(real, real_labels, n_classes)
    held_out_feats = text_features(lm, head, encode(held_out), labels.tolist())
    hidden = held_out_feats.h

    probe = []
    for k, target in enumerate(targets):
        # Closest target wins: the cosine distance of each example's own gradient, taken with label k.
        probe.append(-example_distances(head.features(hidden, torch.full_like(labels, k)), target, "cosine"))
    real_labels_t = torch.tensor(real_labels, device=lm.device)
    centroids = torch.stack([real.h[real_labels_t == k].mean(0) for k in range(n_classes)])
    zero_shot = Classifier(lm, setup.verbalizer).scores([ex.text for ex in held_out])
    result = {
        "task": cfg.task.name,
        "model": cfg.model.name,
        "n_real": len(setup.real),
        "n_held_out": len(held_out),
        "target_probe": accuracy(torch.stack(probe, 1), labels),
        "hidden_centroid": accuracy(-torch.cdist(hidden, centroids), labels),
        "zero_shot": accuracy(zero_shot.to(labels.device), labels),
        "held_out_grad_distance_set": sum(set_distance(held_out_feats.select(labels == k), t).item()
                                          for k, t in enumerate(targets)) / n_classes,
        "held_out_grad_distance_union": balanced_union_distance(held_out_feats, labels, targets).item(),
        "cos_between_class_targets": [[torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), 0).item()
                                       for b in targets] for a in targets],
        "target_norms": [t.norm().item() for t in targets],
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
