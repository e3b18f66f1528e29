"""lens_cache: stage 1 of LENS -- run the frozen backbones once, cache their features.

Stage 2 reads a store through :class:`FeatureStore`::

    from lens_cache import FeatureStore, check_compatible

    store = FeatureStore.open("stores/refcoco_train")       # refuses unfinished stores
    sample = store.read_query(0, layer=14)                  # image/text states, SAM embedding, sizes

The names below are imported on first use, so ``import lens_cache`` (and the
``lens-cache --help`` it precedes) does not pull in zarr, dask or torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lens_cache.build import build_cache
    from lens_cache.export import export_hdf5
    from lens_cache.store import DamagedStoreError, FeatureStore, StoreError, check_compatible, verify_store

_LAZY = {
    "FeatureStore": "lens_cache.store",
    "StoreError": "lens_cache.store",
    "DamagedStoreError": "lens_cache.store",
    "check_compatible": "lens_cache.store",
    "verify_store": "lens_cache.store",
    "build_cache": "lens_cache.build",
    "export_hdf5": "lens_cache.export",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'lens_cache' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)
