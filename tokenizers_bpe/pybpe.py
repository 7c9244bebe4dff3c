"""The pure-Python BPE encoder: the reference the tiktoken path is tested against, and the fallback for
a pattern tiktoken's regex engine (fancy-regex) cannot compile.

A piece's ids: its UTF-8 bytes start as single-byte tokens and the adjacent pair whose concatenation
has the lowest rank is merged (the leftmost among equal ranks), repeatedly, until no adjacent pair
forms a token (tiktoken's ``byte_pair_merge``). Short pieces (nearly all) use a list and rescans;
long ones a heap of candidate pairs over a linked list, so that one 1 MB piece takes O(n log n),
not O(n^2)."""

from __future__ import annotations

import heapq
import sys
from typing import Callable, Mapping

NO_RANK = sys.maxsize
_CACHE_LIMIT = 1 << 18  # pieces; cleared (not evicted one by one) when full: cheap and good enough
_LONG_PIECE = 256  # bytes: from here on, the heap's O(n log n) beats rescanning a list


def encode_piece(ranks: Mapping[bytes, int], piece: bytes) -> list[int]:
    """The token ids of one piece (its UTF-8 bytes)."""
    token = ranks.get(piece)
    if token is not None:
        return [token]
    if len(piece) >= _LONG_PIECE:
        return _encode_long_piece(ranks, piece)
    get = ranks.get
    parts = [piece[i : i + 1] for i in range(len(piece))]
    pair_ranks = [get(parts[i] + parts[i + 1], NO_RANK) for i in range(len(parts) - 1)]
    while pair_ranks:
        best = min(pair_ranks)
        if best == NO_RANK:
            break
        i = pair_ranks.index(best)  # leftmost among equal ranks, as tiktoken
        parts[i] += parts.pop(i + 1)
        del pair_ranks[i]
        if i > 0:
            pair_ranks[i - 1] = get(parts[i - 1] + parts[i], NO_RANK)
        if i < len(pair_ranks):
            pair_ranks[i] = get(parts[i] + parts[i + 1], NO_RANK)
    return [ranks[p] for p in parts]


def _encode_long_piece(ranks: Mapping[bytes, int], piece: bytes) -> list[int]:
    """encode_piece for long pieces. Parts are named by their start offset (which never changes);
    ``nxt`` links each part to the next. The heap holds (rank, start) of candidate pairs: the
    smallest is the lowest rank, leftmost among equals, as the list version picks. An entry is stale
    when its part was absorbed or its pair changed; that is checked when it is popped (the rank of
    the pair as it is now must still be the entry's)."""
    n = len(piece)
    get = ranks.get
    nxt = list(range(1, n + 1))  # nxt[s]: start of the part after the one at s (n: none)
    prev = list(range(-1, n - 1))  # prev[s]: start of the part before (-1: none)
    alive = bytearray(b"\x01") * n
    w = n + 1  # a heap entry is the int rank * w + start: ordered as (rank, start), cheaper than a tuple
    heap = [r * w + i for i in range(n - 1) if (r := get(piece[i : i + 2])) is not None]
    heapq.heapify(heap)
    heappop, heappush = heapq.heappop, heapq.heappush
    while heap:
        r, s = divmod(heappop(heap), w)
        if not alive[s]:
            continue
        m = nxt[s]
        if m >= n:
            continue
        e = nxt[m]
        if get(piece[s:e]) != r:  # the pair at s changed since this entry was pushed
            continue
        alive[m] = 0  # merge: the part at s now spans s..e
        nxt[s] = e
        if e < n:
            prev[e] = s
            r2 = get(piece[s : nxt[e]])
            if r2 is not None:
                heappush(heap, r2 * w + s)
        p = prev[s]
        if p >= 0:
            r2 = get(piece[p:e])
            if r2 is not None:
                heappush(heap, r2 * w + p)
    ids = []
    s = 0
    while s < n:
        ids.append(ranks[piece[s : nxt[s]]])
        s = nxt[s]
    return ids


class PieceCache(dict):
    """piece (str) -> its token ids; a miss runs BPE on the piece and remembers the result."""

    __slots__ = ("encode_piece",)

    def __init__(self, encode_piece: Callable[[bytes], list[int]]):
        super().__init__()
        self.encode_piece = encode_piece

    def __missing__(self, piece: str) -> list[int]:
        if len(self) >= _CACHE_LIMIT:
            self.clear()
        ids = self[piece] = self.encode_piece(piece.encode("utf-8"))
        return ids


def split_token(ranks: Mapping[bytes, int], token: bytes, rank: int) -> tuple[int, int]:
    """The two lower-ranked tokens BPE joins to make ``token`` (tiktoken's recovery of merges): BPE on
    the token's bytes with the tokens below ``rank`` only, which must end in two parts."""
    if len(token) >= _LONG_PIECE:
        parts = _encode_long_piece(_RanksBelow(ranks, rank), token)
    else:
        parts = [token[i : i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best_i, best_r = -1, rank
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1], NO_RANK)
                if r < best_r:
                    best_i, best_r = i, r
            if best_i < 0:
                break
            parts[best_i] += parts.pop(best_i + 1)
        parts = [ranks[p] for p in parts]
    if len(parts) != 2:
        shown = repr(token) if len(token) <= 40 else f"{token[:40]!r}... ({len(token):,} bytes)"
        raise ValueError(f"token {rank} ({shown}) is no merge of two lower-ranked tokens, so the vocabulary has no "
                         "merge list (tiktoken can encode with it; a tokenizer.json, GPT-2's and HF's files need one)")
    return parts[0], parts[1]


class _RanksBelow:
    """The ranks below ``limit`` of a vocabulary, as encode_piece reads ranks (get, [])."""

    __slots__ = ("ranks", "limit")

    def __init__(self, ranks: Mapping[bytes, int], limit: int):
        self.ranks, self.limit = ranks, limit

    def get(self, token: bytes, default=None):
        r = self.ranks.get(token)
        return r if r is not None and r < self.limit else default

    def __getitem__(self, token: bytes) -> int:
        return self.ranks[token]
