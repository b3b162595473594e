"""Adversarial: results belong to their data and config (issue 15, findings 1 and 13), checkpoints load
safely (finding 8), an all-failed job says so (finding 7), and dp jobs leak through no side door
(findings 4 and 5)."""

import json
import logging
import os
import pickle
import shutil

import pytest
import torch
from conftest import DATA_DIR, TINY, compose_config
from test_faults import _poison

import gradmm.pipeline as pipeline
from gradmm.config.validation import ConfigError, validate
from gradmm.runs import identity, job_directory
from gradmm.runs.identity import science_hash
from gradmm.stages import generate


@pytest.fixture
def data(tmp_path):
    """A copy of the sst2 splits, small enough to hash and edit."""
    root = tmp_path / "data"
    (root / "sst2").mkdir(parents=True)
    for split, n in (("train", 200), ("validation", 40)):
        lines = (DATA_DIR / "sst2" / f"{split}.jsonl").read_text().splitlines(keepends=True)
        (root / "sst2" / f"{split}.jsonl").write_text("".join(lines[:n]))
    return root


def _cfg(data, *overrides, root=None):
    extra = [f"paths.output_root={root}", f"paths.target_cache_dir={root / 'targets'}"] if root else []
    return compose_config([*TINY, f"paths.data_dir={data}", *extra, *overrides])


def _edit_line(path, n, text):
    lines = path.read_text().splitlines(keepends=True)
    row = json.loads(lines[n])
    lines[n] = json.dumps({**row, "text": text}) + "\n"
    path.write_text("".join(lines))


DATA_CHANGES = {
    "a training text edited": lambda d: _edit_line(d / "sst2" / "train.jsonl", 3, "an edited sentence"),
    "a training row added": lambda d: (d / "sst2" / "train.jsonl").open("a").write('{"text": "new", "label": 1}\n'),
    "a training label flipped": lambda d: (d / "sst2" / "train.jsonl").write_text(
        (d / "sst2" / "train.jsonl").read_text().replace('"label": 0}', '"label": 1}', 1)),
    "an evaluation text edited": lambda d: _edit_line(d / "sst2" / "validation.jsonl", 0, "edited"),
    "a file replaced by another split": lambda d: shutil.copy(d / "sst2" / "validation.jsonl",
                                                              d / "sst2" / "train.jsonl"),
}


@pytest.mark.parametrize("change", DATA_CHANGES)
@pytest.mark.parametrize("privacy", ["none", "dp"])
def test_changed_data_is_another_job(change, privacy, data, tmp_path):
    overrides = [f"privacy={privacy}", "privacy.delta=1e-3", f"paths.target_cache_dir={tmp_path / 'targets'}"]
    before = science_hash(_cfg(data, *overrides))
    DATA_CHANGES[change](data)
    assert science_hash(_cfg(data, *overrides)) != before


def test_the_same_data_in_another_folder_is_the_same_job(data, tmp_path):
    moved = tmp_path / "elsewhere" / "data"
    shutil.copytree(data, moved)
    assert science_hash(_cfg(moved)) == science_hash(_cfg(data))


def test_one_generation_however_its_path_is_spelt_is_one_evaluation_job(data, tmp_path, monkeypatch):
    source = tmp_path / "runs" / "gen"
    source.mkdir(parents=True)
    for name in ("synthetic.jsonl", "synthetic_filtered.jsonl"):
        (source / name).write_text('{"text": "a fine film", "label": 1}\n')
    (tmp_path / "link").symlink_to(tmp_path / "runs")

    def evaluation(path):
        return science_hash(_cfg(data, "stages=[evaluate]", f"data.synthetic_from={path}"))

    monkeypatch.chdir(tmp_path)
    assert evaluation(source) == evaluation("runs/gen") == evaluation("./runs/../runs/gen") == evaluation("link/gen")
    # Another generation (same texts, another job directory) is still another job, and so are edited texts.
    other = tmp_path / "other"
    shutil.copytree(source, other)
    before = evaluation(source)
    assert evaluation(other) != before
    (source / "synthetic_filtered.jsonl").write_text('{"text": "a dull film", "label": 0}\n')
    assert evaluation(source) != before


