"""The installed project's version, as what it writes records it (one definition).

A store's ``created_by`` attribute reads ``lens-seg 0.1.0``; a run's ``config.json`` records
``versions.lens = "0.1.0"``. Both come from :func:`lens_version`.

A store also records the versions of the libraries that shape its features
(:func:`library_versions`: the MLLM's code in transformers, torch's kernels, SAM's code, the image
decoder and resizer): an MLLM's hidden states move across transformers releases, so a build resumed
under other versions would mix two kinds of features in one store (``lens_cache.store_writer``).
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


#: The distributions whose versions shape a store's features (see the module docstring).
FEATURE_LIBRARIES = ("torch", "transformers", "segment-anything", "pillow", "numpy")


def library_versions() -> dict[str, str | None]:
    """``{"torch": "2.14.1", "transformers": ..., ...}`` of :data:`FEATURE_LIBRARIES` (None: not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {}
    for name in FEATURE_LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found
