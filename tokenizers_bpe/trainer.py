"""Incremental byte-level BPE training.

1. Pre-tokenize: split the text on special tokens, then into pieces with the pattern regex, and
   count each distinct piece once (in parallel over chunks; memory grows with the number of
   distinct pieces, not with the corpus). Files are read a block at a time and cut into chunks
   only at line ends between two non-space characters (patterns.safe_cut_regex), which gives
   exactly the pieces of one scan for the gpt2/gpt4 patterns; a custom pattern should not match
   across such a newline. Each file, and each text given to train_from_iterator, is a document.
2. Merge (merging.py): the distinct pieces laid out in one flat array of ids with a linked list
   over it, the count of every adjacent token pair (weighted by piece frequency), an index from each
   pair to the slots where it occurs, and a max-heap of (count, pair). A merge touches only its own
   occurrences and the counts of the pairs next to them.

Tie-break rule (documented, and what makes training deterministic): the pair with the highest
count wins; among equal counts the pair with the smallest left token id wins, then the smallest
right token id (ids: bytes are 0-255, merge n makes id 256+n). This is HF ``tokenizers``' rule.
Token bytes must be unique (tiktoken ranks are keyed by bytes): should a pair ever spell the same
bytes as an existing token (two splits of one string; not seen on real corpora, but nothing in
the algorithm rules it out), that pair is skipped. Merging stops when the best pair
occurs fewer than ``min_frequency`` times.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
import warnings
from collections import Counter, deque
from typing import Iterable, Iterator, Sequence

from .char import CharTokenizer
from .errors import SettingError, byte_size, is_unicode
from .membudget import MemoryPlan, plan_memory, release_free_memory
from .merging import DEFAULT_MIN_FREQUENCY, MemoryBudgetError, learn_merges
from .fileio import MAX_VOCAB_SIZE, READ_BYTES, check_errors_handler, check_text_file, read_text_blocks
from .locks import signals_held
from .patterns import piece_splitter, resolve_pattern, safe_cut_regex, split_on_specials
from .spill import PieceSpill
from .tokenizer import MAX_SPECIAL_TOKENS, BPETokenizer

DEFAULT_SPECIAL_TOKENS = ("<|endoftext|>",)
# Smaller corpora are pre-tokenized in-process by default: a pool costs more than it saves. At 10 MB of
# mixed text (2-core Xeon, vocabulary 16384) two workers took 1.24 s against 1.43 s in-process, for
# 82 MB of peak memory (the workers' included) against 56 MB.
_PARALLEL_MIN_BYTES = 16 << 20


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


_process_ending = False  # set (in the parent) by no_more_workers; a worker forked after it sees it


def no_more_workers() -> None:
    """The process is ending (its work interrupted or failed): a pool worker started from now on exits
    at once, before it takes a task. A pool's own thread replaces the workers the ending kills; a
    replacement that took a task after its parent had gone printed a BrokenPipeError traceback (the
    result had no reader) onto the command's stderr."""
    global _process_ending
    _process_ending = True


def _no_fork_while_ending() -> None:
    """Run before every fork: once the process is ending, a pool's own thread may not fork a
    replacement for a worker the ending killed. Each replacement exited at once and was replaced
    again, so the ending never found its workers gone and left the last ones behind; the thread now
    waits here until the process exits (the main thread, which ends it, does not fork)."""
    if _process_ending and threading.current_thread() is not threading.main_thread():
        threading.Event().wait()


os.register_at_fork(before=_no_fork_while_ending)


def quiet_worker() -> None:
    """The start of a pool worker: it leaves its parent's process group, so that Ctrl-C or a SIGTERM
    sent to the command's group reaches the parent alone, which stops the pool (Pool.terminate takes
    the pool's queue locks before it ends the workers); SIGINT is ignored and SIGTERM, the parent's
    way of ending a worker, has its default action (not the handler the parent may have installed).
    A worker killed by a group signal at an arbitrary point left a queue locked or a result
    half-written, and the parent waited for it forever; neither can happen now, and no worker prints
    a traceback."""
    if _process_ending:
        os._exit(0)
    try:
        os.setpgid(0, 0)
    except OSError:
        pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})  # (held back while forked)
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_end_with_parent, args=(parent.pid,), daemon=True).start()


def _end_with_parent(parent_pid: int) -> None:
    """A worker ends itself once its parent is gone. Out of its group, no signal to the command reaches
    it, and the pool's own thread may fork a replacement for a worker an interrupt killed just as the
    command exits: that one waited on the task queue for ever, holding the command's stdout and stderr."""
    while os.getppid() == parent_pid:
        time.sleep(0.2)
    os._exit(0)


