"""tokenizers_bpe.fileio and .locks: atomic outputs that never delete what the user did not ask to replace, stamps,
the leftovers of killed writers, permissions, a full disk, one writer per output."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tokenizers_bpe.errors import NoSpaceError, OutputError
from tokenizers_bpe.fileio import Stamp, atomic_directory, atomic_write, check_replaceable, remove_stale_temporaries
from tokenizers_bpe.locks import OutputLock


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


# ---------------------------------------------------------------------------------------------- stamps, leftovers, locks

STAMP = Stamp("test-output", "a test output", "stamp.json")


def dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_a_stamped_directory_is_replaced_only_by_its_own_kind(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stamp.json").write_text(json.dumps({"format": "another-kind"}))
    with pytest.raises(OutputError, match="is not a test output this toolkit wrote"):
        with atomic_directory(out, STAMP):
            raise AssertionError("the check comes before any work")
    (out / "stamp.json").write_text(json.dumps({"format": "test-output"}))
    with atomic_directory(out, STAMP) as tmp:
        (tmp / "stamp.json").write_text(json.dumps({"format": "test-output", "n": 2}))
    assert json.loads((out / "stamp.json").read_text())["n"] == 2
    check_replaceable(tmp_path / "new", STAMP)  # a new path, and an empty directory, are fine
    (tmp_path / "empty").mkdir()
    check_replaceable(tmp_path / "empty", STAMP)


def test_a_file_output_refuses_a_file_that_is_not_its_kind(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text("my notes")
    with pytest.raises(OutputError, match="is not a test file this toolkit wrote"):
        with atomic_write(path, stamp=Stamp("test-file", "a test file")):
            pass
    assert path.read_text() == "my notes"


def test_the_leftovers_of_a_dead_writer_are_removed_and_a_set_aside_output_restored(tmp_path):
    pid = dead_pid()
    (tmp_path / f".data.{pid}.abc123.tmp").mkdir()
    (tmp_path / f".tok.json.{pid}.xyz.tmp").write_text("half")
    (tmp_path / f".model.old-{pid}").mkdir()  # killed between setting model/ aside and renaming the new one in
    (tmp_path / f".live.{os.getpid()}.abc.tmp").mkdir()  # a live writer's: kept
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == sorted([f".data.{pid}.abc123.tmp", f".tok.json.{pid}.xyz.tmp"])
    assert (tmp_path / "model").is_dir() and (tmp_path / f".live.{os.getpid()}.abc.tmp").is_dir()


def test_outputs_get_the_permissions_of_new_files(tmp_path):
    old = os.umask(0o027)
    try:
        with atomic_write(tmp_path / "a.txt") as f:
            f.write("x")
        with atomic_directory(tmp_path / "d") as tmp:
            (tmp / "f").write_text("y")
            os.chmod(tmp / "f", 0o600)  # as safetensors does
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o750 and (tmp_path / "d" / "f").stat().st_mode & 0o777 == 0o640


def test_a_full_disk_is_a_no_space_error(tmp_path, monkeypatch):
    import errno

    with pytest.raises(NoSpaceError, match="no space left on the device"):
        with atomic_write(tmp_path / "a.txt") as f:
            raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_one_writer_per_lock_and_a_dead_holders_lock_is_taken_over(tmp_path, caplog):
    lock_path = tmp_path / ".lock"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock_path.write_text(json.dumps({"pid": sleeper.pid, "host": os.uname().nodename, "command": "gpt-train x", "started": "now"}))
        with pytest.raises(OutputError, match=f"run x is in use by process {sleeper.pid} \\(gpt-train x"):
            OutputLock(lock_path, "run x").acquire()
        assert json.loads(lock_path.read_text())["pid"] == sleeper.pid  # untouched
    finally:
        sleeper.kill()
        sleeper.wait()
    with OutputLock(lock_path, "run x"):
        assert json.loads(lock_path.read_text())["pid"] == os.getpid()
    assert "took over the lock of process" in caplog.text and not lock_path.exists()


@pytest.mark.parametrize("pid", [0, -1, True, 10**400, 2**63, "1", None, 1.5])
def test_a_lock_naming_no_possible_process_is_taken_over(tmp_path, caplog, pid):
    """A lock whose pid names no process (0 and -1 made os.kill test a whole process group, so the
    output stayed "in use" for ever; 10**400 was an OverflowError) is an unreadable lock: taken over."""
    lock_path = tmp_path / ".lock"
    lock_path.write_text(json.dumps({"pid": pid, "host": os.uname().nodename, "command": "x", "started": "now"}))
    with OutputLock(lock_path, "run x"):
        assert json.loads(lock_path.read_text())["pid"] == os.getpid()
    assert not lock_path.exists()


def test_a_file_still_written_to_is_read_as_it_was_when_opened(tmp_path):
    """A log appended to faster than it was read (`yes >> corpus.txt`) kept bpe-train reading for ever."""
    from tokenizers_bpe.fileio import read_file_blocks

    path = tmp_path / "log.txt"
    path.write_text("first line\n" * 10)
    blocks = read_file_blocks(path, size=16)
    read = [next(blocks)]
    with open(path, "a") as f:
        f.write("appended while read\n" * 1000)
    read.extend(blocks)
    assert "".join(text for text, _ in read) == "first line\n" * 10 and sum(n for _, n in read) == 110
