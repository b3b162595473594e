"""Sweeps: the target cache (reuse, keys, concurrent writers), the objective and failure handling of
sweep jobs, the W&B grouping, and multiruns through the launchers and sweepers on the tiny model."""

import json
import math
import multiprocessing
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from conftest import CONF_DIR, REPO, TINY, compose_config
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf, open_dict

import gradmm.pipeline as pipeline
import gradmm.stages.generate as generate
from gradmm.data.tasks import Example
from gradmm.reporting.tracking import Tracker
from gradmm.runs import sweeps, target_cache
from gradmm.runs.files import read_jsonl

REAL = [Example("a fine film", 1, 3), Example("a dull film", 0, 7)]


@pytest.fixture
def cached_cfg(tiny_cfg, tmp_path):
    with open_dict(tiny_cfg):
        tiny_cfg.paths.target_cache_dir = str(tmp_path / "targets")
    return tiny_cfg


def _counting_compute_targets(monkeypatch) -> list:
    calls = []
    original = generate.compute_targets

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(generate, "compute_targets", counted)
    return calls


@pytest.mark.slow
def test_jobs_that_differ_only_in_generation_settings_share_the_targets(cached_cfg, tmp_path, monkeypatch):
    calls = _counting_compute_targets(monkeypatch)
    cached_cfg.admm.rho = 0.5
    pipeline.run_job(cached_cfg, tmp_path / "rho0.5")
    cached_cfg.admm.rho = 1.0
    pipeline.run_job(cached_cfg, tmp_path / "rho1")
    assert len(calls) == 1
    assert len(list((tmp_path / "targets").glob("*.pt"))) == 1

    # The same job without the cache computes the targets itself and produces the same texts.
    cached_cfg.cache_targets = False
    pipeline.run_job(cached_cfg, tmp_path / "rho1-uncached")
    assert len(calls) == 2
    uncached, cached = (read_jsonl(tmp_path / d / "synthetic.jsonl") for d in ("rho1-uncached", "rho1"))
    assert uncached == cached


@pytest.mark.slow
def test_private_release_is_cached_with_its_facts(cached_cfg, tmp_path, monkeypatch):
    calls = _counting_compute_targets(monkeypatch)
    with open_dict(cached_cfg):
        cached_cfg.privacy.name = "dp"
    first = pipeline.run_job(cached_cfg, tmp_path / "a")
    cached_cfg.admm.rho = 2.0
    second = pipeline.run_job(cached_cfg, tmp_path / "b")
    assert len(calls) == 1
    assert first["privacy"] == second["privacy"]


@pytest.mark.parametrize("override", [
    "model.init_seed=1", "task.prompt=' It felt'", "seed=1", "matching.loss=full_vocab", "privacy=dp",
    "privacy.clip=2.0", "generation.n_real=10", "task.max_text_tokens=64",
])
def test_anything_the_targets_depend_on_changes_the_key(override):
    base = compose_config(TINY)
    changed = compose_config([*TINY, override])
    real = REAL if override != "generation.n_real=10" else REAL[:1]
    assert target_cache.target_key(base, REAL) != target_cache.target_key(changed, real)


@pytest.mark.parametrize("override", [
    "admm.rho=3", "admm.outer_steps=7", "projector.topk=5", "generation.rounds=3", "filter.n_per_class=2",
    "tracker=wandb", "objective.metric=log_ppl_mean",
])
def test_generation_settings_keep_the_key(override):
    assert target_cache.target_key(compose_config(TINY), REAL) == target_cache.target_key(
        compose_config([*TINY, override]), REAL)


def test_the_real_examples_are_part_of_the_key():
    cfg = compose_config(TINY)
    edited = [Example("a dull film!", 0, 7) if ex.index == 7 else ex for ex in REAL]
    assert target_cache.target_key(cfg, REAL) != target_cache.target_key(cfg, edited)
    other_row = [Example("a fine film", 1, 4), REAL[1]]
    assert target_cache.target_key(cfg, REAL) != target_cache.target_key(cfg, other_row)


