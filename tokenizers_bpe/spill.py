"""Piece counting in bounded memory: when the counts outgrow their budget they are written to disk as a
sorted run and counting starts afresh; at the end the runs are merged (a k-way merge of sorted files,
summing the counts of equal pieces) into the one stream of (piece, count) the merge phase reads. The
result is exactly the counts of an unbounded run, so the tokenizer is byte-identical.

Disk: each run holds the distinct pieces counted since the previous one, 12 bytes + the piece's
UTF-8 bytes each; all runs together are at most about 1.5x the corpus (every piece distinct) and
usually a small fraction of it. They live in a directory ``bpe-spill-*`` under ``directory`` (default:
the system's temporary directory, ``$TMPDIR``), removed on every exit (errors, Ctrl-C, SIGTERM);
one left by a killed process (SIGKILL, a crash) is removed by the next run, which finds its lock free.
"""

from __future__ import annotations

import fcntl
import heapq
import logging
import os
import shutil
import signal
import struct
import tempfile
import threading
import time
from pathlib import Path
from typing import BinaryIO, Iterator

log = logging.getLogger(__name__)

PREFIX = "bpe-spill-"
LOCK_NAME = "owner.lock"
BYTES_PER_ENTRY = 200  # a counted piece in a Counter (str object, dict slot, int; measured about 150-180)
_HEADER = struct.Struct("<IQ")  # piece length, count
_ORPHAN_AGE_S = 60  # a spill directory without its lock file (killed at birth) is an orphan after this


def remove_orphans(parent: Path) -> None:
    """Remove the spill directories under ``parent`` whose owner no longer runs (its lock is free)."""
    try:
        candidates = [p for p in parent.iterdir() if p.name.startswith(PREFIX) and p.is_dir() and not p.is_symlink()]
    except OSError:
        return
    for d in candidates:
        try:
            fd = os.open(d / LOCK_NAME, os.O_RDWR)
        except FileNotFoundError:
            try:
                if time.time() - d.stat().st_mtime > _ORPHAN_AGE_S:
                    shutil.rmtree(d, ignore_errors=True)
            except OSError:
                pass
            continue
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: a live run
            os.close(fd)
            continue
        shutil.rmtree(d, ignore_errors=True)
        os.close(fd)
        log.info("removed %s, left by a BPE training run that was killed", d)


class PieceSpill:
    """Sorted runs of piece counts in a private directory; a context manager (the directory is removed
    on exit, and SIGTERM becomes KeyboardInterrupt meanwhile so that it is removed then too)."""

    def __init__(self, budget_bytes: int, directory: str | os.PathLike | None = None):
        self.budget_bytes = budget_bytes
        self.parent = Path(directory if directory is not None else tempfile.gettempdir())
        self.dir: Path | None = None
        self.runs: list[Path] = []
        self.spilled_bytes = 0
        self._lock_fd: int | None = None
        self._old_sigterm = None

    def __enter__(self) -> PieceSpill:
        remove_orphans(self.parent)
        self.dir = Path(tempfile.mkdtemp(prefix=PREFIX, dir=self.parent))
        self._lock_fd = os.open(self.dir / LOCK_NAME, os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            self._old_sigterm = signal.signal(signal.SIGTERM, _raise_interrupt)
        return self

    def __exit__(self, *exc) -> None:
        if self._old_sigterm is not None:
            signal.signal(signal.SIGTERM, self._old_sigterm)
            self._old_sigterm = None
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def over_budget(self, counts: dict) -> bool:
        return len(counts) * BYTES_PER_ENTRY > self.budget_bytes

    def write_run(self, counts: dict[str, int]) -> None:
        """Write ``counts`` as one sorted run and empty it. Sorting the strings sorts their UTF-8 bytes
        (UTF-8 keeps code point order), which is the order the runs are merged in."""
        path = self.dir / f"run-{len(self.runs):05d}.bin"
        pack = _HEADER.pack
        with open(path, "wb", buffering=1 << 20) as f:
            for piece in sorted(counts):
                data = piece.encode("utf-8")
                f.write(pack(len(data), counts[piece]))
                f.write(data)
            f.flush()
            self.spilled_bytes += f.tell()
        counts.clear()
        self.runs.append(path)

    def merged(self, counts: dict[str, int], progress: bool = False) -> Iterator[tuple[bytes, int]]:
        """Every piece once, with its total count over the runs and ``counts`` (written as the last
        run), in UTF-8 byte order."""
        if counts:
            self.write_run(counts)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=self.spilled_bytes, unit="B", unit_scale=True, desc="bpe: merging counts", leave=False)
        files = [open(p, "rb", buffering=1 << 16) for p in self.runs]
        try:
            current, total = None, 0
            for piece, n in heapq.merge(*(_read_run(f, bar) for f in files)):
                if piece != current:
                    if current is not None:
                        yield current, total
                    current, total = piece, 0
                total += n
            if current is not None:
                yield current, total
        finally:
            for f in files:
                f.close()
            if bar is not None:
                bar.close()


def _read_run(f: BinaryIO, bar) -> Iterator[tuple[bytes, int]]:
    size, unpack, read = _HEADER.size, _HEADER.unpack, f.read
    done = 0
    while header := read(size):
        length, count = unpack(header)
        yield read(length), count
        done += size + length
        if bar is not None and done >= 1 << 16:
            bar.update(done)
            done = 0
    if bar is not None:
        bar.update(done)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt
