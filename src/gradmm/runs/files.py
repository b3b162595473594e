"""Job artifacts on disk. Every file is written aside and renamed into place, so a crash or Ctrl-C
leaves either the old or the new version, never half of one."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

import torch

# mkstemp creates files readable by their owner only; artifacts get the mode any other file would
# (0666 less the umask), so collaborators on a shared cluster filesystem can read a run's results.
_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK


def write_atomic(path: str | Path, text: str) -> None:
    _atomically(path, "w", lambda f: f.write(text))


def save_torch(path: str | Path, obj: Any) -> None:
    """torch.save, atomically: a checkpoint is either the previous one or the new one, whole."""
    _atomically(path, "wb", lambda f: torch.save(obj, f))


def _atomically(path: str | Path, mode: str, write: Callable[[IO], object]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path: str | Path) -> list[dict]:
    """The one JSONL reader: UTF-8, a byte-order mark opening the file read past (editors on Windows
    write one), blank lines skipped, each line a JSON object; a ValueError names the first line that is
    not one."""
    rows = []
    with Path(path).open(encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as error:
                raise ValueError(f"line {line_no}: {error}") from None
            if not isinstance(row, dict):
                raise ValueError(f"line {line_no}: holds a {type(row).__name__}, not a mapping")
            rows.append(row)
    return rows
