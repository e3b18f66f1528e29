"""Data roots, and every path read under one confined to it.

A benchmark's files come from elsewhere (a download, a colleague's folder): a symlink or
a ``..`` in a record must not make a command read outside the folder the user named.
The rule is the project's one, :func:`lens_core.paths.path_inside` (a relative name whose path,
symlinks followed, stays inside the resolved root); here its refusal is a one-line :class:`UserError`.
"""

from __future__ import annotations

from pathlib import Path

from lens_core.paths import UnsafePathError, path_inside

from ..errors import UserError


def resolve_root(root: str | Path, *, option: str, expected: str) -> Path:
    """``root`` resolved, if it is a folder.

    Args:
        option: the command-line option that named it (for the message).
        expected: what should be there (for the message).
    Raises:
        UserError: no such folder (one line naming ``expected``).
    """
    path = Path(root).expanduser()
    if not path.is_dir():
        raise UserError(f"{option} {path} is not a folder: pass {option} {expected}")
    return path.resolve()


def confined(root: Path, name: str | Path, *, what: str) -> Path:
    """``root / name`` resolved, if ``name`` is a relative path that leads inside ``root`` (itself resolved).

    Args:
        name: relative to ``root`` (a folder or file the reader found there, or a name a record gives).
        what: what it is, for the message (``"image"``, ``"subtask folder"``).
    Raises:
        UserError: ``name`` is absolute or leads outside ``root`` through a symlink or ``..`` (one line).
    """
    try:
        return path_inside(root, name, what=what, folder_is="the data root").resolve()
    except UnsafePathError as error:
        raise UserError(str(error)) from None