@pytest.fixture
def hub(data, monkeypatch):
    """datasets.load_dataset served from the local copy, recording what each call asked for: the hub
    without a network."""
    import datasets

    calls = []

    def load_dataset(hub_id, hub_config=None, split=None, revision=None):
        calls.append({"hub_id": hub_id, "split": split, "revision": revision})
        rows = [json.loads(line) for line in (data / "sst2" / f"{split}.jsonl").read_text().splitlines()]
        return datasets.Dataset.from_list([{"sentence": r["text"], "label": r["label"]} for r in rows])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(identity, "_HUB_DIGESTS", {})
    return calls


def _hub_cfg(*overrides):
    return compose_config([*TINY, "paths.data_dir=null", *overrides])


def test_another_folder_with_other_data_or_the_hub_is_another_job(data, hub, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(data, other)
    _edit_line(other / "sst2" / "train.jsonl", 0, "different")
    hashes = {science_hash(_cfg(data)), science_hash(_cfg(other)), science_hash(_hub_cfg())}
    assert len(hashes) == 3


@pytest.mark.parametrize("privacy", ["none", "dp"])
def test_a_hub_dataset_is_named_by_its_revision_and_the_rows_it_yields(privacy, data, hub, tmp_path):
    dp = [f"privacy={privacy}", "privacy.delta=1e-3", f"paths.target_cache_dir={tmp_path / 'targets'}"]
    before = science_hash(_hub_cfg(*dp))
    assert science_hash(_hub_cfg(*dp)) == before
    assert {(c["hub_id"], c["revision"]) for c in hub} == {("stanfordnlp/sst2", None)}
    assert science_hash(_hub_cfg(*dp, "task.hub_revision=v2")) != before
    assert hub[-1]["revision"] == "v2"
    # Read once per process, however often the job's identity is asked for.
    assert len(hub) == 2 * 2
    # The same id and revision serving other rows (an unpinned dataset updated upstream): another job,
    # from the next process on.
    _edit_line(data / "sst2" / "train.jsonl", 5, "changed upstream")
    identity._HUB_DIGESTS.clear()
    assert science_hash(_hub_cfg(*dp)) != before


def test_the_hub_is_read_at_the_pinned_revision(data, hub):
    from gradmm.data.tasks import load_split

    examples = load_split(_hub_cfg("task.hub_revision=abc123"), "train")
    assert len(examples) == 200 and hub[-1] == {"hub_id": "stanfordnlp/sst2", "split": "train", "revision": "abc123"}


def test_the_hub_without_a_hub_dataset_is_refused_by_name():
    cfg = compose_config([*TINY, "task=rt_polarity", "paths.data_dir=null"])
    with pytest.raises(ConfigError, match="task 'rt_polarity' has no hub dataset"):
        validate(cfg)


def test_under_dp_no_plain_hash_of_the_private_file_is_published(data, tmp_path):
    import hashlib

    cfg = _cfg(data, "privacy=dp", "privacy.delta=1e-3", f"paths.target_cache_dir={tmp_path / 'targets'}")
    plain = hashlib.sha256((data / "sst2" / "train.jsonl").read_bytes()).hexdigest()
    record = json.dumps(job_directory.identity(cfg))
    assert plain not in record and plain[:32] not in record
    assert job_directory.identity(cfg)["data"] == job_directory.identity(cfg)["data"], "keyed, yet stable"


# --- a directory holding another job (finding 1) ----------------------------------------------------

def _existing_job(cfg, path):
    """A finished job's directory, as run_job leaves it, without running the model."""
    path.mkdir(parents=True)
    job_directory.claim(cfg, path)
    (path / "config.yaml").write_text("seed: 0\n")
    (path / "summary.json").write_text(json.dumps({"n_synthetic": 4, "accuracy": 0.9}))
    return {p.name: p.read_bytes() for p in path.iterdir()}


SCIENCE_CHANGES = {
    "admm.rho=0.7": "admm.rho: 0.5 there, 0.7 now",
    "seed=3": "seed: 0 there, 3 now",
    "task.prompt=' It is'": "task.prompt",
    "generation.seq_len=5": "generation.seq_len: 6 there, 5 now",
    "model.init_seed=2": "model.init_seed",
    "projector=topk_lm": "projector.name",
}


@pytest.mark.parametrize("change", SCIENCE_CHANGES)
def test_a_run_into_another_jobs_directory_is_refused_and_changes_nothing(change, data, tmp_path, monkeypatch):
    path = tmp_path / "X"
    before = _existing_job(_cfg(data, root=tmp_path), path)
    monkeypatch.setattr(pipeline, "load_tokenizer", lambda *a, **k: pytest.fail("refused before loading"))
    with pytest.raises(job_directory.JobDirError) as refused:
        pipeline.run_job(_cfg(data, change, root=tmp_path), path)
    assert f"{path} holds another job's work" in str(refused.value)
    assert SCIENCE_CHANGES[change] in str(refused.value)
    assert before == {p.name: p.read_bytes() for p in path.iterdir()}, "config.yaml and summary untouched"


def test_a_run_over_edited_data_in_the_same_directory_is_refused(data, tmp_path):
    path = tmp_path / "X"
    before = _existing_job(_cfg(data, root=tmp_path), path)
    _edit_line(data / "sst2" / "train.jsonl", 5, "edited")
    with pytest.raises(job_directory.JobDirError, match=r"data_files\.train: "):
        pipeline.run_job(_cfg(data, root=tmp_path), path)
    assert before == {p.name: p.read_bytes() for p in path.iterdir()}


@pytest.mark.parametrize("content", [b"", b"{", b"[]", b'{"science_hash": "x"}', b"\xff"])
def test_an_unreadable_identity_is_named_and_nothing_resumed(content, data, tmp_path):
    path = tmp_path / "X"
    _existing_job(_cfg(data, root=tmp_path), path)
    (path / "identity.json").write_bytes(content)
    with pytest.raises(job_directory.JobDirError, match=f"{path / 'identity.json'} is unreadable"):
        pipeline.run_job(_cfg(data, root=tmp_path), path)
    assert (path / "identity.json").read_bytes() == content


def test_an_older_job_directory_is_compared_by_its_config(data, tmp_path):
    from omegaconf import OmegaConf

    path = tmp_path / "old"
    path.mkdir()
    (path / "config.yaml").write_text(OmegaConf.to_yaml(_cfg(data, root=tmp_path), resolve=True))
    with pytest.raises(job_directory.JobDirError, match="admm.rho: 0.5 there, 0.9 now"):
        job_directory.claim(_cfg(data, "admm.rho=0.9", root=tmp_path), path)
    job_directory.claim(_cfg(data, root=tmp_path), path)
    assert job_directory.read_identity(path)["science_hash"] == science_hash(_cfg(data, root=tmp_path))


# --- resuming says so (finding 13), checkpoints (finding 8), all rounds failed (finding 7) ----------

@pytest.mark.slow
def test_a_resumed_job_says_where_it_continues_before_any_work(data, tmp_path, monkeypatch, caplog):
    cfg = _cfg(data, "generation.rounds=2", root=tmp_path)
    path = tmp_path / "job"
    # Stopped in the second outer step of class 0's second round (a loss per inner step, 2 inner steps
    # an outer step, 2 outer steps a round: calls 1-4 are the first round).
    _poison(monkeypatch, lambda n, ctx: KeyboardInterrupt() if n == 7 else False)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_job(cfg, path)
    monkeypatch.undo()
    loaded_at = []
    real_load = pipeline.load_lm
    monkeypatch.setattr(pipeline, "load_lm",
                        lambda *a, **k: loaded_at.append(len(caplog.records)) or real_load(*a, **k))
    with caplog.at_level(logging.INFO, logger="gradmm.runs.job_directory"):
        pipeline.run_job(cfg, path)
    (note,) = [r for r in caplog.records if "resuming the job" in r.getMessage()]
    message = note.getMessage()
    assert f"resuming the job in {path}: 1 of 4 rounds done" in message
    assert "class0_round1.state.pt in progress" in message and "continuing with generate" in message
    assert caplog.records.index(note) < loaded_at[0], "said before the model loads"


def test_a_fresh_job_does_not_claim_to_resume(data, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="gradmm.runs.job_directory"):
        job_directory.claim(_cfg(data, root=tmp_path), tmp_path / "new")
    assert "resuming" not in caplog.text


def _checkpoint(tmp_path, data, monkeypatch):
    cfg = _cfg(data, root=tmp_path)
    path = tmp_path / "job"
    # In the first round's second outer step, after the first one's checkpoint.
    _poison(monkeypatch, lambda n, ctx: KeyboardInterrupt() if n == 3 else False)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_job(cfg, path)
    monkeypatch.undo()
    (state,) = (path / "rounds").glob("*.state.pt")
    return cfg, path, state


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


CHECKPOINT_DAMAGE = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[:200]),
    "empty": lambda p: p.write_bytes(b""),
    "pickle payload": lambda p: p.write_bytes(pickle.dumps({"attempt": 0, "faults": [],
                                                            "state": Payload(p.parent / "PWNED")})),
    "old pickled RoundState": lambda p: torch.save({"attempt": 0, "faults": [],
                                                    "state": Payload(p.parent / "PWNED")}, p),
    "missing fields": lambda p: torch.save({"attempt": 0}, p),
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", CHECKPOINT_DAMAGE)
def test_a_bad_checkpoint_is_named_moved_aside_and_its_rounds_rerun(damage, data, tmp_path, monkeypatch, caplog):
    cfg, path, state = _checkpoint(tmp_path, data, monkeypatch)
    CHECKPOINT_DAMAGE[damage](state)
    broken = state.read_bytes()
    with caplog.at_level(logging.WARNING, logger="gradmm.stages.generate"):
        summary = pipeline.run_job(cfg, path)
    assert not (state.parent / "PWNED").exists(), "loading ran no pickled code"
    assert f"checkpoint {state} is unreadable" in caplog.text
    assert (state.parent / f"{state.name}.broken").read_bytes() == broken
    clean = pipeline.run_job(cfg, tmp_path / "clean")
    assert summary["n_synthetic"] == clean["n_synthetic"]
    assert (path / "synthetic.jsonl").read_text() == (tmp_path / "clean" / "synthetic.jsonl").read_text()


