"""Data roots, and every path read under one confined to it.

A benchmark's files come from elsewhere (a download, a colleague's folder): a symlink or
a ``..`` in a record must not make a command read outside the folder the user named.
Each path is resolved (symlinks followed) and must stay inside the resolved root.
"""

from __future__ import annotations

from pathlib import Path

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


def confined(root: Path, path: Path, *, what: str) -> Path:
    """``path`` resolved, if it lies inside ``root`` (itself resolved).

    Raises:
        UserError: ``path`` leads outside ``root`` through a symlink or ``..`` (one line).
    """
    resolved = path.resolve()
    if resolved != root and not resolved.is_relative_to(root):
        raise UserError(
            f"{what} {path} leads outside the data root {root} (a symlink or '..'): "
            f"copy the file into {root} instead of linking to it"
        )
    return resolved
