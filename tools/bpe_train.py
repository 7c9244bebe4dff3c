"""bpe-train: train a byte-level BPE (or char-level) tokenizer and save it as tokenizer.json."""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path
from typing import Sequence

from tokenizers_bpe import TOKENIZER_FILE, Tokenizer, train, train_char, train_from_iterator
from tokenizers_bpe.fileio import iter_file_texts
from tokenizers_bpe.patterns import PATTERNS
from tokenizers_bpe.tokenizer import TOKENIZER_STAMP
from tokenizers_bpe.trainer import DEFAULT_MIN_FREQUENCY, DEFAULT_SPECIAL_TOKENS
from tools.bpe_inspect import describe_sizes
from tools.cli import ArgumentParser, CLIError, HelpFormatter, add_seed_argument, command, pattern_argument
from tools.corpus import BUILTIN_CORPORA, iter_builtin_texts
from tools.outputs import check_output

PROG = "bpe-train"
EXAMPLES = """examples:
  bpe-train corpus.txt --vocab-size 4096 -o tokenizer.json
  bpe-train --builtin shakespeare --vocab-size 4096 -o tokenizer.json   (also: no FILE at all)
  bpe-train a.txt b.txt --pattern gpt4 --special '<|endoftext|>' --special '<|pad|>'
  bpe-train input.txt --char -o chars.json

Training is deterministic: the same input and arguments give a byte-identical file. Ties between
pairs with equal counts go to the smallest (left id, right id); see tokenizers_bpe/trainer.py."""


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=PROG, formatter_class=HelpFormatter, description=__doc__.split(": ", 1)[1].strip(), epilog=EXAMPLES)
    p.add_argument("files", nargs="*", metavar="FILE", help="UTF-8 text files (default: the built-in corpus)")
    p.add_argument("--builtin", choices=BUILTIN_CORPORA, help="train on a built-in corpus (used when no FILE is given)")
    p.add_argument("--vocab-size", type=int, default=4096, help="total ids: 256 bytes + merges + special tokens")
    p.add_argument("-o", "--output", default=TOKENIZER_FILE, help="where to write the tokenizer")
    p.add_argument("--pattern", default="gpt2", type=pattern_argument, help=f"pre-tokenization regex: {' or '.join(PATTERNS)} (tiktoken's) or a regex")
    p.add_argument("--special", action="append", metavar="TOKEN", help=f"a special token (repeatable; default {' '.join(DEFAULT_SPECIAL_TOKENS)})")
    p.add_argument("--no-special", action="store_true", help="no special tokens at all")
    p.add_argument("--min-frequency", type=int, default=DEFAULT_MIN_FREQUENCY, help="stop when the best pair occurs fewer times")
    p.add_argument("--char", action="store_true", help="a character-level tokenizer (one id per character) instead of BPE")
    p.add_argument("--errors", choices=("strict", "replace"), default="strict", help="invalid UTF-8: fail, or replace with U+FFFD")
    p.add_argument("--workers", type=int, help="pre-tokenization processes (default: all cores; 1 for files under 4 MB)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_seed_argument(p, help_text="accepted like every command's --seed; training has no randomness, so any seed gives the same file")
    return p


@command(PROG, text_hint="fix the file or pass --errors replace to substitute U+FFFD")
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.files and args.builtin:
        raise CLIError("give corpus files or --builtin, not both")
    if args.no_special and args.special:
        raise CLIError("--no-special and --special contradict each other")
    if args.min_frequency < 1:
        raise CLIError(f"--min-frequency must be at least 1, got {args.min_frequency}")
    if args.workers is not None and args.workers < 1:
        raise CLIError(f"--workers must be at least 1, got {args.workers}")
    specials = () if args.no_special else tuple(args.special or DEFAULT_SPECIAL_TOKENS)
    if "" in specials:
        raise CLIError("--special needs a non-empty token")
    if Path(args.output).is_dir():
        raise CLIError(f"-o {args.output}: is a directory; give a file name such as {Path(args.output) / TOKENIZER_FILE}")
    out = check_output(args.output, TOKENIZER_STAMP, "-o", inputs=args.files)
    builtin = None if args.files else (args.builtin or BUILTIN_CORPORA[0])
    source = f"built-in corpus '{builtin}'" if builtin else ", ".join(args.files)

    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if args.char:
            texts = iter_builtin_texts(builtin) if builtin else iter_file_texts(args.files, args.errors)
            tok: Tokenizer = train_char(texts, special_tokens=specials)
        else:
            options = dict(pattern=args.pattern, special_tokens=specials, min_frequency=args.min_frequency,
                           progress=not args.quiet, workers=args.workers)
            if builtin:
                tok = train_from_iterator(iter_builtin_texts(builtin), args.vocab_size, **options)
            else:
                tok = train(args.files, args.vocab_size, errors=args.errors, **options)
    for w in caught:
        print(f"{PROG}: warning: {w.message}", file=sys.stderr)
    tok.save(out)
    elapsed = time.perf_counter() - start
    print(f"trained on {source} in {elapsed:.1f}s: {describe_sizes(tok)}")
    print(f"saved {out} (fingerprint {tok.fingerprint()[:16]}); look inside with: bpe-inspect {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
