"""Commands and helpers that glue the stages together: CLI conventions, atomic file output,
the built-in corpus, data preparation, weight conversion and checkpoint inspection.

Importing `tools` (or `tools.cli`, `tools.fileio`, `tools.corpus`) never imports torch, so the
tokenizer commands stay light."""

import atexit as _atexit
import os as _os
import resource as _resource
import signal as _signal
import sys as _sys


# The address space PyTorch takes to load (import torch needs about 680 MB): a gpt-* command under a
# smaller `ulimit -v` ended in an ImportError or MemoryError traceback, or in C++'s std::bad_alloc abort.
TORCH_ADDRESS_SPACE = 768 << 20
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


def _standard_streams_opened() -> None:
    """A standard stream the caller closed (`<&-`, `>&-`) reads or writes /dev/null. Python left
    sys.stdin or sys.stdout None (reading or writing it failed with an AttributeError traceback), and
    the first file the command opened took that descriptor, so what it printed went into that file."""
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        try:
            _os.fstat(fd)
        except OSError:
            null = _os.open(_os.devnull, _os.O_RDWR)  # (the lowest free descriptor: fd itself)
            if null != fd:
                _os.dup2(null, fd)
                _os.close(null)
            setattr(_sys, name, open(fd, mode, encoding="utf-8", errors="backslashreplace", closefd=False))


def _one_line_and_exit(message: str) -> None:
    _os.write(2, f"{_os.path.basename(_sys.argv[0])}: error: {message}\n".encode(errors="backslashreplace"))
    _os._exit(2)


def _check_address_space() -> None:
    soft, _ = _resource.getrlimit(_resource.RLIMIT_AS)
    if soft != _resource.RLIM_INFINITY and soft < TORCH_ADDRESS_SPACE:
        _one_line_and_exit(f"the address-space limit of this process (ulimit -v {soft >> 10}) is below the "
                           f"{TORCH_ADDRESS_SPACE >> 20} MiB PyTorch needs to load; raise it (ulimit -v {TORCH_ADDRESS_SPACE >> 10} or more)")


def _environment_errors_in_one_line(kind, value, traceback) -> None:
    """A library that cannot be loaded, or memory that runs out while one loads (outside the command's
    own error handling, tools.cli.command): one line and exit 2, as any error of the environment. Any
    other uncaught exception is a bug in this toolkit: its traceback is what a report needs."""
    if isinstance(value, MemoryError) or (isinstance(value, ImportError) and "failed to map segment" in str(value)):
        _one_line_and_exit("out of memory while loading the libraries this command needs; free some memory or raise this "
                           "process's limit (ulimit -v)")
    if isinstance(value, ImportError):
        _one_line_and_exit(f"a library this command needs cannot be loaded ({' '.join(str(value).split())}); reinstall the toolkit "
                           "(pip install -e .) in this environment")
    _sys.__excepthook__(kind, value, traceback)


# A console script, not a test calling main(argv): its process is the command's own, so after an
# interrupt or an error the command ends it at once (tools.cli.command), without the libraries' exit
# handlers (a multiprocessing pool's could wait forever on a worker it had just ended).
console_script = bool(_sys.argv) and _os.path.basename(_sys.argv[0]).startswith(("gpt-", "bpe-"))
if console_script:
    _standard_streams_opened()
    _sys.excepthook = _environment_errors_in_one_line
    if _os.path.basename(_sys.argv[0]).startswith("gpt-"):  # (the bpe-* commands never load torch)
        _check_address_space()
    for _sig in (_signal.SIGINT, _signal.SIGTERM):
        _signal.signal(_sig, _exit_interrupted)
    _atexit.register(_ignore_interrupts_at_exit)
