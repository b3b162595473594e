"""Nothing lost: job identity, kill-and-resume, signals, NaN restarts, W&B failures."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, TINY, compose_config
from gradmm.config import science_hash
from gradmm.pipeline import run_job

LONG = [*TINY, "admm.outer_steps=12", "generation.rounds=2"]


def test_job_identity_follows_the_science_config_only():
    base = science_hash(compose_config(TINY))
    assert base == science_hash(compose_config(TINY))
    assert base == science_hash(compose_config([*TINY, "tracker.mode=offline", "paths.output_root=/elsewhere"]))
    for change in ["admm.rho=0.7", "seed=1", "task=rotten_tomatoes", "projector=topk_lm", "generation.seq_len=7"]:
        assert science_hash(compose_config([*TINY, change])) != base, change


def _start(root: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "run.py", *LONG, f"paths.output_root={root}", *extra],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _job_dir(root: Path) -> Path:
    (job,) = [p for p in (root / "runs" / "sst2").iterdir() if p.is_dir()]
    return job


def _wait_for(root: Path, pattern: str, count: int = 1, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(list(root.glob(f"runs/sst2/*/rounds/{pattern}"))) >= count:
            return
        time.sleep(0.05)
    raise TimeoutError(f"no {pattern} under {root} after {timeout} s")


def _finish(root: Path) -> str:
    process = _start(root)
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    return (_job_dir(root) / "synthetic.jsonl").read_text()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> str:
    return _finish(tmp_path_factory.mktemp("uninterrupted"))


def test_killed_runs_resume_to_the_same_result(tmp_path, uninterrupted):
    # SIGKILL mid-round (a checkpoint exists), right after a round was saved, and in a later round.
    for pattern, count in [("*.state.pt", 1), ("*.json", 1), ("*.json", 3)]:
        process = _start(tmp_path)
        _wait_for(tmp_path, pattern, count)
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert not (_job_dir(tmp_path) / "synthetic.jsonl").exists()
    assert _finish(tmp_path) == uninterrupted
    metrics = (_job_dir(tmp_path) / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 2 * 2 * 13, "every outer step logged exactly once, despite the re-runs"


def test_sigterm_saves_and_exits_nonzero_then_resumes(tmp_path, uninterrupted):
    process = _start(tmp_path)
    _wait_for(tmp_path, "*.state.pt")
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130
    assert "Interrupted" in err and "resume" in err
    assert _finish(tmp_path) == uninterrupted


def test_rerunning_a_finished_config_reuses_its_directory(tmp_path):
    _finish(tmp_path)
    before = (_job_dir(tmp_path) / "summary.json").stat().st_mtime_ns
    _finish(tmp_path)
    assert (_job_dir(tmp_path) / "summary.json").stat().st_mtime_ns == before


def test_resume_false_starts_over_in_a_new_directory(tmp_path):
    _finish(tmp_path)
    process = _start(tmp_path, "resume=false")
    assert process.wait(timeout=600) == 0
    assert len([p for p in (tmp_path / "runs" / "sst2").iterdir() if p.is_dir()]) == 2


def _poison(monkeypatch, bad_calls):
    """Makes the continuous matching loss NaN on the given call numbers."""
    import gradmm.admm as admm

    real = admm.matching_loss_continuous
    calls = {"n": 0}

    def poisoned(lm, ctx, x):
        calls["n"] += 1
        value = real(lm, ctx, x)
        return value * float("nan") if bad_calls(calls["n"], ctx) else value

    monkeypatch.setattr(admm, "matching_loss_continuous", poisoned)


def test_nan_round_restarts_from_a_fresh_initialisation(tiny_cfg, tmp_path, monkeypatch):
    _poison(monkeypatch, lambda n, ctx: n == 1)
    summary = run_job(tiny_cfg, tmp_path)
    assert summary["n_synthetic"] == 8
    assert summary["failed_rounds"] == []


def test_a_round_that_keeps_failing_is_reported_and_the_others_kept(tiny_cfg, tmp_path, monkeypatch):
    _poison(monkeypatch, lambda n, ctx: ctx.label == 0)
    summary = run_job(tiny_cfg, tmp_path)
    assert summary["n_synthetic"] == 4, "class 1's round survives"
    (failed,) = summary["failed_rounds"]
    assert failed["class"] == 0 and "nan" in failed["error"].lower()


def test_wandb_failures_never_stop_a_run(tiny_cfg, tmp_path, monkeypatch):
    import wandb

    class BrokenRun:
        def log(self, *a, **k):
            raise ConnectionError("W&B unreachable")

        summary = property(lambda self: (_ for _ in ()).throw(ConnectionError("W&B unreachable")))

        def finish(self, *a, **k):
            raise ConnectionError("W&B unreachable")

    monkeypatch.setattr(wandb, "init", lambda *a, **k: BrokenRun())
    tiny_cfg.tracker.mode = "offline"
    summary = run_job(tiny_cfg, tmp_path / "broken_mid_run")
    assert summary["n_synthetic"] == 8
    assert (tmp_path / "broken_mid_run" / "metrics.jsonl").read_text().count("\n") == 2 * 3

    monkeypatch.setattr(wandb, "init", lambda *a, **k: (_ for _ in ()).throw(ConnectionError("no network")))
    assert run_job(tiny_cfg, tmp_path / "broken_at_start")["n_synthetic"] == 8


def test_offline_wandb_writes_inside_the_job_directory(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    tiny_cfg.tracker.mode = "online"  # no key configured: falls back to offline
    run_job(tiny_cfg, tmp_path / "job")
    assert list((tmp_path / "job" / "wandb").glob("offline-run-*"))
    assert os.environ.get("WANDB_MODE") in (None, "offline")
