"""Metrics to `metrics.jsonl` always, and to Weights & Biases when it is available.

W&B is a mirror, never a dependency of the run: any failure to start or log to it is reported once
and the run carries on with the local files.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from gradmm import artifacts
from gradmm.sweeps import MAX_TAG, SWEEP_GROUP_ENV, job_overrides

log = logging.getLogger(__name__)


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def resolve_mode(requested: str) -> str:
    if requested == "online" and not _has_api_key():
        return "offline"
    return requested


class Tracker:
    def __init__(self, cfg: DictConfig, out_dir: Path, job_type: str | None = None, active: bool = True):
        """active=False: logs nothing anywhere (the non-main processes of `accelerate launch`)."""
        self.metrics_path = out_dir / "metrics.jsonl"
        self.active = active
        self.run = None
        mode = resolve_mode(cfg.tracker.mode)
        if mode == "disabled" or not active:
            return
        # The run id is kept beside the outputs, so a resumed job continues the same W&B run.
        id_file = out_dir / "wandb_run_id"
        try:
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            if not id_file.is_file():
                artifacts.write_atomic(id_file, secrets.token_hex(4))
            run_id = id_file.read_text().strip()
            self.run = wandb.init(
                id=run_id,
                resume="allow",
                project=cfg.tracker.project,
                entity=cfg.tracker.entity,
                # The jobs of a sweep share its group; each is tagged with the overrides that set it apart.
                group=cfg.tracker.group or os.environ.get(SWEEP_GROUP_ENV),
                tags=list(cfg.tracker.tags) + [o[:MAX_TAG] for o in job_overrides()],
                job_type=job_type or "+".join(cfg.stages),
                mode=mode,
                dir=str(out_dir),
                config=OmegaConf.to_container(cfg, resolve=True),
                settings=wandb.Settings(init_timeout=60, console="off"),
            )
        except Exception as error:  # noqa: BLE001 - W&B must never stop a run
            log.warning("W&B unavailable (%s); metrics go to %s only", error, self.metrics_path)
            self.run = None

    def log(self, record: dict[str, Any]) -> None:
        if not self.active:
            return
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self._safely(lambda run: run.log(record))

    def summary(self, values: dict[str, Any]) -> None:
        self._safely(lambda run: run.summary.update(values))

    def finish(self, exit_code: int = 0) -> None:
        self._safely(lambda run: run.finish(exit_code=exit_code))
        self.run = None

    def _safely(self, action) -> None:
        if self.run is None:
            return
        try:
            action(self.run)
        except Exception as error:  # noqa: BLE001 - W&B must never stop a run
            log.warning("W&B failed (%s); continuing with local metrics only", error)
            self.run = None
