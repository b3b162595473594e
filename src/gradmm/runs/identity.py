"""Run identity: which config keys are science, the hash that names a job directory, and the run id.

A job directory is named after a hash of the science keys, so re-running the same science finds its
earlier work and different science never shares a directory. The report and the sweeps read the
same list: a key that does not change what a job computes is never shown as a difference between
runs, nor part of a sweep's name.

The hash also covers fingerprints of the data a job reads, so edited data files,
another paths.data_dir holding other data, or the hub instead of local files never resume an old
job, while identical data moved to another folder does. Local splits are identified by the SHA-256
of their bytes, a hub split by the SHA-256 of the rows read from it (its id, config and revision are
task keys, science like any other), so a hub dataset that changed under an unpinned revision is another
job too.

Under privacy=dp a plain hash of the training file would be a function of the private examples
published in every job directory's name: anyone who knows the rest of the file could test guesses of
an example against it. There the fingerprints are keyed (HMAC) with the target cache's secret
(gradmm.privacy.ledger), so they still match exactly when the data does and say nothing to anyone else.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import secrets
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from gradmm.data.tasks import read_hub, split_path
from gradmm.privacy import ledger

# The keys that do not change what a job computes: how it runs, where it writes, what it reports and
# how often it saves (a new key is science until it is listed here). `stages` says how much of the
# job to do, not what any stage makes; rounds_per_batch how many rounds share a model call (the same
# rounds, up to float rounding), so a job can resume with another batching that fits its memory.
# `data.transfer` only permits a source of another task, which data.synthetic_from already names.
NON_SCIENCE_KEYS = ("validate_only", "resume", "stages", "tracker", "paths", "objective", "cache_targets",
                    "generation.checkpoint_every", "generation.rounds_per_batch", "privacy.budget_epsilon",
                    "privacy.audit_dir", "data.transfer")


def is_science_key(key: str) -> bool:
    """Whether a dotted config key (`admm.rho`), or an override's key (`hydra/sweeper`, a group as
    `evaluate/method`), can change what a job computes: false for NON_SCIENCE_KEYS, what lies below
    them (`paths.output_root`) and Hydra's own keys."""
    dotted = key.lstrip("+~").replace("/", ".")
    return not any(dotted == k or dotted.startswith(f"{k}.") for k in (*NON_SCIENCE_KEYS, "hydra"))


# A name that becomes a directory or file name (the job directory is ${task.name}/${run_id:}): no
# separators, no leading dot, no "..".
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def unsafe_name(key: str, value: Any) -> str | None:
    """Why `value` may not name a path (None when it may)."""
    if isinstance(value, str) and SAFE_NAME.fullmatch(value) and ".." not in value:
        return None
    return (f"{key}={value!r} becomes a path: use letters, digits, '.', '_' and '-' only, starting with a "
            "letter or digit.")


def flatten(values: dict, prefix: str = "") -> dict:
    """Nested dicts as one level of dotted keys (`admm.rho`), the way overrides name them."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


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
    # One generation job, however the path to it is spelt (relative to wherever the job was started,
    # through a symlink): the same evaluation job.
    source = science.get("data", {}).get("synthetic_from")
    if source is not None:
        science["data"]["synthetic_from"] = str(Path(source).resolve())
    return science


def science_hash(cfg: DictConfig) -> str:
    """Of the science config and of the data the job reads (gradmm.runs.identity): other data is other
    science, and the same data in another folder is the same."""
    science = {"config": science_config(cfg), "data": data_fingerprint(cfg)}
    return hashlib.sha256(json.dumps(science, sort_keys=True).encode()).hexdigest()[:12]


def run_id(*, _root_: DictConfig) -> str:
    """The `${run_id:}` resolver: the science hash, made unique per start when resume=false. It refuses a
    task.name that would lead the job directory (${task.name}/${run_id:}) out of paths.output_root:
    Hydra makes that directory before any validation runs."""
    problem = unsafe_name("task.name", OmegaConf.select(_root_, "task.name"))
    if problem:
        raise ValueError(problem)
    identity = science_hash(_root_)
    if not _root_.get("resume", True):
        # Unique even for jobs started in the same second.
        identity += f"-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    return identity


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:  # size and mtime: a changed file misses
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    if not path.is_file():
        return "missing"
    stat = path.stat()
    return _file_sha256(str(path), stat.st_size, stat.st_mtime_ns)


def data_fingerprint(cfg: DictConfig) -> dict:
    """What identifies the data this job reads: its training and evaluation splits, and the synthetic
    texts of data.synthetic_from when it reads them."""
    splits = {split: split_sha256(cfg, split) for split in sorted({cfg.task.train_split, cfg.task.eval_split})}
    source = cfg.data.synthetic_from
    if source is not None:
        splits.update({f"synthetic_from/{name}": file_sha256(Path(source) / name)
                       for name in ("synthetic.jsonl", "synthetic_filtered.jsonl")})
    if cfg.privacy.name == "dp":
        return {name: _keyed(cfg, value) for name, value in splits.items()}
    return splits


def private_examples_id(cfg: DictConfig) -> str:
    """Identifies the generator's real examples (the DP-protected ones) without revealing them: the
    training data and everything that picks the sample from it, keyed as above."""
    what = {"train": split_sha256(cfg, cfg.task.train_split), "split": cfg.task.train_split,
            "n_real": cfg.generation.n_real, "seed": cfg.seed,
            "source_labels": _list(cfg.task.source_labels), "classes": len(cfg.task.label_names)}
    return _keyed(cfg, json.dumps(what, sort_keys=True))


def split_sha256(cfg: DictConfig, split: str) -> str:
    """The SHA-256 of the local file's bytes, or of the rows a hub split yields."""
    path = split_path(cfg, split)
    if path is not None:
        return file_sha256(path)
    if cfg.task.hub_id is None:  # validation reports it
        return "missing"
    task = cfg.task
    key = (task.hub_id, task.hub_config, task.hub_splits.get(split, split), task.hub_revision)
    if key not in _HUB_DIGESTS:  # once per process: load_dataset asks the hub each time it is called
        try:
            rows = read_hub(task, split)
        except Exception as error:  # noqa: BLE001 - the job directory is named first; validation reports it
            _HUB_ERRORS[key] = f"{type(error).__name__}: {error}"
            return "unreadable"
        _HUB_DIGESTS[key] = hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode()).hexdigest()
        _HUB_ERRORS.pop(key, None)
    return _HUB_DIGESTS[key]


def hub_error(cfg: DictConfig, split: str) -> str | None:
    """Why the hub split could not be read (None when it was): Hydra names the job directory, through
    the run identity, before validation runs, so the failure waits here to be listed with the rest."""
    split_sha256(cfg, split)
    task = cfg.task
    return _HUB_ERRORS.get((task.hub_id, task.hub_config, task.hub_splits.get(split, split), task.hub_revision))


_HUB_DIGESTS: dict[tuple, str] = {}
_HUB_ERRORS: dict[tuple, str] = {}


def _list(value):
    return None if value is None else list(value)


def _keyed(cfg: DictConfig, value: str | None) -> str | None:
    return None if value is None else ledger.keyed_digest(cfg.paths.target_cache_dir, value.encode())[:32]
