"""Files in and out, for this package and the ones built on it (``gpt``, ``tools``).

Out: a file or a directory appears complete, or not at all (and an existing one is only replaced
once the new one is fully written). In: text is UTF-8, read in bounded blocks, and
invalid bytes are an ``InvalidTextError`` naming the file and the byte offset (unless the caller
asks for ``errors="replace"``); JSON files are parsed with errors that name them.
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import json
import os
import re
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from .errors import InputFileError, InvalidTextError, NoSpaceError, OutputError
from .locks import OutputLock, current_umask, process_alive

READ_BYTES = 1 << 18  # text block size when streaming a file


# ---------------------------------------------------------------------------------------------- output


@dataclass(frozen=True)
class Stamp:
    """How to tell an output of one kind from anything else: the JSON file in it whose "format" is
    ``format`` (``file`` is "" when the output is that JSON file itself, e.g. a tokenizer.json).
    ``what`` names the kind in messages ("a tokenizer", "a checkpoint")."""

    format: str
    what: str
    file: str = ""


def is_stamped(path: str | os.PathLike, stamp: Stamp) -> bool:
    """Whether ``path`` is an output of ``stamp``'s kind written by this toolkit."""
    target = Path(path) / stamp.file if stamp.file else Path(path)
    try:
        data = read_json(target)
    except ValueError:
        return False
    return isinstance(data, dict) and data.get("format") == stamp.format


def check_replaceable(path: str | os.PathLike, stamp: Stamp) -> None:
    """An OutputError unless ``path`` may be written: it does not exist, is an empty directory (for a
    directory output), or is an output of the same kind that this toolkit wrote (its stamp says so;
    file names alone never do)."""
    path = Path(path)
    mode = _stat_mode(path, OutputError)
    if mode is None:
        return
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):  # never read a device or a FIFO to look for a stamp
        raise OutputError(path, f"{path} exists and is {_kind(mode)}, not {stamp.what}; choose another path")
    is_dir_output = bool(stamp.file)
    if path.is_dir() != is_dir_output or path.is_symlink():
        kind = "a directory" if path.is_dir() else "a file"
        raise OutputError(path, f"{path} exists and is {kind}, not {stamp.what}; choose another path")
    if is_dir_output and not any(path.iterdir()):
        return
    if not is_stamped(path, stamp):
        held = ""
        if is_dir_output:
            names = sorted(entry.name for entry in path.iterdir())
            held = f" and holds {', '.join(names[:3])}{f' and {len(names) - 3} more' if len(names) > 3 else ''},"
        raise OutputError(path, f"{path} already exists{held} and is not {stamp.what} this toolkit wrote; "
                                "choose a new path, or move it away yourself")


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a file" if stat.S_ISREG(mode) else "not a regular file"


def _stat_mode(path: Path, error=InputFileError) -> int | None:
    """The mode of what ``path`` points to, None if nothing is there; a symlink loop (or a link to
    nothing) is an ``error`` naming it."""
    try:
        return path.stat().st_mode
    except FileNotFoundError:
        if path.is_symlink():
            raise error(path, f"{path} is a symbolic link to {os.readlink(path)}, which does not exist; "
                              "remove the link or choose another path") from None
        return None
    except NotADirectoryError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise error(path, f"{path}: a symbolic link loop (too many levels of links); fix or remove the link") from None
        raise


def check_not_a_broken_link(path: str | os.PathLike) -> None:
    """An InputFileError naming ``path`` when it is a symlink loop or a link to nothing: what says
    "does not exist" checks this first, so that it is never said of a link."""
    _stat_mode(Path(path))


def resolve_path(path: str | os.PathLike) -> Path:
    """``Path(path).resolve()``, with a symlink loop an InputFileError naming it (not a RuntimeError)."""
    try:
        return Path(path).resolve()
    except (RuntimeError, OSError):
        raise InputFileError(path, f"{path}: a symbolic link loop (too many levels of links); fix or remove the link") from None


