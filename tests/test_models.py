import pytest
import torch
from conftest import compose_config

from gradmm.data.models import load_lm


@pytest.mark.slow
def test_cached_embedded_model_equals_the_gguf_load(tmp_path):
    cfg = compose_config([f"paths.cache_dir={tmp_path}"])
    first = load_lm(cfg.model, cfg.paths.cache_dir)  # dequantises the GGUF file, writes the cache
    assert (tmp_path / "models").is_dir()
    second = load_lm(cfg.model, cfg.paths.cache_dir)
    ids = torch.tensor([first.tokenizer.encode("A fine, moving film. It was")])
    assert torch.equal(first.model(input_ids=ids).logits, second.model(input_ids=ids).logits)
    assert second.output_weight.data_ptr() == second.input_embeddings.data_ptr(), "tied weights stay tied"


def test_tiny_model_is_reproducible_and_can_be_untied():
    cfg = compose_config(["model=tiny", "model.tie_word_embeddings=false"])
    a, b = load_lm(cfg.model, cfg.paths.cache_dir), load_lm(cfg.model, cfg.paths.cache_dir)
    assert torch.equal(a.output_weight, b.output_weight)
    assert a.output_weight.data_ptr() != a.input_embeddings.data_ptr()
