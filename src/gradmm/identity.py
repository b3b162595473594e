"""Run identity: which config keys are science, the hash that names a job directory, and the run id.

A job directory is named after a hash of the science keys, so re-running the same science finds its
earlier work and different science never shares a directory. The report and the sweeps read the
same list: a key that does not change what a job computes is never shown as a difference between
runs, nor part of a sweep's name.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import re
import secrets
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from gradmm.fingerprint import data_fingerprint

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
    """Of the science config and of the data the job reads (gradmm.fingerprint): other data is other
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


SOURCE_REPO = Path(__file__).resolve().parents[2]


def code_version(repo: Path = SOURCE_REPO) -> str:
    """The commit a result was made from, marked +uncommitted when the code or configs differ from it;
    outside a git checkout (an installed package), the package's version."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--", "src", "conf", "experiments", "benchmarks")
    except OSError:
        commit = dirty = ""
    if commit:
        return commit + ("+uncommitted" if dirty else "")
    try:
        return f"gradmm {importlib.metadata.version('gradmm')}"
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def provenance() -> dict:
    """Which command and code made a result, and when it was finished."""
    return {"command": " ".join(shlex.quote(arg) for arg in sys.argv), "code_version": code_version(),
            "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
