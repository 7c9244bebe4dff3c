"""The tokenizer interface (tiktoken-like) and the byte-level BPE tokenizer.

Encoding follows tiktoken exactly, so ids agree token for token:
1. allowed special tokens are cut out of the text first;
2. the rest is split into pieces by the pattern regex;
3. a piece that is itself a token becomes that token; otherwise its UTF-8 bytes start as single-byte
   tokens and the adjacent pair whose concatenation has the lowest rank is merged, repeatedly,
   until no adjacent pair forms a token.
Steps 2-3 run in native code, built once (lazily) from the tokenizer's own ranks: for the two named
patterns our C encoder (_native_bpe.c, the patterns written out as scanners), for any other pattern
tiktoken's Rust core; step 1 and its rules (which specials are allowed, the error for a disallowed one)
stay here. The pure-Python encoder (pybpe.py, with a cache of the ids of each piece) is the reference
and the fallback for a pattern tiktoken's regex engine cannot compile. A custom pattern is taken to
split the same in both engines (Perl-style syntax, Unicode classes); the named patterns are tiktoken's.
"""

from __future__ import annotations

import abc
import base64
import functools
import hashlib
import json
import logging
import operator
import os
from itertools import chain
from typing import AbstractSet, Collection, Iterable, Literal, Mapping, Sequence

from .errors import is_unicode
from .fileio import MAX_VOCAB_SIZE, Stamp, atomic_write, format_stamp
from .patterns import GPT2_PATTERN, GPT4_PATTERN, piece_splitter, resolve_pattern, rust_panics_unprinted, special_token_regex
from .pybpe import PieceCache, encode_piece, split_token
from .rankfiles import gpt2_conflicts, write_gpt2, write_tiktoken

try:
    from . import _native_bpe  # the C encoder, built at install (optional: see _native_encoder)
except ImportError:
    _native_bpe = None

FORMAT_NAME = "tokenizers_bpe"
TOKENIZER_FILE = "tokenizer.json"  # the usual name of a saved tokenizer (bpe-train -o, checkpoints, data directories)
TOKENIZER_STAMP = Stamp(FORMAT_NAME, "a tokenizer.json")
FORMAT_VERSION = 1
ENDOFTEXT = "<|endoftext|>"

MAX_SPECIAL_TOKENS = 4096  # released tokenizers have a few (GPT-2 1, Llama 3 256); 50,000 made every encode take seconds
MAX_UNUSED_IDS = 1024  # ids between the ordinary and the special tokens (cl100k_base 16, o200k_base 19): more is a mistake
BACKENDS = ("auto", "native", "tiktoken", "python")
# The patterns the native encoder splits by (its scanner for each, by number).
_NATIVE_PATTERNS = {GPT2_PATTERN: 0, GPT4_PATTERN: 1}
log = logging.getLogger(__name__)
_PARALLEL_MIN_CHARS = 1 << 20  # below this much text, starting worker processes costs more than it saves


