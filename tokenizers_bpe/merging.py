"""The merge phase of BPE training, on flat arrays.

Every distinct piece (with its count) is laid end to end in one array of token ids, one slot per
byte, with a doubly linked list (``nxt``/``prv``, -1 at a piece's ends) over the slots still alive: a
merge writes the new id into the left slot, unlinks the right one and marks it dead (-1). An index maps
each adjacent pair to the slots where it starts (compact ``array('i')``s for the pairs of bytes, ranges
of one shared array for the pairs merges make; an entry goes stale when its slot changes and is skipped
when read). Pair counts (weighted by piece counts) live in a dict and a max-heap of (count, pair), one
int per entry; counts of existing pairs only drop, so stale heap entries are fixed lazily: a popped
entry whose count is out of date is pushed back with the current count. The initial counts and index are built with numpy (a sort of all pair keys), or for
small corpora by a Python loop (numpy's import alone is ~14 MB of resident memory).

A merge costs O(its occurrences), never a rescan of the pieces holding them. The result is exactly
that of the word-list algorithm it replaced, tie-break included (see trainer.py's docstring):
tests/tokenizers_bpe/test_trainer.py compares the two on several corpora and settings.
"""

from __future__ import annotations

import heapq
from array import array
from collections import defaultdict
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    import numpy as np

DEFAULT_MIN_FREQUENCY = 1
BYTES_PER_SLOT = 48  # peak memory of the merge phase per byte of the distinct pieces (arrays, index, pairs)
_INDEX_BLOCK = 1 << 20  # slots indexed per numpy sort
# Up to this many slots the arrays and the pair index are built by a Python loop (~0.2 s per million
# slots... measured: 10 MB of mixed text has 0.36 M); above, with numpy's sort (see _arrays_numpy).
PYTHON_INIT_MAX_SLOTS = 2_000_000


