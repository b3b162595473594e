"""The generate job end to end on the tiny model (seconds) and briefly on the embedded model."""

import datetime
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, TINY, compose_config, load_script

from gradmm.pipeline import run_job
from gradmm.runs.files import read_jsonl
from gradmm.runs.metrics import TEXT_SET_FIGURES
from gradmm.stages.generate import round_settings


def _check_outputs(out: Path, n_expected: int, outer_steps: int, n_classes: int = 2):
    rows = read_jsonl(out / "synthetic.jsonl")
    assert len(rows) == n_expected
    assert {"text", "label", "label_name", "grad_distance", "log_ppl", "round"} <= rows[0].keys()
    metrics = [m for m in read_jsonl(out / "metrics.jsonl") if "outer_step" in m]
    assert len(metrics) == (outer_steps + 1) * n_classes  # step 0 is the initialisation
    assert {"class", "round", "outer_step", "grad_distance_x", "grad_distance_z", "log_ppl_z",
            "primal_residual", "seconds"} <= metrics[0].keys()
    assert all(m["projection_seconds"] < m["seconds"] for m in metrics if m["outer_step"] > 0)
    summary = json.loads((out / "summary.json").read_text())
    for key in ("n_synthetic", *(m.key for m in TEXT_SET_FIGURES), "seconds"):
        assert key in summary
    assert 0 < summary["cpu_seconds"]
    assert set(summary["random_baseline"]) == {m.key for m in TEXT_SET_FIGURES}
    assert summary["n_synthetic"] == n_expected
    assert (out / "config.yaml").is_file()
    return rows, summary


@pytest.mark.slow
@pytest.mark.parametrize("projector", ["nearest", "topk_lm", "matching_lm"])
def test_generate_on_tiny_model(tmp_path, projector):
    cfg = compose_config([*TINY, f"projector={projector}", f"paths.output_root={tmp_path}"])
    assert type(round_settings(cfg)[2]).__name__.lower() == projector.replace("_", "")
    summary = run_job(cfg, tmp_path)
    _, written = _check_outputs(tmp_path, 8, cfg.admm.outer_steps)
    assert written == summary


