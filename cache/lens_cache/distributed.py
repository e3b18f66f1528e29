"""Spread a cache build over dask.distributed workers (many GPUs, many nodes).

The parent creates the store (arrays, manifest, attributes), then submits one task
per pending block. Each worker builds its extractor once (kept in this module's
worker-level state), opens the store ``r+``, writes its blocks and their done
flags; the parent shows progress as tasks finish and marks the store complete.
Workers only ever write chunks of the blocks they own, so they never collide.

One GPU per worker. On one machine, ``lens-cache build --workers N`` starts a
``LocalCluster`` of N single-threaded processes; worker ``i`` uses GPU
``i % torch.cuda.device_count()``. On several machines, start a scheduler and one
single-threaded worker per GPU, each seeing only its GPU, then pass the address::

    # node 0
    dask scheduler --port 8786
    # every GPU node, one worker per GPU
    for gpu in 0 1 2 3 4 5 6 7; do
      CUDA_VISIBLE_DEVICES=$gpu dask worker tcp://node0:8786 \\
          --nworkers 1 --nthreads 1 --memory-limit 0 --name "$(hostname)-gpu$gpu" &
    done
    # anywhere
    lens-cache build --split refcoco --data-root /data --out s3://bucket/refcoco \\
        --mllm /models/llava-1.5-7b-hf --sam vit_h:/models/sam_vit_h_4b8939.pth \\
        --scheduler tcp://node0:8786

The store must be reachable by every worker at the same URL (object storage, or a
shared filesystem path), and so must the images and model checkpoints.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from lens_cache.backbones.base import FeatureExtractor
from lens_cache.block_job import BlockJob, BlockResult, run_block
from lens_cache.block_writer import BlockWriter
from lens_cache.errors import UsageError
from lens_cache.extractor_info import ExtractorFactory, ExtractorInfo, describe_extractor
from lens_cache.progress import Progress
from lens_cache.store_location import StoreLocation
from lens_cache.warm_start import write_warm_start

# ----------------------------------------------------------------------------- worker side

# One extractor per worker process, built on the first task of a build and reused
# by every later task of that build (``token`` identifies the build).
_worker_lock = threading.Lock()
_worker_state: dict[str, Any] = {"token": None, "extractor": None, "writers": {}}


def _pin_worker_gpu() -> None:
    """Give this worker its own GPU when several are visible (LocalCluster on one node).

    Workers started with ``CUDA_VISIBLE_DEVICES=<one gpu>`` see a single device and
    keep it. LocalCluster names its workers 0..N-1; worker i takes GPU i mod count.
    """
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        return
    from distributed import get_worker

    name = get_worker().name
    index = int(name) if str(name).isdigit() else 0
    torch.cuda.set_device(index % torch.cuda.device_count())


def _worker_extractor(factory: ExtractorFactory, token: str) -> FeatureExtractor:
    with _worker_lock:
        if _worker_state["token"] != token:
            _worker_state.update(token=None, extractor=None, writers={})  # free the previous build's model first
            _pin_worker_gpu()
            _worker_state.update(token=token, extractor=factory())
        return _worker_state["extractor"]


def _worker_writer(url: str, storage_options: dict) -> BlockWriter:
    with _worker_lock:
        writers = _worker_state["writers"]
        if url not in writers:
            writers[url] = BlockWriter(url, storage_options)
        return writers[url]


def describe_task(
    factory: ExtractorFactory, token: str, texts: Sequence[str], is_sentence: Sequence[bool]
) -> ExtractorInfo:
    """Runs on a worker: identity, sizes and per-row question lengths (the parent never loads the model)."""
    return describe_extractor(_worker_extractor(factory, token), texts, is_sentence)


def warm_start_task(factory: ExtractorFactory, token: str, url: str, storage_options: dict, record: dict) -> None:
    """Runs on a worker: write the store's warm-start file (the parent never loads the model)."""
    write_warm_start(_worker_extractor(factory, token), StoreLocation(url, storage_options), record)


def block_task(
    factory: ExtractorFactory, token: str, url: str, storage_options: dict, job: BlockJob, batch_size: int
) -> BlockResult:
    """Runs on a worker: extract and write one block, then set its done flag."""
    extractor = _worker_extractor(factory, token)
    return run_block(job, extractor, _worker_writer(url, storage_options), batch_size=batch_size)


# ----------------------------------------------------------------------------- parent side


class DaskRunner:
    """Runs blocks on a LocalCluster (``workers`` processes) or an existing scheduler.

    Args:
        extractor_factory: picklable; called once per worker.
        workers: processes of the LocalCluster (ignored when ``scheduler`` is given).
        scheduler: ``tcp://host:port`` of a running dask scheduler.
    """

    def __init__(self, extractor_factory: ExtractorFactory, *, workers: int = 0, scheduler: str | None = None) -> None:
        if not scheduler and workers < 1:
            raise UsageError("a dask build needs workers >= 1 or a scheduler address")
        self.extractor_factory = extractor_factory
        self.workers = workers
        self.scheduler = scheduler
        self.token = os.urandom(8).hex()
        self._cluster: Any = None
        self._client: Any = None

    def __enter__(self) -> DaskRunner:
        from distributed import Client, LocalCluster

        if self.scheduler:
            self._client = Client(self.scheduler)
        else:
            # memory_limit=0: the nanny must not kill a worker for the transient CPU
            # copy of a 7B checkpoint while it loads onto the GPU.
            self._cluster = LocalCluster(
                n_workers=self.workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                memory_limit=0,
            )
            self._client = Client(self._cluster)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._client is not None:
            self._client.close()
        if self._cluster is not None:
            self._cluster.close()
        self._client = self._cluster = None

    def describe(self, texts: Sequence[str], is_sentence: Sequence[bool]) -> ExtractorInfo:
        future = self._client.submit(
            describe_task, self.extractor_factory, self.token, list(texts), list(is_sentence), pure=False
        )
        return future.result()

    def write_warm_start(self, url: str, storage_options: dict, record: dict) -> None:
        self._client.submit(
            warm_start_task, self.extractor_factory, self.token, url, storage_options, record, pure=False
        ).result()

    def run(
        self, jobs: Sequence[BlockJob], *, url: str, storage_options: dict, batch_size: int, progress: Progress
    ) -> Iterator[BlockResult]:
        from distributed import as_completed

        futures = [
            self._client.submit(
                block_task,
                self.extractor_factory,
                self.token,
                url,
                storage_options,
                job,
                batch_size,
                key=f"lens-cache-block-{job.block}-{self.token}",
                pure=False,
            )
            for job in jobs
        ]
        for future in as_completed(futures):
            result: BlockResult = future.result()  # re-raises a worker's exception here
            progress.advance(result.num_images, result.num_queries)
            yield result
