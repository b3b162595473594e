"""The job, top to bottom: validate, load, then the stages in order (generate, filter, evaluate), each
skipping what an earlier run of the same job already saved."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from gradmm.config import validation
from gradmm.config.validation import ConfigError, check_tokenizer
from gradmm.data.models import attention_kept, load_lm, load_tokenizer
from gradmm.data.tasks import Setup, generator_examples
from gradmm.privacy import dp
from gradmm.reporting.tracking import Tracker
from gradmm.runs import files, job_directory, manifest
from gradmm.runs.manifest import provenance
from gradmm.stages.evaluate import evaluate_stage
from gradmm.stages.filter import filter_stage
from gradmm.stages.generate import Clock, generate, leakage_audit, processes, rescore


def prepare(cfg: DictConfig, tokenizer=None) -> Setup:
    """The tokenizer-level checks (loading the tokenizer unless given), then the generator's real
    examples, to be sealed by the release under privacy=dp."""
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg.model, cfg.paths.cache_dir)
    verbalizer = check_tokenizer(cfg, tokenizer)
    real = generator_examples(cfg)
    if cfg.privacy.name == "dp":
        real = dp.PrivateExamples(real)
    prefix_ids = tokenizer.encode(cfg.task.lm_prefix, add_special_tokens=False)
    return Setup(verbalizer, prefix_ids, real)


def _made(summary: dict, stage: str) -> None:
    """Which command and code version made this stage's results, and when: a resumed job keeps the
    record of the run that did each stage."""
    summary.setdefault("made_by", {})[stage] = provenance()


def run_job(cfg: DictConfig, out_dir: Path, tokenizer=None) -> dict:
    """Runs cfg.stages in order; each stage skips work its earlier run already saved in out_dir, once
    gradmm.runs.manifest has found those outputs as they were recorded (or rebuilt them). The tokenizer is
    loaded unless given (the command line has it from validation)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if not processes(cfg).is_main_process:
        return _run(cfg, out_dir, tokenizer)
    # Refuses a directory holding another job's work before anything there is written.
    job_directory.claim(cfg, out_dir)
    with job_directory.exclusive(out_dir):
        files.write_atomic(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        return _run(cfg, out_dir, tokenizer)


def _run(cfg: DictConfig, out_dir: Path, tokenizer) -> dict:
    started = Clock.start()
    main_process = processes(cfg).is_main_process
    resume = manifest.verify(out_dir, remove_damaged=main_process) if cfg.resume else manifest.Resume()
    summary = resume.summary
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg.model, cfg.paths.cache_dir)
    setup = prepare(cfg, tokenizer)
    lm = load_lm(cfg.model, cfg.paths.cache_dir, tokenizer)
    if problems := validation.model_limits(cfg, lm, setup):
        raise ConfigError(problems)
    torch.manual_seed(cfg.seed)
    # A stage reads what this job made, or else what the earlier job in data.synthetic_from made.
    source = out_dir if "generate" in cfg.stages else Path(cfg.data.synthetic_from)
    filtered = (out_dir if "filter" in cfg.stages else source) / "synthetic_filtered.jsonl"
    synthetic = {"synthetic": source / "synthetic.jsonl", "synthetic_filtered": filtered}

    def due(stage: str) -> bool:
        return stage in cfg.stages and manifest.DONE_KEY[stage] not in summary

    if not main_process:
        # Under `accelerate launch` the other processes only generate their share of the rounds; the
        # main process collects them and runs everything after.
        if due("generate"):
            with attention_kept(lm):
                generate(cfg, out_dir, setup, lm, Tracker(cfg, out_dir, active=False), started)
        return summary
    tracker = Tracker(cfg, out_dir)
    # A rebuild makes files again and leaves the summary, the metrics and the W&B run as they were.
    quiet = Tracker(cfg, out_dir, active=False)
    try:
        if due("generate"):
            with attention_kept(lm):
                summary.update(generate(cfg, out_dir, setup, lm, tracker, started))
            tracker.log_texts("generate", files.read_jsonl(out_dir / "synthetic.jsonl"))
            summary["leakage"] = leakage_audit(cfg, out_dir)
            _made(summary, "generate")
            manifest.save(out_dir, summary)
        elif "generate" in resume.rebuild:
            with attention_kept(lm):
                rescore(cfg, out_dir, setup, lm)
            leakage_audit(cfg, out_dir)
        # Also when generation was done by an earlier run or job: no later stage reads the private examples.
        dp.seal(setup.real)
        if due("filter"):
            summary["filter"] = filter_stage(cfg, setup, lm, source, out_dir, tracker)
            _made(summary, "filter")
            manifest.save(out_dir, summary)
        elif "filter" in resume.rebuild:
            filter_stage(cfg, setup, lm, source, out_dir, quiet)
        if due("evaluate") or "evaluate" in resume.rebuild:
            evaluated = evaluate_stage(cfg, setup, lm, synthetic, out_dir, tracker if due("evaluate") else quiet)
            if due("evaluate"):
                summary.update(evaluated)
                if cfg.data.transfer:
                    summary["evaluation"]["transfer"] = {"from": str(source.resolve()),
                                                         "differs": job_directory.task_differences(cfg, source)}
                _made(summary, "evaluate")
                manifest.save(out_dir, summary)
        if resume.rebuild:
            manifest.check_rebuilt(out_dir, resume)
            manifest.save(out_dir, summary)
        # Under privacy=dp the audit, a function of the private examples, stays on this machine.
        private = cfg.privacy.name == "dp"
        tracker.summary({k: v for k, v in summary.items() if not (private and k == "leakage")})
        tracker.finish(0)
        return summary
    except BaseException:
        tracker.finish(1)
        raise
