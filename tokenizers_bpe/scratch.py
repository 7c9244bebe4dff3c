"""Arrays in a memory-mapped scratch file, for the merge phase of training in a memory budget.

The merge phase keeps a few integers per byte of the distinct pieces (merging.py); on a large, varied
corpus that alone outgrows a small budget. Mapped from a file, those pages are the page cache's, not
the process's own: when the resident memory nears the budget they are dropped from it
(``drop_resident``, madvise MADV_DONTNEED: on a shared file mapping the data stays in the page cache
or on disk, and the next access maps it back), so the budget holds whatever the corpus. The file is
unlinked as soon as it is mapped: nothing is left on disk after any exit, SIGKILL included.

Disk: the arrays' size, 28 bytes per byte of the distinct pieces (32 with 64-bit counts), allocated
when the file is made (a full disk is then a NoSpaceError, not a SIGBUS at a page written later), in
the directory given (the spill directory under ``$TMPDIR``). On a tmpfs ``$TMPDIR`` the page cache is RAM.
"""

from __future__ import annotations

import errno
import mmap
import os
import shutil
import tempfile
from pathlib import Path

from .errors import NoSpaceError

_PAGE = mmap.PAGESIZE


class ScratchArrays:
    """Named arrays (``{name: (length, typecode)}``, typecodes "i" or "q") in one mapped file: numpy
    views to build them, memoryviews to use them; ``close`` unmaps (views must be gone by then)."""

    def __init__(self, directory: str | os.PathLike, layout: dict[str, tuple[int, str]]):
        self._spans: dict[str, tuple[int, int, str]] = {}
        offset = 0
        for name, (length, typecode) in layout.items():
            size = length * {"i": 4, "q": 8}[typecode]
            self._spans[name] = (offset, length, typecode)
            offset += -(-max(size, 1) // _PAGE) * _PAGE  # each array starts on a page
        fd, path = tempfile.mkstemp(prefix="merge-arrays-", suffix=".bin", dir=Path(directory))
        try:
            os.unlink(path)  # the mapping keeps the file alive; nothing can be left behind
            try:  # the disk space taken now: a page written to a full disk would be a SIGBUS, not an error
                os.posix_fallocate(fd, 0, offset)
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                    raise
                raise NoSpaceError(directory, shutil.disk_usage(directory).free, offset,
                                   "set TMPDIR to a disk with more space, or raise --max-memory") from None
            self.mm = mmap.mmap(fd, offset)
        finally:
            os.close(fd)

    def numpy(self, name: str):
        import numpy as np

        offset, length, typecode = self._spans[name]
        return np.frombuffer(self.mm, dtype=np.dtype(typecode), count=length, offset=offset)

    def view(self, name: str) -> memoryview:
        offset, length, typecode = self._spans[name]
        size = length * {"i": 4, "q": 8}[typecode]
        return memoryview(self.mm)[offset : offset + size].cast(typecode)

    def drop_resident(self) -> None:
        """Take the arrays' pages out of this process's resident memory (their data is kept)."""
        self.mm.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        try:
            self.mm.close()
        except BufferError:  # a view is still alive: the mapping goes when it does
            pass
