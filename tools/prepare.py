"""gpt-prepare: tokenize a text corpus into the token files the trainer reads.

    gpt-prepare input.txt more.txt --tokenizer tokenizer.json -o data/
    gpt-prepare --builtin shakespeare --tokenizer tokenizer.json -o data/

The corpus is streamed: files are read a block at a time and cut into chunks of about ``--chunk-mb``
that are encoded in parallel (``--workers`` processes) and appended to ``train.bin`` until
``1 - --val-fraction`` of the bytes are done, then to ``val.bin``. Chunks are cut only where the
tokenizer's pattern ends a piece whatever follows (tokenizers_bpe.patterns.chunk_cut_regex: for the
gpt2/gpt4 patterns after a letter or digit followed by another kind of character, or at a line start;
for a char-level tokenizer anywhere), so the tokens are the same as encoding each document whole, and
text without line breaks is cut like any other. Before any encoding, one streaming pass over the
input checks that it is UTF-8 and places the train/val cut. The layout is described in ``gpt/data.py``.
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import regex
from tqdm import tqdm

import tokenizers_bpe
import tools
from gpt.data import DATA_STAMP, META_FILE, SPLITS, DataMeta, SplitInfo, token_dtype
from gpt.memory import available_memory_bytes
from tokenizers_bpe import TOKENIZER_FILE, BPETokenizer, UnknownCharacterError
from tokenizers_bpe.errors import byte_size
from tokenizers_bpe.fileio import atomic_directory, atomic_write, check_not_a_broken_link, check_text_file, read_file_blocks, resolve_path
from tokenizers_bpe.trainer import quiet_worker, start_pool
from tokenizers_bpe.patterns import CHUNK_CUT_LOOKAHEAD, CHUNK_CUT_LOOKBEHIND, chunk_cut_regex, chunk_cut_rule
from tools.cli import ArgumentParser, CLIError, HelpFormatter, add_tokenizer_arguments, command, integer, max_threads, number, output_path
from tools.corpus import BUILTIN_CORPORA, plays
from tools.outputs import check_output

READ_BYTES = 1 << 18  # bytes read at a time: the reader's memory, whatever the length of a line


# ---------------------------------------------------------------------------------------------- reading


@dataclass
class Document:
    name: str
    bytes: int  # UTF-8 size, known up front so the train/val cut can be placed while streaming
    blocks: Callable[[], Iterator[tuple[str, int]]]  # reads the text lazily: (text, its UTF-8 size) blocks


def text_blocks(text: str, size: int = READ_BYTES) -> Iterator[tuple[str, int]]:
    """A text already in memory, in (text, bytes) blocks like tokenizers_bpe.fileio.read_file_blocks."""
    for start in range(0, len(text), size):
        block = text[start : start + size]
        yield block, len(block.encode("utf-8"))


def documents(files: Sequence[str], builtin: str | None) -> list[Document]:
    """Every input as a document: each file, or each play of the built-in corpus."""
    docs: list[Document] = []
    for name in files:
        p = Path(name)
        check_text_file(p)  # a directory, a device, a FIFO (no size to place the split by), a missing or an empty file
        if not os.access(p, os.R_OK):
            raise ValueError(f"{p}: the file is not readable")
        docs.append(Document(str(p), p.stat().st_size, lambda p=p: read_file_blocks(p)))
    if builtin:
        for play in plays():  # a play's text is made again when it is encoded: never the whole corpus at once
            size = len(play.text().encode("utf-8"))
            docs.append(Document(f"builtin:{builtin}/{play.name}", size, lambda play=play: text_blocks(play.text())))
    return docs


# ---------------------------------------------------------------------------------------------- chunks


@dataclass
class Chunk:
    split: str
    text: str
    nbytes: int
    doc_end: bool  # the last chunk of a document (an EOT follows it with --append-eot)
    source: str  # the document's name, for error messages


def tokenizer_pattern(tokenizer) -> str | None:
    """The pre-tokenization pattern of a tokenizer (None for a char-level one): where its input may be
    cut (tokenizers_bpe.patterns.chunk_cut_regex)."""
    return tokenizer.pattern if isinstance(tokenizer, BPETokenizer) else None


def _char_index(text: str, nbytes: int) -> int:
    """The index of the first character of ``text`` that starts at or after UTF-8 byte ``nbytes``."""
    if text.isascii():
        return nbytes
    data = text.encode("utf-8")
    k = len(data[:nbytes].decode("utf-8", errors="ignore"))  # the characters wholly before the byte
    return k + 1 if nbytes < len(data) and data[nbytes] & 0xC0 == 0x80 else k


def chunks(docs: Iterable[Document], train_bytes: int, chunk_bytes: int, cuts: regex.Pattern) -> Iterator[Chunk]:
    """Cut the documents into chunks of about ``chunk_bytes`` (at least 1) at the places ``cuts``
    matches, holding about one chunk plus one read block at a time (more only where the text has
    no cut). The training split ends at the first cut or document end at or after byte
    ``train_bytes`` (at least 1). The same input always gives the same chunks."""
    split, done = "train", 0
    for doc in docs:
        pending, pending_bytes = "", 0  # read, not yet yielded; starts at a cut
        before = ""  # the characters just before `pending`: a cut's look-behind reaches into them
        search_from = None  # where to go on looking for the next cut; None: from the goal
        for text, nbytes in doc.blocks():
            pending += text
            pending_bytes += nbytes
            while True:
                goal = chunk_bytes if split == "val" else min(chunk_bytes, train_bytes - done)  # >= 1
                if pending_bytes <= goal:
                    break
                if search_from is None:
                    search_from = _char_index(pending, goal)
                m = cuts.search(before + pending, len(before) + search_from)
                if m is None:  # read on; the last characters may yet turn out to be a cut
                    search_from = max(search_from, len(pending) - CHUNK_CUT_LOOKAHEAD)
                    break
                cut = m.start() - len(before)
                text_out = pending[:cut]
                n = len(text_out.encode("utf-8"))
                yield Chunk(split, text_out, n, False, doc.name)
                before = (before + text_out)[-CHUNK_CUT_LOOKBEHIND:]
                pending, pending_bytes, done, search_from = pending[cut:], pending_bytes - n, done + n, None
                if split == "train" and done >= train_bytes:
                    split = "val"
        yield Chunk(split, pending, pending_bytes, True, doc.name)
        done += pending_bytes
        if split == "train" and done >= train_bytes:
            split = "val"


def plan_splits(docs: list[Document], train_bytes: int, chunk_bytes: int, cuts: regex.Pattern,
                progress: bool = True) -> dict[str, int]:
    """The bytes each split will get, from one streaming pass over the input (chunks() without the
    encoding): invalid UTF-8 anywhere, or a split left empty, is found before any work."""
    sizes = dict.fromkeys(SPLITS, 0)
    with tqdm(total=sum(d.bytes for d in docs), unit="B", unit_scale=True, desc="gpt-prepare: checking",
              disable=not progress, leave=False) as bar:
        for c in chunks(docs, train_bytes, chunk_bytes, cuts):
            sizes[c.split] += c.nbytes
            bar.update(c.nbytes)
    return sizes


# ---------------------------------------------------------------------------------------------- encoding

_worker_tokenizer = None


def _init_worker(tokenizer, quiet: bool = True) -> None:
    # The workers take the loaded tokenizer, not its file: a worker started while the command ends
    # (the pool replaces a killed one) finds the file removed with an output directory it was in.
    global _worker_tokenizer
    if quiet:
        quiet_worker()
    _worker_tokenizer = tokenizer


def _encode(text: str) -> list[int]:
    # Text is data: a literal "<|endoftext|>" in it is ordinary text, not the special token.
    return _worker_tokenizer.encode_ordinary(text)


@dataclass
class DataPlan:
    """gpt-prepare's input, checked and measured before any encoding (``plan_data``)."""

    docs: list[Document]
    sources: list[dict]
    val_fraction: float
    chunk_bytes: int
    planned: dict[str, int]  # the bytes each split will get

    @property
    def total(self) -> int:
        return sum(d.bytes for d in self.docs)

    @property
    def train_bytes(self) -> int:
        return train_split_bytes(self.total, self.val_fraction)


