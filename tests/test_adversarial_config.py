"""Adversarial: bad values and bad data never train (issue 15, findings 6, 7, 9 and 12). Each is refused
by `validate`, before any model loads, with a message naming the key, or the file and line, and the
valid choices; nothing is written and no data file changes."""

import json
import math

import pytest
import torch
from conftest import CONF_DIR, TINY, compose_config
from hydra import compose, initialize_config_dir

from gradmm.config.validation import ConfigError, validate

DP = ["privacy=dp", "privacy.delta=1e-3"]
EVALUATE = ["stages=[generate,evaluate]", "evaluate.train_on=synthetic", "evaluate.n_dev=4",
            "evaluate.n_train=4", "evaluate.max_eval=8"]


def _refused(overrides, *named):
    cfg = compose_config([*TINY, *overrides])
    with pytest.raises(ConfigError) as error:
        validate(cfg)
    message = str(error.value)
    for fragment in named:
        assert fragment in message, message
    return message


# Every float key of the schema, as a scalar or a list; each must be finite.
FLOAT_KEYS = [
    ("admm.rho", []), ("admm.lr", []), ("admm.grad_clip", []), ("projector.match_weight", []),
    ("generation.init_temperature", []), ("matching.union_weight", []), ("filter.near_duplicate", []),
    ("filter.log_ppl_weight", []), ("privacy.epsilon", DP), ("privacy.delta", DP), ("privacy.clip", DP),
]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("key,extra", FLOAT_KEYS, ids=[k for k, _ in FLOAT_KEYS])
def test_every_float_is_finite(key, extra, value):
    _refused([*extra, f"{key}={value}"], f"{key}={value}", "finite")


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_every_learning_rate_is_finite(value):
    _refused([f"evaluate.lrs=[1e-3,{value}]"], f"evaluate.lrs[1]={value}", "finite")


@pytest.mark.parametrize("override,key", [
    ("+admm.rhoo=1", "admm.rhoo"),
    ("+seeds=3", "seeds"),
    ("+task.promt=' It is'", "task.promt"),
    ("+privacy.budget=3", "privacy.budget"),
    ("+model.devices=cpu", "model.devices"),
    ("+generation.n_reall=4", "generation.n_reall"),
    ("+evaluate.lr=1e-3", "evaluate.lr"),
])
def test_a_key_added_with_plus_that_the_schema_lacks_is_refused(override, key):
    message = _refused([override], f"unknown key {key}")
    group = key.rpartition(".")[0]
    if group:  # the valid keys of its group are named
        sample = next(iter(compose_config(TINY)[group]))
        assert sample in message


@pytest.mark.parametrize("name", ["../../x", "a/b", "", ".hidden", "x y", "ok\n", "..", "a\\b"])
@pytest.mark.parametrize("key", ["task.name", "task.data_name"])
def test_names_that_become_paths_are_restricted(key, name, tmp_path):
    _refused([f"{key}={json.dumps(name)}"], key, "letters, digits")


@pytest.mark.parametrize("name", ["../../escape", "a/b", ".."])
def test_an_unsafe_task_name_never_makes_a_directory_outside_the_output_root(name, tmp_path):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True,
                      overrides=[*TINY, f"task.name={json.dumps(name)}", f"paths.output_root={tmp_path / 'out'}"])
    with pytest.raises(Exception, match="task.name"):
        str(cfg.hydra.run.dir)
    assert not any(tmp_path.rglob("*"))


@pytest.mark.parametrize("value", [0, -1])
def test_max_eval_must_be_positive(value):
    _refused([*EVALUATE, f"evaluate.max_eval={value}"], f"evaluate.max_eval={value}")


@pytest.mark.parametrize("override,key", [
    ("generation.batch_size=100000000", "generation.batch_size"),
    ("generation.init_candidates=100000000", "generation.init_candidates"),
    ("generation.rounds_per_batch=100000000", "generation.rounds_per_batch"),
    ("evaluate.batch_size=100000000", "evaluate.batch_size"),
    ("generation.seq_len=100000", "generation.seq_len"),
    ("task.max_text_tokens=10000000", "task.max_text_tokens"),
    ("generation.n_real=10000000", "generation.n_real"),
])
def test_absurd_sizes_are_refused(override, key):
    _refused([override], key)


