"""Composition of the real configs, and validation before any model is loaded."""

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CONF_DIR, DATA_DIR, REPO, TINY, compose_config
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from gradmm.config.schemas import Config
from gradmm.config.validation import ConfigError, validate
from gradmm.method.admm import AdmmParams, Initialisation
from gradmm.method.fine_tuning import FineTuning
from gradmm.pipeline import prepare
from gradmm.stages.generate import matched_gradient, round_settings


def _options(group):
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("task", _options("task"))
def test_every_task_composes_and_validates(task):
    cfg = compose_config([*TINY, f"task={task}"])
    validate(cfg)
    assert len(cfg.task.label_words) == len(cfg.task.label_names)


# Every config group but Hydra's own and the presets, which are validated whole below.
GROUPS = sorted({p.parent.relative_to(CONF_DIR).as_posix() for p in CONF_DIR.rglob("*.yaml")}
                - {".", "experiment"})
GROUPS = [g for g in GROUPS if not g.startswith("hydra")]


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_option_of_every_group_composes_validates_and_builds(group, option, tiny_lm_factory):
    """What a job builds from yaml (projector, fine-tuning method, matched gradient) is built here for
    every option, so a new option whose class cannot be built from its yaml fails in the tests."""
    cfg = compose_config([*TINY, f"{group}={option}"])
    validate(cfg)
    _, _, projector = round_settings(cfg)
    assert type(projector) is get_class(cfg.projector._target_)
    assert isinstance(instantiate(cfg.evaluate.method), FineTuning)
    if cfg.model.name == "tiny":  # the matched layers are named per model: built on the model they name
        lm = tiny_lm_factory()
        matched = matched_gradient(cfg, prepare(cfg, lm.tokenizer), lm)
        assert matched.describe()


def _differences(schema: dict, composed: dict, prefix: str = "") -> dict:
    """Each key whose schema default is set and differs from the composed value: (schema, composed)."""
    found = {}
    for key, default in schema.items():
        value = composed.get(key, "<absent>")
        if isinstance(default, dict) and isinstance(value, dict) and "_target_" not in default:
            found |= _differences(default, value, f"{prefix}{key}.")
        elif default != "???" and default != value:
            found[f"{prefix}{key}"] = (default, value)
    return found


def test_the_schema_defaults_are_the_default_options():
    """The yaml is the one source of each default: what the schema fills in for a key an option leaves
    out is what the default config composes to."""
    schema = OmegaConf.to_container(OmegaConf.structured(Config), resolve=False)
    composed = OmegaConf.to_container(compose_config(), resolve=False)
    assert _differences(schema, composed) == {}


def test_a_schema_default_unlike_the_yaml_is_found():
    assert _differences({"matching": {"kind": "output_layer", "loss": "???"}},
                        {"matching": {"kind": "parameters", "loss": "label_words"}}) == {
        "matching.kind": ("output_layer", "parameters")}


def _targets(group: str, key: str) -> list[type]:
    return [get_class(OmegaConf.select(compose_config([f"{group}={option}"]), key)._target_)
            for option in _options(group)]


def test_what_is_built_from_the_config_has_no_defaults_of_its_own():
    """Projectors, fine-tuning methods and the round's settings take every value from the config, so a
    default cannot drift from the yaml's."""
    built = [AdmmParams, Initialisation, *_targets("projector", "projector"),
             *_targets("evaluate/method", "evaluate.method")]
    with_defaults = {cls.__name__: [f.name for f in dataclasses.fields(cls)
                                    if f.default is not dataclasses.MISSING
                                    or f.default_factory is not dataclasses.MISSING]
                     for cls in built}
    assert {name: found for name, found in with_defaults.items() if found} == {}


@pytest.mark.parametrize("experiment", _options("experiment"))
def test_every_experiment_preset_validates(experiment):
    validate(compose_config([f"experiment={experiment}", "tracker=disabled", f"paths.data_dir={DATA_DIR}"]))


