"""How fast the generator is, against the floors that bound it.

    make bench                                  # full: the job's model, B in {8, 32}, L in {16, 64}
    python benchmarks/bench.py --smoke          # tiny random model, seconds (CI runs it)
    python benchmarks/bench.py model.dtype=float32 model.autocast=bfloat16 model.compile=true  # on a GPU

Any argument of the form key=value is a Hydra override of the job config (conf/config.yaml). Per batch
size and length it times the inner ADMM step against one plain forward+backward to the input embeddings
(its floor), and the projections against one forward of the batch and against L single-token steps of
the batch through the KV cache (the floor of any left-to-right decode): topk_lm (KV-cached decode),
topk_lm re-running the whole prefix per position (the reference code's way), matching_lm (the default:
first-order proposals checked exactly in two batched passes) and matching_lm_exact (every candidate checked
exactly, position by position; where affordable also by a full forward each) on the same points and
current tokens, with the discrete matching loss and log-perplexity each reaches. It times one whole outer
step of the default projector against its own inner steps (the outer step's overhead). It also estimates the
default job's generation seconds per synthetic example from its first outer steps, and the seconds per
round of an outer step with several rounds in one batch (generation.rounds_per_batch), and, when the job
runs in anything but plain float32 (model.dtype, model.autocast, model.compile), how far its gradient
distances are from float32's on the same sequences (the target: within 1e-2). Writes
outputs/bench/bench.json (one record per configuration) and prints a table. Through the job's tracker
(W&B offline without a key; `tracker=disabled` turns it off, as --smoke does) it also logs one run
of job type `bench` per call, kept in outputs/bench/runs/<UTC time>-<random>/: every figure in the summary as
`bench/<case>/<figure>` (case B8_L16, end_to_end, rounds_per_batch4, precision) and the records as
the table `bench/records`. Nothing is logged until every timing is done.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf, open_dict

from gradmm.config.schemas import register_configs
from gradmm.config.validation import validate
from gradmm.data.models import LM, load_lm, mean_nll
from gradmm.method.admm import inner_step, run_round, start_round
from gradmm.method.projectors import (
    MatchingContext,
    allowed_vocabulary,
    decode,
    project_matching_lm,
    project_matching_lm_exact,
    project_topk_lm,
)
from gradmm.pipeline import prepare
from gradmm.reporting.tracking import Tracker
from gradmm.runs import files
from gradmm.stages.generate import class_objective, compute_targets, matched_gradient, round_settings

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
FULL = {"batch_sizes": (8, 32), "seq_lens": (16, 64), "repeats": 3, "plain_matching_max_tokens": 0,
        "e2e_outer_steps": 1, "rounds_per_batch": (1, 4), "overrides": []}
SMOKE = {"batch_sizes": (2, 4), "seq_lens": (4, 8), "repeats": 1, "plain_matching_max_tokens": 10**9,
         "e2e_outer_steps": 1, "rounds_per_batch": (1, 2),
         "overrides": ["model=tiny", "tracker=disabled", "generation.n_real=8", "admm.inner_steps=2",
                       "admm.outer_steps=2", "projector.topk=20", "projector.lm_topk=20",
                       "projector.exact_candidates=2", "projector.swaps_per_row=2"]}


def load_config(overrides: list[str]) -> DictConfig:
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median wall seconds of `fn()` over `repeats` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        started = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: peak allocated since the last reset. CPU: the process's peak resident set so far (Linux
    reports kilobytes), which only grows, so it bounds every configuration measured up to here."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "load_average_1min": os.getloadavg()[0],
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def speed_options(lm: LM, cfg: DictConfig) -> dict:
    def name(dtype):
        return None if dtype is None else str(dtype).removeprefix("torch.")

    return {"dtype": name(lm.dtype), "autocast": name(lm.autocast_dtype), "compile": bool(cfg.model.compile)}


def bench_shape(
    lm: LM, cfg: DictConfig, ctx: MatchingContext, allowed, prefix_ids, batch_size: int, seq_len: int,
    mode: dict,
) -> dict:
    device, proj, repeats = lm.device, cfg.projector, mode["repeats"]
    shape_cfg = cfg.copy()
    with open_dict(shape_cfg):
        shape_cfg.generation.batch_size, shape_cfg.generation.seq_len = batch_size, seq_len
    reset_peak_memory(device)
    admm, init, _ = round_settings(shape_cfg)
    state = start_round(lm, admm, init, ctx, allowed, prefix_ids, [torch.Generator().manual_seed(0)])
    x = state.x.clone().requires_grad_(True)
    u, z = torch.zeros_like(x), state.z
    z_emb = lm.input_embeddings[z].float()
    optimizer = torch.optim.Adam([x], lr=cfg.admm.lr)
    inner_s = timed(lambda: inner_step(lm, ctx, x, z_emb, u, optimizer, admm), device, repeats)

    prompt = lm.input_embeddings[torch.tensor(ctx.prompt_ids, device=device)]
    inputs = torch.cat([x.detach().to(lm.dtype), prompt.expand(batch_size, -1, -1)], dim=1)

    def forward():
        with torch.no_grad():
            lm.last_hidden(inputs_embeds=inputs)

    def forward_backward():
        """The floor: one plain forward and backward to the embeddings, in the attention the job uses."""
        leaf = inputs.detach().requires_grad_(True)
        lm.last_hidden(inputs_embeds=leaf).float().sum().backward()

    def decode_steps():
        """Any left-to-right decode's floor: L single-token steps through the KV cache, no rule."""
        decode(lm, prefix_ids, batch_size, seq_len, lambda t, hidden: z[:, t])

    forward_s = timed(forward, device, repeats)
    fwd_bwd_s = timed(forward_backward, device, repeats)
    decode_steps_s = timed(decode_steps, device, repeats)

    points = x.detach() + u
    matching = dict(topk=proj.topk, lm_topk=proj.lm_topk, match_weight=proj.match_weight, prefix_ids=prefix_ids)
    # Projections are the slow part: timed once each, after the model is warm.
    results = {}

    def run_projection(name, fn):
        _sync(device)
        started = time.perf_counter()
        results[name] = fn()
        _sync(device)
        return time.perf_counter() - started

    topk_s = run_projection("topk_lm", lambda: project_topk_lm(lm, points, allowed, proj.topk, prefix_ids))
    naive_s = run_projection(
        "naive", lambda: project_topk_lm(lm, points, allowed, proj.topk, prefix_ids, reuse_cache=False)
    )
    matching_s = run_projection("matching_lm", lambda: project_matching_lm(
        lm, points, z, allowed, ctx, swaps_per_row=proj.swaps_per_row, **matching).tokens)
    exact_s = run_projection("matching_lm_exact", lambda: project_matching_lm_exact(
        lm, points, z, allowed, ctx, exact_candidates=proj.exact_candidates, **matching))
    plain_s = same_tokens = None
    if batch_size * seq_len <= mode["plain_matching_max_tokens"]:
        plain_s = run_projection("plain", lambda: project_matching_lm_exact(
            lm, points, z, allowed, ctx, exact_candidates=proj.exact_candidates, incremental=False, **matching))
        same_tokens = bool(torch.equal(results["plain"], results["matching_lm_exact"]))
    with torch.no_grad():
        quality = {name: (ctx.group_losses(ctx.features(lm, tokens)).item(),
                          mean_nll(lm, prefix_ids, tokens.tolist()).mean().item())
                   for name, tokens in [("current", z), ("matching_lm", results["matching_lm"]),
                                        ("matching_lm_exact", results["matching_lm_exact"])]}
    outer = outer_step(lm, shape_cfg, ctx, allowed, prefix_ids)
    return {
        "kind": "shape",
        "model": cfg.model.name,
        "device": str(device),
        **speed_options(lm, cfg),
        "batch_size": batch_size,
        "seq_len": seq_len,
        "prompt_len": len(ctx.prompt_ids),
        "matched": ctx.matched.describe(),
        "inner_step_s": inner_s,
        "fwd_bwd_s": fwd_bwd_s,
        "inner_step_over_fwd_bwd": inner_s / fwd_bwd_s,
        "forward_s": forward_s,
        "projector": "matching_lm",
        "projection_s": matching_s,
        "projection_over_forward": matching_s / forward_s,
        "projection_over_inner_step": matching_s / inner_s,
        "exact_projection_s": exact_s,
        "exact_projection_over_forward": exact_s / forward_s,
        "exact_over_matching_lm": exact_s / matching_s,
        **{f"{name}_grad_distance": d for name, (d, _) in quality.items()},
        **{f"{name}_log_ppl": ppl for name, (_, ppl) in quality.items()},
        **outer,
        "topk_lm_projection_s": topk_s,
        "topk_lm_over_forward": topk_s / forward_s,
        "decode_steps_s": decode_steps_s,
        "decode_steps_over_forward": decode_steps_s / forward_s,
        "topk_lm_over_decode_steps": topk_s / decode_steps_s,
        "naive_projection_s": naive_s,
        "naive_projection_over_forward": naive_s / forward_s,
        "naive_same_tokens": bool(torch.equal(results["naive"], results["topk_lm"])),
        "matching_plain_projection_s": plain_s,
        "matching_plain_same_tokens": same_tokens,
        "peak_mem_mb": peak_memory_mb(device),
    }


def outer_step(lm: LM, cfg: DictConfig, ctx: MatchingContext, allowed, prefix_ids) -> dict:
    """One whole outer step of the job's ADMM and projector from a fresh start: its seconds against the
    seconds of its own `admm.inner_steps` inner steps (what an outer step adds to them)."""
    admm, init, projector = round_settings(with_outer_steps(cfg, 1))
    state = start_round(lm, admm, init, ctx, allowed, prefix_ids, [torch.Generator().manual_seed(1)])
    run_round(lm, admm, projector, ctx, allowed, prefix_ids, state)
    step = state.records[-1]
    return {"outer_step_s": step["seconds"], "outer_inner_steps_s": step["inner_seconds"],
            "outer_projection_s": step["projection_seconds"], "inner_steps": admm.inner_steps,
            "outer_step_over_inner_steps": step["seconds"] / step["inner_seconds"]}


def with_outer_steps(cfg: DictConfig, outer_steps: int) -> DictConfig:
    """The job cut to `outer_steps` outer steps, with no checkpoint written (timing, not resuming)."""
    short = cfg.copy()
    with open_dict(short):
        short.admm.outer_steps = outer_steps
        short.admm.patience = None  # every outer step is timed
        short.generation.checkpoint_every = outer_steps + 1
    return short


