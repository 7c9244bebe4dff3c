"""Conventions every command follows.

- A user error (bad argument, missing or malformed file) is one line on stderr,
  ``prog: error: <what is wrong and what to do>``, and exit status 2. No traceback.
  Set ``GPT_TOOLKIT_DEBUG=1`` to get the traceback anyway.
- Ctrl-C exits with status 130 and a one-line message.
- ``main(argv)`` returns the exit status, so tests can call commands in-process.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from typing import Callable, Sequence


class CLIError(Exception):
    """A user error. The message is shown as one line; the command exits with status 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (``prog: error: msg (see --help)``) and exit status 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


USER_ERRORS = (CLIError, ValueError, OSError)


def one_line(message: object) -> str:
    return " ".join(str(message).split())


def command(prog: str) -> Callable[[Callable[[Sequence[str] | None], int | None]], Callable[..., int]]:
    """Wrap a command's ``main(argv) -> int | None`` with the error conventions above."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(argv: Sequence[str] | None = None) -> int:
            debug = os.environ.get("GPT_TOOLKIT_DEBUG") == "1"
            try:
                rc = fn(argv)
            except SystemExit as e:  # argparse: --help (0) and usage errors (2)
                return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
            except KeyboardInterrupt:
                print(f"{prog}: interrupted", file=sys.stderr)
                return 130
            except BrokenPipeError:  # e.g. `gpt-generate ... | head`
                try:
                    sys.stdout = open(os.devnull, "w")
                except OSError:
                    pass
                return 0
            except USER_ERRORS as e:
                if debug:
                    raise
                msg = one_line(e) if str(e) else type(e).__name__
                if isinstance(e, OSError) and e.filename and str(e.filename) not in msg:
                    msg = f"{e.filename}: {msg}"
                print(f"{prog}: error: {msg}", file=sys.stderr)
                return 2
            return int(rc or 0)

        return wrapper

    return decorate


def add_seed_argument(parser: argparse.ArgumentParser, default: int = 1337) -> None:
    parser.add_argument("--seed", type=int, default=default, help="random seed; the same seed gives the same result on CPU")
