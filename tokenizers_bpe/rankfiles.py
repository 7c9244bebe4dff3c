"""Other programs' vocabulary files, as plain data (byte strings and ids, no tokenizer objects):
tiktoken's ``.tiktoken`` rank files and GPT-2's ``encoder.json`` + ``vocab.bpe`` (also HF's
``vocab.json`` + ``merges.txt``). Every reader validates and names the file and the problem in its
error; ``tokenizers_bpe.formats`` builds tokenizers from what they return."""

from __future__ import annotations

import base64
import functools
import json
import re
from pathlib import Path
from typing import Collection, Mapping, Sequence

from .fileio import MAX_TOKENIZER_BYTES, MAX_VOCAB_SIZE, atomic_write, check_regular_file, parse_json


def read_text_file(path, what: str) -> str:
    """A whole UTF-8 file; ``what`` names the kind of file expected, for the errors."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a directory; pass the {what} file")
    if not path.exists() and not path.is_symlink():
        raise ValueError(f"{path}: no such file; pass an existing {what} file")
    check_regular_file(path, f"{what} file", max_bytes=MAX_TOKENIZER_BYTES)  # a FIFO or a device is never opened
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a {what} file (not UTF-8 text at byte {e.start})") from None


# --------------------------------------------------------------------------------------- tiktoken
_TIKTOKEN_LINE = re.compile(r"[A-Za-z0-9+/]+={0,2} [0-9]+")


def looks_like_tiktoken(text: str) -> bool:
    """Whether ``text`` (a file's text, or its start) begins with 'BASE64TOKEN RANK' lines, as a .tiktoken file."""
    complete = text.split("\n")[:-1] or [text]  # the last line of a file's start may be cut off
    lines = [line.rstrip("\r") for line in complete if line.strip()][:2]
    return bool(lines) and all(_TIKTOKEN_LINE.fullmatch(line) for line in lines)


def read_tiktoken(path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(read_text_file(path, ".tiktoken").splitlines(), 1):
        if not line:
            continue
        if len(ranks) == MAX_VOCAB_SIZE:
            raise ValueError(f"{path}: more than {MAX_VOCAB_SIZE:,} ranks, more than a tokenizer may hold")
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise ValueError(f"{path}:{n}: expected 'BASE64TOKEN RANK', got {line[:60]!r}") from None
    if not ranks:
        raise ValueError(f"{path}: empty .tiktoken file")
    return ranks


def write_tiktoken(path, ranks: Mapping[bytes, int]) -> None:
    with atomic_write(path, "w") as f:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(f"{base64.b64encode(token).decode('ascii')} {rank}\n")


# --------------------------------------------------------------------------------------- GPT-2
@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (so vocab files are text)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _to_gpt2_str(token: bytes) -> str:
    table = bytes_to_unicode()
    return "".join(table[b] for b in token)


def _from_gpt2_str(s: str) -> bytes | None:
    inverse = _unicode_to_bytes()
    try:
        return bytes(inverse[c] for c in s)
    except KeyError:
        return None


@functools.lru_cache(maxsize=1)
def _unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def read_gpt2(encoder_json, vocab_bpe, special_names: Collection[str]) -> tuple[dict[bytes, int], dict[str, int]]:
    """(ranks, special tokens) of GPT-2's ``encoder.json`` + ``vocab.bpe``. Entries of encoder.json
    that are neither single bytes nor merge results (GPT-2's ``<|endoftext|>`` = 50256) are the
    special tokens, and must be among ``special_names``: any other is a token whose merge is missing
    (a vocab.bpe cut short made each such token a special token, silently)."""
    encoder = parse_json(read_text_file(encoder_json, "encoder.json"), str(encoder_json), "a corrupt encoder.json")
    if not isinstance(encoder, dict) or not all(type(v) is int for v in encoder.values()):
        raise ValueError(f"{encoder_json}: encoder.json must map token strings to integer ids")
    if len(encoder) > MAX_VOCAB_SIZE:
        raise ValueError(f"{encoder_json}: {len(encoder):,} tokens, more than a tokenizer may hold ({MAX_VOCAB_SIZE:,})")
    lines = read_text_file(vocab_bpe, "vocab.bpe").split("\n")
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    ranks: dict[bytes, int] = {}
    for s, i in encoder.items():
        b = _from_gpt2_str(s)
        if b is not None and len(b) == 1:
            ranks[b] = i
    if len(ranks) != 256:
        raise ValueError(f"{encoder_json}: has {len(ranks)} of the 256 single-byte tokens; not a byte-level BPE vocabulary")
    last = max(ranks.values())
    for n, line in enumerate(lines, 2):
        if not line.strip():
            continue
        parts = line.split()
        left, right = (_from_gpt2_str(p) for p in parts) if len(parts) == 2 else (None, None)
        if left is None or right is None:
            raise ValueError(f"{vocab_bpe}:{n}: expected two GPT-2 byte strings separated by a space, got {line[:60]!r}")
        if left not in ranks or right not in ranks:
            raise ValueError(f"{vocab_bpe}:{n}: merge {line!r} uses a token no earlier merge produced")
        merged_str = parts[0] + parts[1]
        if merged_str not in encoder:
            raise ValueError(f"{vocab_bpe}:{n}: the result of merge {line!r} is not in {encoder_json}")
        rank = encoder[merged_str]
        if rank <= last:
            raise ValueError(f"{vocab_bpe}:{n}: merge {line!r} gives id {rank}, not above the previous merge's {last}")
        ranks[left + right] = last = rank
    ordinary = set(ranks.values())
    specials = {s: i for s, i in encoder.items() if i not in ordinary}
    unnamed = [f"{s[:40]!r} ({i})" for s, i in specials.items() if s not in special_names]
    if unnamed:
        raise ValueError(f"{encoder_json}: {len(unnamed):,} {'entry' if len(unnamed) == 1 else 'entries'} that no merge of "
                         f"{vocab_bpe} produces and that no list names as a special token ({', '.join(unnamed[:3])}{', ...' if len(unnamed) > 3 else ''}); "
                         f"is {Path(vocab_bpe).name} cut short?")
    return ranks, specials


def gpt2_conflicts(by_rank: Sequence[bytes], special_tokens: Mapping[str, int]) -> list[str]:
    """Special tokens whose name equals an ordinary token's GPT-2 string (encoder.json keys clash)."""
    strings = {_to_gpt2_str(t) for t in by_rank}
    return [s for s in special_tokens if s in strings]


def write_gpt2(by_rank: Sequence[bytes], merges: Sequence[tuple[int, int]], special_tokens: Mapping[str, int],
               encoder_json_path, vocab_bpe_path) -> None:
    """Write tokens (bytes in id order), their merges and the special tokens as GPT-2's files."""
    clashes = gpt2_conflicts(by_rank, special_tokens)
    if clashes:
        raise ValueError(f"special token(s) {clashes} clash with ordinary tokens in GPT-2's encoder.json")
    encoder = {_to_gpt2_str(t): i for i, t in enumerate(by_rank)}
    encoder.update(special_tokens)
    with atomic_write(encoder_json_path, "w") as f:
        json.dump(encoder, f, ensure_ascii=False)
    with atomic_write(vocab_bpe_path, "w") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{_to_gpt2_str(by_rank[a])} {_to_gpt2_str(by_rank[b])}\n")
