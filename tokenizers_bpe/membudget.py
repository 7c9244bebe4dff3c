"""How a memory budget for BPE training (``train(..., max_memory=...)``) is shared out.

The budget bounds the resident memory of the training process and its worker processes together
(each forked worker counts the pages it shares with its parent too, as RSS sums them). Counting gets
what is left after the interpreter as it stands now, once per process, and each worker's work on a
chunk; the piece counts are spilled to disk (spill.py) when they outgrow their share. The merge phase
runs after the workers are gone and gets the budget less the interpreter; its per-byte arrays are
mapped from a file (scratch.py), their pages dropped whenever the process nears the budget.
"""

from __future__ import annotations

import ctypes
import os
import resource
from dataclasses import dataclass
from pathlib import Path

from .errors import SettingError, byte_size

MB = 1 << 20
WORKER_WORK = 40 * MB  # a worker's chunk: its pieces as strings, their Counter, the pickled result
IN_FLIGHT = 16 * MB  # a worker's result waiting in the parent
MIN_COUNTS = 16 * MB  # below this, counting would spill every few chunks
SAFETY = 0.85  # of the budget actually planned for (allocator slack, estimates)
# The merge phase keeps its resident memory under this share of the budget: the rest is headroom for
# what grows between two looks (a dict doubling its table, pages touched meanwhile).
MERGE_RESIDENT = 0.8


# The resident memory of training without a budget, per byte of corpus, at worst: 37 measured on 20 MB
# of distinct random words (746 MB); ordinary text takes far less, its pieces repeating.
UNBOUNDED_BYTES_PER_CORPUS_BYTE = 40
DEFAULT_BUDGET_SHARE = 0.75  # of the available memory, for a corpus that may not fit without a budget
CGROUP_ROOT = "/sys/fs/cgroup"  # where cgroup v2 (and v1's memory controller, under memory/) is mounted
PROC_CGROUP = "/proc/self/cgroup"


@dataclass(frozen=True)
class MemoryPlan:
    workers: int  # pre-tokenization processes (fewer than asked where their share would not fit)
    counts: int  # bytes the piece counts may take before they are spilled
    merges: int  # bytes the merge phase may take
    resident: int  # the resident memory the merge phase keeps this process under (its arrays mapped)


def current_rss() -> int:
    """This process's resident memory now (Linux /proc), or its peak where /proc is absent."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def available_memory() -> int | None:
    """Memory this process can still get without swapping or being killed: the least of the machine's
    (Linux ``MemAvailable``) and what its memory cgroups still allow (a container's limit, which
    /proc/meminfo does not show: a check against the machine alone let the OOM killer end the command);
    None where neither is known."""
    known = [m for m in (_meminfo_available(), cgroup_memory_left()) if m is not None]
    return min(known) if known else None


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def cgroup_memory_left() -> int | None:
    """The least that this process's memory cgroup, or one above it, still allows: its limit less its
    usage, the inactive file cache counted as free (as MemAvailable counts it). cgroup v2 (memory.max)
    and v1 (memory/…/memory.limit_in_bytes); None where no limit can be read."""
    try:
        with open(PROC_CGROUP) as f:
            entries = [line.rstrip("\n").split(":", 2) for line in f]
    except OSError:
        return None
    left = None
    for entry in entries:
        if len(entry) != 3:
            continue
        _, controllers, path = entry
        if controllers == "":  # v2: "0::/path"
            root, files = Path(CGROUP_ROOT), ("memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):
            root, files = Path(CGROUP_ROOT) / "memory", ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        else:
            continue
        group = root / path.lstrip("/")
        for directory in (group, *group.parents):
            if directory != root and root not in directory.parents:
                break
            group_left = _cgroup_left(directory, *files)
            if group_left is not None:
                left = group_left if left is None else min(left, group_left)
    return left


def _cgroup_left(directory: Path, limit_file: str, usage_file: str, inactive_key: str) -> int | None:
    try:
        limit = int((directory / limit_file).read_text())  # ("max": no limit, a ValueError)
        usage = int((directory / usage_file).read_text())
        inactive = 0
        for line in (directory / "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == inactive_key:
                inactive = int(value)
    except (OSError, ValueError):
        return None
    return max(0, limit - usage + inactive)


def default_budget(corpus_bytes: int) -> int | None:
    """The budget for training on ``corpus_bytes`` when none is given: None (in memory, the fastest)
    where the corpus surely fits in the available memory, else a share of that memory, so that a
    corpus too large for this machine spills to disk instead of the process being killed."""
    available = available_memory()
    if available is None or corpus_bytes * UNBOUNDED_BYTES_PER_CORPUS_BYTE <= available * DEFAULT_BUDGET_SHARE:
        return None
    return int(available * DEFAULT_BUDGET_SHARE)


def plan_memory(max_memory: int, workers: int) -> MemoryPlan:
    """The shares of ``max_memory`` bytes, or a SettingError naming max_memory if it cannot hold one
    process counting."""
    base = current_rss()
    usable = int(max_memory * SAFETY) - base
    for w in range(max(1, workers), 0, -1):
        extra = 0 if w == 1 else w * (base + WORKER_WORK + IN_FLIGHT)
        counts = usable - extra - (WORKER_WORK if w == 1 else 0)
        if counts >= MIN_COUNTS:
            return MemoryPlan(w, counts, usable, int(max_memory * MERGE_RESIDENT))
    needed = (base + WORKER_WORK + MIN_COUNTS) / SAFETY
    raise SettingError("max_memory", f"{{max_memory}} {byte_size(max_memory)} is too small to train in: this "
                                     f"process alone takes {base / 1e6:.0f} MB; give at least {needed / 1e6:.0f} MB")


def release_free_memory() -> None:
    """Hand memory freed by the counting phase back to the system (glibc keeps it otherwise), so that
    the merge phase's arrays do not come on top of it. (The C library is looked up among the symbols
    already loaded: ctypes.util.find_library would fork a helper the size of this process.)"""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass
