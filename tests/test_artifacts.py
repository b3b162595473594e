"""Atomic writes: a failed write leaves the previous file whole, and files get the usual mode."""

import os
import stat

import pytest

from gradmm.runs import files


def test_failed_write_keeps_the_previous_version_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "summary.json"
    files.write_json(path, {"accuracy": 0.5})

    class Interrupted(Exception):
        pass

    def half_written(f):
        f.write('{"accuracy": ')
        raise Interrupted

    with pytest.raises(Interrupted):
        files._atomically(path, "w", half_written)
    assert path.read_text() == '{\n  "accuracy": 0.5\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_files_get_the_mode_the_umask_gives_not_owner_only(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    files.write_atomic(tmp_path / "a.txt", "x")
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o666 & ~umask
