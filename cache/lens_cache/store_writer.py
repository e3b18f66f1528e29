"""A build's store, from the build's side: create it or resume it, repair it, finish it.

The first step down from :func:`lens_cache.build.build_cache` in a build's walk (``build`` -> here ->
``block_job`` -> ``store_format``): :func:`prepare_store` creates a new store
(:func:`lens_cache.store_create.create_store`: every array once, before any block) or reopens one only
if it is the same build (:func:`refuse_if_different`) and, for a resume or repair, under the library
versions it was built with (:func:`check_libraries`); :func:`repair_damage` first redoes what is
damaged (the manifest file, the arrays written at creation, and, through the block bookkeeping of
:mod:`lens_cache.store_blocks`, every block with a damaged sample). The blocks are then written by
workers (:func:`lens_cache.block_job.run_block` with a :class:`lens_cache.block_writer.BlockWriter`);
:func:`finalize_store` checks them all and marks the store complete, the last write. What the
backbones compute and how blocks are scheduled is :mod:`lens_cache.build`'s; the contract is
:mod:`lens_cache.store`'s docstring.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import zarr
from lens_cache.errors import DamagedStoreError, StoreError
from lens_cache.identity import describe_differences
from lens_cache.progress import say
from lens_cache.store_blocks import check_filled, clear_done_flags, missing_blocks, scan_store, unfilled_blocks
from lens_cache.store_create import create_store, index_arrays, manifest_to_parquet_bytes, variant_index
from lens_cache.store_format import ATTRS_KEY, IMAGE_FAILED, MANIFEST_FILE, QUERY_FAILED, creation_arrays, sample_checksum
from lens_cache.store_location import StoreLocation, foreign_entries, open_group, store_state
from lens_cache.store_plan import ImagePlan
from lens_cache.store_reader import FeatureStore
from lens_cache.store_records import StoreDescription, StorePrefix, StoreVariants
from lens_cache.version import library_versions


# ----------------------------------------------------------------------------- create or resume


def prepare_store(
    location: StoreLocation,
    description: StoreDescription,
    *,
    manifest: pa.Table,
    plan: ImagePlan,
    text_len: np.ndarray,
    overwrite: bool,
    prefix: StorePrefix | None = None,
    variants: StoreVariants | None = None,
) -> FeatureStore:
    """Create the store, or reopen it for a resume after checking it is the same build.

    ``prefix``, ``variants``: see :func:`~lens_cache.store_create.create_store` (a resumed store keeps its own, :func:`repair_damage`
    mends them).

    Raises:
        StoreError: the location holds something else, or a store of another
            identity/manifest/layout (one line naming what differs).
    """
    url = location.url
    state = store_state(location)
    if state == "foreign":
        raise StoreError(
            f"{url} exists and is not a lens feature store: refusing to write there (choose another --out)"
        )
    if state == "lens":
        existing = FeatureStore.open(url, require_complete=False, storage_options=location.storage_options)
        if overwrite:
            others = foreign_entries(location)
            if others:
                raise StoreError(
                    f"{url} holds files that are not part of the store ({', '.join(others[:4])}"
                    f"{' ...' if len(others) > 4 else ''}): --overwrite would delete them; move them or choose "
                    "another --out")
            location.remove()
            state = "absent"
        else:
            refuse_if_different(existing, description)
            return existing
    if state == "partial":  # killed while being created: nothing computed yet, start again
        location.remove()
    create_store(location, description=description, manifest=manifest, plan=plan, text_len=text_len, prefix=prefix,
                 variants=variants)
    return FeatureStore.open(url, require_complete=False, storage_options=location.storage_options)


def refuse_if_different(existing: FeatureStore, wanted: StoreDescription) -> None:
    """Raise StoreError naming every setting in which ``existing`` differs from ``wanted``."""
    hint = "use another --out or --overwrite"
    have = existing.description()
    differences = [
        f"{key} {old!r} but this build asks for {new!r}"
        for key, old, new in describe_differences(have.comparable(), wanted.comparable())
    ]
    if have.manifest_hash != wanted.manifest_hash:
        differences.append(
            f"manifest {have.manifest_hash[:12]} ({existing.num_queries} queries) "
            f"but this build's manifest is {wanted.manifest_hash[:12]}"
        )
    if differences:
        # list values (layers) read better without quotes: [14] rather than '[14]'
        raise StoreError(f"store {existing.url} was built with " + "; ".join(differences) + f": {hint}")


def check_libraries(existing: FeatureStore, *, allow: bool) -> dict[str, str | None] | None:
    """Refuse to resume or repair ``existing`` under library versions other than those it recorded.

    The versions that shape features (:func:`lens_cache.version.library_versions`) are recorded at
    creation; blocks written under other versions would be other features in the same store. With
    ``allow`` the build goes on, and :func:`record_library_mix` notes the versions once it writes. A
    store from before the record (format < 6) is not checked.

    Returns:
        The current versions when they differ and ``allow`` is given (to record), else None.
    Raises:
        StoreError: the versions differ and ``allow`` is False (one line naming them and the choices).
    """
    recorded = existing.attrs.get("libraries")
    if recorded is None:
        return None
    current = library_versions()
    changed = [f"{name} {recorded.get(name)} -> {version}" for name, version in current.items()
               if recorded.get(name) != version]
    if not changed:
        return None
    if not allow:
        raise StoreError(
            f"store {existing.url} was built with other library versions ({', '.join(changed)}): blocks written now "
            "would hold other features; rebuild it with --overwrite, go back to its versions, or pass "
            "--allow-library-change to resume it and record the mix")
    return current


def record_library_mix(location: StoreLocation, versions: dict[str, str | None]) -> None:
    """Add ``versions`` to ``attrs["libraries_mixed"]``: the other library versions that wrote blocks."""
    group = open_group(location, mode="r+")
    attrs = dict(group.attrs[ATTRS_KEY])
    mixed = list(attrs.get("libraries_mixed") or [])
    if versions not in mixed:
        mixed.append(versions)
    attrs["libraries_mixed"] = mixed
    group.attrs.put({ATTRS_KEY: attrs})


# ----------------------------------------------------------------------------- repair


def repair_damage(
    store: FeatureStore,
    *,
    manifest: pa.Table,
    plan: ImagePlan,
    text_len: np.ndarray,
    progress: bool,
    prefix: StorePrefix | None = None,
    variants: StoreVariants | None = None,
) -> FeatureStore:
    """Check an existing store before building on it, and make this build redo what is damaged.

    The manifest file, the index arrays and the prefix states are rewritten if they are not what
    the store recorded (:func:`_rewrite_creation_files`). Every sample of every finished block is read
    back and checked (:func:`_damaged_blocks`); a block with a damaged or missing sample loses its done
    flag, so the build recomputes exactly those blocks. A complete store that needs any repair (or
    whose warm-start file or ``queries/failed`` is damaged) is first marked incomplete (one metadata
    write), so a reader never takes a store under repair as finished.

    Returns:
        The store, reopened if anything was repaired.
    """
    location = store.location
    group = open_group(location, mode="r+")
    repaired = _rewrite_creation_files(store, group, manifest=manifest, plan=plan, text_len=text_len, prefix=prefix,
                                       variants=variants)
    if repaired:
        store = FeatureStore.open(store.url, require_complete=False, storage_options=location.storage_options)
    damaged = _damaged_blocks(store, progress=progress)
    stale = bool(repaired) or bool(damaged)
    if store.complete and not stale:
        stale = not _finished_files_intact(store)
    if not stale:
        return store
    if store.complete:
        attrs = dict(group.attrs[ATTRS_KEY])
        attrs["complete"] = False
        group.attrs.put({ATTRS_KEY: attrs})
    clear_done_flags(location, sorted(damaged))
    for block, problems in sorted(damaged.items()):
        say(progress, f"block {block} of {store.url} is damaged ({problems[0]}): recomputing it")
    for line in repaired:
        say(progress, f"{store.url}: {line} (it was damaged)")
    return FeatureStore.open(store.url, require_complete=False, storage_options=location.storage_options)


def _rewrite_creation_files(
    store: FeatureStore,
    group: zarr.Group,
    *,
    manifest: pa.Table,
    plan: ImagePlan,
    text_len: np.ndarray,
    prefix: StorePrefix | None,
    variants: StoreVariants | None,
) -> list[str]:
    """Rewrite the manifest file and each array written at creation that is not what the store recorded
    (the build has them all); one line per file rewritten.

    A rewritten prefix's checksum is recorded anew, as another device may round its last bit differently.
    """
    location = store.location
    repaired: list[str] = []
    try:
        store.manifest  # noqa: B018 - checks the stored file against the recorded hash
    except DamagedStoreError:
        location.write_bytes(MANIFEST_FILE, manifest_to_parquet_bytes(manifest, spec=store.attrs["spec"]))
        repaired.append(f"rewrote {MANIFEST_FILE}")
    if store.checksums is None:
        return repaired
    expected = index_arrays(plan, text_len)
    expected.update(variant_index(variants, plan.num_queries))
    shared = prefix.arrays() if prefix is not None else {}
    rechecked: dict[str, int] = {}
    for name in creation_arrays(store.attrs):
        try:
            store.checked_index_array(name)
        except DamagedStoreError:
            if name in expected:
                group[name][:] = expected[name]
            elif name in shared and group[name].shape == shared[name].shape:
                group[name][:] = shared[name]
                rechecked[name] = sample_checksum(shared[name])
            else:
                raise
            repaired.append(f"rewrote {name}")
    if rechecked:
        attrs = dict(group.attrs[ATTRS_KEY])
        attrs["checksums"] = {**attrs["checksums"], "index": {**attrs["checksums"]["index"], **rechecked}}
        group.attrs.put({ATTRS_KEY: attrs})
    return repaired


def _damaged_blocks(store: FeatureStore, *, progress: bool) -> dict[int, list[str]]:
    """The finished blocks with a damaged sample (every sample read back) or one whose chunk is not in storage."""
    finished = [int(block) for block in np.flatnonzero(store.done_flags())]
    if finished:
        say(progress, f"checking every sample of the {len(finished)} finished block(s) of {store.url}")
    damaged = scan_store(store, finished, progress=progress, label="lens-cache check")
    for block in unfilled_blocks(store):
        damaged.setdefault(block, ["a sample's chunk is not in storage"])
    return damaged


def _finished_files_intact(store: FeatureStore) -> bool:
    """Whether what a complete store's finishing left is intact: its warm-start file and ``queries/failed``."""
    try:
        store.warm_start_bytes()
        failed = store.array(QUERY_FAILED)[:]
        return bool(np.array_equal(failed, store.query_failures()))
    except StoreError:
        return False
    except Exception:  # queries/failed does not decode: finalize rewrites it  # noqa: BLE001
        return False


