"""The conventions every command follows, in one place.

Every console script is a module of ``tools`` whose ``main(argv) -> int`` is wrapped by
``command(prog)``; ``main(argv)`` returns the exit status, so tests can call commands in-process.

- **Exit codes** come from one table, ``ExitCode`` (see below), for every command.
- **A user error** (bad argument, missing or malformed file) is one line on stderr,
  ``prog: error: <what is wrong and what to do>``, and status 2. No traceback (set
  ``GPT_TOOLKIT_DEBUG=1`` to get one).
- **Library errors become that line here, and only here** (``error_message``): the libraries raise
  typed errors in their own terms, and a ``SettingError`` is shown with the setting's flag
  (``lr`` -> ``--lr``, or the command's own name for it, e.g. ``block_size`` -> ``--max-length`` in
  gpt-finetune); an ``InvalidTextError`` gets the command's advice on invalid UTF-8.
- **Messages of the libraries** (``logging`` records of ``gpt`` and ``tokenizers_bpe``) are shown while
  a command runs: information on stdout, warnings as ``prog: warning: ...`` on stderr, both through
  ``tqdm.write`` so that a progress bar in flight is not broken.
- **Ctrl-C** (SIGINT) and **SIGTERM** exit with status 130 and a one-line message, in every stage
  (SIGTERM is raised as KeyboardInterrupt while a command runs, so the same cleanup runs: temporary
  files removed, worker pools stopped; a training run installs its own handler to checkpoint first).
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import enum
import errno
import functools
import logging
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

from tqdm import tqdm

import tools
from tokenizers_bpe import TIKTOKEN_ENCODINGS
from tokenizers_bpe.errors import InvalidTextError, SettingError, byte_size, is_unicode
from tokenizers_bpe.fileio import MAX_SEED, decode_utf8
from tokenizers_bpe.membudget import available_memory
from tokenizers_bpe.patterns import resolve_pattern
from tokenizers_bpe.trainer import no_more_workers


class ExitCode(enum.IntEnum):
    """The exit status of every command, for the same kind of event."""

    OK = 0
    CHECK_FAILED = 1  # the command ran, and what it checked is not right (gpt-inspect)
    USER_ERROR = 2  # a bad argument, input file or environment: one line on stderr says what to do
    DIVERGED = 3  # training stopped: the loss or gradient became NaN/inf (the last good checkpoint is kept)
    INTERRUPTED = 130  # SIGINT/SIGTERM (a training run writes a checkpoint first), as the shell's 128 + SIGINT


class CLIError(Exception):
    """An error the command reports as one line; ``code`` is its exit status (a user error by default)."""

    def __init__(self, message: str, code: ExitCode = ExitCode.USER_ERROR):
        super().__init__(message)
        self.code = code


USER_ERRORS = (ValueError, OSError, MemoryError)  # the libraries' typed errors are ValueErrors; the machine's limits
LIBRARY_LOGGERS = ("gpt", "tokenizers_bpe", "gpt2_kernels")
DEFAULT_TEXT_HINT = "convert it to UTF-8"
# The most text a command reads from stdin (held whole: text_argument checks the memory it will take);
# corpora go through gpt-prepare, which streams them. A stream without end (/dev/zero) stops here.
MAX_STDIN_BYTES = 256 << 20


MAX_OPTION_INT = 2**63 - 1  # an integer option beyond int64 fits no tensor, count or float conversion
MAX_MESSAGE_CHARS = 1000  # a message echoing a huge value read from a file or an option is cut in the middle


def one_line(message: object) -> str:
    """``message`` on one line, at most about MAX_MESSAGE_CHARS: its start (what it is about) and its
    end (what to do) are kept."""
    text = " ".join(str(message).split())
    if len(text) <= MAX_MESSAGE_CHARS:
        return text
    head, tail = MAX_MESSAGE_CHARS * 2 // 3, MAX_MESSAGE_CHARS // 4
    return f"{text[:head]} [... {len(text) - head - tail:,} characters ...] {text[-tail:]}"


def flag(setting: str, flags: Mapping[str, str] | None = None) -> str:
    """The command-line flag of a library setting: ``--`` + the name with dashes, unless the command
    calls it something else (``flags``)."""
    return (flags or {}).get(setting) or "--" + setting.replace("_", "-")


def error_message(e: BaseException, flags: Mapping[str, str] | None = None, text_hint: str = DEFAULT_TEXT_HINT) -> str:
    """The one line a command prints for exception ``e`` (after ``prog: error: ``)."""
    if isinstance(e, CLIError):
        msg = str(e)
    elif isinstance(e, SettingError):
        msg = e.render(lambda name: flag(name, flags))
    elif isinstance(e, InvalidTextError):
        msg = f"{e}; {text_hint}"
    elif isinstance(e, MemoryError):  # (the memory checks read what the machine has, not a limit such as ulimit -v)
        msg = ("out of memory: this process could not get the memory it needs; free some, raise its limit (ulimit -v) or "
               "ask for less (a smaller model, batch or input)")
    elif isinstance(e, OSError) and e.errno == errno.ENAMETOOLONG:
        msg = (f"{e.filename or 'a path'}: a name longer than the file system allows (most allow 255 bytes a name, "
               "4096 a path); choose a shorter one")
    elif isinstance(e, OSError) and e.errno in (errno.EMFILE, errno.EFBIG):
        limit, what = ("-n", "open files") if e.errno == errno.EMFILE else ("-f", "file size")
        msg = f"{f'{e.filename}: ' if e.filename else ''}the limit on {what} of this process (ulimit {limit}) is reached; raise it"
    else:
        msg = str(e) or type(e).__name__
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) and not e.filename:  # (stdout, redirected)
            msg = "the output could not be written: no space left on the device; free some space and run the command again"
        elif isinstance(e, OSError) and e.filename and str(e.filename) not in msg:
            msg = f"{e.filename}: {msg}"
    return one_line(msg)


class _TqdmHandler(logging.Handler):
    """Library log records as command output, written between progress-bar refreshes."""

    def __init__(self, prog: str):
        super().__init__(logging.INFO)
        self.prog = prog

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            tqdm.write(f"{self.prog}: warning: {message}", file=sys.stderr)
        else:
            tqdm.write(message, file=sys.stdout)


def close_progress_bars() -> None:
    """Close every progress bar still on screen, so that the next line starts on a clean line."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _escape_unencodable(error: UnicodeEncodeError) -> tuple[str | bytes, int]:
    """The error handler of a console script's stdout: a name's bytes that are not UTF-8 (which Python
    keeps as lone surrogates) written back as they were, as ls does; a character the output's encoding
    lacks (PYTHONIOENCODING=ascii) as a backslash escape. Under the strict stdout of a UTF-8 locale
    other than C.UTF-8, printing such a name after the work was done made the command fail."""
    if all("\udc80" <= c <= "\udcff" for c in error.object[error.start:error.end]):
        with contextlib.suppress(UnicodeEncodeError):  # (an encoding such as ASCII cannot take the bytes)
            return codecs.lookup_error("surrogateescape")(error)
    return codecs.lookup_error("backslashreplace")(error)


