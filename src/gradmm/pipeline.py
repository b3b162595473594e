"""The job, top to bottom: validate, load, compute targets, generate per class and round, score, write."""

from __future__ import annotations

import functools
import json
import logging
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from gradmm import artifacts, privacy
from gradmm.admm import NumericalFault, RoundState, run_round, start_round
from gradmm.config import ConfigError, validate
from gradmm.filtering import filter_stage
from gradmm.finetune import evaluate_stage
from gradmm.gradients import (
    Objective,
    OutputLayer,
    balanced_union_distance,
    class_targets,
    example_distances,
    set_distance,
    text_features,
)
from gradmm.models import LM, load_lm, load_tokenizer, mean_nll, resolve_device
from gradmm.projection import MatchingContext, allowed_vocabulary
from gradmm.sweeps import objective_value
from gradmm.target_cache import cached_targets
from gradmm.tasks import Example, Verbalizer, load_split, stratified_sample
from gradmm.tracking import Tracker

log = logging.getLogger(__name__)


@dataclass
class Setup:
    """Everything tokenizer-level, checked before the model is loaded."""

    tokenizer: object
    verbalizer: Verbalizer
    prefix_ids: list[int]
    # Under privacy=dp a `privacy.PrivateExamples`, sealed by the private release.
    real: list[Example] | privacy.PrivateExamples


def prepare(cfg: DictConfig) -> Setup:
    tokenizer = load_tokenizer(cfg.model, cfg.paths.cache_dir)
    problems = []
    try:
        verbalizer = Verbalizer.build(cfg.task, tokenizer)
    except ValueError as error:
        problems.append(str(error))
    n_allowed = len(allowed_vocabulary(tokenizer, len(tokenizer)).nonzero())
    if cfg.projector.topk > n_allowed:
        problems.append(
            f"projector.topk={cfg.projector.topk} is larger than the allowed vocabulary ({n_allowed} tokens)."
        )
    if cfg.projector.lm_topk > len(tokenizer):
        problems.append(f"projector.lm_topk={cfg.projector.lm_topk} is larger than the vocabulary ({len(tokenizer)}).")
    if problems:
        raise ConfigError(problems)
    real = stratified_sample(
        load_split(cfg, cfg.task.train_split), cfg.generation.n_real, len(cfg.task.label_names), cfg.seed
    )
    if cfg.privacy.name == "dp":
        real = privacy.PrivateExamples(real)
    prefix_ids = tokenizer.encode(cfg.task.lm_prefix, add_special_tokens=False)
    return Setup(tokenizer, verbalizer, prefix_ids, real)


def score_texts(lm: LM, setup: Setup, head: OutputLayer, targets, texts: list[str], labels: list[int], distance):
    """Per-example distance and log-perplexity, and per-class set distance, of texts as a classifier
    reads them (re-tokenised, prompt appended): exactly what fine-tuning on them would see."""
    inputs = setup.verbalizer.encode(lm.tokenizer, texts)
    feats = text_features(lm, head, inputs, labels)
    labels_t = torch.tensor(labels, device=feats.a.device)
    per_example = torch.empty(len(texts))
    per_class = []
    for k, target in enumerate(targets):
        rows = (labels_t == k).nonzero().squeeze(-1)
        if len(rows) == 0:
            continue
        per_example[rows.cpu()] = example_distances(feats.select(rows), target, distance).float().cpu()
        per_class.append(set_distance(feats.select(rows), target, distance).item())
    union = balanced_union_distance(feats, labels_t, targets, distance).item()
    text_ids = [ids[: len(ids) - len(setup.verbalizer.prompt_ids)] for ids in inputs]
    log_ppl = mean_nll(lm, setup.prefix_ids, text_ids).cpu()
    return {
        "per_example": per_example.tolist(),
        "log_ppl": log_ppl.tolist(),
        "grad_distance_mean": float(per_example.mean()),
        "grad_distance_set": float(sum(per_class) / len(per_class)),
        "grad_distance_union": union,
        "log_ppl_mean": float(log_ppl.mean()),
    }


def _figures(scores: dict) -> dict:
    return {k: scores[k] for k in ("grad_distance_mean", "grad_distance_set", "grad_distance_union", "log_ppl_mean")}