# ----------------------------------------------------------------------------- finish


def finalize_store(store: FeatureStore) -> FeatureStore:
    """Check every block and sample, then mark the store complete (the last write).

    A finished block whose samples are missing (storage lost them) loses its done flag
    before the error, so the rerun the message asks for redoes it.
    """
    missing = missing_blocks(store)
    if missing:
        raise StoreError(
            f"store {store.url} is incomplete ({store.num_blocks - len(missing)}/{store.num_blocks} blocks): "
            "rerun the same `lens-cache build` command to finish it"
        )
    problems = check_filled(store)
    if problems:
        clear_done_flags(store.location, unfilled_blocks(store))
        raise StoreError(f"store {store.url}: {problems[0]}: rerun the same `lens-cache build` command")
    store.warm_start_bytes()  # the file is there and is the one recorded (else StoreError)
    group = open_group(store.location, mode="r+")
    failures = store.array(IMAGE_FAILED)[:]
    group[QUERY_FAILED][:] = store.query_failures()
    attrs = dict(group.attrs[ATTRS_KEY])
    attrs["num_failed_images"] = int(np.count_nonzero(failures))
    attrs["complete"] = True
    group.attrs.put({ATTRS_KEY: attrs})  # one atomic metadata write, after everything else
    return FeatureStore.open(store.url, storage_options=store.location.storage_options)
