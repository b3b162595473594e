"""Typed config schemas, registered in Hydra's ConfigStore, and the up-front validation.

Every YAML file under conf/ merges into these dataclasses, so an unknown key or a wrong type fails at
composition. Cross-field rules that a type cannot express live in `validate`, which reports every
problem at once and runs before any model is loaded.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf


@dataclass
class TaskConfig:
    name: str = MISSING
    # Folder under paths.data_dir (and the default hub dataset) holding the splits.
    data_name: str = MISSING
    hub_id: Optional[str] = None
    hub_config: Optional[str] = None
    label_names: list[str] = MISSING
    # Source label ids kept, in the order of label_names; None keeps all, unchanged.
    source_labels: Optional[list[int]] = None
    prompt: str = MISSING
    label_words: list[str] = MISSING
    # Context that the LM reads before a synthetic text when scoring its readability; never part of
    # the classifier's input.
    lm_prefix: str = "\n"
    # Split names as the hub dataset spells them, where they differ from the local files'.
    hub_splits: dict[str, str] = field(default_factory=dict)
    train_split: str = "train"
    eval_split: str = "validation"
    max_text_tokens: int = 128


@dataclass
class ModelConfig:
    name: str = MISSING
    # gguf_package: a GGUF file shipped inside an installed Python package; hub: from_pretrained;
    # tiny: random weights from the fields below, with the tokenizer of `package` (or `hub_id`).
    source: str = MISSING
    package: Optional[str] = None
    gguf_file: Optional[str] = None
    hub_id: Optional[str] = None
    device: str = "auto"
    dtype: str = "auto"
    attn_implementation: Optional[str] = None
    hidden_size: int = 32
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 64
    tie_word_embeddings: bool = True
    init_seed: int = 0


@dataclass
class AdmmConfig:
    rho: float = 0.5
    outer_steps: int = 10
    inner_steps: int = 10
    lr: float = 0.008
    grad_clip: float = 1.0


@dataclass
class ProjectorConfig:
    name: str = "matching_lm"
    topk: int = 200
    # matching_lm: how many of the LM's most likely next tokens may be chosen, how many of those are
    # scored exactly by the matching loss per row and position, and how many nats one unit of
    # matching-loss decrease is worth.
    lm_topk: int = 50
    exact_candidates: int = 4
    match_weight: float = 5000.0


@dataclass
class GenerationConfig:
    n_real: int = 50
    rounds: int = 1
    batch_size: int = 8
    seq_len: int = 16
    # lm_sample: sequences sampled from the LM (readable start); random: random allowed tokens.
    init: str = "lm_sample"
    init_temperature: float = 1.0
    # Save the round in progress every N outer steps (finished rounds are always saved).
    checkpoint_every: int = 1
    # A round whose loss or embeddings turn NaN/inf restarts from a fresh initialisation this often,
    # then is recorded as failed while the other rounds go on.
    max_restarts: int = 2


@dataclass
class MatchingConfig:
    loss: str = "label_words"
    distance: str = "cosine"


@dataclass
class DataConfig:
    # An earlier job directory whose synthetic(_filtered).jsonl the filter/evaluate stages read when
    # this job does not generate.
    synthetic_from: Optional[str] = None


@dataclass
class FilterConfig:
    n_per_class: int = 8
    # zero_shot: drop texts the model assigns to another class; none: keep them.
    classifier: str = "zero_shot"
    near_duplicate: float = 0.8
    log_ppl_weight: float = 0.0


@dataclass
class EvaluateConfig:
    # What the model is fine-tuned on, and the references computed next to it.
    train_on: str = "synthetic_filtered"
    baselines: list[str] = field(default_factory=lambda: ["zero_shot"])
    n_train: int = 100
    steps: int = 30
    batch_size: int = 16
    lrs: list[float] = field(default_factory=lambda: [1e-5])
    eval_every: int = 10
    seeds: list[int] = field(default_factory=lambda: [0])
    n_dev: int = 100
    few_shot_k: int = 4
    # Evaluate on a seeded stratified sample of the evaluation split (null: all of it).
    max_eval: Optional[int] = None


@dataclass
class TrackerConfig:
    # online falls back to offline when no W&B API key is configured.
    mode: str = "online"
    project: str = "gradmm"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)


@dataclass
class PathsConfig:
    # None reads datasets from the Hugging Face hub; a folder reads <data_dir>/<task>/<split>.jsonl.
    data_dir: Optional[str] = None
    output_root: str = "outputs"
    cache_dir: str = "${oc.env:GRADMM_CACHE,${oc.env:HOME}/.cache/gradmm}"


@dataclass
class Config:
    seed: int = 0
    validate_only: bool = False
    stages: list[str] = field(default_factory=lambda: ["generate", "filter", "evaluate"])
    # Re-running a config continues its earlier job directory; false starts over in a new one.
    resume: bool = True
    task: TaskConfig = MISSING
    model: ModelConfig = MISSING
    admm: AdmmConfig = field(default_factory=AdmmConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    matching: MatchingConfig = field(default_factory=MatchingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)


# The keys that decide what a job computes. The job directory is named after their hash, so the same
# science always finds its earlier work and different science never shares a directory.
SCIENCE_KEYS = ("seed", "task", "model", "admm", "projector", "generation", "matching", "stages", "data", "filter",
                "evaluate")


def science_hash(cfg: DictConfig) -> str:
    science = {
        k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
        for k in SCIENCE_KEYS
        if k in cfg
    }
    return hashlib.sha256(json.dumps(science, sort_keys=True).encode()).hexdigest()[:12]


def _run_id(*, _root_: DictConfig) -> str:
    run_id = science_hash(_root_)
    if not _root_.get("resume", True):
        run_id += f"-{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 1_000_000_000:09d}"
    return run_id


def register_configs() -> None:
    ConfigStore.instance().store(name="config_schema", node=Config)
    if not OmegaConf.has_resolver("run_id"):
        OmegaConf.register_new_resolver("run_id", _run_id)


register_configs()

PROJECTORS = ("nearest", "topk_lm", "matching_lm")
MODEL_SOURCES = ("gguf_package", "hub", "tiny")
MATCHING_LOSSES = ("label_words", "full_vocab")
DISTANCES = ("cosine", "l2")
TRACKER_MODES = ("online", "offline", "disabled")
INITS = ("lm_sample", "random")
STAGES = ("generate", "filter", "evaluate")
FILTER_CLASSIFIERS = ("zero_shot", "none")
TRAIN_ON = ("synthetic", "synthetic_filtered", "real_seen", "real_random")
BASELINES = ("zero_shot", "few_shot", "real_seen", "real_random")
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16", "float64")


class ConfigError(ValueError):
    """Every problem found in a config, one paragraph each."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("Invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


