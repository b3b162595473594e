"""Typed config schemas, registered in Hydra's ConfigStore, and the up-front validation.

Every YAML file under conf/ merges into these dataclasses, so an unknown key or a wrong type fails at
composition. Cross-field rules that a type cannot express live in `validate`, which reports every
problem at once and runs before any model is loaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import secrets
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
    # Speed options, for CUDA: torch.compile of the transformer, and autocast of its matmuls to
    # bfloat16/float16 (null: off; ignored off CUDA) with float32 weights (model.dtype=float32).
    compile: bool = False
    autocast: Optional[str] = None


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
    # Draw this many initial sequences (null: batch_size) in one batched decode and start from the
    # batch_size whose mean gradient best matches the target: a better start for the same ADMM budget.
    init_candidates: Optional[int] = None
    # Optimise this many rounds (of any classes) side by side in one batch of rounds_per_batch x
    # batch_size sequences: the same results (up to float rounding) in fewer, larger model calls, which
    # an accelerator runs in about the time of one. A NaN restarts every round of its batch.
    rounds_per_batch: int = 1
    # Save the batch in progress every N outer steps (finished rounds are always saved).
    checkpoint_every: int = 1
    # A round whose loss or embeddings turn NaN/inf restarts from a fresh initialisation this often,
    # then is recorded as failed while the other rounds go on.
    max_restarts: int = 2


@dataclass
class MatchingConfig:
    loss: str = "label_words"
    distance: str = "cosine"
    # Weight of the class-balanced union's distance next to each class's own (gradients.Objective).
    union_weight: float = 0.0


@dataclass
class PrivacyConfig:
    # none, or dp: per-class targets released with the Gaussian mechanism (gradmm.privacy).
    name: str = "none"
    epsilon: float = 1.0
    delta: float = 1e-5
    clip: float = 1.0
    relation: str = "add_remove"


@dataclass
class DataConfig:
    # An earlier job directory whose synthetic(_filtered).jsonl the filter/evaluate stages read when
    # this job does not generate.
    synthetic_from: Optional[str] = None


@dataclass
class FilterConfig:
    n_per_class: int = 8
    # zero_shot / few_shot: drop texts the model, as a classifier (few_shot: after few_shot_k of the
    # generator's real examples as demonstrations), assigns to another class; none: keep them.
    classifier: str = "zero_shot"
    few_shot_k: int = 4
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
    # full: every weight trains; lora: low-rank adapters on every linear layer (the `lora` extra).
    method: str = "full"
    lora_r: int = 8
    lora_alpha: float = 16.0


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
    # Per-class target gradients shared by the jobs of a sweep (gradmm.target_cache): on a cluster, a
    # filesystem every job sees.
    target_cache_dir: str = "${paths.cache_dir}/targets"


@dataclass
class ObjectiveConfig:
    # The summary.json value run.py returns to a sweeper (hydra/sweeper=search optimises it), and
    # which way is better; a failed or NaN job returns the worst value so the sweep carries on.
    metric: str = "grad_distance_set"
    direction: str = "minimize"


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
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    data: DataConfig = field(default_factory=DataConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    # Reuse per-class targets stored under paths.cache_dir by earlier jobs (gradmm.target_cache);
    # reading them back gives the same tensors, so this is not part of the science config.
    cache_targets: bool = True


# The keys that do not change what a job computes: how it runs, where it writes, what it reports and
# how often it saves. The job directory is named after a hash of every other key, so re-running the
# same science finds its earlier work, and different science never shares a directory (a new key is
# science until it is listed here). `stages` says how much of the job to do, not what any stage makes;
# rounds_per_batch how many rounds share a model call (the same rounds, up to float rounding), so a job
# can resume with another batching that fits its memory.
NON_SCIENCE_KEYS = ("validate_only", "resume", "stages", "tracker", "paths", "objective", "cache_targets",
                    "generation.checkpoint_every", "generation.rounds_per_batch")


def science_config(cfg: DictConfig) -> dict:
    """cfg resolved, without hydra's node and NON_SCIENCE_KEYS."""
    science = {
        key: OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        for key, value in cfg.items_ex(resolve=True)
        if key != "hydra" and key not in NON_SCIENCE_KEYS
    }
    for key in NON_SCIENCE_KEYS:
        *parents, leaf = key.split(".")
        node = science
        for parent in parents:
            node = node.get(parent, {})
        node.pop(leaf, None)
    return science


