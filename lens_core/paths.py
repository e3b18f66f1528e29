"""The one path-confinement rule: a path read from a file must lead to a file inside its folder.

Dataset files (a REFER ``instances.json``, a COCO-format part set, a routing benchmark) and the folders
of a benchmark (MME's release) name files relative to a folder. Such a name comes from elsewhere (a
download, a colleague's folder), so it is never trusted: :func:`path_inside` lets it through only when

1. it is a relative path: not empty, not absolute, no NUL byte, and its ``..`` (after normalising the
   text) does not climb out of the folder; and
2. the path it names, **resolved with symlinks followed**, lies inside the folder, itself resolved.

So a data root that is itself a symlink works (the folder is resolved first), and so does a link
inside it that points to another place inside it; a link that leads outside the folder is refused,
like a ``..`` that does (before 2026-12, the manifests tested the text only and followed such links).
The file need not exist: a missing file is its reader's business (it lists it as missing).

Refusals are one :class:`UnsafePathError` (a ``ValueError``) with a one-line message naming the name,
the folder and the fix. The manifests' adapters skip the record and list it (``lens_manifests.common``);
stage 2's readers (MME, routing) turn it into a one-line ``UserError`` (``lens_train.general.paths``).

Besides :mod:`.files` this is ``lens_core``'s one module that looks at the file system (it only reads
link targets); no model module imports it.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["UnsafePathError", "path_inside"]


class UnsafePathError(ValueError):
    """A name read from a file leads outside the folder it belongs in (the message is one line)."""


def _resolved(path: str) -> str:
    """``path`` with every symlink followed (a missing tail is kept as it is, as ``realpath`` does)."""
    return os.path.realpath(path)


def _inside(base: str, path: str) -> bool:
    return path == base or os.path.commonpath([base, path]) == base


def path_inside(folder: str | Path, name: object, *, what: str = "file name", folder_is: str = "its folder") -> Path:
    """``folder / name`` for a ``name`` read from a file, refused unless it leads to a place inside ``folder``.

    Args:
        folder: the folder the name is relative to (may itself be, or lie under, a symlink).
        name: the name as read (anything that is not a non-empty ``str`` or ``Path`` is refused).
        what: what the name is, for the message (``"file name"``, ``"image"``, ``"subtask folder"``).
        folder_is: how the message calls ``folder`` (``"its folder"``; stage 2 says ``"the data root"``).
    Returns:
        ``folder / name`` with its text normalised (``a/./b`` -> ``a/b``), symlinks not replaced: what was
        checked is exactly what the caller opens, and a manifest records the path under the name it was given.
    Raises:
        UnsafePathError: the name is not a relative path, climbs out with ``..``, or resolves (through a
            symlink) to a place outside the resolved ``folder`` (one line, naming the fix).
    """
    text = os.fspath(name) if isinstance(name, (str, Path)) else ""
    shown = str(name) if isinstance(name, Path) else name
    if not text or "\x00" in text or os.path.isabs(text):
        why = "it is empty" if not text else "it holds a NUL byte" if "\x00" in text else "it is absolute"
        raise UnsafePathError(f"{what} {shown!r} is not a path inside {folder} ({why}): "
                              f"the dataset file names a path outside {folder_is}; not read")
    base = os.path.normpath(os.path.abspath(folder))
    relative = os.path.normpath(text)
    joined = os.path.normpath(os.path.join(base, relative))
    if joined == base or not _inside(base, joined):
        why = "it names the folder itself" if joined == base else "its '..' climbs out"
        raise UnsafePathError(f"{what} {shown!r} is not a path inside {folder} ({why}): "
                              f"the dataset file names a path outside {folder_is}; not read")
    real_base = _resolved(os.fspath(folder))
    target = _resolved(os.path.join(os.fspath(folder), relative))  # exactly the path returned
    if not _inside(real_base, target):
        raise UnsafePathError(f"{what} {shown!r} is not a path inside {folder}: it leads to {target} through a "
                              f"symlink, outside {folder_is}; copy the file into {folder} instead of linking to it")
    return Path(folder) / relative
