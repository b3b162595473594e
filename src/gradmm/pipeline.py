"""The job, top to bottom: validate, load, compute targets, generate per class and round, score, write."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from gradmm import artifacts
from gradmm.admm import NumericalFault, RoundState, run_round, start_round
from gradmm.config import ConfigError, validate
from gradmm.filtering import filter_examples
from gradmm.finetune import (
    Classifier,
    evaluate_trained,
    few_shot_demonstrations,
    make_splits,
    train_and_select,
)
from gradmm.gradients import (
    OutputLayer,
    class_targets,
    example_distances,
    set_distance,
    text_features,
)
from gradmm.models import LM, load_lm, load_tokenizer, mean_nll
from gradmm.projection import MatchingContext, allowed_vocabulary
from gradmm.tasks import Example, Verbalizer, load_split, stratified_sample
from gradmm.tracking import Tracker

log = logging.getLogger(__name__)


@dataclass
class Setup:
    """Everything tokenizer-level, checked before the model is loaded."""

    tokenizer: object
    verbalizer: Verbalizer
    prefix_ids: list[int]
    real: list[Example]


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
    if problems:
        raise ConfigError(problems)
    real = stratified_sample(
        load_split(cfg, cfg.task.train_split), cfg.generation.n_real, len(cfg.task.label_names), cfg.seed
    )
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
    text_ids = [ids[: len(ids) - len(setup.verbalizer.prompt_ids)] for ids in inputs]
    log_ppl = mean_nll(lm, setup.prefix_ids, text_ids).cpu()
    return {
        "per_example": per_example.tolist(),
        "log_ppl": log_ppl.tolist(),
        "grad_distance_mean": float(per_example.mean()),
        "grad_distance_set": float(sum(per_class) / len(per_class)),
        "log_ppl_mean": float(log_ppl.mean()),
    }


def _figures(scores: dict) -> dict:
    return {k: scores[k] for k in ("grad_distance_mean", "grad_distance_set", "log_ppl_mean")}


def run_job(cfg: DictConfig, out_dir: Path) -> dict:
    """Runs cfg.stages in order; each stage skips work its earlier run already saved in out_dir."""
    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    artifacts.write_atomic(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    setup = prepare(cfg)
    lm = load_lm(cfg.model, cfg.paths.cache_dir)
    torch.manual_seed(cfg.seed)
    summary_path = out_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if cfg.resume and summary_path.is_file() else {}
    source = out_dir if "generate" in cfg.stages else Path(cfg.data.synthetic_from)
    tracker = Tracker(cfg, out_dir)
    try:
        if "generate" in cfg.stages and "n_synthetic" not in summary:
            summary.update(generate(cfg, out_dir, setup, lm, tracker, started))
            artifacts.write_json(summary_path, summary)
        if "filter" in cfg.stages and "filter" not in summary:
            summary["filter"] = filter_stage(cfg, setup, lm, source, out_dir)
            artifacts.write_json(summary_path, summary)
        if "evaluate" in cfg.stages and "accuracy" not in summary:
            summary.update(evaluate_stage(cfg, setup, lm, source if "filter" not in cfg.stages else out_dir, out_dir))
            artifacts.write_json(summary_path, summary)
        tracker.summary(summary)
        tracker.finish(0)
        return summary
    except BaseException:
        tracker.finish(1)
        raise


def filter_stage(cfg: DictConfig, setup: Setup, lm: LM, source: Path, out_dir: Path) -> dict:
    rows = artifacts.read_jsonl(source / "synthetic.jsonl")
    n_classes = len(cfg.task.label_names)
    predictions = None
    if cfg.filter.classifier == "zero_shot":
        predictions = Classifier(lm, setup.verbalizer).predict([row["text"] for row in rows]).tolist()
    kept, dropped = filter_examples(
        rows, predictions, n_classes, cfg.filter.n_per_class, cfg.filter.near_duplicate, cfg.filter.log_ppl_weight
    )
    artifacts.write_jsonl(out_dir / "synthetic_filtered.jsonl", kept)
    return {"n_in": len(rows), "n_kept": len(kept), "dropped": dropped}


def evaluate_stage(cfg: DictConfig, setup: Setup, lm: LM, source: Path, out_dir: Path) -> dict:
    """Accuracy of the model fine-tuned on `evaluate.train_on`, over `evaluate.seeds`, with the
    baselines next to it. Each trained model's result is saved on its own, so a re-run resumes."""
    ev, n_classes = cfg.evaluate, len(cfg.task.label_names)
    evaluation = load_split(cfg, cfg.task.eval_split)
    if ev.max_eval is not None and ev.max_eval < len(evaluation):
        evaluation = stratified_sample(evaluation, ev.max_eval, n_classes, cfg.seed + 3)
    splits = make_splits(load_split(cfg, cfg.task.train_split), evaluation, setup.real, ev.n_dev, n_classes, cfg.seed)
    classifier = Classifier(lm, setup.verbalizer)
    results_dir = out_dir / "evaluation"
    results_dir.mkdir(exist_ok=True)

    def training_set(method: str, seed: int) -> list[Example]:
        if method in ("synthetic", "synthetic_filtered"):
            name = "synthetic.jsonl" if method == "synthetic" else "synthetic_filtered.jsonl"
            return [Example(r["text"], r["label"], i) for i, r in enumerate(artifacts.read_jsonl(source / name))]
        if method == "real_seen":
            return list(setup.real)
        return stratified_sample(splits.pool, ev.n_train, n_classes, cfg.seed + 100 + seed)

    def run(method: str, seed: int) -> dict:
        path = results_dir / f"{method}_seed{seed}.json"
        if path.is_file():
            return json.loads(path.read_text())
        if method == "zero_shot":
            result = classifier.accuracy(splits.evaluation, n_classes)
        elif method == "few_shot":
            demos = few_shot_demonstrations(setup.real, ev.few_shot_k, n_classes, cfg.seed + seed)
            result = classifier.accuracy(splits.evaluation, n_classes, classifier.demonstrations(demos))
        else:
            train = training_set(method, seed)
            selected = train_and_select(lm, setup.verbalizer, train, splits.dev, cfg, n_classes, cfg.seed + seed)
            result = {
                **evaluate_trained(lm, setup.verbalizer, selected, splits.evaluation, n_classes),
                "n_train": len(train),
                **{k: selected[k] for k in ("dev_accuracy", "lr", "step", "dev_curve")},
            }
        artifacts.write_json(path, result)
        return result

    def aggregate(method: str) -> dict:
        seeds = [0] if method == "zero_shot" else list(ev.seeds)
        runs = [run(method, seed) for seed in tqdm(seeds, desc=f"evaluate {method}", leave=False)]
        accuracies = torch.tensor([r["accuracy"] for r in runs])
        return {
            "mean": float(accuracies.mean()),
            "std": float(accuracies.std()) if len(runs) > 1 else 0.0,
            "per_class_accuracy": torch.tensor([r["per_class_accuracy"] for r in runs]).mean(0).tolist(),
            "runs": runs,
        }

    main_result = aggregate(ev.train_on)
    baselines = {name: aggregate(name) for name in ev.baselines}
    return {
        "accuracy": main_result["mean"],
        "accuracy_std": main_result["std"],
        "per_class_accuracy": main_result["per_class_accuracy"],
        "evaluation": {"train_on": ev.train_on, "n_eval": len(splits.evaluation), "n_dev": len(splits.dev),
                       **main_result},
        "baselines": {name: {"mean": b["mean"], "std": b["std"]} for name, b in baselines.items()},
    }