def _temporary_name(name: str) -> str:
    # The writer's pid is in the name, so that a later writer can tell a dead writer's leftovers
    # (remove_stale_temporaries) from a live one's.
    return f".{name}.{os.getpid()}."


_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[^./]+\.tmp$")
_SET_ASIDE = re.compile(r"^\.(?P<name>.+)\.old-(?P<pid>\d+)$")


def remove_stale_temporaries(directory: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Remove what writers killed mid-write left in ``directory`` (for the output ``name``, or all):
    their temporary files and directories; a directory set aside for replacement is put back if the
    kill came before its replacement was in place, else removed. Returns what was removed."""
    directory = Path(directory)
    removed = []
    if not directory.is_dir():
        return removed
    for entry in directory.iterdir():
        m = _TEMPORARY.match(entry.name) or _SET_ASIDE.match(entry.name)
        if not m or (name is not None and m["name"] != name) or process_alive(int(m["pid"])):
            continue
        target = directory / m["name"]
        if m.re is _SET_ASIDE and not target.exists():
            os.replace(entry, target)  # killed between setting the old output aside and renaming the new one in
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


_NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def is_out_of_space(e: BaseException) -> bool:
    """An error that means the disk is full (an OSError, or a library's wrapped I/O error)."""
    if isinstance(e, OSError) and e.errno in _NO_SPACE_ERRNOS:
        return True
    text = str(e)
    short_write = isinstance(e, OSError) and e.errno is None and re.fullmatch(r"\d+ requested and \d+ written", text)  # numpy's tofile
    return bool(short_write) or "No space left on device" in text or "StorageFull" in text or "Disk quota exceeded" in text


def free_bytes(path: str | os.PathLike) -> int:
    path = next((p for p in (Path(path), *Path(path).parents) if p.exists()), Path(path).anchor or ".")
    return shutil.disk_usage(path).free


def _bytes_in(path: Path) -> int:
    """The bytes of a file, or of every file under a directory (what a write got onto the disk)."""
    try:
        if not path.is_dir():
            return path.stat().st_size
        return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)
    except OSError:
        return 0


@contextlib.contextmanager
def no_space_as_error(path: Path, written: Path | None = None) -> Iterator[None]:
    """A full disk inside the block becomes a NoSpaceError naming ``path``; ``written`` (the temporary
    file or directory being filled) tells how much the write needed at least."""
    try:
        yield
    except NoSpaceError as e:  # (from the lock, or a nested write): named as this output
        raise NoSpaceError(path, e.free, e.needed, e.advice, e.at_least) from None
    except Exception as e:
        if is_out_of_space(e):
            needed = _bytes_in(written) if written is not None else None
            raise NoSpaceError(path, free_bytes(path.parent), needed, at_least=True) from None
        if not isinstance(e, OSError) and "File too large" in str(e):  # (a library's I/O error: ulimit -f reached)
            raise OSError(errno.EFBIG, "File too large", str(path)) from None
        raise


def output_lock(path: Path, stamp: Stamp) -> OutputLock:
    """The lock a writer of the output ``path`` holds (a ``.NAME.lock`` file beside it)."""
    return OutputLock(path.parent / f".{path.name}.lock", f"{path} ({stamp.what})")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8", *,
                 stamp: Stamp | None = None) -> Iterator:
    """Open a temp file next to ``path``; rename it over ``path`` only if the block succeeds. The file
    gets the permissions of a new file (honouring the umask). With ``stamp`` (a user-facing output),
    an existing ``path`` is replaced only if it is an output of that kind (``check_replaceable``)
    and one process at a time writes it (``output_lock``). A full disk is a NoSpaceError."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    with no_space_as_error(path), contextlib.ExitStack() as stack:  # (the lock and the temp file too)
        if stamp is not None:
            check_replaceable(path, stamp)
            stack.enter_context(output_lock(path.absolute(), stamp))
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(parent, path.name)
        fd, tmp = tempfile.mkstemp(prefix=_temporary_name(path.name), suffix=".tmp", dir=parent)
        try:
            with no_space_as_error(path, Path(tmp)):
                os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600
                with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
                    yield f
                    f.flush()
                    os.fsync(f.fileno())
                if stamp is not None:
                    check_replaceable(path, stamp)  # again: something may have appeared there meanwhile
                os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, stamp: Stamp | None = None) -> Iterator[Path]:
    """Yield a temp directory next to ``path``; when the block succeeds it replaces ``path``.

    An existing ``path`` is moved aside first and deleted only after the rename, so a crash at any
    point leaves either the old or the new directory in place, never a half-written one (and the
    next writer cleans up after a killed one). It is replaced only if everything in it is something
    the new directory also holds: a directory with other files in it, say a project folder given as
    the output by mistake, is an OutputError naming them, and nothing is deleted. With ``stamp`` (a
    user-facing output) it must also be an output of that kind (checked before the block runs, so no
    work is wasted), and one process at a time writes it. The directory gets the permissions of a new
    one (honouring the umask); a full disk is a NoSpaceError."""
    path = Path(path)
    with no_space_as_error(path), contextlib.ExitStack() as stack:  # (the lock and the temp directory too)
        if stamp is not None:
            check_replaceable(path, stamp)
            stack.enter_context(output_lock(path.absolute(), stamp))
        elif path.exists() and not path.is_dir():
            raise OutputError(path, f"{path} exists and is not a directory; choose a new or empty directory")
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path.parent, path.name)
        tmp = Path(tempfile.mkdtemp(prefix=_temporary_name(path.name), suffix=".tmp", dir=path.parent))
        try:
            with no_space_as_error(path, tmp):
                os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700
                yield tmp
            _replace_directory(path, tmp, stamp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _honour_umask(directory: Path) -> None:
    """Give everything in ``directory`` the permissions of a new file or directory: some writers
    (safetensors, tempfile) create theirs 0600 / 0700, which would leak through the rename."""
    umask = current_umask()
    for root, dirs, files in os.walk(directory):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)


def _replace_directory(path: Path, new: Path, stamp: Stamp | None) -> None:
    _honour_umask(new)
    old = None
    if path.exists():
        if stamp is not None:
            check_replaceable(path, stamp)
        foreign = sorted(entry.name for entry in path.iterdir() if not (new / entry.name).exists())
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise OutputError(path, f"{path} already exists and holds {shown}, which replacing it would delete; "
                                    "choose a new or empty directory")
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        if old.exists():
            shutil.rmtree(old)
        os.replace(path, old)
    os.replace(new, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- input


MAX_SEED = 2**31 - 1  # seeds of torch, numpy (< 2**32, with the rank added) and random alike
MAX_NESTING = 32  # nothing we write nests deeper; a deeper file is hostile (the parsers recurse)
MAX_CONFIG_BYTES = 16 << 20  # config.json, generation.json, meta.json, run_config.json, --config files...
MAX_FILE_INT = 1 << 1000  # beyond a float's range (~1.8e308) an integer overflows every conversion (check_nesting)
MAX_TOKENIZER_BYTES = 1 << 30  # tokenizer.json, encoder.json, .tiktoken (a 2**20-token vocabulary is ~100 MB)
MAX_VOCAB_SIZE = 1 << 19  # ids of a tokenizer: 2x the largest in use (~262k); exports of 2**20 took over a minute


def check_regular_file(path: str | os.PathLike, what: str = "file", hint: str = "", max_bytes: int | None = None) -> Path:
    """``path`` as a Path if it is a regular file (through links) of at most ``max_bytes``, else an
    InputFileError saying what it is, without opening it (a FIFO would block, a device never end)."""
    path = _check_kind(Path(path), stat.S_ISREG, what, hint, "file not found")
    if max_bytes is not None and (size := path.stat().st_size) > max_bytes:
        raise InputFileError(path, f"{path}: {size:,} bytes, more than a {what} can need ({max_bytes:,}); "
                                   f"is it the right file?{f'; {hint}' if hint else ''}")
    return path


def check_directory(path: str | os.PathLike, what: str = "directory", hint: str = "") -> Path:
    """``path`` as a Path if it is a directory (through links), else an InputFileError saying what is there."""
    return _check_kind(Path(path), stat.S_ISDIR, what, hint, f"no such {what}")


def _check_kind(path: Path, is_kind, what: str, hint: str, missing: str) -> Path:
    suffix = f"; {hint}" if hint else ""
    mode = _stat_mode(path)
    if mode is None:
        raise InputFileError(path, f"{path}: {missing}{suffix}")
    if not is_kind(mode):
        raise InputFileError(path, f"{path}: is {_kind(mode)}, not a {what}{suffix}")
    return path


def check_nesting(value: object, where: str, limit: int = MAX_NESTING) -> object:
    """``value`` (parsed JSON/TOML) if its lists and objects nest at most ``limit`` deep and no integer
    in it exceeds MAX_FILE_INT, else an InputFileError (walked without recursion)."""
    stack = [([value], 0)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            raise InputFileError(where, f"{where}: nested more than {limit} levels deep; not a file this toolkit reads")
        for child in item.values() if isinstance(item, dict) else item:
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))
            elif type(child) is int and not -MAX_FILE_INT <= child <= MAX_FILE_INT:  # (would overflow every float conversion)
                raise InputFileError(where, f"{where}: an integer of {len(str(abs(child)))} digits, larger than any value this toolkit reads")
    return value


def _parse(loads, kind: str, text: str, where: str, hint: str, limit: int):
    try:
        value = loads(text)
    except RecursionError:
        raise InputFileError(where, f"{where}: nested more than {limit} levels deep; not a file this toolkit reads") from None
    except ValueError as e:  # malformed (JSONDecodeError, TOMLDecodeError), or an integer beyond 4300 digits
        raise InputFileError(where, f"{where}: not valid {kind} ({str(e).split(';')[0]}){f'; {hint}' if hint else ''}") from None
    return check_nesting(value, where, limit)


def parse_json(text: str, where: str, hint: str = "", limit: int = MAX_NESTING) -> object:
    """JSON text; malformed or too deeply nested is an InputFileError naming ``where``."""
    return _parse(json.loads, "JSON", text, where, hint, limit)


def parse_toml(text: str, where: str, hint: str = "", limit: int = MAX_NESTING) -> dict:
    """TOML text; malformed or too deeply nested is an InputFileError naming ``where``."""
    import tomllib  # (only --config files are TOML: not imported by every command)

    return _parse(tomllib.loads, "TOML", text, where, hint, limit)


def read_text(path: str | os.PathLike, what: str = "file", hint: str = "", max_bytes: int = MAX_CONFIG_BYTES) -> str:
    """A whole small UTF-8 file, checked by check_regular_file (read as it was when opened, should it grow)."""
    path = check_regular_file(path, what, hint, max_bytes)
    with open(path, "rb") as f:  # (f.read(max_bytes) would reserve max_bytes, up to a GiB, whatever the file)
        return decode_utf8(f.read(min(max_bytes, os.fstat(f.fileno()).st_size)), str(path))


def read_json(path: str | os.PathLike, hint: str = "", max_bytes: int = MAX_CONFIG_BYTES) -> object:
    """Parse a UTF-8 JSON file (every JSON file we read comes through here, or parse_json): missing,
    not a regular file, larger than ``max_bytes``, malformed or nested deeper than MAX_NESTING is an
    InputFileError (a ValueError) naming it (+ ``hint``, what to do about it)."""
    try:
        text = read_text(path, "JSON file", hint, max_bytes)
    except InvalidTextError as e:
        raise InputFileError(path, f"{path}: not valid JSON (not UTF-8 at byte {e.offset}){f'; {hint}' if hint else ''}") from None
    return parse_json(text, str(path), hint)


def read_options_file(path: str | os.PathLike, hint: str = "") -> object:
    """A small options file: TOML, or JSON for a .json suffix (through parse_toml / parse_json)."""
    path = Path(path)
    if path.suffix == ".json":
        return read_json(path, hint)
    return parse_toml(read_text(path, "TOML file", hint), str(path), hint)


def check_errors_handler(errors: str) -> None:
    """An unknown UTF-8 error handler fails now, not after reading half the corpus."""
    try:
        codecs.lookup_error(errors)
    except LookupError:
        raise ValueError(f"unknown errors handler {errors!r}; use 'strict' or 'replace'") from None


def check_text_file(path: str | os.PathLike) -> Path:
    """``path`` as a Path if it is a non-empty regular file; else a ValueError saying what it is."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a directory, not a text file; pass the files inside it")
    mode = _stat_mode(path)
    if mode is None:
        raise ValueError(f"{path}: no such file")
    if not stat.S_ISREG(mode):
        raise InputFileError(path, f"{path}: is {_kind(mode)}, not a text file; pass a regular file")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: the file is empty; pass a text corpus")
    return path