def bench_end_to_end(lm: LM, cfg: DictConfig, setup, head, allowed, outer_steps: int) -> dict:
    """Generation seconds per synthetic example of the job `cfg` describes: the targets, then one
    round per class, run for `outer_steps` outer steps and extrapolated to admm.outer_steps.
    Scoring, filtering and evaluation are not included."""
    device, n_classes, gen = lm.device, len(cfg.task.label_names), cfg.generation
    reset_peak_memory(device)
    _sync(device)
    started = time.perf_counter()
    targets, _ = compute_targets(cfg, setup, lm, head)
    _sync(device)
    targets_s = time.perf_counter() - started
    short = with_outer_steps(cfg, outer_steps)
    round_s = []
    for k in range(n_classes):
        ctx = MatchingContext(head, [class_objective(cfg, targets, k)], [k], setup.verbalizer.prompt_ids)
        admm, init, projector = round_settings(short)
        state = start_round(lm, admm, init, ctx, allowed, setup.prefix_ids, [torch.Generator().manual_seed(k)])
        run_round(lm, admm, projector, ctx, allowed, setup.prefix_ids, state)
        start_s, outer = state.records[0]["seconds"], [r["seconds"] for r in state.records[1:]]
        round_s.append(start_s + cfg.admm.outer_steps * statistics.mean(outer))
    total = targets_s + gen.rounds * sum(round_s)
    return {
        "kind": "end_to_end",
        "model": cfg.model.name,
        "device": str(device),
        "batch_size": gen.batch_size,
        "seq_len": gen.seq_len,
        "rounds": gen.rounds,
        "outer_steps": cfg.admm.outer_steps,
        "inner_steps": cfg.admm.inner_steps,
        "projector": cfg.projector.name,
        "matched": head.describe(),
        "measured_outer_steps": outer_steps,
        "targets_s": targets_s,
        "round_s": statistics.mean(round_s),
        "generation_s": total,
        "n_synthetic": n_classes * gen.rounds * gen.batch_size,
        "s_per_synthetic_example": total / (n_classes * gen.rounds * gen.batch_size),
        "peak_mem_mb": peak_memory_mb(device),
    }


