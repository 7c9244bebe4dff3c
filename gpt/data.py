"""Token datasets on disk (what `gpt-prepare` writes) and the batches the trainer reads from them.

A data directory::

    DATA_DIR/meta.json        format + version, tokenizer fingerprint, token dtype, per-split counts
    DATA_DIR/train.bin        flat token ids, uint16 when the vocabulary fits, else uint32
    DATA_DIR/val.bin
    DATA_DIR/tokenizer.json   the tokenizer that made them, so a run needs nothing else

The .bin files are read with ``numpy.memmap``, never loaded whole. Training takes random windows
(nanoGPT's ``get_batch``); evaluation takes a deterministic sliding window with a stride (the
``create_dataloader(max_length, stride)`` recipe), so validation losses are comparable across runs.

Training batches are a pure function of ``(seed, step, micro-batch)``: resuming at a step replays
exactly the same data without saving any sampler state, and the data is sharded by rank: a step's
global batch is ``world_size * grad_accum`` micro-batches and rank ``r`` takes micro-batches
``r, r + world_size, ...``, so N processes see the same data as one process with N times the
accumulation.
"""

from __future__ import annotations

import json
import math
import reprlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from tokenizers_bpe.errors import SettingError
from tokenizers_bpe.fileio import Stamp, check_not_a_broken_link, check_regular_file, format_stamp, read_json, recorded_version

DATA_FORMAT = "gpt-toolkit-tokens"
DATA_VERSION = 1
SPLITS = ("train", "val")
META_FILE = "meta.json"
DATA_STAMP = Stamp(DATA_FORMAT, "a gpt-prepare data directory", META_FILE)


def token_dtype(n_vocab: int) -> np.dtype:
    """The smallest unsigned dtype that holds every token id."""
    return np.dtype(np.uint16) if n_vocab <= 2**16 else np.dtype(np.uint32)


@dataclass
class SplitInfo:
    file: str
    tokens: int = 0
    bytes: int = 0  # UTF-8 bytes of the text behind those tokens (for bits per byte)
    documents: int = 0


MAX_VOCAB = 2**32  # the ids are stored as uint16 or uint32
MAX_TOKENS = 2**48  # a split's token count: far beyond any disk


def field_of_kind(value, kinds: type | tuple[type, ...], name: str):
    """``value`` (a field read from a JSON file) if it is of ``kinds``, else a TypeError naming it;
    true and false count as numbers only where bool is named."""
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise TypeError(f"{name} is {json.dumps(value)[:40]}")
    return value


def integer_field(value, name: str, low: int, high: int) -> int:
    """``value`` (a field read from a JSON file) if it is an integer in [low, high], else a TypeError."""
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise TypeError(f"{name} must be an integer in [{low}, {high}], got {json.dumps(value)[:40]}")
    return value


def _split(d, name: str) -> SplitInfo:
    """A split's entry: its file a plain name in the data directory (never a path out of it)."""
    if not isinstance(d, dict):
        raise TypeError(f"{name} is {json.dumps(d)[:40]}")
    info = SplitInfo(**d)
    if not isinstance(info.file, str) or not info.file or info.file in (".", "..") or "/" in info.file or "\\" in info.file:
        raise TypeError(f"{name}.file must be a file name in the data directory, got {json.dumps(info.file)[:40]}")
    integer_field(info.tokens, f"{name}.tokens", 0, MAX_TOKENS)
    integer_field(info.bytes, f"{name}.bytes", 0, 4 * MAX_TOKENS * 64)
    integer_field(info.documents, f"{name}.documents", 0, MAX_TOKENS)
    return info


