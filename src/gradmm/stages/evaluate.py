"""Downstream evaluation (docs/method.md section 7): fine-tune the LM as a classifier over the label words'
scores, select learning rate and checkpoint on a dev split, report accuracy on the evaluation split.

The classifier (gradmm.stages.classifier) is the one generation matched, so every number here is about
one and the same task loss.

Full fine-tuning trains every weight of the loaded model and restores its original state dict
afterwards (reloading the model would take far longer); `evaluate/method=lora` trains low-rank
adapters (peft) instead and removes them afterwards (gradmm.method.fine_tuning: one class per method).

Splits: the dev split is sampled from the training split after removing the generator's real examples,
the random real training subsets are sampled from what remains, and the evaluation split is only read
to score a model after its learning rate and checkpoint were chosen.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from gradmm.data.models import LM
from gradmm.data.tasks import Example, Verbalizer, load_split, stratified_sample
from gradmm.method.fine_tuning import checkpoint_applied
from gradmm.reporting.tracking import Tracker, class_key
from gradmm.runs import files
from gradmm.stages.classifier import Classifier, few_shot_demonstrations

if TYPE_CHECKING:
    from gradmm.data.tasks import Setup

log = logging.getLogger(__name__)


@dataclass
class Splits:
    """Which real examples each role may use; disjoint by construction (see `make_splits`)."""

    generator: list[Example]  # the real examples the generator saw
    dev: list[Example]
    pool: list[Example]  # training examples left for random real subsets
    evaluation: list[Example]


def make_splits(train: list[Example], evaluation: list[Example], generator: list[Example], n_dev: int,
                n_classes: int, seed: int) -> Splits:
    seen = {ex.index for ex in generator}
    rest = [ex for ex in train if ex.index not in seen]
    dev = stratified_sample(rest, n_dev, n_classes, seed + 1)
    in_dev = {ex.index for ex in dev}
    return Splits(generator, dev, [ex for ex in rest if ex.index not in in_dev], evaluation)


def train_and_select(lm: LM, verbalizer: Verbalizer, train: list[Example], dev: list[Example],
                     cfg: DictConfig, n_classes: int, seed: int,
                     on_record: Callable[[dict], None] | None = None) -> dict:
    """Fine-tunes one model per learning rate from the same starting weights and returns the best
    (lr, step) by dev accuracy: its checkpoint (on the CPU), dev accuracy and every dev curve. The
    model is left exactly as it came (weights, requires_grad False, eval mode). `on_record` receives
    each dev evaluation as it happens."""
    ev = cfg.evaluate
    if not train:
        raise ValueError(f"nothing to fine-tune on: the evaluate.train_on={ev.train_on} set is empty.")
    classifier = Classifier(lm, verbalizer, ev.batch_size * 2)
    tuning = instantiate(ev.method)
    tuning.bind(lm)
    best = {"dev_accuracy": -1.0}
    dev_curve = {}
    try:
        for lr in ev.lrs:
            dev_curve[str(lr)] = _train(lm, classifier, tuning, train, dev, ev, lr, n_classes, seed, best,
                                        on_record or (lambda record: None))
    finally:
        tuning.close()
        lm.model.eval()
    return {**best, "dev_curve": dev_curve}


def _train(lm, classifier, tuning, train, dev, ev, lr, n_classes, seed, best, on_record) -> list[dict]:
    params = tuning.start(seed)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = get_linear_schedule_with_warmup(optimizer, 0, ev.steps)
    rng = random.Random(seed)
    order: list[Example] = []
    curve = []
    losses = []
    lm.model.train()
    for step in tqdm(range(1, ev.steps + 1), desc=f"fine-tune lr={lr:g}", leave=False):
        batch = []
        while len(batch) < ev.batch_size:
            if not order:
                order = list(train)
                rng.shuffle(order)
            batch.append(order.pop())
        inputs = classifier.verbalizer.encode(lm.tokenizer, [ex.text for ex in batch])
        labels = torch.tensor([ex.label for ex in batch], device=lm.device)
        ids, lengths = lm.pad(inputs)
        loss = classifier.head().loss(lm.last_hidden(input_ids=ids, lengths=lengths), labels)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"fine-tuning loss became {loss.item()} at step {step} (lr {lr})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % ev.eval_every == 0 or step == ev.steps:
            dev_accuracy = classifier.accuracy(dev, n_classes)["accuracy"]
            # The mean over the steps since the last record: one batch's loss is too noisy to read.
            record = {"lr": lr, "step": step, "train_loss": sum(losses) / len(losses),
                      "dev_accuracy": dev_accuracy}
            losses = []
            curve.append(record)
            on_record(record)
            if dev_accuracy > best["dev_accuracy"]:
                best.update(dev_accuracy=dev_accuracy, lr=lr, step=step, checkpoint=tuning.checkpoint())
    return curve


def evaluate_trained(lm: LM, verbalizer: Verbalizer, selected: dict, evaluation: list[Example],
                     n_classes: int) -> dict:
    """Scores the selected checkpoint on the evaluation split, then restores the original model."""
    with checkpoint_applied(lm, selected["checkpoint"]):
        return Classifier(lm, verbalizer).accuracy(evaluation, n_classes)


def generator_overlap(cfg: DictConfig, evaluation: list[Example], real) -> int | str:
    """How many evaluation examples are texts the generator saw: a split shared with the training data
    (or a task whose splits overlap) scores texts the synthetic set may echo. Under privacy=dp the
    count is a function of the private examples, so it is neither computed nor published."""
    if cfg.privacy.name == "dp":
        return "not checked: under privacy=dp the count would be a function of the private examples"
    seen = {ex.text.strip() for ex in real}
    shared = sum(ex.text.strip() in seen for ex in evaluation)
    if shared:
        log.warning("%d of the %d evaluation examples are among the generator's %d real examples: the "
                    "accuracy is partly measured on texts the generator saw (recorded in summary.json, "
                    "evaluation.overlap_with_generator).", shared, len(evaluation), len(real))
    return shared


def evaluate_stage(cfg: DictConfig, setup: Setup, lm: LM, synthetic: dict[str, Path], out_dir: Path,
                   tracker: Tracker) -> dict:
    """Accuracy of the model fine-tuned on `evaluate.train_on`, over `evaluate.seeds`, with the
    baselines next to it. `synthetic` maps synthetic/synthetic_filtered to their files. Each trained
    model's result is saved on its own under out_dir/evaluation/, so a re-run resumes per model."""
    ev, n_classes = cfg.evaluate, len(cfg.task.label_names)
    per_class_keys = [f"accuracy/{class_key(k, name)}" for k, name in enumerate(cfg.task.label_names)]
    evaluation = load_split(cfg, cfg.task.eval_split)
    if ev.max_eval is not None and ev.max_eval < len(evaluation):
        evaluation = stratified_sample(evaluation, ev.max_eval, n_classes, cfg.seed + 3)
    train_split = load_split(cfg, cfg.task.train_split)
    splits = make_splits(train_split, evaluation, setup.real, ev.n_dev, n_classes, cfg.seed)
    classifier = Classifier(lm, setup.verbalizer)
    results_dir = out_dir / "evaluation"
    results_dir.mkdir(exist_ok=True)

    def training_set(method: str, seed: int) -> list[Example]:
        if method in synthetic:
            rows = files.read_jsonl(synthetic[method])
            return [Example(r["text"], r["label"], i) for i, r in enumerate(rows)]
        if method == "real_seen":
            return list(setup.real)
        return stratified_sample(splits.pool, ev.n_train, n_classes, cfg.seed + 100 + seed)

    def run(method: str, seed: int) -> dict:
        path = results_dir / f"{method}_seed{seed}.json"
        if path.is_file():
            return json.loads(path.read_text())
        tag = {"stage": "evaluate", "method": method, "seed": seed}
        if method == "zero_shot":
            result = classifier.accuracy(splits.evaluation, n_classes)
        elif method == "few_shot":
            demos = few_shot_demonstrations(setup.real, ev.few_shot_k, n_classes, cfg.seed + seed)
            result = classifier.accuracy(splits.evaluation, n_classes, classifier.demonstrations(demos))
        else:
            train = training_set(method, seed)
            selected = train_and_select(
                lm, setup.verbalizer, train, splits.dev, cfg, n_classes, cfg.seed + seed,
                on_record=lambda record: tracker.log({**tag, **record}),
            )
            tracker.log_weights(method, seed, selected["checkpoint"])
            result = {
                **evaluate_trained(lm, setup.verbalizer, selected, splits.evaluation, n_classes),
                "n_train": len(train),
                **{k: selected[k] for k in ("dev_accuracy", "lr", "step", "dev_curve")},
            }
        per_class = dict(zip(per_class_keys, result["per_class_accuracy"], strict=True))
        tracker.log({**tag, "accuracy": result["accuracy"], **per_class})
        files.write_json(path, result)
        return result

    def aggregate(method: str) -> dict:
        # Zero-shot scoring has no randomness: one run is the whole result.
        seeds = [ev.seeds[0]] if method == "zero_shot" else list(ev.seeds)
        runs = [run(method, seed) for seed in tqdm(seeds, desc=f"evaluate {method}", leave=False)]
        accuracies = torch.tensor([r["accuracy"] for r in runs])
        return {
            "mean": float(accuracies.mean()),
            "std": float(accuracies.std()) if len(runs) > 1 else 0.0,
            "per_class_accuracy": torch.tensor([r["per_class_accuracy"] for r in runs]).mean(0).tolist(),
            "n_train": runs[0].get("n_train", ev.few_shot_k if method == "few_shot" else 0),
            "runs": runs,
        }

    overlap = generator_overlap(cfg, splits.evaluation, setup.real)
    main_result = aggregate(ev.train_on)
    baselines = {name: aggregate(name) for name in ev.baselines}
    return {
        "accuracy": main_result["mean"],
        "accuracy_std": main_result["std"],
        "per_class_accuracy": main_result["per_class_accuracy"],
        "evaluation": {"train_on": ev.train_on, "method": instantiate(ev.method).name, "n_eval": len(splits.evaluation),
                       "n_dev": len(splits.dev), "overlap_with_generator": overlap, **main_result},
        "baselines": {name: {k: b[k] for k in ("mean", "std", "per_class_accuracy", "n_train")}
                      for name, b in baselines.items()},
    }