def science_hash(cfg: DictConfig) -> str:
    return hashlib.sha256(json.dumps(science_config(cfg), sort_keys=True).encode()).hexdigest()[:12]


def _run_id(*, _root_: DictConfig) -> str:
    run_id = science_hash(_root_)
    if not _root_.get("resume", True):
        # Unique even for jobs started in the same second.
        run_id += f"-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
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
PRIVACY = ("none", "dp")
RELATIONS = ("add_remove", "replace_one")
# Evaluations that train on or show the model the generator's real examples: not private.
PRIVATE_EVALUATIONS = ("real_seen", "few_shot")
FILTER_CLASSIFIERS = ("zero_shot", "few_shot", "none")
FINETUNE_METHODS = ("full", "lora")
TRAIN_ON = ("synthetic", "synthetic_filtered", "real_seen", "real_random")
BASELINES = ("zero_shot", "few_shot", "real_seen", "real_random")
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16", "float64")
AUTOCAST_DTYPES = ("bfloat16", "float16")
# Objective metrics (summary.json keys) and the stage that writes each.
OBJECTIVES = {"grad_distance_set": "generate", "grad_distance_union": "generate", "grad_distance_mean": "generate",
              "log_ppl_mean": "generate", "accuracy": "evaluate"}
DIRECTIONS = ("minimize", "maximize")


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


