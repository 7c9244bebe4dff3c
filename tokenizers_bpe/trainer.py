"""Incremental byte-level BPE training.

1. Pre-tokenize: split the text on special tokens, then into pieces with the pattern regex, and
   count each distinct piece once (in parallel over chunks; memory grows with the number of
   distinct pieces, not with the corpus). Files are read a block at a time and cut into chunks
   only at line ends between two non-space characters (patterns.safe_cut_regex), which gives
   exactly the pieces of one scan for the gpt2/gpt4 patterns; a custom pattern should not match
   across such a newline. Each file, and each text given to train_from_iterator, is a document.
2. Merge: keep the count of every adjacent token pair (weighted by piece frequency), an index
   from each pair to the pieces containing it, and a max-heap of (count, pair). After a merge only
   the pieces containing the merged pair are rewritten and only the counts of pairs next to it
   change. Counts only ever drop for existing pairs, so stale heap entries are fixed lazily: a
   popped entry whose count is out of date is pushed back with the current count.

Tie-break rule (documented, and what makes training deterministic): the pair with the highest
count wins; among equal counts the pair with the smallest left token id wins, then the smallest
right token id (ids: bytes are 0-255, merge n makes id 256+n). This is HF ``tokenizers``' rule.
Token bytes must be unique (tiktoken ranks are keyed by bytes): should a pair ever spell the same
bytes as an existing token (two splits of one string; not seen on real corpora, but nothing in
the algorithm rules it out), that pair is skipped. Merging stops when the best pair
occurs fewer than ``min_frequency`` times.
"""

from __future__ import annotations

import heapq
import os
import signal
import warnings
from collections import Counter, defaultdict, deque
from typing import Iterable, Iterator, Sequence

from .char import CharTokenizer
from .errors import SettingError
from .fileio import READ_BYTES, check_errors_handler, check_text_file, read_text_blocks
from .patterns import piece_splitter, resolve_pattern, safe_cut_regex, split_on_specials
from .tokenizer import BPETokenizer

DEFAULT_SPECIAL_TOKENS = ("<|endoftext|>",)
DEFAULT_MIN_FREQUENCY = 1
_PARALLEL_MIN_BYTES = 4 << 20  # smaller corpora are pre-tokenized in-process: a pool costs more than it saves


# ------------------------------------------------------------------------------------ reading
def _safe_chunks(fragments: Iterable[str], pattern: str, size: int = READ_BYTES) -> Iterator[str]:
    """Join the fragments of one document and re-cut it into chunks of about ``size`` characters,
    only where ``pattern`` allows (so the chunks split into exactly the document's pieces)."""
    cut = safe_cut_regex(pattern)
    pending = ""
    search_from = size
    for fragment in fragments:
        pending += fragment
        while len(pending) > search_from:
            m = cut.search(pending, search_from)
            if m is None:  # no cut yet: read on, without searching this stretch again
                search_from = max(size, len(pending) - 2)
                break
            yield pending[: m.end()]
            pending = pending[m.end() :]
            search_from = size
    if pending:
        yield pending


# ------------------------------------------------------------------------------------ counting
def _count_chunk(text: str, pattern: str, special_tokens: Sequence[str]) -> Counter:
    split = piece_splitter(pattern)
    counts: Counter = Counter()
    for part in split_on_specials(text, special_tokens):
        counts.update(split(part))
    return counts


