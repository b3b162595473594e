"""The generate stage: per-class targets, then every (class, round) batch of synthetic sequences, with
restarts after numerical faults and checkpoints that let a killed job resume where it stopped; then
the scores of the synthetic set as a classifier reads them (gradient distance, log-perplexity) beside a
random-token set of its shape and the real examples, and the post-hoc leakage audit.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import PartialState
from omegaconf import DictConfig
from tqdm.auto import tqdm

from gradmm.config.components import build_projector
from gradmm.data.models import LM, mean_nll, resolve_device
from gradmm.data.tasks import Setup, class_quotas, generator_examples
from gradmm.method.admm import (
    AdmmParams,
    Initialisation,
    NumericalFault,
    RoundResult,
    RoundState,
    run_round,
    start_round,
)
from gradmm.method.gradients import (
    Gradient,
    Objective,
    OutputLayer,
    balanced_union_distance,
    class_targets,
    example_distances,
    set_distance,
    vsum,
)
from gradmm.method.matched_gradient import build_matched_gradient, text_features
from gradmm.method.projectors import MatchingContext, Projector, allowed_vocabulary, random_allowed_tokens
from gradmm.privacy import dp
from gradmm.privacy.leakage import leakage_report
from gradmm.reporting.tracking import Tracker
from gradmm.runs import files
from gradmm.runs.identity import science_hash
from gradmm.runs.metrics import TEXT_SET_FIGURES
from gradmm.runs.target_cache import cached_targets, mechanism

log = logging.getLogger(__name__)


def matched_gradient(cfg: DictConfig, setup: Setup, lm: LM):
    """The gradient generation matches (matching.kind), of the loss over the label words' rows or the
    whole vocabulary's. A deeper one needs second-order autograd through attention: eager attention."""
    m = cfg.matching
    head = OutputLayer.build(lm.output_weight, lm.output_bias, setup.verbalizer.label_token_ids, m.loss)
    matched = build_matched_gradient(lm, head, m.kind, list(m.modules), m.lora_rank, m.lora_seed)
    if matched.second_order and lm.model.config._attn_implementation != "eager":
        log.info("matching %s: switching attention to eager for second-order autograd", matched.describe())
        lm.model.set_attn_implementation("eager")
    return matched


class AllRoundsFailed(RuntimeError):
    """No round produced a synthetic text."""


def generate(cfg: DictConfig, out_dir: Path, setup: Setup, lm: LM, tracker: Tracker, started: Clock) -> dict:
    head = matched_gradient(cfg, setup, lm)
    targets, release = cached_targets(cfg, setup.real, lm.device, lambda: compute_targets(cfg, setup, lm, head))
    # From here on only the (noisy, under privacy=dp) targets and public configuration are readable.
    dp.seal(setup.real)
    allowed = allowed_vocabulary(lm.tokenizer, lm.input_embeddings.shape[0])
    rows, failed = generate_rounds(cfg, setup, lm, head, targets, allowed, tracker, out_dir)
    if not processes(cfg).is_main_process:
        return {}
    if not rows:
        # Nothing to score: say so, and keep what failed where a re-run and the report will find it.
        files.write_json(out_dir / "summary.json", {"failed_rounds": failed, "output_dir": str(out_dir)})
        raise AllRoundsFailed(f"every round failed ({len(failed)} of them, after generation.max_restarts="
                              f"{cfg.generation.max_restarts} restarts each); see failed_rounds in "
                              f"{out_dir / 'summary.json'} and the faults in {out_dir / 'rounds'}/.")
    summary = score_and_write(cfg, out_dir, setup, lm, head, targets, allowed, rows, started, failed)
    return {**summary, **({"privacy": release} if release else {})}


def rescore(cfg: DictConfig, out_dir: Path, setup: Setup, lm: LM) -> None:
    """synthetic.jsonl made again from the saved rounds, as generate wrote it (gradmm.runs.manifest: a
    resumed job whose synthetic.jsonl was lost). The targets come from the cache; under privacy=dp a
    missing entry is refused, since computing it again would be a new release."""
    head = matched_gradient(cfg, setup, lm)

    def no_new_release():
        raise RuntimeError(f"{out_dir / 'synthetic.jsonl'} cannot be made again: its targets are gone from "
                           f"{cfg.paths.target_cache_dir}, and computing them again would spend the privacy "
                           "budget on a new release. Restore the file, or run with resume=false.")

    compute = no_new_release if cfg.privacy.name == "dp" else (lambda: compute_targets(cfg, setup, lm, head))
    targets, _ = cached_targets(cfg, setup.real, lm.device, compute)
    dp.seal(setup.real)
    allowed = allowed_vocabulary(lm.tokenizer, lm.input_embeddings.shape[0])
    rounds_dir = out_dir / "rounds"
    jobs = [(k, r) for k in range(len(cfg.task.label_names)) for r in range(cfg.generation.rounds)]
    rows = [row for job in jobs for row in _load_round(rounds_dir, *job)["rows"]]
    score_and_write(cfg, out_dir, setup, lm, head, targets, allowed, rows, Clock.start(), [])


