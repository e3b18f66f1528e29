"""Export a finished feature store to one HDF5 file (for tools that do not read Zarr).

The file mirrors the store: the same array paths (``images/mllm_l14``, ...), dtypes
and chunk shapes; the ``lens_cache`` attribute as a JSON string on the root; the
manifest's Parquet bytes as the uint8 dataset ``manifest.parquet``. It is written
to ``<out>.tmp`` and renamed, so a crash never leaves a file that looks finished (a
failed write, e.g. a full disk, removes ``<out>.tmp``); the
writer lock of ``<out>`` (:mod:`lens_cache.locks`) is held meanwhile, so two exports
never write one file. Every sample is checked against its checksum as it is copied.

The HDF5 file is written by a child process (forked; it only reads the store): the HDF5 library does
not recover from a write that fails, e.g. on a full disk (its objects then fail to close and the
process crashed at exit, leaving ``<out>.tmp`` and the lock). The child hands its error back and
ends without that teardown; this process removes ``<out>.tmp``, releases the lock and raises the
error (a full disk is then one line, ``lens_cache.errors``).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import traceback
from pathlib import Path

import h5py
import numpy as np
from lens_cache.errors import UsageError
from lens_cache.locks import exclusive
from lens_cache.store import MANIFEST_FILE, FeatureStore
from lens_core.files import replaced_on_success

#: samples copied per read/write: bounds memory (a 576x4096 float16 sample is 4.7 MB)
COPY_ROWS = 64


def export_hdf5(
    store_url: str | Path,
    out_path: str | Path,
    *,
    compression: str = "gzip",
    compression_level: int | None = 1,
    storage_options: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Copy every array and the self-description of a complete store into ``out_path``.

    Args:
        store_url: the (complete) store.
        out_path: the HDF5 file to write (local path).
        compression: h5py filter, ``gzip`` (readable everywhere), ``lzf`` (faster,
            h5py only) or ``none``.
        compression_level: gzip level (1 = fast; float16 activations barely compress).
        overwrite: replace an existing file that is not an earlier export of this store (an earlier export
            of it is replaced without asking).

    Returns:
        ``out_path``.

    Raises:
        StoreError: the store is missing or unfinished; DamagedStoreError: a sample is damaged.
        LockHeldError: another export is writing ``out_path``.
        UsageError: ``out_path`` is a folder (the store itself, say), or a file that is not an export of this
            store and ``overwrite`` is not given.
    """
    store = FeatureStore.open(store_url, storage_options=storage_options)
    out_path = Path(out_path)
    _check_target(store, out_path, overwrite=overwrite)
    filters: dict = {}
    if compression == "gzip":
        filters = {"compression": "gzip", "compression_opts": compression_level}
    elif compression == "lzf":
        filters = {"compression": "lzf"}
    elif compression != "none":
        raise UsageError(f"unknown HDF5 compression {compression!r}: choose gzip, lzf or none")
    with exclusive(out_path, command="lens-cache export"):
        _write_hdf5(store, out_path, filters)
    return out_path


def _check_target(store: FeatureStore, out_path: Path, *, overwrite: bool) -> None:
    """Refuse a folder, and a file that an export of this store would silently replace (one line each)."""
    if out_path.is_dir():
        raise UsageError(f"{out_path} is a folder{' (the store itself)' if _same(out_path, store) else ''}: give the "
                         "path of the HDF5 file to write, e.g. store.h5")
    if not out_path.exists() or overwrite:
        return
    try:
        earlier = read_hdf5_attrs(out_path)
    except Exception:  # not HDF5, or HDF5 without our attribute: someone else's file
        earlier = None
    if not isinstance(earlier, dict) or earlier.get("identity_hash") != store.attrs.get("identity_hash") \
            or earlier.get("manifest_hash") != store.attrs.get("manifest_hash"):
        raise UsageError(f"{out_path} exists and is not an export of this store: choose another file, or pass "
                         "--overwrite to replace it")


def _same(path: Path, store: FeatureStore) -> bool:
    return store.location.is_local and store.location.local_path.resolve() == path.resolve()


def _write_hdf5(store: FeatureStore, out_path: Path, filters: dict) -> None:
    store.manifest  # noqa: B018 - the manifest file is the one the store recorded (else DamagedStoreError)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with replaced_on_success(out_path) as tmp:
        _in_child(_copy_store, store, tmp, filters)


class ExportChildError(RuntimeError):
    """The export's child process failed in a way it could not report (the message has its traceback)."""


def _in_child(function, *args) -> None:
    """``function(*args)`` in a forked child; its exception re-raised here (see the module docstring)."""
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_child_main, args=(send, function, args), daemon=True)
    child.start()
    send.close()
    try:
        outcome = receive.recv()
    except EOFError:  # died without a word (killed, crashed)
        outcome = ("crashed", None, "")
    finally:
        receive.close()
        child.join()
    status, error, trace = outcome
    if status == "ok":
        return
    if error is not None:
        raise error
    raise ExportChildError(f"the export's writer process ended with exit code {child.exitcode}{trace}")


def _child_main(send, function, args) -> None:  # pragma: no cover - runs in the child (coverage not collected)
    code = 0
    try:
        function(*args)
        outcome = ("ok", None, "")
    except BaseException as error:  # noqa: BLE001 - everything goes back to the parent
        code = 1
        trace = "".join(traceback.format_exception(error))
        try:
            import pickle

            pickle.dumps(error)
            outcome = ("error", error, trace)
        except Exception:
            outcome = ("error", None, f":\n{trace}")
    try:
        send.send(outcome)
        send.close()
    finally:
        os._exit(code)  # no interpreter teardown: a failed HDF5 file must not be closed again


def _copy_store(store: FeatureStore, tmp: Path, filters: dict) -> None:
    """Every array and the self-description of ``store`` into the new HDF5 file ``tmp``."""
    checked = set(store.sample_array_names) if store.checksums is not None else set()
    with h5py.File(tmp, "w") as h5:
        h5.attrs["lens_cache"] = json.dumps(store.attrs, sort_keys=True)
        manifest_bytes = np.frombuffer(store.location.read_bytes(MANIFEST_FILE), dtype=np.uint8)
        h5.create_dataset(MANIFEST_FILE, data=manifest_bytes)
        for name in store.array_names():
            source = store.array(name)
            target = h5.create_dataset(
                name,
                shape=source.shape,
                dtype=source.dtype,
                chunks=tuple(min(c, s) for c, s in zip(source.chunks, source.shape, strict=True)),
                **filters,
            )
            if name in checked:  # one checked sample at a time
                for row in range(source.shape[0]):
                    target[row] = store.read_sample(name, row)
                continue
            step = max(1, COPY_ROWS // source.chunks[0]) * source.chunks[0]
            for start in range(0, source.shape[0], step):
                target[start : start + step] = source[start : start + step]


def read_hdf5_attrs(path: str | Path) -> dict:
    """The ``lens_cache`` self-description of an exported file."""
    with h5py.File(path, "r") as h5:
        return json.loads(h5.attrs["lens_cache"])
