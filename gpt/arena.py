"""Weights for CPU decoding in transparent huge pages: one anonymous mapping, 2 MiB aligned,
``madvise(MADV_HUGEPAGE)``, that hands out tensors in the order a decoding step reads them.

Why: decoding one token reads every weight once, so on a CPU its speed is the speed of one core
streaming memory. PyTorch's allocator never asks for huge pages (this kernel's THP mode is "madvise",
and PyTorch only asks with THP_MEM_ALLOC_ENABLE=1, which would put every large temporary in huge
pages too), so weights live in 4 KiB pages, and a core's hardware prefetchers stop at every 4 KiB
page boundary: one thread summed 1 GiB at 18-27 GB/s from 4 KiB pages and at 29-33 GB/s from huge
pages on the development machine (AMD EPYC; benches/README.md, Generation).

Fallback: where ``mmap.MADV_HUGEPAGE`` does not exist (not Linux) or madvise fails, or the kernel's
THP mode is "never", the mapping keeps ordinary pages: the same tensors, only slower to stream.
``Arena.huge_page_bytes()`` says what the kernel actually gave (from /proc/self/smaps).

A tensor handed out by an arena keeps the mapping alive (``torch.frombuffer`` holds a reference to
it), so the arena object itself may be dropped.
"""

from __future__ import annotations

import mmap
from pathlib import Path
from typing import Sequence

import torch

HUGE_PAGE = 2 * 2**20  # x86-64's transparent huge page
ALIGN = 64  # bytes between two tensors in the arena: a cache line
THP_MODE_FILE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode() -> str:
    """The kernel's transparent-huge-page mode ("always", "madvise" or "never"), or "unavailable"."""
    try:
        text = THP_MODE_FILE.read_text()
    except OSError:
        return "unavailable"
    chosen = [word[1:-1] for word in text.split() if word.startswith("[")]
    return chosen[0] if chosen else "unavailable"


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class Arena:
    """``nbytes`` of memory advised for huge pages; ``take(t)`` copies tensors into it, in order."""

    def __init__(self, nbytes: int):
        # Over-allocate one huge page so that the first tensor can start on a 2 MiB boundary, and one
        # ordinary page at the end advised the other way: its flags differ from the next arena's, so
        # the kernel cannot merge two arenas into one mapping (smaps, hence huge_page_bytes, is per mapping).
        tail = -(-(max(1, nbytes) + HUGE_PAGE) // mmap.PAGESIZE) * mmap.PAGESIZE  # madvise takes whole pages
        self._map = mmap.mmap(-1, tail + mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.advised = False
        if hasattr(mmap, "MADV_HUGEPAGE") and thp_mode() in ("always", "madvise"):
            try:
                self._map.madvise(mmap.MADV_HUGEPAGE)
                self.advised = True
                self._map.madvise(mmap.MADV_NOHUGEPAGE, tail, mmap.PAGESIZE)
            except OSError:  # e.g. a kernel built without THP: ordinary pages, same tensors
                pass
        raw = torch.frombuffer(self._map, dtype=torch.uint8)
        start = -raw.data_ptr() % HUGE_PAGE
        self._bytes = raw[start: start + nbytes]
        self._used = 0

    @classmethod
    def holding(cls, tensors: Sequence[torch.Tensor]) -> tuple["Arena", list[torch.Tensor]]:
        """An arena sized for ``tensors`` and their copies in it, in the same order."""
        arena = cls(sum(_aligned(t.numel() * t.element_size()) for t in tensors))
        return arena, [arena.take(t) for t in tensors]

    def take(self, like: torch.Tensor) -> torch.Tensor:
        """A contiguous copy of the CPU tensor ``like``, placed after the previous one."""
        n = like.numel() * like.element_size()
        begin = _aligned(self._used)
        if begin + n > self._bytes.numel():
            raise ValueError(f"arena of {self._bytes.numel()} bytes has no room for {n} more bytes")
        self._used = begin + n
        out = self._bytes[begin: begin + n].view(like.dtype).view(like.shape)
        out.copy_(like)
        return out

    @property
    def nbytes(self) -> int:
        return self._bytes.numel()

    def huge_page_bytes(self) -> int | None:
        """Bytes of the arena the kernel backs with huge pages now (AnonHugePages of its mapping in
        /proc/self/smaps: the arena and at most one huge page of alignment); None where that file
        cannot be read."""
        address = self._bytes.data_ptr()
        try:
            lines = Path("/proc/self/smaps").read_text().splitlines()
        except OSError:
            return None
        inside = False
        for line in lines:
            head = line.split(maxsplit=1)[0] if line else ""
            if "-" in head and ":" not in head:  # a mapping's header: "start-end perms ..."
                low, high = (int(x, 16) for x in head.split("-"))
                inside = low <= address < high
            elif inside and head == "AnonHugePages:":
                return int(line.split()[1]) * 1024
        return None