@dataclass
class DataMeta:
    tokenizer_fingerprint: str
    n_vocab: int
    eot_token: int | None
    dtype: str
    append_eot: bool
    val_fraction: float
    splits: dict[str, SplitInfo]
    sources: list[dict] = field(default_factory=list)

    def bytes_per_token(self, split: str = "val") -> float:
        s = self.splits[split]
        return s.bytes / s.tokens

    def to_dict(self) -> dict:
        return {**format_stamp(DATA_FORMAT, DATA_VERSION), **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict, where: str = META_FILE) -> "DataMeta":
        if not isinstance(d, dict) or d.get("format") != DATA_FORMAT:
            raise ValueError(f"{where}: not a gpt-prepare data file (format is not {DATA_FORMAT!r}); run gpt-prepare")
        if recorded_version(d) != DATA_VERSION:
            raise ValueError(f"{where}: data format version {reprlib.repr(recorded_version(d))} is not supported (expected {DATA_VERSION}); re-run gpt-prepare")
        try:
            splits = {name: _split(d["splits"][name], f"splits.{name}") for name in SPLITS}
            n_vocab = integer_field(d["n_vocab"], "n_vocab", 1, MAX_VOCAB)
            meta = cls(
                tokenizer_fingerprint=field_of_kind(d["tokenizer_fingerprint"], str, "tokenizer_fingerprint"),
                n_vocab=n_vocab,
                eot_token=None if d["eot_token"] is None else integer_field(d["eot_token"], "eot_token", 0, n_vocab - 1),
                dtype=field_of_kind(d["dtype"], str, "dtype"),
                append_eot=field_of_kind(d["append_eot"], bool, "append_eot"),
                val_fraction=float(field_of_kind(d["val_fraction"], (int, float), "val_fraction")),
                splits=splits,
                sources=field_of_kind(d.get("sources", []), list, "sources"),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"{where}: malformed ({type(e).__name__}: {e}); re-run gpt-prepare") from None
        if meta.dtype not in ("uint16", "uint32") or np.dtype(meta.dtype) != token_dtype(meta.n_vocab):
            raise ValueError(f"{where}: dtype {meta.dtype!r} does not fit a vocabulary of {meta.n_vocab}; re-run gpt-prepare")
        if not 0 < meta.val_fraction < 1:  # (gpt-prepare's --val-fraction range; NaN fails too)
            raise ValueError(f"{where}: val_fraction {meta.val_fraction!r} is not in (0, 1); re-run gpt-prepare")
        for name, s in splits.items():
            if s.tokens <= 0:
                raise ValueError(f"{where}: the {name} split is empty; re-run gpt-prepare with more text or another validation fraction")
        return meta


def load_meta(data_dir: str | Path) -> DataMeta:
    """Read and validate DATA_DIR/meta.json (one-line ValueError for anything wrong)."""
    data_dir = Path(data_dir)
    check_not_a_broken_link(data_dir)
    if data_dir.exists() and not data_dir.is_dir():
        raise ValueError(f"{data_dir} is a file, not a data directory; make a data directory from it with gpt-prepare")
    if not data_dir.is_dir():
        raise ValueError(f"data directory {data_dir} does not exist; create it with gpt-prepare")
    path = data_dir / META_FILE
    if not path.is_file():
        raise ValueError(f"{path} is missing: {data_dir} is not a gpt-prepare data directory; run gpt-prepare -o {data_dir}")
    return DataMeta.from_dict(read_json(path, "re-run gpt-prepare"), str(path))


def open_split(data_dir: str | Path, split: str, meta: DataMeta | None = None) -> np.memmap:
    """The token ids of one split as a read-only memmap, its size checked against meta.json."""
    meta = meta or load_meta(data_dir)
    info = meta.splits[split]
    path = Path(data_dir) / info.file
    dtype = np.dtype(meta.dtype)
    check_regular_file(path, "token file", "re-run gpt-prepare")  # (a FIFO or a device is named as one, never opened)
    if path.stat().st_size != info.tokens * dtype.itemsize:
        raise ValueError(f"{path}: size {path.stat().st_size} bytes does not match meta.json ({info.tokens} {dtype} tokens); re-run gpt-prepare")
    return np.memmap(path, dtype=dtype, mode="r")


