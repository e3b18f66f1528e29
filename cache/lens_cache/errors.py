"""The errors the command-line tools print as one line for the user (exit code 2).

Everything a user can cause and fix (a wrong option, a missing file or checkpoint, a
store of another build, a damaged store, a folder another process is writing) raises a
:class:`UserError`; the CLIs catch exactly these types (and ``lens_manifests.ManifestError``)
and print ``error: <message>``. Any other exception is a bug and keeps its traceback.

Two kinds of error are the user's without being raised as a ``UserError``:

* a sample the backbone cannot take (:class:`BadSampleError`): a build skips it and
  lists it in the store's failure list; an interactive command refuses it in one line;
* an output that cannot be written because its disk is full (``ENOSPC``, ``EDQUOT``)
  or read-only (``EROFS``): the libraries underneath raise it in their own ways (an
  ``OSError``, safetensors' ``SafetensorError``, torch's ``unexpected pos``), so
  :func:`storage_problem` recognises it and :func:`output_error` turns it into one line
  naming the path and the fix. Writers remove their temporary files before it reaches
  the user.
"""

from __future__ import annotations

import errno
import re
from pathlib import Path


class UserError(Exception):
    """A problem the user caused and can fix; the message is one line saying how."""


class UsageError(UserError, ValueError):
    """A bad argument: an option value out of range, an unknown name (still a ValueError for callers)."""


class LockHeldError(UserError):
    """Another process is writing the same store, run folder or file."""


class BadSampleError(UserError, ValueError):
    """One sample the backbone cannot take: an image of impossible shape, a text with a special
    token or longer than the MLLM's context. A build skips it and lists it; the rest goes on."""


class OutputError(UserError):
    """An output cannot be written: its disk is full or read-only (see :func:`output_error`)."""


class StoreError(UserError):
    """A store is missing, foreign, incomplete, or not the one a build/reader expects.

    The message is one line meant for the user (the CLI prints it as is).
    """


class DamagedStoreError(StoreError):
    """A sample (or index array, or the manifest) of a store is not what was written.

    ``detail`` is the short form (``image 3: images/sam: its chunk is missing``) that
    :func:`lens_cache.store_blocks.scan_store` lists; the message adds the store and the repair.
    """

    def __init__(self, message: str, *, detail: str = "", block: int | None = None) -> None:
        super().__init__(message)
        self.detail = detail or message
        self.block = block


class StoreReplacedError(StoreError):
    """The store a reader opened was rebuilt or removed under it (not damage: a repair would not help)."""


class MissingLayerError(StoreError, ValueError):
    """The features of the layer a reader needs are not there: a store that does not cache it, or a
    live backbone that does not compute it (:func:`lens_cache.store_reader.require_layer`; still a
    ValueError for callers)."""


#: errno -> what it means for the user, and the fix
_STORAGE_ERRNOS = {
    errno.ENOSPC: ("no space left on the device", "free some space or write elsewhere"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or write elsewhere"),
    errno.EROFS: ("read-only file system", "write elsewhere"),
}
#: the same errors as libraries without an errno word them (Rust's io::Error, C++ messages)
_STORAGE_TEXT = re.compile(
    r"os error (?P<code>28|30|122)\b|(?P<text>no space left on device|read-only file system|disk quota exceeded)",
    re.IGNORECASE,
)
_TEXT_ERRNO = {"no space left on device": errno.ENOSPC, "read-only file system": errno.EROFS,
               "disk quota exceeded": errno.EDQUOT}


def _chain(error: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while error is not None and error not in seen:
        seen.append(error)
        error = error.__cause__ or error.__context__
    return seen


def storage_problem(error: BaseException) -> tuple[int, str | None] | None:
    """``(errno, path or None)`` when ``error`` (or one it was raised from) says the disk is full
    or read-only; None for anything else."""
    for link in _chain(error):
        code = getattr(link, "errno", None)
        if code in _STORAGE_ERRNOS:
            filename = getattr(link, "filename", None)
            return code, (str(filename) if filename else None)
        found = _STORAGE_TEXT.search(str(link))
        if found:
            code = int(found["code"]) if found["code"] else _TEXT_ERRNO[found["text"].lower()]
            return code, None
    return None


def file_in_the_way(error: BaseException, output: str | Path | None) -> str | None:
    """The path of a file that stands where ``output`` or one of its parent folders must be (mkdir's
    ``FileExistsError`` / ``NotADirectoryError`` on it), or None: only such a path counts, so a bug that
    raises the same types elsewhere keeps its traceback."""
    if output is None:
        return None
    out = Path(output).expanduser().absolute()
    for link in _chain(error):
        if getattr(link, "errno", None) in (errno.EEXIST, errno.ENOTDIR) and getattr(link, "filename", None):
            where = Path(str(link.filename)).expanduser().absolute()
            blocking = next((p for p in (where, *where.parents) if p.is_file()), None)
            if blocking is not None and (blocking == out or blocking in out.parents):
                return str(blocking)
    return None


def output_error(error: BaseException, output: str | Path | None = None) -> OutputError | None:
    """The one-line :class:`OutputError` for a full or read-only disk, or None if ``error`` is not one.

    ``output`` names what the command writes (its ``--out``); without one, the file the
    error names, if any.
    """
    blocked = file_in_the_way(error, output)
    if blocked is not None:
        return OutputError(f"cannot write {output}: {blocked} is a file, not a folder: choose another --out")
    problem = storage_problem(error)
    if problem is None:
        return None
    code, path = problem
    what, fix = _STORAGE_ERRNOS[code]
    where = str(output) if output is not None else path
    return OutputError(f"cannot write {where}: {what}: {fix}" if where else f"cannot write the output: {what}: {fix}")


def one_line(error: BaseException) -> str:
    """The message of ``error`` as one line.

    An exception raised in a DataLoader worker comes back as ``Caught X in DataLoader
    worker process 0.\\nOriginal Traceback ...``: its last line carries the real message.
    """
    text = str(error)
    if "\nOriginal Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        name = type(error).__name__
        marker = f"{name}: "
        text = last.split(marker, 1)[1] if marker in last else last
    return " ".join(text.split()) or type(error).__name__
