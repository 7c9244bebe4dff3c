"""The merge phase of BPE training, on flat arrays.

Every distinct piece (with its count) is laid end to end in one array of token ids, one slot per
byte, with a doubly linked list (``nxt``/``prv``, -1 at a piece's ends) over the slots still alive: a
merge writes the new id into the left slot, unlinks the right one and marks it dead (-1). One index
array holds, for each adjacent pair, the ascending slots where it starts, as one run: the pairs of
bytes first (built by a counting sort), then each pair a merge makes, appended when it is made (a pair
is made by one merge only, that of its newer token); an entry goes stale when its slot changes and is
skipped when read. Pair counts (weighted by piece counts) live in a dict and a max-heap of (count,
pair), one int per entry that also carries the pair's run; counts of existing pairs only drop, so
stale heap entries are fixed lazily: a popped entry whose count is out of date is pushed back with the
current count. A pair made rarer than min_frequency is left out: it could only get rarer. The arrays
are built with numpy, or for small corpora by a Python loop (numpy's import alone is ~14 MB of
resident memory); in a memory budget they are mapped from a scratch file (scratch.py).

A merge costs O(its occurrences), never a rescan of the pieces holding them. The result is exactly
that of the word-list algorithm it replaced, tie-break included (see trainer.py's docstring):
tests/tokenizers_bpe/test_trainer.py compares the two on several corpora and settings.
"""

from __future__ import annotations

import functools
import heapq
import os
from array import array
from collections import defaultdict
from typing import Iterable

from .membudget import current_rss
from .scratch import ScratchArrays

DEFAULT_MIN_FREQUENCY = 1
BYTES_PER_SLOT = 48  # peak memory of the merge phase per byte of the distinct pieces (arrays, index, pairs)
# With the arrays mapped from a file, what stays resident in any case: the pieces' bytes, lengths and
# counts (the pair counts and the heap come on top, watched while merging)
MIN_RESIDENT_BYTES_PER_SLOT = 5
_INDEX_BLOCK = 1 << 20  # slots indexed per numpy sort
# Occurrences of a merge between two looks at the resident memory in a budget (each touches a few
# pages at most: ~5 MB of mapped pages between two looks at worst)
_OCCURRENCES_PER_CHECK = 256
_RUN = (1 << 64) - 1  # the low bits of a heap entry: its pair's run in the index
# Up to this many slots the arrays and the pair index are built by a Python loop (~0.2 s per million
# slots... measured: 10 MB of mixed text has 0.36 M); above, with numpy's sort (see _arrays_numpy).
PYTHON_INIT_MAX_SLOTS = 2_000_000


class MemoryBudgetError(MemoryError):
    """The merge phase would need more memory than the budget allows."""

    def __init__(self, needed: int, budget: int, what: str = "the distinct pieces of this corpus"):
        self.needed, self.budget = needed, budget
        super().__init__(f"the merge phase needs about {needed / 1e6:.0f} MB for {what}, "
                         f"more than the {budget / 1e6:.0f} MB left of the memory budget")


def _flat_pieces(piece_counts: Iterable[tuple[bytes, int]]) -> tuple[bytearray, array, array]:
    """(bytes, piece lengths, piece counts) of the pieces longer than one byte (a single byte has no
    pair and never changes), gathered without a Python object per piece."""
    buf, lengths, counts = bytearray(), array("q"), array("q")
    for piece, n in piece_counts:
        if len(piece) > 1:
            buf += piece
            lengths.append(len(piece))
            counts.append(n)
    return buf, lengths, counts


def _arrays_python(buf: bytearray, lengths: array, counts: array, freq_type: str, M: int):
    """(ids, nxt, prv, freq, index, pair_counts, where) by a loop over the slots: for small corpora,
    where importing numpy (~14 MB resident, ~0.1 s) costs more than the loop. ``index`` holds each
    pair's slots (ascending) in one run, ``where`` maps the pair to its run (start << 32 | length)."""
    n = len(buf)
    ids = array("i", list(buf))  # (a bytes initializer would be read as raw int32s)
    nxt, prv = array("i", range(1, n + 1)), array("i", range(-1, n - 1))
    freq = array(freq_type)
    pair_counts: dict[int, int] = {}
    slots: defaultdict[int, array] = defaultdict(lambda: array("i"))
    get = pair_counts.get
    start = 0
    for length, count in zip(lengths, counts):
        end = start + length - 1
        nxt[end], prv[start] = -1, -1
        freq.extend(array(freq_type, (count,)) * length)
        left = ids[start]
        for slot in range(start, end):  # ascending slots: each pair's index list is built sorted
            right = ids[slot + 1]
            key = left * M + right
            pair_counts[key] = get(key, 0) + count
            slots[key].append(slot)
            left = right
        start = end + 1
    index, where = array("i"), {}
    for key, run in slots.items():
        where[key] = len(index) << 32 | len(run)
        index.extend(run)
    return ids, nxt, prv, freq, index, pair_counts, where


