"""What a job of a Hydra sweep needs beyond a single run: the objective it returns to the sweeper,
failure handling that keeps the sweep going, and the sweep's name, which groups its jobs in W&B.

Launchers and sweepers themselves are config presets (conf/hydra/launcher/, conf/hydra/sweeper/).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from gradmm.runs import files
from gradmm.runs.identity import is_science_key

log = logging.getLogger(__name__)

# The sweep's name travels to its jobs in the environment: launchers start jobs in fresh processes
# (joblib's loky workers, SLURM jobs via submitit) that inherit it, and it exists before any job does.
SWEEP_GROUP_ENV = "GRADMM_SWEEP_GROUP"
# W&B's limits on a group name and on a tag.
MAX_GROUP, MAX_TAG = 128, 64
ERROR_FILE = "error.json"


def objective_value(cfg: DictConfig, summary: dict) -> float | None:
    """summary[objective.metric], or None when this job did not produce it."""
    value = OmegaConf.select(OmegaConf.create(summary), cfg.objective.metric)
    return None if value is None else float(value)


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def job_overrides() -> list[str]:
    """The command-line overrides that made this job (one value per swept key), or [] outside Hydra."""
    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


def sweep_job(task: Callable[[DictConfig], float | None], cfg: DictConfig) -> float | None:
    """Runs task(cfg). In a sweep, a job that raises, or whose objective is missing or NaN, is logged
    and recorded in its directory's error.json, and returns the worst objective value instead, so the
    sweeper (Optuna included, which stops on NaN) goes on with the other jobs."""
    if not in_multirun() or cfg.validate_only:
        return task(cfg)
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    error_path = out_dir / ERROR_FILE
    worst = math.inf if cfg.objective.direction == "minimize" else -math.inf
    try:
        value = task(cfg)
    except Exception as error:  # noqa: BLE001 - one bad job must not end the sweep
        log.error("job %s failed: %s", " ".join(job_overrides()), error)
        _record_failure(error_path, repr(error), traceback.format_exc())
        return worst
    if value is None or math.isnan(value):
        reason = f"objective {cfg.objective.metric} is {value}"
        log.error("job %s: %s; reporting %s to the sweeper", " ".join(job_overrides()), reason, worst)
        _record_failure(error_path, reason, None)
        return worst
    error_path.unlink(missing_ok=True)  # an earlier attempt's failure, now resumed to completion
    return value


def _record_failure(path: Path, error: str, trace: str | None) -> None:
    files.write_json(path, {"error": error, "traceback": trace, "overrides": job_overrides()})


def sweep_name(config: DictConfig) -> str:
    """A name for the whole sweep: its command-line overrides (with their comma lists and ranges) and
    its sweeper, leaving out where it writes and logs. Re-running the same sweep gives the same name, as
    its jobs find the same directories."""
    # Overrides that do not change what a sweep computes are left out of its name.
    parts = sorted(o for o in config.hydra.overrides.task if is_science_key(o.split("=", 1)[0]))
    sweeper = config.hydra.runtime.choices.get("hydra/sweeper")
    if sweeper not in (None, "basic"):
        parts.append(f"hydra/sweeper={sweeper}")
    name = " ".join(parts) or "multirun"
    if len(name) > MAX_GROUP:
        digest = hashlib.sha256(name.encode()).hexdigest()[:8]
        name = f"{name[: MAX_GROUP - 11]}.. {digest}"
    return name


class SweepGroup(Callback):
    """Hydra callback (conf/hydra/callbacks/default.yaml): names the sweep before any job starts."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        os.environ[SWEEP_GROUP_ENV] = sweep_name(config)
        log.info("this sweep's jobs share the W&B group %r", os.environ[SWEEP_GROUP_ENV])
