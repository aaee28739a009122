"""The one atomic-write helper every package uses."""

from __future__ import annotations

import json
import stat

import pytest

from index.atomic import write_atomic, write_json_atomic, write_text_atomic


def test_a_write_replaces_the_file_whole_and_leaves_it_readable(tmp_path):
    target = tmp_path / "deep" / "folder" / "manifest.json"
    write_json_atomic(target, {"a": 1, "name": "Amenhotep III"})
    assert json.loads(target.read_text()) == {"a": 1, "name": "Amenhotep III"}
    write_text_atomic(target, "second\n")
    assert target.read_text() == "second\n"
    # mkstemp creates files 0600; a checkpoint or manifest must be readable by the service user
    assert stat.S_IMODE(target.stat().st_mode) & 0o044 == 0o044
    assert [p.name for p in target.parent.iterdir()] == ["manifest.json"]


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "scan.pt"
    target.write_bytes(b"old")

    def half_then_crash(handle):
        handle.write(b"new but incomplete")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, half_then_crash)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["scan.pt"]
