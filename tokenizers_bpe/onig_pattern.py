"""Our pre-tokenization regexes (Python's ``regex`` module) rewritten for Oniguruma, the engine that
Hugging Face ``tokenizers`` (and so transformers) splits text with, so that both cut every text into
the same pieces.

The two engines read some constructs differently, so a pattern is not copied but rewritten:

- character classes (``\\p{L}``, ``\\s``, ``\\d``, ``\\w`` and their negations) become explicit code
  point ranges computed with ``regex`` itself: the two engines' Unicode tables (versions, what counts
  as whitespace, e.g. U+001C..U+001F and U+0085) then cannot disagree;
- ``$`` (Python: the end, or before a final newline; Oniguruma: before *any* newline) becomes
  ``(?=\\n?\\z)``, ``^`` becomes ``\\A``, ``\\Z`` becomes ``\\z``;
- a possessive interval ``X{n,m}+`` (Oniguruma's Ruby syntax reads it as ``(X{n,m})+``) becomes the
  atomic group ``(?>X{n,m})``; ``X*+``, ``X++``, ``X?+`` mean the same in both and stay.

Anything this module does not know to mean the same in both (word boundaries, inline flags other
than ``i``, nested classes or set operations, POSIX classes, named groups, ...) is refused with an
``UnsupportedPatternError`` naming it: an export never splits text differently without saying so.
"""

from __future__ import annotations

import functools
import sys

import regex

# Escapes that match the same single character in both engines.
_LITERAL_ESCAPES = set("tnrfv\\.^$|?*+()[]{}-/ '\"#&~!%,:;<=>@`_")
_CLASS_ESCAPES = set("sSdDwWpP")  # a class of characters: expanded to explicit ranges
_SURROGATES = range(0xD800, 0xE000)  # never in a Rust string: HF never sees them


class UnsupportedPatternError(ValueError):
    """A pattern construct whose meaning in Oniguruma is not known to equal Python ``regex``'s."""

    def __init__(self, pattern: str, construct: str, position: int):
        super().__init__(pattern, construct, position)
        self.pattern, self.construct, self.position = pattern, construct, position

    def __str__(self) -> str:
        return (f"the pattern's '{self.construct}' (at character {self.position}) has no known exact equivalent in "
                "Oniguruma, the regex engine of Hugging Face tokenizers and llama.cpp's converters")


@functools.lru_cache(maxsize=1)
def _all_characters() -> str:
    return "".join(chr(c) for c in range(sys.maxunicode + 1) if c not in _SURROGATES)


@functools.lru_cache(maxsize=64)
def class_ranges(escape: str) -> str:
    """The characters ``escape`` (e.g. ``\\p{L}``, ``\\s``) matches in ``regex``, as the inside of an
    Oniguruma character class: ``\\x{41}-\\x{5A}\\x{61}-\\x{7A}...``."""
    runs = regex.finditer(f"(?:{escape})+", _all_characters())
    parts = []
    for m in runs:
        lo, hi = ord(m.group()[0]), ord(m.group()[-1])
        parts.append(f"\\x{{{lo:X}}}" if lo == hi else f"\\x{{{lo:X}}}-\\x{{{hi:X}}}")
    if not parts:
        raise ValueError(f"{escape!r} matches no character")
    return "".join(parts)


def _read_class_escape(pattern: str, i: int) -> tuple[str, int]:
    """The class escape at ``pattern[i]`` (the backslash) and the index after it."""
    letter = pattern[i + 1]
    if letter in "pP":
        if i + 2 < len(pattern) and pattern[i + 2] == "{":
            end = pattern.find("}", i + 3)
            if end < 0:
                raise UnsupportedPatternError(pattern, pattern[i:], i)
            return pattern[i : end + 1], end + 1
        return pattern[i : i + 3], i + 3
    return pattern[i : i + 2], i + 2


def _escape(pattern: str, i: int, in_class: bool, folding: bool) -> tuple[str, int]:
    """The Oniguruma text for the escape at ``pattern[i]`` and the index after it (``folding``: inside
    a case-insensitive group, where the engines may fold a class's members differently)."""
    if i + 1 >= len(pattern):
        raise UnsupportedPatternError(pattern, "\\", i)
    letter = pattern[i + 1]
    if letter in _CLASS_ESCAPES and folding:
        raise UnsupportedPatternError(pattern, "(?i:" + _read_class_escape(pattern, i)[0], i)
    if letter in _CLASS_ESCAPES:
        escape, end = _read_class_escape(pattern, i)
        try:
            ranges = class_ranges(escape)
        except regex.error:
            raise UnsupportedPatternError(pattern, escape, i) from None
        return (ranges if in_class else f"[{ranges}]"), end
    if letter == "x" and i + 3 < len(pattern) and all(c in "0123456789abcdefABCDEF" for c in pattern[i + 2 : i + 4]):
        return f"\\x{{{pattern[i + 2 : i + 4]}}}", i + 4
    if letter in "uU":
        width = 4 if letter == "u" else 8
        digits = pattern[i + 2 : i + 2 + width]
        if len(digits) == width and all(c in "0123456789abcdefABCDEF" for c in digits):
            return f"\\x{{{digits}}}", i + 2 + width
    if not in_class and letter == "A":
        return "\\A", i + 2
    if not in_class and letter in "Zz":
        return "\\z", i + 2
    if letter in _LITERAL_ESCAPES:
        return pattern[i : i + 2], i + 2
    raise UnsupportedPatternError(pattern, pattern[i : i + 2], i)


