"""Adversarial: a job is done when its files say so (issue 20, findings 1, 10 and 11). Every output of a
finished job, deleted or cut, comes back byte for byte on the next run, or the run stops naming it;
two runs of one job never share its directory; an evaluation split holding the generator's examples
is reported."""

import json
import logging
import os
import shutil
import subprocess
import sys
import time

import pytest
from conftest import DATA_DIR, REPO, TINY, compose_config
from omegaconf import OmegaConf

import gradmm.pipeline as pipeline
from gradmm.runs import files, job_directory, manifest

EVAL = ["stages=[generate,filter,evaluate]", "filter.classifier=none", "filter.n_per_class=3",
        "evaluate.train_on=synthetic_filtered", "evaluate.steps=2", "evaluate.eval_every=1", "evaluate.batch_size=4",
        "evaluate.n_dev=8", "evaluate.max_eval=8", "evaluate.seeds=[0,1]", "evaluate.lrs=[1e-3]",
        "evaluate.baselines=[zero_shot]"]
# A log of the run (mirrored to W&B), not an output: it is appended to while a stage runs.
NOT_OUTPUTS = ("metrics.jsonl", job_directory.LOCK_FILE)


def _data(root):
    (root / "sst2").mkdir(parents=True)
    for split, n in (("train", 200), ("validation", 40)):
        lines = (DATA_DIR / "sst2" / f"{split}.jsonl").read_text().splitlines(keepends=True)
        (root / "sst2" / f"{split}.jsonl").write_text("".join(lines[:n]))
    return root


def _cfg(root, *overrides):
    return compose_config([*TINY, f"paths.data_dir={root / 'data'}", f"paths.output_root={root / 'out'}",
                           f"paths.target_cache_dir={root / 'targets'}", *EVAL, *overrides])


def _files(path):
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p.name not in NOT_OUTPUTS and not p.name.endswith(".damaged")}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("finished")
    _data(root / "data")
    pipeline.run_job(_cfg(root), root / "job")
    return root


def _copy(finished, tmp_path):
    shutil.copytree(finished / "data", tmp_path / "data")
    shutil.copytree(finished / "job", tmp_path / "job")
    if (finished / "targets").exists():
        shutil.copytree(finished / "targets", tmp_path / "targets")
    # As a run in this folder writes it: it names the folder's paths.
    files.write_atomic(tmp_path / "job" / "config.yaml", OmegaConf.to_yaml(_cfg(tmp_path), resolve=True))
    return tmp_path / "job"


@pytest.mark.slow
def test_a_finished_job_records_every_output(finished):
    record = json.loads((finished / "job" / manifest.MANIFEST_FILE).read_text())
    outputs = {name for stage in record["stages"].values() for name in stage}
    assert {"synthetic.jsonl", "synthetic_filtered.jsonl", "leakage.jsonl", "rounds/class0_round0.json",
            "evaluation/synthetic_filtered_seed1.json", "evaluation/zero_shot_seed0.json"} <= outputs
    synthetic = record["stages"]["generate"]["synthetic.jsonl"]
    assert synthetic["rows"] == len((finished / "job" / "synthetic.jsonl").read_text().splitlines())
    assert len(synthetic["sha256"]) == 64


DAMAGE = {
    "deleted": lambda p: p.unlink(),
    "cut": lambda p: p.write_bytes(p.read_bytes()[:-5]),
    "last line dropped": lambda p: p.write_bytes(b"".join(p.read_bytes().splitlines(keepends=True)[:-1])),
}
# What cannot be made again to the same bytes, and so stops the run naming it.
REFUSED = {"rounds/class0_round0.json": manifest.ManifestError, "rounds/class1_round0.json": manifest.ManifestError,
           "summary.json": manifest.ManifestError}
FILES = ["synthetic.jsonl", "synthetic_filtered.jsonl", "leakage.jsonl", "evaluation/synthetic_filtered_seed0.json",
         "evaluation/zero_shot_seed0.json", "manifest.json", "config.yaml", "identity.json", *REFUSED]