@pytest.mark.slow
def test_validate_only_checks_the_tokenizer_and_runs_nothing(tmp_path):
    common = [sys.executable, "run.py", *TINY, "validate_only=true", f"paths.output_root={tmp_path}"]
    ok = subprocess.run(common, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "config is valid" in ok.stdout
    # A tokenizer-level problem is listed in the same report as a config problem, not after it is fixed.
    bad = subprocess.run([*common, "projector.topk=10000000", "admm.rho=-1"], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode != 0 and "admm.rho=-1.0 must be positive" in bad.stderr
    assert "projector.topk=10000000 is larger than the allowed vocabulary" in bad.stderr
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl", ".yaml")
                and ".hydra" not in p.parts]


def test_unknown_key_fails_at_composition():
    with pytest.raises((ConfigCompositionException, ConfigKeyError)):
        compose_config(["admm.learning_rate=0.1"])


def test_unknown_key_in_a_yaml_file_fails_at_composition(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    (conf / "admm" / "typo.yaml").write_text("rho: 0.5\nouter_step: 3\n")
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        with pytest.raises((ConfigCompositionException, ConfigKeyError)):
            compose(config_name="config", overrides=["admm=typo"])


def test_wrong_type_fails_at_composition():
    with pytest.raises((ConfigCompositionException, ValidationError)):
        compose_config(["admm.rho=fast"])


def test_unknown_group_option_lists_the_choices():
    with pytest.raises(ConfigCompositionException) as error:
        compose_config(["task=sst3"])
    assert "sst2" in str(error.value)


BAD = [
    ("admm.rho=0", "admm.rho"),
    ("admm.rho=-1", "admm.rho"),
    ("admm.outer_steps=-1", "admm.outer_steps"),
    ("admm.inner_steps=-2", "admm.inner_steps"),
    ("admm.lr=0", "admm.lr"),
    ("admm.grad_clip=0", "admm.grad_clip"),
    ("generation.n_real=1", "generation.n_real"),
    ("generation.n_real=0", "generation.n_real"),
    ("generation.rounds=0", "generation.rounds"),
    ("generation.rounds_per_batch=0", "generation.rounds_per_batch"),
    ("generation.batch_size=0", "generation.batch_size"),
    ("generation.seq_len=0", "generation.seq_len"),
    ("generation.init=real", "generation.init"),
    ("generation.init_temperature=0", "generation.init_temperature"),
    ("generation.init_candidates=3", "generation.init_candidates"),
    ("generation.n_real=100000", "generation.n_real"),
    ("projector._target_=gradmm.method.projectors.Magic", "gradmm.method.projectors.Magic"),
    ("projector.topk=0", "projector.topk"),
    ("projector.lm_topk=0", "projector.lm_topk"),
    ("projector.exact_candidates=0", "projector.exact_candidates"),
    ("projector.match_weight=-1", "projector.match_weight"),
    ("matching.loss=mse", "matching.loss"),
    ("matching.distance=kl", "matching.distance"),
    ("matching.union_weight=-0.5", "matching.union_weight"),
    ("tracker.mode=cloud", "tracker.mode"),
    ("model.device=tpu", "model.device"),
    ("model.dtype=int8", "model.dtype"),
    ("model.source=ftp", "model.source"),
    ("task.label_words=[' bad']", "task.label_words"),
    ("task.label_words=[' bad',' bad']", "task.label_words"),
    ("task.max_text_tokens=0", "task.max_text_tokens"),
    ("paths.data_dir=/nonexistent", "/nonexistent"),
    ("privacy.name=secret", "privacy.name"),
    ("privacy=dp | privacy.epsilon=0", "privacy.epsilon"),
    ("privacy=dp | privacy.epsilon=-1", "privacy.epsilon"),
    ("privacy=dp | privacy.delta=1.5", "privacy.delta"),
    ("privacy=dp | privacy.delta=0.2", "1/generation.n_real"),
    ("privacy=dp | privacy.clip=0", "privacy.clip"),
    ("privacy=dp | privacy.relation=swap", "privacy.relation"),
    ("stages=[evaluate]", "data.synthetic_from"),
    ("stages=[evaluate,generate]", "stages"),
    ("stages=[train]", "stages"),
    ("data.synthetic_from=/nowhere", "data.synthetic_from"),
    ("filter.classifier=oracle", "filter.classifier"),
    ("filter.n_per_class=0", "filter.n_per_class"),
    ("filter.near_duplicate=0", "filter.near_duplicate"),
    ("evaluate.train_on=test", "evaluate.train_on"),
    ("evaluate.baselines=[oracle]", "evaluate.baselines"),
    ("evaluate.steps=0", "evaluate.steps"),
    ("evaluate.lrs=[]", "evaluate.lrs"),
    ("evaluate.lrs=[-1e-5]", "evaluate.lrs"),
    ("evaluate.seeds=[]", "evaluate.seeds"),
    ("generation.max_restarts=-1", "generation.max_restarts"),
    ("generation.checkpoint_every=0", "generation.checkpoint_every"),
    ("task.max_text_tokens=4", "generation.seq_len=6 is longer than task.max_text_tokens=4"),
]


@pytest.mark.parametrize("override,named", BAD)
def test_bad_value_is_named(override, named):
    # Several overrides are separated by " | " (values such as ' bad' contain spaces).
    cfg = compose_config([*TINY, *override.split(" | ")])
    with pytest.raises(ConfigError) as error:
        validate(cfg)
    assert named in str(error.value)


def test_every_problem_is_reported_at_once():
    cfg = compose_config([*TINY, "admm.rho=0", "generation.batch_size=0", "projector._target_=magic"])
    with pytest.raises(ConfigError) as error:
        validate(cfg)
    assert len(error.value.problems) == 3


def test_malformed_data_file_names_file_and_line(tmp_path):
    task_dir = tmp_path / "sst2"
    task_dir.mkdir()
    lines = [json.dumps({"text": "fine", "label": 1}), '{"text": "broken"', json.dumps({"text": "x", "label": 0})]
    (task_dir / "train.jsonl").write_text("\n".join(lines) + "\n")
    cfg = compose_config([*TINY, f"paths.data_dir={tmp_path}"])
    with pytest.raises(ConfigError) as error:
        validate(cfg)
    assert f"{task_dir / 'train.jsonl'}:2" in str(error.value)


def test_shared_data_is_where_tests_expect_it():
    assert (DATA_DIR / "sst2" / "train.jsonl").is_file(), f"datasets expected in {DATA_DIR}"


@pytest.mark.slow
def test_validation_runs_before_the_model_loads(tmp_path):
    """A bad config must fail in validate(), which reads no weights: run.py exits non-zero fast."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "run.py", *TINY, "admm.rho=-1", f"paths.output_root={tmp_path}"],
        cwd=repo, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert "admm.rho=-1" in result.stderr + result.stdout
    assert not list(tmp_path.rglob("synthetic.jsonl"))


@pytest.mark.parametrize("override,named", [("projector.topk=10000000", "projector.topk=10000000"),
                                            ("projector.lm_topk=10000000", "projector.lm_topk=10000000")])
def test_sizes_beyond_the_vocabulary_fail_with_the_tokenizer_alone(override, named, monkeypatch):
    import gradmm.pipeline as pipeline

    monkeypatch.setattr(pipeline, "load_lm", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(ConfigError, match=named):
        pipeline.prepare(compose_config([*TINY, override]))
