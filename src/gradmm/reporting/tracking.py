"""Metrics to `metrics.jsonl` always, and to Weights & Biases when it is available.

W&B is a mirror, never a dependency of the run: any failure to start or log to it is reported once
and the run carries on with the local files.

What W&B gets, so that a dashboard reads without rearranging:
- curves under a namespace per stage, each against its own step (define_metric): generation as
  `generate/<metric>/<class>/round<r>` against `generate/outer_step`; dev curves as
  `evaluate/<metric>/<method>/seed<s>/lr<lr>` against `evaluate/step`; distances and losses summarised
  by their minimum, accuracies by their maximum. Figures of a whole stage (the filter's counts, each
  evaluated model's accuracy) go to the run summary under the same namespaces. Strings are never
  logged as metrics;
- the synthetic texts as tables (`generate/texts`, `filter/texts`);
- the job's synthetic set as a `dataset` artifact named after its job directory (the job's identity),
  and the set a job reads through `data.synthetic_from` as an artifact it uses;
- flat config keys (`admm.rho`) and flat headline figures in the run summary (`headline`);
- a benchmark (benchmarks/bench.py) as a run of job type `bench`: its figures in the summary under
  `bench/<case>/<figure>`, its records as the table `bench/records`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from gradmm.runs import files
from gradmm.runs.identity import flatten
from gradmm.runs.metrics import HEADLINE
from gradmm.runs.sweeps import MAX_TAG, SWEEP_GROUP_ENV, job_overrides

log = logging.getLogger(__name__)

STEP_METRICS = {"generate": "generate/outer_step", "evaluate": "evaluate/step"}
# A job's synthetic set as an artifact: the files a later job reads, and what they scored.
DATASET_FILES = ("synthetic.jsonl", "synthetic_filtered.jsonl", "summary.json")
# A synthetic text's fields in its table, before the filter's `kept` and `dropped_by`.
TEXT_FIELDS = ("text", "label", "label_name", "round", "grad_distance", "log_ppl")
# The fields of a dev record that say which curve it belongs to, not what it measured.
_DEV_TAGS = ("stage", "method", "seed", "lr", "step")


def has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def resolve_mode(requested: str) -> str:
    if requested == "online" and not has_api_key():
        return "offline"
    return requested


def slug(name: str) -> str:
    """A name as one segment of a W&B key or artifact name (label names such as "Sci/Tech" hold slashes)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def class_key(k: int, label: str) -> str:
    """One class as a key segment: its index keeps classes apart whose names slug alike ("pos/neg" and
    "pos neg"), its name keeps the key readable."""
    return f"class{k}_{slug(label)}"


def dataset_name(job_dir: Path) -> str:
    """The artifact name of the synthetic set a job directory holds: its directory is the job's identity
    (named after the hash of its science config)."""
    return f"synthetic-{slug(Path(job_dir).resolve().name)}"


def summary_rule(key: str) -> str | None:
    """How W&B summarises a curve: the best value, which is the smallest distance or loss and the
    largest accuracy; None keeps W&B's default (the last value). Keys name their metric second:
    `<stage>/<metric>/...`."""
    metric = key.split("/")[1] if "/" in key else key
    if any(word in metric for word in ("distance", "residual", "loss")):
        return "min"
    if "accuracy" in metric:
        return "max"
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def _per_class(name: str, values: list[float], label_names: list[str]) -> dict:
    return {f"{name}/{class_key(k, label)}": v for k, (label, v) in enumerate(zip(label_names, values, strict=True))}


