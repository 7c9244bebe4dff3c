"""One writer per output: a lock file, created atomically (``O_CREAT | O_EXCL``), that names the
process holding it. A second writer gets an OutputError naming the holder; a lock left by a process
that no longer runs (killed, on this machine) is taken over, with a warning on the ``logging``
logger of this module.

    with OutputLock(run_dir / ".lock", f"run directory {run_dir}"):
        ...  # write the run
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import signal
import stat
import sys
import threading
import time
from pathlib import Path

from .errors import NoSpaceError, OutputError

log = logging.getLogger(__name__)

MAX_LOCK_BYTES = 4096  # a lock file of ours is one short JSON object: a larger one is not a holder
MAX_PID = 1 << 22  # Linux's largest pid_max: a lock naming another pid names no process


@contextlib.contextmanager
def signals_held():
    """SIGINT and SIGTERM held back (in the main thread) for the block: delivered as soon as it ends,
    so a step that must not be cut in two (taking or dropping a lock, forking workers) never is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _host() -> str:
    return os.uname().nodename  # (socket.gethostname() without importing socket: a lock is taken in every command)


def current_umask() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _holder() -> dict:
    return {"pid": os.getpid(), "host": _host(), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:200],
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}


class OutputLock:
    """The lock file ``path`` for the output ``what`` (a phrase for messages). Re-entrant in one process."""

    def __init__(self, path: str | os.PathLike, what: str):
        self.path, self.what = Path(path), what
        self.held = False

    def _read_text(self) -> str:
        """The lock file's text, read without blocking or following a link: a FIFO, device, directory
        or link in its place is not a lock of ours (an OutputError), and is left as it is."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
        except OSError as e:
            if e.errno != errno.ELOOP:
                raise
            fd = None
        try:
            if fd is None or not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OutputError(self.path, f"{self.path} is in the place of the lock file for {self.what} and is "
                                             "not one (not a regular file): remove it, or choose another output")
            return os.read(fd, MAX_LOCK_BYTES + 1).decode("utf-8")
        finally:
            if fd is not None:
                os.close(fd)

    def _read_holder(self) -> dict | None:
        for _ in range(3):  # a lock being written right now reads empty for a moment
            try:
                holder = json.loads(self._read_text())
                pid = holder.get("pid") if isinstance(holder, dict) else None
                if type(pid) is int and 0 < pid <= MAX_PID:  # (0 and -1 would signal groups; 10**400 overflows)
                    return holder
            except FileNotFoundError:
                return None
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
                pass
            time.sleep(0.05)
        return {}  # unreadable: left by a writer killed while writing it

    def _refuse_if_held(self, holder: dict) -> None:
        """An OutputError naming the holder, unless it is a process on this machine that no longer runs."""
        same_host = holder.get("host", _host()) == _host()
        if holder and not (same_host and not process_alive(holder["pid"])):
            where = "" if same_host else f" on {holder.get('host')}"
            raise OutputError(self.path, f"{self.what} is in use by process {holder['pid']}{where} "
                                         f"({holder.get('command', '?')}, since {holder.get('started', '?')}); "
                                         "wait for it to finish or stop it")

    def check(self) -> None:
        """Refuse now, without taking the lock, if another live process holds it."""
        holder = self._read_holder()
        if holder and not self.held and holder.get("pid") != os.getpid():
            self._refuse_if_held(holder)

    def held_elsewhere(self) -> bool:
        """Whether another live process holds this lock now (a lock that names nobody is nobody's)."""
        holder = self._read_holder()
        if not holder or (holder.get("pid") == os.getpid() and holder.get("host") == _host()):
            return False
        return holder.get("host", _host()) != _host() or process_alive(holder["pid"])

    def acquire(self) -> OutputLock:
        with signals_held():  # an interrupt halfway would leave a lock file behind
            return self._acquire()

    def _acquire(self) -> OutputLock:
        if self.held:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666 & ~current_umask())
            except FileExistsError:
                holder = self._read_holder()
                if holder is None:  # released meanwhile: try again
                    continue
                if holder.get("pid") == os.getpid() and holder.get("host") == _host():
                    return self  # this process holds it already (through another OutputLock): it releases it
                self._refuse_if_held(holder)
                self.path.unlink(missing_ok=True)
                log.warning(f"{self.what}: took over the lock of process {holder.get('pid', '?')}, which is no longer running")
                continue
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(_holder(), f)
            except BaseException as e:
                self.path.unlink(missing_ok=True)  # never leave a lock that names nobody
                if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise NoSpaceError(self.path, shutil.disk_usage(self.path.parent).free) from None
                raise
            self.held = True
            return self
        raise OutputError(self.path, f"{self.what}: could not take its lock {self.path}; try again")

    def release(self) -> None:
        with signals_held():
            if self.held:
                self.held = False
                holder = self._read_holder()
                if holder and holder.get("pid") == os.getpid():
                    self.path.unlink(missing_ok=True)

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
