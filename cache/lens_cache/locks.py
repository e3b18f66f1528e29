"""Advisory writer locks: one writer per feature store, run folder or export file.

A writer (``lens-cache build`` on its store, ``lens-train`` on its ``--out`` run folder,
``lens-cache export`` on its HDF5 file) holds ``flock(LOCK_EX)`` on ``<target>.lock``, a
file *beside* the target (so removing or replacing the target never removes the lock),
for as long as it writes. The lock file holds a small JSON naming the holder: pid, host,
command and start time. A second writer fails at once with a one-line
:class:`~lens_cache.errors.LockHeldError` naming the holder.

The kernel releases an ``flock`` when the process holding it dies, however it dies
(SIGKILL included), so a lock left by a dead process is simply taken over by the next
writer, which says whose lock it took over. The holder removes the lock file when it
finishes; a contender that opened the old file before it was removed notices (the path
now names another inode) and starts over, so two writers never both hold a lock.

With ``--workers`` (dask) the parent holds the store's lock and the workers write their
own blocks without locking (the parent assigns every block once).

Readers of a finished store (``lens-train``, ``lens-eval``) hold ``flock(LOCK_SH)`` on a second
file beside it, ``<store>.readers`` (:func:`reading`), for as long as they read; a build that
would change an existing store (a resume, a repair, ``--overwrite``) takes ``LOCK_EX`` on it
(:func:`no_readers`) and is refused in one line while anyone reads, instead of changing the
features under a training. The readers' file stays beside the store after a read (a build removes
it); it holds nothing.

Limits: the lock is advisory (only our tools take it) and local paths only. A store
at a non-local fsspec URL (``s3://``, ``gs://``, ``memory://``, ...) is not locked:
object stores have no ``flock``, so do not start two builds on one such URL. On a
filesystem without ``flock`` support the writer warns and proceeds unlocked. NFS
supports it (Linux emulates ``flock`` with POSIX locks there).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lens_cache.errors import LockHeldError

LOCK_SUFFIX = ".lock"
#: The readers' lock beside a store (see the module docstring).
READERS_SUFFIX = ".readers"

try:
    import fcntl
except ImportError:  # pragma: no cover - not a POSIX system
    fcntl = None  # type: ignore[assignment]


def lock_path(target: str | Path, suffix: str = LOCK_SUFFIX) -> Path | None:
    """``<target>.lock`` (or another ``suffix``) beside a local path or ``file://`` URL; None for other URLs
    (not locked)."""
    text = str(target)
    if "://" in text and not text.startswith("file://"):
        return None
    path = Path(text.removeprefix("file://")).expanduser().absolute()
    return path.with_name(path.name.rstrip("/") + suffix)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        data = os.pread(fd, 4096, 0)
        holder = json.loads(data.decode()) if data.strip() else {}
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def describe_holder(holder: dict[str, Any]) -> str:
    """``lens-train (pid 123 on host1, since 2025-01-01T10:00:00)``, or ``another process``."""
    if not holder.get("pid"):
        return "another process"
    where = f"pid {holder['pid']} on {holder.get('host', '?')}"
    if holder.get("since"):
        where += f", since {holder['since']}"
    return f"{holder.get('command') or 'a lens process'} ({where})"


class WriterLock:
    """An exclusive advisory lock on ``target`` (see the module docstring).

    Args:
        target: the store path / run folder / file (local path or URL).
        command: what the holder is, for the message a contender prints (``lens-cache build``).
    """

    def __init__(self, target: str | Path, *, command: str) -> None:
        self.target = str(target)
        self.command = command
        self.path = lock_path(target)
        self._fd: int | None = None
        #: holder info found in the lock file when it was taken over from a dead process
        self.previous: dict[str, Any] = {}

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock, or raise LockHeldError naming the process that holds it.

        No-op for targets that are not local (see the module docstring).
        """
        if self.path is None or fcntl is None or self._fd is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(100):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                holder = _read_holder(fd)
                os.close(fd)
                if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise LockHeldError(self._held_message(holder)) from None
                print(f"warning: cannot lock {self.path} ({error}); writing {self.target} without a lock",
                      file=sys.stderr)
                return
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:  # the holder removed this file as we opened it: start over with a fresh one
                os.close(fd)
                continue
            self.previous = _read_holder(fd)
            info = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "command": self.command,
                "argv": sys.argv,
                "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "target": self.target,
            }
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
            except OSError:  # a full disk: leave no lock file behind (the caller reports the error)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
                os.close(fd)
                raise
            self._fd = fd
            return
        raise LockHeldError(f"could not lock {self.target}: {self.path} keeps being replaced")  # pragma: no cover

    def _held_message(self, holder: dict[str, Any]) -> str:
        who = describe_holder(holder)
        if holder.get("host") == socket.gethostname() and holder.get("pid") and not _pid_alive(int(holder["pid"])):
            who += ", which has exited; a process it started still holds the lock"
        return (
            f"{self.target} is in use by {who}: wait for it to finish or stop it "
            f"(two writers would mix their output; lock file {self.path})"
        )

    def took_over(self) -> str | None:
        """A line saying whose lock was taken over, when the last holder died holding it."""
        if not self.previous.get("pid"):
            return None
        return f"took over the lock of {describe_holder(self.previous)} on {self.target}: that process is gone"

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # before unlocking: a contender then sees a new inode and retries
        os.close(fd)

    def __enter__(self) -> WriterLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