def start_pool(pool_factory):
    """``pool_factory()`` (a multiprocessing Pool whose initializer calls quiet_worker) with SIGINT and
    SIGTERM held back while it forks its workers: one that arrived during a fork ran its handler inside
    the fork's callbacks, where the KeyboardInterrupt was printed as an ignored exception and lost (the
    command then ran on). Held back, it is handled as soon as the workers exist."""
    with signals_held():
        try:
            return pool_factory()
        except OSError as e:  # (ulimit -n or -u reached)
            error = OSError(e.errno, e.strerror)
    # Raised anew, out of the except block: its traceback held the half-made pool's frames and so its
    # pipes, which left no file descriptor to remove the failed run's directory with.
    raise error


def count_pieces(chunks: Iterable[str], pattern: str, special_tokens: Sequence[str] = (), workers: int | None = None,
                 spill: PieceSpill | None = None) -> Counter:
    """How often each piece occurs in ``chunks`` (cut at safe points). ``workers`` processes
    (default: all cores) pre-tokenize; at most two chunks per worker are in flight at once (one with a
    ``spill``, which takes the counts whenever they outgrow its budget: then the returned Counter holds
    only the counts since its last run)."""
    workers = workers or os.cpu_count() or 1
    chunks = iter(chunks)
    counts: Counter = Counter()

    def add(chunk_counts: Counter) -> None:
        counts.update(chunk_counts)
        if spill is not None and spill.over_budget(counts):
            spill.write_run(counts)

    if workers <= 1:
        for chunk in chunks:
            add(_count_chunk(chunk, pattern, special_tokens))
        return counts
    import multiprocessing

    with start_pool(lambda: multiprocessing.Pool(workers, initializer=quiet_worker)) as pool:  # (leaving the block terminates it)
        in_flight: deque = deque()
        for chunk in chunks:
            in_flight.append(pool.apply_async(_count_chunk, (chunk, pattern, tuple(special_tokens))))
            if len(in_flight) >= (1 if spill is not None else 2) * workers:
                add(in_flight.popleft().get())
        while in_flight:
            add(in_flight.popleft().get())
    return counts


def _progress_bar(total: int, unit: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit=f" {unit}", desc=f"bpe: {unit}", dynamic_ncols=True, leave=False)


# ------------------------------------------------------------------------------------ entry points
def check_train_settings(vocab_size: int, special_tokens: Sequence[str], pattern: str = "gpt2",
                         min_frequency: int = DEFAULT_MIN_FREQUENCY, max_memory: int | None = None) -> None:
    """A SettingError (or, for the pattern, a ValueError) for settings ``train`` would refuse, so that a
    caller can check them before reading any text."""
    minimum = 256 + len(dict.fromkeys(special_tokens))
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < minimum:
        raise SettingError("vocab_size", f"vocab size {vocab_size} is too small: the minimum is {minimum} "
                           f"(256 byte tokens + {len(special_tokens)} special tokens)")
    if vocab_size > MAX_VOCAB_SIZE:
        raise SettingError("vocab_size", f"vocab size {vocab_size:,} is too large: the maximum is {MAX_VOCAB_SIZE:,}")
    if not isinstance(min_frequency, int) or isinstance(min_frequency, bool) or min_frequency < 1:
        raise SettingError("min_frequency", f"{{min_frequency}} must be at least 1, got {min_frequency}")
    if any(not isinstance(t, str) or not t for t in special_tokens):
        raise SettingError("special", "{special} needs a non-empty token")
    if not all(map(is_unicode, special_tokens)):
        raise SettingError("special", f"{{special}} {next(t for t in special_tokens if not is_unicode(t))!r} is not valid "
                                      "UTF-8 text (a byte of another encoding); give the token in UTF-8")
    if len(dict.fromkeys(special_tokens)) > MAX_SPECIAL_TOKENS:
        raise SettingError("special", f"{len(dict.fromkeys(special_tokens)):,} special tokens ({{special}}), more than a "
                                      f"tokenizer can use ({MAX_SPECIAL_TOKENS:,})")
    if max_memory is not None and (not isinstance(max_memory, int) or isinstance(max_memory, bool) or max_memory <= 0):
        raise SettingError("max_memory", f"{{max_memory}} must be a positive number of bytes, got {max_memory!r}")
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


def _drain_encoded(counts: dict[str, int]) -> Iterator[tuple[bytes, int]]:
    """(UTF-8 bytes, count) of each piece, emptying ``counts`` as it goes (its strings are freed while
    the flat arrays of the merge phase are built; the order of the pieces changes no merge)."""
    while counts:
        piece, n = counts.popitem()
        yield piece.encode("utf-8"), n


MAX_WORKERS_PER_CORE = 4  # more processes than this only thrash (and each takes memory)


