"""Up-front validation: every problem of a config at once, before any model is loaded.

`validate` checks the config and the data files (cheap: reads files, loads no model) and, given the
tokenizer, what only the tokenizer can tell (label words, vocabulary sizes), in the same list;
`check_tokenizer` builds the verbalizer for a job and refuses the tokenizer-level problems.

Besides each group's rules, the checks look at the whole config and at the data row by row, so that no
bad value or bad file reaches a model: every float finite, no key the schema lacks (even one added with
`+`), names that become paths restricted to safe characters, sizes within bounds, the device present,
the label words non-empty, and every split or synthetic file the job will read checked line by line.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import typing
from pathlib import Path
from typing import Any

import torch
from hydra.experimental.callback import Callback
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from gradmm.config.components import build_projector
from gradmm.config.schemas import Config
from gradmm.data.tasks import DataFileError, Verbalizer, class_quotas, label_counts, split_path
from gradmm.method.fine_tuning import FineTuning
from gradmm.method.matched_gradient import MATCHED_GRADIENTS
from gradmm.method.projectors import allowed_vocabulary
from gradmm.runs import identity
from gradmm.runs.identity import unsafe_name
from gradmm.runs.job_directory import private_source_problem, task_differences
from gradmm.runs.metrics import OBJECTIVES
from gradmm.runs.sweeps import in_multirun

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
TRAIN_ON = ("synthetic", "synthetic_filtered", "real_seen", "real_random")
BASELINES = ("zero_shot", "few_shot", "real_seen", "real_random")
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16", "float64")
AUTOCAST_DTYPES = ("bfloat16", "float16")
DIRECTIONS = ("minimize", "maximize")


class ConfigError(ValueError):
    """Every problem found in a config, one paragraph each."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("Invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