def headline(summary: dict, label_names: list[str]) -> dict:
    """The job's summary.json as the flat figures a runs table sorts and filters on."""
    figures = {key: summary[key] for key in HEADLINE if key in summary}
    for scored in ("random_baseline", "real_examples"):
        figures.update({f"{scored}/{k}": v for k, v in (summary.get(scored) or {}).items()})
    if "per_class_accuracy" in summary:
        figures.update(_per_class("accuracy", summary["per_class_accuracy"], label_names))
    for name, baseline in summary.get("baselines", {}).items():
        figures[f"baseline/{name}/accuracy"] = baseline["mean"]
        figures[f"baseline/{name}/accuracy_std"] = baseline["std"]
        figures.update(_per_class(f"baseline/{name}/accuracy", baseline["per_class_accuracy"], label_names))
    evaluation = summary.get("evaluation", {})
    figures.update({f"evaluation/{k}": evaluation[k] for k in ("train_on", "method", "n_eval", "n_dev")
                    if isinstance(evaluation.get(k), str | int | float)})
    if "failed_rounds" in summary:
        figures["n_failed_rounds"] = len(summary["failed_rounds"])
    if "filter" in summary:
        figures.update({f"filter/{k}": v for k, v in flatten(summary["filter"]).items()})
    figures.update({f"leakage/{k}": v for k, v in summary.get("leakage", {}).items() if _is_number(v)})
    if "privacy" in summary:
        release = summary["privacy"]
        figures["privacy/epsilon"] = release["spent_epsilon"]
        figures["privacy/delta"] = release["delta"]
        # Composed over every release on the same real examples (gradmm.privacy.ledger), where recorded.
        if "total_epsilon" in release:
            figures["privacy/epsilon_total"] = release["total_epsilon"]
            figures["privacy/releases"] = release["releases_on_these_examples"]
    return {key.replace(".", "/"): value for key, value in figures.items()}