class Tokenizer(abc.ABC):
    """What every tokenizer offers: tiktoken's encode/decode API plus save/fingerprint/interop."""

    type: str  # "bpe" or "char", the file's type field

    def __init__(self, special_tokens: Mapping[str, int], token_bytes: Mapping[int, bytes]):
        if len(special_tokens) > MAX_SPECIAL_TOKENS:
            raise ValueError(f"{len(special_tokens):,} special tokens, more than a tokenizer can use ({MAX_SPECIAL_TOKENS:,}: "
                             "every encode searches the text for each of them)")
        for tok, i in special_tokens.items():
            if not isinstance(tok, str) or not tok or not is_unicode(tok):
                raise ValueError(f"special token {tok!r} must be a non-empty string of valid UTF-8 text")
            if not isinstance(i, int) or isinstance(i, bool) or i < 0:
                raise ValueError(f"special token {tok!r} has an invalid id {i!r}")
            if i in token_bytes:
                raise ValueError(f"special token {tok!r} has id {i}, which an ordinary token already uses")
        if len(set(special_tokens.values())) != len(special_tokens):
            raise ValueError("two special tokens share one id")
        self._special_tokens = dict(sorted(special_tokens.items(), key=lambda kv: kv[1]))
        self._decoder = dict(token_bytes)
        self._decoder.update((i, t.encode("utf-8")) for t, i in self._special_tokens.items())
        self.n_vocab = max(self._decoder) + 1 if self._decoder else 0
        unused = self.n_vocab - len(self._decoder)
        if unused > MAX_UNUSED_IDS:
            raise ValueError(f"the special token ids leave {unused} ids unused below {self.n_vocab - 1} (every model "
                             f"of this tokenizer would have {self.n_vocab} rows); special tokens must follow the "
                             f"{len(token_bytes)} ordinary tokens, with at most {MAX_UNUSED_IDS} ids unused")
        self._fingerprint: str | None = None

    # ----------------------------------------------------------------------------- special tokens
    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special_tokens)

    @property
    def special_tokens_set(self) -> set[str]:
        return set(self._special_tokens)

    @property
    def eot_token(self) -> int | None:
        return self._special_tokens.get(ENDOFTEXT)

    def encode_single_token(self, text: str) -> int:
        """The id of the one token ``text`` is (a special token's name, or an ordinary token)."""
        if text in self._special_tokens:
            return self._special_tokens[text]
        ids = self.encode_ordinary(text)
        if len(ids) != 1:
            raise ValueError(f"{text!r} is not a single token (it encodes to {len(ids)} tokens)")
        return ids[0]

    # ----------------------------------------------------------------------------- encoding
    @abc.abstractmethod
    def encode_ordinary(self, text: str) -> list[int]:
        """Encode text, treating special-token strings as ordinary text."""

    def encode(
        self,
        text: str,
        *,
        allowed_special: Literal["all"] | AbstractSet[str] = set(),  # noqa: B006 (tiktoken's signature)
        disallowed_special: Literal["all"] | Collection[str] = "all",
    ) -> list[int]:
        """Encode text; special tokens are encoded as such only when allowed.

        As in tiktoken, text containing a special token that is neither allowed nor explicitly
        permitted as ordinary text (``disallowed_special=()``) raises ValueError."""
        if allowed_special == "all":
            allowed_special = self.special_tokens_set
        if disallowed_special == "all":
            disallowed_special = self.special_tokens_set - set(allowed_special)
        if disallowed_special:
            found = special_token_regex(disallowed_special).search(text)
            if found:
                raise ValueError(
                    f"the text contains the special token {found.group()!r}, which is disallowed; pass "
                    f"allowed_special={{{found.group()!r}}} to encode it as a special token, or "
                    f"disallowed_special=() to encode it as ordinary text"
                )
        allowed = {t for t in allowed_special if t in self._special_tokens}
        if not allowed:
            return self.encode_ordinary(text)
        ids: list[int] = []
        start = 0
        for m in special_token_regex(allowed).finditer(text):
            ids += self.encode_ordinary(text[start : m.start()])
            ids.append(self._special_tokens[m.group()])
            start = m.end()
        ids += self.encode_ordinary(text[start:])
        return ids

    def encode_batch(
        self,
        texts: Sequence[str],
        *,
        num_threads: int | None = None,
        allowed_special: Literal["all"] | AbstractSet[str] = set(),  # noqa: B006
        disallowed_special: Literal["all"] | Collection[str] = "all",
    ) -> list[list[int]]:
        """Encode many texts, in parallel on ``num_threads`` worker processes (default: all cores;
        processes because pure-Python encoding holds the GIL). Small batches run in-process."""
        texts = list(texts)
        kwargs = {"allowed_special": allowed_special, "disallowed_special": disallowed_special}
        workers = min(num_threads or os.cpu_count() or 1, len(texts))
        if workers <= 1 or sum(map(len, texts)) < _PARALLEL_MIN_CHARS:
            return [self.encode(t, **kwargs) for t in texts]
        import multiprocessing

        chunksize = max(1, len(texts) // (workers * 4))
        with multiprocessing.Pool(workers, initializer=_set_worker_tokenizer, initargs=(self, kwargs)) as pool:
            return pool.map(_worker_encode, texts, chunksize=chunksize)

    # ----------------------------------------------------------------------------- decoding
    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        ids = list(ids)
        try:  # operator.index accepts ints, numpy integers and integer 0-d tensors, nothing else
            return b"".join(map(self._decoder.__getitem__, map(operator.index, ids)))
        except (KeyError, TypeError):
            raise ValueError(
                f"token id {next(i for i in ids if not self._is_id(i))!r} is not in the vocabulary (valid ids: "
                f"0..{self.n_vocab - 1}{', with gaps' if len(self._decoder) != self.n_vocab else ''})"
            ) from None

    def _is_id(self, i) -> bool:
        try:
            return operator.index(i) in self._decoder
        except TypeError:
            return False

    def decode(self, ids: Iterable[int], errors: str = "replace") -> str:
        """Decode ids to text; ``errors`` is the UTF-8 error handler for byte sequences that are
        not valid UTF-8 on their own (e.g. half of a multi-byte character)."""
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    def decode_single_token_bytes(self, token: int) -> bytes:
        return self.decode_bytes([token])

    def decode_tokens_bytes(self, tokens: Iterable[int]) -> list[bytes]:
        return [self.decode_single_token_bytes(t) for t in tokens]

    # ----------------------------------------------------------------------------- files
    @abc.abstractmethod
    def _content(self) -> dict:
        """The type-specific fields that define the tokenizer (fingerprint and == use these)."""

    def to_dict(self) -> dict:
        return {**format_stamp(FORMAT_NAME, FORMAT_VERSION), "type": self.type, **self._content()}

    def save(self, path: str | os.PathLike) -> None:
        """Write ``tokenizer.json`` atomically (a crash never leaves a half-written file). An existing
        file at ``path`` is replaced only if it is a tokenizer.json too (else an OutputError)."""
        with atomic_write(path, "w", stamp=TOKENIZER_STAMP) as f:
            f.write(_json_lines(self.to_dict()))

    def fingerprint(self) -> str:
        """sha256 (hex) of the canonical content: equal tokenizers have equal fingerprints."""
        if self._fingerprint is None:  # tokenizers are immutable: compute once
            canonical = json.dumps(self._content(), sort_keys=True, ensure_ascii=True, separators=(",", ":"))
            self._fingerprint = hashlib.sha256(f"{self.type}\n{canonical}".encode()).hexdigest()
        return self._fingerprint

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n_vocab={self.n_vocab}, special_tokens={self._special_tokens})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Tokenizer) and self.type == other.type and self._content() == other._content()

    __hash__ = None  # compare with ==; use fingerprint() as a key

    # interop: overridden where the tokenizer can be expressed in the format
    def is_gpt2_compatible(self) -> bool:
        return False

    def save_gpt2(self, encoder_json_path, vocab_bpe_path) -> None:
        raise ValueError(f"a {self.type} tokenizer cannot be written as GPT-2 encoder.json + vocab.bpe (byte-level BPE only)")

    def to_tiktoken(self):
        raise ValueError(f"a {self.type} tokenizer cannot be expressed as a tiktoken encoding (byte-level BPE only)")

    def save_tiktoken(self, path) -> None:
        raise ValueError(f"a {self.type} tokenizer cannot be written as a .tiktoken file (byte-level BPE only)")