@pytest.mark.slow
@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("name", FILES)
def test_each_output_deleted_or_cut_comes_back_or_is_named(name, damage, finished, tmp_path):
    path = _copy(finished, tmp_path)
    before = _files(path)
    DAMAGE[damage](path / name)
    cfg = _cfg(tmp_path)
    refused = REFUSED.get(name)
    if name == "identity.json" and damage != "deleted":
        refused = job_directory.JobDirError  # which job the directory holds is unknown (tests/test_adversarial_jobs.py)
    if refused is not None:
        damaged = _files(path)
        with pytest.raises(refused, match=str(path / name)):
            pipeline.run_job(cfg, path)
        assert _files(path) == damaged, "nothing changed"
        return
    pipeline.run_job(cfg, path)
    assert _files(path) == before


def test_a_lost_trained_model_is_trained_again_and_nothing_else(finished, tmp_path, monkeypatch):
    from gradmm.stages import evaluate

    path = _copy(finished, tmp_path)
    before = _files(path)
    (path / "evaluation" / "synthetic_filtered_seed1.json").unlink()
    trained = []
    real_train = evaluate.train_and_select
    monkeypatch.setattr(evaluate, "train_and_select", lambda *a, **k: trained.append(a[6]) or real_train(*a, **k))
    monkeypatch.setattr(pipeline, "generate", lambda *a, **k: pytest.fail("generated again"))
    pipeline.run_job(_cfg(tmp_path), path)
    assert trained == [_cfg(tmp_path).seed + 1]
    assert _files(path) == before