def compute_targets(cfg: DictConfig, setup: Setup, lm: LM, head) -> tuple[list, dict]:
    """Per class, the mean matched gradient of the real examples of that class, or its private
    release under privacy=dp (with the release's facts: noise multiplier, spent epsilon, ...). Each
    call under privacy=dp is a fresh release that spends the budget again: the target cache is what
    makes re-runs, resumed jobs and other processes reuse one."""
    labels = [ex.label for ex in setup.real]
    inputs = setup.verbalizer.encode(lm.tokenizer, [ex.text for ex in setup.real])
    feats = text_features(lm, head, inputs, labels)
    n_classes = len(cfg.task.label_names)
    if cfg.privacy.name == "dp":
        quotas = class_quotas(cfg.generation.n_real, n_classes)
        release = dp.release_targets(feats, labels, mechanism(cfg), quotas)
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


def class_objective(cfg: DictConfig, targets: list[Gradient], k: int) -> Objective:
    others = vsum([t for j, t in enumerate(targets) if j != k])
    return Objective(targets[k], cfg.matching.distance, others, cfg.matching.union_weight)


def round_settings(cfg: DictConfig) -> tuple[AdmmParams, Initialisation, Projector]:
    """The plain values a round runs on: ADMM's, the initialisation's, and the projector built from its
    yaml's _target_ with the settings that class declares."""
    gen, proj = cfg.generation, cfg.projector
    admm = AdmmParams(**cfg.admm, checkpoint_every=gen.checkpoint_every)
    init = Initialisation(gen.init, gen.batch_size, gen.seq_len, gen.init_temperature, proj.lm_topk,
                          gen.init_candidates)
    return admm, init, build_projector(proj)


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
    (None right after a fault: the attempt starts from its fresh initialisation). Tensors and plain
    values only (weights_only=True: a planted pickle runs nothing); a checkpoint that cannot be read is
    named, moved aside and its batch starts again from its seeded initialisation."""
    fresh = {"attempt": 0, "faults": [], "state": None}
    if not state_path.is_file():
        return fresh
    try:
        saved = torch.load(state_path, weights_only=True)
        state = saved["state"]
        if state is not None:
            state = RoundState(**{**state, "best": [RoundResult(**best) for best in state["best"]]})
        return {"attempt": int(saved["attempt"]), "faults": list(saved["faults"]), "state": state}
    except Exception as error:  # noqa: BLE001 - whatever is wrong with it, the checkpoint cannot be used
        aside = state_path.with_name(f"{state_path.name}.broken")
        state_path.replace(aside)
        log.warning("checkpoint %s is unreadable (%s); moved to %s, its rounds start again", state_path, error, aside)
        return fresh


def _save_checkpoint(state_path: Path, science: str, attempt: int, faults: list[str], state: RoundState | None) -> None:
    """science: the job's science hash, so that a resumed run refuses another job's checkpoint
    (gradmm.runs.job_directory)."""
    plain = None if state is None else {**vars(state), "best": [vars(best) for best in state.best]}
    files.save_torch(state_path, {"attempt": attempt, "faults": faults, "state": plain, "science_hash": science})


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
    files.write_jsonl(tracker.metrics_path, records)


def _without_group(record: dict) -> dict:
    """A group's record as its round reports it: the group index only means something inside a batch."""
    return {key: value for key, value in record.items() if key != "group"}


def _run_batch_with_restarts(cfg, setup, lm, head, targets, allowed, tracker, rounds_dir, batch) -> None:
    task, max_attempts = cfg.task, cfg.generation.max_restarts + 1
    state_path, science = _checkpoint_path(rounds_dir, batch), science_hash(cfg)
    ctx = MatchingContext(head, [class_objective(cfg, targets, k) for k, _ in batch], [k for k, _ in batch],
                          setup.verbalizer.prompt_ids)
    admm, init, projector = round_settings(cfg)
    names = ", ".join(f"{task.label_names[k]} round {r}" for k, r in batch)
    steps = tqdm(total=cfg.admm.outer_steps, desc=names, leave=False, disable=not processes(cfg).is_main_process)

    def on_outer_step(record):
        k, r = batch[record["group"]]
        tracker.log_outer_step(k, r, _without_group(record))
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
            state = start_round(lm, admm, init, ctx, allowed, setup.prefix_ids,
                                [torch.Generator().manual_seed(seed) for seed in seeds])
            # Saved before it is logged, like every later step: whatever metrics.jsonl shows survives a kill.
            _save_checkpoint(state_path, science, attempt, faults, state)
            for record in state.records:
                k, r = batch[record["group"]]
                tracker.log_outer_step(k, r, _without_group(record))
        else:
            steps.update(state.next_step - 1 - steps.n)
        try:
            results = run_round(lm, admm, projector, ctx, allowed, setup.prefix_ids, state, on_outer_step,
                                functools.partial(_save_checkpoint, state_path, science, attempt, faults))
            break
        except NumericalFault as fault:
            # The batch's rounds share one optimiser state, so all of them restart.
            faults.append(f"attempt {attempt + 1} of {max_attempts}: {fault}")
            log.warning("%s: %s", names, faults[-1])
            attempt, state = attempt + 1, None
            steps.reset()
            # A job killed now resumes with the next attempt, as this one would have gone on.
            _save_checkpoint(state_path, science, attempt, faults, None)
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
        # Whose round this is: a resumed run refuses round files of another job (gradmm.runs.job_directory).
        files.write_json(_round_path(rounds_dir, k, r), {**saved, "science_hash": science})
    state_path.unlink(missing_ok=True)


