"""One self-contained HTML page comparing job directories (a sweep, or any runs side by side).

    python -m gradmm.reporting.report outputs/runs/sst2            # every job below it
    python -m gradmm.reporting.report RUN_DIR RUN_DIR ... -o cmp.html
    make compare RUNS="outputs/runs/sst2"
    python -m gradmm.reporting.report DIR --markdown results.md --tradeoff-svg budget.svg   # for a README

A job directory is one holding the config.yaml that run_job writes (Hydra's own copy under .hydra/ is
not one). The page needs no network and no W&B account: plots are inline SVG drawn by matplotlib.
It shows the config keys that differ between the runs, their final figures (summary.json), the
gradient distance per outer step (metrics.jsonl), accuracy against the matching loss and the generation's
CPU seconds (what a budget sweep buys), the final figures against each differing key, and a few synthetic
texts per run. Unfinished and failed jobs (error.json, from gradmm.runs.sweeps) are listed
with what they have.
"""

from __future__ import annotations

import argparse
import datetime
import html
import io
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.figure import Figure

from gradmm.runs import files
from gradmm.runs.identity import is_science_key
from gradmm.runs.job_directory import Job, find_jobs, load_job, numeric
from gradmm.runs.manifest import code_version
from gradmm.runs.metrics import OBJECTIVES

# Final figures: (summary.json key, column title, better when lower).
FIGURES = tuple((m.key, m.title, m.lower_is_better) for m in OBJECTIVES)
CURVES = (("grad_distance_z", "gradient distance of the projected tokens"), ("log_ppl_z", "log-perplexity"))


def distinct_values(jobs: list[Job], key: str) -> int:
    return len({json.dumps(job.config.get(key), sort_keys=True) for job in jobs})


def differing_keys(jobs: list[Job]) -> list[str]:
    jobs = [job for job in jobs if job.config]  # a job whose config.yaml is unreadable differs in nothing
    keys = sorted({k for job in jobs for k in job.config if is_science_key(k)})
    return [k for k in keys if distinct_values(jobs, k) > 1]


def _label(job: Job, keys: list[str]) -> str:
    return ", ".join(f"{k}={_fmt(job.config.get(k))}" for k in keys) or job.path.name


def curve(metrics: list[dict], key: str) -> tuple[list[int], list[float]]:
    """The mean of `key` over classes and rounds at each outer step."""
    per_step = defaultdict(list)
    for record in metrics:
        if numeric([record.get(key), record.get("outer_step")]):
            per_step[record["outer_step"]].append(record[key])
    steps = sorted(per_step)
    return steps, [sum(per_step[s]) / len(per_step[s]) for s in steps]


def _svg(fig: Figure) -> str:
    """The figure as inline SVG, the same bytes for the same data: no date, element ids from a fixed salt,
    so that a committed figure changes only when its numbers do."""
    buf = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": "gradmm"}):
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    text = buf.getvalue()
    return text[text.index("<svg"):]


def curves_plot(jobs: list[Job]) -> str | None:
    drawn = [job for job in jobs if job.metrics]
    if not drawn:
        return None
    fig = Figure(figsize=(5.2 * len(CURVES), 3.6))
    for ax, (key, title) in zip(fig.subplots(1, len(CURVES)), CURVES, strict=True):
        for job in drawn:
            steps, values = curve(job.metrics, key)
            ax.plot(steps, values, marker="o", markersize=3, label=job.label)
        ax.set(title=title, xlabel="outer step (0: initialisation)",
               ylabel=f"{key}, mean over classes and rounds")
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize=7)
    return _svg(fig)


def key_plot(jobs: list[Job], key: str, alone: bool) -> str | None:
    """Each final figure against `key`; points are joined only when `key` is the one key that differs."""
    figures = [(k, t) for k, t, _ in FIGURES if any(isinstance(j.summary.get(k), (int, float)) for j in jobs)]
    done = [job for job in jobs if job.status == "done"]
    if not figures or not done:
        return None
    values = [job.config.get(key) for job in done]
    is_numeric = numeric(values)
    categories = sorted({_fmt(v) for v in values})
    fig = Figure(figsize=(3.6 * len(figures), 3.2))
    for ax, (metric, title) in zip(fig.subplots(1, len(figures), squeeze=False)[0], figures, strict=True):
        points = sorted(
            (v if is_numeric else categories.index(_fmt(v)), job.summary[metric])
            for v, job in zip(values, done, strict=True) if isinstance(job.summary.get(metric), (int, float))
        )
        if not points:
            ax.set_visible(False)
            continue
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker="o", linestyle="-" if alone else "none")
        if is_numeric and min(xs) > 0 and max(xs) / min(xs) >= 20:
            ax.set_xscale("log")
        if not is_numeric:
            ax.set_xticks(range(len(categories)), categories, rotation=30, ha="right", fontsize=7)
        ax.set(title=title, xlabel=key)
        ax.grid(alpha=0.3)
    return _svg(fig)