codecs.register_error("gpt_toolkit_escape", _escape_unencodable)


def _stdout_never_fails_on_text() -> None:
    with contextlib.suppress(AttributeError, ValueError, OSError):  # (not a text stream we may reconfigure)
        sys.stdout.reconfigure(errors="gpt_toolkit_escape")


def _raise_interrupt(signum, frame) -> None:
    """SIGINT and SIGTERM while a command runs: a KeyboardInterrupt, so that its cleanup runs. A console
    script first stops the programs it runs (torch.compile's C++ compiler): subprocess.run SIGKILLs its
    child on any exception, and a compiler driver killed so leaves its temporary files and an orphaned
    compiler behind; stopped by SIGTERM first, it removes them."""
    if tools.console_script:
        _stop_descendants(spare=_pool_workers())
    raise KeyboardInterrupt


def _interrupt_again_if_swallowed(unraisable) -> None:
    """sys.unraisablehook while a command runs. The KeyboardInterrupt of a signal that arrived while a
    finalizer ran (``__del__``, a weakref callback: the `regex` module's, compiling a pattern) is printed
    as an ignored exception and lost, and the command ran on to its end (exit 0 after a SIGTERM); the
    signal is sent again, without the traceback, a moment later from a thread (sent from here, or at
    once, its handler ran, and its KeyboardInterrupt was lost, inside this hook), to be handled in the
    code the finalizer interrupted (or lost in another finalizer, and sent again)."""
    if unraisable.exc_type is not None and issubclass(unraisable.exc_type, KeyboardInterrupt):
        resend = threading.Timer(0.05, os.kill, args=(os.getpid(), signal.SIGINT))
        resend.daemon = True
        resend.start()
    else:
        sys.__unraisablehook__(unraisable)


def _pool_workers() -> set[int]:
    """The multiprocessing workers of this process (its pools stop them themselves)."""
    children = sys.modules.get("multiprocessing")
    return {child.pid for child in children.active_children()} if children else set()


def _end_now_if_console(in_main_thread: bool, code: int) -> None:
    """After an interrupt or an error, a console script's work is over and its cleanup done (every
    output is written through context managers): end the process now, with ``code``. Its worker
    processes are killed first; the libraries' exit handlers are skipped, since a multiprocessing pool's
    waited forever for a worker that an interrupt had ended in the middle of a message."""
    if not (tools.console_script and in_main_thread):
        return
    for sig in (signal.SIGINT, signal.SIGTERM):  # the process is ending: a further signal changes nothing
        signal.signal(sig, signal.SIG_IGN)
    no_more_workers()  # (before the workers are killed: a pool's thread starts replacements)
    children = sys.modules.get("multiprocessing")
    for child in children.active_children() if children else ():
        child.kill()
    _stop_descendants()
    with contextlib.suppress(ChildProcessError):  # reaped here: an ended child left to init stays a zombie a while
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(int(code))


def _descendants(pid: int, spare: set[int] = frozenset()) -> list[int]:
    """The processes under ``pid`` (children first), from /proc, but for those in ``spare`` and under
    them; none where there is no /proc."""
    parents: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            parents.setdefault(ppid, []).append(int(entry))
    found, queue = [], [pid]
    while queue:
        for child in parents.get(queue.pop(), []):
            if child not in spare:
                found.append(child)
                queue.append(child)
    return found


def _stop_descendants(grace: float = 2.0, spare: set[int] = frozenset()) -> None:
    """SIGTERM to every process this one started that still runs (torch.compile's compiler workers and
    their C++ compilers, which remove their temporary files on SIGTERM), SIGKILL to any left after
    ``grace`` seconds: a command leaves no process behind. Scanned again until none is found, since
    a thread of this process may start one meanwhile. ``spare``: processes (and what runs under them)
    left alone."""
    signalled: set[int] = set()
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:  # (an ended child stays a zombie until its owner reaps it: ended)
        running = [pid for pid in _descendants(os.getpid(), spare) if not _is_zombie(pid)]
        if not running:
            return
        for pid in set(running) - signalled:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)
        signalled.update(running)
        time.sleep(0.02)
    for pid in _descendants(os.getpid(), spare):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except (OSError, IndexError):
        return True


def command(prog: str, *, flags: Mapping[str, str] | None = None, text_hint: str = DEFAULT_TEXT_HINT):
    """Wrap a command's ``main(argv) -> int | None`` with the conventions above. ``flags`` maps
    library setting names to this command's flags where they differ from ``--setting-name``;
    ``text_hint`` is the advice appended to an invalid-UTF-8 error."""

    def decorate(fn: Callable[[Sequence[str] | None], int | None]) -> Callable[..., int]:
        @functools.wraps(fn)
        def wrapper(argv: Sequence[str] | None = None) -> int:
            debug = os.environ.get("GPT_TOOLKIT_DEBUG") == "1"
            handler = _TqdmHandler(prog)
            loggers = [logging.getLogger(name) for name in LIBRARY_LOGGERS]
            saved = [(lg, lg.level, lg.propagate) for lg in loggers]
            for lg in loggers:
                lg.addHandler(handler)
                lg.setLevel(logging.INFO)
                lg.propagate = False
            in_main_thread = threading.current_thread() is threading.main_thread()
            if tools.console_script:  # (a test or a program calling main() keeps its stdout as it set it)
                _stdout_never_fails_on_text()
            saved_signals = {}
            saved_unraisablehook = sys.unraisablehook
            if in_main_thread:  # while the command runs, both are a KeyboardInterrupt: its cleanup runs
                saved_signals = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
                sys.unraisablehook = _interrupt_again_if_swallowed
            try:
                return int(fn(argv) or ExitCode.OK)
            except SystemExit as e:  # argparse: --help (0) and usage errors (2)
                return e.code if isinstance(e.code, int) else (ExitCode.OK if e.code is None else ExitCode.USER_ERROR)
            except KeyboardInterrupt:
                close_progress_bars()
                print(f"{prog}: interrupted", file=sys.stderr)
                _end_now_if_console(in_main_thread, ExitCode.INTERRUPTED)
                return ExitCode.INTERRUPTED
            except BrokenPipeError:  # e.g. `gpt-generate ... | head`
                try:
                    sys.stdout = open(os.devnull, "w")
                except OSError:
                    pass
                return ExitCode.OK
            except (CLIError, *USER_ERRORS) as e:
                if debug:
                    raise
                close_progress_bars()
                print(f"{prog}: error: {error_message(e, flags, text_hint)}", file=sys.stderr)
                code = e.code if isinstance(e, CLIError) else ExitCode.USER_ERROR
                _end_now_if_console(in_main_thread, code)
                return code
            finally:
                tools.command_finished = True
                for sig, saved_handler in saved_signals.items():
                    signal.signal(sig, saved_handler)
                sys.unraisablehook = saved_unraisablehook
                for lg, level, propagate in saved:
                    lg.removeHandler(handler)
                    lg.setLevel(level)
                    lg.propagate = propagate

        return wrapper

    return decorate