class Tracker:
    def __init__(self, cfg: DictConfig, out_dir: Path, job_type: str | None = None, active: bool = True,
                 makes_dataset: bool | None = None):
        """active=False: logs nothing anywhere (the non-main processes of `accelerate launch`).
        makes_dataset: whether the run's files are a synthetic set to log as an artifact at the end;
        by default, whether its stages generate or filter."""
        self.metrics_path = out_dir / "metrics.jsonl"
        self.out_dir = out_dir
        self.active = active
        self.label_names = list(cfg.task.label_names)
        self.makes_dataset = bool({"generate", "filter"} & set(cfg.stages)) if makes_dataset is None else makes_dataset
        self.upload_weights = cfg.tracker.upload_weights
        self.defined: set[str] = set()
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
                files.write_atomic(id_file, secrets.token_hex(4))
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
                config=flatten(OmegaConf.to_container(cfg, resolve=True)),
                settings=wandb.Settings(init_timeout=60, console="off"),
            )
        except Exception as error:  # noqa: BLE001 - W&B must never stop a run
            log.warning("W&B unavailable (%s); metrics go to %s only", error, self.metrics_path)
            self.run = None
        if "generate" not in cfg.stages and cfg.data.synthetic_from:
            self._safely(lambda run: self._use_dataset(run, Path(cfg.data.synthetic_from), mode == "offline"))

    def log_outer_step(self, k: int, r: int, record: dict[str, Any]) -> None:
        """One outer step of class k's round r."""
        self._append({"class": k, "round": r, **record})
        series = f"{class_key(k, self.label_names[k])}/round{r}"
        metrics = {f"generate/{name}/{series}": value for name, value in record.items()
                   if name != "outer_step" and _is_number(value)}
        self._history("generate", {"generate/outer_step": record["outer_step"], **metrics})

    def log(self, record: dict[str, Any]) -> None:
        """A record of a later stage (record["stage"]): a point of a dev curve when it has a "step",
        else figures of the whole stage, which go to the summary."""
        self._append(record)
        stage = record["stage"]
        if stage == "evaluate" and "step" in record:
            series = f"{slug(record['method'])}/seed{record['seed']}/lr{record['lr']:g}"
            metrics = {f"evaluate/{name}/{series}": value for name, value in record.items()
                       if name not in _DEV_TAGS and _is_number(value)}
            self._history("evaluate", {"evaluate/step": record["step"], **metrics})
            return
        series = f"/{slug(record['method'])}/seed{record['seed']}" if "method" in record else ""
        figures = {f"{stage}/{name}{series}": value for name, value in record.items()
                   if name != "seed" and _is_number(value)}
        self._safely(lambda run: run.summary.update(figures))

    def log_texts(self, stage: str, rows: list[dict], dropped_by: list[str | None] | None = None) -> None:
        """The synthetic texts as a table under `<stage>/texts`; dropped_by (after filtering) names the
        rule that dropped each row, None where the row was kept."""
        rules = dropped_by if dropped_by is not None else [None] * len(rows)
        self.log_table(f"{stage}/texts", [
            {**{field: row.get(field) for field in TEXT_FIELDS},
             "kept": None if dropped_by is None else rule is None, "dropped_by": rule}
            for row, rule in zip(rows, rules, strict=True)])

    def log_table(self, key: str, rows: list[dict[str, Any]]) -> None:
        """Rows of scalar fields as a table under `key`; a column per field any row has, in first-seen order."""

        def table(run):
            import wandb

            columns = list(dict.fromkeys(k for row in rows for k, v in row.items() if _is_scalar(v)))
            run.log({key: wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])})

        self._safely(table)

    def log_weights(self, method: str, seed: int, checkpoint: dict) -> None:
        """A fine-tuned model as a `model` artifact, only under tracker.upload_weights=true."""
        if not self.upload_weights or self.run is None:
            return
        path = self.out_dir / "evaluation" / f"{method}_seed{seed}.weights.pt"
        files.save_torch(path, checkpoint)

        def upload(run):
            import wandb

            model = wandb.Artifact(f"{dataset_name(self.out_dir)}-{slug(method)}-seed{seed}", type="model")
            model.add_file(str(path), policy="immutable")
            run.log_artifact(model)

        self._safely(upload)

    def summary(self, values: dict[str, Any]) -> None:
        """The job's summary.json, as flat headline figures."""
        self._safely(lambda run: run.summary.update(headline(values, self.label_names)))

    def finish(self, exit_code: int = 0) -> None:
        if exit_code == 0 and self.makes_dataset:
            self._safely(lambda run: run.log_artifact(self._dataset(self.out_dir)))
        self._safely(lambda run: run.finish(exit_code=exit_code))
        self.run = None

    def _append(self, record: dict[str, Any]) -> None:
        if self.active:
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def _history(self, stage: str, metrics: dict[str, Any]) -> None:
        def log(run):
            step = STEP_METRICS[stage]
            if step not in self.defined:
                run.define_metric(step)
                self.defined.add(step)
            for key in metrics.keys() - self.defined:
                rule = summary_rule(key)
                # Unescaped, a dot in a metric's name (lr0.001) nests it, and its summary rule is lost.
                run.define_metric(key.replace(".", "\\."), step_metric=step, **({"summary": rule} if rule else {}))
                self.defined.add(key)
            run.log(metrics)

        self._safely(log)

    @staticmethod
    def _dataset(job_dir: Path):
        import wandb

        dataset = wandb.Artifact(dataset_name(job_dir), type="dataset")
        for name in DATASET_FILES:
            if (job_dir / name).is_file():
                dataset.add_file(str(job_dir / name), name=name)
        return dataset

    def _use_dataset(self, run, job_dir: Path, offline: bool) -> None:
        """Declares the earlier job's synthetic set as this run's input. Built from the same files it is
        the same artifact version (W&B versions by content), whichever of the two runs reaches W&B
        first. Offline, use_artifact refuses to run; W&B's own route for a used draft artifact (logged,
        then used once committed) is what `wandb sync` then replays."""
        dataset = self._dataset(job_dir)
        if offline:
            run._log_artifact(dataset, is_user_created=True, use_after_commit=True)
        else:
            run.use_artifact(dataset)

    def _safely(self, action) -> None:
        if self.run is None:
            return
        try:
            action(self.run)
        except Exception as error:  # noqa: BLE001 - W&B must never stop a run
            log.warning("W&B failed (%s); continuing with local metrics only", error)
            self.run = None