def _writer(cfg_container: dict, log_path: str, out_path: str) -> None:
    cfg = OmegaConf.create(cfg_container)

    def compute():
        with open(log_path, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(1.0)  # keeps the computation open while the other writers arrive
        generator = torch.Generator().manual_seed(os.getpid())
        return [torch.randn(2, 3, generator=generator) for _ in range(2)], {"pid": os.getpid()}

    targets, release = target_cache.cached_targets(cfg, REAL, torch.device("cpu"), compute)
    torch.save({"targets": targets, "release": release}, out_path)


@pytest.mark.slow
def test_concurrent_writers_compute_once_and_all_read_the_same_entry(cached_cfg, tmp_path):
    container = OmegaConf.to_container(cached_cfg, resolve=True)
    log_path = tmp_path / "computed.log"
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_writer, args=(container, str(log_path), str(tmp_path / f"out{i}.pt")))
               for i in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=300)
        assert worker.exitcode == 0
    assert len(log_path.read_text().split()) == 1
    results = [torch.load(tmp_path / f"out{i}.pt") for i in range(4)]
    for result in results[1:]:
        assert result["release"] == results[0]["release"]
        assert all(torch.equal(a, b) for a, b in zip(result["targets"], results[0]["targets"], strict=True))
    assert not [p for p in (tmp_path / "targets").iterdir() if p.name.endswith(".tmp")]


