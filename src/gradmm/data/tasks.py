"""Text-classification tasks: where the data comes from, the label names and the one verbalizer.

Classification is language modelling: the input is `<text><prompt>` and the class is the label word
the LM predicts next. Every stage (generation, filtering, fine-tuning, evaluation) builds its inputs
through `Verbalizer`, so they cannot drift apart.

`Setup` is what the stages read besides the model: the task's token-level view and the generator's real
examples.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from gradmm.privacy import dp
from gradmm.runs import files


@dataclass(frozen=True)
class Example:
    text: str
    label: int
    # Row number in its split: lets later stages prove which real examples were used where.
    index: int = -1


@dataclass
class Verbalizer:
    """Token-level view of the task's prompt and label words for one tokenizer.

    A label word that is several tokens is scored by its first token; `build` insists those first
    tokens differ, so the classes stay distinguishable.
    """

    prompt_ids: list[int]
    label_token_ids: list[int]
    max_text_tokens: int

    @classmethod
    def build(cls, task: DictConfig, tokenizer) -> Verbalizer:
        prompt_ids = tokenizer.encode(task.prompt, add_special_tokens=False)
        encoded = {w: tokenizer.encode(w, add_special_tokens=False) for w in task.label_words}
        if not all(encoded.values()):
            raise ValueError(f"task.label_words={list(task.label_words)} has a word that is no token at all "
                             f"({[w for w, ids in encoded.items() if not ids]}); every class needs one.")
        first_ids = [encoded[w][0] for w in task.label_words]
        if len(set(first_ids)) != len(first_ids):
            pieces = [tokenizer.decode([i]) for i in first_ids]
            raise ValueError(
                f"task.label_words={list(task.label_words)} start with the tokens {pieces}, which are not "
                "distinct; choose label words whose first tokens differ."
            )
        return cls(prompt_ids, first_ids, task.max_text_tokens)

    def encode(self, tokenizer, texts: list[str]) -> list[list[int]]:
        """Classifier inputs: text tokens (truncated) followed by the exact prompt tokens."""
        encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        return [ids[: self.max_text_tokens] + self.prompt_ids for ids in encoded]


def load_split(cfg: DictConfig, split: str) -> list[Example]:
    """Reads a split from paths.data_dir when set, else from the Hugging Face hub."""
    task = cfg.task
    path = split_path(cfg, split)
    if path is not None:
        rows = files.read_jsonl(path)
    else:
        rows = read_hub(task, split)
    keep = task.source_labels
    remap = {src: new for new, src in enumerate(keep)} if keep is not None else None
    examples = []
    for i, row in enumerate(rows):
        label = row["label"]
        if remap is not None:
            if label not in remap:
                continue
            label = remap[label]
        examples.append(Example(text=row["text"], label=label, index=i))
    return examples


def split_path(cfg: DictConfig, split: str) -> Path | None:
    """<paths.data_dir>/<task.data_name>/<split>.jsonl, or None when the split comes from the hub."""
    if cfg.paths.data_dir is None:
        return None
    return Path(cfg.paths.data_dir) / cfg.task.data_name / f"{split}.jsonl"


class DataFileError(ValueError):
    """A data file that is missing or has rows that are not labelled texts: every problem, one each."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


# Enough bad rows to see the pattern; a file of thousands of them is named by its count.
MAX_LISTED_ROWS = 20


def visible(text: str) -> bool:
    """Whether a text has something to read: NUL bytes, control characters and spaces alone are not."""
    return any(ch.isprintable() and not ch.isspace() for ch in text)


