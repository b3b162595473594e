"""Adversarial: every data-dependent limit is checked up front (issue 20, findings 2 to 9). Each problem
is refused by `validate`, before any model loads, naming the key or the file and line and what would
fit; the command line refuses the same within seconds."""

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import DATA_DIR, REPO, TINY, compose_config

from gradmm.config.validation import ConfigError, validate
from gradmm.data.tasks import load_split
from gradmm.runs import identity, job_directory
from gradmm.runs.identity import science_hash

EVALUATE = ["stages=[generate,evaluate]", "evaluate.train_on=synthetic", "evaluate.n_dev=4",
            "evaluate.n_train=4", "evaluate.max_eval=8"]
FROM = ["stages=[evaluate]", "evaluate.train_on=synthetic", "evaluate.n_dev=4", "evaluate.max_eval=8"]


def _rows(n, classes=2):
    return [{"text": f"a sentence of class {i % classes}, number {i}", "label": i % classes} for i in range(n)]


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def data(tmp_path):
    root = tmp_path / "data"
    _write(root / "sst2" / "train.jsonl", _rows(60))
    _write(root / "sst2" / "validation.jsonl", _rows(20))
    return root


def _refused(overrides, *named):
    with pytest.raises(ConfigError) as error:
        validate(compose_config([*TINY, *overrides]))
    message = str(error.value)
    for fragment in named:
        assert fragment in message, message
    return message


# --- finding 2: the evaluation sample against the split's classes ---------------------------------

def test_an_evaluation_split_too_small_for_max_eval_is_refused_naming_the_class(data):
    rows = [r for r in _rows(40) if r["label"] == 1 or r["text"].endswith(("number 0", "number 2"))]
    _write(data / "sst2" / "validation.jsonl", rows)  # class 0: 2 rows, class 1: 20
    _refused([f"paths.data_dir={data}", *EVALUATE, "evaluate.max_eval=10"],
             "evaluate.max_eval=10 draws 5 examples of class 'negative', but split 'validation' has 2",
             "evaluate.max_eval=4 or less")
    validate(compose_config([*TINY, f"paths.data_dir={data}", *EVALUATE, "evaluate.max_eval=4"]))
    validate(compose_config([*TINY, f"paths.data_dir={data}", *EVALUATE, "evaluate.max_eval=22"]))


def test_tweet_emotion_with_600_evaluation_examples_is_refused_before_generation():
    _refused([f"paths.data_dir={DATA_DIR}", "task=tweet_emotion", "generation.n_real=12", *EVALUATE,
              "evaluate.max_eval=600"], "evaluate.max_eval=600 draws 100 examples of class 'surprise'")


# --- findings 3 and 4: whose synthetic texts are read ---------------------------------------------

def _source(data, path, *overrides):
    path.mkdir(parents=True)
    job_directory.claim(compose_config([*TINY, f"paths.data_dir={data}", *overrides]), path)
    _write(path / "synthetic.jsonl", _rows(8))
    return path


@pytest.mark.parametrize("source_overrides,differs", [
    (["task=rotten_tomatoes"], "task.name: \"rotten_tomatoes\" there, \"sst2\" now"),
    (["task.label_names=[good,evil]"], "task.label_names"),
    (["task.label_words=[' awful',' superb']"], "task.label_words"),
    (["task.prompt=' Verdict:'"], "task.prompt"),
    (["model.gguf_file=other.gguf"], "tokenizer"),
])
def test_a_synthetic_source_of_another_task_is_refused_with_what_differs(source_overrides, differs, data, tmp_path):
    source = _source(data, tmp_path / "source", *source_overrides)
    _refused([f"paths.data_dir={data}", *FROM, f"data.synthetic_from={source}"],
             f"data.synthetic_from='{source}' is not a job of this task", differs, "data.transfer=true")
    validate(compose_config([*TINY, f"paths.data_dir={data}", *FROM, f"data.synthetic_from={source}",
                             "data.transfer=true"]))


def test_a_synthetic_source_without_an_identity_is_refused_unless_a_transfer(data, tmp_path):
    source = _write(tmp_path / "loose" / "synthetic.jsonl", _rows(8)).parent
    _refused([f"paths.data_dir={data}", *FROM, f"data.synthetic_from={source}"], "has no identity.json")
    validate(compose_config([*TINY, f"paths.data_dir={data}", *FROM, f"data.synthetic_from={source}",
                             "data.transfer=true"]))


def test_a_synthetic_source_of_the_same_task_is_accepted(data, tmp_path):
    source = _source(data, tmp_path / "source", "admm.rho=0.9")
    validate(compose_config([*TINY, f"paths.data_dir={data}", *FROM, f"data.synthetic_from={source}"]))


def test_a_synthetic_source_is_refused_when_the_job_generates(data, tmp_path):
    source = _source(data, tmp_path / "source")
    _refused([f"paths.data_dir={data}", f"data.synthetic_from={source}"],
             f"data.synthetic_from='{source}' is read only by jobs that do not generate")


def test_a_transfer_without_a_source_is_refused():
    _refused(["data.transfer=true"], "data.transfer=true", "data.synthetic_from is not set")


# --- findings 5 and 6: each seed and each class once ----------------------------------------------