def _arrays_numpy(buf: bytearray, lengths: array, counts: array, freq_type: str, M: int, scratch=None):
    """``_arrays_python``'s result, built with numpy block by block (so that temporaries stay small):
    for large corpora. The arrays are numpy arrays in memory, or views of ``scratch`` (a ScratchArrays
    directory) for a memory budget; the loop reads them through memoryviews."""
    import numpy as np  # here, not at the top: forked counting workers then never map numpy (14 MB each)

    n = len(buf)
    layout = {"ids": (n, "i"), "nxt": (n, "i"), "prv": (n, "i"), "freq": (n, freq_type), "index": (3 * n, "i")}
    if scratch is not None:
        store = scratch(layout)
        ids, nxt, prv, freq, index = (store.numpy(name) for name in layout)
        written = store.drop_resident  # each step's pages leave the resident memory as soon as written
    else:
        store = None
        ids, nxt, prv, freq, index = (np.empty(length, np.dtype(t)) for length, t in layout.values())
        written = lambda: None  # noqa: E731
    # (index: 3n entries, the n - 1 initial pairs at most and two new ones per slot merged away at most;
    # np.empty's pages are only committed where they are written)
    data = np.frombuffer(buf, dtype=np.uint8)
    lengths_np, counts_np = np.frombuffer(lengths, dtype=np.int64), np.frombuffer(counts, dtype=np.int64)
    ends = np.cumsum(lengths_np) - 1  # the last slot of each piece
    ids[:] = data
    written()
    first = 0
    for p0 in range(0, len(lengths_np), _INDEX_BLOCK):  # the pieces' counts, on each of their slots
        p1 = min(p0 + _INDEX_BLOCK, len(lengths_np))
        last = int(ends[p1 - 1]) + 1
        freq[first:last] = np.repeat(counts_np[p0:p1], lengths_np[p0:p1])
        first = last
        written()
    for lo in range(0, n, _INDEX_BLOCK):
        hi = min(lo + _INDEX_BLOCK, n)
        nxt[lo:hi] = np.arange(lo + 1, hi + 1, dtype=np.int32)
        prv[lo:hi] = np.arange(lo - 1, hi - 1, dtype=np.int32)
        written()
    nxt[ends] = -1
    prv[ends[:-1] + 1] = -1
    prv[0] = -1
    written()
    last_slot = np.zeros(n, dtype=bool)
    last_slot[ends] = True
    del ends

    # Every slot but a piece's last starts a pair of two bytes (key b1 * 256 + b2 < 65536): a counting
    # sort by that key, block by block, puts each pair's slots in one ascending run of ``index``.
    def blocks():
        for lo in range(0, n, _INDEX_BLOCK):
            hi = min(lo + _INDEX_BLOCK, n)
            slots = lo + np.flatnonzero(~last_slot[lo:hi])
            yield slots, data[slots].astype(np.int32) << 8 | data[slots + 1]

    runs = np.zeros(65536, dtype=np.int64)
    totals = np.zeros(65536, dtype=np.int64)
    for slots, keys in blocks():
        runs += np.bincount(keys, minlength=65536)
        totals += np.bincount(keys, weights=freq[slots], minlength=65536).astype(np.int64)  # (exact: < 2**53)
    starts = np.concatenate(([0], np.cumsum(runs)[:-1]))
    fill = starts.copy()
    for slots, keys in blocks():
        order = np.argsort(keys, kind="stable")  # stable: each pair's slots stay ascending
        keys, slots = keys[order], slots[order]
        group = np.flatnonzero(np.diff(keys)) + 1
        heads = np.concatenate(([0], group))
        rank = np.arange(len(keys)) - np.repeat(heads, np.diff(np.concatenate((heads, [len(keys)]))))
        index[fill[keys] + rank] = slots
        np.add.at(fill, keys[heads], np.diff(np.concatenate((heads, [len(keys)]))))
        written()
    present = np.flatnonzero(runs).tolist()
    pair_keys = [(k >> 8) * M + (k & 255) for k in present]
    pair_counts = dict(zip(pair_keys, totals[present].tolist()))
    where = {key: start << 32 | length for key, start, length in zip(pair_keys, starts[present].tolist(), runs[present].tolist())}
    views = [memoryview(a) if store is None else store.view(name) for name, a in zip(layout, (ids, nxt, prv, freq, index))]
    return (*views, pair_counts, where, store, int(runs.sum()))


