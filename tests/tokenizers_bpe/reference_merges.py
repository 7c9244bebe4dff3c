"""The merge loop of tokenizers_bpe.trainer as it was before the flat-array rewrite (word lists and
sets), kept verbatim as the reference the new one must match merge for merge."""

from __future__ import annotations

import heapq
from collections import defaultdict


def learn_merges(
    piece_counts: dict[bytes, int],
    n_merges: int,
    *,
    min_frequency: int = 1,
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
    return merges
