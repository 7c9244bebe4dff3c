"""gpt-prepare: tokenize a text corpus into the token files the trainer reads.

    gpt-prepare input.txt more.txt --tokenizer tokenizer.json -o data/
    gpt-prepare --builtin shakespeare --tokenizer tokenizer.json -o data/

The corpus is streamed: files are read line by line and cut into chunks of about ``--chunk-mb``
that are encoded in parallel (``--workers`` processes) and appended to ``train.bin`` until
``1 - --val-fraction`` of the bytes are done, then to ``val.bin``. Chunks are cut only before a
line that starts with a non-space character, where the GPT-2 pre-tokenizer splits anyway, so the
tokens are the same as encoding each document whole. The layout is described in ``gpt/data.py``.
"""

from __future__ import annotations

import functools
import io
import itertools
import json
import os
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

import tokenizers_bpe
from gpt.data import DATA_STAMP, META_FILE, SPLITS, DataMeta, SplitInfo, token_dtype
from tokenizers_bpe import TOKENIZER_FILE, UnknownCharacterError
from tokenizers_bpe.fileio import atomic_directory, atomic_write, iter_file_texts
from tools.cli import ArgumentParser, CLIError, command
from tools.corpus import BUILTIN_CORPORA, plays
from tools.outputs import check_output


@dataclass
class Document:
    name: str
    bytes: int  # UTF-8 size, known up front so the train/val cut can be placed while streaming
    lines: Callable[[], Iterator[str]]  # reads the text lazily, line by line, keeping line ends


def _file_lines(path: Path) -> Iterator[str]:
    """The file's lines with their line ends as written, streamed through the tokenizer's reader
    (blocks ending at a newline; invalid UTF-8 is reported with its exact byte offset)."""
    for block in iter_file_texts([path]):
        yield from io.StringIO(block, newline="")  # newline="": split like a file, keep \r\n as written


def documents(files: Sequence[str], builtin: str | None) -> list[Document]:
    """Every input as a document: each file, or each play of the built-in corpus."""
    docs: list[Document] = []
    for name in files:
        p = Path(name)
        if not p.is_file():
            raise ValueError(f"input file {p} does not exist")
        if not os.access(p, os.R_OK):
            raise ValueError(f"input file {p} is not readable")
        docs.append(Document(str(p), p.stat().st_size, functools.partial(_file_lines, p)))
    if builtin:
        for play in plays():  # a play's text is made again when it is encoded: never the whole corpus at once
            size = len(play.text().encode("utf-8"))
            docs.append(Document(f"builtin:{builtin}/{play.name}", size, lambda play=play: iter(play.text().splitlines(keepends=True))))
    return docs


@dataclass
class Chunk:
    split: str
    text: str
    nbytes: int
    doc_end: bool  # the last chunk of a document (an EOT follows it with --append-eot)
    source: str  # the document's name, for error messages


def chunks(docs: Iterable[Document], train_bytes: int, chunk_bytes: int) -> Iterator[Chunk]:
    """Cut the documents into chunks of about ``chunk_bytes``; the first ``train_bytes`` go to the
    training split. A cut happens only at a document end or before a line starting with a
    non-space character (see the module docstring)."""
    split, done = "train", 0
    buf: list[str] = []
    buf_bytes = 0
    for doc in docs:
        for line in doc.lines():
            if buf and line[:1] and not line[:1].isspace():
                if split == "train" and done >= train_bytes:
                    yield Chunk(split, "".join(buf), buf_bytes, False, doc.name)
                    buf, buf_bytes, split = [], 0, "val"
                elif buf_bytes >= chunk_bytes:
                    yield Chunk(split, "".join(buf), buf_bytes, False, doc.name)
                    buf, buf_bytes = [], 0
            n = len(line.encode("utf-8"))
            buf.append(line)
            buf_bytes += n
            done += n
        yield Chunk(split, "".join(buf), buf_bytes, True, doc.name)
        buf, buf_bytes = [], 0
        if split == "train" and done >= train_bytes:
            split = "val"


_worker_tokenizer = None


def _init_worker(tokenizer_path: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizers_bpe.load(tokenizer_path)


def _encode(text: str) -> list[int]:
    # Text is data: a literal "<|endoftext|>" in it is ordinary text, not the special token.
    return _worker_tokenizer.encode_ordinary(text)


def prepare(docs: list[Document], tokenizer, tokenizer_path: str, out: Path, *, val_fraction: float,
            append_eot: bool, workers: int, chunk_bytes: int, sources: list[dict], progress: bool = True) -> DataMeta:
    """Encode ``docs`` into ``out`` (replaced atomically only once everything is written)."""
    dtype = token_dtype(tokenizer.n_vocab)
    total = sum(d.bytes for d in docs)
    train_bytes = round(total * (1 - val_fraction))
    splits = {name: SplitInfo(file=f"{name}.bin") for name in SPLITS}
    eot = np.array([tokenizer.eot_token], dtype=dtype) if append_eot else None
    pool = Pool(workers, initializer=_init_worker, initargs=(tokenizer_path,)) if workers > 1 else None
    if pool is None:
        _init_worker(tokenizer_path)
    try:
        with atomic_directory(out, DATA_STAMP) as tmp, tqdm(total=total, unit="B", unit_scale=True, desc="gpt-prepare", disable=not progress) as bar:
            files = {name: open(tmp / info.file, "wb") for name, info in splits.items()}
            try:
                stream = chunks(docs, train_bytes, chunk_bytes)
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
                        arr.tofile(files[c.split])
                        info = splits[c.split]
                        info.tokens += len(arr)
                        info.bytes += c.nbytes
                        info.documents += c.doc_end
                        bar.update(c.nbytes)
            finally:
                for f in files.values():
                    f.close()
            for name, info in splits.items():
                if info.tokens == 0:
                    raise ValueError(
                        f"the {name} split would be empty ({total} bytes of input, --val-fraction {val_fraction}); "
                        "give more text or change --val-fraction")
            meta = DataMeta(
                tokenizer_fingerprint=tokenizer.fingerprint(), n_vocab=tokenizer.n_vocab, eot_token=tokenizer.eot_token,
                dtype=dtype.name, append_eot=append_eot, val_fraction=val_fraction, splits=splits, sources=sources)
            tokenizer.save(tmp / TOKENIZER_FILE)
            with atomic_write(tmp / META_FILE) as f:
                json.dump(meta.to_dict(), f, indent=2)
                f.write("\n")
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return meta


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="gpt-prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="*", metavar="FILE", help="UTF-8 text files (each one a document)")
    p.add_argument("--builtin", choices=BUILTIN_CORPORA, help="use a built-in corpus (each play a document)")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json from bpe-train (or bpe-train --char)")
    p.add_argument("-o", "--out", required=True, help="output data directory (created; a previous gpt-prepare output there is replaced)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="fraction of the bytes (the end of the corpus) held out for validation")
    p.add_argument("--append-eot", action="store_true", help="append the <|endoftext|> token after every document")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="encoding processes")
    p.add_argument("--chunk-mb", type=float, default=1.0, help="approximate size of the text chunks encoded in parallel, in MB")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


@command("gpt-prepare")
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.files and not args.builtin:
        raise CLIError("no input: give text FILEs or --builtin shakespeare")
    if not 0.0 < args.val_fraction < 1.0:
        raise CLIError(f"--val-fraction must be between 0 and 1 (exclusive), got {args.val_fraction}")
    if args.workers < 1:
        raise CLIError(f"--workers must be at least 1, got {args.workers}")
    if args.chunk_mb <= 0:
        raise CLIError(f"--chunk-mb must be positive, got {args.chunk_mb}")
    if not Path(args.tokenizer).is_file():
        raise CLIError(f"--tokenizer {args.tokenizer} does not exist; train one with bpe-train")
    tokenizer = tokenizers_bpe.load(args.tokenizer)
    if args.append_eot and tokenizer.eot_token is None:
        raise CLIError(f"--append-eot: the tokenizer {args.tokenizer} has no <|endoftext|> token; drop --append-eot or retrain with it")
    out = check_output(args.out, DATA_STAMP, "--out", inputs=[*args.files, args.tokenizer])
    docs = documents(args.files, args.builtin)
    sources = [{"path": str(Path(f).resolve()), "bytes": Path(f).stat().st_size} for f in args.files]
    if args.builtin:
        sources.append({"builtin": args.builtin, "bytes": sum(d.bytes for d in docs if d.name.startswith("builtin:"))})
    meta = prepare(docs, tokenizer, args.tokenizer, out, val_fraction=args.val_fraction, append_eot=args.append_eot,
                   workers=args.workers, chunk_bytes=int(args.chunk_mb * 2**20), sources=sources, progress=not args.quiet)
    for name in SPLITS:
        s = meta.splits[name]
        print(f"{name}: {s.tokens:,} tokens ({s.bytes:,} bytes, {s.bytes / s.tokens:.2f} bytes/token)")
    print(f"wrote {out}/ (train.bin, val.bin as {meta.dtype}, meta.json, tokenizer.json)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
