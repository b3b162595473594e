"""What a finished stage left in its job directory, and whether it is still there (manifest.json).

A stage is done when summary.json says so and its outputs agree with the record made when it
finished: each output's SHA-256 (and, for a JSONL file, its row count), and summary.json's own
SHA-256. A resumed run checks them before any model loads. What can be made again to the same bytes
is rebuilt: synthetic.jsonl and leakage.jsonl from the saved rounds, synthetic_filtered.jsonl from
synthetic.jsonl, a trained model's evaluation/<set>_seed<k>.json by training it again; the rebuilt
file must equal the recorded one. What cannot (a round file: its records hold wall-clock times;
summary.json: timings and provenance) is named, and the run stops without changing anything.

Each stage's record says which command and code version made it, and when (`provenance`).

summary.json is written before the manifest, so a run killed between the two leaves a summary with a
stage the manifest lacks: that stage's outputs are rebuilt, as nothing vouches for them.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import logging
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from gradmm.runs import files

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
SUMMARY_FILE = "summary.json"
# The summary key that marks each stage done, and the outputs it leaves (globs under the job directory).
DONE_KEY = {"generate": "n_synthetic", "filter": "filter", "evaluate": "accuracy"}
OUTPUTS = {"generate": ("rounds/class*_round*.json", "synthetic.jsonl", "leakage.jsonl"),
           "filter": ("synthetic_filtered.jsonl",), "evaluate": ("evaluation/*.json",)}
UNREBUILDABLE = "rounds/"


class ManifestError(RuntimeError):
    """An output of a finished stage is missing or altered and cannot be made again to the same bytes."""


@dataclass
class Resume:
    """Where a run resumes from: the verified summary, the stages whose outputs it must make again, and
    the record those must match (empty for a stage nothing vouches for)."""

    summary: dict = field(default_factory=dict)
    rebuild: set[str] = field(default_factory=set)
    recorded: dict[str, dict] = field(default_factory=dict)


def done_stages(summary: dict) -> list[str]:
    return [stage for stage, key in DONE_KEY.items() if key in summary]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def describe(path: Path) -> dict:
    entry = {"sha256": sha256(path)}
    if path.suffix == ".jsonl":
        entry["rows"] = sum(1 for line in path.read_bytes().splitlines() if line.strip())
    return entry


def outputs(out_dir: Path, stage: str) -> dict[str, dict]:
    return {str(path.relative_to(out_dir)): describe(path)
            for pattern in OUTPUTS[stage] for path in sorted(out_dir.glob(pattern)) if path.is_file()}


def save(out_dir: Path, summary: dict) -> None:
    """summary.json, then the manifest of every stage it marks done (outputs as they are on disk now:
    checked at the start of this run, or made by it)."""
    files.write_json(out_dir / SUMMARY_FILE, summary)
    record = {"summary_sha256": sha256(out_dir / SUMMARY_FILE),
              "stages": {stage: outputs(out_dir, stage) for stage in done_stages(summary)}}
    files.write_json(out_dir / MANIFEST_FILE, record)


def check_rebuilt(out_dir: Path, resume: Resume) -> None:
    """Every output a rebuilt stage had recorded is back, byte for byte."""
    for stage in resume.rebuild:
        for name, entry in resume.recorded.get(stage, {}).items():
            path = out_dir / name
            now = sha256(path) if path.is_file() else "missing"
            if now != entry["sha256"]:
                raise ManifestError(
                    f"{path} was rebuilt but differs from the one recorded in {out_dir / MANIFEST_FILE} "
                    f"(sha256 {entry['sha256'][:12]}, now {now[:12]}): the later results of this job were "
                    "made from the recorded bytes. Restore the file, or run with resume=false.")


def verify(out_dir: Path, remove_damaged: bool = True) -> Resume:
    """Checks a job directory against its manifest (see the module docstring); raises ManifestError
    naming every file that cannot be rebuilt. remove_damaged: move damaged evaluation results out of
    the way, so their models are trained again (the main process only)."""
    summary_path, manifest = out_dir / SUMMARY_FILE, _read(out_dir / MANIFEST_FILE)
    recorded: dict[str, dict] = (manifest or {}).get("stages", {})
    if not summary_path.is_file():
        if recorded:
            raise ManifestError(_unrebuildable(summary_path, "is missing", out_dir))
        return Resume()
    summary = _read(summary_path)
    if not isinstance(summary, dict):
        raise ManifestError(_unrebuildable(summary_path, "is unreadable", out_dir))
    done = done_stages(summary)
    # Stages the manifest does not vouch for: a run killed between writing the two files, or a job
    # directory from before the manifest.
    rebuild = {stage for stage in done if stage not in recorded}
    if manifest is not None and sha256(summary_path) != manifest.get("summary_sha256") and not rebuild:
        raise ManifestError(_unrebuildable(summary_path, "differs from the one recorded", out_dir))
    fatal = []
    for stage in done:
        for name, entry in recorded.get(stage, {}).items():
            path = out_dir / name
            if path.is_file() and sha256(path) == entry["sha256"]:
                continue
            if name.startswith(UNREBUILDABLE):
                fatal.append(f"{path} ({'altered' if path.exists() else 'missing'})")
                continue
            log.warning("%s is %s; the %s stage makes it again", path,
                        "altered" if path.exists() else "missing", stage)
            rebuild.add(stage)
            if stage == "evaluate" and path.exists() and remove_damaged:
                path.replace(path.with_name(f"{path.name}.damaged"))
    if fatal:
        raise ManifestError(
            f"{', '.join(fatal)}: recorded in {out_dir / MANIFEST_FILE} and not the same now. A round cannot be "
            "made again to the same bytes (its records hold wall-clock times), so nothing was resumed. Restore "
            "it, or run with resume=false to start over.")
    return Resume(summary, rebuild, recorded)


def _unrebuildable(path: Path, what: str, out_dir: Path) -> str:
    return (f"{path} {what} ({out_dir / MANIFEST_FILE} records finished stages): it holds figures that cannot "
            "be made again to the same bytes (timings, provenance), so nothing was resumed. Restore it, or run "
            "with resume=false to start over.")


def _read(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, ValueError):
        return None


# src/gradmm/runs/manifest.py -> the repository
SOURCE_REPO = Path(__file__).resolve().parents[3]


def code_version(repo: Path = SOURCE_REPO) -> str:
    """The commit a result was made from, marked +uncommitted when the code or configs differ from it;
    outside a git checkout (an installed package), the package's version."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--", "src", "conf", "experiments", "benchmarks")
    except OSError:
        commit = dirty = ""
    if commit:
        return commit + ("+uncommitted" if dirty else "")
    try:
        return f"gradmm {importlib.metadata.version('gradmm')}"
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def provenance() -> dict:
    """Which command and code made a result, and when it was finished."""
    return {"command": " ".join(shlex.quote(arg) for arg in sys.argv), "code_version": code_version(),
            "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
