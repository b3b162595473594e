"""The CPU comparison of issue 3 on SST-2 with the embedded model: synthetic data against real data.

    make reproduce-cpu                   # the protocol of conf/experiment/cpu_sst2.yaml (1.5 h on 2 cores)
    python experiments/reproduce_cpu.py --name cpu_sst2_reduced evaluate.steps=50 evaluate.seeds=[0]

One generation job (192 texts from 50 real examples, filtered to at most 100), then one
evaluation job per training set on that job's output, each with `evaluate.seeds`:

    synthetic_filtered (+ the zero_shot and few_shot references), synthetic, real_seen (the 50 real
    examples the generator saw), real_random_100, real_random_1000.

Every job is an ordinary `run.py` job (the same hash-named directory `python run.py experiment=cpu_sst2
...` would use), so a re-run resumes where it stopped, at the granularity of one trained model. Writes
experiments/results/<name>.json ({method: {mean, std, n_train, measured}}, accuracies in [0, 1]) and
<name>.md. Extra arguments are Hydra overrides applied to every job; results made with any are a
reduced or modified protocol and must be written under another --name.

    python experiments/reproduce_cpu.py --only synthetic_filtered,synthetic

re-measures only those training sets (after a change to the generator, say) and keeps the other rows
of the existing results file: the real-data rows do not depend on the generator. Each row records the
date it was measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from gradmm import artifacts
from gradmm.config import register_configs, science_hash, validate
from gradmm.pipeline import run_job

REPO = Path(__file__).resolve().parents[1]
FULL_NAME = "cpu_sst2"

# Training set -> the overrides of its evaluation job.
TRAINED = {
    "synthetic_filtered": ["evaluate.train_on=synthetic_filtered", "evaluate.baselines=[zero_shot,few_shot]"],
    "synthetic": ["evaluate.train_on=synthetic", "evaluate.baselines=[]"],
    "real_seen": ["evaluate.train_on=real_seen", "evaluate.baselines=[]"],
    "real_random_100": ["evaluate.train_on=real_random", "evaluate.n_train=100", "evaluate.baselines=[]"],
    "real_random_1000": ["evaluate.train_on=real_random", "evaluate.n_train=1000", "evaluate.baselines=[]"],
}
# Reported next to the trained models: references computed by the synthetic_filtered job.
REFERENCES = ("zero_shot", "few_shot")


def job_dir(cfg: DictConfig) -> Path:
    """Where `python run.py` puts this config's job (conf/config.yaml: hydra.run.dir)."""
    return Path(cfg.paths.output_root) / "runs" / cfg.task.name / science_hash(cfg)


def run(overrides: list[str], label: str) -> tuple[dict, Path]:
    cfg = compose(config_name="config", overrides=overrides)
    validate(cfg)
    out_dir = job_dir(cfg)
    started = time.perf_counter()
    print(f"{label}: {out_dir}", flush=True)
    summary = run_job(cfg, out_dir)
    print(f"{label}: done in {time.perf_counter() - started:.0f} s", flush=True)
    return summary, out_dir


def table(results: dict, command: str, overrides: list[str]) -> str:
    lines = [
        f"Last run: `{command}`"
        + (f" (overrides, NOT the full protocol: `{' '.join(overrides)}`)." if overrides else "."),
        "",
        "| training set | n_train | accuracy (mean +- std over seeds) | measured |",
        "|---|---:|---:|---|",
    ]
    for method, r in results.items():
        lines.append(f"| {method} | {r['n_train']} | {100 * r['mean']:.1f} +- {100 * r['std']:.1f} "
                     f"| {r['measured']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default=FULL_NAME, help="results file stem (default: %(default)s)")
    parser.add_argument("--results-dir", type=Path, default=REPO / "experiments" / "results")
    parser.add_argument("--experiment", default="cpu_sst2", help="preset (default: %(default)s)")
    parser.add_argument("--only", type=lambda s: s.split(","), default=list(TRAINED),
                        help=f"comma-separated training sets to (re-)measure, of {','.join(TRAINED)}; "
                             "the other rows are kept from the existing results file")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to every job")
    args = parser.parse_args(argv)
    if args.overrides and args.name == FULL_NAME:
        parser.error(f"overrides change the protocol: pass another --name than {FULL_NAME!r}.")
    unknown = sorted(set(args.only) - set(TRAINED))
    if unknown:
        parser.error(f"--only {','.join(unknown)}: not a training set; choose from {','.join(TRAINED)}.")
    results_path = args.results_dir / f"{args.name}.json"
    partial = set(args.only) != set(TRAINED)
    if partial and not results_path.is_file():
        parser.error(f"--only keeps the other rows of {results_path}, which does not exist: run every set first.")
    results: dict[str, dict] = json.loads(results_path.read_text()) if partial else {}
    today = datetime.date.today().isoformat()
    todo = {method: extra for method, extra in TRAINED.items() if method in args.only}

    register_configs()
    base = [f"experiment={args.experiment}", *args.overrides]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        _, generated = run([*base, "stages=[generate,filter]"], f"[1/{len(todo) + 1}] generate and filter")
        for i, (method, extra) in enumerate(todo.items(), 2):
            overrides = [*base, "stages=[evaluate]", f"data.synthetic_from={generated}", *extra]
            summary, _ = run(overrides, f"[{i}/{len(todo) + 1}] evaluate {method}")
            results[method] = {"mean": summary["accuracy"], "std": summary["accuracy_std"],
                               "n_train": summary["evaluation"]["n_train"], "measured": today}
            print(f"  {method}: {summary['accuracy']:.3f} +- {summary['accuracy_std']:.3f}", flush=True)
            for name in REFERENCES:
                if name in summary["baselines"]:
                    b = summary["baselines"][name]
                    results[name] = {"mean": b["mean"], "std": b["std"], "n_train": b["n_train"], "measured": today}

    given = sys.argv[1:] if argv is None else argv
    command = " ".join(shlex.quote(a) for a in ["python", "experiments/reproduce_cpu.py", *given])
    artifacts.write_json(results_path, results)
    markdown = table(results, command, args.overrides)
    artifacts.write_atomic(args.results_dir / f"{args.name}.md", markdown)
    print("\n" + markdown)
    return results


if __name__ == "__main__":
    main()
