"""tokenizers_bpe.fileio: atomic outputs that never delete what the user did not ask to replace."""

from __future__ import annotations

import pytest

from tokenizers_bpe.fileio import atomic_directory


def test_atomic_directory_replaces_a_previous_output_of_the_same_kind(tmp_path):
    out = tmp_path / "out"
    for version in ("1", "2"):
        with atomic_directory(out) as tmp:
            (tmp / "model.bin").write_text(version)
            (tmp / "config.json").write_text(version)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or old directory left
    assert (out / "model.bin").read_text() == "2"


def test_atomic_directory_keeps_a_directory_holding_other_files(tmp_path):
    out = tmp_path / "project"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    (out / "config.json").write_text("mine")
    with pytest.raises(ValueError, match=r"project already exists and holds notes\.txt, which replacing it would delete"):
        with atomic_directory(out) as tmp:
            (tmp / "config.json").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "notes.txt"]
    assert (out / "config.json").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project"]


def test_atomic_directory_refuses_a_file_in_the_way(tmp_path):
    out = tmp_path / "model"
    out.write_text("a file")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        with atomic_directory(out):
            pass
    assert out.read_text() == "a file"


def test_a_failed_write_leaves_the_old_directory(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(out) as tmp:
            (tmp / "a").write_text("half")
            raise RuntimeError("crash while writing")
    assert (out / "a").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
