"""Which job a directory holds, and what a resumed run finds there.

Every job directory records its identity (identity.json: the science hash, the science config and
the data fingerprint: gradmm.runs.identity) before anything else is written. A run
pointed at a directory that holds another job (hydra.run.dir=X with another admm.rho, edited data,
another data folder with other data) is refused with the keys that differ, and nothing there is
touched: config.yaml is never overwritten with another science config, and an old summary is never
returned for a new config. A run that resumes says so, before any work: which directory, what is done
and where it continues.

The comparison report (gradmm.reporting.report) reads finished and unfinished job directories back:
a job's config, final figures, per-step metrics, best synthetic texts and failure record. Whatever one
job's files hold (truncated JSON, a broken line, a YAML error, undecodable bytes, the wrong shape),
loading it names the file and the problem and marks that job broken; it never stops the others from
being read.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from gradmm.runs import files, manifest
from gradmm.runs.identity import data_fingerprint, flatten, private_examples_id, science_config, science_hash
from gradmm.runs.sweeps import ERROR_FILE

log = logging.getLogger(__name__)

IDENTITY_FILE = "identity.json"
LOCK_FILE = ".lock"


class JobDirError(RuntimeError):
    """The directory holds another job's work, or an identity that cannot be read."""


def identity(cfg: DictConfig) -> dict:
    record = {"science_hash": science_hash(cfg), "science": science_config(cfg), "data": data_fingerprint(cfg)}
    if cfg.privacy.name == "dp":
        record["private_examples"] = private_examples_id(cfg)
    return record


def claim(cfg: DictConfig, out_dir: Path) -> None:
    """Records this job's identity in out_dir, or refuses a directory that holds another job's."""
    mine = identity(cfg)
    earlier = read_identity(out_dir)
    if earlier is None and (out_dir / "config.yaml").is_file():
        # A job directory from before identity.json: its science config is all there is to compare.
        legacy = science_config(OmegaConf.load(out_dir / "config.yaml"))
        earlier = {"science_hash": None, "science": legacy, "data": mine["data"]}
        if legacy == mine["science"]:
            log.warning("%s predates identity.json: its data cannot be checked against this run's", out_dir)
            earlier["science_hash"] = mine["science_hash"]
    if earlier is not None and earlier["science_hash"] != mine["science_hash"]:
        differing = _differences({**earlier["science"], "data_files": earlier.get("data")},
                                 {**mine["science"], "data_files": mine["data"]})
        raise JobDirError(
            f"{out_dir} holds another job's work (science hash {earlier['science_hash']}; this config's is "
            f"{mine['science_hash']}). It differs in: {'; '.join(differing) or 'its identity record'}. Nothing "
            "there was changed. Run without hydra.run.dir to get this config's own directory, or name another."
        )
    stamped = [(p, (_json(p) or {}).get("science_hash")) for p in sorted(out_dir.glob("rounds/class*_round*.json"))]
    stamped += [(p, _checkpoint_science(p)) for p in sorted(out_dir.glob("rounds/*.state.pt"))]
    foreign = [p for p, science in stamped if science not in (None, mine["science_hash"])]
    if foreign:
        raise JobDirError(f"{foreign[0]} (and {len(foreign) - 1} more) belong to another job, not this one "
                          f"(science hash {mine['science_hash']}): move them out of {out_dir / 'rounds'} to resume.")
    if earlier is not None:
        log_resume(cfg, out_dir)
    files.write_json(out_dir / IDENTITY_FILE, mine)


@contextlib.contextmanager
def exclusive(out_dir: Path) -> Iterator[None]:
    """Holds out_dir for one run: two runs of one job would write the same rounds, checkpoints and
    summary under each other. The lock is the operating system's (flock), so a killed run releases it."""
    with (out_dir / LOCK_FILE).open("a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            raise JobDirError(f"another run holds {out_dir} (pid {holder}); nothing there was changed. Wait for "
                              "it to finish, or stop it, then run the same command again.") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        yield


def _checkpoint_science(path: Path) -> str | None:
    """The science hash a checkpoint was saved under; None when it has none or cannot be read (generation
    then moves it aside and reruns its rounds)."""
    try:
        saved = torch.load(path, weights_only=True)
    except Exception:  # noqa: BLE001 - whatever is wrong with it, it is not another job's work
        return None
    return saved.get("science_hash") if isinstance(saved, dict) else None


def read_identity(out_dir: Path) -> dict | None:
    path = out_dir / IDENTITY_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict) or not isinstance(record.get("science"), dict):
            raise ValueError("not an identity record")
        return record
    except (OSError, ValueError) as error:
        raise JobDirError(f"{path} is unreadable ({error}): which job {out_dir} holds is unknown, so nothing "
                          "is resumed there. Restore the file, or run in another directory.") from error


def log_resume(cfg: DictConfig, out_dir: Path) -> None:
    """What a resumed run finds, before it does any work."""
    summary = _json(out_dir / "summary.json") or {}
    n_rounds = len(cfg.task.label_names) * cfg.generation.rounds
    rounds_done = len(list((out_dir / "rounds").glob("class*_round*.json")))
    in_progress = sorted(p.name for p in (out_dir / "rounds").glob("*.state.pt"))
    trained = len(list((out_dir / "evaluation").glob("*.json")))
    stages_done = manifest.done_stages(summary)
    pending = [stage for stage in cfg.stages if stage not in stages_done]
    log.info("resuming the job in %s: %d of %d rounds done%s; filter %s; %d trained model(s) done; %s",
             out_dir, rounds_done, n_rounds, f" ({', '.join(in_progress)} in progress)" if in_progress else "",
             "done" if "filter" in stages_done else "not done", trained,
             f"continuing with {pending[0]}" if pending else "every stage asked for is done")