def test_every_round_failing_writes_a_summary_and_raises(data, tmp_path, monkeypatch):
    cfg = _cfg(data, "generation.max_restarts=0", root=tmp_path)
    _poison(monkeypatch, lambda n, ctx: True)
    with pytest.raises(generate.AllRoundsFailed, match=r"every round failed \(2 of them"):
        pipeline.run_job(cfg, tmp_path / "job")
    summary = json.loads((tmp_path / "job" / "summary.json").read_text())
    assert [f["class"] for f in summary["failed_rounds"]] == [0, 1]
    assert all("nan" in f["error"].lower() for f in summary["failed_rounds"])
    assert len(list((tmp_path / "job" / "rounds").glob("class*_round*.json"))) == 2, "the faults are kept"
    assert not (tmp_path / "job" / "synthetic.jsonl").exists()


# --- dp leak paths (findings 4 and 5) ---------------------------------------------------------------

DP = ["privacy=dp", "privacy.delta=1e-3"]
FROM = ["stages=[evaluate]", "evaluate.train_on=synthetic", "evaluate.n_dev=4", "evaluate.max_eval=8"]


def _source(cfg, path, rows=8):
    path.mkdir(parents=True)
    job_directory.claim(cfg, path)
    (path / "synthetic.jsonl").write_text("".join(
        json.dumps({"text": f"synthetic text {i}", "label": i % 2}) + "\n" for i in range(rows)))
    return path


