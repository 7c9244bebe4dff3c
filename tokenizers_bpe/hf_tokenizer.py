"""Our tokenizers as Hugging Face ``tokenizers`` files (``tokenizer.json``, the format
``tokenizers.Tokenizer.from_file`` and transformers' fast tokenizers read), giving the same ids.

Byte-level BPE becomes HF's ``BPE`` model behind a pre-tokenizer that splits with *our* pattern
(``Split``, rewritten for HF's regex engine by ``onig_pattern``; the matches are kept and any text
between them dropped, as ``findall`` does here) and then maps bytes to GPT-2's
printable characters (``ByteLevel`` with ``use_regex=false``, so GPT-2's own split is not applied
on top). Two settings make HF's merge loop compute tiktoken's result:

- ``ignore_merges``: a piece that is itself a token becomes that token (tiktoken's first step);
- the merge list holds every pair of tokens whose concatenation is a token, ranked by that token's
  id: HF merges the adjacent pair of best rank, which is then tiktoken's rule (the adjacent pair
  whose concatenation has the lowest id), not only the pair each token was first learnt from.

A char-level tokenizer becomes a ``WordLevel`` model over a split into single characters (with a
``Fuse`` decoder, so decoding concatenates). Special tokens are HF "added tokens" (special=True):
split out of the text before the pattern, as ``encode(allowed_special="all")`` does here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .char import CharTokenizer
from .fileio import read_json
from .onig_pattern import onig_pattern
from .patterns import GPT2_PATTERN
from .rankfiles import bytes_to_unicode
from .tokenizer import ENDOFTEXT, BPETokenizer, Tokenizer

HF_TOKENIZER_FILE = "tokenizer.json"
HF_TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
HF_SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
_ANY_CHARACTER = r"[\s\S]"  # one character, newlines included, in both regex engines
_CHAR_UNKNOWN = "<unk>"  # WordLevel needs the name of an unknown token; absent from the vocabulary, an unknown
#                          character is an error (as in CharTokenizer), never a silent stand-in


class ExportError(ValueError):
    """A tokenizer (or one of its parts) that a target format cannot represent exactly. ``kind``
    names what cannot be represented, ``target`` the format."""

    def __init__(self, kind: str, target: str, reason: str):
        super().__init__(kind, target, reason)
        self.kind, self.target, self.reason = kind, target, reason

    def __str__(self) -> str:
        return f"{self.kind} cannot be exported to {self.target} exactly: {self.reason}"


def byte_level_string(token: bytes) -> str:
    """A token's bytes as GPT-2's printable characters (its key in vocab.json / tokenizer.json)."""
    table = bytes_to_unicode()
    return "".join(table[b] for b in token)


def all_merges(tok: BPETokenizer) -> list[tuple[int, int]]:
    """Every (left, right) pair of ordinary tokens whose concatenation is a token, ordered by that
    token's id (the pair it was learnt from first): the merge list that makes a priority-ordered
    merge loop (HF's, llama.cpp's) compute tiktoken's result."""
    ranks = tok.mergeable_ranks
    by_rank = sorted(ranks, key=ranks.__getitem__)
    try:
        learnt = tok.merges
    except ValueError:  # a token that is no merge of two lower ones (some rank files): only whole pieces reach it
        learnt = [None] * (len(by_rank) - 256)
    lengths = {len(t) for t in by_rank}  # a cut whose part has no token's length is no pair (a long token: few cuts)
    pairs: list[tuple[int, int]] = []
    for rank in range(256, len(by_rank)):
        token, first = by_rank[rank], learnt[rank - 256]
        if first is not None:
            pairs.append(first)
        for cut in range(1, len(token)):
            if cut not in lengths or len(token) - cut not in lengths:
                continue
            left, right = ranks.get(token[:cut]), ranks.get(token[cut:])
            if left is not None and right is not None and (left, right) != first:
                pairs.append((left, right))
    return pairs


def _added_tokens(tok: Tokenizer) -> list[dict]:
    return [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
        for t, i in tok.special_tokens.items()
    ]


def _check_specials(tok: Tokenizer, vocab: dict[str, int], kind: str) -> None:
    clashes = [t for t in tok.special_tokens if t in vocab]
    if clashes:
        raise ExportError(kind, "Hugging Face tokenizers",
                          f"special token {clashes[0]!r} is spelled like an ordinary token in the vocabulary")


