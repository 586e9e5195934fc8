"""quanta._files.atomic: files and directories replace their destination whole or not at all."""

from __future__ import annotations

import os

import pytest

from quanta._files.atomic import MARKER, atomic_dir, atomic_file, check_destination, is_quanta_dir
from quanta.errors import DestinationError, DestinationExistsError


def test_file_is_renamed_into_place(tmp_path):
    dest = tmp_path / "model.bin"
    with atomic_file(dest) as tmp:
        assert tmp.parent == tmp_path and not tmp.exists()
        tmp.write_bytes(b"new")
        assert not dest.exists()
    assert dest.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["model.bin"]


def test_failed_file_write_leaves_the_old_file(tmp_path):
    dest = tmp_path / "model.bin"
    dest.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_file(dest, overwrite=True) as tmp:
            tmp.write_bytes(b"half")
            raise KeyboardInterrupt
    assert dest.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["model.bin"]


def test_existing_file_needs_overwrite_unless_owned(tmp_path):
    dest = tmp_path / "notes.txt"
    dest.write_text("mine")
    with pytest.raises(DestinationExistsError, match="overwrite=True"):
        with atomic_file(dest) as tmp:
            tmp.write_text("x")
    assert dest.read_text() == "mine"
    dest.write_text("QUANTA")
    with atomic_file(dest, owned=lambda p: p.read_text().startswith("QUANTA")) as tmp:
        tmp.write_text("QUANTA 2")
    assert dest.read_text() == "QUANTA 2"


def test_directory_is_swapped_in_and_marked(tmp_path):
    dest = tmp_path / "out.mlpackage"
    with atomic_dir(dest) as staging:
        (staging / "a.txt").write_text("1")
    assert is_quanta_dir(dest) and (dest / "a.txt").read_text() == "1"
    with atomic_dir(dest) as staging:  # quanta's own output: replaced without overwrite
        (staging / "b.txt").write_text("2")
    assert sorted(os.listdir(dest)) == sorted([MARKER, "b.txt"])
    assert os.listdir(tmp_path) == ["out.mlpackage"]


def test_user_directory_is_never_replaced_without_overwrite(tmp_path):
    dest = tmp_path / "mine"
    dest.mkdir()
    (dest / "thesis.tex").write_text("precious")
    with pytest.raises(DestinationExistsError):
        with atomic_dir(dest) as staging:
            (staging / "x").write_text("x")
    assert (dest / "thesis.tex").read_text() == "precious"
    assert os.listdir(tmp_path) == ["mine"]


def test_failed_directory_write_keeps_the_old_copy(tmp_path):
    dest = tmp_path / "pkg"
    with atomic_dir(dest) as staging:
        (staging / "v").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(dest) as staging:
            (staging / "v").write_text("2")
            raise RuntimeError("converter failed")
    assert (dest / "v").read_text() == "1"
    assert os.listdir(tmp_path) == ["pkg"]


def test_check_destination_kinds_and_permissions(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(DestinationError, match="not a directory"):
        check_destination(tmp_path / "f", directory=True, overwrite=True)
    with pytest.raises(DestinationError, match="is a directory"):
        check_destination(tmp_path, overwrite=True)
    with pytest.raises(DestinationError, match="MiB free"):
        check_destination(tmp_path / "big.bin", expected_bytes=1 << 60)
    with pytest.raises(DestinationError, match="cannot create the folder"):
        check_destination(tmp_path / "f" / "sub" / "x.bin")


def test_written_folders_and_files_follow_the_umask(tmp_path):
    import stat

    from quanta._files.atomic import atomic_dir

    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "out") as staging:
            fd = os.open(staging / "private.bin", os.O_CREAT | os.O_WRONLY, 0o600)  # as tempfile leaves files
            os.close(fd)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755  # was drwx------ (mkdtemp)
    assert stat.S_IMODE((tmp_path / "out" / "private.bin").stat().st_mode) == 0o644
