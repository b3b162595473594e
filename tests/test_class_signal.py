"""experiments/class_signal.py on the tiny model: every probe is scored on held-out training rows."""

import pytest
import torch
from conftest import TINY, load_script


@pytest.fixture
def class_signal():
    return load_script("experiments/class_signal.py")


def test_class_signal_scores_every_probe_on_held_out_rows(class_signal, monkeypatch):
    monkeypatch.setattr(class_signal, "N_HELD_OUT", 20)
    result = class_signal.main(list(TINY))
    assert result["n_real"] == 8 and result["n_held_out"] == 20
    for probe in ("target_probe", "hidden_centroid", "zero_shot"):
        assert all(0 <= result[probe][kind] <= 1 for kind in ("raw", "calibrated")), probe
    assert 0 <= result["held_out_grad_distance_set"] <= 2 and 0 <= result["held_out_grad_distance_union"] <= 2
    assert len(result["target_norms"]) == 2 and abs(result["cos_between_class_targets"][0][0] - 1) < 1e-5


def test_calibration_removes_a_constant_bias(class_signal):
    scores = torch.tensor([[1.0, 0.0], [3.0, 0.0], [1.2, 0.0], [2.8, 0.0]])  # class 0 always wins raw
    labels = torch.tensor([1, 0, 1, 0])
    assert class_signal.accuracy(scores, labels) == {"raw": 0.5, "calibrated": 1.0}
