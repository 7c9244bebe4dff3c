"""bpe-train: train a byte-level BPE (or char-level) tokenizer and save it as tokenizer.json."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tokenizers_bpe import TOKENIZER_FILE, Tokenizer, load, train, train_char, train_from_iterator
from tokenizers_bpe.errors import byte_size
from tokenizers_bpe.membudget import current_rss, default_budget
from tokenizers_bpe.fileio import check_text_file, iter_file_texts
from tokenizers_bpe.patterns import PATTERNS
from tokenizers_bpe.tokenizer import TOKENIZER_STAMP
from tokenizers_bpe.trainer import DEFAULT_MIN_FREQUENCY, DEFAULT_SPECIAL_TOKENS, check_train_settings
from tools.bpe_inspect import describe_sizes
from tools.cli import ArgumentParser, CLIError, HelpFormatter, add_seed_argument, command, integer, max_threads, output_path, pattern_argument
from tools.corpus import BUILTIN_CORPORA, iter_builtin_texts
from tools.outputs import check_output

PROG = "bpe-train"
DEFAULT_VOCAB_SIZE = 4096
SHOWN_FILES = 5  # corpus files named in a line of output (a glob can give thousands)
FRESH_PROCESS_ENV = "GPT2_TOOLKIT_BPE_TRAIN_CHILD"  # set in the fresh bpe-train that trains for a process holding torch
EXAMPLES = """examples:
  bpe-train corpus.txt --vocab-size 4096 -o tokenizer.json
  bpe-train --builtin shakespeare --vocab-size 4096 -o tokenizer.json   (also: no FILE at all)
  bpe-train a.txt b.txt --pattern gpt4 --special '<|endoftext|>' --special '<|pad|>'
  bpe-train input.txt --char -o chars.json
  bpe-train big/*.txt --vocab-size 32768 --max-memory 2GB   (any corpus size in a fixed budget)

Training is deterministic: the same input and arguments give a byte-identical file. Ties between
pairs with equal counts go to the smallest (left id, right id); see tokenizers_bpe/trainer.py."""


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=PROG, formatter_class=HelpFormatter, description=__doc__.split(": ", 1)[1].strip(), epilog=EXAMPLES)
    p.add_argument("files", nargs="*", metavar="FILE", help="UTF-8 text files (default: the built-in corpus)")
    p.add_argument("--builtin", choices=BUILTIN_CORPORA, help="train on a built-in corpus (used when no FILE is given)")
    p.add_argument("--vocab-size", type=integer(), default=DEFAULT_VOCAB_SIZE, help="total ids: 256 bytes + merges + special tokens")
    p.add_argument("-o", "--output", default=TOKENIZER_FILE, type=output_path, help="where to write the tokenizer")
    p.add_argument("--pattern", default="gpt2", type=pattern_argument, help=f"pre-tokenization regex: {' or '.join(PATTERNS)} (tiktoken's) or a regex")
    p.add_argument("--special", action="append", metavar="TOKEN", help=f"a special token (repeatable; default {' '.join(DEFAULT_SPECIAL_TOKENS)})")
    p.add_argument("--no-special", action="store_true", help="no special tokens at all")
    p.add_argument("--min-frequency", type=integer(), default=DEFAULT_MIN_FREQUENCY, help="stop when the best pair occurs fewer times")
    p.add_argument("--char", action="store_true", help="a character-level tokenizer (one id per character) instead of BPE")
    p.add_argument("--errors", choices=("strict", "replace"), default="strict", help="invalid UTF-8: fail, or replace with U+FFFD")
    p.add_argument("--workers", type=integer(1, max_threads()), help="pre-tokenization processes (default: all cores; 1 for files under 4 MB)")
    p.add_argument("--max-memory", type=memory_size, metavar="SIZE",
                   help="keep the resident memory of training (workers included) under SIZE (e.g. 256MB, 2GB, 512MiB): "
                        "piece counts that outgrow it are spilled to $TMPDIR (at most about 1.5x the corpus, usually "
                        "far less) and merged at the end, and the merge phase's arrays are mapped from a file there; "
                        "the tokenizer is the same byte for byte (default: none, unless the files may not fit in "
                        "the available memory unbounded: then 3/4 of it)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_seed_argument(p, help_text="accepted like every command's --seed; training has no randomness, so any seed gives the same file")
    return p


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def memory_size(text: str) -> int:
    """An argparse type: a size in bytes, as a number with an optional unit (256MB, 1.5GB, 512MiB)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([A-Za-z]*)\s*", text)
    unit = m and m.group(2).upper()
    if not m or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"must be a size such as 256MB, 2GB or 512MiB, got {text!r}")
    size = float(m.group(1)) * _UNITS[unit]  # (inf for a number of 400 digits: refused below)
    if not 0 < size < 2**62:
        raise argparse.ArgumentTypeError(f"must be a size above 0 and below 4 EB, got {text!r}")
    return int(size)


@dataclass
class TokenizerRecipe:
    """What to train a tokenizer on and how: bpe-train's options (gpt-train FILE takes the same)."""

    files: Sequence[str] = ()
    builtin: str | None = None
    vocab_size: int = DEFAULT_VOCAB_SIZE
    pattern: str = "gpt2"
    specials: tuple[str, ...] = DEFAULT_SPECIAL_TOKENS
    min_frequency: int = DEFAULT_MIN_FREQUENCY
    char: bool = False
    errors: str = "strict"
    workers: int | None = None
    max_memory: int | None = None

    @property
    def corpus(self) -> str | None:
        """The built-in corpus trained on: --builtin, or the default one when no file is given."""
        return self.builtin or (None if self.files else BUILTIN_CORPORA[0])

    @property
    def source(self) -> str:
        """What the tokenizer is trained on, for a line of output: a few files and how many there are."""
        if self.corpus:
            return f"built-in corpus '{self.corpus}'"
        shown = ", ".join(map(str, self.files[:SHOWN_FILES]))
        return shown if len(self.files) <= SHOWN_FILES else f"{shown}, ... ({len(self.files):,} files)"

    def check(self) -> None:
        """Every check that needs no reading of the text: a one-line error naming the option."""
        if self.files and self.builtin:
            raise CLIError("give corpus files or --builtin, not both")
        if self.workers is not None and self.workers < 1:
            raise CLIError(f"--workers must be at least 1, got {self.workers}")
        if self.char and self.max_memory is not None:
            raise CLIError("--max-memory bounds BPE training; a --char tokenizer needs no budget: drop one of them")
        for name in self.files:
            check_text_file(name)
        check_train_settings(self.vocab_size if not self.char else 256 + len(self.specials), self.specials,
                             self.pattern, self.min_frequency, self.max_memory)

    def budget(self) -> int | None:
        """--max-memory; where none is given and the corpus files may not fit in memory unbounded, a
        share of the available memory (membudget.default_budget): spilled to disk, never killed."""
        if self.max_memory is not None or self.char or self.corpus:
            return self.max_memory
        return default_budget(sum(Path(f).stat().st_size for f in self.files))

    def train(self, progress: bool, prog: str = PROG) -> tuple[Tokenizer, list[str]]:
        """The tokenizer, and the warnings of training (e.g. a vocabulary the corpus cannot fill)."""
        budget = self.budget()
        if budget != self.max_memory:
            print(f"{prog}: note: the corpus may not fit in memory unbounded; training in a budget of {byte_size(budget)} "
                  "(counts spilled to $TMPDIR, the same tokenizer; --max-memory sets it)", file=sys.stderr)
            return dataclasses.replace(self, max_memory=budget).train(progress, prog)
        if self.max_memory is not None and current_rss() > self.max_memory // 4 and not os.environ.get(FRESH_PROCESS_ENV):
            return self._train_in_fresh_process(progress), []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            builtin = self.corpus
            if self.char:
                texts = iter_builtin_texts(builtin) if builtin else iter_file_texts(self.files, self.errors)
                tok: Tokenizer = train_char(texts, special_tokens=self.specials)
            else:
                options = dict(pattern=self.pattern, special_tokens=self.specials, min_frequency=self.min_frequency,
                               progress=progress, workers=self.workers, max_memory=self.max_memory)
                if builtin:
                    tok = train_from_iterator(iter_builtin_texts(builtin), self.vocab_size, **options)
                else:
                    tok = train(self.files, self.vocab_size, errors=self.errors, **options)
        return tok, [str(w.message) for w in caught]

    def _train_in_fresh_process(self, progress: bool) -> Tokenizer:
        """bpe-train in a fresh interpreter: a budget bounds the training's processes, and this one (gpt-train,
        which holds torch) alone may take more than that. Its warnings and bars go to stderr as they come."""
        args = [*self.files] if self.files else ["--builtin", self.corpus]
        args += ["--vocab-size", str(self.vocab_size), "--pattern", self.pattern, "--min-frequency", str(self.min_frequency),
                 "--errors", self.errors, "--max-memory", str(self.max_memory)]
        args += [f"--special={t}" for t in self.specials] or ["--no-special"]
        args += ([] if self.workers is None else ["--workers", str(self.workers)]) + ([] if progress else ["--quiet"])
        with tempfile.TemporaryDirectory(prefix="bpe-train-") as tmp:
            out = Path(tmp) / TOKENIZER_FILE
            # The fresh process never starts another: however large it is, it trains in its own budget.
            proc = subprocess.Popen([sys.executable, "-m", "tools.bpe_train", *args, "-o", str(out)], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, env={**os.environ, FRESH_PROCESS_ENV: "1"})
            error = _relay_stderr(proc.stderr)
            returncode = proc.wait()
            if returncode == 130:
                raise KeyboardInterrupt
            if returncode:
                raise CLIError(error or f"training the tokenizer failed (bpe-train exit {returncode}, its message above)")
            return load(out)


_ERROR_PREFIX = f"{PROG}: error: ".encode()


def _relay_stderr(stream) -> str | None:
    """Copy a child bpe-train's stderr (warnings, progress bars) to ours as it comes, except its error
    line, which is returned so that the command reports it as its own one line."""
    error, pending = None, b""
    for chunk in iter(lambda: stream.read1(4096), b""):
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            if line.startswith(_ERROR_PREFIX):
                error = line[len(_ERROR_PREFIX):].decode("utf-8", "replace")
            else:
                sys.stderr.buffer.write(line + b"\n")
        cut = pending.rfind(b"\r") + 1  # a progress bar redrawn in place: show it now
        sys.stderr.buffer.write(pending[:cut])
        pending = pending[cut:]
        sys.stderr.flush()
    if pending:
        sys.stderr.buffer.write(pending)
    return error


@command(PROG, text_hint="fix the file or pass --errors replace to substitute U+FFFD")
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.no_special and args.special:
        raise CLIError("--no-special and --special contradict each other")
    if args.min_frequency < 1:
        raise CLIError(f"--min-frequency must be at least 1, got {args.min_frequency}")
    specials = () if args.no_special else tuple(args.special or DEFAULT_SPECIAL_TOKENS)
    recipe = TokenizerRecipe(args.files, args.builtin, args.vocab_size, args.pattern, specials, args.min_frequency, args.char,
                             args.errors, args.workers, args.max_memory)
    recipe.check()
    if Path(args.output).is_dir() or args.output.endswith(("/", os.sep)):  # (Path() would drop the slash)
        raise CLIError(f"-o {args.output}: is a directory; give a file name such as {Path(args.output) / TOKENIZER_FILE}")
    out = check_output(args.output, TOKENIZER_STAMP, "-o", inputs=args.files)

    start = time.perf_counter()
    tok, caught = recipe.train(progress=not args.quiet)
    for message in caught:
        print(f"{PROG}: warning: {message}", file=sys.stderr)
    tok.save(out)
    elapsed = time.perf_counter() - start
    print(f"trained on {recipe.source} in {elapsed:.1f}s: {describe_sizes(tok)}")
    print(f"saved {out} (fingerprint {tok.fingerprint()[:16]}); look inside with: bpe-inspect {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