def _bpe_json(tok: BPETokenizer) -> dict:
    kind = "a byte-level BPE tokenizer"
    by_rank = [tok.decode_single_token_bytes(i) for i in range(len(tok.mergeable_ranks))]
    strings = [byte_level_string(t) for t in by_rank]
    vocab = {s: i for i, s in enumerate(strings)}
    _check_specials(tok, vocab, kind)
    pattern = onig_pattern(tok.pattern)
    return {
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            # the matches are the pieces and text between them is dropped: findall's (and tiktoken's) split
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Removed", "invert": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
            "vocab": {**vocab, **tok.special_tokens},
            "merges": [[strings[a], strings[b]] for a, b in all_merges(tok)],
        },
    }


def _char_json(tok: CharTokenizer) -> dict:
    vocab = {c: i for i, c in enumerate(tok.chars)}
    _check_specials(tok, vocab, "a char-level tokenizer")
    return {
        "normalizer": None,
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": _ANY_CHARACTER}, "behavior": "Isolated", "invert": False},
        "post_processor": None,
        "decoder": {"type": "Fuse"},
        "model": {"type": "WordLevel", "vocab": {**vocab, **tok.special_tokens}, "unk_token": _CHAR_UNKNOWN},
    }


def hf_tokenizer_json(tok: Tokenizer) -> dict:
    """The content of HF's ``tokenizer.json`` for ``tok``; an ExportError (or the pattern's
    UnsupportedPatternError) where it cannot be exact."""
    if isinstance(tok, BPETokenizer):
        body = _bpe_json(tok)
    elif isinstance(tok, CharTokenizer):
        body = _char_json(tok)
    else:
        raise ExportError(f"a {tok.type} tokenizer", "Hugging Face tokenizers", "no exporter for this kind")
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": _added_tokens(tok), **body}


def hf_tokenizer_config(tok: Tokenizer, model_max_length: int) -> tuple[dict, dict]:
    """(tokenizer_config.json, special_tokens_map.json) as transformers reads them: the fast
    tokenizer class that loads tokenizer.json as written (not GPT2Tokenizer, which would rebuild the
    split from GPT-2's pattern), end-of-text as bos/eos, no clean-up of spaces when decoding."""
    eot = ENDOFTEXT if tok.eot_token is not None else None
    specials = {"bos_token": eot, "eos_token": eot} if eot else {}
    extra = [t for t in tok.special_tokens if t != eot]
    if extra:
        specials["additional_special_tokens"] = extra
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "add_prefix_space": False,
        **specials,
        "added_tokens_decoder": {str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in _added_tokens(tok)},
    }
    return config, specials


def hf_special_token_names(directory: str | os.PathLike) -> set[str]:
    """The special tokens a transformers directory names in special_tokens_map.json and
    tokenizer_config.json (bos/eos/unk/pad/... tokens, additional_special_tokens, added_tokens_decoder):
    a vocab.json entry that no merge produces is a special token only if named (or GPT-2's own)."""
    names: set[str] = set()
    for file in (HF_SPECIAL_TOKENS_MAP_FILE, HF_TOKENIZER_CONFIG_FILE):
        path = Path(directory) / file
        if not path.exists():
            continue
        settings = read_json(path)
        for key, value in settings.items() if isinstance(settings, dict) else ():
            if key == "added_tokens_decoder" and isinstance(value, dict):
                values = list(value.values())
            elif key.endswith("_token") or key == "additional_special_tokens":
                values = value if isinstance(value, list) else [value]
            else:
                continue
            names.update(v for v in (v.get("content") if isinstance(v, dict) else v for v in values) if isinstance(v, str))
    return names


def hf_gpt2_files_exact(tok: Tokenizer) -> bool:
    """Whether GPT-2's vocab.json + merges.txt reproduce ``tok``: readers of those files split with
    GPT-2's pattern, so only a byte-level BPE with that pattern qualifies."""
    return isinstance(tok, BPETokenizer) and tok.pattern == GPT2_PATTERN and tok.is_gpt2_compatible()


def dumps(d: dict) -> str:
    return json.dumps(d, ensure_ascii=False, indent=2) + "\n"
