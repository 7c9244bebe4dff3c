"""Pre-tokenization patterns: text is split into pieces by a regex before BPE sees it, so merges
never cross a piece boundary (a word and the space before it, a run of digits, punctuation, ...).

The two named patterns are exactly tiktoken's (``r50k_base``/``gpt2`` and ``cl100k_base``)."""

from __future__ import annotations

import functools
import os
import re
import unicodedata
from typing import Callable, Iterator

import regex

from .errors import is_unicode

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
GPT4_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
PATTERNS = {"gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN}
# o200k_base's pattern (tiktoken's), for loading that rank file; not offered for training here.
O200K_PATTERN = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])

# Twins of the named patterns for the stdlib `re`, which splits about 2x faster than `regex`. They
# are exact on ASCII-only text, where \p{L} is [A-Za-z], \p{N} is [0-9] and `regex`'s \s is the
# class below (the possessive quantifiers of the originals change nothing there: nothing follows
# them that could backtrack). tests/tokenizers_bpe checks the equivalence on random ASCII text.
_WS = r"\t\n\x0b\x0c\r "
_ASCII_TWINS = {
    GPT2_PATTERN: rf"""'(?:[sdmt]|ll|ve|re)| ?[A-Za-z]+| ?[0-9]+| ?[^{_WS}A-Za-z0-9]+|[{_WS}]+$|[{_WS}]+(?![^{_WS}])|[{_WS}]""",
    GPT4_PATTERN: (
        rf"""'(?i:[sdmt]|ll|ve|re)|[^\r\nA-Za-z0-9]?[A-Za-z]+|[0-9]{{1,3}}| ?[^{_WS}A-Za-z0-9]+[\r\n]*|[{_WS}]+$"""
        rf"""|[{_WS}]*[\r\n]|[{_WS}]+(?![^{_WS}])|[{_WS}]"""
    ),
}
# Where text may be cut into chunks that split into exactly the pieces of one scan over the whole
# text (the end of a match is the cut): a newline between two non-space characters ends a piece of
# both named patterns and no piece crosses it; with CRLF line ends GPT-2 ends a piece between "\r"
# and "\n", GPT-4 after "\r\n". A custom pattern gets the LF rule (it should not match across it).
_LF_CUT = r"\S\n(?=\S)"
_SAFE_CUTS = {GPT2_PATTERN: _LF_CUT + r"|\S\r(?=\n\S)", GPT4_PATTERN: r"\S\r?\n(?=\S)"}
_BLOCK = 1 << 16  # characters per block when mixed text is split into ASCII and non-ASCII blocks

# Where a long text may be cut into chunks that encode to exactly the tokens of the whole (gpt-prepare),
# as zero-width matches at the cut; unlike the cuts above they need no line break. For both named
# patterns, a letter is consumed only by the contraction or the letter run (` ?\p{L}++`,
# `[^\r\n\p{L}\p{N}]?+\p{L}++`), and a digit only by the digit run (` ?\p{N}++`, `\p{N}{1,3}+`): each
# stops at the first character of another class without consuming it, and would stop the same way at
# the end of the text. So after a letter followed by a non-letter (or a digit followed by a non-digit)
# a piece always ends, nothing before it depends on what follows, and the rest (the patterns look
# behind nothing) splits the same on its own. Text with neither such an edge nor a line start (only
# punctuation and spaces, one endless word) cannot be cut. A custom pattern gets line starts only; a
# tokenizer without a pattern (char-level) any character boundary. tests/tokenizers_bpe/test_chunk_cuts.py
# checks all of this. An edge is only taken between two characters assigned in Python's Unicode
# version ({unassigned}: the others, filled in by chunk_cut_regex): the encoders (tiktoken, and the
# native one, built from tiktoken's classes) and `regex` each have their own Unicode version, and a
# character assigned in one but not the other (U+3D000 is a letter to regex 2026.12, unassigned to
# tiktoken 0.14) is a letter to one and punctuation to the other: a cut beside it changed the tokens.
_EDGE_CUT = r"(?:(?<=\p{L})(?=\P{L})|(?<=\p{N})(?=\P{N}))(?<![{unassigned}])(?![{unassigned}])"
_CHUNK_CUTS = {
    GPT2_PATTERN: _EDGE_CUT + r"|(?<=\S\n)(?=\S)|(?<=\S\r)(?=\n\S)",
    GPT4_PATTERN: _EDGE_CUT + r"|(?<=\S\r?\n)(?=\S)",
}
_LINE_START_CUT = r"(?<=\S\n)(?=\S)"
_ANY_CUT = r"(?s)(?<=.)(?=.)"
MAX_PATTERN_CHARS = 16_384
# A user's pattern gets this long to split a text (a regex takes well under a microsecond a character):
PATTERN_SECONDS = 5.0
PATTERN_SECONDS_PER_CHAR = 1e-5
CHUNK_CUT_LOOKAHEAD = 2  # characters after a cut that decide it: a search of a growing text re-checks these
CHUNK_CUT_LOOKBEHIND = 3  # characters before a cut that decide it: a search must see these too