def generate(cfg: DictConfig, out_dir: Path, setup: Setup, lm: LM, tracker: Tracker, started: float) -> dict:
    head = OutputLayer.build(lm.output_weight, lm.output_bias, setup.verbalizer.label_token_ids, cfg.matching.loss)
    targets = compute_targets(cfg, setup, lm, head)
    allowed = allowed_vocabulary(lm.tokenizer, lm.input_embeddings.shape[0])
    rows, failed = generate_rounds(cfg, setup, lm, head, targets, allowed, tracker, out_dir)
    return score_and_write(cfg, out_dir, setup, lm, head, targets, allowed, rows, started, failed)


def compute_targets(cfg: DictConfig, setup: Setup, lm: LM, head: OutputLayer) -> list[torch.Tensor]:
    """Per class, the mean last-layer gradient of the real examples of that class."""
    labels = [ex.label for ex in setup.real]
    inputs = setup.verbalizer.encode(lm.tokenizer, [ex.text for ex in setup.real])
    return class_targets(text_features(lm, head, inputs, labels), labels, len(cfg.task.label_names))


def generate_rounds(cfg, setup: Setup, lm: LM, head, targets, allowed, tracker: Tracker, out_dir: Path):
    """Every (class, round) batch of synthetic sequences, as output rows (text, label, round), and
    the rounds that failed. Finished rounds and the round in progress live in out_dir/rounds/, so a
    re-run continues where the last one stopped, with identical results."""
    task, gen = cfg.task, cfg.generation
    rounds_dir = out_dir / "rounds"
    rounds_dir.mkdir(exist_ok=True)
    jobs = [(k, r) for k in range(len(task.label_names)) for r in range(gen.rounds)]
    done = {job: _load_round(rounds_dir, *job) for job in jobs}
    _rewrite_metrics(tracker, rounds_dir, jobs, done)
    for k, r in tqdm(jobs, desc="rounds", unit="round"):
        if done[(k, r)] is None:
            done[(k, r)] = _run_round_with_restarts(cfg, setup, lm, head, targets[k], allowed, tracker, rounds_dir, k, r)
    rows = [row for job in jobs for row in done[job]["rows"]]
    failed = [{"class": k, "round": r, "error": done[(k, r)]["failed"]} for k, r in jobs if done[(k, r)].get("failed")]
    return rows, failed


