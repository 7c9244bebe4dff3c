"""Atomic output: a file or a directory appears complete, or not at all (and an existing one is
only replaced once the new one is fully written)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator:
    """Open a temp file next to ``path``; rename it over ``path`` only if the block succeeds."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp directory next to ``path``; when the block succeeds it replaces ``path``.

    An existing ``path`` is moved aside first and deleted only after the rename, so a crash at
    any point leaves either the old or the new directory in place, never a half-written one. It is
    replaced only if everything in it is something the new directory also holds (a previous output
    of the same kind): a directory with other files in it, say a project folder given as the output
    by mistake, is a ValueError naming them, and nothing is deleted."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is not a directory; choose a new or empty directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        old = None
        if path.exists():
            foreign = sorted(entry.name for entry in path.iterdir() if not (tmp / entry.name).exists())
            if foreign:
                shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
                raise ValueError(f"{path} already exists and holds {shown}, which replacing it would delete; "
                                 "choose a new or empty directory")
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
        raise ValueError(f"{what} {path}: cannot write there ({e.strerror or e}); choose another directory") from None
    finally:
        if not keep:
            for directory in missing:
                try:
                    directory.rmdir()
                except OSError:
                    break
    return path


def read_json(path: str | os.PathLike, hint: str = "") -> object:
    """Parse a UTF-8 JSON file; a missing or malformed file is a ValueError naming it (+ ``hint``,
    what to do about it)."""
    path = Path(path)
    suffix = f"; {hint}" if hint else ""
    if not path.is_file():
        raise ValueError(f"{path}: file not found{suffix}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}){suffix}") from None