def _plan(vocab_size, pattern, special_tokens, min_frequency, workers, max_memory) -> MemoryPlan | None:
    """Every setting checked (the budget too) before any text is read or any progress bar shown."""
    check_train_settings(vocab_size, special_tokens, pattern, min_frequency, max_memory)
    most = MAX_WORKERS_PER_CORE * (os.cpu_count() or 1)
    if workers is not None and (not isinstance(workers, int) or isinstance(workers, bool) or not 1 <= workers <= most):
        raise SettingError("workers", f"{{workers}} must be an integer from 1 to {most} ({MAX_WORKERS_PER_CORE} per core), got {workers!r}")
    return None if max_memory is None else plan_memory(max_memory, workers or os.cpu_count() or 1)


def _train_on_chunks(chunks, vocab_size, pattern, special_tokens, min_frequency, progress, workers,
                     max_memory=None, spill_dir=None, budget=None) -> BPETokenizer:
    special_tokens = tuple(dict.fromkeys(special_tokens))
    n_merges = vocab_size - 256 - len(special_tokens)
    if max_memory is None:
        counts = count_pieces(chunks, pattern, special_tokens, workers)
        if not counts:
            raise ValueError("the corpus is empty: no text to train on")
        merges = learn_merges(_drain_encoded(counts), n_merges, min_frequency=min_frequency, progress=progress)
        return _build(merges, pattern, special_tokens, vocab_size, min_frequency)
    with PieceSpill(budget.counts, spill_dir) as spill:
        counts = count_pieces(chunks, pattern, special_tokens, budget.workers, spill)
        if not counts and not spill.runs:
            raise ValueError("the corpus is empty: no text to train on")
        items = spill.merged(counts, progress) if spill.runs else _drain_encoded(counts)
        release_free_memory()
        try:
            merges = learn_merges(items, n_merges, min_frequency=min_frequency, progress=progress, max_bytes=budget.merges,
                                  scratch_dir=spill.dir, rss_limit=budget.resident)
        except MemoryBudgetError as e:
            raise SettingError("max_memory", f"{{max_memory}} {byte_size(max_memory)} is too small: {e}; "
                               f"give at least {(e.needed + max_memory - budget.merges) / 1e6:.0f} MB") from None
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
    max_memory: int | None = None,
    spill_dir: str | os.PathLike | None = None,
) -> BPETokenizer:
    """Train a byte-level BPE tokenizer on ``texts`` (each one a document). ``vocab_size`` counts
    the 256 bytes, the merges and the special tokens (which get the last ids). ``max_memory``: a
    budget in bytes for this process and its workers, see ``train``."""
    if isinstance(texts, str):
        texts = [texts]
    budget = _plan(vocab_size, pattern, special_tokens, min_frequency, workers, max_memory)
    if progress:
        from tqdm import tqdm

        texts = tqdm(texts, desc="bpe: reading", unit=" texts", leave=False)
    pattern = resolve_pattern(pattern)
    chunks = (c for text in texts for c in _safe_chunks([text], pattern))
    return _train_on_chunks(chunks, vocab_size, pattern, special_tokens, min_frequency, progress, workers,
                            max_memory, spill_dir, budget)


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
    max_memory: int | None = None,
    spill_dir: str | os.PathLike | None = None,
) -> BPETokenizer:
    """Train on text files (UTF-8; ``errors="replace"`` substitutes invalid bytes), read in blocks.
    ``workers``: pre-tokenization processes; default all cores, or 1 for corpora under 16 MB.
    ``max_memory``: a budget in bytes for the resident memory of this process and its workers; piece
    counts that outgrow it are spilled to disk under ``spill_dir`` (default $TMPDIR) and merged at the
    end (spill.py says how much disk that takes), for exactly the tokenizer of an unbounded run."""
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    if not files:
        raise ValueError("no corpus files given")
    paths = [check_text_file(p) for p in files]
    check_errors_handler(errors)
    total_bytes = sum(p.stat().st_size for p in paths)
    if workers is None and total_bytes < _PARALLEL_MIN_BYTES:
        workers = 1
    budget = _plan(vocab_size, pattern, special_tokens, min_frequency, workers, max_memory)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="bpe: reading", leave=False)
    pattern = resolve_pattern(pattern)
    chunks = _closing_bar((c for p in paths for c in _safe_chunks(read_text_blocks(p, errors, bar), pattern)), bar)
    try:
        return _train_on_chunks(chunks, vocab_size, pattern, special_tokens, min_frequency, progress, workers,
                                max_memory, spill_dir, budget)
    finally:
        if bar is not None:
            bar.close()


def _closing_bar(chunks: Iterator[str], bar) -> Iterator[str]:
    """``chunks``, with the reading bar closed once they are all read: the merges' bar takes its line
    (two bars at once leave cursor movements in a log)."""
    yield from chunks
    if bar is not None:
        bar.close()


def train_char(
    texts: Iterable[str], *, special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS
) -> CharTokenizer:
    return CharTokenizer.from_texts(texts, special_tokens)
