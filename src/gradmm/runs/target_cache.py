"""On-disk cache (paths.target_cache_dir) of the per-class target gradients and, under privacy=dp,
their noisy release.

Every job of a sweep over generation settings (rho, top-k, steps, ...) needs the same targets; they
cost a forward pass over the real examples per class (seconds on CPU, more for large models) and,
under privacy=dp, a fresh draw of noise that should be released once, not once per job.

The key is everything the targets depend on: the model and task configs, the real examples
themselves (row ids, labels and a hash of their texts, so an edited data file misses), the seed,
what is matched (matching.kind, modules, loss, ...), the privacy settings, and the code and library versions
that compute them (so a changed formula never reads a stale entry). Generation settings are not in
it: that is what lets a sweep share one entry.

Under privacy=dp every release is recorded in the privacy ledger beside the entries (gradmm.privacy.ledger)
before it is stored: a new key, a cleared cache or a lost entry means a new release, which the ledger
composes with the earlier ones on the same examples and privacy.budget_epsilon may refuse.
An entry that cannot be read (truncated, corrupt, the wrong shape) is named in a warning and moved
aside (<entry>.broken-<time>), never read again, and recomputed; loading never runs pickled code
(weights_only=True).

Concurrency: a file lock per key makes the first job compute while the others wait and then read;
the entry is written aside and renamed into place, so a reader never sees half a file, even across
machines on a shared filesystem where the lock might not hold.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import transformers
from filelock import FileLock
from omegaconf import DictConfig, OmegaConf

from gradmm.data import models, tasks
from gradmm.data.tasks import Example
from gradmm.method import gradients, matched_gradient
from gradmm.privacy import dp, ledger
from gradmm.runs import files

log = logging.getLogger(__name__)

Targets = tuple[list[torch.Tensor], dict]

# The modules whose code decides the targets' values.
_SOURCES = (gradients, matched_gradient, models, dp, tasks)


def _container(cfg: DictConfig, key: str):
    node = OmegaConf.select(cfg, key)
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


# Privacy settings that decide whether a release may happen, not what it holds.
_NOT_IN_RELEASE = ("budget_epsilon", "audit_dir")
# Matching settings that weigh targets against each other during generation, after they are computed.
_NOT_IN_TARGETS = ("distance", "union_weight")


def mechanism(cfg: DictConfig) -> dp.Mechanism:
    """The privacy settings of a release, as the plain values gradmm.privacy.dp takes."""
    p = cfg.privacy
    return dp.Mechanism(p.epsilon, p.delta, p.clip, p.relation)


def target_key(cfg: DictConfig, real: Sequence[Example]) -> dict:
    texts = hashlib.sha256("\x00".join(ex.text for ex in real).encode()).hexdigest()
    code = hashlib.sha256(b"".join(Path(m.__file__).read_bytes() for m in _SOURCES)).hexdigest()
    release = {k: v for k, v in _container(cfg, "privacy").items() if k not in _NOT_IN_RELEASE}
    return {
        "model": _container(cfg, "model"),
        "task": _container(cfg, "task"),
        "real": {"ids": [ex.index for ex in real], "labels": [ex.label for ex in real],
                 "texts_sha256": texts},
        "seed": cfg.seed,
        "matching": {k: v for k, v in _container(cfg, "matching").items() if k not in _NOT_IN_TARGETS},
        "privacy": release,
        "code_sha256": code,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }


def entry_path(cache_dir: str | Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return Path(cache_dir) / f"{digest}.pt"


def cached_targets(cfg: DictConfig, real: Sequence[Example], device: torch.device,
                   compute: Callable[[], Targets]) -> Targets:
    """compute()'s (targets, release facts), read from the cache when an earlier job stored them.
    Under privacy=dp every release goes through the ledger: refused over privacy.budget_epsilon,
    recorded before it is stored, and its facts carry the epsilon composed over every release on
    these examples."""
    if not cfg.cache_targets:
        return _timed(compute, "computed (cache_targets=false)")
    key = target_key(cfg, real)
    cache_dir = Path(cfg.paths.target_cache_dir)
    path = entry_path(cache_dir, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    under_dp = cfg.privacy.name == "dp"
    ids = ledger.example_ids(cache_dir, [ex.text for ex in real]) if under_dp else []
    with FileLock(str(path.with_suffix(".lock"))):
        entry = _load_entry(path, device, under_dp)
        if entry is not None:
            targets, release = entry
            if under_dp and release.get("release_id") not in {r["release_id"] for r in ledger.read(cache_dir)}:
                log.warning("privacy: the release in %s was missing from the ledger; recorded now", path)
                release = {**release, "release_id": ledger.record(cache_dir, _facts(release), ids)["release_id"]}
                files.save_torch(path, {"targets": _cpu(targets), "release": release})
        else:
            if under_dp:
                facts = dp.release_facts(mechanism(cfg))
                ledger.check_budget(ledger.read(cache_dir), ids, facts, cfg.privacy.delta, cfg.privacy.relation,
                                    cfg.privacy.budget_epsilon)
            targets, release = _timed(compute, f"computed and stored in {path}")
            if under_dp:
                release = {**release, "release_id": ledger.record(cache_dir, _facts(release), ids)["release_id"]}
            # The key beside the entry says what it holds, for whoever clears or audits the cache.
            files.write_json(path.with_suffix(".key.json"), key)
            files.save_torch(path, {"targets": _cpu(targets), "release": release})
    if under_dp:
        release = {**release, **composed(cfg, cache_dir, ids)}
    return targets, release


def composed(cfg: DictConfig, cache_dir: Path, ids: list[str]) -> dict:
    """The epsilon composed over every recorded release that covered one of these examples."""
    p = cfg.privacy
    total, n = ledger.total_epsilon(ledger.read(cache_dir), ids, p.delta, p.relation)
    log.info("privacy: %d release(s) on these real examples compose to epsilon=%.3g at delta=%g (ledger %s)",
             n, total, p.delta, cache_dir / ledger.LEDGER_FILE)
    return {"total_epsilon": total, "releases_on_these_examples": n, "budget_epsilon": p.budget_epsilon,
            "ledger": str(cache_dir / ledger.LEDGER_FILE)}


def _facts(release: dict) -> dict:
    return {k: release[k] for k in ("noise_multiplier", "noise_std", "clip", "relation", "epsilon", "delta")}


def _load_entry(path: Path, device: torch.device, under_dp: bool) -> Targets | None:
    """The stored (targets, release), or None; an unreadable entry is moved aside, saying so."""
    if not path.is_file():
        return None
    try:
        started = time.perf_counter()
        entry = torch.load(path, map_location=device, weights_only=True)
        if not isinstance(entry, dict):
            raise ValueError(f"holds a {type(entry).__name__}, not a cache entry")
        targets, release = entry["targets"], entry["release"]
        if not isinstance(targets, list) or not targets or not isinstance(release, dict):
            raise ValueError("not a list of targets and a release record")
    except Exception as error:  # noqa: BLE001 - whatever is wrong with it, the entry cannot be used
        aside = path.with_name(f"{path.name}.broken-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(path, aside)
        log.warning("targets: the cache entry %s is unreadable (%s); moved to %s and recomputed%s", path, error,
                    aside, ": under privacy=dp a new release, which the ledger composes with the lost one"
                    if under_dp else "")
        return None
    log.info("targets: read from %s in %.2f s", path, time.perf_counter() - started)
    return targets, release


def _cpu(targets):
    if isinstance(targets, torch.Tensor):
        return targets.detach().cpu()
    return [_cpu(t) for t in targets]


def _timed(compute: Callable[[], Targets], what: str) -> Targets:
    started = time.perf_counter()
    result = compute()
    log.info("targets: %s in %.2f s", what, time.perf_counter() - started)
    return result
