"""files.atomic_write: the whole new content or the old file, never a part, and no temporary file left behind."""

import os

import pytest

from relora_ds.files import atomic_write


def test_text_bytes_and_a_writer(tmp_path):
    path = tmp_path / "sub" / "out.txt"
    assert atomic_write(str(path), "héllo\n") == str(path)  # the directory is made
    assert path.read_text() == "héllo\n"
    atomic_write(str(path), b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    atomic_write(str(path), lambda f: f.write(b"written"))
    assert path.read_bytes() == b"written"
    assert os.listdir(tmp_path / "sub") == ["out.txt"]


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path):
    path = tmp_path / "out.json"
    path.write_text("old")

    def half_then_fail(f):
        f.write(b"new, but only ha")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(str(path), half_then_fail)
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.json"]
