"""The benchmark's smoke mode (tiny model): it runs, writes its records, and its fast paths agree with
the plain ones. No timing is asserted: the figures depend on the machine and its load."""

import json

from conftest import DATA_DIR, load_script

REQUIRED = {
    "model", "device", "batch_size", "seq_len", "inner_step_s", "fwd_bwd_s", "inner_step_over_fwd_bwd",
    "projection_s", "forward_s", "projection_over_forward", "naive_projection_s", "decode_steps_s", "peak_mem_mb",
    "machine",
}


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
    assert not [r for r in records if r["kind"] == "precision"]  # plain float32: nothing to compare
    (e2e,) = [r for r in records if r["kind"] == "end_to_end"]
    assert e2e["s_per_synthetic_example"] > 0 and e2e["n_synthetic"] == 2 * e2e["batch_size"]
    batching = [r for r in records if r["kind"] == "batching"]
    assert [r["rounds_per_batch"] for r in batching] == [1, 2]
    table = capsys.readouterr().out
    assert "s per synthetic example" in table and "rounds_per_batch=2" in table and str(out) in table


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