def resolve_pattern(pattern: str) -> str:
    """``"gpt2"``, ``"gpt4"`` or a regex string -> the regex string (checked to compile and to
    never match the empty string, which would make splitting loop or drop text)."""
    if not isinstance(pattern, str) or not pattern:
        raise ValueError("pattern must be 'gpt2', 'gpt4' or a non-empty regex string")
    if not is_unicode(pattern):
        raise ValueError(f"invalid pattern {pattern!r}: not valid UTF-8 text (a byte of another encoding); give it in UTF-8")
    pattern = PATTERNS.get(pattern, pattern)
    if len(pattern) > MAX_PATTERN_CHARS:
        raise ValueError(f"a pattern of {len(pattern):,} characters, more than a pre-tokenization regex needs "
                         f"({MAX_PATTERN_CHARS:,}; GPT-4's has about 200)")
    compiled = compile_pattern(pattern)
    if compiled.match(""):
        raise ValueError(f"invalid pattern {pattern!r}: it matches the empty string; every piece must be non-empty")
    empty_before, skipped = _probe(pattern)
    if empty_before is not None:  # (tiktoken's engine steps over the character after an empty match: dropped)
        raise ValueError(f"invalid pattern {pattern!r}: it matches the empty string (before {empty_before!r} in a test "
                         "text); every piece must be non-empty")
    if skipped is not None:
        raise ValueError(f"invalid pattern {pattern!r}: its pieces skip {skipped!r} (in a test text of letters, digits, "
                         "spaces, line ends, punctuation and symbols): text no piece matches is dropped when encoding; "
                         "make every character part of a piece, e.g. by ending the pattern with |\\s+|(?s:.)")
    return pattern


# Text every pre-tokenization pattern must cover whole: the kinds of characters a corpus holds.
COVERAGE_PROBE = ("Hello, World! It's 3.14 o'clock:\n\tx_1 = [y*2]; // ünïcödé 日本語 ½ 😀 \x00\x1b\x7f\u2028"
                  "\r\n  two  spaces, a tab\there; 'quotes' \"and\" (parens) {braces} <tags> #hash $5 100% a+b=c ~^`|@&\n")


@functools.lru_cache(maxsize=64)
def _probe(pattern: str) -> tuple[str | None, str | None]:
    """``pattern`` on COVERAGE_PROBE: (the character before which it matches the empty string, the first
    character no piece covers), each None where there is none."""
    end = 0
    try:
        for m in compile_pattern(pattern).finditer(COVERAGE_PROBE, timeout=PATTERN_SECONDS):
            if m.start() == m.end():
                return COVERAGE_PROBE[m.start():m.start() + 1] or "the end", None
            if m.start() != end:
                return None, COVERAGE_PROBE[end]
            end = m.end()
    except TimeoutError:
        raise ValueError(f"invalid pattern {pattern!r}: it took more than {PATTERN_SECONDS:.0f} s on a line of test text "
                         "(it backtracks catastrophically): simplify it, e.g. without nested repetition such as (a|aa)*") from None
    return None, (None if end == len(COVERAGE_PROBE) else COVERAGE_PROBE[end])


_devnull_fd: int | None = None


def rust_panics_unprinted(encode: Callable[[str], list[int]]) -> Callable[[str], list[int]]:
    """``encode`` (tiktoken's, for a custom pattern) run with stderr (fd 2) at /dev/null: fancy-regex gives
    up on a pattern that backtracks past its limit, and tiktoken's panic then prints its Rust message
    there directly, before Python sees the PanicException (which the caller answers). Python's own
    buffered stderr is untouched (it reaches the real fd 2 when flushed); two dup2 calls a text."""

    def run(text: str) -> list[int]:
        global _devnull_fd
        try:
            if _devnull_fd is None:
                _devnull_fd = os.open(os.devnull, os.O_WRONLY)
            saved = os.dup(2)
        except OSError:  # no stderr to keep quiet
            return encode(text)
        os.dup2(_devnull_fd, 2)
        try:
            return encode(text)
        finally:
            os.dup2(saved, 2)
            os.close(saved)

    return run


def compile_pattern(pattern: str) -> regex.Pattern:
    try:
        return regex.compile(pattern)
    except (regex.error, TypeError) as e:
        raise ValueError(f"invalid pattern {pattern!r}: {e}") from None


def special_token_regex(tokens) -> regex.Pattern | None:
    """A regex matching any of ``tokens`` (longest first, so a token that prefixes another loses)."""
    return _special_token_regex(frozenset(tokens)) if tokens else None


