"""Run identity: a job's directory is a hash of its science config, and nothing else."""

import dataclasses

import pytest
from conftest import CONF_DIR, TINY, compose_config
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from gradmm.config.schemas import Config
from gradmm.reporting.report import differing_keys
from gradmm.runs.identity import NON_SCIENCE_KEYS, flatten, is_science_key, science_config, science_hash
from gradmm.runs.job_directory import Job
from gradmm.runs.sweeps import sweep_name

BASE = science_hash(compose_config(TINY))

# One change per science group, including one-key changes deep inside a group and group swaps.
SCIENCE_CHANGES = [
    "seed=1",
    "task=rotten_tomatoes",
    "task.prompt=' It is'",
    "model.dtype=float64",
    "model.init_seed=1",
    "admm.rho=0.7",
    "admm.inner_steps=3",
    "projector=topk_lm",
    "projector.match_weight=1.0",
    "generation.seq_len=7",
    "generation.max_restarts=0",
    "matching.distance=l2",
    "privacy=dp",
    "filter.n_per_class=3",
    "evaluate.steps=7",
    "data.synthetic_from=/elsewhere",
]

NON_SCIENCE_CHANGES = [
    "tracker=wandb",
    "tracker.project=other",
    "paths.output_root=/elsewhere",
    "paths.cache_dir=/elsewhere",
    "resume=false",
    "validate_only=true",
    "stages=[generate,filter]",
    "generation.checkpoint_every=5",
    "objective.metric=log_ppl_mean",
    "cache_targets=false",
    "hydra.job.chdir=true",
]


@pytest.mark.parametrize("change", SCIENCE_CHANGES)
def test_any_science_change_moves_the_job_elsewhere(change):
    assert science_hash(compose_config([*TINY, change])) != BASE


@pytest.mark.parametrize("change", NON_SCIENCE_CHANGES)
def test_how_where_and_what_to_report_keep_the_job_in_place(change):
    assert science_hash(compose_config([*TINY, change])) == BASE


def test_the_hash_is_of_values_not_of_how_they_were_spelt():
    spellings = {science_hash(compose_config([*TINY, rho])) for rho in ("admm.rho=0.50", "admm.rho=.5")}
    assert len(spellings) == 1
    same_as_preset = [*TINY, "model.hidden_size=32"]  # tiny.yaml's own value
    assert science_hash(compose_config(same_as_preset)) == BASE


def test_every_key_outside_the_exclusions_is_science():
    """A key someone adds later changes the hash unless it is deliberately listed as non-science."""
    top = {f.name for f in dataclasses.fields(Config)}
    excluded = {key for key in NON_SCIENCE_KEYS if "." not in key}
    assert set(science_config(compose_config(TINY))) == top - excluded
    for key in NON_SCIENCE_KEYS:
        assert OmegaConf.select(compose_config(TINY), key, default="absent") != "absent", key


def _hydra_dirs(overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
    return cfg.hydra.run.dir, f"{cfg.hydra.sweep.dir}/{cfg.hydra.sweep.subdir}"


def test_single_runs_and_sweep_jobs_use_the_same_directory():
    run_dir, sweep_dir = _hydra_dirs(TINY)
    assert run_dir == sweep_dir
    assert run_dir.endswith(f"/sst2/{BASE}")
    assert _hydra_dirs(TINY) == (run_dir, sweep_dir)
    assert _hydra_dirs([*TINY, "admm.rho=0.7"])[0] != run_dir


def test_resume_false_gets_a_new_directory_every_time_even_within_a_second():
    fresh = {_hydra_dirs([*TINY, "resume=false"])[0] for _ in range(3)}
    assert len(fresh) == 3
    resumed, _ = _hydra_dirs(TINY)
    assert all(d.startswith(resumed + "-") for d in fresh), "the science hash still leads the name"


def _override_key(override: str) -> str:
    return override.split("=", 1)[0]


def test_science_keys_are_one_list_for_the_hash_the_report_and_sweep_names():
    assert all(is_science_key(_override_key(change)) for change in SCIENCE_CHANGES)
    assert not any(is_science_key(_override_key(change)) for change in NON_SCIENCE_CHANGES)
    assert not is_science_key("generation.rounds_per_batch") and is_science_key("generation.rounds")
    assert is_science_key("evaluate/method") and not is_science_key("hydra/sweeper")


def test_the_report_shows_only_science_differences(tmp_path):
    """Two runs of the same science with other stages and batching, and a third with another rho."""
    def job(name, *overrides):
        cfg = compose_config([*TINY, *overrides])
        return Job(tmp_path / name, flatten(OmegaConf.to_container(cfg, resolve=True)))

    jobs = [job("a"), job("b", "stages=[generate,filter]", "generation.rounds_per_batch=2"), job("c", "admm.rho=0.7")]
    assert differing_keys(jobs) == ["admm.rho"]


def test_a_sweep_is_named_after_its_science_overrides_only():
    overrides = ["admm.rho=0.1,0.5", "stages=[generate]", "tracker=disabled", "generation.rounds_per_batch=4"]
    config = OmegaConf.create({"hydra": {"overrides": {"task": overrides},
                                         "runtime": {"choices": {"hydra/sweeper": "basic"}}}})
    assert sweep_name(config) == "admm.rho=0.1,0.5"
