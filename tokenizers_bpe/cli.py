"""Commands: bpe-train, bpe-encode, bpe-decode, bpe-inspect (conventions in tools/cli.py)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

from tools.cli import ArgumentParser, CLIError, command
from tools.corpus import BUILTIN_CORPORA, iter_builtin_texts, plays

from .char import UnknownCharacterError
from .formats import load
from .patterns import PATTERNS
from .tokenizer import BPETokenizer, Tokenizer
from .trainer import DEFAULT_MIN_FREQUENCY, DEFAULT_SPECIAL_TOKENS, iter_file_texts, train, train_char, train_from_iterator

TRAIN_EXAMPLES = """examples:
  bpe-train corpus.txt --vocab-size 4096 -o tokenizer.json
  bpe-train --builtin shakespeare --vocab-size 4096 -o tokenizer.json   (also: no FILE at all)
  bpe-train a.txt b.txt --pattern gpt4 --special '<|endoftext|>' --special '<|pad|>'
  bpe-train input.txt --char -o chars.json

Training is deterministic: the same input and arguments give a byte-identical file. Ties between
pairs with equal counts go to the smallest (left id, right id); see tokenizers_bpe/trainer.py."""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the examples' layout, and shows a default only where there is a meaningful one."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _print_warnings(prog: str, caught) -> None:
    for w in caught:
        print(f"{prog}: warning: {w.message}", file=sys.stderr)


def _check_output(path: str) -> Path:
    out = Path(path)
    if out.is_dir():
        raise CLIError(f"-o {out}: is a directory; give a file name such as {out / 'tokenizer.json'}")
    parent = out.parent if str(out.parent) else Path(".")
    if parent.exists() and not os.access(parent, os.W_OK):
        raise CLIError(f"-o {out}: cannot write to {parent}; choose another path")
    return out


@command("bpe-train")
def train_main(argv=None) -> int:
    p = ArgumentParser(
        prog="bpe-train",
        formatter_class=_HelpFormatter,
        description="Train a byte-level BPE (or char-level) tokenizer and save it as tokenizer.json.",
        epilog=TRAIN_EXAMPLES,
    )
    p.add_argument("files", nargs="*", metavar="FILE", help="UTF-8 text files (default: the built-in corpus)")
    p.add_argument("--builtin", choices=BUILTIN_CORPORA, help="train on a built-in corpus (used when no FILE is given)")
    p.add_argument("--vocab-size", type=int, default=4096, help="total ids: 256 bytes + merges + special tokens")
    p.add_argument("-o", "--output", default="tokenizer.json", help="where to write the tokenizer")
    p.add_argument("--pattern", default="gpt2", help=f"pre-tokenization regex: {' or '.join(PATTERNS)} (tiktoken's) or a regex")
    p.add_argument("--special", action="append", metavar="TOKEN", help=f"a special token (repeatable; default {' '.join(DEFAULT_SPECIAL_TOKENS)})")
    p.add_argument("--no-special", action="store_true", help="no special tokens at all")
    p.add_argument("--min-frequency", type=int, default=DEFAULT_MIN_FREQUENCY, help="stop when the best pair occurs fewer times")
    p.add_argument("--char", action="store_true", help="a character-level tokenizer (one id per character) instead of BPE")
    p.add_argument("--errors", choices=("strict", "replace"), default="strict", help="invalid UTF-8: fail, or replace with U+FFFD")
    p.add_argument("--workers", type=int, help="pre-tokenization processes (default: all cores; 1 for files under 4 MB)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--seed", type=int, default=1337, help="accepted like every command's --seed; training has no randomness, so any seed gives the same file")
    args = p.parse_args(argv)

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
    out = _check_output(args.output)
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
    _print_warnings("bpe-train", caught)
    tok.save(out)
    elapsed = time.perf_counter() - start
    print(f"trained on {source} in {elapsed:.1f}s: {_describe_sizes(tok)}")
    print(f"saved {out} (fingerprint {tok.fingerprint()[:16]}); look inside with: bpe-inspect {out}")
    return 0


def _describe_sizes(tok: Tokenizer) -> str:
    n_special = len(tok.special_tokens)
    if isinstance(tok, BPETokenizer):
        return f"{tok.n_vocab} ids = 256 bytes + {len(tok.mergeable_ranks) - 256} merges + {n_special} special"
    return f"{tok.n_vocab} ids = {tok.n_vocab - n_special} characters + {n_special} special"


def _read_input(text: str | None) -> str:
    if text is None or text == "-":
        return sys.stdin.read()
    return text


@command("bpe-encode")
def encode_main(argv=None) -> int:
    p = ArgumentParser(prog="bpe-encode", formatter_class=_HelpFormatter, description="Encode text to token ids (a JSON list) or count its tokens.")
    p.add_argument("text", nargs="?", metavar="TEXT", help="the text, or - (or nothing) to read stdin")
    p.add_argument("--tokenizer", "-t", required=True, help="a tokenizer.json")
    p.add_argument("--count", action="store_true", help="print only the number of tokens")
    p.add_argument(
        "--special",
        choices=("error", "allow", "ordinary"),
        default="error",
        help="special-token strings in the text: refuse, encode as special tokens, or encode as plain text",
    )
    args = p.parse_args(argv)
    tok = load(args.tokenizer)
    text = _read_input(args.text)
    try:
        if args.special == "allow":
            ids = tok.encode(text, allowed_special="all")
        elif args.special == "ordinary":
            ids = tok.encode_ordinary(text)
        else:
            ids = tok.encode(text)
    except UnknownCharacterError as e:
        raise CLIError(f"TEXT: {e}; --tokenizer {args.tokenizer} was trained on other text") from None
    except ValueError as e:
        if "special token" not in str(e):
            raise
        raise CLIError(
            "the text contains a special token such as "
            f"{next(t for t in tok.special_tokens if t in text)!r}; pass --special allow or --special ordinary"
        ) from None
    print(len(ids) if args.count else json.dumps(ids))
    return 0


@command("bpe-decode")
def decode_main(argv=None) -> int:
    p = ArgumentParser(prog="bpe-decode", formatter_class=_HelpFormatter, description="Decode token ids (a JSON list such as [15496, 995]) to text.")
    p.add_argument("ids", nargs="?", metavar="IDS", help="a JSON list of ids, or - (or nothing) to read stdin")
    p.add_argument("--tokenizer", "-t", required=True, help="a tokenizer.json")
    args = p.parse_args(argv)
    tok = load(args.tokenizer)
    raw = _read_input(args.ids)
    try:
        ids = json.loads(raw)
    except json.JSONDecodeError:
        raise CLIError(f"IDS must be a JSON list of integers such as [15496, 995], got {raw.strip()[:40]!r}") from None
    if not isinstance(ids, list) or not all(type(i) is int for i in ids):
        raise CLIError(f"IDS must be a JSON list of integers such as [15496, 995], got {raw.strip()[:40]!r}")
    text = tok.decode(ids)
    sys.stdout.write(text)
    if sys.stdout.isatty() and not text.endswith("\n"):
        sys.stdout.write("\n")
    return 0


def _show(token: bytes, width: int = 32) -> str:
    text = token.decode("utf-8", errors="backslashreplace")
    return repr(text) if len(text) <= width else f"{text[:width]!r}...({len(token)} bytes)"


def _show_merges(merges, by_rank) -> str:
    return ", ".join(f"{_show(by_rank[a])}+{_show(by_rank[b])}" for a, b in merges)


@command("bpe-inspect")
def inspect_main(argv=None) -> int:
    p = ArgumentParser(prog="bpe-inspect", formatter_class=_HelpFormatter, description="Show what a tokenizer learned: sizes, special tokens, longest tokens, merges, compression.")
    p.add_argument("tokenizer", metavar="TOKENIZER", help="a tokenizer.json")
    p.add_argument("--sample", metavar="FILE", help="measure compression on this UTF-8 file (default: about 1 MB of the built-in corpus)")
    p.add_argument("--top", type=int, default=10, help="how many tokens/merges to list")
    args = p.parse_args(argv)
    if args.top < 1:
        raise CLIError(f"--top must be at least 1, got {args.top}")
    tok = load(args.tokenizer)
    print(f"{args.tokenizer}: {tok.type} tokenizer, fingerprint {tok.fingerprint()[:16]}")
    print(f"  vocabulary     {_describe_sizes(tok)}")
    specials = ", ".join(f"{t}={i}" for t, i in tok.special_tokens.items()) or "none"
    print(f"  special tokens {specials}")
    if isinstance(tok, BPETokenizer):
        named = next((name for name, rx in PATTERNS.items() if rx == tok.pattern), None)
        print(f"  pattern        {named + ' (as tiktoken)' if named else repr(tok.pattern)}")
        ranks = tok.mergeable_ranks
        lengths = sorted(len(t) for t in ranks)
        print(f"  token bytes    mean {sum(lengths) / len(lengths):.2f}, median {lengths[len(lengths) // 2]}, max {lengths[-1]}")
        longest = sorted(ranks, key=lambda t: (-len(t), ranks[t]))[: args.top]
        print("  longest tokens " + ", ".join(f"{_show(t)} ({ranks[t]})" for t in longest))
        by_rank = sorted(ranks, key=ranks.get)
        merges = tok.merges
        print(f"  first merges   {_show_merges(merges[: args.top], by_rank)}")
        print(f"  last merges    {_show_merges(merges[-args.top :], by_rank)}")
    else:
        print(f"  characters     {''.join(tok.chars)!r}")
    sample, label = _sample(args.sample)
    try:
        ids = tok.encode(sample, disallowed_special=())
    except ValueError as e:  # e.g. a char-level vocabulary that lacks a character of the sample
        print(f"  compression    not measurable on {label}: {e}")
        return 0
    n_bytes = len(sample.encode("utf-8"))
    print(
        f"  compression    {label}: {n_bytes:,} bytes -> {len(ids):,} tokens = "
        f"{n_bytes / max(1, len(ids)):.2f} bytes/token, {len(sample) / max(1, len(ids)):.2f} chars/token"
    )
    return 0


def _sample(path: str | None) -> tuple[str, str]:
    if path is not None:
        return "".join(iter_file_texts([path])), path
    texts, size = [], 0
    for play in plays():
        texts.append(play.text())
        size += len(texts[-1])
        if size >= 1_000_000:
            break
    return "\n".join(texts), f"the first {len(texts)} plays of the built-in corpus"