def _json_lines(d: dict) -> str:
    """JSON with one top-level field per line and one list item (token, merge) per line: readable,
    diffable, and deterministic (the same tokenizer always gives the same bytes)."""

    def dump(x) -> str:
        return json.dumps(x, ensure_ascii=False, separators=(", ", ": "))

    fields = []
    for k, v in d.items():
        if isinstance(v, list) and v:
            v = "[\n" + ",\n".join("  " + dump(x) for x in v) + "\n]"
        else:
            v = dump(v)
        fields.append(f"{dump(k)}: {v}")
    return "{\n" + ",\n".join(fields) + "\n}\n"


# encode_batch worker state (one tokenizer per worker process, sent once)
_worker: tuple[Tokenizer, dict] | None = None


def _set_worker_tokenizer(tok: Tokenizer, kwargs: dict) -> None:
    global _worker
    _worker = (tok, kwargs)


def _worker_encode(text: str) -> list[int]:
    tok, kwargs = _worker
    return tok.encode(text, **kwargs)


class BPETokenizer(Tokenizer):
    """Byte-level BPE: ``ranks`` maps each token's bytes to its id (= its merge priority)."""

    type = "bpe"

    def __init__(
        self,
        ranks: Mapping[bytes, int],
        pattern: str = "gpt2",
        special_tokens: Mapping[str, int] | None = None,
        merges: Sequence[tuple[int, int]] | None = None,
        name: str = "bpe",
        backend: Literal["auto", "native", "tiktoken", "python"] = "auto",
    ):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.pattern = resolve_pattern(pattern)
        ranks = dict(ranks)
        if len(ranks) > MAX_VOCAB_SIZE:
            raise ValueError(f"{len(ranks):,} tokens, more than a tokenizer may hold ({MAX_VOCAB_SIZE:,})")
        if sorted(ranks.values()) != list(range(len(ranks))):
            raise ValueError("token ranks must be the contiguous ids 0..N-1, each used once")
        if any(len(t) != 1 for t, r in ranks.items() if r < 256) or len(ranks) < 256:
            raise ValueError("ranks 0-255 must be the 256 single bytes (byte-level BPE)")
        if b"" in ranks:
            raise ValueError("a token must hold at least one byte (the ranks hold an empty token)")
        self._ranks = ranks
        self._by_rank = sorted(ranks, key=ranks.__getitem__)
        super().__init__(special_tokens or {}, dict(enumerate(self._by_rank)))
        self._merges = None if merges is None else [tuple(m) for m in merges]
        if self._merges is not None:
            _check_merges(self._by_rank, self._merges)
        self.name = name
        self._backend = backend
        self._setup_encoder()

    def _setup_encoder(self) -> None:
        self._findall = piece_splitter(self.pattern)
        self._cache = PieceCache(functools.partial(encode_piece, self._ranks))
        self._core = None  # the native or tiktoken encoder, built on first use (unless the backend is "python")

    def __getstate__(self):  # for worker processes: the compiled regexes and caches are rebuilt there
        state = self.__dict__.copy()
        for k in ("_findall", "_cache", "_core"):
            state.pop(k)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._setup_encoder()

    @property
    def mergeable_ranks(self) -> dict[bytes, int]:
        return dict(self._ranks)

    @property
    def merges(self) -> list[tuple[int, int]]:
        """(left id, right id) for each token id 256.. in order; derived from the ranks when the
        tokenizer was not trained here (running BPE on a token's own bytes with lower ranks only)."""
        if self._merges is None:
            self._merges = [split_token(self._ranks, t, r) for r, t in enumerate(self._by_rank) if r >= 256]
        return list(self._merges)

    @property
    def backend(self) -> str:
        """What encodes: "native" (our C encoder, for the GPT-2 and GPT-4 patterns), "tiktoken" (its Rust
        core, built from this tokenizer's ranks, pattern and special tokens: any other pattern, or the
        native module not built) or "python" (the reference encoder, tokenizers_bpe.pybpe: asked for,
        or the fallback when tiktoken's regex engine cannot compile the pattern, which is logged once).
        All three give the same ids."""
        self._encoder_core()
        return self._backend

    def _encoder_core(self):
        """The native or tiktoken encoder (``encode(text) -> ids``), or None for the Python path."""
        if self._core is not None or self._backend == "python":
            return self._core
        if self._backend in ("auto", "native"):
            native = _native_encoder(self._by_rank, self.pattern)
            if native is not None:
                self._core, self._backend = native, "native"
                return native
            if self._backend == "native":
                raise ValueError("the native encoder cannot encode with this tokenizer: "
                                 + ("its C module is not built (reinstall the package with a C compiler)"
                                    if self.pattern in _NATIVE_PATTERNS else "it knows the GPT-2 and GPT-4 patterns only"))
        try:
            encode = self.to_tiktoken().encode_ordinary
            self._core = encode if self.pattern in _NATIVE_PATTERNS else rust_panics_unprinted(encode)
            self._backend = "tiktoken"
        except Exception as e:  # noqa: BLE001 (fancy-regex's errors reach Python as several types)
            if self._backend == "tiktoken":
                raise ValueError(f"tiktoken cannot encode with this tokenizer: {e}") from None
            self._backend = "python"
            _warn_fallback_once(self.pattern, e)
        return self._core

    def encode_ordinary(self, text: str) -> list[int]:
        core = self._encoder_core()
        try:
            if core is not None:
                try:
                    return core(text)
                except BaseException as e:  # tiktoken's regex engine giving up panics (a BaseException)
                    if type(e).__name__ != "PanicException":
                        raise
                    # A custom pattern that backtracks past fancy-regex's limit on this text: the Python
                    # path splits with the `regex` module, the same pieces, in bounded time (or a ValueError).
            return list(chain.from_iterable(map(self._cache.__getitem__, self._findall(text))))
        except UnicodeEncodeError:
            # lone surrogates cannot be UTF-8 encoded; replace them as tiktoken does
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            return self.encode_ordinary(text)

    def encode_batch(
        self,
        texts: Sequence[str],
        *,
        num_threads: int | None = None,
        allowed_special: Literal["all"] | AbstractSet[str] = set(),  # noqa: B006
        disallowed_special: Literal["all"] | Collection[str] = "all",
    ) -> list[list[int]]:
        """Encode many texts on ``num_threads`` threads (default: all cores): the native encoder and
        tiktoken's core release the GIL (tiktoken's own encode_batch relies on that). The Python
        backend uses processes."""
        if self._encoder_core() is None:
            return super().encode_batch(texts, num_threads=num_threads, allowed_special=allowed_special,
                                        disallowed_special=disallowed_special)
        encode = functools.partial(self.encode, allowed_special=allowed_special, disallowed_special=disallowed_special)
        texts = list(texts)
        threads = min(num_threads or os.cpu_count() or 1, len(texts))
        if threads <= 1:
            return list(map(encode, texts))
        from concurrent.futures import ThreadPoolExecutor  # (not imported by every user of a tokenizer)

        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(encode, texts))

    def _content(self) -> dict:
        return {
            "pattern": self.pattern,
            "special_tokens": self._special_tokens,
            "vocab": [base64.b64encode(t).decode("ascii") for t in self._by_rank],
        }

    def to_dict(self) -> dict:
        # merges are implied by the ranks (so not part of the fingerprint) but stored for readers
        # that apply merges by priority (GPT-2/HF style) and to validate the vocabulary on load
        return {**super().to_dict(), "merges": [list(m) for m in self.merges]}

    @classmethod
    def _from_content(cls, d: dict) -> "BPETokenizer":
        vocab = d["vocab"]
        if not isinstance(vocab, list) or not all(isinstance(t, str) for t in vocab):
            raise ValueError("'vocab' must be a list of base64 strings")
        try:
            tokens = [base64.b64decode(t, validate=True) for t in vocab]
        except ValueError as e:
            raise ValueError(f"'vocab' holds a token that is not valid base64 ({e})") from None
        if len(set(tokens)) != len(tokens):
            raise ValueError("'vocab' lists the same token bytes twice")
        merges = d["merges"]
        if not isinstance(merges, list) or not all(
            isinstance(m, list) and len(m) == 2 and all(type(x) is int for x in m) for m in merges
        ):
            raise ValueError("'merges' must be a list of [left id, right id] pairs")
        return cls(
            {t: i for i, t in enumerate(tokens)},
            pattern=d["pattern"],
            special_tokens=d["special_tokens"],
            merges=merges,
        )

    # ----------------------------------------------------------------------------- interop
    def to_tiktoken(self):
        """A ``tiktoken.Encoding`` with the same ranks, pattern and special tokens (same ids)."""
        import tiktoken

        return tiktoken.Encoding(
            name=self.name, pat_str=self.pattern, mergeable_ranks=dict(self._ranks), special_tokens=self.special_tokens
        )

    def save_tiktoken(self, path) -> None:
        """Write the ranks as a ``.tiktoken`` file (base64 token, space, rank per line). The pattern
        and special tokens are not part of that format: pass them to ``load_tiktoken``."""
        write_tiktoken(path, self._ranks)

    def is_gpt2_compatible(self) -> bool:
        """True when the tokenizer can be written as GPT-2's encoder.json + vocab.bpe: every token
        above the 256 bytes is a merge of two lower tokens and no special token's name collides
        with an ordinary token's GPT-2 string."""
        try:
            self.merges
        except ValueError:
            return False
        return not gpt2_conflicts(self._by_rank, self.special_tokens)

    def save_gpt2(self, encoder_json_path, vocab_bpe_path) -> None:
        write_gpt2(self._by_rank, self.merges, self.special_tokens, encoder_json_path, vocab_bpe_path)


