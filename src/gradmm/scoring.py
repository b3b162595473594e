"""Scores of text sets as a classifier reads them (gradient distance, log-perplexity), the random-token
baseline next to the synthetic set, and the post-hoc leakage audit."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from gradmm import artifacts, privacy
from gradmm.gradients import balanced_union_distance, example_distances, set_distance
from gradmm.inputs import Setup
from gradmm.matched import text_features
from gradmm.metrics import TEXT_SET_FIGURES
from gradmm.models import LM, mean_nll
from gradmm.projection import random_allowed_tokens
from gradmm.tasks import generator_examples


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
    dp = cfg.privacy.name == "dp"
    if dp and cfg.privacy.audit_dir is None:
        return {"audit": "not run: it reads the private examples, so it is outside the DP guarantee; "
                         "privacy.audit_dir=<a private folder> runs it there"}
    real = generator_examples(cfg)
    synthetic = [row["text"] for row in artifacts.read_jsonl(out_dir / "synthetic.jsonl")]
    rows, figures = privacy.leakage_report(synthetic, [ex.text for ex in real])
    where = Path(cfg.privacy.audit_dir) / out_dir.name if dp else out_dir
    artifacts.write_jsonl(where / "leakage.jsonl", rows)
    if dp:
        artifacts.write_json(where / "leakage.json", figures)
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
        "seconds": time.perf_counter() - started.wall,
        "cpu_seconds": time.process_time() - started.cpu,
        "output_dir": str(out_dir),
        "failed_rounds": failed,
    }
    return summary


def _random_texts(lm: LM, allowed: torch.Tensor, n: int, length: int, seed: int) -> list[str]:
    picks = random_allowed_tokens(allowed, n, length, torch.Generator().manual_seed(seed + 7))
    return [lm.tokenizer.decode(seq).strip() for seq in picks.tolist()]