def _with_hydra(overrides: list[str], mode: str, output_dir: Path | None = None):
    """Compose like `python run.py [-m] overrides`, with Hydra's runtime config set as a job sees it."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.mode = RunMode[mode]
        cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.fixture(autouse=True)
def _reset_hydra():
    yield
    HydraConfig.instance().cfg = None


def test_objective_is_the_configured_summary_value():
    cfg = compose_config([*TINY, "objective.metric=accuracy", "objective.direction=maximize"])
    assert sweeps.objective_value(cfg, {"accuracy": 0.75, "grad_distance_set": 0.1}) == 0.75
    assert sweeps.objective_value(cfg, {"grad_distance_set": 0.1}) is None


@pytest.mark.parametrize("direction,worst", [("minimize", math.inf), ("maximize", -math.inf)])
def test_a_failed_or_nan_sweep_job_reports_the_worst_value_and_records_why(tmp_path, direction, worst):
    cfg = _with_hydra([*TINY, f"objective.direction={direction}", "admm.rho=0.1"], "MULTIRUN", tmp_path)

    def broken(_):
        raise RuntimeError("out of memory")

    assert sweeps.sweep_job(broken, cfg) == worst
    error = json.loads((tmp_path / sweeps.ERROR_FILE).read_text())
    assert "out of memory" in error["error"] and "admm.rho=0.1" in error["overrides"]
    assert sweeps.sweep_job(lambda _: math.nan, cfg) == worst
    assert "nan" in json.loads((tmp_path / sweeps.ERROR_FILE).read_text())["error"]
    # A later successful attempt clears the record.
    assert sweeps.sweep_job(lambda _: 0.25, cfg) == 0.25
    assert not (tmp_path / sweeps.ERROR_FILE).exists()


def test_a_single_run_still_raises():
    cfg = _with_hydra(TINY, "RUN")
    with pytest.raises(RuntimeError):
        sweeps.sweep_job(lambda _: (_ for _ in ()).throw(RuntimeError("boom")), cfg)


def test_sweeper_direction_must_agree_with_the_objective():
    from gradmm.config.validation import ConfigError, validate

    cfg = _with_hydra([*TINY, "hydra/sweeper=search", "objective.direction=maximize",
                       "hydra.sweeper.direction=minimize"], "MULTIRUN")
    with pytest.raises(ConfigError, match="hydra.sweeper.direction='minimize'"):
        validate(cfg)
    cfg = _with_hydra([*TINY, "objective.metric=accuracy"], "MULTIRUN")
    with pytest.raises(ConfigError, match="objective.metric='accuracy' is written by the evaluate stage"):
        validate(cfg)


def _sweep_config(overrides: list[str], sweeper: str = "basic"):
    """The parts of a sweep's own (not a job's) Hydra config that name it."""
    return OmegaConf.create({"hydra": {"overrides": {"task": overrides},
                                       "runtime": {"choices": {"hydra/sweeper": sweeper}}}})


def test_sweep_name_is_stable_and_bounded():
    name = sweeps.sweep_name(_sweep_config(["admm.rho=0.1,0.5", "paths.output_root=/tmp/x", "model=tiny"]))
    assert name == "admm.rho=0.1,0.5 model=tiny"
    assert sweeps.sweep_name(_sweep_config(["model=tiny", "admm.rho=0.1,0.5"])) == name
    assert sweeps.sweep_name(_sweep_config([], "search")) == "hydra/sweeper=search"
    names = [sweeps.sweep_name(_sweep_config([f"admm.rho={','.join(map(str, range(n)))}"])) for n in (60, 61)]
    assert names[0] != names[1] and all(len(n) <= sweeps.MAX_GROUP for n in names)


def test_sweep_jobs_join_the_sweeps_wandb_group_tagged_with_their_overrides(monkeypatch, tmp_path):
    cfg = _with_hydra([*TINY, "tracker=wandb", "tracker.mode=offline", "admm.rho=0.1"], "MULTIRUN")
    seen = {}
    fake = types.SimpleNamespace(init=lambda **kwargs: seen.update(kwargs) or object(), Settings=dict)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv(sweeps.SWEEP_GROUP_ENV, "admm.rho=0.1,1 model=tiny")
    Tracker(cfg, tmp_path)
    assert seen["group"] == "admm.rho=0.1,1 model=tiny"
    assert "admm.rho=0.1" in seen["tags"] and "model=tiny" in seen["tags"]
    assert seen["job_type"] == "generate"


def test_sweep_rho_is_the_papers_grid():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["experiment=sweep_rho"], return_hydra_config=True)
    grid = [float(v) for v in cfg.hydra.sweeper.params["admm.rho"].split(",")]
    assert grid == [0.01, 0.1, 0.5, 1.0, 5.0]


def _multirun(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "GRADMM_CACHE": os.environ.get("GRADMM_CACHE", str(Path.home() / ".cache/gradmm"))}
    return subprocess.run(
        [sys.executable, "run.py", "-m", *TINY, f"paths.output_root={tmp_path}",
         f"paths.target_cache_dir={tmp_path / 'targets'}", *overrides],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=env,
    )


@pytest.mark.slow
def test_two_job_multirun_on_the_joblib_launcher_shares_targets_and_builds_a_report(tmp_path):
    result = _multirun(tmp_path, "hydra/launcher=local", "admm.rho=0.1,1")
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = sorted(tmp_path.rglob("summary.json"))
    assert len(summaries) == 2
    assert {json.loads(p.read_text())["output_dir"] for p in summaries} == {str(p.parent) for p in summaries}
    assert len(list((tmp_path / "targets").glob("*.pt"))) == 1
    (announced,) = [line for line in (result.stdout + result.stderr).splitlines() if "W&B group" in line]
    assert "admm.rho=0.1,1" in announced and "hydra/launcher=local" not in announced
    report = subprocess.run([sys.executable, "-m", "gradmm.reporting.report", str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-3000:]
    page = (tmp_path / "report.html").read_text()
    assert all(str(p.parent) in page for p in summaries)


@pytest.mark.slow
def test_a_failing_job_does_not_stop_the_sweep(tmp_path):
    # rho=-1 composes (a float) but fails validation inside its job.
    result = _multirun(tmp_path, "admm.rho=-1,0.5")
    assert result.returncode == 0, result.stderr[-3000:]
    (error_file,) = tmp_path.rglob(sweeps.ERROR_FILE)
    assert "admm.rho=-1" in json.loads(error_file.read_text())["error"]
    assert len(list(tmp_path.rglob("summary.json"))) == 1


@pytest.mark.slow
def test_optuna_search_survives_failed_trials(tmp_path):
    # The grid sampler tries both values: one job fails validation, the other runs.
    result = _multirun(tmp_path, "hydra/sweeper=search", "hydra/sweeper/sampler=grid",
                       "hydra.sweeper.params=null", "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2",
                       "admm.rho=choice(-1,0.5)")
    assert result.returncode == 0, result.stderr[-3000:]
    results = OmegaConf.load(next(tmp_path.rglob("optimization_results.yaml")))
    assert results.best_params["admm.rho"] == 0.5