_fallback_warned: set[str] = set()


def _native_encoder(by_rank: list[bytes], pattern: str):
    """The C encoder's ``encode`` for these tokens (in rank order), or None: a pattern it has no
    scanner for, or the extension module not built (it is optional: the package installs without a
    C compiler and then encodes through tiktoken)."""
    if pattern not in _NATIVE_PATTERNS or _native_bpe is None:
        return None
    return _native_bpe.Encoder(by_rank, _NATIVE_PATTERNS[pattern]).encode


def _warn_fallback_once(pattern: str, error: Exception) -> None:
    if pattern not in _fallback_warned:
        _fallback_warned.add(pattern)
        log.warning("tiktoken's regex engine cannot compile the pattern %r (%s); encoding with the "
                    "pure-Python encoder, which gives the same ids more slowly", pattern, str(error).splitlines()[0] if str(error) else type(error).__name__)


def _check_merges(by_rank: list[bytes], merges: list[tuple[int, int]]) -> None:
    if len(merges) != len(by_rank) - 256:
        raise ValueError(f"{len(merges)} merges for {len(by_rank) - 256} tokens above the 256 bytes; they must match")
    for i, (a, b) in enumerate(merges):
        r = 256 + i
        if not (0 <= a < r and 0 <= b < r):
            raise ValueError(f"merge {i} ({a}, {b}) refers to a token that does not exist before token {r}")
        if by_rank[a] + by_rank[b] != by_rank[r]:
            raise ValueError(f"merge {i} ({a}, {b}) does not produce token {r}'s bytes")