def _to_tensors(windows: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T+1) token windows -> inputs and next-token targets, int64 on ``device``."""
    t = torch.from_numpy(windows.astype(np.int64))
    x, y = t[:, :-1], t[:, 1:]
    if device.type == "cuda":  # async host-to-device copy (nanoGPT does the same)
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.contiguous().to(device), y.contiguous().to(device)


class RandomWindows:
    """Training micro-batches: ``batch_size`` random windows of ``block_size + 1`` tokens.

    Calling it with ``(step, micro_step)`` gives that micro-batch, deterministic in (seed, step, global
    micro-batch index; see the module docstring): the trainer's ``train_batch`` callable for language
    modelling."""

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, *, seed: int, grad_accum: int = 1,
                 rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu"):
        if len(tokens) < block_size + 1:
            raise SettingError("block_size", f"the training data has {len(tokens)} tokens, fewer than one window of {{block_size}} "
                                             f"{block_size} + 1; lower {{block_size}} or prepare more text")
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.seed, self.grad_accum, self.rank, self.world_size = seed, grad_accum, rank, world_size
        self.device = torch.device(device)

    def offsets(self, step: int, micro_step: int) -> np.ndarray:
        global_micro = micro_step * self.world_size + self.rank
        rng = np.random.default_rng([self.seed, step, global_micro])
        return rng.integers(0, len(self.tokens) - self.block_size, size=self.batch_size)

    def __call__(self, step: int, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.block_size
        windows = np.stack([self.tokens[i : i + T + 1] for i in self.offsets(step, micro_step)])
        return _to_tensors(windows, self.device)


def sliding_window_starts(n_tokens: int, max_length: int, stride: int) -> np.ndarray:
    """Start of every window of ``max_length`` inputs (+1 target) stepping by ``stride``."""
    return np.arange(0, n_tokens - max_length, stride, dtype=np.int64)


class SlidingWindows:
    """Evaluation batches: deterministic windows ``tokens[i : i + max_length + 1]`` for
    ``i = 0, stride, 2*stride, ...`` (stride defaults to ``max_length``: no overlap).

    ``max_batches`` limits the work to ``max_batches * batch_size`` windows spread evenly over the
    split (the same windows every time, whatever the number of processes). Each rank takes every
    ``world_size``-th of them. Calling the object
    yields this rank's ``(x, y)`` batches: the trainer's ``eval_batches`` callable."""

    def __init__(self, tokens: np.ndarray, max_length: int, batch_size: int, *, stride: int | None = None,
                 max_batches: int | None = None, rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu"):
        stride = stride or max_length
        starts = sliding_window_starts(len(tokens), max_length, stride)
        if len(starts) == 0:
            raise SettingError("block_size", f"the validation data has {len(tokens)} tokens, fewer than one window of {{block_size}} "
                                             f"{max_length} + 1; lower {{block_size}} or prepare a larger validation split")
        if max_batches is not None and max_batches * batch_size < len(starts):
            pick = np.linspace(0, len(starts) - 1, max_batches * batch_size).round().astype(np.int64)
            starts = starts[np.unique(pick)]
        self.tokens, self.max_length, self.batch_size = tokens, max_length, batch_size
        self.starts = starts[rank::world_size]
        self.device = torch.device(device)

    def __len__(self) -> int:
        return math.ceil(len(self.starts) / self.batch_size)

    def __call__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        T = self.max_length
        for b in range(0, len(self.starts), self.batch_size):
            windows = np.stack([self.tokens[i : i + T + 1] for i in self.starts[b : b + self.batch_size]])
            yield _to_tensors(windows, self.device)


def check_token_ids(tokens: np.ndarray, n_vocab: int, path: str | Path) -> None:
    """A ValueError naming the first token id of ``tokens`` (a split's memmap) that is not below the
    vocabulary: one vectorised pass, a block at a time (memory stays flat at any size)."""
    block = 1 << 24
    for start in range(0, len(tokens), block):
        chunk = np.asarray(tokens[start : start + block])
        if len(chunk) and int(chunk.max()) >= n_vocab:
            at = start + int(np.argmax(chunk >= n_vocab))
            raise ValueError(f"{path}: token id {int(tokens[at])} at position {at:,} is not below the vocabulary size "
                             f"{n_vocab} of its meta.json; the file is corrupt or from another tokenizer: re-run gpt-prepare")
