"""What scoring reports about texts, checked against plain references, and the random start end to end."""

import pytest
import torch

from gradmm.data.models import mean_nll
from gradmm.pipeline import run_job
from gradmm.runs.files import read_jsonl


def test_mean_nll_of_padded_batches_equals_each_text_alone(tiny_lm_factory):
    """Texts of different lengths share a right-padded batch: each one's mean NLL of its own tokens
    given the prefix must be what the text alone gives, padding and prefix excluded."""
    lm = tiny_lm_factory()
    prefix = lm.tokenizer.encode("\n", add_special_tokens=False)
    texts = [lm.tokenizer.encode(t, add_special_tokens=False)
             for t in ("a fine film", "dull", "the acting is superb and the story moves along")]
    batched = mean_nll(lm, prefix, texts, batch_size=3)
    for text, value in zip(texts, batched, strict=True):
        ids = torch.tensor([prefix + text])
        with torch.no_grad():
            logits = lm.model(input_ids=ids).logits[0]
        alone = torch.nn.functional.cross_entropy(logits[len(prefix) - 1 : -1], ids[0, len(prefix):])
        assert value.item() == pytest.approx(alone.item(), rel=1e-6)  # mean_nll reads float32 logits


@pytest.mark.slow
def test_random_initialisation_runs_end_to_end(tiny_cfg, tmp_path):
    """generation.init=random starts from other tokens than LM samples, and the job completes."""
    tiny_cfg.generation.init = "random"
    summary = run_job(tiny_cfg, tmp_path / "random")
    assert summary["n_synthetic"] == 2 * tiny_cfg.generation.batch_size
    assert all(row["text"] for row in read_jsonl(tmp_path / "random" / "synthetic.jsonl"))
    tiny_cfg.generation.init = "lm_sample"
    run_job(tiny_cfg, tmp_path / "sampled")
    starts = {name: [m["grad_distance_z"] for m in read_jsonl(tmp_path / name / "metrics.jsonl")
                     if m["outer_step"] == 0] for name in ("random", "sampled")}
    assert starts["random"] != starts["sampled"]
