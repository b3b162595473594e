"""The benchmark's smoke mode (tiny model): it runs, writes its records, and its fast paths agree with
the plain ones. No timing is asserted: the figures depend on the machine and its load."""

import json

import pytest
from conftest import DATA_DIR, load_script
from test_wandb import OfflineRun, offline_wandb  # noqa: F401 - a fixture

REQUIRED = {
    "model", "device", "batch_size", "seq_len", "inner_step_s", "fwd_bwd_s", "inner_step_over_fwd_bwd",
    "projection_s", "forward_s", "projection_over_forward", "naive_projection_s", "decode_steps_s", "peak_mem_mb",
    "exact_projection_s", "outer_step_s", "outer_step_over_inner_steps", "matching_lm_grad_distance",
    "matching_lm_exact_grad_distance", "current_grad_distance", "machine",
}


@pytest.mark.slow
def test_smoke_benchmark_writes_one_record_per_configuration(tmp_path, capsys):
    bench = load_script("benchmarks/bench.py")
    out = tmp_path / "bench.json"
    bench.main([f"paths.data_dir={DATA_DIR}", "--smoke", "--out", str(out), "--batch-sizes", "2", "3",
                "--seq-lens", "4"])
    records = json.loads(out.read_text())
    shapes = [r for r in records if r["kind"] == "shape"]
    assert {(r["batch_size"], r["seq_len"]) for r in shapes} == {(2, 4), (3, 4)}
    for r in shapes:
        assert REQUIRED <= r.keys()
        # The inner step was timed on the default matched gradient: block 1 of the tiny model, 9,216 weights.
        assert r["matched"] == "7 linear layers (0.00922M weights)" and r["inner_step_s"] > 0
        assert r["naive_same_tokens"] and r["matching_plain_same_tokens"]
        assert r["machine"]["torch"] and r["machine"]["transformers"]
        # An outer step is its inner steps plus a projection and the step's figures.
        assert r["outer_step_s"] > r["outer_inner_steps_s"] > 0
    assert not [r for r in records if r["kind"] == "precision"]  # plain float32: nothing to compare
    (e2e,) = [r for r in records if r["kind"] == "end_to_end"]
    assert e2e["s_per_synthetic_example"] > 0 and e2e["n_synthetic"] == 2 * e2e["batch_size"]
    batching = [r for r in records if r["kind"] == "batching"]
    assert [r["rounds_per_batch"] for r in batching] == [1, 2]
    table = capsys.readouterr().out
    assert "s per synthetic example" in table and "rounds_per_batch=2" in table and str(out) in table
    assert "x its 2 inner steps" in table


@pytest.mark.slow
def test_reduced_precision_is_compared_with_float32_on_the_same_sequences(tmp_path, capsys):
    """bfloat16 weights (on a GPU also autocast or compile) are compared with float32, and stay within the
    issue's 1e-2 of its gradient distances."""
    bench = load_script("benchmarks/bench.py")
    out = tmp_path / "bench.json"
    bench.main([f"paths.data_dir={DATA_DIR}", "model.dtype=bfloat16", "--smoke", "--out", str(out),
                "--batch-sizes", "2", "--seq-lens", "4"])
    (precision,) = [r for r in json.loads(out.read_text()) if r["kind"] == "precision"]
    assert precision["dtype"] == "bfloat16" and len(precision["grad_distances"]) == 4  # 2 classes x 2 sets
    diffs = [abs(d - r) for d, r in zip(precision["grad_distances"], precision["float32_grad_distances"], strict=True)]
    assert precision["max_abs_diff"] == max(diffs) > 0  # bfloat16 really ran: float32 would match exactly
    # Features kept in bfloat16 put this 1.1e-2 off; promoted to float32 it is 2.5e-4.
    assert precision["within_tolerance"] and precision["max_abs_diff"] <= 1e-2
    assert "against float32" in capsys.readouterr().out


@pytest.mark.slow
def test_the_benchmark_is_one_wandb_run_of_its_own_per_call(tmp_path, offline_wandb):  # noqa: F811
    bench = load_script("benchmarks/bench.py")
    out = tmp_path / "bench" / "bench.json"
    argv = [f"paths.data_dir={DATA_DIR}", *offline_wandb, "--smoke", "--out", str(out), "--batch-sizes", "2",
            "--seq-lens", "4"]
    bench.main(argv)
    bench.main(argv)
    runs = sorted((tmp_path / "bench" / "runs").iterdir())
    assert len({run.joinpath("wandb_run_id").read_text() for run in runs}) == len(runs) == 2
    run = OfflineRun(runs[0])
    records = json.loads(out.read_text())
    shape = next(r for r in records if r["kind"] == "shape")
    (info,) = run.of("run")
    assert info.job_type == "bench"
    summary = run.summary()
    assert summary["bench/B2_L4/inner_step_over_fwd_bwd"] > 0
    assert summary["bench/end_to_end/s_per_synthetic_example"] > 0
    assert summary["bench/rounds_per_batch2/outer_step_s_per_round"] > 0
    table = run.table("bench/records")
    assert [row["case"] for row in table] == ["end_to_end", "B2_L4", "rounds_per_batch1", "rounds_per_batch2"]
    assert table[1]["seq_len"] == 4 and table[1]["matched"] == shape["matched"]
    assert {a.type for a in run.of("artifact")} == {"run_table"}  # the table; no synthetic set
