"""Nothing lost: a job killed at any point, or stopped by a signal, resumes to exactly the result of an
uninterrupted run; under `accelerate launch` two processes give the single process's result."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY

# Two rounds per class, long enough to be killed mid-round; the CPU even where a GPU exists.
SMALL = [*TINY, "model.device=cpu", "admm.outer_steps=6", "generation.rounds=2"]
N_ROUNDS, N_RECORDS = 4, 4 * 7  # outer step 0 (the initialisation) is logged too

# Runs run.py, killing itself with SIGKILL at the n-th os.replace onto a file named *<suffix>, after
# cutting that file's temporary copy in half: a crash in the middle of writing it.
CRASH_DURING_WRITE = """
import os, runpy, signal, sys
suffix, nth = sys.argv.pop(1), int(sys.argv.pop(1))
real_replace, seen = os.replace, [0]
def replace(src, dst, *args, **kwargs):
    if str(dst).endswith(suffix):
        seen[0] += 1
        if seen[0] == nth:
            os.truncate(src, os.path.getsize(src) // 2)
            os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst, *args, **kwargs)
os.replace = replace
sys.argv[0] = "run.py"
runpy.run_path("run.py", run_name="__main__")
"""


def _env():
    # One thread per process: the machine is shared, and this is what accelerate gives each worker.
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _start(root: Path, *extra: str, prefix=(sys.executable, "run.py")) -> subprocess.Popen:
    # Output to a file, not a pipe that nobody reads while the job runs (it would block when full).
    log = root / f"output-{time.monotonic_ns()}.txt"
    with log.open("w") as f:
        process = subprocess.Popen([*prefix, *SMALL, f"paths.output_root={root}", *extra],
                                   cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=_env())
    process.log = log
    return process


def _output(process: subprocess.Popen) -> str:
    return process.log.read_text()


def _run(root: Path, *extra: str, prefix=(sys.executable, "run.py"), expect: int = 0) -> str:
    process = _start(root, *extra, prefix=prefix)
    assert process.wait(timeout=600) == expect, _output(process)[-3000:]
    return _output(process)


def _job_dir(root: Path) -> Path:
    (job,) = [p for p in (root / "runs" / "sst2").iterdir() if p.is_dir()]
    return job


def _wait_for(root: Path, ready, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = list(root.glob("runs/sst2/*"))
        if jobs and ready(jobs[0]):
            return
        time.sleep(0.02)
    raise TimeoutError(f"{root}: not ready after {timeout} s")


def _n_lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.is_file() else 0


def _result(job: Path) -> tuple[str, list[dict]]:
    """synthetic.jsonl byte for byte, and metrics.jsonl without wall-clock times."""
    metrics = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]
    return (job / "synthetic.jsonl").read_text(), [{k: m[k] for k in m if not k.endswith("seconds")} for m in metrics]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("uninterrupted")
    _run(root)
    job = _job_dir(root)
    assert len(_result(job)[1]) == N_RECORDS
    return job


@pytest.mark.slow
def test_killed_anywhere_resumes_to_the_same_result(tmp_path, uninterrupted):
    kill_when = [
        lambda job: list(job.glob("rounds/*.state.pt")),  # mid-round, from a checkpoint
        lambda job: len(list(job.glob("rounds/*.json"))) >= 1,  # just after a round was saved
        lambda job: len(list(job.glob("rounds/*.json"))) >= 3,  # in a later round
    ]
    for ready in kill_when:
        process = _start(tmp_path)
        _wait_for(tmp_path, ready)
        process.send_signal(signal.SIGKILL)
        process.wait()
    job = _job_dir(tmp_path)
    assert not (job / "synthetic.jsonl").exists()
    _run(tmp_path)
    assert _result(job) == _result(uninterrupted), "every outer step logged once, despite the re-runs"


@pytest.mark.slow
def test_killed_while_writing_resumes_to_the_same_result(tmp_path, uninterrupted):
    prefix = (sys.executable, "-c", CRASH_DURING_WRITE)
    # A checkpoint, a finished round, and each output file, each cut off halfway through its write.
    for suffix, nth in [(".state.pt", 2), ("class0_round1.json", 1), ("metrics.jsonl", 1),
                        ("synthetic.jsonl", 1), ("summary.json", 1)]:
        _run(tmp_path, prefix=(*prefix, suffix, str(nth)), expect=-signal.SIGKILL)
    _run(tmp_path)
    job = _job_dir(tmp_path)
    assert _result(job) == _result(uninterrupted)
    assert not list(job.glob("rounds/.*.tmp")), "half-written checkpoints are cleared on resume"


@pytest.mark.slow
def test_a_batch_of_rounds_killed_mid_step_resumes_to_the_same_result(tmp_path):
    """Three rounds side by side share one checkpoint; a job resumed with another batching drops the
    other batching's checkpoint and runs those rounds again, one by one."""
    batched = ("generation.rounds_per_batch=3",)
    for name in ("reference", "killed", "rebatched"):
        (tmp_path / name).mkdir()
    _run(tmp_path / "reference", *batched)
    process = _start(tmp_path / "killed", *batched)
    _wait_for(tmp_path / "killed", lambda job: list(job.glob("rounds/class0_round0-class1_round0.state.pt")))
    process.send_signal(signal.SIGKILL)
    process.wait()
    _run(tmp_path / "killed", *batched)
    assert _result(_job_dir(tmp_path / "killed")) == _result(_job_dir(tmp_path / "reference"))

    process = _start(tmp_path / "rebatched", *batched)
    _wait_for(tmp_path / "rebatched", lambda job: list(job.glob("rounds/class0_round0-class1_round0.state.pt")))
    process.send_signal(signal.SIGKILL)
    process.wait()
    _run(tmp_path / "rebatched", "generation.rounds_per_batch=1")
    job = _job_dir(tmp_path / "rebatched")
    assert len(_result(job)[1]) == N_RECORDS and not list(job.glob("rounds/*.state.pt"))


