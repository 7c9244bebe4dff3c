"""gpt-train's run directory against kills, a second writer and a full disk: a run killed at any moment
(the first checkpoint write included) is continued by --resume or restarted by the same command; a
damaged checkpoint is skipped for the newest intact one; a second writer is refused before it writes;
a full disk is one line naming the space and the last good checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


import gpt.run_state
from gpt.run_state import LOCK_FILE, checkpoint_dirs
from tests.conftest import ROOT
from tests.conftest import read_losses as losses
from tools.cli import ExitCode
from tools.train import main as train_main

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--n-ctx", "16", "--batch-size", "2", "--sample-tokens", "0",
        "--progress", "false", "--warmup-steps", "1", "--log-interval", "1"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

# gpt-train in a process of its own that SIGKILLs itself inside the Nth write of a checkpoint's trainer
# state: after the model files of that checkpoint are written into its temporary directory, before the
# directory is renamed into place.
KILLED_IN_WRITE = """
import os, signal, sys
import gpt.trainer
calls = [0]
write = gpt.trainer.write_train_state
def killing_write(*args):
    calls[0] += 1
    if calls[0] == int(os.environ["KILL_AT_WRITE"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return write(*args)
gpt.trainer.write_train_state = killing_write
from tools.train import main
sys.exit(main(sys.argv[1:]))
"""


def args(data_dir, out, *extra) -> list[str]:
    return ["--data", str(data_dir), "--out", str(out), *TINY, *extra]


def killed_in_write(argv: list[str], at: int) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-c", KILLED_IN_WRITE, *argv], env={**ENV, "KILL_AT_WRITE": str(at)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    return done


def leftovers(run: Path) -> list[str]:
    return sorted(p.name for d in (run, run / "checkpoints") if d.is_dir() for p in d.iterdir() if p.name.startswith("."))


def test_killed_in_the_first_checkpoint_write_restarts_with_the_same_command(data_dir, tmp_path, capsys):
    argv = args(data_dir, tmp_path / "run", "--max-steps", "4", "--eval-interval", "2")
    killed_in_write(argv, at=1)
    assert not checkpoint_dirs(tmp_path / "run") and leftovers(tmp_path / "run")  # a stale lock and a temporary dir
    assert train_main(argv) == 0
    err = capsys.readouterr().err
    assert "took over the lock of process" in err
    assert leftovers(tmp_path / "run") == [] and (tmp_path / "run" / "final").is_dir()
    assert sorted(losses(tmp_path / "run")) == [1, 2, 3, 4]  # one run's metrics, not two interleaved


def test_killed_in_the_first_checkpoint_write_continues_with_resume(data_dir, tmp_path, capsys):
    argv = args(data_dir, tmp_path / "run", "--max-steps", "4", "--eval-interval", "2")
    assert train_main(args(data_dir, tmp_path / "full", "--max-steps", "4", "--eval-interval", "2")) == 0
    killed_in_write(argv, at=1)
    assert train_main(["--resume", str(tmp_path / "run")]) == 0
    assert "no intact checkpoint to resume from; starting the run again from step 0" in capsys.readouterr().err
    assert losses(tmp_path / "run") == losses(tmp_path / "full")


def test_killed_in_a_later_checkpoint_write_resumes_from_the_one_before(data_dir, tmp_path):
    common = ["--max-steps", "6", "--eval-interval", "2"]
    assert train_main(args(data_dir, tmp_path / "full", *common)) == 0
    killed_in_write(args(data_dir, tmp_path / "run", *common), at=2)  # inside step 4's checkpoint
    assert [s for s, _ in checkpoint_dirs(tmp_path / "run")] == [2]
    assert train_main(["--resume", str(tmp_path / "run")]) == 0
    assert losses(tmp_path / "run") == losses(tmp_path / "full")  # exact, every step


def test_resume_skips_a_damaged_latest_checkpoint(data_dir, tmp_path, capsys):
    common = ["--max-steps", "6", "--eval-interval", "2", "--keep-last", "3"]
    assert train_main(args(data_dir, tmp_path / "full", *common)) == 0
    run = tmp_path / "run"
    assert train_main(args(data_dir, run, "--max-steps", "4", "--eval-interval", "2", "--keep-last", "3")) == 0
    (run / "checkpoints" / "step-000004" / "optimizer.safetensors").write_bytes(b"\0" * 10)  # damaged
    capsys.readouterr()
    assert train_main(["--resume", str(run), "--max-steps", "6"]) == 0
    err = capsys.readouterr().err
    assert "skipped" in err and "step-000004" in err and "kept as step-000004.corrupt" in err
    assert (run / "checkpoints" / "step-000004.corrupt").is_dir()
    assert losses(run) == losses(tmp_path / "full")


def test_a_second_writer_is_refused_before_it_writes(data_dir, tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "tools.train", *args(data_dir, run, "--max-steps", "100000")],
                             env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (run / "metrics.jsonl").exists() and time.time() < deadline:
            time.sleep(0.1)
        holder = json.loads((run / LOCK_FILE).read_text())
        assert holder["pid"] == first.pid
        before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != "metrics.jsonl"}
        for argv in (args(data_dir, run, "--max-steps", "5"), ["--resume", str(run)]):
            done = subprocess.run([sys.executable, "-m", "tools.train", *argv], env=ENV, capture_output=True, text=True, timeout=300)
            err = done.stderr.strip()
            assert done.returncode == ExitCode.USER_ERROR and "\n" not in err, err
            assert f"is in use by process {first.pid}" in err, err
        assert all(p.stat().st_mtime_ns == t for p, t in before.items() if p.exists() and "checkpoints" not in p.parts)
    finally:
        first.kill()
        first.wait()
    # The holder is gone: its lock is taken over by the next writer (said on stderr).
    done = subprocess.run([sys.executable, "-m", "tools.train", "--resume", str(run), "--max-steps", "1"], env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and f"took over the lock of process {first.pid}" in done.stderr, done.stderr


def test_a_full_disk_is_one_line_and_the_last_checkpoint_stays_resumable(data_dir, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    free = iter([10**12, 10**12, 1000])  # the second step checkpoint finds the disk full
    monkeypatch.setattr(gpt.run_state, "free_bytes", lambda path: next(free, 1000))
    assert train_main(args(data_dir, run, "--max-steps", "6", "--eval-interval", "2")) == ExitCode.USER_ERROR
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("gpt-train: error: ") and "no space left on the device" in err and " 1 KB free)" in err
    assert "the last good checkpoint" in err and "step-000002 is intact" in err and f"gpt-train --resume {run}" in err
    monkeypatch.undo()
    assert [s for s, _ in checkpoint_dirs(run)] == [2] and leftovers(run) == []
    assert train_main(["--resume", str(run)]) == 0


def test_no_space_while_writing_is_the_same_one_line(data_dir, tmp_path, monkeypatch, capsys):
    import errno

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gpt.run_state, "save_file", no_space)
    assert train_main(args(data_dir, tmp_path / "run", "--max-steps", "2", "--eval-interval", "2")) == ExitCode.USER_ERROR
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "no space left on the device" in err and "no checkpoint was written yet" in err, err
    assert leftovers(tmp_path / "run") == []


def test_run_outputs_honour_the_umask(data_dir, tmp_path):
    old = os.umask(0o022)
    try:
        assert train_main(args(data_dir, tmp_path / "run", "--max-steps", "2", "--eval-interval", "2")) == 0
    finally:
        os.umask(old)
    for p in (tmp_path / "run").rglob("*"):
        assert p.stat().st_mode & 0o777 == (0o755 if p.is_dir() else 0o644), p
