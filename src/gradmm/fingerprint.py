"""Fingerprints of the data a job reads, part of its run identity (gradmm.identity).

A job's directory is named after its science config and these fingerprints, so edited data files,
another paths.data_dir holding other data, or the hub instead of local files never resume an old
job, while identical data moved to another folder does. Local splits are identified by the SHA-256
of their bytes, a hub split by the SHA-256 of the rows read from it (its id, config and revision are
task keys, science like any other), so a hub dataset that changed under an unpinned revision is another
job too.

Under privacy=dp a plain hash of the training file would be a function of the private examples
published in every job directory's name: anyone who knows the rest of the file could test guesses of
an example against it. There the fingerprints are keyed (HMAC) with the target cache's secret
(gradmm.ledger), so they still match exactly when the data does and say nothing to anyone else.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

from omegaconf import DictConfig

from gradmm import ledger
from gradmm.tasks import read_hub, split_path


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