def _complete_utf8(data: bytes) -> int:
    """How many bytes of ``data`` end on a character boundary: all, less an unfinished UTF-8
    sequence at the end (an invalid byte counts as finished, so decoding reports it)."""
    for back in range(1, min(4, len(data)) + 1):
        lead = data[-back]
        if lead & 0xC0 != 0x80:  # ASCII or a lead byte: the sequence that starts here needs `size` bytes
            size = 1 if lead < 0xC0 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
            return len(data) - back if size > back else len(data)
    return len(data)


def read_file_blocks(path: str | os.PathLike, errors: str = "strict", progress=None,
                     size: int = READ_BYTES) -> Iterator[tuple[str, int]]:
    """(text, bytes) of the file in blocks of about ``size`` bytes, cut anywhere but inside a character,
    so a file that is one huge line is read in bounded memory; ``progress.update(n)`` is called with
    the bytes read. Invalid UTF-8 is an InvalidTextError with its byte offset in the file
    (``errors="replace"`` substitutes U+FFFD). A file still written to is read as it was when opened
    (a log appended to faster than it was read was read for ever)."""
    offset, tail = 0, b""
    with open(path, "rb") as f:
        left = os.fstat(f.fileno()).st_size
        while True:
            block = f.read(min(size, left))
            left -= len(block)
            if progress is not None:
                progress.update(len(block))
            data = tail + block
            n = _complete_utf8(data) if block else len(data)
            body, tail = data[:n], data[n:]
            try:
                text = body.decode("utf-8", errors=errors)
            except UnicodeDecodeError as e:
                raise InvalidTextError(str(path), offset + e.start, e.reason) from None
            if body:
                yield text, len(body)
            offset += n
            if not block:
                return


