"""The command line: validates, runs the job, turns signals into a saved, resumable stop, prints where
the outputs are and a summary of them, and returns the sweep objective."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from accelerate.utils import broadcast_object_list
from omegaconf import DictConfig

from gradmm.config.validation import validate
from gradmm.data.models import load_tokenizer
from gradmm.pipeline import prepare, run_job
from gradmm.runs import files
from gradmm.runs.metrics import TEXT_SET_FIGURES
from gradmm.runs.sweeps import objective_value
from gradmm.stages.generate import processes


def main(cfg: DictConfig) -> float | None:
    """Validates, runs, prints where the outputs are; returns cfg.objective.metric for sweepers."""
    from hydra.core.hydra_config import HydraConfig

    tokenizer = _tokenizer_if_loadable(cfg)
    validate(cfg, tokenizer)
    if cfg.validate_only:
        prepare(cfg, tokenizer)
        print("config is valid")
        return None
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    procs = processes(cfg)
    if procs.num_processes > 1:
        # Under `accelerate launch` every process names its own directory when resume=false (a
        # timestamp); they all work in the main process's.
        out_dir = Path(broadcast_object_list([str(out_dir)])[0])
    # SLURM sends SIGTERM before preemption: treat it like Ctrl-C, so the round in progress is saved,
    # the W&B run finished and the message below printed. A launcher that handles SIGTERM itself
    # (submitit ignores it and requeues on its own signal) keeps its handler.
    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        summary = run_job(cfg, out_dir, tokenizer)
    except KeyboardInterrupt as interrupt:
        signum = interrupt.args[0] if interrupt.args else signal.SIGINT
        print(f"\nInterrupted by {signal.Signals(signum).name}. Progress is saved in {out_dir}/; "
              "run the same command again to resume.", file=sys.stderr)
        sys.exit(128 + signum)
    if not procs.is_main_process:
        return None
    print_summary(summary, out_dir)
    return objective_value(cfg, summary)


def _tokenizer_if_loadable(cfg: DictConfig):
    """The tokenizer, so that validation lists its problems with the config's. None when it cannot be
    loaded: validation then names what is wrong with the model's config, or the job's own load raises
    the loader's error."""
    try:
        return load_tokenizer(cfg.model, cfg.paths.cache_dir)
    except Exception:  # noqa: BLE001 - reported by validation or by the job's own load, never swallowed
        return None


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(signum)


def print_summary(summary: dict, out_dir: Path, n_examples: int = 6) -> None:
    print(f"\nOutputs in {out_dir}/ (summary.json, synthetic.jsonl, metrics.jsonl, config.yaml, ...)")
    if "n_synthetic" in summary:
        print(f"{'':24}" + "".join(f"{m.key:>21}" for m in TEXT_SET_FIGURES))
        for name, figures in [("synthetic", summary), ("random tokens", summary["random_baseline"]),
                              ("real examples", summary["real_examples"])]:
            if figures is None:  # privacy=dp: the real examples were not reachable
                continue
            print(f"{name:24}" + "".join(f"{figures[m.key]:>21.4f}" for m in TEXT_SET_FIGURES))
        rows = files.read_jsonl(out_dir / "synthetic.jsonl")
        print(f"\n{summary['n_synthetic']} synthetic examples in {summary['seconds']:.0f} s; a few of them:")
        for row in rows[:: max(1, len(rows) // n_examples)][:n_examples]:
            print(f"  [{row['label_name']}] d={row['grad_distance']:.4f} log_ppl={row['log_ppl']:.2f}  {row['text']}")
    if "privacy" in summary:
        p = summary["privacy"]
        print(f"\nprivacy: ({p['spent_epsilon']:.3g}, {p['delta']:.3g})-DP targets, noise multiplier "
              f"{p['noise_multiplier']:.3g}, clip {p['clip']:g}, {p['relation']} ({p['accountant']})")
    if "max_shared_ngram" in summary.get("leakage", {}):  # under privacy=dp only where the audit is
        leak = summary["leakage"]
        print(f"leakage audit: longest word n-gram shared with a real example {leak['max_shared_ngram']} "
              f"(mean {leak['mean_shared_ngram']:.1f}); {leak['n_sharing_8gram']} texts share an 8-gram")
    if "filter" in summary:
        f = summary["filter"]
        print(f"\nfilter: kept {f['n_kept']} of {f['n_in']} (dropped: {f['dropped']})")
    if "accuracy" in summary:
        ev = summary["evaluation"]
        print(f"\naccuracy on {ev['n_eval']} held-out examples after fine-tuning on {ev['train_on']}: "
              f"{summary['accuracy']:.3f} +- {summary['accuracy_std']:.3f}")
        for name, b in summary["baselines"].items():
            print(f"  {name:14} {b['mean']:.3f} +- {b['std']:.3f}")
