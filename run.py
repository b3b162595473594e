"""GRADMM synthetic text generation: `python run.py --help` lists the config groups."""

import hydra
from omegaconf import DictConfig

from gradmm.cli import main as run_pipeline
from gradmm.config.schemas import register_configs
from gradmm.runs.sweeps import sweep_job

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    return sweep_job(run_pipeline, cfg)


if __name__ == "__main__":
    main()
