"""The merge phase of BPE training, on flat arrays.

Every distinct piece (with its count) is laid end to end in one array of token ids, one slot per
byte, with a doubly linked list (``nxt``/``prv``, -1 at a piece's ends) over the slots still alive: a
merge writes the new id into the left slot, unlinks the right one and marks it dead (-1). An index maps
each adjacent pair to the slots where it starts (compact ``array('i')``s, appended to as merges make
new pairs; an entry goes stale when its slot changes and is skipped when read). Pair counts (weighted
by piece counts) live in a dict and a max-heap of (count, pair); counts of existing pairs only drop,
so stale heap entries are fixed lazily: a popped entry whose count is out of date is pushed back with
the current count. The initial counts and index are built with numpy (a sort of all pair keys).

A merge costs O(its occurrences), never a rescan of the pieces holding them. The result is exactly
that of the word-list algorithm it replaced, tie-break included (see trainer.py's docstring):
tests/tokenizers_bpe/test_trainer.py compares the two on several corpora and settings.
"""

from __future__ import annotations

import heapq
from array import array
from collections import defaultdict
from typing import Iterable

import numpy as np

DEFAULT_MIN_FREQUENCY = 1


def _flat_pieces(piece_counts: Iterable[tuple[bytes, int]]):
    """(ids, counts per slot, starts of each piece's slots) for the pieces longer than one byte (a
    single byte has no pair and never changes)."""
    pieces, counts = [], []
    for piece, n in piece_counts:
        if len(piece) > 1:
            pieces.append(piece)
            counts.append(n)
    lengths = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
    ids = np.frombuffer(b"".join(pieces), dtype=np.uint8).astype(np.int32)
    del pieces
    freq = np.repeat(np.asarray(counts, dtype=np.int64), lengths)
    starts = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    return ids, freq, starts, lengths


def _int32_array(a: np.ndarray) -> array:
    out = array("i")
    out.frombytes(np.ascontiguousarray(a, dtype=np.int32).tobytes())
    return out


def learn_merges(
    piece_counts: dict[bytes, int] | Iterable[tuple[bytes, int]],
    n_merges: int,
    *,
    min_frequency: int = DEFAULT_MIN_FREQUENCY,
    progress: bool = False,
) -> list[tuple[int, int]]:
    """Up to ``n_merges`` merges (left id, right id) learned from pieces (bytes -> count, or (bytes,
    count) pairs with each piece once). Merge n creates token 256+n. See the module docstring for the
    algorithm and trainer.py's for the tie-break."""
    M = 256 + n_merges  # pair key = left * M + right: an int whose order is (left, right)'s
    items = piece_counts.items() if isinstance(piece_counts, dict) else piece_counts
    ids_np, freq_np, starts, lengths = _flat_pieces(items)
    n = len(ids_np)
    if n >= 2**31 - 1:
        raise ValueError(f"the distinct pieces hold {n} bytes; at most 2**31 - 2 are supported")
    last = np.zeros(n, dtype=bool)  # the last slot of each piece
    last[starts + lengths - 1] = True
    nxt_np = np.arange(1, n + 1, dtype=np.int64)
    nxt_np[last] = -1
    prv_np = np.arange(-1, n - 1, dtype=np.int64)
    prv_np[starts] = -1

    pair_counts: dict[int, int] = {}
    where: defaultdict[int, array] = defaultdict(lambda: array("i"))
    if n:
        slots = np.flatnonzero(~last)
        keys = ids_np[slots].astype(np.int64) * M + ids_np[slots + 1]
        order = np.argsort(keys, kind="stable")  # stable: each pair's slots stay in ascending order
        keys, slots = keys[order], slots[order]
        bounds = np.flatnonzero(np.diff(keys)) + 1
        group_starts = np.concatenate(([0], bounds))
        totals = np.add.reduceat(freq_np[slots], group_starts) if len(keys) else np.zeros(0, np.int64)
        for key, total, group in zip(keys[group_starts].tolist(), totals.tolist(), np.split(slots, bounds)):
            pair_counts[key] = total
            where[key] = _int32_array(group)
        del keys, order, slots, bounds, group_starts, totals
    ids, nxt, prv = _int32_array(ids_np), _int32_array(nxt_np), _int32_array(prv_np)
    freq = array("q", freq_np.tobytes())
    del ids_np, nxt_np, prv_np, freq_np, starts, lengths, last

    heap = [(-c, key) for key, c in pair_counts.items()]
    heapq.heapify(heap)
    vocab = [bytes([i]) for i in range(256)]
    known = set(vocab)
    merges: list[tuple[int, int]] = []
    bar = _progress_bar(n_merges, progress)
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
        fresh_at: defaultdict[int, list] = defaultdict(list)
        # Occurrences are taken left to right, as the order of the neighbours' updates requires: every
        # index list is ascending (built sorted; a pair is only ever made by one merge, that of its
        # newer token, which appends its slots in the ascending order it takes them in).
        for p in where.pop(key):
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
                    pair_counts[left * M + a] -= f
                k = left * M + X
                fresh[k] += f
                fresh_at[k].append(left_slot)
            r = nxt[q]
            if r >= 0:
                right = ids[r]
                pair_counts[b * M + right] -= f
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
        pair_counts.update(fresh)  # new pairs only ever grow during their own merge: push them once, final
        for k, c in fresh.items():
            heappush(heap, (-c, k))
            where[k].extend(fresh_at[k])
    if bar is not None:
        bar.update(len(merges) - bar.n)
        bar.close()
    return merges


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit=" merges", desc="bpe: merges", dynamic_ncols=True, leave=False)
