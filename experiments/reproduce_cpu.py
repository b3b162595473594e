"""The CPU protocol on one task with the embedded model: GRADMM's ADMM step against the selection it
starts from, the control and the real examples.

    make reproduce-cpu                              # SST-2, every row (hours on 2 cores; resumable)
    python experiments/reproduce_cpu.py --task rotten_tomatoes \
        --only lm_samples_filtered,selection_filtered,admm_filtered,real_seen   # the rows that answer the question
    python experiments/reproduce_cpu.py --name cpu_sst2_reduced evaluate.steps=50 evaluate.seeds=[0]

Three generation jobs (256 texts from 50 real examples each, filtered to at most 100), all under the
`cpu_sst2` preset with `task=<task>`:

    admm        the preset: each round starts from the best 8 of 64 LM samples by the matched gradient
                (generation.init_candidates), then takes the ADMM steps of the default budget (conf/admm);
    selection   the same without any ADMM step (admm.outer_steps=0);
    lm_samples  the control: the generator's own LM samples, neither selected nor optimised
                (admm.outer_steps=0, no init_candidates), scored and filtered exactly alike;

then one evaluation job per training set, each with `evaluate.seeds`: admm_filtered, admm,
selection_filtered (+ the zero_shot and few_shot references), selection, lm_samples_filtered,
lm_samples, real_seen (the 50 real examples the generator saw), real_random_100, real_random_1000; and
with --few-real 5,10 the paper's few-example setting: admm_filtered_n5 (generated from 5 real examples)
against real_seen_n5 (fine-tuning on those 5), and the same for 10. admm_filtered against
selection_filtered is what the ADMM step adds; selection_filtered against lm_samples_filtered is what
the matched selection adds. Accuracy is on the task's validation split, which no choice looks at
(learning rate and checkpoint are chosen on a dev split of the training data).

Every job is an ordinary `run.py` job (the same hash-named directory `python run.py experiment=cpu_sst2
...` would use), so a re-run resumes where it stopped, at the granularity of one trained model. Writes
experiments/results/<name>.json ({method: {mean, std, seeds, n_train, measured}}, accuracies in [0, 1])
and <name>.md; <name> is cpu_<task> unless --name says otherwise. Extra arguments are Hydra overrides
applied to every job; results made with any are a reduced or modified protocol and must be written
under another --name.

    python experiments/reproduce_cpu.py --only admm_filtered,admm

(re-)measures only those training sets (after a change to the generator, say) and keeps the other rows
of the existing results file: the real-data rows do not depend on the generator. Each row records when
and from which code version its evaluation job ran, and its generation job for synthetic rows (`made_by`
in the jobs' summaries: a job resumed by a later call keeps the run that did the work).
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

from gradmm.config.schemas import register_configs
from gradmm.config.validation import validate
from gradmm.pipeline import run_job
from gradmm.runs import files
from gradmm.runs.identity import science_hash

REPO = Path(__file__).resolve().parents[1]

# The generation jobs, as overrides of the preset.
GENERATIONS = {
    "admm": [],
    "selection": ["admm.outer_steps=0"],
    "lm_samples": ["admm.outer_steps=0", "generation.init_candidates=null"],
}
# Training set -> (generation job, overrides of its evaluation job).
TRAINED = {
    "admm_filtered": ("admm", ["evaluate.train_on=synthetic_filtered", "evaluate.baselines=[]"]),
    "admm": ("admm", ["evaluate.train_on=synthetic", "evaluate.baselines=[]"]),
    "selection_filtered": ("selection", ["evaluate.train_on=synthetic_filtered",
                                         "evaluate.baselines=[zero_shot,few_shot]"]),
    "selection": ("selection", ["evaluate.train_on=synthetic", "evaluate.baselines=[]"]),
    "lm_samples_filtered": ("lm_samples", ["evaluate.train_on=synthetic_filtered", "evaluate.baselines=[]"]),
    "lm_samples": ("lm_samples", ["evaluate.train_on=synthetic", "evaluate.baselines=[]"]),
    "real_seen": ("selection", ["evaluate.train_on=real_seen", "evaluate.baselines=[]"]),
    "real_random_100": ("selection", ["evaluate.train_on=real_random", "evaluate.n_train=100",
                                      "evaluate.baselines=[]"]),
    "real_random_1000": ("selection", ["evaluate.train_on=real_random", "evaluate.n_train=1000",
                                       "evaluate.baselines=[]"]),
}


def few_real_sets(sizes: list[int]) -> tuple[dict, dict]:
    """The paper's few-example setting: per size n, a generation from n real examples and two rows."""
    generations = {f"n{n}": [f"generation.n_real={n}"] for n in sizes}
    trained = {}
    for n in sizes:
        trained[f"admm_filtered_n{n}"] = (f"n{n}", ["evaluate.train_on=synthetic_filtered",
                                                    "evaluate.baselines=[]"])
        trained[f"real_seen_n{n}"] = (f"n{n}", ["evaluate.train_on=real_seen", "evaluate.baselines=[]"])
    return generations, trained


# Reported next to the trained models: references computed by the selection_filtered job.
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
        "| training set | n_train | accuracy (mean +- std over seeds) | seeds | matched | code | measured |",
        "|---|---:|---:|---|---|---|---|",
    ]
    for method, r in sorted(results.items()):
        seeds = ", ".join(f"{100 * a:.1f}" for a in r.get("seeds", [])) or "-"
        lines.append(f"| {method} | {r['n_train']} | {100 * r['mean']:.1f} +- {100 * r['std']:.1f} | {seeds} "
                     f"| {r.get('matched', '-')} | {r.get('code_version', '-')[:12]} | {r['measured']} |")
    return "\n".join(lines) + "\n"


