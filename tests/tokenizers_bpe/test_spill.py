"""Training in a memory budget: counts spilled to disk and merged give exactly the unbounded tokenizer;
the spill directory goes on every exit, and after a SIGKILL with the next run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

import tokenizers_bpe
from tokenizers_bpe import spill as spill_module
from tokenizers_bpe.errors import SettingError
from tokenizers_bpe.patterns import resolve_pattern
from tokenizers_bpe.spill import LOCK_NAME, PREFIX, PieceSpill, remove_orphans
from tokenizers_bpe import trainer
from tokenizers_bpe.membudget import MemoryPlan
from tokenizers_bpe.trainer import _safe_chunks, count_pieces

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _chunks(text: str, pattern: str):
    return _safe_chunks([text], resolve_pattern(pattern), size=2000)


@pytest.mark.parametrize("workers", [1, 2])
def test_spilled_runs_merge_to_the_unbounded_counts(tmp_path, play_text, workers):
    pattern = resolve_pattern("gpt4")
    text = play_text[:150_000] + "é中🎉 " * 50
    expected = count_pieces(_chunks(text, "gpt4"), pattern, workers=1)
    with PieceSpill(budget_bytes=300 * spill_module.BYTES_PER_ENTRY, directory=tmp_path) as spill:
        rest = count_pieces(_chunks(text, "gpt4"), pattern, workers=workers, spill=spill)
        assert len(spill.runs) > 3
        merged = list(spill.merged(rest))
        assert all(p.parent == spill.dir for p in spill.runs)
    assert merged == sorted((p.encode(), n) for p, n in expected.items())
    assert list(tmp_path.iterdir()) == []


def test_a_budget_gives_the_byte_identical_tokenizer(tmp_path, play_text, shared_file, monkeypatch):
    corpus = tmp_path / "corpus.txt"  # about 1.2 MB: a few blocks of 256K characters, a run after each
    corpus.write_text(shared_file("tinyshakespeare.txt").read_text(encoding="utf-8") + play_text, encoding="utf-8")
    spill_dir = tmp_path / "spill"
    spill_dir.mkdir()
    unbounded = tokenizers_bpe.train([corpus], 1500, min_frequency=2, workers=1, progress=False)
    # the test process holds torch and more: plan as if the budget left room for a few hundred pieces
    monkeypatch.setattr(trainer, "plan_memory", lambda max_memory, workers: MemoryPlan(1, 300 * spill_module.BYTES_PER_ENTRY, 10**9, 10**10))
    runs = []
    monkeypatch.setattr(PieceSpill, "write_run", lambda self, counts, w=PieceSpill.write_run: (runs.append(1), w(self, counts))[1])
    bounded = tokenizers_bpe.train([corpus], 1500, min_frequency=2, workers=1, progress=False, max_memory=200 * 10**6,
                                   spill_dir=spill_dir)
    assert len(runs) > 3
    assert bounded.to_dict() == unbounded.to_dict()
    assert list(spill_dir.iterdir()) == []


def test_a_budget_too_small_is_a_setting_error(tmp_path, play_text):
    with pytest.raises(SettingError, match="max_memory 1.0 MB is too small to train in.*give at least"):
        tokenizers_bpe.train_from_iterator([play_text], 300, max_memory=10**6, spill_dir=tmp_path)
    with pytest.raises(SettingError, match="max_memory 1 byte is too small to train in"):  # (was "0 MB")
        tokenizers_bpe.train_from_iterator([play_text], 300, max_memory=1, spill_dir=tmp_path)
    with pytest.raises(SettingError, match="positive number of bytes"):
        tokenizers_bpe.train_from_iterator([play_text], 300, max_memory=0)
    assert list(tmp_path.iterdir()) == []


def test_orphans_are_removed_and_live_spills_kept(tmp_path):
    import fcntl

    orphan = tmp_path / f"{PREFIX}orphan"
    orphan.mkdir()
    (orphan / LOCK_NAME).touch()
    (orphan / "run-00000.bin").write_bytes(b"x" * 100)
    live = tmp_path / f"{PREFIX}live"
    live.mkdir()
    fd = os.open(live / LOCK_NAME, os.O_CREAT | os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    unrelated = tmp_path / "bpe-other"
    unrelated.mkdir()
    try:
        remove_orphans(tmp_path)
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, unrelated.name])
    finally:
        os.close(fd)


_HOLD_SPILL = """
import sys, time
from tokenizers_bpe.spill import PieceSpill
with PieceSpill(10**6, sys.argv[1]) as s:
    s.write_run({"a": 1, "bb": 2})
    print(s.dir, flush=True)
    time.sleep(60)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_a_killed_run_leaves_nothing_once_the_next_one_starts(tmp_path, sig):
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_SPILL, str(tmp_path)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    spill_dir = proc.stdout.readline().strip()
    assert os.path.isdir(spill_dir)
    proc.send_signal(sig)
    proc.wait(timeout=30)
    if sig != signal.SIGKILL:  # cleaned on the way out
        assert proc.returncode != 0 and not os.path.exists(spill_dir)
    with PieceSpill(10**6, tmp_path) as s:  # the next run
        assert [p.name for p in tmp_path.iterdir()] == [s.dir.name]
    assert list(tmp_path.iterdir()) == []


def test_bpe_train_max_memory_option(tmp_path, play_text, capsys):
    from tools.bpe_train import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(play_text, encoding="utf-8")
    assert main([str(corpus), "--vocab-size", "400", "-o", str(tmp_path / "a.json"), "--quiet"]) == 0
    # in a fresh process: this one holds torch, which alone takes more than the budget
    subprocess.run([sys.executable, "-m", "tools.bpe_train", str(corpus), "--vocab-size", "400", "-o", str(tmp_path / "b.json"),
                    "--quiet", "--max-memory", "300MB"], cwd=ROOT, check=True, capture_output=True)
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    capsys.readouterr()
    for bad, says in (("12XB", "must be a size"), ("0", "above 0"), ("2MB", "too small to train in")):
        assert main([str(corpus), "-o", str(tmp_path / "c.json"), "--max-memory", bad]) == 2
        err = capsys.readouterr().err
        assert "--max-memory" in err and says in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "c.json").exists()
