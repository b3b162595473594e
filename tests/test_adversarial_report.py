"""Adversarial: one unreadable job never aborts the comparison report (issue 15, finding 10). The broken
job is listed as broken with its path, the file and what is wrong with it; the others render in full,
and the report changes no job's files."""

import json

import pytest
from test_report import RHOS, _job

from gradmm.reporting import report


def _truncate(path):
    """Cut in the middle of a line: a crash while writing it."""
    data = path.read_bytes()
    cut = len(data) // 2
    path.write_bytes(data[: cut - 2 if data[cut - 1:cut] == b"\n" else cut])


def _append(text):
    return lambda path: path.write_bytes(path.read_bytes() + text.encode())


def _replace(data: bytes):
    return lambda path: path.write_bytes(data)


# (file of the middle job, how it is broken, what the report must say about it)
BREAKAGES = {
    "truncated summary": ("summary.json", _truncate, "summary.json: "),
    "summary a list": ("summary.json", _replace(b"[1, 2]"), "holds a list, not a mapping"),
    "summary a number": ("summary.json", _replace(b"3"), "holds a int, not a mapping"),
    "summary empty": ("summary.json", _replace(b""), "summary.json: Expecting value"),
    "summary not utf-8": ("summary.json", _replace(b'{"accuracy": "\xff\xfe"}'), "codec can't decode"),
    "metrics broken line": ("metrics.jsonl", _append('{"class": 0, "outer_st\n'), "line 17"),
    "metrics line a list": ("metrics.jsonl", _append("[1, 2]\n"), "line 17: holds a list"),
    "metrics truncated": ("metrics.jsonl", _truncate, "metrics.jsonl: line "),
    "metrics not utf-8": ("metrics.jsonl", _replace(b"\xff\n"), "codec can't decode"),
    "config bad yaml": ("config.yaml", _replace(b"seed: [1, 2\n"), "config.yaml: "),
    "config a list": ("config.yaml", _replace(b"- 1\n- 2\n"), "holds a list, not a mapping"),
    "config empty": ("config.yaml", _replace(b""), "config.yaml: holds no job config (no seed, task, model)"),
    "config a scalar": ("config.yaml", _replace(b"just words\n"), "holds no job config"),
    "error truncated": ("error.json", _replace(b'{"error": "Runti'), "error.json: "),
    "error a string": ("error.json", _replace(b'"oops"'), "holds a str, not a mapping"),
    "texts truncated": ("synthetic.jsonl", _truncate, "synthetic.jsonl: "),
    "text missing": ("synthetic.jsonl", _append('{"label": 0, "grad_distance": 0.1}\n'),
                     "row 11 lacks a string text"),
    "label a string": ("synthetic.jsonl", _append('{"text": "x", "label": "0"}\n'), "row 11 lacks"),
    "grad distance a string": ("synthetic.jsonl", _append('{"text": "x", "label": 0, "grad_distance": "a"}\n'),
                               "numeric grad_distance"),
    "filtered texts broken": ("synthetic_filtered.jsonl", _replace(b"{\n"), "synthetic_filtered.jsonl: line 1"),
}


@pytest.mark.parametrize("name", BREAKAGES)
def test_a_broken_job_is_listed_with_its_path_and_the_rest_render(name, tmp_path, capsys):
    jobs = [_job(tmp_path, rho) for rho in RHOS]
    file, breaks, message = BREAKAGES[name]
    broken = jobs[1] / file
    if not broken.exists():
        broken.write_text("{}")
    breaks(broken)
    before = {p: p.read_bytes() for job in jobs for p in job.rglob("*") if p.is_file()}

    page = report.build_report([tmp_path / "runs"], tmp_path / "report.html").read_text()

    loaded = report.load_job(jobs[1], 3)
    assert loaded.status == "broken"
    assert any(problem.startswith(str(broken)) and message in problem for problem in loaded.broken), loaded.broken
    assert "<tr class='broken'>" in page and f"broken: {report.html.escape(str(broken))}" in page
    assert "2 done, 1 broken" in page
    # The others in full: their rows, figures and texts.
    for job, rho in ((jobs[0], RHOS[0]), (jobs[2], RHOS[2])):
        assert str(job) in page and f"{0.5 + rho / 4:.4f}" in page and f"&lt;b&gt;rho {rho}&lt;/b&gt;" in page
    assert str(broken) in capsys.readouterr().err
    assert before == {p: p.read_bytes() for job in jobs for p in job.rglob("*") if p.is_file()}, "nothing lost"


ODD_BUT_READABLE = {
    "random baseline a list": {"random_baseline": [1, 2]},
    "accuracy a string": {"accuracy": "high"},
    "figures NaN": {"accuracy": float("nan"), "grad_distance_set": float("inf")},
    "no figures at all": {"n_synthetic": 0},
}


@pytest.mark.parametrize("name", ODD_BUT_READABLE)
def test_odd_values_in_a_readable_summary_render_as_they_are(name, tmp_path):
    jobs = [_job(tmp_path, rho) for rho in RHOS]
    summary = json.loads((jobs[1] / "summary.json").read_text())
    (jobs[1] / "summary.json").write_text(json.dumps({**summary, **ODD_BUT_READABLE[name]}))
    page = report.build_report([tmp_path / "runs"], tmp_path / "report.html").read_text()
    assert "3 done" in page and all(str(job) in page for job in jobs)


def test_non_numeric_metrics_are_left_out_of_the_curve_not_averaged():
    steps, values = report.curve([{"outer_step": 0, "grad_distance_z": 1.0},
                                  {"outer_step": 0, "grad_distance_z": "nan"},
                                  {"outer_step": "1", "grad_distance_z": 2.0}], "grad_distance_z")
    assert (steps, values) == ([0], [1.0])


def test_only_broken_jobs_still_give_a_page_that_names_them(tmp_path):
    jobs = [_job(tmp_path, rho) for rho in RHOS]
    for job in jobs:
        (job / "config.yaml").write_text("- not a config\n")
    page = report.build_report([tmp_path / "runs"], tmp_path / "report.html").read_text()
    assert "3 broken" in page and all(str(job / "config.yaml") in page for job in jobs)
