"""Errors of stage 2 whose message is one line meant for the user (the CLIs print it as is).

Stage 2's :class:`UserError` is one of stage 1's (``lens_cache.errors.UserError``), so the
CLIs of both stages catch one type (plus ``lens_manifests.ManifestError``): a store error,
a lock held by another run, a bad option. Every other exception is a bug and keeps its
traceback.
"""

from __future__ import annotations

from lens_cache.errors import LockHeldError
from lens_cache.errors import UserError as _StageOneUserError

__all__ = ["LockHeldError", "NonFiniteLossError", "UsageError", "UserError"]


class UserError(_StageOneUserError):
    """A mistake in what was asked (wrong store, layer, preset, run folder, ...); the CLI exits 2."""


class UsageError(UserError, ValueError):
    """A bad option value (a mix, a layer); still a ValueError for library callers."""


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss or gradient; the last good checkpoint is kept. The CLI exits 1."""