@pytest.mark.parametrize("override,named", [
    ("evaluate.seeds=[0,0]", "evaluate.seeds=[0, 0] repeats 0"),
    ("evaluate.seeds=[1,2,1]", "evaluate.seeds=[1, 2, 1] repeats 1"),
    ("task.label_names=[pos,pos]", "task.label_names=['pos', 'pos'] repeats pos"),
])
def test_a_repeated_seed_or_class_name_is_refused(override, named):
    _refused([override], named)


# --- finding 7: a byte-order mark -----------------------------------------------------------------

@pytest.mark.parametrize("split", ["train", "validation"])
def test_a_byte_order_mark_is_read_past(split, data):
    path = data / "sst2" / f"{split}.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    cfg = compose_config([*TINY, f"paths.data_dir={data}", *EVALUATE])
    validate(cfg)
    assert load_split(cfg, split)[0].text == "a sentence of class 0, number 0"


# --- finding 8: paths that cannot be folders ------------------------------------------------------

@pytest.mark.parametrize("key", ["paths.output_root", "paths.cache_dir", "paths.target_cache_dir",
                                 "paths.data_dir"])
def test_a_file_where_a_folder_belongs_is_refused(key, tmp_path):
    (tmp_path / "afile").write_text("x")
    _refused([f"{key}={tmp_path / 'afile' / 'below'}"], f"{key}=", f"{tmp_path / 'afile'} is a file")


def test_an_unreachable_hub_is_listed_not_raised_while_naming_the_job(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'stanfordnlp/sst2' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setattr(identity, "_HUB_DIGESTS", {})
    monkeypatch.setattr(identity, "_HUB_ERRORS", {})
    cfg = compose_config([*TINY, "paths.data_dir=null"])
    science_hash(cfg)  # what Hydra resolves to name the job directory
    _refused(["paths.data_dir=null"], "paths.data_dir=null reads split 'train'", "OfflineModeIsEnabled")


# --- finding 9: every bad row, and text that is no text -------------------------------------------

def test_every_bad_row_of_every_file_is_listed(data):
    train, evaluation = data / "sst2" / "train.jsonl", data / "sst2" / "validation.jsonl"
    lines = train.read_text().splitlines(keepends=True)
    lines[2], lines[6] = '{"text": "x", "label": 5}\n', "not json\n"
    train.write_text("".join(lines))
    evaluation.write_text(evaluation.read_text() + '{"text": "", "label": 0}\n')
    _refused([f"paths.data_dir={data}", *EVALUATE], f"{train}:3 has label 5", f"{train}:7 is not a JSON object",
             f"{evaluation}:21 is not a JSON object")


def test_a_file_of_many_bad_rows_lists_twenty_and_counts_the_rest(data):
    train = data / "sst2" / "train.jsonl"
    train.write_text(train.read_text() + '{"text": "x", "label": 7}\n' * 30)
    message = _refused([f"paths.data_dir={data}"], f"{train}:61 has label 7", f"{train}:80 has label 7",
                       "10 more bad rows")
    assert f"{train}:81 " not in message


@pytest.mark.parametrize("text", ["\u0000", "\u0000\u0000\u0000", " \u0000\t", "\u200b"])
def test_a_text_without_a_visible_character_is_refused(text, data):
    train = data / "sst2" / "train.jsonl"
    train.write_text(train.read_text() + json.dumps({"text": text, "label": 0}) + "\n")
    _refused([f"paths.data_dir={data}"], f"{train}:61", "visible character")


# --- findings 2, 3, 5 and 8 from the command line, within 30 s ------------------------------------

def _command_line(tmp_path, *overrides, env=None):
    started = time.monotonic()
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    done = subprocess.run([sys.executable, "run.py", *TINY, f"paths.output_root={tmp_path / 'out'}", *overrides],
                          cwd=REPO, capture_output=True, text=True, env=env, timeout=120)
    return done, time.monotonic() - started


@pytest.mark.slow
@pytest.mark.parametrize("case", ["max_eval", "another task", "seeds", "output_root a file", "cache a file"])
def test_the_command_line_refuses_within_30_seconds_naming_the_problem(case, data, tmp_path):
    (tmp_path / "afile").write_text("x")
    source = _source(data, tmp_path / "source", "task=rotten_tomatoes")
    overrides, env, named = {
        "max_eval": ([f"paths.data_dir={DATA_DIR}", "task=tweet_emotion", "generation.n_real=12", *EVALUATE,
                      "evaluate.max_eval=600"], None, "evaluate.max_eval=600"),
        "another task": ([f"paths.data_dir={data}", *FROM, f"data.synthetic_from={source}"], None,
                         "is not a job of this task"),
        "seeds": (["evaluate.seeds=[0,0]"], None, "evaluate.seeds=[0, 0] repeats 0"),
        "output_root a file": ([f"paths.output_root={tmp_path / 'afile'}"], None, "paths.output_root="),
        "cache a file": ([], {"GRADMM_CACHE": str(tmp_path / "afile")}, "paths.cache_dir="),
    }[case]
    done, seconds = _command_line(tmp_path, *overrides, env=env)
    assert done.returncode != 0 and named in done.stderr, done.stderr[-3000:]
    assert seconds < 30
    assert not (tmp_path / "out" / "runs").exists() or not any((tmp_path / "out" / "runs").rglob("*.jsonl"))
