"""bpe-encode: encode text to token ids (a JSON list) or count its tokens."""

from __future__ import annotations

import json
from typing import Sequence

from tokenizers_bpe import UnknownCharacterError, load_any
from tools.cli import ArgumentParser, CLIError, HelpFormatter, add_tokenizer_arguments, command, text_argument

PROG = "bpe-encode"


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=PROG, formatter_class=HelpFormatter, description=__doc__.split(": ", 1)[1].strip())
    p.add_argument("text", nargs="?", default="-", metavar="TEXT", help="the text, or - (or nothing) to read stdin (up to 256 MiB; for a corpus use gpt-prepare)")
    add_tokenizer_arguments(p, "--tokenizer", "-t", required=True)
    p.add_argument("--count", action="store_true", help="print only the number of tokens")
    p.add_argument("--special", choices=("error", "allow", "ordinary"), default="error",
                   help="special-token strings in the text: refuse, encode as special tokens, or encode as plain text")
    return p


@command(PROG)
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tok = load_any(args.tokenizer, pattern=args.pattern)
    text = text_argument(args.text, "TEXT")
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


if __name__ == "__main__":
    raise SystemExit(main())