def bench_batching(lm: LM, cfg: DictConfig, setup, head, targets, allowed, rounds_per_batch: int) -> dict:
    """One outer step of `rounds_per_batch` rounds side by side (classes alternating), in seconds per
    round: against rounds_per_batch=1, the gain from batching rounds (generation.rounds_per_batch)."""
    device, n_classes = lm.device, len(targets)
    labels = [g % n_classes for g in range(rounds_per_batch)]
    ctx = MatchingContext(head, [class_objective(cfg, targets, k) for k in labels], labels,
                          setup.verbalizer.prompt_ids)
    short = with_outer_steps(cfg, 1)
    reset_peak_memory(device)
    generators = [torch.Generator().manual_seed(g) for g in range(rounds_per_batch)]
    admm, init, projector = round_settings(short)
    state = start_round(lm, admm, init, ctx, allowed, setup.prefix_ids, generators)
    run_round(lm, admm, projector, ctx, allowed, setup.prefix_ids, state)
    step_s = state.records[-1]["seconds"]
    return {
        "kind": "batching",
        "model": cfg.model.name,
        "device": str(device),
        "batch_size": cfg.generation.batch_size,
        "seq_len": cfg.generation.seq_len,
        "rounds_per_batch": rounds_per_batch,
        "outer_step_s": step_s,
        "outer_step_s_per_round": step_s / rounds_per_batch,
        "peak_mem_mb": peak_memory_mb(device),
    }


PRECISION_TOLERANCE = 1e-2  # the issue's bound on the gradient distance's change from float32


def bench_precision(lm: LM, cfg: DictConfig, setup, head, targets, allowed) -> dict | None:
    """The job's speed options (model.dtype, autocast, compile) against float32, on the same sequences:
    each model matches them against its own class targets, as a run under those options would. None
    when the job already runs in plain float32."""
    if lm.dtype == torch.float32 and lm.autocast_dtype is None and not cfg.model.compile:
        return None
    reference_cfg = cfg.copy()
    with open_dict(reference_cfg):
        reference_cfg.model.dtype, reference_cfg.model.autocast, reference_cfg.model.compile = "float32", None, False
    reference = load_lm(reference_cfg.model, cfg.paths.cache_dir)
    reference_head = matched_gradient(cfg, setup, reference)
    reference_targets, _ = compute_targets(reference_cfg, setup, reference, reference_head)
    gen, allowed_ids = cfg.generation, allowed.nonzero().squeeze(-1)
    diffs = []
    for k in range(len(targets)):
        ctx = MatchingContext(head, [class_objective(cfg, targets, k)], [k], setup.verbalizer.prompt_ids)
        reference_ctx = MatchingContext(reference_head, [class_objective(cfg, reference_targets, k)], [k],
                                        setup.verbalizer.prompt_ids)
        sampled = start_round(lm, *round_settings(cfg)[:2], ctx, allowed, setup.prefix_ids,
                              [torch.Generator().manual_seed(k)]).z
        random = allowed_ids[torch.randint(len(allowed_ids), sampled.shape, generator=torch.Generator().manual_seed(k))]
        for tokens in (sampled, random.to(sampled.device)):
            with torch.no_grad():
                distance = ctx.group_losses(ctx.features(lm, tokens)).item()
                reference_distance = reference_ctx.group_losses(reference_ctx.features(reference, tokens)).item()
            diffs.append((distance, reference_distance))
    worst = max(abs(d - r) for d, r in diffs)
    return {
        "kind": "precision",
        "model": cfg.model.name,
        "device": str(lm.device),
        **speed_options(lm, cfg),
        "batch_size": gen.batch_size,
        "seq_len": gen.seq_len,
        "grad_distances": [d for d, _ in diffs],
        "float32_grad_distances": [r for _, r in diffs],
        "max_abs_diff": worst,
        "within_tolerance": worst <= PRECISION_TOLERANCE,
    }