@pytest.mark.parametrize("source_overrides,message", [
    ([], "is a privacy=none job"),
    ([*DP, "seed=4"], "made from other private examples"),
    ([*DP, "generation.n_real=10"], "made from other private examples"),
    ([*DP, "task=rotten_tomatoes"], "made from other private examples"),
    (None, "has no identity.json"),
])
def test_dp_reads_synthetic_texts_only_from_a_dp_job_on_the_same_examples(source_overrides, message, data, tmp_path):
    cfg = _cfg(data, *DP, root=tmp_path)
    source = tmp_path / "source"
    if source_overrides is None:
        source.mkdir()
        (source / "synthetic.jsonl").write_text(json.dumps({"text": "x", "label": 0}) + "\n")
    else:
        _source(_cfg(data, *source_overrides, root=tmp_path), source)
    with pytest.raises(ConfigError, match=message):
        validate(_cfg(data, *DP, *FROM, f"data.synthetic_from={source}", root=tmp_path))
    assert cfg.privacy.name == "dp"


def test_dp_accepts_a_dp_job_on_the_same_examples(data, tmp_path):
    source = _source(_cfg(data, *DP, root=tmp_path), tmp_path / "source")
    validate(_cfg(data, *DP, *FROM, f"data.synthetic_from={source}", root=tmp_path))