class MemoryBudgetError(MemoryError):
    """The merge phase would need more memory than the budget allows."""

    def __init__(self, needed: int, budget: int):
        self.needed, self.budget = needed, budget
        super().__init__(f"the merge phase needs about {needed / 1e6:.0f} MB for the distinct pieces of this corpus, "
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
    """(ids, nxt, prv, freq, pair_counts, where) by a loop over the slots: for small corpora, where
    importing numpy (~14 MB resident, ~0.1 s) costs more than the loop."""
    n = len(buf)
    ids = array("i", list(buf))  # (a bytes initializer would be read as raw int32s)
    nxt, prv = array("i", range(1, n + 1)), array("i", range(-1, n - 1))
    freq = array(freq_type)
    pair_counts: dict[int, int] = {}
    where: defaultdict[int, array] = defaultdict(lambda: array("i"))
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
            where[key].append(slot)
            left = right
        start = end + 1
    return ids, nxt, prv, freq, pair_counts, where


def _arrays_numpy(buf: bytearray, lengths: array, counts: array, freq_type: str, M: int):
    """``_arrays_python``'s result, built with numpy (a sort of all pair keys): for large corpora."""
    import numpy as np  # here, not at the top: forked counting workers then never map numpy (14 MB each)

    ids_np = np.frombuffer(buf, dtype=np.uint8).astype(np.int32)
    lengths_np, counts_np = np.frombuffer(lengths, dtype=np.int64), np.frombuffer(counts, dtype=np.int64)
    n = len(ids_np)
    ends = np.cumsum(lengths_np) - 1
    last = np.zeros(n, dtype=bool)  # the last slot of each piece
    last[ends] = True
    freq_np = np.repeat(counts_np, lengths_np).astype(np.dtype(freq_type))
    pair_counts, where = _index_pairs(ids_np, last, freq_np, M)
    nxt_np = np.arange(1, n + 1, dtype=np.int32)
    nxt_np[ends] = -1
    ids, nxt = _to_array(ids_np), _to_array(nxt_np)
    del nxt_np
    prv_np = np.arange(-1, n - 1, dtype=np.int32)
    prv_np[ends[:-1] + 1] = -1
    prv = _to_array(prv_np)
    freq = _to_array(freq_np, freq_type)
    return ids, nxt, prv, freq, pair_counts, where


def _to_array(a: np.ndarray, typecode: str = "i") -> array:
    import numpy as np

    out = array(typecode)
    out.frombytes(np.ascontiguousarray(a, dtype=np.dtype(typecode)).tobytes())
    return out


def _index_pairs(ids: np.ndarray, last: np.ndarray, freq: np.ndarray, M: int):
    """The count of each adjacent pair (key left * M + right) and the ascending slots where it starts,
    built a block of slots at a time so that the sort's temporaries stay small."""
    import numpy as np

    pair_counts: dict[int, int] = {}
    where: defaultdict[int, array] = defaultdict(lambda: array("i"))
    n = len(ids)
    key_type = np.int32 if M * M < 2**31 else np.int64
    for lo in range(0, n - 1, _INDEX_BLOCK):
        hi = min(lo + _INDEX_BLOCK, n - 1)
        slots = lo + np.flatnonzero(~last[lo:hi])
        keys = ids[slots].astype(key_type) * M + ids[slots + 1]
        order = np.argsort(keys, kind="stable")  # stable: each pair's slots stay ascending
        keys, slots = keys[order], slots[order].astype(np.int32)
        del order
        bounds = np.flatnonzero(np.diff(keys)) + 1
        starts = np.concatenate(([0], bounds))
        totals = np.add.reduceat(freq[slots], starts).tolist() if len(keys) else []
        get = pair_counts.get
        for key, total, group in zip(keys[starts].tolist(), totals, np.split(slots, bounds)):
            pair_counts[key] = get(key, 0) + total
            where[key].frombytes(group.tobytes())
    return pair_counts, where


def learn_merges(
    piece_counts: dict[bytes, int] | Iterable[tuple[bytes, int]],
    n_merges: int,
    *,
    min_frequency: int = DEFAULT_MIN_FREQUENCY,
    progress: bool = False,
    max_bytes: int | None = None,
) -> list[tuple[int, int]]:
    """Up to ``n_merges`` merges (left id, right id) learned from pieces (bytes -> count, or (bytes,
    count) pairs with each piece once). Merge n creates token 256+n. See the module docstring for the
    algorithm and trainer.py's for the tie-break. ``max_bytes``: a MemoryBudgetError, before the
    arrays are built, if they would need more (an estimate of BYTES_PER_SLOT per byte of the pieces)."""
    M = 256 + n_merges  # pair key = left * M + right: an int whose order is (left, right)'s
    items = piece_counts.items() if isinstance(piece_counts, dict) else piece_counts
    buf, lengths, counts = _flat_pieces(items)
    n = len(buf)
    if n >= 2**31 - 1:
        raise ValueError(f"the distinct pieces hold {n} bytes; at most 2**31 - 2 are supported")
    if max_bytes is not None and n * BYTES_PER_SLOT > max_bytes:
        raise MemoryBudgetError(n * BYTES_PER_SLOT, max_bytes)
    freq_type = "i" if not counts or max(counts) < 2**31 else "q"
    build = _arrays_python if n <= PYTHON_INIT_MAX_SLOTS else _arrays_numpy
    ids, nxt, prv, freq, pair_counts, where = build(buf, lengths, counts, freq_type, M)
    del buf, lengths, counts

    # A heap entry is one int, -count * K + key (0 <= key < K): ints order as the tuples (-count, key)
    # would (the highest count first, then the smallest pair), at a third of a tuple's memory.
    K = M * M
    heap = [key - c * K for key, c in pair_counts.items()]
    heapq.heapify(heap)
    vocab = [bytes([i]) for i in range(256)]
    known = set(vocab)
    merges: list[tuple[int, int]] = []
    bar = _progress_bar(n_merges, progress)
    heappop, heappush, get_count = heapq.heappop, heapq.heappush, pair_counts.get
    # The slots of the pairs made by merges, end to end: each such pair's list is written once, when
    # it is made, so ``where`` holds (start << 32 | length) for it instead of an array of its own
    # (a small array object costs ~150 bytes; a corpus of 300 MB makes ~300,000 such pairs).
    made_slots = array("i")
    while len(merges) < n_merges and heap:
        neg, key = divmod(heappop(heap), K)
        count = pair_counts.get(key, 0)
        if count != -neg:  # stale: the count dropped since this entry was pushed
            if count > 0:
                heappush(heap, key - count * K)
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
        fresh_at: defaultdict[int, list] = defaultdict(list)
        # Occurrences are taken left to right, as the order of the neighbours' updates requires: every
        # index list is ascending (built sorted; a pair is only ever made by one merge, that of its
        # newer token, which appends its slots in the ascending order it takes them in).
        at = where.pop(key)
        if type(at) is int:  # a pair made by a merge: its slots are a range of made_slots
            start = at >> 32
            at = made_slots[start : start + (at & 0xFFFFFFFF)]
        for p in at:
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
                            where.pop(k, None)
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
                        where.pop(k, None)
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
                heappush(heap, k - c * K)
                slots = fresh_at[k]
                where[k] = len(made_slots) << 32 | len(slots)
                made_slots.extend(slots)
    if bar is not None:
        bar.update(len(merges) - bar.n)
        bar.close()
    return merges


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit=" merges", desc="bpe: merges", dynamic_ncols=True, leave=False)