def run_job(cfg: DictConfig, out_dir: Path) -> dict:
    """Runs cfg.stages in order; each stage skips work its earlier run already saved in out_dir."""
    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    main_process = processes(cfg).is_main_process
    if main_process:
        artifacts.write_atomic(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    setup = prepare(cfg)
    lm = load_lm(cfg.model, cfg.paths.cache_dir)
    torch.manual_seed(cfg.seed)
    summary_path = out_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if cfg.resume and summary_path.is_file() else {}
    # A stage reads what this job made, or else what the earlier job in data.synthetic_from made.
    source = out_dir if "generate" in cfg.stages else Path(cfg.data.synthetic_from)
    filtered = (out_dir if "filter" in cfg.stages else source) / "synthetic_filtered.jsonl"
    synthetic = {"synthetic": source / "synthetic.jsonl", "synthetic_filtered": filtered}
    if not main_process:
        # Under `accelerate launch` the other processes only generate their share of the rounds; the
        # main process collects them and runs everything after.
        if "generate" in cfg.stages and "n_synthetic" not in summary:
            generate(cfg, out_dir, setup, lm, Tracker(cfg, out_dir, active=False), started)
        return summary
    tracker = Tracker(cfg, out_dir)
    try:
        if "generate" in cfg.stages and "n_synthetic" not in summary:
            summary.update(generate(cfg, out_dir, setup, lm, tracker, started))
            summary["leakage"] = leakage_audit(cfg, out_dir)
            artifacts.write_json(summary_path, summary)
        # Also when generation was done by an earlier run or job: no later stage reads the private examples.
        privacy.seal(setup.real)
        if "filter" in cfg.stages and "filter" not in summary:
            summary["filter"] = filter_stage(cfg, setup, lm, source, out_dir, tracker)
            artifacts.write_json(summary_path, summary)
        if "evaluate" in cfg.stages and "accuracy" not in summary:
            summary.update(evaluate_stage(cfg, setup, lm, synthetic, out_dir, tracker))
            artifacts.write_json(summary_path, summary)
        # Under privacy=dp the audit, a function of the private examples, stays on this machine.
        private = cfg.privacy.name == "dp"
        tracker.summary({k: v for k, v in summary.items() if not (private and k == "leakage")})
        tracker.finish(0)
        return summary
    except BaseException:
        tracker.finish(1)
        raise


def leakage_audit(cfg: DictConfig, out_dir: Path) -> dict:
    """What the synthetic texts share with the real examples the generator saw (leakage.jsonl and
    summary figures). A post-hoc audit: it reloads those examples itself, since under privacy=dp they
    are sealed, and nothing reads its result back."""
    real = stratified_sample(
        load_split(cfg, cfg.task.train_split), cfg.generation.n_real, len(cfg.task.label_names), cfg.seed
    )
    synthetic = [row["text"] for row in artifacts.read_jsonl(out_dir / "synthetic.jsonl")]
    rows, figures = privacy.leakage_report(synthetic, [ex.text for ex in real])
    artifacts.write_jsonl(out_dir / "leakage.jsonl", rows)
    audit = "post hoc, never used by generation"
    if cfg.privacy.name == "dp":
        audit += "; reads the private examples, so it is outside the DP guarantee: do not publish it"
    return {**figures, "audit": audit}


def matching_head(cfg: DictConfig, setup: Setup, lm: LM) -> OutputLayer:
    """The output layer whose gradient is matched: the label words' rows, or the whole vocabulary's."""
    return OutputLayer.build(lm.output_weight, lm.output_bias, setup.verbalizer.label_token_ids, cfg.matching.loss)


def generate(cfg: DictConfig, out_dir: Path, setup: Setup, lm: LM, tracker: Tracker, started: float) -> dict:
    head = matching_head(cfg, setup, lm)
    targets, release = cached_targets(cfg, setup.real, lm.device, lambda: compute_targets(cfg, setup, lm, head))
    # From here on only the (noisy, under privacy=dp) targets and public configuration are readable.
    privacy.seal(setup.real)
    allowed = allowed_vocabulary(lm.tokenizer, lm.input_embeddings.shape[0])
    rows, failed = generate_rounds(cfg, setup, lm, head, targets, allowed, tracker, out_dir)
    if not processes(cfg).is_main_process:
        return {}
    summary = score_and_write(cfg, out_dir, setup, lm, head, targets, allowed, rows, started, failed)
    return {**summary, **({"privacy": release} if release else {})}


def compute_targets(cfg: DictConfig, setup: Setup, lm: LM, head: OutputLayer) -> tuple[list[torch.Tensor], dict]:
    """Per class, the mean last-layer gradient of the real examples of that class, or its private
    release under privacy=dp (with the release's facts: noise multiplier, spent epsilon, ...). Each
    call under privacy=dp is a fresh release that spends the budget again: the target cache is what
    makes re-runs, resumed jobs and other processes reuse one."""
    labels = [ex.label for ex in setup.real]
    inputs = setup.verbalizer.encode(lm.tokenizer, [ex.text for ex in setup.real])
    feats = text_features(lm, head, inputs, labels)
    n_classes = len(cfg.task.label_names)
    if cfg.privacy.name == "dp":
        release = privacy.release_targets(feats, labels, cfg, privacy.secret_generator())
        return release.targets, release.facts
    return class_targets(feats, labels, n_classes), {}


def processes(cfg: DictConfig) -> PartialState:
    """This process's place under `accelerate launch` (a single process otherwise)."""
    return PartialState(cpu=resolve_device(cfg.model.device).type == "cpu")


def generate_rounds(cfg, setup: Setup, lm: LM, head, targets, allowed, tracker: Tracker, out_dir: Path):
    """Every (class, round) batch of synthetic sequences, as output rows (text, label, round), and
    the rounds that failed. Rounds run `generation.rounds_per_batch` at a time, side by side. Finished
    rounds and the batch in progress live in out_dir/rounds/, so a re-run continues where the last one
    stopped, with identical results.

    Under `accelerate launch` each process runs its share of the unfinished batches; the main process
    then collects all of them, and the others get ([], [])."""
    task, gen = cfg.task, cfg.generation
    procs = processes(cfg)
    rounds_dir = out_dir / "rounds"
    rounds_dir.mkdir(exist_ok=True)
    jobs = [(k, r) for k in range(len(task.label_names)) for r in range(gen.rounds)]
    unfinished = [job for job in jobs if _load_round(rounds_dir, *job) is None]
    # A batch finishes all its rounds at once, so a re-run that finds the same unfinished rounds makes the
    # same batches and finds their checkpoints under the same names.
    pending = [unfinished[i : i + gen.rounds_per_batch] for i in range(0, len(unfinished), gen.rounds_per_batch)]
    if procs.is_main_process:
        # Checkpoints that a killed job was writing when it died, and those of batches made otherwise
        # (another rounds_per_batch, or a job killed while it saved a batch's rounds).
        current = {_checkpoint_path(rounds_dir, batch) for batch in pending}
        for orphan in [*rounds_dir.glob(".*.tmp"), *(p for p in rounds_dir.glob("*.state.pt") if p not in current)]:
            orphan.unlink()
        _rewrite_metrics(tracker, rounds_dir, jobs, pending)
    # Every process lists the unfinished batches before any process saves one: all split the same list.
    procs.wait_for_everyone()
    with procs.split_between_processes(pending) as mine:
        for batch in tqdm(mine, desc="rounds", unit="batch", disable=not procs.is_main_process):
            _run_batch_with_restarts(cfg, setup, lm, head, targets, allowed, tracker, rounds_dir, batch)
    procs.wait_for_everyone()
    if not procs.is_main_process:
        return [], []
    done = {job: _load_round(rounds_dir, *job) for job in jobs}
    _rewrite_metrics(tracker, rounds_dir, jobs, [])
    rows = [row for job in jobs for row in done[job]["rows"]]
    failed = [{"class": job[0], "round": job[1], "error": done[job]["failed"]}
              for job in jobs if done[job].get("failed")]
    return rows, failed


def class_objective(cfg: DictConfig, targets: list[torch.Tensor], k: int) -> Objective:
    others = sum(t for j, t in enumerate(targets) if j != k)
    return Objective(targets[k], cfg.matching.distance, others, cfg.matching.union_weight)


def _round_path(rounds_dir: Path, k: int, r: int) -> Path:
    return rounds_dir / f"class{k}_round{r}.json"


def _checkpoint_path(rounds_dir: Path, batch: list[tuple[int, int]]) -> Path:
    """Named after the batch's rounds: class0_round3 alone, class0_round3-class1_round0 for a run of them."""
    (k0, r0), (k1, r1) = batch[0], batch[-1]
    stem = f"class{k0}_round{r0}" + (f"-class{k1}_round{r1}" if len(batch) > 1 else "")
    return rounds_dir / f"{stem}.state.pt"


def _load_round(rounds_dir: Path, k: int, r: int) -> dict | None:
    finished = _round_path(rounds_dir, k, r)
    return json.loads(finished.read_text()) if finished.is_file() else None


def _load_checkpoint(state_path: Path) -> dict:
    """The batch in progress: its attempt number, the faults of earlier attempts, and its RoundState
    (None right after a fault: the attempt starts from its fresh initialisation)."""
    if state_path.is_file():
        return torch.load(state_path, weights_only=False)
    return {"attempt": 0, "faults": [], "state": None}


def _save_checkpoint(state_path: Path, attempt: int, faults: list[str], state: RoundState | None) -> None:
    artifacts.save_torch(state_path, {"attempt": attempt, "faults": faults, "state": state})


def _rewrite_metrics(tracker: Tracker, rounds_dir: Path, jobs, pending) -> None:
    """metrics.jsonl holds exactly the outer steps that survive in saved rounds and in the checkpoints
    of the `pending` batches, in job order: steps recomputed after a resume, or by another process, are
    logged once."""
    in_progress = {}
    for batch in pending:
        state = _load_checkpoint(_checkpoint_path(rounds_dir, batch))["state"]
        for g, job in enumerate(batch):
            in_progress[job] = [_without_group(rec) for rec in (state.records if state else []) if rec["group"] == g]
    records = []
    for k, r in jobs:
        saved = _load_round(rounds_dir, k, r)
        records += [{"class": k, "round": r, **rec} for rec in (saved["records"] if saved else in_progress[k, r])]
    artifacts.write_jsonl(tracker.metrics_path, records)


def _without_group(record: dict) -> dict:
    """A group's record as its round reports it: the group index only means something inside a batch."""
    return {key: value for key, value in record.items() if key != "group"}


def _run_batch_with_restarts(cfg, setup, lm, head, targets, allowed, tracker, rounds_dir, batch) -> None:
    task, max_attempts = cfg.task, cfg.generation.max_restarts + 1
    state_path = _checkpoint_path(rounds_dir, batch)
    ctx = MatchingContext(head, [class_objective(cfg, targets, k) for k, _ in batch], [k for k, _ in batch],
                          setup.verbalizer.prompt_ids)
    names = ", ".join(f"{task.label_names[k]} round {r}" for k, r in batch)
    steps = tqdm(total=cfg.admm.outer_steps, desc=names, leave=False, disable=not processes(cfg).is_main_process)

    def on_outer_step(record):
        k, r = batch[record["group"]]
        tracker.log({"class": k, "round": r, **_without_group(record)})
        if record["group"] == len(batch) - 1:
            steps.set_postfix(d_z=f"{record['grad_distance_z']:.4f}", ppl=f"{record['log_ppl_z']:.2f}")
            steps.update()

    checkpoint = _load_checkpoint(state_path)
    attempt, faults, state = checkpoint["attempt"], checkpoint["faults"], checkpoint["state"]
    while attempt < max_attempts:
        if state is None:
            # Each round seeded by (seed, class, round, attempt) alone, so rounds are independent of each
            # other, of the order they run in, of the batch they share and of the process that runs them.
            seeds = [cfg.seed * 1_000_003 + k * 1_009 + r * 17 + attempt for k, r in batch]
            torch.manual_seed(seeds[0])
            state = start_round(lm, cfg, ctx, allowed, setup.prefix_ids,
                                [torch.Generator().manual_seed(seed) for seed in seeds])
            # Saved before it is logged, like every later step: whatever metrics.jsonl shows survives a kill.
            _save_checkpoint(state_path, attempt, faults, state)
            for record in state.records:
                k, r = batch[record["group"]]
                tracker.log({"class": k, "round": r, **_without_group(record)})
        else:
            steps.update(state.next_step - 1 - steps.n)
        try:
            results = run_round(lm, cfg, ctx, allowed, setup.prefix_ids, state, on_outer_step,
                                functools.partial(_save_checkpoint, state_path, attempt, faults))
            break
        except NumericalFault as fault:
            # The batch's rounds share one optimiser state, so all of them restart.
            faults.append(f"attempt {attempt + 1} of {max_attempts}: {fault}")
            log.warning("%s: %s", names, faults[-1])
            attempt, state = attempt + 1, None
            steps.reset()
            # A job killed now resumes with the next attempt, as this one would have gone on.
            _save_checkpoint(state_path, attempt, faults, None)
    steps.close()
    for g, (k, r) in enumerate(batch):
        if attempt == max_attempts:
            log.warning("class %s round %d failed %d times; the others go on", task.label_names[k], r, attempt)
            saved = {"rows": [], "records": [], "failed": faults[-1], "faults": faults}
        else:
            rows = [{"text": lm.tokenizer.decode(seq).strip(), "label": k, "label_name": task.label_names[k],
                     "round": r} for seq in results[g].tokens.tolist()]
            saved = {"rows": rows, "records": [_without_group(rec) for rec in state.records if rec["group"] == g],
                     "best_outer_step": results[g].best_outer_step, "faults": faults,
                     "process": processes(cfg).process_index}
        artifacts.write_json(_round_path(rounds_dir, k, r), saved)
    state_path.unlink(missing_ok=True)


def score_and_write(cfg, out_dir: Path, setup: Setup, lm: LM, head, targets, allowed, rows, started, failed) -> dict:
    """Scores the synthetic set, a random-token set of the same shape and the real examples, as a
    classifier reads them; writes synthetic.jsonl and summary.json."""
    texts, labels = [row["text"] for row in rows], [row["label"] for row in rows]
    synthetic = score_texts(lm, setup, head, targets, texts, labels, cfg.matching.distance)
    rows = [
        {**{key: row[key] for key in ("text", "label", "label_name", "round")}, "grad_distance": d, "log_ppl": p}
        for row, d, p in zip(rows, synthetic["per_example"], synthetic["log_ppl"], strict=True)
    ]
    artifacts.write_jsonl(out_dir / "synthetic.jsonl", rows)

    random_texts = _random_texts(lm, allowed, len(rows), cfg.generation.seq_len, cfg.seed)
    random_scores = score_texts(lm, setup, head, targets, random_texts, labels, cfg.matching.distance)
    real_scores = None
    if not privacy.is_sealed(setup.real):
        real_labels = [ex.label for ex in setup.real]
        real_scores = _figures(score_texts(
            lm, setup, head, targets, [ex.text for ex in setup.real], real_labels, cfg.matching.distance
        ))
    summary = {
        "n_synthetic": len(rows),
        **_figures(synthetic),
        "random_baseline": _figures(random_scores),
        "real_examples": real_scores,
        "seconds": time.perf_counter() - started,
        "output_dir": str(out_dir),
        "failed_rounds": failed,
    }
    return summary


def _random_texts(lm: LM, allowed: torch.Tensor, n: int, length: int, seed: int) -> list[str]:
    allowed_ids = allowed.nonzero().squeeze(-1)
    generator = torch.Generator().manual_seed(seed + 7)
    picks = allowed_ids[torch.randint(len(allowed_ids), (n, length), generator=generator)]
    return [lm.tokenizer.decode(seq).strip() for seq in picks.tolist()]


def main(cfg: DictConfig) -> float | None:
    """Validates, runs, prints where the outputs are; returns cfg.objective.metric for sweepers."""
    from hydra.core.hydra_config import HydraConfig

    validate(cfg)
    if cfg.validate_only:
        prepare(cfg)
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
        summary = run_job(cfg, out_dir)
    except KeyboardInterrupt as interrupt:
        signum = interrupt.args[0] if interrupt.args else signal.SIGINT
        print(f"\nInterrupted by {signal.Signals(signum).name}. Progress is saved in {out_dir}/; "
              "run the same command again to resume.", file=sys.stderr)
        sys.exit(128 + signum)
    if not procs.is_main_process:
        return None
    print_summary(summary, out_dir)
    return objective_value(cfg, summary)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(signum)


def print_summary(summary: dict, out_dir: Path, n_examples: int = 6) -> None:
    print(f"\nOutputs in {out_dir}/ (summary.json, synthetic.jsonl, metrics.jsonl, config.yaml, ...)")
    if "n_synthetic" in summary:
        print(f"{'':24}{'grad_distance_set':>18}{'grad_distance_union':>20}{'grad_distance_mean':>20}"
              f"{'log_ppl_mean':>14}")
        for name, figures in [("synthetic", summary), ("random tokens", summary["random_baseline"]),
                              ("real examples", summary["real_examples"])]:
            if figures is None:  # privacy=dp: the real examples were not reachable
                continue
            print(f"{name:24}{figures['grad_distance_set']:>18.4f}{figures['grad_distance_union']:>20.4f}"
                  f"{figures['grad_distance_mean']:>20.4f}{figures['log_ppl_mean']:>14.2f}")
        rows = artifacts.read_jsonl(out_dir / "synthetic.jsonl")
        print(f"\n{summary['n_synthetic']} synthetic examples in {summary['seconds']:.0f} s; a few of them:")
        for row in rows[:: max(1, len(rows) // n_examples)][:n_examples]:
            print(f"  [{row['label_name']}] d={row['grad_distance']:.4f} log_ppl={row['log_ppl']:.2f}  {row['text']}")
    if "privacy" in summary:
        p = summary["privacy"]
        print(f"\nprivacy: ({p['spent_epsilon']:.3g}, {p['delta']:.3g})-DP targets, noise multiplier "
              f"{p['noise_multiplier']:.3g}, clip {p['clip']:g}, {p['relation']} ({p['accountant']})")
    if "leakage" in summary:
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
