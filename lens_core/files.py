"""Writing files so that a failure leaves nothing behind, and hashing them.

Every output file of the tools is written under a temporary name beside it and renamed
over it once complete, so a reader sees the old file or the new one, never half of one.
When the writing fails (a full disk, a read-only folder, any error), the temporary file
is removed before the error goes on: a full disk is not filled further by leftovers.
The CLIs then print the error as one line (:func:`lens_cache.errors.output_error`).
A folder (an exported checkpoint) is written the same way: :func:`folder_replaced_on_success`.

It lives in ``lens_core``, the lowest package of the import graph (every stage may import it; it
imports nothing of the project), so every stage writes its files with these helpers: the manifests,
the cache's stores and exports, stage 2's runs, checkpoints and evaluations. It is ``lens_core``'s one
module that writes files (:mod:`.paths`, the confinement rule, only reads where links lead); the model
(every other module of the package) never touches them.
The one exception is the synthetic dataset's folder (:func:`lens_manifests.synthetic.publish._publish`):
several processes may build the same set at once, so it keeps whichever finishes first.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: suffix of the temporary file beside its target
TMP_SUFFIX = ".tmp"


def sha256_file(path: str | Path, block: int = 8 << 20) -> str:
    """sha256 (hex) of a file, read in ``block``-byte pieces (checkpoints are gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(block), b""):
            digest.update(piece)
    return digest.hexdigest()


def remove_quietly(*paths: str | Path) -> None:
    """Remove ``paths`` that exist; a path that cannot be removed is left (the original error matters more)."""
    for path in paths:
        with contextlib.suppress(OSError):
            Path(path).unlink(missing_ok=True)


@contextlib.contextmanager
def removed_on_failure(*paths: str | Path) -> Iterator[None]:
    """Remove ``paths`` (temporary files) if the block raises, then re-raise."""
    try:
        yield
    except BaseException:
        remove_quietly(*paths)
        raise


@contextlib.contextmanager
def replaced_on_success(path: str | Path, *, suffix: str = TMP_SUFFIX) -> Iterator[Path]:
    """A temporary path beside ``path``: renamed over ``path`` when the block succeeds, removed when it fails.

    Example::

        with replaced_on_success(out) as tmp:
            pq.write_table(table, tmp)
    """
    path = Path(path)
    tmp = path.with_name(path.name + suffix)
    with removed_on_failure(tmp):
        yield tmp
        os.replace(tmp, path)


@contextlib.contextmanager
def folder_replaced_on_success(path: str | Path, *, suffix: str = ".partial") -> Iterator[Path]:
    """A temporary folder beside ``path`` (created empty): it replaces ``path`` (and whatever was
    there) when the block succeeds and is removed when it fails, so no half-written folder is
    ever found under the name."""
    path = Path(path)
    tmp = path.with_name(path.name + suffix)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = path.with_name(path.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def write_bytes_atomically(path: str | Path, data: bytes, *, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` via a temporary file (+ fsync) and a rename; nothing is left on failure."""
    with replaced_on_success(path) as tmp:
        with open(tmp, "wb") as file:
            file.write(data)
            file.flush()
            if fsync:
                os.fsync(file.fileno())


def write_text_atomically(path: str | Path, text: str, *, fsync: bool = True) -> None:
    """:func:`write_bytes_atomically` of ``text`` encoded as UTF-8."""
    write_bytes_atomically(path, text.encode("utf-8"), fsync=fsync)


class _WriteErrorKeeper:
    """A file whose write errors are kept: ``torch.save`` turns them into an ``unexpected pos`` RuntimeError."""

    def __init__(self, file: Any) -> None:
        self.file = file
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.file.flush()


def torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj, path)`` + fsync, with a failed write raised as its own ``OSError``
    (``No space left on device``), not as torch's ``unexpected pos``."""
    import torch

    with open(path, "wb") as file:
        keeper = _WriteErrorKeeper(file)
        try:
            torch.save(obj, keeper)
        except RuntimeError:
            if keeper.error is not None:
                raise keeper.error from None
            raise
        file.flush()
        os.fsync(file.fileno())
