"""Where a feature store lives and how it is opened: local paths and fsspec URLs, raw files beside the arrays.

:class:`StoreLocation` is a store's URL (a local path, ``file://`` or any fsspec URL) with its
storage options; :func:`open_group` opens its Zarr group, :func:`store_state` says what is
there (nothing, a store killed while being created, a lens store, something else). The
format itself is :mod:`lens_cache.store_format`; the contract, :mod:`lens_cache.store`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import lens_cache.store_codec  # noqa: F401 - registers the int8 codec with zarr for every store module
import zarr
from lens_cache.store_format import ATTRS_KEY, PARTIAL_KEY
from lens_core.files import replaced_on_success
from zarr.abc.store import Store as ZarrStore


@dataclass(frozen=True)
class StoreLocation:
    """Where a store lives: a local path, ``file://`` URL, or any fsspec URL.

    Local stores go through zarr's ``LocalStore`` (it writes every object to a
    temporary file and renames it, so a SIGKILL never leaves a torn chunk or a torn
    ``zarr.json``); other URLs through ``FsspecStore`` (object stores replace whole
    objects on PUT).
    """

    url: str
    storage_options: dict = field(default_factory=dict)

    @property
    def is_local(self) -> bool:
        return "://" not in self.url or self.url.startswith("file://")

    @property
    def local_path(self) -> Path:
        return Path(self.url.removeprefix("file://")).expanduser().absolute()

    def zarr_store(self, *, read_only: bool) -> ZarrStore:
        if self.is_local:
            return zarr.storage.LocalStore(self.local_path, read_only=read_only)
        return zarr.storage.FsspecStore.from_url(
            self.url, storage_options=self.storage_options or None, read_only=read_only
        )

    def filesystem(self) -> tuple[fsspec.AbstractFileSystem, str]:
        """The fsspec filesystem and the store's root path on it."""
        if self.is_local:
            return fsspec.filesystem("file"), str(self.local_path)
        fs, root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        return fs, root.rstrip("/")

    def exists(self) -> bool:
        """True when anything is stored at this location."""
        fs, root = self.filesystem()
        return fs.exists(root) and (not fs.isdir(root) or bool(fs.ls(root)))

    def remove(self) -> None:
        fs, root = self.filesystem()
        if fs.exists(root):
            fs.rm(root, recursive=True)

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write ``name`` under the store root (temporary name + rename where local)."""
        fs, root = self.filesystem()
        path = f"{root}/{name}"
        if self.is_local:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            with replaced_on_success(path) as tmp:  # removed if the write fails
                tmp.write_bytes(data)
        else:
            fs.pipe_file(path, data)

    def put_file(self, local: str | Path, name: str) -> None:
        """Upload the local file ``local`` as ``name`` under the store root (a remote store; whole-object PUT)."""
        fs, root = self.filesystem()
        fs.put_file(str(local), f"{root}/{name}")

    def read_bytes(self, name: str) -> bytes:
        fs, root = self.filesystem()
        return fs.cat_file(f"{root}/{name}")

    def bytes_under(self, name: str) -> int:
        """Bytes stored under ``name`` (an array folder), as the filesystem counts them."""
        fs, root = self.filesystem()
        path = f"{root}/{name}"
        return int(fs.du(path, total=True)) if fs.exists(path) else 0


def open_group(location: StoreLocation, mode: str, *, attributes: dict | None = None) -> zarr.Group:
    """The store's root group (``mode`` as in :func:`zarr.open_group`); ``attributes`` are written with the
    group's own metadata when it is created (one write: a kill never leaves a group without them)."""
    with quiet_numcodecs():
        return zarr.open_group(store=location.zarr_store(read_only=mode == "r"), mode=mode, attributes=attributes)


class quiet_numcodecs(warnings.catch_warnings):
    """Silence zarr's note that numcodecs codecs (BitRound) are outside the v3 spec.

    The note is true and recorded in the store attrs (``compression``); repeating it
    on every open of a bit-rounded store only clutters the logs.
    """

    def __enter__(self) -> Any:
        result = super().__enter__()
        warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3")
        return result


def store_state(location: StoreLocation) -> str:
    """``absent``, ``partial`` (killed while being created), ``lens`` or ``foreign``."""
    if not location.exists():
        return "absent"
    try:
        attrs = open_group(location, mode="r").attrs.asdict()
    except (zarr.errors.BaseZarrError, FileNotFoundError, ValueError, KeyError):
        # zarr raises its own error types for "not a group" (NodeTypeValidationError
        # is a ValueError, GroupNotFoundError a FileNotFoundError).
        return "foreign"
    if ATTRS_KEY in attrs:
        return "lens"
    return "partial" if PARTIAL_KEY in attrs else "foreign"


def store_around(path: str | Path) -> Path | None:
    """The local lens feature store that ``path`` is, or lies inside of; None if none (a run or an evaluation
    written there would be deleted by the store's ``--overwrite`` and would confuse its readers)."""
    here = Path(path).expanduser().absolute()
    for folder in (here, *here.parents):
        if (folder / "zarr.json").is_file() and store_state(StoreLocation(str(folder))) == "lens":
            return folder
    return None


def foreign_entries(location: StoreLocation) -> list[str]:
    """Entries of a local store's folder that are not part of the store (its zarr nodes and its manifest):
    what ``--overwrite`` would delete along with it. Empty for a remote store (not checked there)."""
    if not location.is_local or not location.local_path.is_dir():
        return []
    ours = {"zarr.json", "manifest.parquet"}
    return sorted(entry.name for entry in location.local_path.iterdir()
                  if not (entry.name in ours or (entry.is_dir() and (entry / "zarr.json").is_file())))
