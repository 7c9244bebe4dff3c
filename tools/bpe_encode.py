"""bpe-encode: encode text to token ids (a JSON list) or count its tokens."""

from __future__ import annotations

import json
import sys
from typing import Iterator, Sequence

import regex

from tokenizers_bpe import GPT2_PATTERN, GPT4_PATTERN, BPETokenizer, CharTokenizer, Tokenizer, UnknownCharacterError, load_any
from tokenizers_bpe.patterns import chunk_cut_regex, special_token_regex
from tools.cli import ArgumentParser, CLIError, HelpFormatter, add_tokenizer_arguments, command, text_argument

PROG = "bpe-encode"
BLOCK_CHARS = 1 << 20  # text encoded at a time: only one block's ids are held (where the text can be cut)
# Peak memory per byte of text on stdin: 3.1 measured on 200 MB of English text (the bytes read, the
# text, a block's ids; a text that cannot be cut is encoded whole, its UTF-8 copy and ids on top).
MEMORY_PER_TEXT_BYTE = 4


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=PROG, formatter_class=HelpFormatter, description=__doc__.split(": ", 1)[1].strip())
    p.add_argument("text", nargs="?", default="-", metavar="TEXT", help="the text, or - (or nothing) to read stdin (up to 256 MiB; for a corpus use gpt-prepare)")
    add_tokenizer_arguments(p, "--tokenizer", "-t", required=True)
    p.add_argument("--count", action="store_true", help="print only the number of tokens")
    p.add_argument("--special", choices=("error", "allow", "ordinary"), default="error",
                   help="special-token strings in the text: refuse, encode as special tokens, or encode as plain text")
    return p


def encoded_blocks(tok: Tokenizer, text: str, special: str) -> Iterator[list[int]]:
    """The ids of ``text`` a block at a time; together they are ``tok.encode``'s (``special``: as
    --special). Blocks are cut only where the tokenizer's pieces end anyway (the GPT-2 and GPT-4
    patterns, or a char-level tokenizer: tokenizers_bpe.patterns.chunk_cut_regex) and never inside a
    special token; with a custom pattern, for which no cut is known to keep the tokens, each stretch
    between special tokens is encoded whole."""
    specials = special_token_regex(tok.special_tokens_set) if tok.special_tokens_set and special != "ordinary" else None
    if special == "error" and specials is not None and (found := specials.search(text)):
        raise CLIError(f"the text contains a special token such as {found.group()!r}; pass --special allow or --special ordinary")
    if special != "allow":
        specials = None
    if isinstance(tok, CharTokenizer):  # found before any block is written: not half a JSON list, then the error
        unknown = regex.compile("[^" + "".join(map(regex.escape, tok.chars)) + "]")
        for start, end, _ in _stretches(text, specials):
            if found := unknown.search(text, start, end):
                raise UnknownCharacterError(found.group(), len(tok.chars))
    pattern = tok.pattern if isinstance(tok, BPETokenizer) else None
    cuts = chunk_cut_regex(pattern) if len(text) > BLOCK_CHARS and pattern in (None, GPT2_PATTERN, GPT4_PATTERN) else None
    for start, end, special_token in _stretches(text, specials):
        yield from _ordinary_blocks(tok, text, start, end, cuts)
        if special_token is not None:
            yield [tok.special_tokens[special_token]]


def _stretches(text: str, specials) -> Iterator[tuple[int, int, str | None]]:
    """(start, end, the special token after it or None) of each stretch of ordinary text."""
    start = 0
    for match in specials.finditer(text) if specials is not None else ():
        yield start, match.start(), match.group()
        start = match.end()
    yield start, len(text), None


def _ordinary_blocks(tok: Tokenizer, text: str, start: int, end: int, cuts) -> Iterator[list[int]]:
    while end - start > BLOCK_CHARS and cuts is not None and (cut := cuts.search(text, start + BLOCK_CHARS, end)):
        yield tok.encode_ordinary(text[start : cut.start()])
        start = cut.start()
    if end > start:
        yield tok.encode_ordinary(text[start:end])


@command(PROG)
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tok = load_any(args.tokenizer, pattern=args.pattern)
    text = text_argument(args.text, "TEXT", MEMORY_PER_TEXT_BYTE)
    count, out = 0, sys.stdout
    try:
        for ids in encoded_blocks(tok, text, args.special):
            if ids and not args.count:  # the JSON list json.dumps writes, a block at a time
                out.write(("[" if not count else ", ") + json.dumps(ids)[1:-1])
            count += len(ids)
    except UnknownCharacterError as e:
        raise CLIError(f"TEXT: {e}; --tokenizer {args.tokenizer} was trained on other text") from None
    out.write(f"{count}\n" if args.count else ("]\n" if count else "[]\n"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
