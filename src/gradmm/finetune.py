"""Downstream evaluation (method.md section 7): fine-tune the LM as a classifier over the label words'
scores, select learning rate and checkpoint on a dev split, report accuracy on the evaluation split.

The classifier is the one generation matched: `OutputLayer(...).loss` over the label words' first-token
logits at the last prompt position of `Verbalizer.encode(text)`. Zero-shot and few-shot (in-context)
scoring read the same logits, so every number here is about one and the same task loss.

Splits: the dev split is sampled from the training split after removing the generator's real examples,
the random real training subsets are sampled from what remains, and the evaluation split is only read
to score a model after its learning rate and checkpoint were chosen.
"""

from __future__ import annotations

import copy
import logging
import math
import random
from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from gradmm.gradients import OutputLayer
from gradmm.models import LM
from gradmm.tasks import Example, Verbalizer, stratified_sample

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


class Classifier:
    """Label-word scoring with the task's verbalizer, optionally after in-context demonstrations."""

    def __init__(self, lm: LM, verbalizer: Verbalizer, batch_size: int = 32):
        self.lm, self.verbalizer, self.batch_size = lm, verbalizer, batch_size

    def head(self) -> OutputLayer:
        return OutputLayer.build(self.lm.output_weight, self.lm.output_bias, self.verbalizer.label_token_ids,
                                 "label_words")

    def logits(self, inputs: list[list[int]]) -> torch.Tensor:
        ids, lengths = self.lm.pad(inputs)
        hidden = self.lm.last_hidden(input_ids=ids, lengths=lengths)
        head = self.head()
        return hidden @ head.weight.T + (0 if head.bias is None else head.bias)

    def demonstrations(self, examples: list[Example]) -> list[int]:
        """In-context prefix: each demonstration is its classifier input followed by its label word."""
        newline = self.lm.tokenizer.encode("\n", add_special_tokens=False)
        prefix: list[int] = []
        for ex, ids in zip(examples, self.verbalizer.encode(self.lm.tokenizer, [e.text for e in examples])):
            prefix += ids + [self.verbalizer.label_token_ids[ex.label]] + newline
        return prefix

    @torch.no_grad()
    def predict(self, texts: list[str], prefix: list[int] = ()) -> torch.Tensor:
        was_training = self.lm.model.training
        self.lm.model.eval()
        inputs = [list(prefix) + ids for ids in self.verbalizer.encode(self.lm.tokenizer, texts)]
        predictions = [
            self.logits(inputs[i : i + self.batch_size]).argmax(-1).cpu()
            for i in range(0, len(inputs), self.batch_size)
        ]
        self.lm.model.train(was_training)
        return torch.cat(predictions) if predictions else torch.zeros(0, dtype=torch.long)

    def accuracy(self, examples: list[Example], n_classes: int, prefix: list[int] = ()) -> dict:
        predictions = self.predict([ex.text for ex in examples], prefix)
        labels = torch.tensor([ex.label for ex in examples])
        per_class = [
            float((predictions[labels == k] == k).float().mean()) if (labels == k).any() else float("nan")
            for k in range(n_classes)
        ]
        return {"accuracy": float((predictions == labels).float().mean()), "per_class_accuracy": per_class}


def few_shot_demonstrations(examples: list[Example], k: int, n_classes: int, seed: int) -> list[Example]:
    demos = stratified_sample(examples, min(k, len(examples)), n_classes, seed)
    random.Random(seed).shuffle(demos)
    return demos


def train_and_select(lm: LM, verbalizer: Verbalizer, train: list[Example], dev: list[Example],
                     cfg: DictConfig, n_classes: int, seed: int) -> dict:
    """Fine-tunes one model per learning rate from the same starting weights; returns the weights
    (on the CPU) and dev accuracy of the best (lr, step) by dev accuracy. The model's original weights
    are restored before returning."""
    ev = cfg.evaluate
    classifier = Classifier(lm, verbalizer, ev.batch_size * 2)
    original = copy.deepcopy(lm.model.state_dict())
    best = {"dev_accuracy": -1.0}
    dev_curve = {}
    try:
        for lr in ev.lrs:
            lm.model.load_state_dict(original)
            curve = _train(lm, classifier, train, dev, ev, lr, n_classes, seed, best)
            dev_curve[str(lr)] = curve
    finally:
        selected = best.pop("state", None)
        lm.model.load_state_dict(original)
        for p in lm.model.parameters():
            p.requires_grad_(False)
        lm.model.eval()
    return {**best, "state": selected, "dev_curve": dev_curve}


def _train(lm, classifier, train, dev, ev, lr, n_classes, seed, best) -> list[dict]:
    for p in lm.model.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(lm.model.parameters(), lr=lr, weight_decay=0.0)
    schedule = get_linear_schedule_with_warmup(optimizer, 0, ev.steps)
    rng = random.Random(seed)
    order: list[Example] = []
    curve = []
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
        torch.nn.utils.clip_grad_norm_(lm.model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % ev.eval_every == 0 or step == ev.steps:
            dev_accuracy = classifier.accuracy(dev, n_classes)["accuracy"]
            curve.append({"step": step, "train_loss": loss.item(), "dev_accuracy": dev_accuracy})
            if dev_accuracy > best["dev_accuracy"]:
                best.update(dev_accuracy=dev_accuracy, lr=lr, step=step,
                            state={k: v.detach().to("cpu", copy=True) for k, v in lm.model.state_dict().items()})
    return curve


def evaluate_trained(lm: LM, verbalizer: Verbalizer, selected: dict, evaluation: list[Example],
                     n_classes: int) -> dict:
    """Scores the selected checkpoint on the evaluation split, then restores the original weights."""
    original = copy.deepcopy(lm.model.state_dict())
    try:
        lm.model.load_state_dict(selected["state"])
        return Classifier(lm, verbalizer).accuracy(evaluation, n_classes)
    finally:
        lm.model.load_state_dict(original)
