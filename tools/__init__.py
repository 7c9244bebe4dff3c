"""Commands and helpers that glue the stages together: CLI conventions, atomic file output,
the built-in corpus, data preparation, weight conversion and checkpoint inspection.

Importing `tools` (or `tools.cli`, `tools.fileio`, `tools.corpus`) never imports torch, so the
tokenizer commands stay light."""

import atexit as _atexit
import os as _os
import signal as _signal
import sys as _sys


command_finished = False  # set by tools.cli.command once the command has run and chosen its exit status


def _exit_interrupted(signum, frame) -> None:
    """Ctrl-C or SIGTERM while a console script starts (imports) or ends, outside the command itself
    (tools.cli.command handles both while it runs). Before the command: nothing to clean up, so exit
    130 at once, with the one line every interrupted command prints and no traceback. After it (its
    outputs written, its status chosen): the signal changes nothing, the process exits with that status
    (an interrupt then said "interrupted" and 130 over a complete output)."""
    if command_finished:
        return
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


# A console script, not a test calling main(argv): its process is the command's own, so after an
# interrupt or an error the command ends it at once (tools.cli.command), without the libraries' exit
# handlers (a multiprocessing pool's could wait forever on a worker it had just ended).
console_script = bool(_sys.argv) and _os.path.basename(_sys.argv[0]).startswith(("gpt-", "bpe-"))
if console_script:
    for _sig in (_signal.SIGINT, _signal.SIGTERM):
        _signal.signal(_sig, _exit_interrupted)
    _atexit.register(_ignore_interrupts_at_exit)