def case(record: dict) -> str:
    """Which measurement a record is, as one segment of a W&B key."""
    if record["kind"] == "shape":
        return f"B{record['batch_size']}_L{record['seq_len']}"
    if record["kind"] == "batching":
        return f"rounds_per_batch{record['rounds_per_batch']}"
    return record["kind"]


def log_to_tracker(cfg: DictConfig, records: list[dict], runs_dir: Path) -> None:
    """One W&B run per call, in a new folder: a folder's wandb_run_id would resume an earlier run."""
    if cfg.tracker.mode == "disabled":
        return
    runs_dir.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%dT%H%M%SZ-", time.gmtime()), dir=runs_dir))
    tracker = Tracker(cfg, run_dir, job_type="bench", makes_dataset=False)
    for record in records:
        tracker.log({"stage": "bench", **{f"{case(record)}/{name}": value for name, value in record.items()}})
    tracker.log_table("bench/records", [{"case": case(r), **r} for r in records])
    tracker.finish()


def print_table(records: list[dict]) -> None:
    def num(value, fmt):
        return "-" if value is None else format(value, fmt)

    for r in records[:1]:
        print(f"matched gradient: {r['matched']}")
    print(f"{'B':>4}{'L':>5}{'inner s':>9}{'fwd+bwd':>9}{'ratio':>7}{'fwd s':>8}{'L steps':>9}{'x fwd':>7}"
          f"{'topk_lm':>9}{'x fwd':>7}"
          f"{'naive':>9}{'x fwd':>7}{'matching':>10}{'x fwd':>7}{'plain':>9}{'peak MB':>9}")
    for r in (r for r in records if r["kind"] == "shape"):
        print(f"{r['batch_size']:>4}{r['seq_len']:>5}{r['inner_step_s']:>9.3f}{r['fwd_bwd_s']:>9.3f}"
              f"{r['inner_step_over_fwd_bwd']:>7.2f}{r['forward_s']:>8.3f}{r['decode_steps_s']:>9.3f}"
              f"{r['decode_steps_over_forward']:>7.1f}{r['topk_lm_projection_s']:>9.3f}"
              f"{r['topk_lm_over_forward']:>7.1f}{r['naive_projection_s']:>9.3f}"
              f"{r['naive_projection_over_forward']:>7.1f}{r['projection_s']:>10.3f}"
              f"{r['projection_over_forward']:>7.1f}{num(r['matching_plain_projection_s'], '9.3f'):>9}"
              f"{r['peak_mem_mb']:>9.0f}")
    for r in (r for r in records if r["kind"] == "shape"):
        print(f"B={r['batch_size']} L={r['seq_len']}: one outer step {r['outer_step_s']:.2f} s = "
              f"{r['outer_step_over_inner_steps']:.2f}x its {r['inner_steps']} inner steps "
              f"({r['outer_inner_steps_s']:.2f} s); "
              f"matching_lm {r['projection_s']:.2f} s ({r['projection_over_inner_step']:.1f} inner steps), "
              f"matching_lm_exact {r['exact_projection_s']:.2f} s ({r['exact_over_matching_lm']:.1f}x); "
              f"grad distance / log-ppl: current {r['current_grad_distance']:.4f} / {r['current_log_ppl']:.2f}, "
              f"matching_lm {r['matching_lm_grad_distance']:.4f} / {r['matching_lm_log_ppl']:.2f}, "
              f"matching_lm_exact {r['matching_lm_exact_grad_distance']:.4f} / {r['matching_lm_exact_log_ppl']:.2f}")
    for r in (r for r in records if r["kind"] == "end_to_end"):
        print(f"end to end ({r['model']}, {r['device']}, B={r['batch_size']}, L={r['seq_len']}, "
              f"{r['outer_steps']}x{r['inner_steps']} steps, {r['projector']}): "
              f"{r['s_per_synthetic_example']:.2f} s per synthetic example "
              f"(from {r['measured_outer_steps']} measured outer step(s) per class; generation only)")
    batching = [r for r in records if r["kind"] == "batching"]
    for r in batching:
        print(f"rounds_per_batch={r['rounds_per_batch']} (B={r['batch_size']}, L={r['seq_len']}): "
              f"{r['outer_step_s']:.2f} s per outer step, {r['outer_step_s_per_round']:.2f} s per round, "
              f"{batching[0]['outer_step_s_per_round'] / r['outer_step_s_per_round']:.2f}x "
              f"rounds_per_batch={batching[0]['rounds_per_batch']}'s throughput")
    for r in (r for r in records if r["kind"] == "precision"):
        print(f"precision (dtype {r['dtype']}, autocast {r['autocast']}, compile {r['compile']}) against float32: "
              f"gradient distance differs by at most {r['max_abs_diff']:.2e} over {len(r['grad_distances'])} "
              f"sets of sampled and random sequences ({'within' if r['within_tolerance'] else 'OUTSIDE'} "
              f"{PRECISION_TOLERANCE})")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny model and shapes: seconds")
    parser.add_argument("--out", default="outputs/bench/bench.json")
    # On a CPU shared with other jobs, 2 threads on 2 busy cores ran 6-8x slower than 1 thread here.
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", help="instead of the mode's")
    parser.add_argument("--seq-lens", type=int, nargs="+", help="instead of the mode's")
    parser.add_argument("--rounds-per-batch", type=int, nargs="*", help="instead of the mode's (none: skip)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the job config")
    args = parser.parse_args(argv)
    mode = SMOKE if args.smoke else FULL
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(mode["overrides"] + args.overrides)
    validate(cfg)
    setup = prepare(cfg)
    started_info = machine()
    lm = load_lm(cfg.model, cfg.paths.cache_dir)
    head = matched_gradient(cfg, setup, lm)
    allowed = allowed_vocabulary(lm.tokenizer, lm.input_embeddings.shape[0])
    torch.manual_seed(cfg.seed)

    records = [bench_end_to_end(lm, cfg, setup, head, allowed, mode["e2e_outer_steps"])]
    targets, _ = compute_targets(cfg, setup, lm, head)
    label = len(targets) - 1
    ctx = MatchingContext(head, [class_objective(cfg, targets, label)], [label], setup.verbalizer.prompt_ids)
    for batch_size in args.batch_sizes or mode["batch_sizes"]:
        for seq_len in args.seq_lens or mode["seq_lens"]:
            records.append(bench_shape(lm, cfg, ctx, allowed, setup.prefix_ids, batch_size, seq_len, mode))
            print(f"  measured B={batch_size} L={seq_len}", file=sys.stderr, flush=True)
    for rounds_per_batch in mode["rounds_per_batch"] if args.rounds_per_batch is None else args.rounds_per_batch:
        records.append(bench_batching(lm, cfg, setup, head, targets, allowed, rounds_per_batch))
        print(f"  measured rounds_per_batch={rounds_per_batch}", file=sys.stderr, flush=True)
    precision = bench_precision(lm, cfg, setup, head, targets, allowed)
    if precision is not None:
        records.append(precision)
    info = {**started_info, "load_average_1min_end": os.getloadavg()[0],
            "mode": "smoke" if args.smoke else "full", "overrides": mode["overrides"] + args.overrides,
            "projector_config": OmegaConf.to_container(cfg.projector)}
    records = [{**r, "machine": info} for r in records]
    files.write_json(args.out, records)
    log_to_tracker(cfg, records, Path(args.out).parent / "runs")
    print_table(records)
    print(f"load average {info['load_average_1min']:.1f} -> {info['load_average_1min_end']:.1f} "
          f"on {info['cpu_count']} CPUs ({info['torch_threads']} torch threads); wrote {args.out}")
    return records


if __name__ == "__main__":
    main()
