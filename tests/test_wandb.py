"""What a W&B dashboard gets from a job, read back record by record from the offline run files."""

import json
import struct
import time
from pathlib import Path

import pytest
from conftest import TINY, compose_config

from gradmm.data.tasks import Verbalizer
from gradmm.pipeline import run_job
from gradmm.reporting.tracking import Tracker, dataset_name, headline
from gradmm.stages.classifier import Classifier
from gradmm.stages.filter import filter_examples

EVAL = [
    "evaluate.steps=4", "evaluate.eval_every=2", "evaluate.batch_size=4", "evaluate.n_dev=12",
    "evaluate.max_eval=16", "evaluate.n_train=8", "evaluate.seeds=[0]", "evaluate.lrs=[1e-3]",
    "evaluate.baselines=[zero_shot]",
]
# W&B's run files are LevelDB-style logs of wandb_internal_pb2.Record: 32 KiB blocks of chunks, each
# with a 7-byte header (checksum, length, FULL/FIRST/MIDDLE/LAST), after a 7-byte file header.
_BLOCK, _HEADER, _FULL, _LAST = 32768, 7, 1, 4


def read_records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pos, parts = [], _HEADER, b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        _, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER]) if left >= _HEADER else (0, 0, 0)
        if kind == 0:  # the zero padding at the end of a block
            pos += left
            continue
        if pos + _HEADER + length > len(data):  # a record still being written
            break
        parts += data[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        if kind in (_FULL, _LAST):
            record = pb.Record()
            record.ParseFromString(parts)
            records.append(record)
            parts = b""
    return records


class OfflineRun:
    """The records of the one offline W&B run in a job directory, by kind."""

    def __init__(self, job_dir: Path, timeout_s: float = 60):
        (self.dir,) = (job_dir / "wandb").glob("offline-run-*")
        # wandb-core may still be writing the file when run.finish() returns; its last record is the exit.
        deadline = time.monotonic() + timeout_s
        while True:
            self.records = read_records(next(self.dir.glob("run-*.wandb")))
            if self.of("exit") or time.monotonic() > deadline:
                break
            time.sleep(0.2)

    def of(self, kind: str) -> list:
        return [getattr(r, kind) for r in self.records if r.WhichOneof("record_type") == kind]

    def history(self) -> list[dict]:
        rows = []
        for h in self.of("history"):
            row = {}
            for item in h.item:
                key = "/".join(item.nested_key) if item.nested_key else item.key
                row[key] = json.loads(item.value_json)
            rows.append(row)
        return rows

    def summary(self) -> dict:
        values = {}
        for s in self.of("summary"):
            for item in s.update:
                values["/".join(item.nested_key) if item.nested_key else item.key] = json.loads(item.value_json)
        return values

    def metrics(self) -> dict:
        return {m.name.replace("\\.", "."): m for m in self.of("metric")}

    def config(self) -> dict:
        (run,) = self.of("run")
        return {item.key: json.loads(item.value_json) for item in run.config.update}

    def table(self, key: str) -> list[dict]:
        (row,) = [row for row in self.history() if f"{key}/_type" in row]
        table = json.loads((self.dir / "files" / row[f"{key}/path"]).read_text())
        return [dict(zip(table["columns"], data, strict=True)) for data in table["data"]]


@pytest.fixture
def offline_wandb(monkeypatch, tmp_path):
    """Offline W&B with no key, its caches and staging inside tmp_path."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    for var in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))
    return ["tracker=wandb", "tracker.mode=offline", f"paths.output_root={tmp_path}"]


@pytest.mark.slow
def test_a_generation_job_and_an_evaluation_of_it_fill_the_dashboard(tmp_path, offline_wandb):
    generation = compose_config([*TINY, *offline_wandb, "stages=[generate,filter]", "filter.classifier=none",
                                 "filter.n_per_class=3"])
    labels = list(generation.task.label_names)
    run_job(generation, tmp_path / "generation")
    evaluation = compose_config([*TINY, *offline_wandb, *EVAL, "stages=[evaluate]",
                                 f"data.synthetic_from={tmp_path / 'generation'}"])
    run_job(evaluation, tmp_path / "evaluation")
    made, used = OfflineRun(tmp_path / "generation"), OfflineRun(tmp_path / "evaluation")

    # Namespaced curves, each series one class and round, or one method, seed and lr.
    made_keys = set().union(*made.history())
    for k, label in enumerate(labels):
        assert {f"generate/{m}/class{k}_{label}/round0" for m in ("grad_distance_z", "log_ppl_z")} <= made_keys
    dev_key = "evaluate/dev_accuracy/synthetic_filtered/seed0/lr0.001"
    assert {"evaluate/step", dev_key, "evaluate/train_loss/synthetic_filtered/seed0/lr0.001"} <= set().union(
        *used.history())
    for run in (made, used):
        for row in run.history():
            assert not any(isinstance(v, str) for k, v in row.items() if "/texts/" not in k), row

    # Each curve against its stage's step, summarised by its best value.
    metric = made.metrics()[f"generate/grad_distance_z/class0_{labels[0]}/round0"]
    assert metric.step_metric == "generate/outer_step" and metric.summary.min
    assert "generate/outer_step" in made.metrics()
    metric = used.metrics()[dev_key]
    assert metric.step_metric == "evaluate/step" and metric.summary.max
    assert set(made.summary()[f"generate/grad_distance_z/class0_{labels[0]}/round0"]) == {"min"}
    assert set(used.summary()[dev_key]) == {"max"}, "the rule applies to the whole name, dots included"

    # The synthetic texts, as generated and as the filter judged them.
    synthetic = [json.loads(line) for line in (tmp_path / "generation" / "synthetic.jsonl").open()]
    texts = made.table("generate/texts")
    assert [row["text"] for row in texts] == [row["text"] for row in synthetic]
    assert {row["grad_distance"] for row in texts} == {row["grad_distance"] for row in synthetic}
    judged = made.table("filter/texts")
    kept = [json.loads(line)["text"] for line in (tmp_path / "generation" / "synthetic_filtered.jsonl").open()]
    assert sorted(row["text"] for row in judged if row["kept"]) == sorted(kept)
    assert 0 < len(judged) - len(kept) and {row["dropped_by"] for row in judged if not row["kept"]} <= {
        "duplicate", "balance"}
    assert all(row["dropped_by"] is None for row in judged if row["kept"])

    # The synthetic set as a dataset artifact, used by the evaluation: the same name and content.
    (logged,) = [a for a in made.of("artifact") if a.type == "dataset"]
    (read,) = [a for a in used.of("artifact") if a.type == "dataset"]
    assert logged.name == read.name == dataset_name(tmp_path / "generation")
    assert {c.path for c in logged.manifest.contents} == {"synthetic.jsonl", "synthetic_filtered.jsonl",
                                                          "summary.json"}
    assert read.digest == logged.digest and read.use_after_commit and not logged.use_after_commit
    assert not [a for a in used.of("artifact") if a.type == "model"], "weights are uploaded only when asked"

    # One flat row per run.
    summary = made.summary()
    for key in ("n_synthetic", "grad_distance_set", "grad_distance_union", "grad_distance_mean", "log_ppl_mean",
                "random_baseline/grad_distance_set", "real_examples/grad_distance_set", "seconds",
                "filter/n_kept", "filter/dropped/duplicate"):
        assert isinstance(summary[key], int | float), key
    summary = used.summary()
    for key in ("accuracy", "accuracy_std", *(f"accuracy/class{k}_{label}" for k, label in enumerate(labels)),
                "baseline/zero_shot/accuracy", "baseline/zero_shot/accuracy_std", "evaluation/n_eval"):
        assert isinstance(summary[key], int | float), key
    config = made.config()
    assert config["admm.rho"] == generation.admm.rho and "admm" not in config


def test_headline_figures_are_flat_and_carry_the_privacy_release():
    summary = {
        "grad_distance_set": 0.5, "random_baseline": {"grad_distance_set": 0.9}, "real_examples": None,
        "accuracy": 0.8, "accuracy_std": 0.1, "per_class_accuracy": [0.7, 0.9],
        "baselines": {"zero_shot": {"mean": 0.6, "std": 0.0, "per_class_accuracy": [0.5, 0.7], "n_train": 0}},
        "privacy": {"spent_epsilon": 3.9, "epsilon": 4.0, "delta": 1e-5, "total_epsilon": 7.8,
                    "releases_on_these_examples": 2, "relation": "x"},
        "leakage": {"max_shared_ngram": 3, "audit": "post hoc"},
        "filter": {"n_in": 8, "n_kept": 4, "dropped": {"balance": 4}},
        "failed_rounds": [{"class": 0, "round": 1, "error": "nan"}],
    }
    figures = headline(summary, ["neg", "Sci/Tech"])
    assert figures == {
        "grad_distance_set": 0.5, "random_baseline/grad_distance_set": 0.9, "accuracy": 0.8, "accuracy_std": 0.1,
        "accuracy/class0_neg": 0.7, "accuracy/class1_Sci_Tech": 0.9, "baseline/zero_shot/accuracy": 0.6,
        "baseline/zero_shot/accuracy_std": 0.0, "baseline/zero_shot/accuracy/class0_neg": 0.5,
        "baseline/zero_shot/accuracy/class1_Sci_Tech": 0.7, "privacy/epsilon": 3.9, "privacy/delta": 1e-5,
        "privacy/epsilon_total": 7.8, "privacy/releases": 2, "leakage/max_shared_ngram": 3, "filter/n_in": 8,
        "filter/n_kept": 4, "filter/dropped/balance": 4, "n_failed_rounds": 1,
    }


def test_classes_whose_names_slug_alike_keep_their_own_keys():
    summary = {"accuracy": 0.5, "per_class_accuracy": [0.2, 0.8],
               "baselines": {"zero_shot": {"mean": 0.5, "std": 0.0, "per_class_accuracy": [0.3, 0.7]}}}
    figures = headline(summary, ["pos/neg", "pos neg"])
    assert figures["accuracy/class0_pos_neg"] == 0.2 and figures["accuracy/class1_pos_neg"] == 0.8
    assert figures["baseline/zero_shot/accuracy/class0_pos_neg"] == 0.3
    assert figures["baseline/zero_shot/accuracy/class1_pos_neg"] == 0.7


def test_the_filter_names_the_rule_that_dropped_each_row():
    rows = [{"text": text, "label": label, "grad_distance": d, "log_ppl": 5.0} for text, label, d in [
        ("good fun", 1, 0.1), ("Good fun!", 1, 0.2), ("awful", 0, 0.1), ("fine enough", 1, 0.3), ("bad", 1, 0.05)]]
    kept, dropped, dropped_by = filter_examples(rows, [1, 1, 0, 1, 0], 2, 5, 0.8, 0.0)
    assert dropped_by == [None, "duplicate", None, "balance", "misclassified"]
    assert [row["text"] for row in kept] == ["awful", "good fun"]
    assert dropped == {"misclassified": 1, "duplicate": 1, "balance": 1}


class RecordingRun:
    def __init__(self):
        self.artifacts = []

    def log_artifact(self, artifact):
        self.artifacts.append(artifact)


@pytest.mark.parametrize("asked", [False, True])
def test_fine_tuned_weights_are_uploaded_only_when_asked(tmp_path, asked):
    cfg = compose_config([*TINY, f"tracker.upload_weights={str(asked).lower()}"])
    tracker = Tracker(cfg, tmp_path)
    tracker.run = RecordingRun()
    tracker.log_weights("synthetic_filtered", 0, {"method": "full", "weights": {}})
    assert [a.type for a in tracker.run.artifacts] == (["model"] if asked else [])
    assert (tmp_path / "evaluation" / "synthetic_filtered_seed0.weights.pt").is_file() == asked


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # wandb_workspaces' pydantic v1 validators
def test_the_workspace_holds_the_dashboard_panels():
    pytest.importorskip("wandb_workspaces")
    from gradmm.reporting.dashboard import workspace

    built = workspace("someone", "gradmm", "start here")
    panels = {section.name: section.panels for section in built.sections}
    assert {p.metric_regex for p in panels["Generation"]} >= {"generate/grad_distance_z/.*"}
    assert all(p.x == "generate/outer_step" for p in panels["Generation"])
    assert {p.table_name for p in panels["Synthetic texts"]} == {"generate/texts", "filter/texts"}
    assert "summary:accuracy" in built.runset_settings.pinned_columns
    built._to_model()  # what save() would send


def test_scoring_texts_shows_its_progress(tiny_lm_factory, capsys):
    """Scoring an evaluation split takes a minute or more on a CPU: it has a progress bar."""
    lm = tiny_lm_factory()
    Classifier(lm, Verbalizer.build(compose_config(TINY).task, lm.tokenizer), batch_size=2).scores(["a", "b", "c"])
    assert "scoring 3 texts" in capsys.readouterr().err