def _choice(problems: list[str], key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        problems.append(f"{key}={value!r} is not one of {', '.join(choices)}.")


def _check_projector(problems: list[str], proj: DictConfig) -> None:
    """Built as generation builds it, so a new projector needs a class and a yaml, nothing here."""
    try:
        build_projector(proj)
    except Exception as error:  # noqa: BLE001 - why the class cannot be built is the problem to report
        problems.append(f"projector._target_={proj.get('_target_')!r} cannot be built: {error} (the projectors "
                        "are the files of conf/projector/: projector=<file name>).")


def _check_component(problems: list[str], key: str, node: Any, base: type) -> None:
    """A component built from its yaml's _target_ (conf/<group>/): building it runs its own checks."""
    options = ", ".join(f"{cls.__module__}.{cls.__name__}" for cls in base.__subclasses__())
    try:
        component = instantiate(node)
    except Exception as error:  # noqa: BLE001 - whatever the class objects to is the problem to report
        reason = error.__cause__ if error.__cause__ is not None else error
        problems.append(f"{key} ({OmegaConf.select(node, '_target_', default=node)!r}) cannot be built: "
                        f"{str(reason).rstrip('.')}; the options are {options}.")
        return
    if not isinstance(component, base):
        problems.append(f"{key}={node!r} builds a {type(component).__name__}, not one of {options}.")


def _positive(problems: list[str], key: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or value <= 0:
        problems.append(f"{key}={value!r} must be positive.")


def validate(cfg: DictConfig, tokenizer=None) -> None:
    """Raises ConfigError listing every problem; cheap (reads data files, loads no model). With the
    tokenizer, its problems are in the same list."""
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
    _check_projector(problems, proj)
    _choice(problems, "matching.loss", cfg.matching.loss, MATCHING_LOSSES)
    _choice(problems, "matching.kind", cfg.matching.kind, tuple(MATCHED_GRADIENTS))
    if cfg.matching.kind in ("parameters", "lora") and not cfg.matching.modules:
        problems.append(f"matching.kind={cfg.matching.kind} needs matching.modules: regular expressions over "
                        r"module names, e.g. ['model\.layers\.(13|14)\.mlp\.\w+'].")
    for pattern in cfg.matching.modules:
        try:
            re.compile(pattern)
        except re.error as error:
            problems.append(f"matching.modules: {pattern!r} is not a regular expression ({error}).")
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

    for key in ("admm.rho", "admm.inner_steps", "admm.lr", "admm.grad_clip", "matching.lora_rank"):
        _positive(problems, key, OmegaConf.select(cfg, key))
    # 0 outer steps keeps the initialisation: the LM-samples control of the matching.
    if isinstance(cfg.admm.outer_steps, int) and cfg.admm.outer_steps < 0:
        problems.append(f"admm.outer_steps={cfg.admm.outer_steps} must be >= 0 (0: the initial samples alone).")
    for key in ("generation.n_real", "generation.rounds", "generation.rounds_per_batch", "generation.batch_size",
                "generation.seq_len",
                "generation.init_temperature", "generation.checkpoint_every", "projector.topk", "projector.lm_topk",
                "projector.exact_candidates", "projector.swaps_per_row", "task.max_text_tokens"):
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
    if cfg.admm.patience is not None:
        _positive(problems, "admm.patience", cfg.admm.patience)
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
    if cfg.paths.data_dir is None and task.hub_id is None:
        problems.append(f"paths.data_dir=null reads the hub, but task {task.name!r} has no hub dataset "
                        "(task.hub_id): set paths.data_dir to a folder of <task>/<split>.jsonl files.")
    if cfg.paths.data_dir is not None:
        try:
            counts = label_counts(split_path(cfg, task.train_split), label_bound(cfg))
        except DataFileError as error:
            problems += error.problems
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
    check_config(problems, cfg)
    check_files(problems, cfg)
    if tokenizer is not None:
        _build_verbalizer(problems, cfg, tokenizer)
    if problems:
        raise ConfigError(problems)


def check_tokenizer(cfg: DictConfig, tokenizer) -> Verbalizer:
    """The task's verbalizer for this tokenizer; raises ConfigError listing every tokenizer-level problem."""
    problems: list[str] = []
    verbalizer = _build_verbalizer(problems, cfg, tokenizer)
    if problems:
        raise ConfigError(problems)
    return verbalizer


def _build_verbalizer(problems: list[str], cfg: DictConfig, tokenizer) -> Verbalizer | None:
    """Appends what only the tokenizer can tell (label words, vocabulary sizes)."""
    verbalizer = None
    try:
        verbalizer = Verbalizer.build(cfg.task, tokenizer)
    except ValueError as error:
        problems.append(str(error))
    n_allowed = len(allowed_vocabulary(tokenizer, len(tokenizer)).nonzero())
    if cfg.projector.topk > n_allowed:
        problems.append(
            f"projector.topk={cfg.projector.topk} is larger than the allowed vocabulary ({n_allowed} tokens)."
        )
    if cfg.projector.lm_topk > len(tokenizer):
        problems.append(f"projector.lm_topk={cfg.projector.lm_topk} is larger than the vocabulary ({len(tokenizer)}).")
    return verbalizer


def _sweeper_direction() -> str | None:
    """The direction an optimising sweeper (Optuna) was configured with, if any."""
    from hydra.core.hydra_config import HydraConfig

    if not in_multirun():
        return None
    direction = HydraConfig.get().sweeper.get("direction")
    return direction if isinstance(direction, str) else None


def _check_objective(problems: list[str], cfg: DictConfig) -> None:
    metric = cfg.objective.metric
    stages = {m.key: m.stage for m in OBJECTIVES}
    _choice(problems, "objective.metric", metric, tuple(stages))
    _choice(problems, "objective.direction", cfg.objective.direction, DIRECTIONS)
    # Only a sweep reads the objective; a single run of other stages need not produce it.
    if metric in stages and stages[metric] not in cfg.stages and in_multirun():
        problems.append(f"objective.metric={metric!r} is written by the {stages[metric]} stage, "
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
    _check_component(problems, "evaluate.method", ev.method, FineTuning)
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


PATH_NAMES = ("task.name", "task.data_name")
# Far beyond what any supported model or machine runs, short of what silently exhausts memory.
UPPER_BOUNDS = {
    "generation.batch_size": 4096, "generation.init_candidates": 65536, "generation.rounds_per_batch": 1024,
    "evaluate.batch_size": 4096, "task.max_text_tokens": 131072, "generation.seq_len": 131072,
}


def check_config(problems: list[str], cfg: DictConfig) -> None:
    _check_floats(problems, OmegaConf.to_container(cfg, resolve=True), "")
    _check_keys(problems, cfg, Config, "")
    problems += [p for key in PATH_NAMES if (p := unsafe_name(key, OmegaConf.select(cfg, key)))]
    for key, bound in UPPER_BOUNDS.items():
        value = OmegaConf.select(cfg, key)
        if isinstance(value, int) and value > bound:
            problems.append(f"{key}={value} is above {bound}: almost surely a typo.")
    device = cfg.model.device
    present = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}
    if device in present and not present[device]():
        problems.append(f"model.device={device!r} is not available on this machine; use model.device=auto or cpu.")
    if any(not isinstance(w, str) or not w for w in cfg.task.label_words):
        problems.append(f"task.label_words={list(cfg.task.label_words)} has an empty word; every class needs "
                        "a non-empty label word.")
    budget, p = cfg.privacy.budget_epsilon, cfg.privacy
    if budget is not None and p.name == "dp" and not budget >= p.epsilon > 0:
        problems.append(f"privacy.budget_epsilon={budget} is below privacy.epsilon={p.epsilon}: no release fits.")
    audit = None if p.audit_dir is None else Path(p.audit_dir).resolve()
    if audit is not None and Path(cfg.paths.output_root).resolve() in (audit, *audit.parents):
        problems.append(f"privacy.audit_dir={p.audit_dir!r} is inside paths.output_root={cfg.paths.output_root!r}, "
                        "beside the job files people publish; name a private folder elsewhere.")
    if "evaluate" in cfg.stages and cfg.evaluate.max_eval is not None and cfg.evaluate.max_eval <= 0:
        problems.append(f"evaluate.max_eval={cfg.evaluate.max_eval} must be positive (or null: the whole "
                        "evaluation split).")
    # A repeated seed is one trained model counted twice: its std would be made up.
    for key in ("evaluate.seeds", "task.label_names"):
        values = list(OmegaConf.select(cfg, key))
        if repeated := sorted({str(v) for v in values if values.count(v) > 1}):
            problems.append(f"{key}={values} repeats {', '.join(repeated)}: each must be named once.")
    if cfg.data.synthetic_from is not None and "generate" in cfg.stages:
        problems.append(f"data.synthetic_from={cfg.data.synthetic_from!r} is read only by jobs that do not "
                        f"generate, and stages={list(cfg.stages)} generates: drop generate from stages, or "
                        "data.synthetic_from.")
    if cfg.data.transfer and cfg.data.synthetic_from is None:
        problems.append("data.transfer=true says data.synthetic_from is another task's job, but "
                        "data.synthetic_from is not set.")
    problems += path_problems(cfg)


# The folders a job reads or makes; a regular file in their place fails only once a model is loaded.
FOLDER_KEYS = ("paths.output_root", "paths.cache_dir", "paths.target_cache_dir", "paths.data_dir",
               "privacy.audit_dir")


class UsablePaths(Callback):
    """Hydra callback (conf/hydra/callbacks/default.yaml): Hydra makes the job directory under
    paths.output_root before the job, or its validation, starts; a file in the way is listed as a config
    problem there, not as Hydra's traceback."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _refuse_unusable_paths(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _refuse_unusable_paths(config)


def _refuse_unusable_paths(config: DictConfig) -> None:
    if problems := path_problems(config):
        print("Invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems), file=sys.stderr)
        sys.exit(2)


def path_problems(cfg: DictConfig) -> list[str]:
    """The folders of FOLDER_KEYS that are, or lie under, something other than a folder."""
    problems = []
    for key in FOLDER_KEYS:
        value = OmegaConf.select(cfg, key)
        if value is None:
            continue
        blocking = next((p for p in (Path(value), *Path(value).parents) if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            env = " (from GRADMM_CACHE)" if key == "paths.cache_dir" and "GRADMM_CACHE" in os.environ else ""
            problems.append(f"{key}={value!r}{env} must be a folder, but {blocking} is a file: name a folder, "
                            "or one that can be made.")
    return problems


def check_files(problems: list[str], cfg: DictConfig) -> None:
    """The evaluation split and the synthetic files this job reads, row by row (the training split is
    checked with its class counts in gradmm.config.validation)."""
    evaluated = "evaluate" in cfg.stages and not unsafe_name("", cfg.task.data_name)
    if evaluated and cfg.paths.data_dir is not None:
        try:
            problems += _eval_sample_problems(cfg, label_counts(split_path(cfg, cfg.task.eval_split),
                                                                label_bound(cfg)))
        except DataFileError as error:
            problems += error.problems
    source = cfg.data.synthetic_from
    if source is not None and "generate" not in cfg.stages:
        names = ["synthetic.jsonl"] + (["synthetic_filtered.jsonl"] if "filter" not in cfg.stages else [])
        for path in [Path(source) / name for name in names if (Path(source) / name).is_file()]:
            try:
                label_counts(path, len(cfg.task.label_names))
            except DataFileError as error:
                problems += error.problems
    if cfg.paths.data_dir is None and cfg.task.hub_id is not None:
        for split in sorted({cfg.task.train_split, *([cfg.task.eval_split] if evaluated else [])}):
            if error := identity.hub_error(cfg, split):
                problems.append(f"paths.data_dir=null reads split {split!r} of task.hub_id={cfg.task.hub_id!r} "
                                f"from the Hugging Face hub, which failed ({error}): set paths.data_dir to a "
                                "folder of <task>/<split>.jsonl files, or allow the hub.")
    if source is not None and "generate" not in cfg.stages:
        problems += _source_problems(cfg, Path(source))


def _eval_sample_problems(cfg: DictConfig, counts: dict[int, int]) -> list[str]:
    """evaluate.max_eval draws a stratified sample; every class must hold its share of it."""
    max_eval, names = cfg.evaluate.max_eval, list(cfg.task.label_names)
    kept = list(cfg.task.source_labels) if cfg.task.source_labels is not None else list(range(len(names)))
    have = [counts.get(label, 0) for label in kept]
    if not isinstance(max_eval, int) or max_eval <= 0 or max_eval >= sum(have) or len(kept) != len(names):
        return []
    fits = max(n for n in range(max_eval + 1)
               if all(quota <= n_class for quota, n_class in zip(class_quotas(n, len(names)), have, strict=True)))
    return [f"evaluate.max_eval={max_eval} draws {quota} examples of class {name!r}, but split "
            f"{cfg.task.eval_split!r} has {n}: use evaluate.max_eval={fits} or less, or null (the whole split)."
            for name, quota, n in zip(names, class_quotas(max_eval, len(names)), have, strict=True) if n < quota]


def _source_problems(cfg: DictConfig, source: Path) -> list[str]:
    """A job that reads another job's texts reads them as texts of its own task, by label index: the
    source must be a job of the same task, or data.transfer=true says it is meant."""
    problems = []
    if cfg.privacy.name == "dp" and (problem := private_source_problem(cfg, source)):
        problems.append(problem)
    differences = task_differences(cfg, source)
    if differences and not cfg.data.transfer:
        what = "; ".join(differences)
        problems.append(f"data.synthetic_from={str(source)!r} is not a job of this task ({what}): its labels "
                        "would be read as this task's by index. Name a job of this task, or set "
                        "data.transfer=true to evaluate its texts on this task on purpose.")
    return problems


def label_bound(cfg: DictConfig) -> int | None:
    """Labels a split may hold: the classes, or any source label when task.source_labels picks some."""
    return len(cfg.task.label_names) if cfg.task.source_labels is None else None


def _check_floats(problems: list[str], node: Any, key: str) -> None:
    if isinstance(node, dict):
        for name, value in node.items():
            if name != "hydra":
                _check_floats(problems, value, f"{key}.{name}" if key else name)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _check_floats(problems, value, f"{key}[{i}]")
    elif isinstance(node, float) and not math.isfinite(node):
        problems.append(f"{key}={node} is not a finite number.")


def _check_keys(problems: list[str], node: DictConfig, schema: type, prefix: str) -> None:
    """Keys of `node` that the dataclass `schema` lacks; nested dataclasses are checked in turn."""
    fields = typing.get_type_hints(schema)
    for name in node:
        key = f"{prefix}{name}"
        if name == "hydra" and not prefix:
            continue
        if name not in fields:
            problems.append(f"unknown key {key} (added with +?); {prefix[:-1] or 'the config'} has: "
                            f"{', '.join(fields)}.")
        elif dataclasses.is_dataclass(fields[name]) and isinstance(node._get_node(name), DictConfig):
            _check_keys(problems, node._get_node(name), fields[name], f"{key}.")


def model_limits(cfg: DictConfig, lm, setup) -> list[str]:
    """The sequences this job builds that do not fit the loaded model's positions (known only once it
    is loaded): a generated sequence between its LM prefix and the prompt, and a text as the
    classifier and the readability score read it."""
    positions = getattr(lm.model.config, "max_position_embeddings", None)
    if not isinstance(positions, int):
        return []
    prefix, prompt = len(setup.prefix_ids), len(setup.verbalizer.prompt_ids)
    needs = {"generation.seq_len": prefix + cfg.generation.seq_len + prompt,
             "task.max_text_tokens": max(prefix, prompt) + cfg.task.max_text_tokens}
    return [f"{key}={OmegaConf.select(cfg, key)} makes sequences of {n} tokens (with the prefix and prompt), "
            f"beyond the model's {positions} positions." for key, n in needs.items() if n > positions]
