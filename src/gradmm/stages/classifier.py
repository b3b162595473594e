"""The classifier the filter and the evaluation share: the one generation matched, `OutputLayer(...).loss`
over the label words' first-token logits at the last prompt position of `Verbalizer.encode(text)`.
Zero-shot and few-shot (in-context) scoring read the same logits.
"""

from __future__ import annotations

import random

import torch
from tqdm.auto import tqdm

from gradmm.data.models import LM
from gradmm.data.tasks import Example, Verbalizer, stratified_sample
from gradmm.method.gradients import OutputLayer


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
        encoded = self.verbalizer.encode(self.lm.tokenizer, [e.text for e in examples])
        for ex, ids in zip(examples, encoded, strict=True):
            prefix += ids + [self.verbalizer.label_token_ids[ex.label]] + newline
        return prefix

    @torch.no_grad()
    def scores(self, texts: list[str], prefix: list[int] = ()) -> torch.Tensor:
        """Label-word logits, one row per text (on the CPU)."""
        was_training = self.lm.model.training
        self.lm.model.eval()
        inputs = [list(prefix) + ids for ids in self.verbalizer.encode(self.lm.tokenizer, texts)]
        # Scoring a whole evaluation split takes a minute or more on a CPU.
        batches = tqdm(range(0, len(inputs), self.batch_size), desc=f"scoring {len(inputs)} texts", leave=False)
        scores = [self.logits(inputs[i : i + self.batch_size]).float().cpu() for i in batches]
        self.lm.model.train(was_training)
        return torch.cat(scores) if scores else torch.zeros(0, len(self.verbalizer.label_token_ids))

    def predict(self, texts: list[str], prefix: list[int] = ()) -> torch.Tensor:
        return self.scores(texts, prefix).argmax(-1)

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