@pytest.mark.slow
def test_each_stage_records_the_command_code_and_time_that_made_it(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["run.py", "stages=[generate]"])
    first = run_job(compose_config([*TINY, f"paths.output_root={tmp_path}", "stages=[generate]"]), tmp_path)
    made = first["made_by"]["generate"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert made["command"] == "run.py 'stages=[generate]'" and made["code_version"].startswith(head)
    assert datetime.datetime.fromisoformat(made["finished"]).tzinfo is not None
    monkeypatch.setattr(sys, "argv", ["run.py", "stages=[generate,filter]"])
    resumed = run_job(compose_config([*TINY, f"paths.output_root={tmp_path}", "stages=[generate,filter]"]), tmp_path)
    # Resumed: generation is still the first run's, the filter is this one's.
    assert resumed["made_by"]["generate"] == made
    assert resumed["made_by"]["filter"]["command"] == "run.py 'stages=[generate,filter]'"
    assert json.loads((tmp_path / "summary.json").read_text())["made_by"] == resumed["made_by"]


@pytest.mark.slow
def test_cli_multirun_on_tiny_model(tmp_path):
    result = subprocess.run(
        [sys.executable, "run.py", "-m", *TINY, "admm.rho=0.1,1", f"paths.output_root={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = sorted(tmp_path.rglob("summary.json"))
    assert len(summaries) == 2


@pytest.mark.slow
def test_short_run_on_embedded_model(tmp_path):
    result = subprocess.run(
        [sys.executable, "run.py", "tracker=disabled", "stages=[generate]", "admm.outer_steps=2", "admm.inner_steps=2",
         "generation.batch_size=4", "generation.seq_len=8", "generation.n_real=10",
         f"paths.output_root={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Outputs in" in result.stdout
    (summary_path,) = tmp_path.rglob("summary.json")
    rows, summary = _check_outputs(summary_path.parent, 8, 2)
    assert summary["log_ppl_mean"] < summary["random_baseline"]["log_ppl_mean"]


@pytest.mark.slow
def test_union_term_changes_what_generation_optimises(tiny_cfg, tmp_path):
    """With union_weight the rounds optimise another loss from the same start: other tokens, and the
    recorded step-0 loss is the class distance plus the union term, so it can only grow."""
    tiny_cfg.matching.union_weight = 0.0
    plain = run_job(tiny_cfg, tmp_path / "plain")
    tiny_cfg.matching.union_weight = 2.0
    union = run_job(tiny_cfg, tmp_path / "union")
    assert union["n_synthetic"] == plain["n_synthetic"]
    metrics = {name: [m for m in read_jsonl(tmp_path / name / "metrics.jsonl") if m["outer_step"] == 0]
               for name in ("plain", "union")}
    for before, after in zip(metrics["plain"], metrics["union"], strict=True):
        assert after["grad_distance_z"] > before["grad_distance_z"]
    texts = {name: [r["text"] for r in read_jsonl(tmp_path / name / "synthetic.jsonl")] for name in ("plain", "union")}
    assert texts["plain"] != texts["union"]


@pytest.mark.slow
def test_rounds_batched_side_by_side_follow_the_same_path_as_alone(tiny_cfg, tmp_path):
    """Batches of 3 rounds (one of them mixing the classes, the last one short) give each round the
    tokens and losses it gets alone: their losses, clipping and best iterates are kept apart."""
    tiny_cfg.model.dtype = "float64"  # so that a larger batch's float rounding cannot flip a token
    tiny_cfg.generation.rounds = 2
    alone = run_job(tiny_cfg, tmp_path / "alone")
    tiny_cfg.generation.rounds_per_batch = 3
    batched = run_job(tiny_cfg, tmp_path / "batched")
    assert read_jsonl(tmp_path / "batched" / "synthetic.jsonl") == read_jsonl(tmp_path / "alone" / "synthetic.jsonl")
    assert batched["grad_distance_set"] == pytest.approx(alone["grad_distance_set"], rel=1e-9)
    steps = {name: read_jsonl(tmp_path / name / "metrics.jsonl") for name in ("alone", "batched")}
    assert [(m["class"], m["round"], m["outer_step"]) for m in steps["batched"]] == \
        [(m["class"], m["round"], m["outer_step"]) for m in steps["alone"]]
    for a, b in zip(steps["alone"], steps["batched"], strict=True):
        for key in ("grad_distance_x", "grad_distance_z", "log_ppl_z", "primal_residual"):
            assert b[key] == pytest.approx(a[key], rel=1e-9, abs=1e-12), key
    assert sorted(p.name for p in (tmp_path / "batched" / "rounds").iterdir()) == \
        ["class0_round0.json", "class0_round1.json", "class1_round0.json", "class1_round1.json"]


@pytest.mark.slow
def test_full_vocab_loss_and_l2_distance_run_end_to_end(tiny_cfg, tmp_path):
    tiny_cfg.matching.loss = "full_vocab"
    tiny_cfg.matching.distance = "l2"
    summary = run_job(tiny_cfg, tmp_path)
    assert summary["n_synthetic"] == 8


def test_topk_beyond_the_allowed_vocabulary_is_rejected_before_the_model_loads(tiny_cfg, monkeypatch):
    import gradmm.pipeline as pipeline
    from gradmm.config.validation import ConfigError

    monkeypatch.setattr(pipeline, "load_lm", lambda *a, **k: pytest.fail("model loaded"))
    tiny_cfg.projector.topk = 10_000_000
    with pytest.raises(ConfigError, match="projector.topk=10000000"):
        pipeline.run_job(tiny_cfg, Path(tiny_cfg.paths.output_root))


@pytest.mark.slow
def test_the_tracker_finishes_with_a_failure_code_when_a_stage_fails(tiny_cfg, tmp_path, monkeypatch):
    import gradmm.pipeline as pipeline
    from gradmm.reporting.tracking import Tracker

    codes = []
    monkeypatch.setattr(Tracker, "finish", lambda self, exit_code=0: codes.append(exit_code))
    run_job(tiny_cfg, tmp_path / "fine")
    assert codes == [0]

    def broken_filter(*args, **kwargs):
        raise RuntimeError("filter broke")

    monkeypatch.setattr(pipeline, "filter_stage", broken_filter)
    tiny_cfg.stages = ["generate", "filter"]
    with pytest.raises(RuntimeError, match="filter broke"):
        run_job(tiny_cfg, tmp_path / "broken")
    assert codes == [0, 1]


@pytest.mark.slow
def test_same_generation_tells_identical_jobs_from_changed_ones(tmp_path, capsys):
    same = load_script("experiments/same_generation.py")
    cfg = compose_config([*TINY, "stages=[generate]"])
    run_job(cfg, tmp_path / "old")
    run_job(cfg, tmp_path / "new")
    assert same.main([str(tmp_path / "old"), str(tmp_path / "new")]) == 0
    out = capsys.readouterr().out
    assert "texts: 8 of 8 identical" in out and "outer steps grad_distance_z: largest difference 0" in out
    rows = read_jsonl(tmp_path / "new" / "synthetic.jsonl")
    rows[3] = {**rows[3], "text": "something else", "grad_distance": rows[3]["grad_distance"] + 0.5}
    (tmp_path / "new" / "synthetic.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert same.main([str(tmp_path / "old"), str(tmp_path / "new")]) == 1
    out = capsys.readouterr().out
    assert "texts: 7 of 8 identical" in out and "row 3:" in out and "texts grad_distance: largest difference 0.5" in out