# ---------------------------------------------------------------------------------------------- parsers


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (``prog: error: msg (see --help)``) and exit status 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        self.exit(ExitCode.USER_ERROR, f"{self.prog}: error: {one_line(message)} (see --help)\n")


def add_seed_argument(parser: argparse.ArgumentParser, default: int = 1337, help_text: str | None = None) -> None:
    parser.add_argument("--seed", type=integer(0, MAX_SEED), default=default,
                        help=help_text or "random seed; the same seed gives the same result on CPU")


def max_threads() -> int:
    """The most CPU threads or worker processes an option may ask for: 4 per core (a pool far larger
    than the machine only thrashes, OpenMP aborts the process when it cannot allocate a thread, and
    each process takes memory)."""
    return 4 * (os.cpu_count() or 1)


def path_argument(text: str) -> str:
    """An argparse type for a path: an empty one is an error (it would mean the current directory, or
    be taken for an option not given)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"an empty path ({text!r}); give a file or directory")
    return text


def output_path(text: str) -> str:
    """An argparse type for a path to write (a file or a directory): not empty, and not '-', which these
    commands read as stdin; as an output it made a file named '-' where stdout was meant."""
    if text == "-":
        raise argparse.ArgumentTypeError("'-' (stdout): this command writes files, not stdout; give a path "
                                         "(./- for a file named '-')")
    return path_argument(text)


def output_directory(text: str) -> Path:
    """An argparse type for a directory to write (see output_path)."""
    return Path(output_path(text))


def file_path(text: str) -> Path:
    """An argparse type for a file to write (see output_path): a path ending with '/' names a directory
    (Path() would drop the slash and write a file of the directory's name)."""
    if text.endswith(("/", os.sep)):
        raise argparse.ArgumentTypeError(f"{text} names a directory (it ends with '/'); give the path of a file")
    return Path(output_path(text))


def parse_bool(text: str) -> bool:
    """true/false (also 1/0, yes/no, on/off) as a flag value."""
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _ranged(convert: Callable[[str], float], kind: str, low, high, low_open: bool, high_open: bool):
    def show(bound) -> str:
        return str(bound) if isinstance(bound, int) else f"{bound:g}"

    if low is not None and high is not None:
        requirement = f"{kind} in {'(' if low_open else '['}{show(low)}, {show(high)}{')' if high_open else ']'}"
    elif low is not None or high is not None:
        requirement = (f"{kind} {'>' if low_open else '>='} {show(low)}" if low is not None
                       else f"{kind} {'<' if high_open else '<='} {show(high)}")
    else:
        requirement = kind

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        ok = value is not None and (abs(value) <= MAX_OPTION_INT if isinstance(value, int) else math.isfinite(value))
        if ok and low is not None:
            ok = value > low if low_open else value >= low
        if ok and high is not None:
            ok = value < high if high_open else value <= high
        if not ok:
            bound = f" (at most {MAX_OPTION_INT:,})" if isinstance(value, int) and high is None and value > 0 else ""
            raise argparse.ArgumentTypeError(f"must be {requirement}{bound}, got {text!r}")
        return value

    parse.requirement = requirement
    return parse


def integer(low: int | None = None, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high] (either bound may be None)."""
    return _ranged(int, "an integer", low, high, False, False)


def number(low: float | None = None, high: float | None = None, *, low_open: bool = False,
           high_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number in the range (bounds open or closed, None = unbounded)."""
    return _ranged(float, "a number", low, high, low_open, high_open)


def or_none(parse: Callable[[str], object]) -> Callable[[str], object]:
    """``parse``, or None for the word 'none'."""

    def parse_or_none(text: str):
        if text.lower() == "none":
            return None
        try:
            return parse(text)
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"must be {getattr(parse, 'requirement', 'valid')} or 'none', got {text!r}") from None

    return parse_or_none


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps descriptions and examples as written, and shows a default only where there is a
    meaningful one (not for flags that are off or options with no default)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