def private_source_problem(cfg: DictConfig, source: Path) -> str | None:
    """Why, under privacy=dp, the job in `source` may not feed this one (None when it may): only the
    synthetic texts of a privacy=dp job made from these same private examples are covered."""
    key = f"data.synthetic_from={str(source)!r}"
    try:
        record = read_identity(source)
    except JobDirError as error:
        return f"{key}: {error}"
    if record is None:
        return f"{key} has no {IDENTITY_FILE}, so it cannot be shown to be a privacy=dp job; under privacy=dp " \
               "only a privacy=dp job's texts, made from the same private examples, may be read."
    if record["science"].get("privacy", {}).get("name") != "dp":
        return f"{key} is a privacy=none job: its texts are not private, and this job would say they were."
    if record.get("private_examples") != private_examples_id(cfg):
        return f"{key} was made from other private examples (another task, data, seed, n_real or " \
               "paths.target_cache_dir): this job's DP guarantee would not cover them."
    return None


def task_differences(cfg: DictConfig, source: Path) -> list[str]:
    """How the task of the job in `source` differs from this config's, as its texts are read: the task,
    its classes, its verbalizer (prompt, label words, text length) and the tokenizer. Empty when they
    agree; a source without an identity record cannot be shown to agree."""
    try:
        record = read_identity(source)
    except JobDirError as error:
        return [str(error)]
    if record is None:
        return [f"it has no {IDENTITY_FILE}, so its task is unknown"]
    return _differences(_task_view(record["science"]), _task_view(science_config(cfg)))


def _task_view(science: dict) -> dict:
    task, model = science.get("task", {}), science.get("model", {})
    tokenizer = f"{model.get('package')}/{model.get('gguf_file')}" if model.get("package") else model.get("hub_id")
    return {"task": {key: task.get(key) for key in ("name", "label_names", "label_words", "prompt",
                                                    "max_text_tokens", "source_labels")},
            "tokenizer": tokenizer}


def _json(path: Path):
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    found = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            found.append(f"{prefix}{key}: {json.dumps(a)} there, {json.dumps(b)} now")
    return found


@dataclass
class Job:
    path: Path
    config: dict[str, Any]
    summary: dict = field(default_factory=dict)
    metrics: list[dict] = field(default_factory=list)
    texts: list[dict] = field(default_factory=list)
    error: dict | None = None
    label: str = ""
    broken: list[str] = field(default_factory=list)  # "file: why" for each file that could not be read

    @property
    def status(self) -> str:
        if self.broken:
            return "broken"
        if self.error is not None:
            return "failed"
        return "done" if {"generate", "evaluate"} & set(manifest.done_stages(self.summary)) else "unfinished"


def find_jobs(paths: list[Path]) -> list[Path]:
    found = set()
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist")
        candidates = [path / "config.yaml"] if (path / "config.yaml").is_file() else path.rglob("config.yaml")
        found.update(c.parent for c in candidates if c.parent.name != ".hydra")
    return sorted(found)


def load_job(path: Path, n_texts: int) -> Job:
    """What the job directory holds; a file that cannot be read makes the job broken, never the report."""
    job = Job(path, {})
    job.config = _read(job, path / "config.yaml", _config, {})
    job.summary = _read(job, path / "summary.json", lambda p: _mapping(json.loads(p.read_text())), {})
    job.metrics = _read(job, path / "metrics.jsonl", files.read_jsonl, [])
    job.error = _read(job, path / ERROR_FILE, lambda p: _mapping(json.loads(p.read_text())), None)
    for name in ("synthetic_filtered.jsonl", "synthetic.jsonl"):
        if (path / name).is_file():
            job.texts = _read(job, path / name, lambda p: _best_texts(_texts(p), n_texts), [])
            break
    return job


def _read(job: Job, file: Path, parse, default):
    if not file.is_file():
        return default
    try:
        return parse(file)
    except Exception as error:  # noqa: BLE001 - whatever is wrong in one job's file, the others render
        job.broken.append(f"{file}: {error}")
        return default


def _config(path: Path) -> dict[str, Any]:
    config = _mapping(OmegaConf.to_container(OmegaConf.load(path)))
    missing = [key for key in ("seed", "task", "model") if key not in config]
    if missing:
        raise ValueError(f"holds no job config (no {', '.join(missing)})")
    return flatten(config)


def _mapping(value: Any) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"holds a {type(value).__name__}, not a mapping")
    return value


def _texts(path: Path) -> list[dict]:
    rows = files.read_jsonl(path)
    for line_no, row in enumerate(rows, 1):
        if not (isinstance(row.get("text"), str) and isinstance(row.get("label"), int)
                and numeric([row.get("grad_distance", 0.0)])):
            raise ValueError(f"row {line_no} lacks a string text, an integer label or a numeric grad_distance")
    return rows


def _best_texts(rows: list[dict], n_per_class: int) -> list[dict]:
    by_class = defaultdict(list)
    for row in rows:
        by_class[row["label"]].append(row)
    best = []
    for label in sorted(by_class):
        best += sorted(by_class[label], key=lambda r: r.get("grad_distance", math.inf))[:n_per_class]
    return best


def numeric(values: list[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