# What a budget buys: accuracy against what the generation reached and what it cost (summary.json keys).
# CPU seconds, not wall seconds: a sweep's jobs share the machine, which stretches their wall time alike.
TRADEOFF_AXES = (("grad_distance_set", "matching loss of the set (grad distance)"),
                 ("cpu_seconds", "generation CPU seconds (all threads)"))


def tradeoff_point(job: Job, key: str) -> tuple[float, float, float | None] | None:
    """(summary[key], accuracy, accuracy_std) of a finished job that has both figures, else None."""
    s = job.summary
    if job.status != "done" or not numeric([s.get(key), s.get("accuracy")]):
        return None
    std = s.get("accuracy_std")
    return s[key], s["accuracy"], std if numeric([std]) else None


def tradeoff_points(jobs: list[Job], key: str) -> list[tuple[str, float, float, float | None]]:
    """(label, summary[key], accuracy, accuracy_std) of each finished job that has both figures."""
    return [(job.label, *point) for job in jobs if (point := tradeoff_point(job, key)) is not None]


def tradeoff_lines(jobs: list[Job]) -> tuple[str | None, list[str], list[tuple[Any, list[Job]]]]:
    """How a sweep's jobs are joined in the budget figure: one line per value of the differing key with
    the fewest values (a budget sweep's rho) when two or more keys differ, else one line; along a line,
    jobs in the order of the other differing keys (its budget: 0, 2, 4 outer steps), which label them.
    Returns (the key the lines stand for or None, the keys that label points, [(value, jobs)])."""
    keys = differing_keys(jobs)
    line_key = min(keys, key=lambda k: (distinct_values(jobs, k), k)) if len(keys) >= 2 else None
    point_keys = [k for k in keys if k != line_key]
    lines: dict[str, tuple[Any, list[Job]]] = {}
    for job in jobs:
        value = job.config.get(line_key) if line_key else None
        lines.setdefault(json.dumps(value, sort_keys=True), (value, []))[1].append(job)
    ordered = sorted(lines.values(), key=lambda line: _sort_key(line[0]))
    for _, members in ordered:
        members.sort(key=lambda j: [_sort_key(j.config.get(k)) for k in point_keys] + [str(j.path)])
    return line_key, point_keys, ordered