def matched_description(cfg: DictConfig) -> str:
    """What the generation job matched and how, for its rows: none for the control."""
    gen, admm, m = cfg.generation, cfg.admm, cfg.matching
    if admm.outer_steps == 0 and not gen.init_candidates:
        return "none (LM samples)"
    matched = f"output layer ({m.loss})" if m.kind == "output_layer" else (
        f"{m.kind}{f' rank {m.lora_rank}' if m.kind == 'lora' else ''}: {' '.join(m.modules)} ({m.loss})")
    how = []
    if gen.init_candidates:
        how.append(f"best {gen.batch_size} of {gen.init_candidates} LM samples")
    if admm.outer_steps:
        patience = f", patience {admm.patience}" if admm.patience is not None else ""
        how.append(f"ADMM {admm.outer_steps}x{admm.inner_steps} (rho {admm.rho}{patience}, {cfg.projector.name})")
    return f"{matched}; {', '.join(how)}"


def made_by(summary: dict, stage: str, job: Path) -> dict:
    """When and from which code a job did the stage: the run that did it, which a resumed job keeps (and
    for a job from before summaries recorded it, the summary file's time and an unrecorded version)."""
    if stage in summary.get("made_by", {}):
        return summary["made_by"][stage]
    written = datetime.datetime.fromtimestamp((job / "summary.json").stat().st_mtime, datetime.timezone.utc)
    return {"finished": written.isoformat(timespec="seconds"), "code_version": "unrecorded"}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="sst2", help="conf/task option (default: %(default)s)")
    parser.add_argument("--name", help="results file stem (default: cpu_<task>)")
    parser.add_argument("--results-dir", type=Path, default=REPO / "experiments" / "results")
    parser.add_argument("--experiment", default="cpu_sst2", help="preset (default: %(default)s)")
    parser.add_argument("--few-real", type=lambda s: [int(n) for n in s.split(",")], default=[],
                        help="also the few-example setting for these numbers of real examples, e.g. 5,10")
    parser.add_argument("--only", type=lambda s: s.split(","), default=None,
                        help="comma-separated training sets to (re-)measure; the other rows are kept "
                             "from the existing results file")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to every job")
    args = parser.parse_args(argv)
    full_name = f"cpu_{args.task}"
    args.name = args.name or full_name
    if args.overrides and args.name == full_name:
        parser.error(f"overrides change the protocol: pass another --name than {full_name!r}.")
    few_generations, few_trained = few_real_sets(args.few_real)
    generations, trained = {**GENERATIONS, **few_generations}, {**TRAINED, **few_trained}
    only = args.only or list(trained)
    unknown = sorted(set(only) - set(trained))
    if unknown:
        parser.error(f"--only {','.join(unknown)}: not a training set; choose from {','.join(trained)}.")
    results_path = args.results_dir / f"{args.name}.json"
    partial = args.only is not None and results_path.is_file()
    results: dict[str, dict] = json.loads(results_path.read_text()) if partial else {}
    measured: set[str] = set()
    todo = {method: trained[method] for method in only}
    needed = [name for name in generations if any(job == name for job, _ in todo.values())]

    register_configs()
    base = [f"experiment={args.experiment}", f"task={args.task}", *args.overrides]
    steps = len(needed) + len(todo)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        generated = {}
        for i, name in enumerate(needed, 1):
            overrides = [*base, *generations[name], "stages=[generate,filter]"]
            _, generated[name] = run(overrides, f"[{i}/{steps}] generate and filter ({name})")
            generated[name] = (generated[name], matched_description(compose(config_name="config",
                                                                            overrides=overrides)))
        for i, (method, (job, extra)) in enumerate(todo.items(), len(needed) + 1):
            source, matched = generated[job]
            overrides = [*base, *generations[job], "stages=[evaluate]", f"data.synthetic_from={source}", *extra]
            summary, eval_dir = run(overrides, f"[{i}/{steps}] evaluate {method}")
            trains_on_generated = extra[0].startswith("evaluate.train_on=synthetic")
            made = made_by(summary, "evaluate", eval_dir)
            row = {"measured": made["finished"], "code_version": made["code_version"],
                   "matched": matched if trains_on_generated else "-"}
            if trains_on_generated:
                row["generated_by"] = made_by(json.loads((source / "summary.json").read_text()), "generate", source)
            results[method] = {"mean": summary["accuracy"], "std": summary["accuracy_std"],
                               "seeds": [r["accuracy"] for r in summary["evaluation"]["runs"]],
                               "n_train": summary["evaluation"]["n_train"], **row}
            measured.add(method)
            print(f"  {method}: {summary['accuracy']:.3f} +- {summary['accuracy_std']:.3f}", flush=True)
            for name in REFERENCES:
                if name in summary["baselines"]:
                    b = summary["baselines"][name]
                    results[name] = {"mean": b["mean"], "std": b["std"], "n_train": b["n_train"], **row,
                                     "matched": "-"}
                    measured.add(name)

    given = sys.argv[1:] if argv is None else argv
    command = " ".join(shlex.quote(a) for a in ["python", "experiments/reproduce_cpu.py", *given])
    if partial:
        # Another --only run may have written its rows meanwhile: keep them, replace only ours.
        results = {**json.loads(results_path.read_text()), **{m: results[m] for m in results if m in measured}}
    files.write_json(results_path, results)
    markdown = table(results, command, args.overrides)
    files.write_atomic(args.results_dir / f"{args.name}.md", markdown)
    print("\n" + markdown)
    return results


if __name__ == "__main__":
    main()
