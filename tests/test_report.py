"""The comparison report, built from job directories written by hand in the layout run_job uses."""

import json
import random
import re
from pathlib import Path

import pytest
from conftest import TINY, compose_config
from omegaconf import OmegaConf

from gradmm.reporting import report
from gradmm.runs.files import write_json, write_jsonl
from gradmm.runs.manifest import code_version

RHOS = (0.1, 0.5, 1.0)


def _job(root: Path, rho: float, *, finished: bool = True, failed: bool = False, seed: int = 0,
         outer_steps: int | None = None) -> Path:
    """A job directory with rounds' metrics for 2 classes x 2 rounds, texts and a summary."""
    steps = [] if outer_steps is None else [f"admm.outer_steps={outer_steps}"]
    cfg = compose_config([*TINY, f"admm.rho={rho}", *steps, f"paths.output_root={root}"])
    path = root / "runs" / "sst2" / (f"job-rho{rho}" + ("" if outer_steps is None else f"-steps{outer_steps}"))
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (path / ".hydra").mkdir()
    (path / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    rng = random.Random(seed + int(rho * 10))
    write_jsonl(path / "metrics.jsonl", [
        {"class": k, "round": r, "outer_step": s, "grad_distance_z": rng.random(),
         "log_ppl_z": 5 + rng.random()}
        for k in range(2) for r in range(2) for s in range(4)
    ])
    texts = [{"text": f"<b>rho {rho}</b> class {k} text {i}", "label": k, "label_name": f"class{k}",
              "round": 0, "grad_distance": rng.random(), "log_ppl": 6.0} for k in range(2) for i in range(5)]
    write_jsonl(path / "synthetic.jsonl", texts)
    if finished:
        write_json(path / "summary.json", {
            "n_synthetic": 10, "grad_distance_set": 0.1 / rho, "grad_distance_mean": 0.2 / rho,
            "log_ppl_mean": 6 + rho, "accuracy": 0.5 + rho / 4, "seconds": 12.0,
            "cpu_seconds": 20.0 + rho,
            "random_baseline": {"grad_distance_set": 0.15},
        })
    if failed:
        write_json(path / "error.json", {"error": "RuntimeError('CUDA out of memory')", "traceback": None,
                                         "overrides": [f"admm.rho={rho}"]})
    return path


@pytest.fixture
def sweep(tmp_path) -> list[Path]:
    return [_job(tmp_path, rho) for rho in RHOS]


def test_report_lists_every_run_with_what_differs_and_the_plots(sweep, tmp_path):
    output = report.build_report([tmp_path / "runs"], tmp_path / "report.html")
    page = output.read_text()
    assert all(str(job) in page for job in sweep)
    # Hydra's own copy of the config under .hydra/ is not a run.
    assert ".hydra" not in page
    jobs = [report.load_job(job, 3) for job in sweep]
    assert report.differing_keys(jobs) == ["admm.rho"]
    # Two per-step panels in one figure, accuracy against loss and seconds in one, one figure of final
    # figures against admm.rho.
    assert page.count("<svg") == 3
    assert "Accuracy against matching loss and generation time" in page
    assert "<h3>admm.rho</h3>" in page
    # Each run's final figures are in the table.
    for rho in RHOS:
        assert f"{0.1 / rho:.4f}" in page and f"{0.5 + rho / 4:.4f}" in page


def test_tradeoff_points_are_each_finished_jobs_accuracy_against_its_loss_and_seconds(tmp_path):
    jobs = [_job(tmp_path, rho) for rho in RHOS] + [_job(tmp_path, 7.0, finished=False)]
    loaded = [report.load_job(job, 3) for job in jobs]
    for job in loaded:
        job.label = job.path.name
    by_loss = report.tradeoff_points(loaded, "grad_distance_set")
    assert sorted(by_loss) == sorted((f"job-rho{rho}", 0.1 / rho, 0.5 + rho / 4, None) for rho in RHOS)
    assert sorted(x for _, x, _, _ in report.tradeoff_points(loaded, "cpu_seconds")) == [20.0 + r for r in RHOS]


def test_the_tradeoff_figure_is_written_alone_for_a_readme(sweep, tmp_path):
    figure = tmp_path / "figures" / "budget.svg"
    report.main([str(tmp_path / "runs"), "--tradeoff-svg", str(figure)])
    text = figure.read_text()
    assert text.count("<svg") == 1 and "generation CPU seconds" in text
    # Drawn again from the same jobs, the committed figure does not change.
    report.main([str(tmp_path / "runs"), "--tradeoff-svg", str(figure)])
    assert figure.read_text() == text
    assert all(f"admm.rho={rho:g}" in text for rho in RHOS)


def test_a_budget_sweep_is_drawn_as_a_line_per_rho_through_its_outer_steps(tmp_path):
    # Directory names sort against the budget (steps10 before steps2), so the order is the config's.
    for rho in (1.0, 0.1):
        for steps in (10, 0, 2):
            _job(tmp_path, rho, outer_steps=steps)
    jobs = [report.load_job(path, 3) for path in sorted((tmp_path / "runs" / "sst2").iterdir())]
    line_key, point_keys, lines = report.tradeoff_lines(jobs)
    assert (line_key, point_keys) == ("admm.rho", ["admm.outer_steps"])
    assert [value for value, _ in lines] == [0.1, 1.0]
    assert [[job.config["admm.outer_steps"] for job in members] for _, members in lines] == [[0, 2, 10]] * 2
    figure = tmp_path / "budget.svg"
    report.main([str(tmp_path / "runs"), "--tradeoff-svg", str(figure)])
    text = figure.read_text()
    # The legend names the lines; each point is labelled by its budget alone.
    assert "admm.rho" in text and "admm.rho=0.1" not in text
    assert all(f"admm.outer_steps={steps}" in text for steps in (0, 2, 10))


def test_the_runs_table_is_written_as_markdown_one_sorted_row_per_job(tmp_path):
    for rho in (1.0, 0.1, 2.0):
        _job(tmp_path, rho)
    _job(tmp_path, 10.0, finished=False)  # its directory sorts before rho 2's, its value after
    table = tmp_path / "table.md"
    report.main([str(tmp_path / "runs"), "--markdown", str(table)])
    lines = table.read_text().splitlines()
    assert lines[0].startswith(f"Made by `python -m gradmm.reporting.report {tmp_path / 'runs'} --markdown")
    assert f"at code {code_version()} on " in lines[0]
    rows = [line.split(" | ") for line in lines[4:]]
    assert [row[0] for row in rows] == ["| 0.1", "| 1", "| 2", "| 10"]
    assert [row[2] for row in rows] == ["done", "done", "done", "unfinished"]
    assert rows[0][3] == f"{0.1 / 0.1:.4f}" and rows[0][6] == f"{100 * (0.5 + 0.1 / 4):.1f} +- 0.0"
    assert rows[3][6] == "-"


def test_no_tradeoff_figure_from_unfinished_jobs_is_an_error_naming_the_file(tmp_path):
    _job(tmp_path, 0.1, finished=False)
    with pytest.raises(SystemExit, match="budget.svg"):
        report.main([str(tmp_path / "runs"), "--tradeoff-svg", str(tmp_path / "budget.svg")])


def test_report_is_self_contained(sweep, tmp_path):
    page = report.build_report([tmp_path], tmp_path / "report.html").read_text()
    assert "<script" not in page and "<link" not in page and " src=" not in page
    assert all(href.startswith("#") for href in re.findall(r'href="([^"]*)"', page))


def test_report_shows_the_best_texts_of_each_class_escaped(sweep, tmp_path):
    page = report.build_report([tmp_path], tmp_path / "report.html", n_texts=2).read_text()
    assert "<b>rho" not in page
    for job in sweep:
        rows = [json.loads(line) for line in (job / "synthetic.jsonl").read_text().splitlines()]
        for k in range(2):
            ranked = sorted((r for r in rows if r["label"] == k), key=lambda r: r["grad_distance"])
            assert all(report.html.escape(r["text"]) in page for r in ranked[:2])
            assert all(report.html.escape(r["text"]) not in page for r in ranked[2:])


def test_curve_is_the_mean_over_classes_and_rounds_per_outer_step(sweep):
    metrics = [json.loads(line) for line in (sweep[0] / "metrics.jsonl").read_text().splitlines()]
    steps, values = report.curve(metrics, "grad_distance_z")
    assert steps == [0, 1, 2, 3]
    for step, value in zip(steps, values, strict=True):
        at_step = [m["grad_distance_z"] for m in metrics if m["outer_step"] == step]
        assert value == pytest.approx(sum(at_step) / len(at_step))


def test_failed_and_unfinished_runs_are_listed_with_what_they_have(tmp_path):
    _job(tmp_path, 0.1)
    failed = _job(tmp_path, 0.5, finished=False, failed=True)
    unfinished = _job(tmp_path, 1.0, finished=False)
    page = report.build_report([tmp_path], tmp_path / "report.html").read_text()
    assert "failed: RuntimeError(&#x27;CUDA out of memory&#x27;)" in page
    assert "<tr class='unfinished'>" in page and str(unfinished) in page and str(failed) in page
    assert "1 done, 1 unfinished, 1 failed" in page


def test_command_line_takes_run_directories_and_writes_beside_the_first(sweep, tmp_path, capsys):
    report.main([str(sweep[0]), str(sweep[2])])
    page = (sweep[0] / "report.html").read_text()
    assert str(sweep[0]) in page and str(sweep[2]) in page and str(sweep[1]) not in page
    assert "report.html" in capsys.readouterr().out


def test_no_runs_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no job directories"):
        report.build_report([tmp_path], tmp_path / "report.html")
    with pytest.raises(FileNotFoundError, match="missing"):
        report.build_report([tmp_path / "missing"], tmp_path / "report.html")