def plan_data(files: Sequence[str], builtin: str | None, pattern: str | None, *, val_fraction: float, chunk_mb: float,
              progress: bool = True) -> DataPlan:
    """Every check of the input before any encoding: the files (readable, UTF-8), and a train/val cut
    that leaves neither split empty for a tokenizer with ``pattern`` (None: char-level)."""
    docs = documents(files, builtin)
    sources = [{"path": str(resolve_path(f)), "bytes": Path(f).stat().st_size} for f in files]
    if builtin:
        sources.append({"builtin": builtin, "bytes": sum(d.bytes for d in docs if d.name.startswith("builtin:"))})
    chunk_bytes = max(1, int(chunk_mb * 2**20))
    total = sum(d.bytes for d in docs)
    planned = plan_splits(docs, train_split_bytes(total, val_fraction), chunk_bytes, chunk_cut_regex(pattern), progress)
    check_splits(planned, train_split_bytes(total, val_fraction), total, val_fraction, pattern)
    return DataPlan(docs, sources, val_fraction, chunk_bytes, planned)


def prepare(plan: DataPlan, tokenizer, tokenizer_path: str, out: Path, *, append_eot: bool, workers: int,
            progress: bool = True) -> DataMeta:
    """Encode the planned input into ``out`` (replaced atomically only once everything is written) with
    ``tokenizer``, loaded from ``tokenizer_path`` (named in messages)."""
    dtype = token_dtype(tokenizer.n_vocab)
    docs, total, train_bytes, chunk_bytes = plan.docs, plan.total, plan.train_bytes, plan.chunk_bytes
    cuts = chunk_cut_regex(tokenizer_pattern(tokenizer))
    splits = {name: SplitInfo(file=f"{name}.bin") for name in SPLITS}
    eot = np.array([tokenizer.eot_token], dtype=dtype) if append_eot else None
    pool = start_pool(lambda: Pool(workers, initializer=_init_worker, initargs=(tokenizer,))) if workers > 1 else None
    if pool is None:
        _init_worker(tokenizer, quiet=False)
    try:
        with atomic_directory(out, DATA_STAMP) as tmp, tqdm(total=total, unit="B", unit_scale=True, desc="gpt-prepare", disable=not progress) as bar:
            files = {name: open(tmp / info.file, "wb") for name, info in splits.items()}
            last_source = dict.fromkeys(SPLITS)
            try:
                stream = chunks(docs, train_bytes, chunk_bytes, cuts)
                # Bounded batches of chunks keep memory flat (Pool.imap would read the whole input ahead).
                while batch := list(itertools.islice(stream, max(1, workers) * 4)):
                    texts = [c.text for c in batch]
                    try:
                        encoded = pool.map(_encode, texts) if pool else [_encode(t) for t in texts]
                    except UnknownCharacterError as e:
                        source = next(c.source for c in batch if e.character in c.text)
                        raise ValueError(f"{source}: --tokenizer {tokenizer_path} cannot encode it ({e}); "
                                         "use a tokenizer trained on this text (e.g. bpe-train --char FILE)") from None
                    for c, ids in zip(batch, encoded):
                        arr = np.asarray(ids, dtype=dtype)
                        if c.doc_end and eot is not None:
                            arr = np.concatenate([arr, eot])
                        files[c.split].write(arr.tobytes())  # (tofile hides the errno of a full disk)
                        info = splits[c.split]
                        info.tokens += len(arr)
                        info.bytes += c.nbytes
                        info.documents += c.source != last_source[c.split]  # every document with text in the split
                        last_source[c.split] = c.source
                        bar.update(c.nbytes)
            finally:
                for f in files.values():
                    f.close()
            if pool is not None:  # done with the workers: stop them before the output is committed, not after
                pool.close()
                pool.join()
                pool = None
            if {name: info.bytes for name, info in splits.items()} != plan.planned:
                raise ValueError("the text changed while it was read (the splits differ from the first pass: is a file still "
                                 "being written?); run again once the files stay as they are")
            meta = DataMeta(
                tokenizer_fingerprint=tokenizer.fingerprint(), n_vocab=tokenizer.n_vocab, eot_token=tokenizer.eot_token,
                dtype=dtype.name, append_eot=append_eot, val_fraction=plan.val_fraction, splits=splits, sources=plan.sources)
            tokenizer.save(tmp / TOKENIZER_FILE)
            with atomic_write(tmp / META_FILE) as f:
                json.dump(meta.to_dict(), f, indent=2)
                f.write("\n")
    except BaseException:
        if pool is not None and not tools.console_script:
            pool.terminate()  # an interrupt or an error: the work in flight is not needed
            pool = None
        raise  # (a console script ends at once in tools.cli, its workers killed: Pool.terminate could hang)
    return meta


