"""Loading tokenizers from files: our ``tokenizer.json`` (BPE or char-level), tiktoken's
``.tiktoken`` rank files and GPT-2's ``encoder.json`` + ``vocab.bpe`` (the raw formats are read in
``tokenizers_bpe.rankfiles``), and ``load_any``, the one rule for "a tokenizer" given as a path (a
tokenizer.json, a .tiktoken file, or a directory holding a tokenizer.json). Every loader validates
and names the file and the problem in its error."""

from __future__ import annotations

import os
import reprlib
from pathlib import Path
from typing import Collection

from .char import CharTokenizer
from .errors import SettingError
from .errors import InputFileError
from .fileio import check_regular_file, parse_json, recorded_version
from .patterns import GPT2_PATTERN, GPT4_PATTERN, O200K_PATTERN
from .rankfiles import looks_like_tiktoken, read_gpt2, read_text_file, read_tiktoken
from .tokenizer import ENDOFTEXT, FORMAT_NAME, FORMAT_VERSION, MAX_UNUSED_IDS, TOKENIZER_FILE, BPETokenizer, Tokenizer

TOKENIZER_TYPES = {"bpe": BPETokenizer, "char": CharTokenizer}
_REQUIRED = {"bpe": ("pattern", "vocab", "merges", "special_tokens"), "char": ("chars", "special_tokens")}

# A .tiktoken file holds only ranks. The encodings tiktoken defines (tiktoken_ext.openai_public) for
# the rank files it publishes, by file stem: (pattern, special tokens). p50k_base is left out: tiktoken
# defines it with 50281 ids of which <|endoftext|> = 50256 is special, so its 50280 ranks skip 50256,
# and a BPETokenizer's ranks are 0..N-1 without gaps (loading one is an error that says so).
TIKTOKEN_ENCODINGS: dict[str, tuple[str, dict[str, int]]] = {
    "gpt2": (GPT2_PATTERN, {ENDOFTEXT: 50256}),
    "r50k_base": (GPT2_PATTERN, {ENDOFTEXT: 50256}),
    "cl100k_base": (GPT4_PATTERN, {ENDOFTEXT: 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
                                   "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276}),
    "o200k_base": (O200K_PATTERN, {ENDOFTEXT: 199999, "<|endofprompt|>": 200018}),
}
TIKTOKEN_SUFFIX = ".tiktoken"


def load(path: str | os.PathLike) -> Tokenizer:
    """Read a ``tokenizer.json`` written by ``save`` (BPE or char-level, by its type field)."""
    text = read_text_file(path, "tokenizer.json")
    try:
        d = parse_json(text, str(path), "a corrupt or truncated tokenizer.json; re-create it with bpe-train")
    except InputFileError:
        if looks_like_tiktoken(text):
            raise ValueError(f"{path}: a .tiktoken rank file (ranks only: no pattern, no special tokens), not a "
                             "tokenizer.json; load it with tokenizers_bpe.load_any(path) (tiktoken's definition for a "
                             "known file name, else the gpt2 pattern) or tokenizers_bpe.load_tiktoken(path, pattern=..., "
                             "special_tokens=...)") from None
        raise
    if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
        raise ValueError(f"{path}: not a {FORMAT_NAME} tokenizer.json (no \"format\": \"{FORMAT_NAME}\" field)")
    if recorded_version(d) != FORMAT_VERSION:
        raise ValueError(
            f"{path}: unknown tokenizer format version {reprlib.repr(recorded_version(d))} (this version reads {FORMAT_VERSION}); "
            "upgrade tokenizers_bpe or re-train the tokenizer"
        )
    kind = d.get("type")
    if not isinstance(kind, str) or kind not in TOKENIZER_TYPES:
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
    return _from_ranks(path, read_tiktoken(path), pattern, special_tokens or {})


def _from_ranks(path, ranks: dict[bytes, int], pattern: str, special_tokens: dict[str, int]) -> BPETokenizer:
    try:
        return BPETokenizer(ranks, pattern, special_tokens, name=Path(path).stem)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def load_any(path: str | os.PathLike, *, pattern: str | None = None) -> Tokenizer:
    """A tokenizer from a path as users give it: a ``tokenizer.json``, a ``.tiktoken`` rank file (by
    its suffix or its content), or a directory holding a ``tokenizer.json`` (a gpt-prepare data
    directory, a checkpoint). A rank file of a known encoding (TIKTOKEN_ENCODINGS, by file stem)
    gets tiktoken's pattern and special tokens, any other the gpt2 pattern and none; ``pattern``
    (``"gpt2"``, ``"gpt4"`` or a regex) replaces the pattern of a rank file, and is a SettingError
    for a tokenizer.json, which records its own."""
    path = Path(path)
    if path.is_dir():
        if not (path / TOKENIZER_FILE).is_file():
            raise ValueError(f"{path}: a directory without a {TOKENIZER_FILE}; pass a {TOKENIZER_FILE}, a .tiktoken file, "
                             f"or a data or checkpoint directory that holds a {TOKENIZER_FILE}")
        path = path / TOKENIZER_FILE
    if path.suffix == TIKTOKEN_SUFFIX or _sniff_tiktoken(path):
        ranks = read_tiktoken(path)
        known_pattern, specials = TIKTOKEN_ENCODINGS.get(path.stem, (GPT2_PATTERN, {}))
        if specials and not len(ranks) <= min(specials.values()) <= len(ranks) + MAX_UNUSED_IDS:
            raise ValueError(f"{path}: named like tiktoken's {path.stem} rank file, whose special tokens start at id "
                             f"{min(specials.values())}, but it holds {len(ranks)} ranks, so it is another file; rename it "
                             "to load it with the gpt2 pattern and no special tokens")
        return _from_ranks(path, ranks, pattern or known_pattern, specials)
    if pattern is not None:
        raise SettingError("pattern", "{pattern} applies to a .tiktoken rank file only: a tokenizer.json records "
                                      "its own pattern")
    return load(path)


def _sniff_tiktoken(path: Path) -> bool:
    """Whether a file that does not say so by its name starts like a .tiktoken rank file."""
    try:
        check_regular_file(path)  # never open a FIFO (it would block) or a device
        with open(path, "rb") as f:
            head = f.read(4096)
    except (OSError, ValueError):
        return False  # load() names the problem
    return looks_like_tiktoken(head.decode("utf-8", errors="replace"))


def load_gpt2(encoder_json, vocab_bpe, special_names: Collection[str] = (ENDOFTEXT,)) -> BPETokenizer:
    """GPT-2's ``encoder.json`` + ``vocab.bpe`` (or HF ``vocab.json`` + ``merges.txt``), with GPT-2's
    pattern. Entries of encoder.json that are neither single bytes nor merge results (GPT-2's
    ``<|endoftext|>`` = 50256) become special tokens; each must be one of ``special_names`` (for a
    transformers directory, ``hf_special_token_names`` gives those it names)."""
    ranks, specials = read_gpt2(encoder_json, vocab_bpe, special_names)
    try:
        return BPETokenizer(ranks, GPT2_PATTERN, specials, name="gpt2")
    except ValueError as e:
        raise ValueError(f"{encoder_json}, {vocab_bpe}: {e}") from None
