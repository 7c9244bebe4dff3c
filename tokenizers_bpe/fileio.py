"""Files in and out, for this package and the ones built on it (``gpt``, ``tools``).

Out: a file or a directory appears complete, or not at all (and an existing one is only replaced
once the new one is fully written). In: text is UTF-8, read in blocks that end at a newline, and
invalid bytes are an ``InvalidTextError`` naming the file and the byte offset (unless the caller
asks for ``errors="replace"``); JSON files are parsed with errors that name them.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

from .errors import InvalidTextError

READ_BYTES = 1 << 18  # text block size when streaming a file


# ---------------------------------------------------------------------------------------------- output


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


# ---------------------------------------------------------------------------------------------- input


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


def check_errors_handler(errors: str) -> None:
    """An unknown UTF-8 error handler fails now, not after reading half the corpus."""
    try:
        codecs.lookup_error(errors)
    except LookupError:
        raise ValueError(f"unknown errors handler {errors!r}; use 'strict' or 'replace'") from None


def check_text_file(path: str | os.PathLike) -> Path:
    """``path`` as a Path if it is a non-empty regular file; else a ValueError saying what it is."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a directory, not a text file; pass the files inside it")
    if not path.exists():
        raise ValueError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: the file is empty; pass a text corpus")
    return path


def read_text_blocks(path: str | os.PathLike, errors: str = "strict", progress=None) -> Iterator[str]:
    """The file's text in blocks that end at a newline (never inside a UTF-8 character), read a
    block at a time; ``progress.update(n)`` is called with the bytes read. Invalid UTF-8 is an
    InvalidTextError with its byte offset in the file (``errors="replace"`` substitutes U+FFFD)."""
    offset = 0
    tail = b""
    with open(path, "rb") as f:
        while True:
            block = f.read(READ_BYTES)
            if progress is not None:
                progress.update(len(block))
            data = tail + block
            cut = data.rfind(b"\n") + 1 if block else len(data)
            if cut == 0 and block:
                tail = data
                continue
            body, tail = data[:cut], data[cut:]
            try:
                yield body.decode("utf-8", errors=errors)
            except UnicodeDecodeError as e:
                raise InvalidTextError(str(path), offset + e.start, e.reason) from None
            offset += len(body)
            if not block:
                return


def iter_file_texts(files: Sequence[str | os.PathLike], errors: str = "strict") -> Iterator[str]:
    """The text of each file, block by block ending at a newline (see read_text_blocks)."""
    check_errors_handler(errors)
    for p in files:
        yield from read_text_blocks(check_text_file(p), errors)


def decode_utf8(data: bytes, source: str) -> str:
    """``data`` as text; invalid UTF-8 is an InvalidTextError naming ``source`` and the offset."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidTextError(source, e.start, e.reason) from None


# ---------------------------------------------------------------------------------------------- format stamps
# Every file this toolkit writes for a reader (tokenizer.json, meta.json, a checkpoint's config.json,
# classifier.json, trainer_state.json) starts with its stamp: {"format": NAME, "format_version": N}.
VERSION_KEY = "format_version"
_LEGACY_VERSION_KEY = "version"  # the key of tokenizer.json, meta.json and trainer_state.json before 2026-12


def format_stamp(name: str, version: int) -> dict[str, object]:
    return {"format": name, VERSION_KEY: version}


def recorded_version(d: dict) -> object:
    """The format version a parsed file records (None when it records none)."""
    return d.get(VERSION_KEY, d.get(_LEGACY_VERSION_KEY))