def test_a_finished_job_with_its_outputs_intact_does_no_work(finished, tmp_path, monkeypatch):
    path = _copy(finished, tmp_path)
    # identity.json and config.yaml are written by every run, with the same bytes.
    rewritten = (*NOT_OUTPUTS, "identity.json", "config.yaml")
    before = {p: p.stat().st_mtime_ns for p in path.rglob("*") if p.is_file() and p.name not in rewritten}
    for name in ("generate", "rescore", "filter_stage", "evaluate_stage"):
        monkeypatch.setattr(pipeline, name, lambda *a, **k: pytest.fail("recomputed"))
    pipeline.run_job(_cfg(tmp_path), path)
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_a_damaged_round_is_named_before_any_model_loads(finished, tmp_path, monkeypatch):
    path = _copy(finished, tmp_path)
    (path / "rounds" / "class1_round0.json").unlink()
    (path / "rounds" / "class0_round0.json").write_text("{}")
    monkeypatch.setattr(pipeline, "load_lm", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(manifest.ManifestError) as refused:
        pipeline.run_job(_cfg(tmp_path), path)
    assert f"{path / 'rounds' / 'class0_round0.json'} (altered)" in str(refused.value)
    assert f"{path / 'rounds' / 'class1_round0.json'} (missing)" in str(refused.value)


def _command(tmp_path, *extra):
    return subprocess.run([sys.executable, "run.py", *TINY, *EVAL, f"paths.data_dir={tmp_path / 'data'}",
                           f"paths.output_root={tmp_path / 'out'}", f"paths.target_cache_dir={tmp_path / 'targets'}",
                           f"hydra.run.dir={tmp_path / 'job'}", *extra],
                          cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=600)


@pytest.mark.slow
def test_the_command_rebuilds_a_deleted_filtered_set_and_prints_only_what_it_verified(finished, tmp_path):
    """The reproduction of issue 20: synthetic_filtered.jsonl deleted, the same command again."""
    path = _copy(finished, tmp_path)
    before = _files(path)
    (path / "synthetic_filtered.jsonl").unlink()
    (path / "synthetic.jsonl").write_bytes((path / "synthetic.jsonl").read_bytes()[:-7])
    done = _command(tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "accuracy on" in done.stdout and "Traceback" not in done.stderr
    after = _files(path)  # and Hydra's own files (.hydra/, run.log)
    assert {name: after.get(name) for name in before} == before


# --- finding 10: one run at a time --------------------------------------------------------------------

def test_a_second_run_of_a_job_is_refused_while_one_holds_it(finished, tmp_path):
    path = _copy(finished, tmp_path)
    before = _files(path)
    with job_directory.exclusive(path):
        with pytest.raises(job_directory.JobDirError, match=rf"another run holds {path} \(pid {os.getpid()}\)"):
            pipeline.run_job(_cfg(tmp_path), path)
        assert _files(path) == before, "the refused run changed nothing"
    pipeline.run_job(_cfg(tmp_path), path)


@pytest.mark.slow
def test_two_commands_on_one_job_at_once_one_is_refused(tmp_path):
    _data(tmp_path / "data")
    first = subprocess.Popen([sys.executable, "run.py", *TINY, *EVAL, f"paths.data_dir={tmp_path / 'data'}",
                              f"paths.output_root={tmp_path / 'out'}", f"hydra.run.dir={tmp_path / 'job'}",
                              f"paths.target_cache_dir={tmp_path / 'targets'}", "admm.outer_steps=300"],
                             cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        lock = tmp_path / "job" / job_directory.LOCK_FILE
        while not (lock.is_file() and lock.read_text().strip()):
            assert first.poll() is None, "the first run ended before it held the job"
            time.sleep(0.05)
        second = _command(tmp_path, "admm.outer_steps=300")
        assert second.returncode != 0
        assert f"another run holds {tmp_path / 'job'} (pid {first.pid})" in second.stderr
    finally:
        first.kill()
        first.wait()


# --- finding 11: an evaluation split holding the generator's examples ---------------------------------

@pytest.mark.slow
def test_an_evaluation_split_holding_the_generators_examples_is_reported(tmp_path, caplog):
    _data(tmp_path / "data")
    shutil.copy(tmp_path / "data" / "sst2" / "train.jsonl", tmp_path / "data" / "sst2" / "validation.jsonl")
    cfg = _cfg(tmp_path, "evaluate.max_eval=null", "stages=[generate,evaluate]", "evaluate.train_on=synthetic",
               "evaluate.seeds=[0]")
    with caplog.at_level(logging.WARNING, logger="gradmm.stages.evaluate"):
        summary = pipeline.run_job(cfg, tmp_path / "job")
    assert summary["evaluation"]["overlap_with_generator"] == cfg.generation.n_real
    assert "8 of the 200 evaluation examples are among the generator's 8 real examples" in caplog.text


def test_a_disjoint_evaluation_split_records_no_overlap(finished):
    summary = json.loads((finished / "job" / "summary.json").read_text())
    assert summary["evaluation"]["overlap_with_generator"] == 0


# --- findings 3: a transfer is recorded ----------------------------------------------------------------

def test_a_transfer_is_recorded_in_the_summary(finished, tmp_path):
    shutil.copytree(finished / "data", tmp_path / "data")
    rt = tmp_path / "data" / "rotten_tomatoes"
    shutil.copytree(tmp_path / "data" / "sst2", rt)
    cfg = _cfg(tmp_path, "task=rotten_tomatoes", "stages=[evaluate]", "evaluate.train_on=synthetic",
               f"data.synthetic_from={finished / 'job'}", "data.transfer=true", "evaluate.seeds=[0]")
    summary = pipeline.run_job(cfg, tmp_path / "job")
    transfer = summary["evaluation"]["transfer"]
    assert transfer["from"] == str((finished / "job").resolve())
    assert any(d.startswith("task.name") for d in transfer["differs"])


# --- under privacy=dp a rebuild never makes a new release ---------------------------------------------

@pytest.mark.slow
def test_under_dp_synthetic_texts_are_rebuilt_only_from_the_cached_release(tmp_path):
    from gradmm.privacy import ledger

    _data(tmp_path / "data")
    cfg = _cfg(tmp_path, "privacy=dp", "privacy.delta=1e-3", "stages=[generate]")
    job = tmp_path / "job"
    pipeline.run_job(cfg, job)
    made = (job / "synthetic.jsonl").read_bytes()
    (job / "synthetic.jsonl").unlink()
    pipeline.run_job(cfg, job)
    assert (job / "synthetic.jsonl").read_bytes() == made
    releases = ledger.read(tmp_path / "targets")
    for entry in (tmp_path / "targets").glob("*.pt"):
        entry.unlink()
    (job / "synthetic.jsonl").unlink()
    with pytest.raises(RuntimeError, match=f"{job / 'synthetic.jsonl'} cannot be made again"):
        pipeline.run_job(cfg, job)
    assert ledger.read(tmp_path / "targets") == releases, "no new release was made"