def validate(cfg: DictConfig) -> None:
    """Raises ConfigError listing every problem; cheap (reads data files, loads no model)."""
    problems: list[str] = []
    task, gen, proj = cfg.task, cfg.generation, cfg.projector

    _choice(problems, "model.source", cfg.model.source, MODEL_SOURCES)
    _choice(problems, "model.device", cfg.model.device, DEVICES)
    _choice(problems, "model.dtype", cfg.model.dtype, DTYPES)
    if cfg.model.autocast is not None:
        _choice(problems, "model.autocast", cfg.model.autocast, AUTOCAST_DTYPES)
        if cfg.model.autocast in AUTOCAST_DTYPES and cfg.model.device in ("cpu", "mps"):
            problems.append(
                f"model.autocast={cfg.model.autocast!r} needs CUDA, but model.device={cfg.model.device!r}."
            )
    _choice(problems, "projector.name", proj.name, PROJECTORS)
    _choice(problems, "matching.loss", cfg.matching.loss, MATCHING_LOSSES)
    _choice(problems, "matching.distance", cfg.matching.distance, DISTANCES)
    if isinstance(cfg.matching.union_weight, (int, float)) and cfg.matching.union_weight < 0:
        problems.append(f"matching.union_weight={cfg.matching.union_weight} must be >= 0 (0: each class alone).")
    _choice(problems, "tracker.mode", cfg.tracker.mode, TRACKER_MODES)
    _choice(problems, "generation.init", gen.init, INITS)
    if gen.init_candidates is not None and isinstance(gen.batch_size, int) and gen.init_candidates < gen.batch_size:
        problems.append(
            f"generation.init_candidates={gen.init_candidates} must be at least generation.batch_size="
            f"{gen.batch_size} (or null: no selection)."
        )

    for key in ("admm.rho", "admm.outer_steps", "admm.inner_steps", "admm.lr", "admm.grad_clip"):
        _positive(problems, key, OmegaConf.select(cfg, key))
    for key in ("generation.n_real", "generation.rounds", "generation.rounds_per_batch", "generation.batch_size",
                "generation.seq_len",
                "generation.init_temperature", "generation.checkpoint_every", "projector.topk", "projector.lm_topk",
                "projector.exact_candidates", "task.max_text_tokens"):
        _positive(problems, key, OmegaConf.select(cfg, key))
    privacy = cfg.privacy
    _choice(problems, "privacy.name", privacy.name, PRIVACY)
    _choice(problems, "privacy.relation", privacy.relation, RELATIONS)
    if privacy.name == "dp":
        if not 0 < privacy.epsilon <= 100:
            problems.append(f"privacy.epsilon={privacy.epsilon!r} must be in (0, 100].")
        if not 0 < privacy.delta < 1:
            problems.append(f"privacy.delta={privacy.delta!r} must be in (0, 1).")
        elif isinstance(gen.n_real, int) and gen.n_real > 0 and privacy.delta >= 1 / gen.n_real:
            problems.append(
                f"privacy.delta={privacy.delta!r} is not below 1/generation.n_real = {1 / gen.n_real:.3g}: "
                "such a delta allows releasing a real example outright."
            )
        _positive(problems, "privacy.clip", privacy.clip)
        if not cfg.cache_targets:
            problems.append(
                "privacy=dp needs cache_targets=true: the cache keeps the one noisy release, so a resumed "
                "job or another process does not draw a fresh one, spending the privacy budget again."
            )
        if "evaluate" in cfg.stages:
            for key, value in [("evaluate.train_on", cfg.evaluate.train_on),
                               *(("evaluate.baselines", b) for b in cfg.evaluate.baselines)]:
                if value in PRIVATE_EVALUATIONS:
                    problems.append(
                        f"{key} includes {value!r}, which reads the real examples the DP guarantee covers; "
                        "with privacy=dp use synthetic, synthetic_filtered, zero_shot or real_random, and "
                        "compare with that baseline from a privacy=none job."
                    )
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

    counts: dict[int, int] = {}
    if cfg.paths.data_dir is not None:
        source_n_labels = n_labels if task.source_labels is None else max(task.source_labels) + 1
        counts = _check_data_file(problems, split_path(cfg, task.train_split), max(source_n_labels, 64))
        if counts and isinstance(gen.n_real, int) and gen.n_real > 0:
            kept = task.source_labels if task.source_labels is not None else range(n_labels)
            per_class = -(-gen.n_real // n_labels)
            # strict=False: a length mismatch is already reported above; keep collecting problems.
            for name, source_label in zip(task.label_names, kept, strict=False):
                if counts.get(source_label, 0) < per_class:
                    problems.append(
                        f"generation.n_real={gen.n_real} needs {per_class} examples of class {name!r} "
                        f"but split {task.train_split!r} has {counts.get(source_label, 0)}."
                    )
    _check_generation(problems, cfg)
    _check_filter_and_evaluate(problems, cfg, counts)
    _check_objective(problems, cfg)
    if problems:
        raise ConfigError(problems)


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _sweeper_direction() -> Optional[str]:
    """The direction an optimising sweeper (Optuna) was configured with, if any."""
    from hydra.core.hydra_config import HydraConfig

    if not _in_multirun():
        return None
    direction = HydraConfig.get().sweeper.get("direction")
    return direction if isinstance(direction, str) else None


def _check_objective(problems: list[str], cfg: DictConfig) -> None:
    metric = cfg.objective.metric
    _choice(problems, "objective.metric", metric, tuple(OBJECTIVES))
    _choice(problems, "objective.direction", cfg.objective.direction, DIRECTIONS)
    # Only a sweep reads the objective; a single run of other stages need not produce it.
    if metric in OBJECTIVES and OBJECTIVES[metric] not in cfg.stages and _in_multirun():
        problems.append(f"objective.metric={metric!r} is written by the {OBJECTIVES[metric]} stage, "
                        f"which stages={list(cfg.stages)} does not run.")
    sweeper_direction = _sweeper_direction()
    if sweeper_direction is not None and sweeper_direction != cfg.objective.direction:
        problems.append(f"hydra.sweeper.direction={sweeper_direction!r} disagrees with "
                        f"objective.direction={cfg.objective.direction!r}: the sweeper would optimise the "
                        "wrong way (hydra/sweeper=search takes objective.direction).")


def _check_generation(problems: list[str], cfg: DictConfig) -> None:
    """Rules that tie the generated sequences to the stages that read them."""
    seq_len, max_tokens = cfg.generation.seq_len, cfg.task.max_text_tokens
    if isinstance(seq_len, int) and isinstance(max_tokens, int) and 0 < max_tokens < seq_len:
        problems.append(
            f"generation.seq_len={seq_len} is longer than task.max_text_tokens={max_tokens}: scoring, "
            "filtering and fine-tuning would read only the first tokens of every synthetic text."
        )


def _check_filter_and_evaluate(problems: list[str], cfg: DictConfig, train_counts: dict[int, int]) -> None:
    """Rules that tie the filter and evaluate stages to the rest of the job."""
    flt, ev, stages = cfg.filter, cfg.evaluate, list(cfg.stages)
    _positive(problems, "filter.few_shot_k", flt.few_shot_k)
    if "filter" in stages and flt.classifier == "few_shot" and cfg.privacy.name == "dp":
        problems.append(
            "filter.classifier=few_shot shows the model real examples the DP guarantee covers; use "
            "filter.classifier=zero_shot or none with privacy=dp."
        )
    _choice(problems, "evaluate.method", ev.method, FINETUNE_METHODS)
    if ev.method == "lora":
        _positive(problems, "evaluate.lora_r", ev.lora_r)
        _positive(problems, "evaluate.lora_alpha", ev.lora_alpha)
        if importlib.util.find_spec("peft") is None:
            problems.append("evaluate.method=lora needs peft: pip install -e '.[lora]'.")
    if len(set(ev.baselines)) != len(ev.baselines):
        problems.append(f"evaluate.baselines={list(ev.baselines)} names a baseline twice.")
    if "evaluate" not in stages:
        return
    source = cfg.data.synthetic_from
    if (ev.train_on == "synthetic_filtered" and "filter" not in stages and source is not None
            and not (Path(source) / "synthetic_filtered.jsonl").is_file()):
        problems.append(
            f"evaluate.train_on=synthetic_filtered but data.synthetic_from={source!r} holds no "
            "synthetic_filtered.jsonl: add filter to stages, or use evaluate.train_on=synthetic."
        )
    if ev.train_on == "synthetic_filtered" and "filter" not in stages and source is None:
        problems.append("evaluate.train_on=synthetic_filtered needs the filter stage in stages.")
    if not train_counts or not cfg.task.label_names:
        return
    # The generator's examples, the dev split and a random real subset are disjoint slices of the
    # training split, stratified by class.
    n_classes = len(cfg.task.label_names)
    kept = cfg.task.source_labels if cfg.task.source_labels is not None else range(n_classes)
    wanted = {"generation.n_real": cfg.generation.n_real, "evaluate.n_dev": ev.n_dev}
    if "real_random" in (ev.train_on, *ev.baselines):
        wanted["evaluate.n_train"] = ev.n_train
    if not all(isinstance(n, int) and n > 0 for n in wanted.values()):
        return
    need = sum(-(-n // n_classes) for n in wanted.values())
    for name, source_label in zip(cfg.task.label_names, kept, strict=False):  # mismatch reported in validate
        if train_counts.get(source_label, 0) < need:
            problems.append(
                f"{' + '.join(f'{k}={v}' for k, v in wanted.items())} need {need} training examples of class "
                f"{name!r} (they are disjoint) but split {cfg.task.train_split!r} has "
                f"{train_counts.get(source_label, 0)}."
            )
