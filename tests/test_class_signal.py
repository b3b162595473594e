"""experiments/class_signal.py on the tiny model: every group's probe against a direct computation."""

import json

import pytest
import torch
from conftest import TINY, load_script


@pytest.fixture
def class_signal():
    return load_script("experiments/class_signal.py")


@pytest.mark.slow
def test_groups_are_ranked_by_a_probe_that_equals_the_direct_one(class_signal, monkeypatch, tmp_path):
    monkeypatch.setattr(class_signal, "N_HELD_OUT", 12)
    out = tmp_path / "class_signal.json"
    result = class_signal.main([*TINY, "matching.kind=parameters", r"matching.modules=[model\.layers\.1\.mlp\..*]"],
                               out)
    assert json.loads(out.read_text())["groups"] == result["groups"]
    assert result["n_real"] == 8 and result["n_held_out"] == 12
    names = [g["group"] for g in result["groups"]]
    for expected in ("block 0 attention", "block 1 MLP", "all MLPs", "every block linear layer", "LoRA r=8 on",
                     "output layer (2 rows)"):
        assert any(n.startswith(expected) for n in names), expected
    accuracies = [g["accuracy_calibrated"] for g in result["groups"]]
    assert accuracies == sorted(accuracies, reverse=True)
    # The per-layer sums of the ranking equal the probe run directly through the config's own matching.
    by_name = {g["group"]: g for g in result["groups"]}
    direct = next(g for n, g in by_name.items() if n.startswith("this config's matching"))
    assert direct["accuracy_calibrated"] == by_name["block 1 MLP"]["accuracy_calibrated"]
    assert direct["accuracy_raw"] == by_name["block 1 MLP"]["accuracy_raw"]


def test_calibration_removes_a_constant_bias(class_signal):
    scores = torch.tensor([[1.0, 0.0], [3.0, 0.0], [1.2, 0.0], [2.8, 0.0]])  # class 0 always wins raw
    labels = torch.tensor([1, 0, 1, 0])
    assert class_signal.accuracy(scores, labels) == {"raw": 0.5, "calibrated": 1.0}


def test_layer_groups_cover_blocks_parts_and_ranges(class_signal):
    names = [f"model.layers.{b}.{part}" for b in range(6) for part in ("self_attn.q_proj", "mlp.up_proj")]
    groups = class_signal.layer_groups(names)
    assert groups["block 2 MLP"] == [5] and groups["block 2"] == [4, 5]
    assert groups["blocks 0-1"] == [0, 1, 2, 3] and groups["blocks 4-5 MLP"] == [9, 11]
    assert groups["all attention"] == list(range(0, 12, 2))