def _class(pattern: str, i: int, folding: bool) -> tuple[str, int]:
    """The character class starting at ``pattern[i]`` (``[``), rewritten, and the index after it."""
    out = ["["]
    j = i + 1
    if j < len(pattern) and pattern[j] == "^":
        out.append("^")
        j += 1
    first = True
    while j < len(pattern):
        c = pattern[j]
        if c == "]" and not first:
            out.append("]")
            return "".join(out), j + 1
        if c == "\\":
            text, j = _escape(pattern, j, in_class=True, folding=folding)
            out.append(text)
        elif c == "[" or pattern.startswith(("&&", "--", "||", "~~"), j):
            raise UnsupportedPatternError(pattern, pattern[j : j + 2], j)  # nesting, set operations
        elif c == "]":  # a ']' first in the class is a literal in Python
            out.append("\\]")
            j += 1
        else:
            out.append(c if c.isprintable() else f"\\x{{{ord(c):X}}}")
            j += 1
        first = False
    raise UnsupportedPatternError(pattern, pattern[i:], i)


_GROUP_OPENERS = ("(?:", "(?=", "(?!", "(?<=", "(?<!", "(?>", "(?i:")
_FOLDING = "(?i:"


def onig_pattern(pattern: str) -> str:
    """``pattern`` (Python ``regex`` syntax) as an Oniguruma regex that matches the same pieces, or an
    UnsupportedPatternError."""
    out: list[str] = []
    groups: list[int] = []  # indexes in ``out`` of open groups

    def folding(open_groups: list[int]) -> bool:
        return any(out[g] == _FOLDING for g in open_groups)

    last_atom = -1  # index in ``out`` where the last atom began (for X{n,m}+); -1: none
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            text, i = _escape(pattern, i, in_class=False, folding=folding(groups))
            last_atom = len(out)
            out.append(text)
        elif c == "[":
            text, i = _class(pattern, i, folding=folding(groups))
            last_atom = len(out)
            out.append(text)
        elif c == "(":
            opener = next((o for o in _GROUP_OPENERS if pattern.startswith(o, i)), None)
            if opener is None and pattern.startswith("(?", i):
                raise UnsupportedPatternError(pattern, pattern[i : i + 4], i)
            opener = opener or "("
            groups.append(len(out))
            out.append(opener)
            i += len(opener)
            last_atom = -1
        elif c == ")":
            if not groups:
                raise UnsupportedPatternError(pattern, ")", i)
            last_atom = groups.pop()
            out.append(")")
            i += 1
        elif c == "{":
            end = pattern.find("}", i)
            body = pattern[i + 1 : end] if end > 0 else ""
            if end < 0 or not body or not all(ch in "0123456789," for ch in body) or body.count(",") > 1 or body[0] == ",":
                raise UnsupportedPatternError(pattern, pattern[i : end + 1] if end > 0 else "{", i)
            if last_atom < 0:
                raise UnsupportedPatternError(pattern, pattern[i : end + 1], i)
            i = end + 1
            if i < len(pattern) and pattern[i] == "+":  # possessive interval: an atomic group
                atom = "".join(out[last_atom:])
                del out[last_atom:]
                out.append(f"(?>{atom}{{{body}}})")
                i += 1
            elif i < len(pattern) and pattern[i] == "?":
                out.append(f"{{{body}}}?")
                i += 1
            else:
                out.append(f"{{{body}}}")
            last_atom = -1
        elif c in "*+?":
            out.append(c)
            i += 1
            if i < len(pattern) and pattern[i] in "+?":  # possessive / lazy: the same in both
                out.append(pattern[i])
                i += 1
            last_atom = -1
        elif c == "$":
            last_atom = -1
            out.append("(?=\\n?\\z)")
            i += 1
        elif c == "^":
            last_atom = -1
            out.append("\\A")
            i += 1
        elif c == "|":
            last_atom = -1
            out.append(c)
            i += 1
        elif not c.isprintable() or c == "#":  # a raw control character: spelled out, as a literal
            last_atom = len(out)
            out.append(f"\\x{{{ord(c):X}}}")
            i += 1
        else:
            last_atom = len(out)
            out.append(c)
            i += 1
    if groups:
        raise UnsupportedPatternError(pattern, "(", groups[-1])
    return "".join(out)
