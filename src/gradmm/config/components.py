"""The components conf/ names by `_target_`, built from their yaml: a projector (conf/projector/) is
built here for generation and for validation alike, so a new projector needs a class and a yaml,
nothing else. Fine-tuning methods (conf/evaluate/method/) are built by Hydra's instantiate.
"""

from __future__ import annotations

import dataclasses

import hydra.utils
from omegaconf import DictConfig, OmegaConf

from gradmm.method.projectors import Projector


def build_projector(proj: DictConfig) -> Projector:
    """The class conf/projector/<option>.yaml names in `_target_`, given the settings it declares."""
    projector_class = hydra.utils.get_class(proj._target_)
    settings = OmegaConf.to_container(proj)
    return projector_class(**{f.name: settings[f.name] for f in dataclasses.fields(projector_class)})
