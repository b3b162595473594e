"""Bad numbers and a failing tracker never cost the other rounds, nor the run."""

import json

import pytest

from gradmm.pipeline import run_job
from gradmm.reporting.tracking import Tracker


def _poison(monkeypatch, bad):
    """Makes the continuous matching loss NaN, or raises what bad() returns, on chosen calls."""
    import gradmm.method.admm as admm

    real = admm.matching_loss_continuous
    calls = {"n": 0}

    def poisoned(lm, ctx, x):
        calls["n"] += 1
        outcome = bad(calls["n"], ctx)
        if isinstance(outcome, BaseException):
            raise outcome
        value = real(lm, ctx, x)
        return value * float("nan") if outcome else value

    monkeypatch.setattr(admm, "matching_loss_continuous", poisoned)


def _rounds(out_dir):
    return {p.name: json.loads(p.read_text()) for p in sorted((out_dir / "rounds").glob("*.json"))}


@pytest.mark.slow
def test_a_nan_round_restarts_from_a_fresh_initialisation(tiny_cfg, tmp_path, monkeypatch):
    clean = run_job(tiny_cfg, tmp_path / "clean")
    _poison(monkeypatch, lambda n, ctx: n == 1)
    summary = run_job(tiny_cfg, tmp_path / "faulty")
    assert summary["n_synthetic"] == clean["n_synthetic"] and summary["failed_rounds"] == []
    clean_rounds, faulty_rounds = _rounds(tmp_path / "clean"), _rounds(tmp_path / "faulty")
    first = faulty_rounds["class0_round0.json"]
    assert len(first["faults"]) == 1 and "nan" in first["faults"][0].lower()
    assert first["rows"] != clean_rounds["class0_round0.json"]["rows"], "a new initialisation, not a replay"
    assert faulty_rounds["class1_round0.json"]["rows"] == clean_rounds["class1_round0.json"]["rows"]


@pytest.mark.slow
def test_a_round_that_keeps_failing_is_reported_and_the_others_kept(tiny_cfg, tmp_path, monkeypatch):
    _poison(monkeypatch, lambda n, ctx: ctx.labels == [0])
    summary = run_job(tiny_cfg, tmp_path)
    assert summary["n_synthetic"] == tiny_cfg.generation.batch_size, "class 1's round survives"
    (failed,) = summary["failed_rounds"]
    assert failed["class"] == 0 and "nan" in failed["error"].lower()
    assert len(_rounds(tmp_path)["class0_round0.json"]["faults"]) == tiny_cfg.generation.max_restarts + 1


@pytest.mark.slow
def test_a_job_stopped_after_a_fault_resumes_with_the_next_attempt(tiny_cfg, tmp_path, monkeypatch):
    """The attempt number is checkpointed: resuming must not replay the initialisation that failed."""
    _poison(monkeypatch, lambda n, ctx: n == 1)
    run_job(tiny_cfg, tmp_path / "uninterrupted")
    # Attempt 0 fails at its first loss; attempt 1 is stopped in its second outer step (a loss per inner
    # step, 2 a step: calls 2-3, then 4-5).
    _poison(monkeypatch, lambda n, ctx: True if n == 1 else KeyboardInterrupt() if n == 5 else False)
    with pytest.raises(KeyboardInterrupt):
        run_job(tiny_cfg, tmp_path / "stopped")
    monkeypatch.undo()
    run_job(tiny_cfg, tmp_path / "stopped")
    stopped, uninterrupted = tmp_path / "stopped", tmp_path / "uninterrupted"
    for name in ("synthetic.jsonl", "metrics.jsonl"):
        assert _without_times(stopped / name) == _without_times(uninterrupted / name), name
    faults = [_rounds(job)["class0_round0.json"]["faults"] for job in (stopped, uninterrupted)]
    assert faults[0] == faults[1] and len(faults[0]) == 1


def _without_times(path):
    return [{k: v for k, v in json.loads(line).items() if not k.endswith("seconds")} for line in path.open()]


class BrokenRun:
    def log(self, *args, **kwargs):
        raise ConnectionError("W&B unreachable")

    summary = property(lambda self: (_ for _ in ()).throw(ConnectionError("W&B unreachable")))

    def finish(self, *args, **kwargs):
        raise ConnectionError("W&B unreachable")


@pytest.mark.slow
def test_wandb_failures_never_stop_a_run(tiny_cfg, tmp_path, monkeypatch):
    import wandb

    tiny_cfg.tracker.mode = "offline"
    monkeypatch.setattr(wandb, "init", lambda *a, **k: BrokenRun())
    summary = run_job(tiny_cfg, tmp_path / "broken_mid_run")
    assert summary["n_synthetic"] == 2 * tiny_cfg.generation.batch_size
    n_records = 2 * (tiny_cfg.admm.outer_steps + 1)
    assert len((tmp_path / "broken_mid_run" / "metrics.jsonl").read_text().splitlines()) == n_records

    monkeypatch.setattr(wandb, "init", lambda *a, **k: (_ for _ in ()).throw(ConnectionError("no network")))
    summary = run_job(tiny_cfg, tmp_path / "broken_at_start")
    assert summary["n_synthetic"] == 2 * tiny_cfg.generation.batch_size


def test_a_resumed_job_continues_its_wandb_run(tiny_cfg, tmp_path, monkeypatch):
    import wandb

    ids = []
    monkeypatch.setattr(wandb, "init", lambda *a, **k: ids.append(k["id"]) or BrokenRun())
    tiny_cfg.tracker.mode = "offline"
    Tracker(tiny_cfg, tmp_path)
    Tracker(tiny_cfg, tmp_path)
    Tracker(tiny_cfg, tmp_path / "another_job")
    assert ids[0] == ids[1] != ids[2]


@pytest.mark.slow
def test_offline_wandb_writes_inside_the_job_directory(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    tiny_cfg.tracker.mode = "online"  # no key configured: falls back to offline
    run_job(tiny_cfg, tmp_path / "job")
    (offline_run,) = (tmp_path / "job" / "wandb").glob("offline-run-*")
    (log,) = offline_run.glob("*.wandb")
    assert b"grad_distance_z" in log.read_bytes(), "the offline run holds the outer steps"
