"""Checks on the places a command will write to, made before any work starts: the output may be
written (it is new, empty, or an earlier output of the same kind), it is not one of the inputs and
holds none of them, and its directory is writable."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import Iterable

from tokenizers_bpe.errors import OutputError
from tokenizers_bpe.fileio import Stamp, check_replaceable, output_lock, resolve_path


def check_writable_dir(path: str | os.PathLike, what: str = "--out", *, keep: bool = True) -> Path:
    """Fail early (before hours of work) if ``path`` cannot be created or written. With
    ``keep=False`` the directories this check had to create are removed again, so that an error
    found later (before the real output starts) leaves nothing behind."""
    path = Path(path)
    missing = []  # innermost first
    ancestor = path
    while not ancestor.exists() and ancestor != ancestor.parent:
        missing.append(ancestor)
        ancestor = ancestor.parent
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            raise
        reason = e.strerror or e
        if e.errno in (errno.ENOTDIR, errno.EEXIST):  # a file where a directory of the path should be
            reason = next((f"{p} is a file, not a directory" for p in (*reversed(path.parents), path) if p.is_file()), reason)
        raise ValueError(f"{what} {path}: cannot write there ({reason}); choose another directory") from None
    finally:
        if not keep:
            for directory in missing:
                try:
                    directory.rmdir()
                except OSError:
                    break
    return path


def check_not_an_input(out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None], flag: str) -> None:
    """An OutputError when the output ``out`` is one of ``inputs`` or a directory holding one of them
    (writing it would destroy the input)."""
    target = resolve_path(out)
    for given in inputs:
        if given is None:
            continue
        source = resolve_path(given)
        if source == target or target in source.parents:
            what = "is" if source == target else "holds"
            raise OutputError(out, f"{flag} {out} {what} the input {given}; writing it would destroy that input, choose another path")


def check_output(out: str | os.PathLike, stamp: Stamp, flag: str, *, inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """All the checks on one output before any work: not an input, replaceable (``stamp``), not being
    written by another process (its lock), writable."""
    out = Path(out)
    check_not_an_input(out, inputs, flag)
    try:
        check_replaceable(out, stamp)
        output_lock(out.absolute(), stamp).check()
    except OutputError as e:
        raise OutputError(out, f"{flag} {e}") from None
    parent = out.parent if str(out.parent) else Path(".")
    check_writable_dir(parent, flag, keep=False)
    return out
