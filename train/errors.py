"""Errors of stage 2 whose message is one line meant for the user (the CLIs print it as is)."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in what was asked (wrong store, layer, preset, run folder, ...); the CLI exits 2."""


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss or gradient; the last good checkpoint is kept. The CLI exits 1."""