def learn_merges(
    piece_counts: dict[bytes, int] | Iterable[tuple[bytes, int]],
    n_merges: int,
    *,
    min_frequency: int = DEFAULT_MIN_FREQUENCY,
    progress: bool = False,
    max_bytes: int | None = None,
    scratch_dir: str | os.PathLike | None = None,
    rss_limit: int | None = None,
) -> list[tuple[int, int]]:
    """Up to ``n_merges`` merges (left id, right id) learned from pieces (bytes -> count, or (bytes,
    count) pairs with each piece once). Merge n creates token 256+n. See the module docstring for the
    algorithm and trainer.py's for the tie-break.

    In memory by default. For a memory budget: ``scratch_dir`` maps the per-slot arrays from a file
    there (scratch.py) and ``rss_limit`` is the resident memory above which their pages are dropped;
    ``max_bytes``, the bytes the merge phase may take, is checked against an estimate before the
    arrays are built (MemoryBudgetError), and the resident memory while merging is too (the pair
    counts and the heap stay in memory)."""
    M = 256 + n_merges  # pair key = left * M + right: an int whose order is (left, right)'s
    items = piece_counts.items() if isinstance(piece_counts, dict) else piece_counts
    buf, lengths, counts = _flat_pieces(items)
    n = len(buf)
    if n >= 2**31 - 1:
        raise ValueError(f"the distinct pieces hold {n} bytes; at most 2**31 - 2 are supported")
    per_slot = BYTES_PER_SLOT if scratch_dir is None else MIN_RESIDENT_BYTES_PER_SLOT
    if max_bytes is not None and n * per_slot > max_bytes:
        raise MemoryBudgetError(n * per_slot, max_bytes)
    freq_type = "i" if not counts or max(counts) < 2**31 else "q"
    store = None
    if scratch_dir is None and n <= PYTHON_INIT_MAX_SLOTS:
        ids, nxt, prv, freq, index, pair_counts, where = _arrays_python(buf, lengths, counts, freq_type, M)
        top = len(index)
    else:
        scratch = None if scratch_dir is None else functools.partial(ScratchArrays, scratch_dir)
        ids, nxt, prv, freq, index, pair_counts, where, store, top = _arrays_numpy(buf, lengths, counts, freq_type, M,
                                                                                   scratch)
    del buf, lengths, counts
    # A heap entry is one int, (-count * K + key) << 64 | run (0 <= key < K; run: where the pair's
    # slots are in ``index``, start << 32 | length): ints order as the tuples (-count, key) would (the
    # highest count first, then the smallest pair), at a third of a tuple's memory, and the run rides
    # along (a pair's run never changes), so no table of runs is kept.
    K = M * M
    heap = [(key - c * K) << 64 | where[key] for key, c in pair_counts.items()]
    del where
    limit = None if store is None or rss_limit is None else (rss_limit, max_bytes or 0)
    try:
        return _merge(ids, nxt, prv, freq, index, top, pair_counts, heap, M, n_merges, min_frequency, progress,
                      store, limit)
    finally:
        del ids, nxt, prv, freq, index
        if store is not None:
            store.close()


