"""The checks of gradmm.validation that look at the whole config or at data row by row, so that no bad
value or bad file reaches a model: every float finite, no key the schema lacks (even one added with
`+`), names that become paths restricted to safe characters, sizes within bounds, the device present,
the label words non-empty, and every split or synthetic file the job will read checked line by line.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import typing
from pathlib import Path
from typing import Any

import torch
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from gradmm import fingerprint
from gradmm.identity import unsafe_name
from gradmm.job_dir import private_source_problem, task_differences
from gradmm.schemas import Config
from gradmm.tasks import DataFileError, class_quotas, label_counts, split_path

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
    checked with its class counts in gradmm.validation)."""
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
            if error := fingerprint.hub_error(cfg, split):
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