def quiet_worker() -> None:
    """The start of a pool worker: Ctrl-C (SIGINT to the whole process group) is the parent's to
    handle (it stops the pool), and SIGTERM ends the worker silently, as by default, not with the
    handler its parent may have installed. So an interrupt never prints a traceback per worker, and
    never kills a worker in the middle of a task that the parent would then wait for forever."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def count_pieces(chunks: Iterable[str], pattern: str, special_tokens: Sequence[str] = (), workers: int | None = None) -> Counter:
    """How often each piece occurs in ``chunks`` (cut at safe points). ``workers`` processes
    (default: all cores) pre-tokenize; at most two chunks per worker are in flight at once."""
    workers = workers or os.cpu_count() or 1
    chunks = iter(chunks)
    counts: Counter = Counter()
    if workers <= 1:
        for chunk in chunks:
            counts.update(_count_chunk(chunk, pattern, special_tokens))
        return counts
    import multiprocessing

    with multiprocessing.Pool(workers, initializer=quiet_worker) as pool:  # (leaving the block terminates it)
        in_flight: deque = deque()
        for chunk in chunks:
            in_flight.append(pool.apply_async(_count_chunk, (chunk, pattern, tuple(special_tokens))))
            if len(in_flight) >= 2 * workers:
                counts.update(in_flight.popleft().get())
        while in_flight:
            counts.update(in_flight.popleft().get())
    return counts


# ------------------------------------------------------------------------------------ merging
def learn_merges(
    piece_counts: dict[bytes, int],
    n_merges: int,
    *,
    min_frequency: int = DEFAULT_MIN_FREQUENCY,
    progress: bool = False,
) -> list[tuple[int, int]]:
    """Up to ``n_merges`` merges (left id, right id) learned from pieces (bytes -> count).
    Merge n creates token 256+n. See the module docstring for the algorithm and the tie-break."""
    M = 256 + n_merges  # pair key = left * M + right: an int whose order is (left, right)'s
    words: list[list[int]] = []
    freqs: list[int] = []
    for piece, f in piece_counts.items():
        if len(piece) > 1:  # a single byte has no pair and never changes
            words.append(list(piece))
            freqs.append(f)
    pair_counts: defaultdict[int, int] = defaultdict(int)
    where: defaultdict[int, set] = defaultdict(set)
    for w, word in enumerate(words):
        f = freqs[w]
        for a, b in zip(word, word[1:]):
            key = a * M + b
            pair_counts[key] += f
            where[key].add(w)
    heap = [(-c, key) for key, c in pair_counts.items()]
    heapq.heapify(heap)

    vocab = [bytes([i]) for i in range(256)]
    known = set(vocab)
    merges: list[tuple[int, int]] = []
    bar = _progress_bar(n_merges, "merges", progress)
    heappop, heappush = heapq.heappop, heapq.heappush
    while len(merges) < n_merges and heap:
        neg, key = heappop(heap)
        count = pair_counts[key]
        if count != -neg:  # stale: the count dropped since this entry was pushed
            if count > 0:
                heappush(heap, (-count, key))
            continue
        if count < min_frequency:
            break
        a, b = divmod(key, M)
        new_bytes = vocab[a] + vocab[b]
        if new_bytes in known:  # same bytes as an existing token: skip this pair for good
            del pair_counts[key]
            continue
        X = len(vocab)
        vocab.append(new_bytes)
        known.add(new_bytes)
        merges.append((a, b))
        if bar is not None and not len(merges) & 63:
            bar.update(64)

        fresh: defaultdict[int, int] = defaultdict(int)  # counts of the new pairs (all contain X)
        for w in where.pop(key):
            word = words[w]
            occurrences = word.count(a)  # no occurrence: a stale index entry (the word changed)
            if not occurrences:
                continue
            n = len(word)
            f = freqs[w]
            new: list[int] = []
            i = 0  # word[:i] is done (copied into new or merged)
            pos = 0  # where to look for the next a
            for _ in range(occurrences):
                j = word.index(a, pos)
                pos = j + 1
                if j + 1 >= n:
                    break
                if j < i or word[j + 1] != b:  # j < i: this a was the b of the previous merge (a == b)
                    continue
                if j > i:
                    new += word[i:j]
                if new:
                    left = new[-1]
                    if left != X:  # (left, a) is gone; if left is X, the previous merge removed (b, a)
                        pair_counts[left * M + a] -= f
                    k = left * M + X
                    fresh[k] += f
                    where[k].add(w)
                if j + 2 < n:
                    right = word[j + 2]
                    pair_counts[b * M + right] -= f
                    if not (right == a and j + 3 < n and word[j + 3] == b):  # else (X, X) is added next
                        k = X * M + right
                        fresh[k] += f
                        where[k].add(w)
                new.append(X)
                i = j + 2
            if i:  # at least one merge
                if i < n:
                    new += word[i:]
                words[w] = new
        del pair_counts[key]
        pair_counts.update(fresh)  # new pairs only ever grow during their own merge: push them once, final
        for k, c in fresh.items():
            heappush(heap, (-c, k))
    if bar is not None:
        bar.update(len(merges) - bar.n)
        bar.close()
    return merges


def _progress_bar(total: int, unit: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit=f" {unit}", desc=f"bpe: {unit}", dynamic_ncols=True, leave=False)


# ------------------------------------------------------------------------------------ entry points
def check_train_settings(vocab_size: int, special_tokens: Sequence[str], pattern: str = "gpt2",
                         min_frequency: int = DEFAULT_MIN_FREQUENCY) -> None:
    """A SettingError (or, for the pattern, a ValueError) for settings ``train`` would refuse, so that a
    caller can check them before reading any text."""
    minimum = 256 + len(dict.fromkeys(special_tokens))
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < minimum:
        raise SettingError("vocab_size", f"vocab size {vocab_size} is too small: the minimum is {minimum} "
                           f"(256 byte tokens + {len(special_tokens)} special tokens)")
    if not isinstance(min_frequency, int) or isinstance(min_frequency, bool) or min_frequency < 1:
        raise SettingError("min_frequency", f"{{min_frequency}} must be at least 1, got {min_frequency}")
    if any(not isinstance(t, str) or not t for t in special_tokens):
        raise SettingError("special", "{special} needs a non-empty token")
    resolve_pattern(pattern)


def _build(merges, pattern, special_tokens, vocab_size, min_frequency) -> BPETokenizer:
    vocab = [bytes([i]) for i in range(256)]
    for a, b in merges:
        vocab.append(vocab[a] + vocab[b])
    specials = {t: len(vocab) + i for i, t in enumerate(special_tokens)}
    tok = BPETokenizer({t: i for i, t in enumerate(vocab)}, pattern, specials, merges=merges)
    if tok.n_vocab < vocab_size:
        why = "every piece is a single token" if min_frequency <= 1 else f"no pair occurs {min_frequency} or more times"
        warnings.warn(
            f"the corpus only supports a vocabulary of {tok.n_vocab} (asked for {vocab_size}): {why}; "
            "saving the smaller vocabulary",
            stacklevel=3,
        )
    return tok


def _train_on_chunks(chunks, vocab_size, pattern, special_tokens, min_frequency, progress, workers) -> BPETokenizer:
    special_tokens = tuple(dict.fromkeys(special_tokens))
    check_train_settings(vocab_size, special_tokens, pattern, min_frequency)
    counts = count_pieces(chunks, pattern, special_tokens, workers)
    if not counts:
        raise ValueError("the corpus is empty: no text to train on")
    piece_counts: Counter = Counter()
    for piece, n in counts.items():
        piece_counts[piece.encode("utf-8")] += n
    n_merges = vocab_size - 256 - len(special_tokens)
    merges = learn_merges(piece_counts, n_merges, min_frequency=min_frequency, progress=progress)
    return _build(merges, pattern, special_tokens, vocab_size, min_frequency)


def train_from_iterator(
    texts: Iterable[str],
    vocab_size: int,
    *,
    pattern: str = "gpt2",
    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
    min_frequency: int = DEFAULT_MIN_FREQUENCY,
    progress: bool = False,
    workers: int | None = None,
) -> BPETokenizer:
    """Train a byte-level BPE tokenizer on ``texts`` (each one a document). ``vocab_size`` counts
    the 256 bytes, the merges and the special tokens (which get the last ids)."""
    if isinstance(texts, str):
        texts = [texts]
    if progress:
        from tqdm import tqdm

        texts = tqdm(texts, desc="bpe: reading", unit=" texts", leave=False)
    pattern = resolve_pattern(pattern)
    chunks = (c for text in texts for c in _safe_chunks([text], pattern))
    return _train_on_chunks(chunks, vocab_size, pattern, special_tokens, min_frequency, progress, workers)


def train(
    files: Sequence[str | os.PathLike],
    vocab_size: int,
    *,
    pattern: str = "gpt2",
    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
    min_frequency: int = DEFAULT_MIN_FREQUENCY,
    errors: str = "strict",
    progress: bool = True,
    workers: int | None = None,
) -> BPETokenizer:
    """Train on text files (UTF-8; ``errors="replace"`` substitutes invalid bytes), read in blocks.
    ``workers``: pre-tokenization processes; default all cores, or 1 for corpora under 4 MB."""
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    if not files:
        raise ValueError("no corpus files given")
    paths = [check_text_file(p) for p in files]
    check_errors_handler(errors)
    total_bytes = sum(p.stat().st_size for p in paths)
    if workers is None and total_bytes < _PARALLEL_MIN_BYTES:
        workers = 1
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="bpe: reading", leave=False)
    pattern = resolve_pattern(pattern)
    chunks = (c for p in paths for c in _safe_chunks(read_text_blocks(p, errors, bar), pattern))
    try:
        return _train_on_chunks(chunks, vocab_size, pattern, special_tokens, min_frequency, progress, workers)
    finally:
        if bar is not None:
            bar.close()


def train_char(
    texts: Iterable[str], *, special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS
) -> CharTokenizer:
    return CharTokenizer.from_texts(texts, special_tokens)