def _merge(ids, nxt, prv, freq, index, top, pair_counts, heap, M, n_merges, min_frequency, progress, store, limit):
    """The merge loop (see the module docstring) over the arrays the builders made; ``index[top:]`` is
    free. ``limit``: (resident bytes above which the mapped arrays' pages are dropped, the bytes the
    merge phase may take), for a ScratchArrays ``store``."""
    K = M * M  # (heap entries: see learn_merges)
    heapq.heapify(heap)
    vocab = [bytes([i]) for i in range(256)]
    known = set(vocab)
    merges: list[tuple[int, int]] = []
    bar = _progress_bar(n_merges, progress)
    heappop, heappush, get_count = heapq.heappop, heapq.heappush, pair_counts.get
    # The slots of the pairs merges make go on at the end of ``index``: each such pair's list is
    # written once, when it is made (a pair is made by one merge only, that of its newer token).
    if store is not None:
        store.drop_resident()  # (what building them made resident)
    while len(merges) < n_merges and heap:
        entry = heappop(heap)
        neg, key = divmod(entry >> 64, K)
        count = pair_counts.get(key, 0)
        if count != -neg:  # stale: the count dropped since this entry was pushed
            if count > 0:
                heappush(heap, (key - count * K) << 64 | entry & _RUN)
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
        fresh_at: defaultdict[int, array] = defaultdict(lambda: array("i"))
        # Occurrences are taken left to right, as the order of the neighbours' updates requires: every
        # index list is ascending (built sorted; a pair is only ever made by one merge, that of its
        # newer token, which appends its slots in the ascending order it takes them in).
        start = entry >> 32 & 0xFFFFFFFF
        end = start + (entry & 0xFFFFFFFF)
        for chunk in range(start, end, _OCCURRENCES_PER_CHECK):
            if limit is not None:
                _keep_under(limit, store)
            for p in index[chunk : min(chunk + _OCCURRENCES_PER_CHECK, end)]:
                if ids[p] != a:  # stale: the slot was merged or absorbed since
                    continue
                q = nxt[p]
                if q < 0 or ids[q] != b:
                    continue
                f = freq[p]
                left_slot = prv[p]
                if left_slot >= 0:
                    left = ids[left_slot]
                    if left != X:  # (left, a) is gone; if left is X, the previous merge removed (b, a)
                        k = left * M + a
                        c = get_count(k)
                        if c is not None:  # (None: a pair left out as too rare)
                            c -= f
                            if c:
                                pair_counts[k] = c
                            elif k != key:  # a pair no longer anywhere: forget it (its heap entries go stale)
                                del pair_counts[k]
                            else:
                                pair_counts[k] = 0
                    k = left * M + X
                    fresh[k] += f
                    fresh_at[k].append(left_slot)
                r = nxt[q]
                if r >= 0:
                    right = ids[r]
                    k = b * M + right
                    c = get_count(k)
                    if c is not None:
                        c -= f
                        if c:
                            pair_counts[k] = c
                        elif k != key:
                            del pair_counts[k]
                        else:
                            pair_counts[k] = 0
                    r2 = nxt[r]
                    if not (right == a and r2 >= 0 and ids[r2] == b):  # else (X, X) is added next
                        k = X * M + right
                        fresh[k] += f
                        fresh_at[k].append(p)
                    prv[r] = p
                ids[p] = X
                nxt[p] = r
                ids[q] = -1
        del pair_counts[key]
        # New pairs only ever grow during their own merge and only drop after it: each is pushed once,
        # final, and one rarer than min_frequency can never be merged, so it is left out altogether.
        for k, c in fresh.items():
            if c >= min_frequency:
                pair_counts[k] = c
                slots = fresh_at[k]
                heappush(heap, (k - c * K) << 64 | top << 32 | len(slots))
                index[top : top + len(slots)] = slots  # (on an array('i'), at its end: appended)
                top += len(slots)
    if bar is not None:
        bar.update(len(merges) - bar.n)
        bar.close()
    return merges


def _keep_under(limit: tuple[int, int], store: ScratchArrays) -> None:
    """Drop the mapped arrays' pages when the resident memory is over ``limit[0]``; a MemoryBudgetError if
    what stays resident (the pair counts and the heap) is over it alone (``limit[1]``: the merge phase's
    share of the budget, for the message)."""
    if current_rss() > limit[0]:
        store.drop_resident()
        rss = current_rss()
        if rss > limit[0]:
            raise MemoryBudgetError(rss - limit[0] + limit[1], limit[1], "its pair counts")


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit=" merges", desc="bpe: merges", dynamic_ncols=True, leave=False)