def read_text_blocks(path: str | os.PathLike, errors: str = "strict", progress=None) -> Iterator[str]:
    """The file's text, block by block (see read_file_blocks)."""
    return (text for text, _ in read_file_blocks(path, errors, progress))


def iter_file_texts(files: Sequence[str | os.PathLike], errors: str = "strict") -> Iterator[str]:
    """The text of each file, block by block (see read_file_blocks)."""
    check_errors_handler(errors)
    for p in files:
        yield from read_text_blocks(check_text_file(p), errors)


def decode_utf8(data: bytes, source: str) -> str:
    """``data`` as text; invalid UTF-8 is an InvalidTextError naming ``source`` and the offset."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidTextError(source, e.start, e.reason) from None


# ---------------------------------------------------------------------------------------------- format stamps
# Every file this toolkit writes for a reader (tokenizer.json, meta.json, a checkpoint's config.json,
# classifier.json, trainer_state.json) starts with its stamp: {"format": NAME, "format_version": N}.
VERSION_KEY = "format_version"
_LEGACY_VERSION_KEY = "version"  # the key of tokenizer.json, meta.json and trainer_state.json before 2026-12


def format_stamp(name: str, version: int) -> dict[str, object]:
    return {"format": name, VERSION_KEY: version}


def recorded_version(d: dict) -> object:
    """The format version a parsed file records (None when it records none; ``True`` is no version,
    though Python counts it equal to 1)."""
    version = d.get(VERSION_KEY, d.get(_LEGACY_VERSION_KEY))
    return repr(version) if isinstance(version, bool) else version