@functools.lru_cache(maxsize=64)
def _special_token_regex(tokens: frozenset) -> regex.Pattern:
    return regex.compile("|".join(regex.escape(t) for t in sorted(tokens, key=lambda t: (-len(t), t))))


def split_on_specials(text: str, special_tokens) -> list[str]:
    """``text`` with every special-token string cut out (the parts between them)."""
    rx = special_token_regex(special_tokens)
    return rx.split(text) if rx else [text]


@functools.lru_cache(maxsize=16)
def piece_splitter(pattern: str) -> Callable[[str], list[str]]:
    """``findall`` for ``pattern``; for the named patterns, ASCII-only text (or ASCII-only blocks of
    mixed text, see safe_blocks) goes through the faster stdlib twin. Same pieces either way."""
    twin = _ASCII_TWINS.get(pattern)
    if twin is None:
        return _findall_in_time(compile_pattern(pattern), pattern)
    findall = compile_pattern(pattern).findall
    ascii_findall = re.compile(twin).findall

    def split(text: str) -> list[str]:
        if text.isascii():
            return ascii_findall(text)
        if len(text) <= _BLOCK:
            return findall(text)
        pieces: list[str] = []
        for block in safe_blocks(text, _BLOCK, pattern):
            pieces += ascii_findall(block) if block.isascii() else findall(block)
        return pieces

    return split


def _findall_in_time(compiled: regex.Pattern, pattern: str) -> Callable[[str], list[str]]:
    """The pieces (whole matches) of a user's pattern, which may backtrack catastrophically (``(a|aa)*c`` takes
    exponential time on a run of a's): a text that takes far longer than a regex needs is a ValueError
    naming the pattern, not a command that never ends. The named patterns are known to be linear."""

    def findall(text: str) -> list[str]:
        seconds = PATTERN_SECONDS + len(text) * PATTERN_SECONDS_PER_CHAR
        try:
            if compiled.groups:  # findall would return the groups: the pieces are the whole matches
                return [m.group() for m in compiled.finditer(text, timeout=seconds)]
            return compiled.findall(text, timeout=seconds)
        except TimeoutError:
            raise ValueError(f"pattern {pattern!r} took more than {seconds:.0f} s to split {len(text):,} characters "
                             "(it backtracks catastrophically on them): simplify it, e.g. without nested "
                             "repetition such as (a|aa)*") from None

    return findall


@functools.lru_cache(maxsize=16)
def safe_cut_regex(pattern: str) -> regex.Pattern:
    """Matches end where ``pattern``'s pieces may be cut (see _SAFE_CUTS)."""
    return regex.compile(_SAFE_CUTS.get(pattern, _LF_CUT))


def safe_blocks(text: str, size: int, pattern: str) -> Iterator[str]:
    """``text`` in blocks of at least ``size`` characters, cut only where ``pattern`` allows."""
    cut = safe_cut_regex(pattern)
    start = 0
    while len(text) - start > size:
        m = cut.search(text, start + size)
        if m is None:
            break
        yield text[start : m.end()]
        start = m.end()
    yield text[start:]


@functools.lru_cache(maxsize=16)
@functools.cache
def _unassigned_class() -> str:
    """The code points Python's unicodedata leaves unassigned, as the inside of a regex character class."""
    ranges: list[list[int]] = []
    for code in range(0x110000):
        if unicodedata.category(chr(code)) == "Cn":
            if ranges and ranges[-1][1] == code - 1:
                ranges[-1][1] = code
            else:
                ranges.append([code, code])
    return "".join(f"\\U{first:08x}-\\U{last:08x}" for first, last in ranges)


@functools.lru_cache(maxsize=16)
def chunk_cut_regex(pattern: str | None) -> regex.Pattern:
    """Zero-width matches where text may be cut into chunks that, encoded one by one, give exactly
    the tokens of the whole text under ``pattern`` (a regex string; None: no pre-tokenizer, as for a
    char-level tokenizer). A match needs the characters around it to be present: searching a text
    that is still growing, re-check the last ``CHUNK_CUT_LOOKAHEAD`` characters once more arrive, and
    searching the rest of a text, keep the ``CHUNK_CUT_LOOKBEHIND`` characters before it in view."""
    if pattern is None:
        return regex.compile(_ANY_CUT)
    cuts = _CHUNK_CUTS.get(pattern)
    return regex.compile(_LINE_START_CUT if cuts is None else cuts.replace("{unassigned}", _unassigned_class()))


def chunk_cut_rule(pattern: str | None) -> str:
    """In words, where chunk_cut_regex(pattern) cuts (for messages)."""
    if pattern is None:
        return "anywhere (a char-level tokenizer)"
    if pattern in _CHUNK_CUTS:
        return "after a letter or a digit followed by another kind of character, or at a line start"
    return "only at a line start (a custom pattern, where nothing else is known to keep the tokens)"