def _choice(problems: list[str], key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        problems.append(f"{key}={value!r} is not one of {', '.join(choices)}.")


def _positive(problems: list[str], key: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or value <= 0:
        problems.append(f"{key}={value!r} must be positive.")


def split_path(cfg: DictConfig, split: str) -> Optional[Path]:
    if cfg.paths.data_dir is None:
        return None
    return Path(cfg.paths.data_dir) / cfg.task.data_name / f"{split}.jsonl"


def _check_data_file(problems: list[str], path: Path, n_labels: int) -> dict[int, int]:
    """Returns label counts, or {} after recording why the file is unusable."""
    if not path.is_file():
        problems.append(f"data file {path} does not exist (paths.data_dir={path.parent.parent}).")
        return {}
    counts: dict[int, int] = {}
    with path.open() as f:
        for line_no, line in enumerate(f, 1):
            try:
                row = json.loads(line)
                text, label = row["text"], row["label"]
                if not isinstance(text, str) or not isinstance(label, int):
                    raise TypeError
            except (json.JSONDecodeError, KeyError, TypeError):
                problems.append(
                    f"{path}:{line_no} is not a JSON object with a string 'text' and an integer 'label'."
                )
                return {}
            if not 0 <= label < n_labels:
                problems.append(f"{path}:{line_no} has label {label}, outside 0..{n_labels - 1}.")
                return {}
            counts[label] = counts.get(label, 0) + 1
    return counts


def validate(cfg: DictConfig, available_tasks: tuple[str, ...] = (), available_models: tuple[str, ...] = ()) -> None:
    """Raises ConfigError listing every problem; cheap (reads data files, loads no model)."""
    problems: list[str] = []
    task, gen, admm, proj = cfg.task, cfg.generation, cfg.admm, cfg.projector

    if available_tasks and task.name not in available_tasks:
        problems.append(f"task={task.name!r} is not one of {', '.join(available_tasks)}.")
    if available_models and cfg.model.name not in available_models:
        problems.append(f"model={cfg.model.name!r} is not one of {', '.join(available_models)}.")
    _choice(problems, "model.source", cfg.model.source, MODEL_SOURCES)
    _choice(problems, "model.device", cfg.model.device, DEVICES)
    _choice(problems, "model.dtype", cfg.model.dtype, DTYPES)
    _choice(problems, "projector.name", proj.name, PROJECTORS)
    _choice(problems, "matching.loss", cfg.matching.loss, MATCHING_LOSSES)
    _choice(problems, "matching.distance", cfg.matching.distance, DISTANCES)
    _choice(problems, "tracker.mode", cfg.tracker.mode, TRACKER_MODES)
    _choice(problems, "generation.init", gen.init, INITS)

    for key in ("admm.rho", "admm.outer_steps", "admm.inner_steps", "admm.lr", "admm.grad_clip"):
        _positive(problems, key, OmegaConf.select(cfg, key))
    for key in ("generation.n_real", "generation.rounds", "generation.batch_size", "generation.seq_len",
                "generation.init_temperature", "generation.checkpoint_every", "projector.topk", "projector.lm_topk",
                "projector.exact_candidates", "task.max_text_tokens"):
        _positive(problems, key, OmegaConf.select(cfg, key))
    stages = list(cfg.stages)
    for stage in stages:
        _choice(problems, "stages", stage, STAGES)
    if stages != sorted(stages, key=lambda s: STAGES.index(s) if s in STAGES else 0) or not stages:
        problems.append(f"stages={stages} must be a non-empty subsequence of {list(STAGES)}, in that order.")
    if "generate" not in stages and cfg.data.synthetic_from is None:
        problems.append("stages without generate need data.synthetic_from=<an earlier job directory>.")
    if cfg.data.synthetic_from is not None and not (Path(cfg.data.synthetic_from) / "synthetic.jsonl").is_file():
        problems.append(f"data.synthetic_from={cfg.data.synthetic_from!r} holds no synthetic.jsonl.")
    _choice(problems, "filter.classifier", cfg.filter.classifier, FILTER_CLASSIFIERS)
    _positive(problems, "filter.n_per_class", cfg.filter.n_per_class)
    if not 0 < cfg.filter.near_duplicate <= 1:
        problems.append(f"filter.near_duplicate={cfg.filter.near_duplicate!r} must be in (0, 1].")
    ev = cfg.evaluate
    _choice(problems, "evaluate.train_on", ev.train_on, TRAIN_ON)
    for baseline in ev.baselines:
        _choice(problems, "evaluate.baselines", baseline, BASELINES)
    for key in ("evaluate.n_train", "evaluate.steps", "evaluate.batch_size", "evaluate.eval_every",
                "evaluate.n_dev", "evaluate.few_shot_k"):
        _positive(problems, key, OmegaConf.select(cfg, key))
    if not ev.lrs or any(lr <= 0 for lr in ev.lrs):
        problems.append(f"evaluate.lrs={list(ev.lrs)} must be a non-empty list of positive learning rates.")
    if not ev.seeds:
        problems.append("evaluate.seeds must name at least one training seed.")
    if not isinstance(gen.max_restarts, int) or gen.max_restarts < 0:
        problems.append(f"generation.max_restarts={gen.max_restarts!r} must be >= 0.")
    if proj.match_weight < 0:
        problems.append(f"projector.match_weight={proj.match_weight!r} must be >= 0.")

    n_labels = len(task.label_names)
    if n_labels < 2:
        problems.append(f"task.label_names={list(task.label_names)} needs at least two classes.")
    if len(task.label_words) != n_labels:
        problems.append(
            f"task.label_words has {len(task.label_words)} entries but task.label_names has {n_labels}."
        )
    if len(set(task.label_words)) != len(task.label_words):
        problems.append(f"task.label_words={list(task.label_words)} must be distinct.")
    if isinstance(gen.n_real, int) and 0 < gen.n_real < n_labels:
        problems.append(
            f"generation.n_real={gen.n_real} is smaller than the number of classes ({n_labels}): "
            "every class needs at least one real example."
        )
    if task.source_labels is not None and len(task.source_labels) != n_labels:
        problems.append(
            f"task.source_labels={list(task.source_labels)} must name one source label per label name."
        )

    if cfg.paths.data_dir is not None:
        source_n_labels = n_labels if task.source_labels is None else max(task.source_labels) + 1
        counts = _check_data_file(problems, split_path(cfg, task.train_split), max(source_n_labels, 64))
        if counts and isinstance(gen.n_real, int) and gen.n_real > 0:
            kept = task.source_labels if task.source_labels is not None else range(n_labels)
            per_class = -(-gen.n_real // n_labels)
            for name, source_label in zip(task.label_names, kept):
                if counts.get(source_label, 0) < per_class:
                    problems.append(
                        f"generation.n_real={gen.n_real} needs {per_class} examples of class {name!r} "
                        f"but split {task.train_split!r} has {counts.get(source_label, 0)}."
                    )
    if problems:
        raise ConfigError(problems)