def score_texts(lm: LM, setup: Setup, head, targets, texts: list[str], labels: list[int], distance):
    """Per-example distance and log-perplexity, and per-class set distance, of texts as a classifier
    reads them (re-tokenised, prompt appended): exactly what fine-tuning on them would see."""
    inputs = setup.verbalizer.encode(lm.tokenizer, texts)
    feats = text_features(lm, head, inputs, labels)
    labels_t = torch.tensor(labels, device=feats.deltas[0].device)
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
    return {m.key: scores[m.key] for m in TEXT_SET_FIGURES}


def leakage_audit(cfg: DictConfig, out_dir: Path) -> dict:
    """What the synthetic texts share with the real examples the generator saw (leakage.jsonl and
    summary figures). A post-hoc audit: it reloads those examples itself, since under privacy=dp they
    are sealed, and nothing reads its result back. Its rows quote real texts and its figures are
    functions of them, so under privacy=dp it runs only into privacy.audit_dir, outside the job
    directory, and summary.json (what people publish) gets where it is, never what it found."""
    private = cfg.privacy.name == "dp"
    if private and cfg.privacy.audit_dir is None:
        return {"audit": "not run: it reads the private examples, so it is outside the DP guarantee; "
                         "privacy.audit_dir=<a private folder> runs it there"}
    real = generator_examples(cfg)
    synthetic = [row["text"] for row in files.read_jsonl(out_dir / "synthetic.jsonl")]
    rows, figures = leakage_report(synthetic, [ex.text for ex in real])
    where = Path(cfg.privacy.audit_dir) / out_dir.name if private else out_dir
    files.write_jsonl(where / "leakage.jsonl", rows)
    if private:
        files.write_json(where / "leakage.json", figures)
        return {"audit": f"in {where}: it reads the private examples, so it is outside the DP guarantee; "
                         "do not publish it"}
    return {**figures, "audit": "post hoc, never used by generation"}


@dataclass(frozen=True)
class Clock:
    """When a job started, by the wall clock and by its process's CPU time (all threads). Jobs of a sweep
    share the cores, so their wall seconds depend on what ran beside them; their CPU seconds do not."""

    wall: float
    cpu: float

    @classmethod
    def start(cls) -> Clock:
        return cls(time.perf_counter(), time.process_time())


def score_and_write(cfg, out_dir: Path, setup: Setup, lm: LM, head, targets, allowed, rows, started: Clock,
                    failed) -> dict:
    """Scores the synthetic set, a random-token set of the same shape and the real examples, as a
    classifier reads them; writes synthetic.jsonl and summary.json."""
    texts, labels = [row["text"] for row in rows], [row["label"] for row in rows]
    synthetic = score_texts(lm, setup, head, targets, texts, labels, cfg.matching.distance)
    rows = [
        {**{key: row[key] for key in ("text", "label", "label_name", "round")}, "grad_distance": d, "log_ppl": p}
        for row, d, p in zip(rows, synthetic["per_example"], synthetic["log_ppl"], strict=True)
    ]
    files.write_jsonl(out_dir / "synthetic.jsonl", rows)

    random_texts = _random_texts(lm, allowed, len(rows), cfg.generation.seq_len, cfg.seed)
    random_scores = score_texts(lm, setup, head, targets, random_texts, labels, cfg.matching.distance)
    real_scores = None
    if not dp.is_sealed(setup.real):
        real_labels = [ex.label for ex in setup.real]
        real_scores = _figures(score_texts(
            lm, setup, head, targets, [ex.text for ex in setup.real], real_labels, cfg.matching.distance
        ))
    summary = {
        "n_synthetic": len(rows),
        **_figures(synthetic),
        "random_baseline": _figures(random_scores),
        "real_examples": real_scores,
        "seconds": time.perf_counter() - started.wall,
        "cpu_seconds": time.process_time() - started.cpu,
        "output_dir": str(out_dir),
        "failed_rounds": failed,
    }
    return summary


def _random_texts(lm: LM, allowed: torch.Tensor, n: int, length: int, seed: int) -> list[str]:
    picks = random_allowed_tokens(allowed, n, length, torch.Generator().manual_seed(seed + 7))
    return [lm.tokenizer.decode(seq).strip() for seq in picks.tolist()]