# ---------------------------------------------------------------------------------------------- tokenizers
# The tokenizer options of every command that takes a tokenizer by path (bpe-encode, bpe-decode,
# bpe-inspect, gpt-prepare); tokenizers_bpe.load_any is the rule for what the path may be.


def pattern_argument(text: str) -> str:
    """An argparse type: 'gpt2', 'gpt4' or a regex that compiles and never matches the empty string."""
    try:
        resolve_pattern(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def add_tokenizer_arguments(p: argparse.ArgumentParser, *names: str, **kwargs) -> None:
    """The tokenizer argument (``names``: a flag or a positional) and ``--pattern``."""
    known = ", ".join(TIKTOKEN_ENCODINGS)
    p.add_argument(*names, **kwargs, metavar="TOKENIZER",
                   help=f"a tokenizer.json, a .tiktoken rank file (tiktoken's pattern and special tokens for {known}; "
                        "other rank files: the gpt2 pattern and no special tokens), or a data or checkpoint directory "
                        "(its tokenizer.json)")
    p.add_argument("--pattern", type=pattern_argument, metavar="PATTERN",
                   help="the pre-tokenization pattern of a .tiktoken rank file: gpt2, gpt4 or a regex "
                        "(default: tiktoken's for a known file name, else gpt2)")


# ---------------------------------------------------------------------------------------------- text input


def text_argument(text: str, name: str, memory_per_byte: float = 0) -> str:
    """A text argument as given, or read from stdin when it is '-'. Invalid UTF-8 (on stdin, or in the
    argument itself, which Python keeps as lone surrogates) is an InvalidTextError naming ``name``.
    ``memory_per_byte``: the memory the command takes per byte of its text (its peak, measured): a
    text on stdin that would need more than the available memory is refused as soon as that much is
    read, rather than the process being killed for it (an argument is at most 128 KiB)."""
    if text == "-":
        stdin = getattr(sys.stdin, "buffer", None)  # None: stdin replaced by a text stream (tests)
        available = available_memory() if memory_per_byte else None
        parts, size = [], 0
        while size <= MAX_STDIN_BYTES:  # in parts: read(MAX_STDIN_BYTES + 1) reserved that much for any input
            parts.append((stdin or sys.stdin).read(min(1 << 20, MAX_STDIN_BYTES + 1 - size)))
            if not parts[-1]:
                break
            size += len(parts[-1])
            if available is not None and size * memory_per_byte > available:
                raise CLIError(f"{name} on stdin: more than {byte_size(int(available / memory_per_byte))}, the most that the "
                               f"{byte_size(available)} of memory available lets this command take (about {memory_per_byte:g} "
                               "bytes of memory per byte); give less at a time")
        data = (b"" if stdin is not None else "").join(parts)
        if len(data) > MAX_STDIN_BYTES:
            raise CLIError(f"{name} on stdin: more than {MAX_STDIN_BYTES >> 20} MiB, which this command holds in memory "
                           "whole; give it less (for a corpus, gpt-prepare streams any size)")
        return data if stdin is None else decode_utf8(data, "stdin")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        try:  # the bytes as the user gave them (Python keeps undecodable bytes as surrogate escapes)
            os.fsencode(text).decode("utf-8")
        except UnicodeDecodeError as d:
            raise InvalidTextError(name, d.start, d.reason) from None
        except UnicodeEncodeError:
            pass
        raise InvalidTextError(name, len(text[: e.start].encode("utf-8")), e.reason) from None
    return text


def unicode_text(text: str) -> str:
    """An argparse type: text as given, refused where it holds bytes that are not UTF-8 (which Python
    keeps as lone surrogates; a tokenizer would have made U+FFFD of them silently)."""
    if not is_unicode(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not valid UTF-8 text (a byte of another encoding); give it in UTF-8")
    return text


def choice(*values: str) -> Callable[[str], str]:
    """An argparse type: one of ``values`` (like ``choices=``, but usable in a config file's checks too)."""

    def parse(text: str) -> str:
        if text not in values:
            raise argparse.ArgumentTypeError(f"must be one of {', '.join(values)}, got {text!r}")
        return text

    parse.requirement = f"one of {', '.join(values)}"
    return parse


def device_name(text: str) -> str:
    """An argparse type: auto, cpu, cuda or cuda:N."""
    if text in ("auto", "cpu", "cuda") or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda or cuda:N, got {text!r}")