def train_split_bytes(total: int, val_fraction: float) -> int:
    """Where the training split ends, in bytes of the whole input (at least 1: it is never empty)."""
    return max(1, round(total * (1 - val_fraction)))


def check_splits(planned: dict[str, int], train_bytes: int, total: int, val_fraction: float, pattern: str | None) -> None:
    """A split that would be empty is a one-line error (before any encoding)."""
    for name, nbytes in planned.items():
        if nbytes == 0:
            raise ValueError(
                f"the {name} split would be empty: the input ({total} bytes) has no place after byte {train_bytes} "
                f"(the first {1 - val_fraction:.0%}, --val-fraction {val_fraction:g}) where it can be cut without "
                f"changing its tokens (this tokenizer cuts {chunk_cut_rule(pattern)}); give more text or a larger "
                "--val-fraction")


# Memory per byte of text being encoded, at worst: the text, its ids as a Python list (one token per
# byte with a small vocabulary, 36 bytes each) and their copy on the way back from a worker. Measured:
# ~29 (617 MB for one 20 MB chunk of distinct words, 400-token vocabulary).
ENCODING_BYTES_PER_TEXT_BYTE = 40


def check_encoding_memory(plan: DataPlan, workers: int) -> None:
    """The text in flight (a batch of 4 chunks per worker, their ids, and a chunk in each worker) must fit
    in the memory available: a --chunk-mb far too large got the process killed."""
    in_flight = min(plan.total, plan.chunk_bytes * 5 * max(1, workers))
    need, available = in_flight * ENCODING_BYTES_PER_TEXT_BYTE, available_memory_bytes()
    if available is not None and need > 0.75 * available:
        raise CLIError(f"--chunk-mb {plan.chunk_bytes / 2**20:g} with --workers {workers}: the chunks encoded at once need about "
                       f"{byte_size(need)} of memory, more than 3/4 of the {byte_size(available)} available; lower --chunk-mb "
                       "(1 is plenty) or --workers")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="gpt-prepare", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("files", nargs="*", metavar="FILE", help="UTF-8 text files (each one a document)")
    p.add_argument("--builtin", choices=BUILTIN_CORPORA, help="use a built-in corpus (each play a document)")
    add_tokenizer_arguments(p, "--tokenizer", "-t", required=True)
    p.add_argument("-o", "--out", required=True, type=output_path, help="output data directory (created; a previous gpt-prepare output there is replaced)")
    p.add_argument("--val-fraction", type=number(0, 1, low_open=True, high_open=True), default=0.1,
                   help="fraction of the bytes (the end of the corpus) held out for validation")
    p.add_argument("--append-eot", action="store_true", help="append the <|endoftext|> token after every document")
    p.add_argument("--workers", type=integer(1, max_threads()), default=min(8, os.cpu_count() or 1), help="encoding processes")
    p.add_argument("--chunk-mb", type=number(0, 1024, low_open=True), default=1.0,
                   help="approximate size of the text chunks encoded in parallel, in MB (memory grows with it)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def load_tokenizer_to_keep(path, pattern: str | None = None):
    """The tokenizer at ``path``, which the data directory will keep as its tokenizer.json: a rank file
    without a merge list (tiktoken encodes with it, our format cannot hold it) is refused now, before
    any text is encoded."""
    tokenizer = tokenizers_bpe.load_any(path, pattern=pattern)
    if isinstance(tokenizer, BPETokenizer):
        try:
            tokenizer.merges
        except ValueError as e:
            raise CLIError(f"{path}: {e}; it cannot be kept with the data: train a tokenizer with bpe-train") from None
    return tokenizer


@command("gpt-prepare")
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.files and not args.builtin:
        raise CLIError("no input: give text FILEs or --builtin shakespeare")
    check_not_a_broken_link(args.tokenizer)
    if not Path(args.tokenizer).exists():
        raise CLIError(f"--tokenizer {args.tokenizer} does not exist; train one with bpe-train")
    tokenizer = load_tokenizer_to_keep(args.tokenizer, pattern=args.pattern)
    if args.append_eot and tokenizer.eot_token is None:
        raise CLIError(f"--append-eot: the tokenizer {args.tokenizer} has no <|endoftext|> token; drop --append-eot or retrain with it")
    out = check_output(args.out, DATA_STAMP, "--out", inputs=[*args.files, args.tokenizer])
    plan = plan_data(args.files, args.builtin, tokenizer_pattern(tokenizer), val_fraction=args.val_fraction,
                     chunk_mb=args.chunk_mb, progress=not args.quiet)
    check_encoding_memory(plan, args.workers)
    meta = prepare(plan, tokenizer, args.tokenizer, out, append_eot=args.append_eot, workers=args.workers,
                   progress=not args.quiet)
    for name in SPLITS:
        s = meta.splits[name]
        print(f"{name}: {s.tokens:,} tokens ({s.bytes:,} bytes, {s.bytes / s.tokens:.2f} bytes/token)")
    print(f"wrote {out}/ (train.bin, val.bin as {meta.dtype}, meta.json, tokenizer.json)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
