"""On-disk cache (paths.target_cache_dir) of the per-class target gradients and, under privacy=dp,
their noisy release.

Every job of a sweep over generation settings (rho, top-k, steps, ...) needs the same targets; they
cost a forward pass over the real examples per class (seconds on CPU, more for large models) and,
under privacy=dp, a fresh draw of noise that should be released once, not once per job.

The key is everything the targets depend on: the model and task configs, the real examples
themselves (row ids, labels and a hash of their texts, so an edited data file misses), the seed,
the matching loss, the privacy settings, and the code and library versions
that compute them (so a changed formula never reads a stale entry). Generation settings are not in
it: that is what lets a sweep share one entry.

Concurrency: a file lock per key makes the first job compute while the others wait and then read;
the entry is written aside and renamed into place, so a reader never sees half a file, even across
machines on a shared filesystem where the lock might not hold.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import transformers
from filelock import FileLock
from omegaconf import DictConfig, OmegaConf

from gradmm import artifacts, gradients, models, privacy, tasks
from gradmm.tasks import Example

log = logging.getLogger(__name__)

Targets = tuple[list[torch.Tensor], dict]

# The modules whose code decides the targets' values.
_SOURCES = (gradients, models, privacy, tasks)


def _container(cfg: DictConfig, key: str):
    node = OmegaConf.select(cfg, key)
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def target_key(cfg: DictConfig, real: Sequence[Example]) -> dict:
    texts = hashlib.sha256("\x00".join(ex.text for ex in real).encode()).hexdigest()
    code = hashlib.sha256(b"".join(Path(m.__file__).read_bytes() for m in _SOURCES)).hexdigest()
    return {
        "model": _container(cfg, "model"),
        "task": _container(cfg, "task"),
        "real": {"ids": [ex.index for ex in real], "labels": [ex.label for ex in real],
                 "texts_sha256": texts},
        "seed": cfg.seed,
        "matching_loss": cfg.matching.loss,
        "privacy": _container(cfg, "privacy"),
        "code_sha256": code,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }


def entry_path(cache_dir: str | Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return Path(cache_dir) / f"{digest}.pt"


def cached_targets(cfg: DictConfig, real: Sequence[Example], device: torch.device,
                   compute: Callable[[], Targets]) -> Targets:
    """compute()'s (targets, release facts), read from the cache when an earlier job stored them."""
    if not cfg.cache_targets:
        return _timed(compute, "computed (cache_targets=false)")
    key = target_key(cfg, real)
    path = entry_path(cfg.paths.target_cache_dir, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.with_suffix(".lock"))):
        if path.is_file():
            started = time.perf_counter()
            entry = torch.load(path, map_location=device, weights_only=True)
            log.info("targets: read from %s in %.2f s", path, time.perf_counter() - started)
            return entry["targets"], entry["release"]
        targets, release = _timed(compute, f"computed and stored in {path}")
        # The key beside the entry says what it holds, for whoever clears or audits the cache.
        artifacts.write_json(path.with_suffix(".key.json"), key)
        artifacts.save_torch(path, {"targets": [t.detach().cpu() for t in targets], "release": release})
    return targets, release


def _timed(compute: Callable[[], Targets], what: str) -> Targets:
    started = time.perf_counter()
    result = compute()
    log.info("targets: %s in %.2f s", what, time.perf_counter() - started)
    return result