def tradeoff_plot(jobs: list[Job]) -> str | None:
    """Accuracy (+- its std over training seeds) against the matching loss and against the generation's
    CPU seconds, a line per tradeoff_lines series through its finished jobs: the figure a budget sweep
    is read from."""
    panels = [(key, title) for key, title in TRADEOFF_AXES if len(tradeoff_points(jobs, key)) >= 2]
    if not panels:
        return None
    line_key, point_keys, lines = tradeoff_lines(jobs)
    fig = Figure(figsize=(5.6 * len(panels), 4.2))
    axes = fig.subplots(1, len(panels), squeeze=False, gridspec_kw={"wspace": 0.4})[0]
    for ax, (key, title) in zip(axes, panels, strict=True):
        drawn = [(value, [(job, point) for job in members if (point := tradeoff_point(job, key))])
                 for value, members in lines]
        xs = [x for _, points in drawn for _, (x, _, _) in points]
        ys = [y for _, points in drawn for _, (_, y, _) in points]
        near = (0.03 * ((max(xs) - min(xs)) or 1.0), 0.03 * ((max(ys) - min(ys)) or 1.0))
        placed: list[tuple[str, float, float]] = []
        for value, points in drawn:
            if not points:
                continue
            ax.errorbar([x for _, (x, _, _) in points], [y for _, (_, y, _) in points],
                        yerr=[std or 0.0 for _, (_, _, std) in points], marker="o", capsize=3,
                        label=_fmt(value) if line_key else None)
            for job, (x, y, _) in points:
                text = ", ".join(f"{k}={_fmt(job.config.get(k))}" for k in point_keys) or job.label
                # One label for jobs that landed on (nearly) the same point with the same label: jobs
                # that made the same texts, like a budget sweep's selection at every rho.
                if any(t == text and abs(x - px) < near[0] and abs(y - py) < near[1] for t, px, py in placed):
                    continue
                placed.append((text, x, y))
                ax.annotate(text, (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
        ax.set(xlabel=title, ylabel="accuracy (mean +- std over seeds)")
        ax.margins(x=0.2)  # room for the labels of the rightmost points inside their own panel
        ax.grid(alpha=0.3)
        if line_key:
            ax.legend(title=line_key, fontsize=7, title_fontsize=7)
    return _svg(fig)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def _cell(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape("" if value is None else _fmt(value))


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; font-size: 13px; margin-bottom: 1.5em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f2f2f2; } td.l, th.l { text-align: left; }
tr.failed td, tr.broken td { background: #fde8e8; } tr.unfinished td { background: #fff7dd; }
td.best { font-weight: bold; } svg { max-width: 100%; height: auto; }
.text { font-family: ui-monospace, monospace; font-size: 12px; }
"""


def build_html(jobs: list[Job], title: str) -> str:
    keys = differing_keys(jobs)
    for job in jobs:
        job.label = _label(job, keys)
    labels = [job.label for job in jobs]
    for job in jobs:
        if labels.count(job.label) > 1:
            job.label = f"{job.label} ({job.path.name})"
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    counts = {s: sum(j.status == s for j in jobs) for s in ("done", "unfinished", "failed", "broken")}
    parts.append(f"<p>{len(jobs)} runs: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + ". "
                 f"Keys that differ: {html.escape(', '.join(keys) or 'none')}.</p>")
    parts.append(_table(jobs, keys))
    plot = curves_plot(jobs)
    if plot:
        parts += ["<h2>Per outer step</h2>", plot]
    tradeoff = tradeoff_plot(jobs)
    if tradeoff:
        parts += ["<h2>Accuracy against matching loss and generation time</h2>", tradeoff]
    key_plots = [(key, key_plot(jobs, key, alone=len(keys) == 1)) for key in keys]
    if any(svg for _, svg in key_plots):
        parts.append("<h2>Final figures against each differing key</h2>")
        parts += [f"<h3>{html.escape(key)}</h3>{svg}" for key, svg in key_plots if svg]
    parts.append("<h2>Synthetic texts (lowest gradient distance per class)</h2>")
    for job in jobs:
        parts.append(f"<h3>{html.escape(job.label)}</h3>")
        parts += [f"<p>unreadable: {html.escape(problem)}</p>" for problem in job.broken]
        if job.error is not None:
            parts.append(f"<p>failed: {html.escape(str(job.error.get('error')))}</p>")
        if not job.texts:
            parts.append("<p>no synthetic texts</p>")
            continue
        rows = "".join(
            f"<tr><td class='l'>{html.escape(str(r.get('label_name', r['label'])))}</td>"
            f"<td>{_cell(r.get('grad_distance'))}</td><td>{_cell(r.get('log_ppl'), 2)}</td>"
            f"<td class='l text'>{html.escape(r['text'])}</td></tr>"
            for r in job.texts
        )
        parts.append("<table><tr><th class='l'>class</th><th>grad distance</th><th>log-ppl</th>"
                     f"<th class='l'>text</th></tr>{rows}</table>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _table(jobs: list[Job], keys: list[str]) -> str:
    figures = [(k, t, low) for k, t, low in FIGURES if any(k in j.summary for j in jobs)]
    best = {}
    for key, _, low in figures:
        values = [j.summary[key] for j in jobs if isinstance(j.summary.get(key), (int, float))
                  and not math.isnan(j.summary[key])]
        if values:
            best[key] = min(values) if low else max(values)
    head = ("<tr><th class='l'>run</th><th class='l'>status</th>"
            + "".join(f"<th>{html.escape(k)}</th>" for k in keys)
            + "".join(f"<th>{html.escape(t)}</th>" for _, t, _ in figures)
            + "<th>random tokens: grad distance (set)</th><th>synthetic</th><th>seconds</th></tr>")
    rows = []
    for job in jobs:
        s = job.summary
        status = job.status if job.error is None else f"failed: {job.error.get('error')}"
        status = f"broken: {'; '.join(job.broken)}" if job.broken else status
        cells = [f"<td class='l'>{html.escape(str(job.path))}</td><td class='l'>{html.escape(status)}</td>"]
        cells += [f"<td>{_cell(job.config.get(k))}</td>" for k in keys]
        cells += [f"<td class='{'best' if k in best and s.get(k) == best[k] else ''}'>{_cell(s.get(k))}</td>"
                  for k, _, _ in figures]
        baseline = s.get("random_baseline")
        cells.append(f"<td>{_cell(baseline.get('grad_distance_set') if isinstance(baseline, dict) else None)}</td>")
        cells.append(f"<td>{_cell(s.get('n_synthetic'))}</td><td>{_cell(s.get('seconds'), 0)}</td>")
        rows.append(f"<tr class='{job.status}'>{''.join(cells)}</tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def markdown_table(jobs: list[Job], command: str) -> str:
    """The runs as a Markdown results table: what differs, the final figures, each seed's accuracy, the
    generation's CPU seconds, and which code made each job and when (its generate stage, or else its
    evaluate stage)."""
    keys = differing_keys(jobs)
    head = [*keys, "job", "status", "grad distance (set)", "log-ppl", "n_train", "accuracy (mean +- std)",
            "per seed", "generation CPU s", "code", "finished"]
    lines = [f"Made by `{command}` at code {code_version()} on {datetime.date.today().isoformat()}; each job's "
             "row names the code that generated it.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for job in sorted(jobs, key=lambda j: [_sort_key(j.config.get(k)) for k in keys]):
        s, evaluation = job.summary, job.summary.get("evaluation", {})
        made = s.get("made_by", {}).get("generate") or s.get("made_by", {}).get("evaluate") or {}
        accuracy = (f"{100 * s['accuracy']:.1f} +- {100 * s.get('accuracy_std', 0.0):.1f}"
                    if numeric([s.get("accuracy")]) else "-")
        per_seed = ", ".join(f"{100 * run['accuracy']:.1f}" for run in evaluation.get("runs", [])) or "-"
        cells = [_fmt(job.config.get(k)) for k in keys] + [
            job.path.name, job.status, _number(s.get("grad_distance_set"), 4), _number(s.get("log_ppl_mean"), 2),
            _number(evaluation.get("n_train"), 0), accuracy, per_seed, _number(s.get("cpu_seconds"), 0),
            str(made.get("code_version", "-"))[:12], str(made.get("finished", "-"))[:10]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _sort_key(value: Any) -> tuple:
    return (0, value, "") if numeric([value]) else (1, 0, json.dumps(value, sort_keys=True))


def _number(value: Any, digits: int) -> str:
    return f"{value:.{digits}f}" if numeric([value]) else "-"


def build_report(paths: list[Path], output: Path, n_texts: int = 3, title: str | None = None,
                 tradeoff_svg: Path | None = None, markdown: Path | None = None, command: str = "") -> Path:
    """The HTML page; with tradeoff_svg, also its accuracy-against-cost figure alone, and with markdown,
    its runs table as Markdown: for a README or a results file."""
    dirs = find_jobs(paths)
    if not dirs:
        raise SystemExit(f"no job directories (holding config.yaml) under {', '.join(map(str, paths))}")
    jobs = [load_job(d, n_texts) for d in dirs]
    for job in jobs:
        for problem in job.broken:
            print(f"report: broken job {job.path}: {problem}", file=sys.stderr)
    files.write_atomic(output, build_html(jobs, title or f"GRADMM runs: {', '.join(map(str, paths))}"))
    if tradeoff_svg is not None:
        figure = tradeoff_plot(jobs)
        if figure is None:
            raise SystemExit(f"no figure for {tradeoff_svg}: fewer than two finished jobs with an accuracy "
                             "and a matching loss or CPU seconds")
        files.write_atomic(tradeoff_svg, figure)
    if markdown is not None:
        files.write_atomic(markdown, markdown_table(jobs, command))
    return output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gradmm.reporting.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="job directories, or folders to search for them")
    parser.add_argument("-o", "--output", type=Path, help="the HTML file (default: DIRS[0]/report.html)")
    parser.add_argument("--texts", type=int, default=3, help="synthetic texts shown per class and run")
    parser.add_argument("--tradeoff-svg", type=Path,
                        help="also write the accuracy against matching loss and CPU seconds figure to this file")
    parser.add_argument("--markdown", type=Path, help="also write the runs table as Markdown to this file")
    args = parser.parse_args(argv)
    output = args.output or (args.dirs[0] if args.dirs[0].is_dir() else args.dirs[0].parent) / "report.html"
    command = " ".join(["python -m gradmm.reporting.report", *(argv if argv is not None else sys.argv[1:])])
    built = build_report(args.dirs, output, args.texts, tradeoff_svg=args.tradeoff_svg, markdown=args.markdown,
                         command=command)
    print(f"report: {built}")


if __name__ == "__main__":
    main()
