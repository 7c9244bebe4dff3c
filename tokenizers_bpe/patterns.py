"""Pre-tokenization patterns: text is split into pieces by a regex before BPE sees it, so merges
never cross a piece boundary (a word and the space before it, a run of digits, punctuation, ...).

The two named patterns are exactly tiktoken's (``r50k_base``/``gpt2`` and ``cl100k_base``)."""

from __future__ import annotations

import functools

import regex

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
GPT4_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
PATTERNS = {"gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN}


def resolve_pattern(pattern: str) -> str:
    """``"gpt2"``, ``"gpt4"`` or a regex string -> the regex string (checked to compile and to
    never match the empty string, which would make splitting loop or drop text)."""
    if not isinstance(pattern, str) or not pattern:
        raise ValueError("pattern must be 'gpt2', 'gpt4' or a non-empty regex string")
    pattern = PATTERNS.get(pattern, pattern)
    compiled = compile_pattern(pattern)
    if compiled.match(""):
        raise ValueError(f"invalid pattern {pattern!r}: it matches the empty string; every piece must be non-empty")
    return pattern


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
