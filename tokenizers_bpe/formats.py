"""Loading tokenizers from files: our ``tokenizer.json`` (BPE or char-level), tiktoken's
``.tiktoken`` rank files and GPT-2's ``encoder.json`` + ``vocab.bpe`` (the raw formats are read in
``tokenizers_bpe.rankfiles``). Every loader validates and names the file and the problem in its error."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .char import CharTokenizer
from .fileio import recorded_version
from .patterns import GPT2_PATTERN
from .rankfiles import read_gpt2, read_text_file, read_tiktoken
from .tokenizer import FORMAT_NAME, FORMAT_VERSION, BPETokenizer, Tokenizer

TOKENIZER_TYPES = {"bpe": BPETokenizer, "char": CharTokenizer}
_REQUIRED = {"bpe": ("pattern", "vocab", "merges", "special_tokens"), "char": ("chars", "special_tokens")}


def load(path: str | os.PathLike) -> Tokenizer:
    """Read a ``tokenizer.json`` written by ``save`` (BPE or char-level, by its type field)."""
    text = read_text_file(path, "tokenizer.json")
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: corrupt or truncated tokenizer.json ({e}); re-create it with bpe-train") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
        raise ValueError(f"{path}: not a {FORMAT_NAME} tokenizer.json (no \"format\": \"{FORMAT_NAME}\" field)")
    if recorded_version(d) != FORMAT_VERSION:
        raise ValueError(
            f"{path}: unknown tokenizer format version {recorded_version(d)!r} (this version reads {FORMAT_VERSION}); "
            "upgrade tokenizers_bpe or re-train the tokenizer"
        )
    kind = d.get("type")
    if kind not in TOKENIZER_TYPES:
        raise ValueError(f"{path}: unknown tokenizer type {kind!r}; expected one of {', '.join(TOKENIZER_TYPES)}")
    missing = [k for k in _REQUIRED[kind] if k not in d]
    if missing:
        raise ValueError(f"{path}: tokenizer.json lacks the field(s) {', '.join(missing)}")
    if not isinstance(d["special_tokens"], dict):
        raise ValueError(f"{path}: 'special_tokens' must be an object mapping token strings to ids")
    try:
        return TOKENIZER_TYPES[kind]._from_content(d)
    except ValueError as e:
        raise ValueError(f"{path}: invalid tokenizer.json: {e}") from None


def load_tiktoken(path, *, pattern: str = "gpt2", special_tokens: dict[str, int] | None = None) -> BPETokenizer:
    """A tokenizer from a ``.tiktoken`` rank file; the file holds only ranks, so the pattern
    (``"gpt2"``, ``"gpt4"`` or a regex) and the special tokens (name -> id) are given here."""
    ranks = read_tiktoken(path)
    try:
        return BPETokenizer(ranks, pattern, special_tokens or {}, name=Path(path).stem)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None



def load_gpt2(encoder_json, vocab_bpe) -> BPETokenizer:
    """GPT-2's ``encoder.json`` + ``vocab.bpe`` (or HF ``vocab.json`` + ``merges.txt``), with GPT-2's
    pattern. Entries of encoder.json that are neither single bytes nor merge results (GPT-2's
    ``<|endoftext|>`` = 50256) become special tokens."""
    ranks, specials = read_gpt2(encoder_json, vocab_bpe)
    try:
        return BPETokenizer(ranks, GPT2_PATTERN, specials, name="gpt2")
    except ValueError as e:
        raise ValueError(f"{encoder_json}, {vocab_bpe}: {e}") from None