def _round_paths(rounds_dir: Path, k: int, r: int) -> tuple[Path, Path]:
    stem = rounds_dir / f"class{k}_round{r}"
    return stem.with_suffix(".json"), stem.with_suffix(".state.pt")


def _load_round(rounds_dir: Path, k: int, r: int) -> dict | None:
    finished, _ = _round_paths(rounds_dir, k, r)
    return json.loads(finished.read_text()) if finished.is_file() else None


def _rewrite_metrics(tracker: Tracker, rounds_dir: Path, jobs, done) -> None:
    """metrics.jsonl holds exactly the steps that survive in saved rounds and checkpoints, so steps
    recomputed after a resume are not logged twice."""
    records = []
    for k, r in jobs:
        saved = done[(k, r)]
        if saved is None:
            _, state_path = _round_paths(rounds_dir, k, r)
            saved = {"records": torch.load(state_path, weights_only=False).records} if state_path.is_file() else None
        if saved is not None:
            records += [{"class": k, "round": r, **rec} for rec in saved["records"]]
    artifacts.write_jsonl(tracker.metrics_path, records)


def _run_round_with_restarts(cfg, setup, lm, head, target, allowed, tracker, rounds_dir, k, r) -> dict:
    task = cfg.task
    finished, state_path = _round_paths(rounds_dir, k, r)
    ctx = MatchingContext(head, target, k, setup.verbalizer.prompt_ids, cfg.matching.distance)
    steps = tqdm(total=cfg.admm.outer_steps, desc=f"class {task.label_names[k]} round {r}", leave=False)

    def on_outer_step(record):
        tracker.log({"class": k, "round": r, **record})
        steps.set_postfix(d_z=f"{record['grad_distance_z']:.4f}", ppl=f"{record['log_ppl_z']:.2f}")
        steps.update()

    def on_checkpoint(state: RoundState):
        _save_torch(state, state_path)

    error = None
    for attempt in range(cfg.generation.max_restarts + 1):
        if state_path.is_file():
            state = torch.load(state_path, weights_only=False)
            steps.update(state.next_step - 1 - steps.n)
        else:
            # Seeded by (seed, class, round, attempt) alone, so rounds are independent of each other
            # and of the order they run in.
            generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + k * 1_009 + r * 17 + attempt)
            state = start_round(lm, cfg, ctx, allowed, setup.prefix_ids, generator)
            for record in state.records:
                tracker.log({"class": k, "round": r, **record})
        try:
            result = run_round(lm, cfg, ctx, allowed, setup.prefix_ids, state, on_outer_step, on_checkpoint)
            break
        except NumericalFault as fault:
            error = f"{fault} (attempt {attempt + 1} of {cfg.generation.max_restarts + 1})"
            log.warning("class %s round %d: %s; restarting from a fresh initialisation", task.label_names[k], r, error)
            state_path.unlink(missing_ok=True)
            steps.reset()
    else:
        steps.close()
        saved = {"rows": [], "records": [], "failed": error}
        artifacts.write_json(finished, saved)
        return saved
    steps.close()
    rows = [
        {"text": lm.tokenizer.decode(seq).strip(), "label": k, "label_name": task.label_names[k], "round": r}
        for seq in result.tokens.tolist()
    ]
    saved = {"rows": rows, "records": state.records, "best_outer_step": result.best_outer_step}
    artifacts.write_json(finished, saved)
    state_path.unlink(missing_ok=True)
    return saved


