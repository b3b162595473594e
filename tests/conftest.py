"""Fixtures that compose the real configs in conf/, the way run.py does."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from gradmm.config.schemas import register_configs
from gradmm.data.models import load_lm
from gradmm.data.tasks import class_quotas

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"
DATA_DIR = Path(os.environ.get("GRADMM_DATA_DIR", REPO.parent / "shared" / "data"))

register_configs()

# Small enough for seconds on the tiny model, large enough to exercise every stage.
TINY = [
    "model=tiny",
    "tracker=disabled",
    "stages=[generate]",
    f"paths.data_dir={DATA_DIR}",
    "admm.outer_steps=2",
    "admm.inner_steps=2",
    "generation.n_real=8",
    "generation.batch_size=4",
    "generation.seq_len=6",
    "projector.topk=20",
    "projector.lm_topk=20",
    "projector.exact_candidates=2",
    "projector.swaps_per_row=3",
    "admm.patience=null",
    "generation.init_candidates=null",
]


def quotas(cfg: DictConfig) -> list[int]:
    """The public per-class counts of a config's real examples (what a DP release divides by)."""
    return class_quotas(cfg.generation.n_real, len(cfg.task.label_names))


def load_script(relative_path: str):
    """A script of benchmarks/ or experiments/ as a module (they are not part of the package)."""
    path = REPO / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compose_config(overrides: list[str] = ()) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=False)


@pytest.fixture
def compose_cfg():
    return compose_config


@pytest.fixture
def tiny_cfg(tmp_path) -> DictConfig:
    cfg = compose_config(TINY)
    with open_dict(cfg):
        cfg.paths.output_root = str(tmp_path)
    return cfg


@pytest.fixture(scope="session")
def tiny_lm_factory():
    """Tiny random Llama models (float64, eager attention so double backward works), cached by kind."""
    cache = {}

    def make(tied: bool = True, dtype: str = "float64"):
        key = (tied, dtype)
        if key not in cache:
            cfg = compose_config([
                "model=tiny", f"model.tie_word_embeddings={tied}", f"model.dtype={dtype}",
                "model.attn_implementation=eager",
            ])
            lm = load_lm(cfg.model, cfg.paths.cache_dir)
            cache[key] = lm
        return cache[key]

    return make


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
