"""The errors the command-line tools print as one line for the user (exit code 2).

Everything a user can cause and fix (a wrong option, a missing file or checkpoint, a
store of another build, a damaged store, a folder another process is writing) raises a
:class:`UserError`; the CLIs catch exactly these types (and ``lens_manifests.ManifestError``)
and print ``error: <message>``. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user caused and can fix; the message is one line saying how."""


class UsageError(UserError, ValueError):
    """A bad argument: an option value out of range, an unknown name (still a ValueError for callers)."""


class LockHeldError(UserError):
    """Another process is writing the same store, run folder or file."""


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