def _save_torch(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def score_and_write(cfg, out_dir: Path, setup: Setup, lm: LM, head, targets, allowed, rows, started, failed) -> dict:
    """Scores the synthetic set, a random-token set of the same shape and the real examples, as a
    classifier reads them; writes synthetic.jsonl and summary.json."""
    texts, labels = [row["text"] for row in rows], [row["label"] for row in rows]
    synthetic = score_texts(lm, setup, head, targets, texts, labels, cfg.matching.distance)
    rows = [
        {**{key: row[key] for key in ("text", "label", "label_name", "round")}, "grad_distance": d, "log_ppl": p}
        for row, d, p in zip(rows, synthetic["per_example"], synthetic["log_ppl"])
    ]
    artifacts.write_jsonl(out_dir / "synthetic.jsonl", rows)

    random_texts = _random_texts(lm, allowed, len(rows), cfg.generation.seq_len, cfg.seed)
    random_scores = score_texts(lm, setup, head, targets, random_texts, labels, cfg.matching.distance)
    real_labels = [ex.label for ex in setup.real]
    real_scores = score_texts(
        lm, setup, head, targets, [ex.text for ex in setup.real], real_labels, cfg.matching.distance
    )
    summary = {
        "n_synthetic": len(rows),
        **_figures(synthetic),
        "random_baseline": _figures(random_scores),
        "real_examples": _figures(real_scores),
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
    """Validates, runs, prints where the outputs are; returns the objective sweepers minimise."""
    from hydra.core.hydra_config import HydraConfig

    validate(cfg)
    if cfg.validate_only:
        prepare(cfg)
        print("config is valid")
        return None
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    # SLURM sends SIGTERM before preemption: treat it like Ctrl-C so the W&B run is finished and the
    # message below is printed; the last checkpoint (at most one outer step old) is already on disk.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        summary = run_job(cfg, out_dir)
    except KeyboardInterrupt:
        print(f"\nInterrupted. Progress is saved in {out_dir}/; run the same command again to resume.",
              file=sys.stderr)
        sys.exit(130)
    print_summary(summary, out_dir)
    return summary.get("accuracy", summary.get("grad_distance_set"))


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def print_summary(summary: dict, out_dir: Path, n_examples: int = 6) -> None:
    print(f"\nOutputs in {out_dir}/ (summary.json, synthetic.jsonl, metrics.jsonl, config.yaml, ...)")
    if "n_synthetic" in summary:
        print(f"{'':24}{'grad_distance_set':>18}{'grad_distance_mean':>20}{'log_ppl_mean':>14}")
        for name, figures in [("synthetic", summary), ("random tokens", summary["random_baseline"]),
                              ("real examples", summary["real_examples"])]:
            print(f"{name:24}{figures['grad_distance_set']:>18.4f}{figures['grad_distance_mean']:>20.4f}"
                  f"{figures['log_ppl_mean']:>14.2f}")
        rows = artifacts.read_jsonl(out_dir / "synthetic.jsonl")
        print(f"\n{summary['n_synthetic']} synthetic examples in {summary['seconds']:.0f} s; a few of them:")
        for row in rows[:: max(1, len(rows) // n_examples)][:n_examples]:
            print(f"  [{row['label_name']}] d={row['grad_distance']:.4f} log_ppl={row['log_ppl']:.2f}  {row['text']}")
    if "filter" in summary:
        f = summary["filter"]
        print(f"\nfilter: kept {f['n_kept']} of {f['n_in']} (dropped: {f['dropped']})")
    if "accuracy" in summary:
        ev = summary["evaluation"]
        print(f"\naccuracy on {ev['n_eval']} held-out examples after fine-tuning on {ev['train_on']}: "
              f"{summary['accuracy']:.3f} +- {summary['accuracy_std']:.3f}")
        for name, b in summary["baselines"].items():
            print(f"  {name:14} {b['mean']:.3f} +- {b['std']:.3f}")
