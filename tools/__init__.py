"""Commands and helpers that glue the stages together: CLI conventions, atomic file output,
the built-in corpus, data preparation, weight conversion and checkpoint inspection.

Importing `tools` (or `tools.cli`, `tools.fileio`, `tools.corpus`) never imports torch, so the
tokenizer commands stay light."""

import atexit as _atexit
import os as _os
import signal as _signal
import sys as _sys


def _exit_interrupted(signum, frame) -> None:
    """Ctrl-C or SIGTERM while a console script starts (imports) or ends, outside the command itself
    (tools.cli.command handles both while it runs): nothing to clean up, so exit 130 at once, with the
    one line every interrupted command prints and no traceback."""
    try:
        _os.write(2, f"{_os.path.basename(_sys.argv[0])}: interrupted\n".encode())
    finally:
        _os._exit(130)


def _ignore_interrupts_at_exit() -> None:
    """The command is over (its outputs written, its exit status chosen): a signal now changes nothing.
    Python's shutdown puts a Python-level handler back to the default action, under which a Ctrl-C
    in its last milliseconds (or torch's teardown) killed the process by the signal instead of letting
    it exit with its status; an ignored signal is left ignored."""
    for sig in (_signal.SIGINT, _signal.SIGTERM):
        _signal.signal(sig, _signal.SIG_IGN)


if _sys.argv and _os.path.basename(_sys.argv[0]).startswith(("gpt-", "bpe-")):  # a console script, not a test
    for _sig in (_signal.SIGINT, _signal.SIGTERM):
        _signal.signal(_sig, _exit_interrupted)
    _atexit.register(_ignore_interrupts_at_exit)
