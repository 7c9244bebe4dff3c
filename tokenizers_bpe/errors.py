"""The typed errors of the libraries (``tokenizers_bpe`` and, building on it, ``gpt``).

Each is a ``ValueError`` (a problem with what the caller passed in, never a bug), and each carries
the fields a caller needs to say what went wrong in its own terms: the command layer (``tools``)
shows a setting as its command-line flag, a text source as the file or argument it came from.
"""

from __future__ import annotations

import re
from typing import Callable

_PLACEHOLDER = re.compile(r"\{([a-z][a-z0-9_]*)\}")


class SettingError(ValueError):
    """A setting out of range, or inconsistent with another one.

    ``setting`` is the setting at fault, by its Python name (``"lr"``, ``"block_size"``). ``message``
    may name settings as ``{name}`` placeholders: ``str()`` shows them by their Python names, and
    ``render(name_of)`` by any other name (the command layer passes the flag of each setting)::

        >>> e = SettingError("lr", "{lr} must be > 0, got inf")
        >>> str(e)
        'lr must be > 0, got inf'
        >>> e.render(lambda name: "--" + name.replace("_", "-"))
        '--lr must be > 0, got inf'
    """

    def __init__(self, setting: str, message: str):
        super().__init__(setting, message)
        self.setting, self.message = setting, message

    def render(self, name_of: Callable[[str], str]) -> str:
        return _PLACEHOLDER.sub(lambda m: name_of(m.group(1)), self.message)

    def __str__(self) -> str:
        return self.render(lambda name: name)


class InvalidTextError(ValueError):
    """Bytes that are not valid UTF-8. ``source`` names where they came from (a file path, "stdin",
    an argument), ``offset`` is the byte offset of the first invalid byte in it."""

    def __init__(self, source: str, offset: int, reason: str):
        super().__init__(source, offset, reason)
        self.source, self.offset, self.reason = source, offset, reason

    def __str__(self) -> str:
        return f"{self.source}: not UTF-8 at byte offset {self.offset} ({self.reason})"


class UnknownCharacterError(ValueError):
    """Text holds a character a char-level vocabulary lacks (byte-level BPE can encode any text).
    ``character`` is that character; the arguments are kept as given so the error pickles across
    processes (gpt-prepare encodes in a pool)."""

    def __init__(self, character: str, vocabulary_size: int):
        super().__init__(character, vocabulary_size)
        self.character, self.vocabulary_size = character, vocabulary_size

    def __str__(self) -> str:
        c = self.character
        return f"character {c!r} (U+{ord(c):04X}) is not in this char-level vocabulary of {self.vocabulary_size} characters"


class OutputError(ValueError):
    """An output path that may not be written: it holds something this toolkit did not write (or of
    another kind), it is one of the inputs, or another process is writing it. ``path`` names it."""

    def __init__(self, path, message: str):
        super().__init__(path, message)
        self.path, self.message = path, message

    def __str__(self) -> str:
        return self.message


class NoSpaceError(ValueError):
    """The disk filled up while writing ``path``: ``free`` bytes were free, ``needed`` (when known)
    the bytes the write needed (``at_least``: a lower bound, what had been written when the disk
    filled up). What was there before the write is intact."""

    def __init__(self, path, free: int, needed: int | None = None, advice: str = "", at_least: bool = False):
        super().__init__(path, free, needed, advice, at_least)
        self.path, self.free, self.needed, self.advice, self.at_least = path, free, needed, advice, at_least

    def __str__(self) -> str:
        need = ""
        if self.needed:
            need = f"needs {'more than' if self.at_least else 'about'} {byte_size(self.needed)}, "
        return (f"{self.path}: no space left on the device ({need}{byte_size(self.free)} free)"
                + (f"; {self.advice}" if self.advice else "; free some space and run the command again"))


def byte_size(n: int) -> str:
    """``n`` bytes for a message: "812 bytes", "35 KB", "3.2 MB", "1.5 GB"."""
    if n >= 1e9:
        return f"{n / 1e9:,.1f} GB"
    if n >= 1e6:
        return f"{n / 1e6:,.1f} MB"
    return f"{n / 1e3:,.0f} KB" if n >= 1e3 else f"{n:,} byte{'' if n == 1 else 's'}"


class InputFileError(ValueError):
    """A file we read that cannot be what it should: not a regular file (a directory, a FIFO, a
    device), a symlink loop, larger than its format can need, nested deeper than the format allows,
    or not parseable. ``path`` names it; the message says what to do."""

    def __init__(self, path, message: str):
        super().__init__(path, message)
        self.path, self.message = path, message

    def __str__(self) -> str:
        return self.message


def is_unicode(text: str) -> bool:
    """Whether ``text`` can be written as UTF-8: no lone surrogate, which is what Python makes of bytes
    that are not UTF-8 in a command's arguments, and json of a "\\udcXX" escape."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
