"""Checks on the places a command will write to, made before any work starts."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


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