def _dp_job(data, tmp_path, *extra):
    cfg = _cfg(data, *DP, *extra, root=tmp_path / "out")
    validate(cfg)
    return cfg, pipeline.run_job(cfg, tmp_path / "job")


def _published(path):
    return {p: p.read_text() for p in path.rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl", ".yaml")}


@pytest.mark.slow
def test_under_dp_the_audit_is_not_run_into_the_job_or_its_summary(data, tmp_path, capsys):
    from gradmm.cli import print_summary
    from gradmm.data.tasks import generator_examples

    cfg, summary = _dp_job(data, tmp_path)
    assert not list((tmp_path / "job").rglob("leakage*"))
    assert set(summary["leakage"]) == {"audit"} and "outside the DP guarantee" in summary["leakage"]["audit"]
    print_summary(summary, tmp_path / "job")
    assert "leakage audit" not in capsys.readouterr().out
    texts = [ex.text for ex in generator_examples(cfg) if len(ex.text.split()) >= 4]
    for path, content in _published(tmp_path / "job").items():
        assert not any(text in content for text in texts), path


def test_under_dp_an_asked_for_audit_goes_to_its_private_folder_only(data, tmp_path):
    private = tmp_path / "private"
    _, summary = _dp_job(data, tmp_path, f"privacy.audit_dir={private}")
    (rows,) = private.glob("*/leakage.jsonl")
    assert rows.parent.name == "job" and (rows.parent / "leakage.json").is_file()
    assert summary["leakage"] == {"audit": f"in {rows.parent}: it reads the private examples, so it is outside "
                                           "the DP guarantee; do not publish it"}
    assert not list((tmp_path / "job").rglob("leakage*"))


@pytest.mark.parametrize("inside", ["", "runs", "runs/private"])
def test_an_audit_folder_among_the_published_jobs_is_refused(inside, data, tmp_path):
    with pytest.raises(ConfigError, match="privacy.audit_dir=.* is inside paths.output_root"):
        validate(_cfg(data, *DP, f"privacy.audit_dir={tmp_path / inside}", root=tmp_path))


@pytest.mark.slow
def test_a_round_file_of_another_job_is_refused_not_resumed(data, tmp_path):
    other, path = tmp_path / "other", tmp_path / "job"
    pipeline.run_job(_cfg(data, "admm.rho=0.7", root=tmp_path), other)
    pipeline.run_job(_cfg(data, root=tmp_path), path)
    round_file = path / "rounds" / "class1_round0.json"
    assert json.loads(round_file.read_text())["science_hash"] == science_hash(_cfg(data, root=tmp_path))
    shutil.copy(other / "rounds" / "class1_round0.json", round_file)
    planted = round_file.read_bytes()
    with pytest.raises(job_directory.JobDirError, match=f"{round_file} .and 0 more. belong to another job"):
        pipeline.run_job(_cfg(data, root=tmp_path), path)
    assert round_file.read_bytes() == planted


def test_a_checkpoint_of_another_job_is_refused_not_resumed(data, tmp_path, monkeypatch):
    cfg, path, state = _checkpoint(tmp_path, data, monkeypatch)
    assert torch.load(state, weights_only=True)["science_hash"] == science_hash(cfg)
    # The same checkpoint as another config (admm.rho) would have saved it.
    saved = torch.load(state, weights_only=True)
    torch.save({**saved, "science_hash": science_hash(_cfg(data, "admm.rho=0.7", root=tmp_path))}, state)
    planted = state.read_bytes()
    with pytest.raises(job_directory.JobDirError, match=f"{state} .and 0 more. belong to another job"):
        pipeline.run_job(cfg, path)
    assert state.read_bytes() == planted