@contextlib.contextmanager
def exclusive(target: str | Path, *, command: str, log: Any = None) -> Iterator[WriterLock]:
    """Hold the writer lock of ``target`` for the ``with`` block; ``log(line)`` hears of a takeover."""
    with WriterLock(target, command=command) as lock:
        note = lock.took_over()
        if note and log is not None:
            log(note)
        yield lock


def _flock_fresh(path: Path, operation: int) -> int | None:
    """An fd of ``path`` (created if missing) holding ``flock(operation | LOCK_NB)``, retried while the file is
    replaced under us; None when the file system cannot lock. Raises BlockingIOError when someone else holds it."""
    for _ in range(100):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as error:
            if error.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
                return None  # a store we may only read: nothing can change it through us either
            raise
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise BlockingIOError(error.errno, "held") from None
            return None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)
    raise LockHeldError(f"could not lock {path}: it keeps being replaced")  # pragma: no cover


@contextlib.contextmanager
def reading(store: str | Path) -> Iterator[None]:
    """Hold a shared lock on ``store`` (a finished feature store) while reading it; refused in one line while
    a build changes it (the module docstring). No-op for stores that are not local."""
    path = lock_path(store, READERS_SUFFIX)
    if path is None or fcntl is None or not path.parent.is_dir():
        yield
        return
    try:
        fd = _flock_fresh(path, fcntl.LOCK_SH)
    except BlockingIOError:
        raise LockHeldError(f"store {store} is being rebuilt or repaired by another process: wait for that "
                            f"`lens-cache build` to finish (lock file {path})") from None
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


@contextlib.contextmanager
def no_readers(store: str | Path) -> Iterator[None]:
    """Hold the readers' lock of ``store`` exclusively while a build changes it; refused in one line while a
    training or an evaluation reads it. The file is removed at the end."""
    path = lock_path(store, READERS_SUFFIX)
    if path is None or fcntl is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = _flock_fresh(path, fcntl.LOCK_EX)
    except BlockingIOError:
        raise LockHeldError(f"store {store} is being read by another process (a lens-train or lens-eval): changing "
                            "it now would change the features under it; wait for that process to finish, or build "
                            f"into another --out (lock file {path})") from None
    try:
        yield
    finally:
        if fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # before unlocking: a reader that opened it sees a new inode and retries
            os.close(fd)
