"""bpe-decode: decode token ids (a JSON list such as [15496, 995]) to text."""

from __future__ import annotations

import json
import sys
from typing import Sequence

from tokenizers_bpe import load_any
from tools.cli import ArgumentParser, CLIError, HelpFormatter, add_tokenizer_arguments, command, text_argument

PROG = "bpe-decode"
MEMORY_PER_IDS_BYTE = 26  # peak memory per byte of the JSON list (measured on 195 MB of ids: the list and the text)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=PROG, formatter_class=HelpFormatter, description=__doc__.split(": ", 1)[1].strip())
    p.add_argument("ids", nargs="?", default="-", metavar="IDS", help="a JSON list of ids, or - (or nothing) to read stdin (up to 256 MiB)")
    add_tokenizer_arguments(p, "--tokenizer", "-t", required=True)
    return p


@command(PROG)
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tok = load_any(args.tokenizer, pattern=args.pattern)
    raw = text_argument(args.ids, "IDS", MEMORY_PER_IDS_BYTE)
    try:
        ids = json.loads(raw)
    except (ValueError, RecursionError):  # (ValueError: also an integer of more than 4300 digits)
        raise CLIError(f"IDS must be a JSON list of integers such as [15496, 995], got {raw.strip()[:40]!r}") from None
    if not isinstance(ids, list) or not all(type(i) is int for i in ids):
        raise CLIError(f"IDS must be a JSON list of integers such as [15496, 995], got {raw.strip()[:40]!r}")
    text = tok.decode(ids)
    sys.stdout.write(text)
    if sys.stdout.isatty() and not text.endswith("\n"):
        sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