def _saved_steps(job: Path) -> int:
    """Outer steps (step 0 included) held by finished rounds and checkpoints."""
    n = sum(len(json.loads(p.read_text())["records"]) for p in job.glob("rounds/*.json"))
    for path in job.glob("rounds/*.state.pt"):
        state = torch.load(path, weights_only=True)["state"]  # tensors and plain values only
        n += len(state["records"]) if state is not None else 0
    return n


@pytest.mark.slow
def test_sigterm_saves_the_round_in_progress_and_exits_nonzero(tmp_path, uninterrupted):
    # No periodic checkpoint inside a round: what is saved comes from the signal handler.
    process = _start(tmp_path, "generation.checkpoint_every=1000")
    _wait_for(tmp_path, lambda job: _n_lines(job / "metrics.jsonl") >= 3)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 128 + signal.SIGTERM
    output = _output(process)
    assert "Interrupted by SIGTERM" in output and "run the same command again to resume" in output
    job = _job_dir(tmp_path)
    # Typically mid-round: then only the signal handler can have saved the steps after step 0.
    assert _saved_steps(job) == _n_lines(job / "metrics.jsonl") >= 3, "every logged step was saved"
    _run(tmp_path)
    assert _result(job) == _result(uninterrupted)


@pytest.mark.slow
def test_rerunning_a_finished_config_reuses_its_directory(tmp_path, uninterrupted):
    root = tmp_path / "copy"
    shutil.copytree(uninterrupted.parents[2], root)
    job = _job_dir(root)
    before = (job / "summary.json").stat().st_mtime_ns
    _run(root)
    assert (job / "summary.json").stat().st_mtime_ns == before, "nothing was recomputed"

    _run(root, "resume=false")
    jobs = sorted(p for p in (root / "runs" / "sst2").iterdir() if p.is_dir())
    assert len(jobs) == 2, "resume=false starts over in a new directory"
    (fresh,) = [p for p in jobs if p != job]
    assert _result(fresh) == _result(job), "from scratch, the same seed gives the same result"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_accelerate_two_processes_give_the_single_process_result(tmp_path, uninterrupted):
    launch = (sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(_free_port()), "run.py")
    output = _run(tmp_path, prefix=launch)
    assert output.count("Outputs in") == 1, "only the main process reports"
    job = _job_dir(tmp_path)
    assert _result(job) == _result(uninterrupted)
    made_by = [json.loads(p.read_text())["process"] for p in job.glob("rounds/*.json")]
    assert len(made_by) == N_ROUNDS and set(made_by) == {0, 1}, "both processes generated rounds"