@pytest.mark.parametrize("device", ["cuda", "mps"])
def test_a_device_that_is_not_there_is_refused_before_loading(device, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    _refused([f"model.device={device}"], f"model.device={device!r}", "not available")


@pytest.mark.parametrize("words", ["['',' great']", "[' bad','']"])
def test_an_empty_label_word_is_refused(words):
    _refused([f"task.label_words={words}"], "task.label_words", "empty")


@pytest.mark.parametrize("budget", ["0", "-1", "nan", "0.5"])
def test_a_budget_that_no_release_fits_is_refused(budget):
    _refused([*DP, "privacy.epsilon=1", f"privacy.budget_epsilon={budget}"], f"privacy.budget_epsilon={budget}")


# --- data files ------------------------------------------------------------------------------------

def _rows(n=40):
    return [{"text": f"a sentence of class {i % 2}, number {i}", "label": i % 2} for i in range(n)]


def _write(path, rows=None, raw: bytes | None = None):
    path.parent.mkdir(parents=True, exist_ok=True)
    if raw is None:
        raw = "".join(json.dumps(r) + "\n" for r in rows).encode()
    path.write_bytes(raw)
    return path


@pytest.fixture
def data(tmp_path):
    root = tmp_path / "data"
    _write(root / "sst2" / "train.jsonl", _rows(60))
    _write(root / "sst2" / "validation.jsonl", _rows(20))
    return root


def _line(row) -> bytes:
    return (row if isinstance(row, bytes) else json.dumps(row).encode()) + b"\n"


def _with_line(path, line_no, row):
    lines = path.read_bytes().splitlines(keepends=True)
    lines[line_no - 1] = _line(row)
    path.write_bytes(b"".join(lines))


BAD_ROWS = {
    "label beyond the classes": ({"text": "x", "label": 2}, "has label 2, outside 0..1"),
    "label far beyond": ({"text": "x", "label": 63}, "has label 63, outside 0..1"),
    "negative label": ({"text": "x", "label": -1}, "has label -1, outside 0..1"),
    "boolean label": ({"text": "x", "label": True}, "integer 'label'"),
    "float label": ({"text": "x", "label": 1.0}, "integer 'label'"),
    "string label": ({"text": "x", "label": "1"}, "integer 'label'"),
    "empty text": ({"text": "", "label": 0}, "non-empty"),
    "blank text": ({"text": "   ", "label": 0}, "non-empty"),
    "text a number": ({"text": 5, "label": 0}, "string 'text'"),
    "no text": ({"label": 0}, "string 'text'"),
    "a list": (b"[1, 2]", "JSON object"),
    "broken json": (b'{"text": "x", "lab', "JSON object"),
    "not utf-8": (b'{"text": "caf\xe9", "label": 0}', "not UTF-8"),
}


@pytest.mark.parametrize("bad", BAD_ROWS)
@pytest.mark.parametrize("split", ["train", "validation"])
def test_a_bad_row_is_refused_with_its_file_and_line(split, bad, data):
    path = data / "sst2" / f"{split}.jsonl"
    row, message = BAD_ROWS[bad]
    _with_line(path, 7, row)
    before = path.read_bytes()
    _refused([f"paths.data_dir={data}", *EVALUATE], f"{path}:7", message)
    assert path.read_bytes() == before


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"])
@pytest.mark.parametrize("split", ["train", "validation"])
def test_an_empty_split_is_refused_naming_it(split, content, data):
    path = _write(data / "sst2" / f"{split}.jsonl", raw=content)
    _refused([f"paths.data_dir={data}", *EVALUATE], str(path), "no examples")


def test_a_missing_evaluation_split_is_found_before_generation(data):
    (data / "sst2" / "validation.jsonl").unlink()
    _refused([f"paths.data_dir={data}", *EVALUATE], str(data / "sst2" / "validation.jsonl"), "does not exist")


def test_the_evaluation_split_is_not_read_when_nothing_is_evaluated(data):
    _with_line(data / "sst2" / "validation.jsonl", 3, {"text": "x", "label": 9})
    validate(compose_config([*TINY, f"paths.data_dir={data}"]))


@pytest.mark.parametrize("row,message", [
    ({"text": "x", "label": -1, "label_name": "bad"}, "has label -1, outside 0..1"),
    ({"text": "x", "label": 2}, "has label 2, outside 0..1"),
    ({"text": "", "label": 0}, "non-empty"),
    (b"\xff", "not UTF-8"),
])
def test_synthetic_from_rows_are_checked_too(row, message, data, tmp_path):
    source = tmp_path / "earlier"
    _write(source / "synthetic.jsonl", _rows(8))
    _with_line(source / "synthetic.jsonl", 5, row)
    _refused([f"paths.data_dir={data}", "stages=[evaluate]", "evaluate.train_on=synthetic",
              f"data.synthetic_from={source}", "evaluate.n_dev=4", "evaluate.max_eval=8"],
             f"{source / 'synthetic.jsonl'}:5", message)


def test_a_good_config_still_passes(data):
    validate(compose_config([*TINY, f"paths.data_dir={data}", *EVALUATE]))
    assert math.isfinite(compose_config(TINY).admm.rho)


@pytest.mark.parametrize("overrides,named", [
    (["task.max_text_tokens=600"], ["task.max_text_tokens=600"]),
    (["task.max_text_tokens=600", "generation.seq_len=520"], ["generation.seq_len=520", "task.max_text_tokens=600"]),
])
def test_sequences_beyond_the_models_positions_are_refused_before_generation(overrides, named, tmp_path):
    from gradmm.pipeline import run_job

    cfg = compose_config([*TINY, *overrides, f"paths.output_root={tmp_path}",
                          f"paths.target_cache_dir={tmp_path / 'targets'}"])
    with pytest.raises(ConfigError) as error:
        run_job(cfg, tmp_path / "job")
    for fragment in named:
        assert fragment in str(error.value) and "beyond the model's 512 positions" in str(error.value)
    assert not (tmp_path / "job" / "rounds").exists() and not (tmp_path / "targets").exists()
