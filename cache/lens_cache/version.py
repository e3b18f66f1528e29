"""The installed project's version, as what it writes records it (one definition).

A store's ``created_by`` attribute reads ``lens-seg 0.1.0``; a run's ``config.json`` records
``versions.lens = "0.1.0"``. Both come from :func:`lens_version`.
"""

from __future__ import annotations

#: the distribution (pyproject.toml's ``name``) that holds lens_core, lens_cache, lens_train, lens_manifests
DISTRIBUTION = "lens-seg"


def lens_version() -> str | None:
    """The installed lens-seg version (``"0.1.0"``), or None when it is not installed (a bare checkout)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return None


def created_by() -> str:
    """``lens-seg <version>`` (``lens-seg (not installed)``): what a store records as its writer."""
    number = lens_version()
    return f"{DISTRIBUTION} {number}" if number else f"{DISTRIBUTION} (not installed)"