def label_counts(path: Path, n_labels: int | None) -> dict[int, int]:
    """How many rows of each label a split file holds; DataFileError naming every unusable row by file
    and line (the first MAX_LISTED_ROWS, then how many more): not UTF-8, not a JSON object with a
    visible string 'text' and an integer 'label', or a label outside 0..n_labels-1 (n_labels None: any
    label >= 0). A UTF-8 byte-order mark opening the file is read past, as files.read_jsonl does;
    blank lines are skipped, as the reader skips them; a file without a row is unusable too."""
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise DataFileError([f"data file {path} {what} (paths.data_dir={path.parent.parent})."])
    counts: dict[int, int] = {}
    bad: list[str] = []
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, 1):
            if problem := _row_problem(raw, line_no, n_labels, counts):
                bad.append(f"{path}:{line_no} {problem}")
    if len(bad) > MAX_LISTED_ROWS:
        bad = [*bad[:MAX_LISTED_ROWS], f"{path}: {len(bad) - MAX_LISTED_ROWS} more bad rows after these."]
    if not bad and not counts:
        bad = [f"{path} has no examples."]
    if bad:
        raise DataFileError(bad)
    return counts


def _row_problem(raw: bytes, line_no: int, n_labels: int | None, counts: dict[int, int]) -> str | None:
    """Why one row is unusable (None when it is fine: then it is counted)."""
    try:
        line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
    except UnicodeDecodeError as error:
        return f"is not UTF-8 ({error.reason} at byte {error.start})."
    if not line.strip():
        return None
    try:
        row = json.loads(line)
        text, label = row["text"], row["label"]
        if not (isinstance(text, str) and visible(text) and type(label) is int):
            raise TypeError
    except (json.JSONDecodeError, KeyError, TypeError):
        return ("is not a JSON object with a non-empty string 'text' (with a visible character, not only "
                "spaces or control characters) and an integer 'label'.")
    if label < 0 or (n_labels is not None and label >= n_labels):
        bound = f"0..{n_labels - 1}" if n_labels is not None else "the non-negative integers"
        return f"has label {label}, outside {bound}."
    counts[label] = counts.get(label, 0) + 1
    return None


def read_hub(task: DictConfig, split: str) -> list[dict]:
    if task.hub_id is None:
        raise ValueError(
            f"task {task.name!r} has no hub dataset (task.hub_id); set paths.data_dir to a folder of "
            "<task>/<split>.jsonl files."
        )
    import datasets

    ds = datasets.load_dataset(task.hub_id, task.hub_config, split=task.hub_splits.get(split, split),
                               revision=task.hub_revision)
    text_field = "text" if "text" in ds.column_names else "sentence"
    return [{"text": r[text_field], "label": int(r["label"])} for r in ds]


def generator_examples(cfg: DictConfig) -> list[Example]:
    """The real examples the generator sees: generation.n_real of the training split, stratified by
    class and drawn with cfg.seed. Every reader (generation, the leakage audit, the evaluation's
    disjoint splits) takes them from here, so they cannot disagree about which examples these are."""
    train = load_split(cfg, cfg.task.train_split)
    return stratified_sample(train, cfg.generation.n_real, len(cfg.task.label_names), cfg.seed)


def class_quotas(n: int, n_classes: int) -> list[int]:
    """How many examples of each class `stratified_sample` draws: a function of n alone."""
    return [n // n_classes + (1 if k < n % n_classes else 0) for k in range(n_classes)]


def stratified_sample(examples: list[Example], n: int, n_classes: int, seed: int) -> list[Example]:
    """n examples, as even across classes as n allows (earlier classes get the remainder)."""
    rng = random.Random(seed)
    by_class: list[list[Example]] = [[] for _ in range(n_classes)]
    for ex in examples:
        by_class[ex.label].append(ex)
    chosen: list[Example] = []
    for k, (pool, quota) in enumerate(zip(by_class, class_quotas(n, n_classes), strict=True)):
        if len(pool) < quota:
            raise ValueError(f"class {k} has {len(pool)} examples, fewer than the {quota} requested.")
        chosen.extend(rng.sample(pool, quota))
    return chosen


@dataclass
class Setup:
    """Everything tokenizer-level, checked before the model is loaded."""

    verbalizer: Verbalizer
    prefix_ids: list[int]
    # Under privacy=dp a `dp.PrivateExamples`, sealed by the private release.
    real: list[Example] | dp.PrivateExamples
