"""Reading job directories for the comparison report (gradmm.report): a job's config, final figures,
per-step metrics, best synthetic texts and failure record. Whatever one job's files hold (truncated
JSON, a broken line, a YAML error, undecodable bytes, the wrong shape), loading it names the file and
the problem and marks that job broken; it never stops the others from being read.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from gradmm import artifacts
from gradmm.identity import flatten
from gradmm.manifest import done_stages
from gradmm.sweeps import ERROR_FILE


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
        return "done" if {"generate", "evaluate"} & set(done_stages(self.summary)) else "unfinished"


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
    job.metrics = _read(job, path / "metrics.jsonl", artifacts.read_jsonl, [])
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
    rows = artifacts.read_jsonl(path)
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
