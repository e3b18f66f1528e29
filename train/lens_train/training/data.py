"""Stage-2 data: feature stores as a torch Dataset, a task-mixing sampler, and the loader.

* :class:`QueryDataset` reads one store, keyed by manifest row (``query_id``); queries
  whose image the build skipped are left out (``FeatureStore.valid_query_ids``).
* :func:`collate` right-pads the ragged text states into a :class:`Batch`.
* :class:`MixedBatchSampler` draws *tasks* (semantic : referring : reasoning) by the
  preset's mix and then a sample of that task, as a pure function of ``(seed, step)``:
  a run resumed at step k sees exactly the samples an uninterrupted run sees.
* :func:`make_loader` wraps them in a DataLoader that keeps a GPU fed (workers,
  pinned memory on CUDA, persistent workers, prefetch), each worker with its own
  RNG stream seeded from ``(seed, rank, worker id)``.

Everything a sample carries stays float16 until it reaches the device (half the
bytes through the loader and the host-to-device copy).
"""

from __future__ import annotations

import bisect
import os
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Sampler

from ..errors import UsageError

TASKS = ("semantic", "referring", "reasoning")

# Independent random streams derived from the one seed (numpy SeedSequence entropy words).
_TASK_STREAM = 0x7A5C
_ORDER_STREAM = 0x0D3E
_WORKER_STREAM = 0x3B1F
_LOADER_STREAM = 0x51A7
_QUESTION_STREAM = 0x9E57


class QueryDataset(Dataset):
    """The queries of one feature store at one cached layer.

    Item ``i`` is the ``i``-th *valid* query (its image was cached); ``query_ids[i]``
    is its manifest row. The store is opened lazily in each process, so the dataset
    pickles cheaply into DataLoader workers (fork or spawn).

    Args:
        url: store path or fsspec URL (must be complete).
        layer: which cached MLLM layer to read.
        store_index: position of this store in a multi-store run (carried into batches).
        storage_options: fsspec options of the store.
    """

    def __init__(self, url: str, layer: int, *, store_index: int = 0, storage_options: dict | None = None,
                 store: Any = None) -> None:
        from lens_cache.store import FeatureStore, require_layer  # zarr: loaded when a store is opened

        self.url = str(url)
        self.layer = int(layer)
        self.store_index = store_index
        self.storage_options = dict(storage_options or {})
        # ``store``: the caller's open FeatureStore of ``url`` (not opened twice); worker processes reopen it
        store = store if store is not None else FeatureStore.open(self.url, storage_options=self.storage_options)
        require_layer(store.layers, self.layer, holder=f"store {self.url}", fix=f"pass --layer {store.layers[0]}")
        self.query_ids = store.valid_query_ids()
        # Only the manifest columns a sample needs, as plain arrays (small, cheap to pickle).
        manifest = store.manifest
        take = lambda name: manifest.column(name).to_pylist()  # noqa: E731
        self._mask_rle = take("mask_rle")
        self._ignore_rle = take("ignore_rle")
        self._height = np.asarray(take("height"), dtype=np.int64)
        self._width = np.asarray(take("width"), dtype=np.int64)
        self._task = take("task")
        self._dataset = take("dataset")
        self._is_sentence = np.asarray(take("is_sentence"), dtype=bool)
        # The tokens before the image (BOS, system prompt, USER:): the same for every query of the store.
        prefix = store.prefix_states(self.layer)
        self._prefix = None if prefix is None else torch.from_numpy(prefix.astype(np.float16))
        self._store = store
        self._pid = os.getpid()

    @property
    def store(self):
        """The opened ``FeatureStore`` of this process (reopened after a fork or unpickling)."""
        if self._store is None or self._pid != os.getpid():
            from lens_cache.store import FeatureStore  # zarr: loaded when a store is opened

            self._store = FeatureStore.open(self.url, storage_options=self.storage_options)
            self._pid = os.getpid()
        return self._store

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_store"] = None
        return state

    def __len__(self) -> int:
        return len(self.query_ids)

    @property
    def tasks(self) -> list[str]:
        """Task of every item (``semantic`` | ``referring`` | ``reasoning``), in item order."""
        return [self._task[q] for q in self.query_ids]

    def target(self, query_id: int) -> np.ndarray:
        """uint8 (H, W) ground truth of a manifest row: 1 target, 0 background, 255 ignore."""
        from lens_manifests import decode_target  # pyarrow: loaded when a sample is read

        return decode_target(
            {
                "mask_rle": self._mask_rle[query_id],
                "ignore_rle": self._ignore_rle[query_id],
                "height": int(self._height[query_id]),
                "width": int(self._width[query_id]),
            }
        )

    def __getitem__(self, index: int | tuple[int, float]) -> dict[str, Any]:
        """One query; ``(index, draw)`` reads one of its training questions (:meth:`variant_for`).

        Returns:
            image_states (576, d) f16; text_states (L_t, d) f16; sam_embedding (C, 64, 64) f16
            (C = the store's ``sam_channels``: 256 for SAM, 64 for the toy SAM);
            gt (H, W) uint8 0/1/255 at the original size; original_size, input_size (2,) int64 (h, w);
            query_id, store_index: int; task, dataset: str; is_sentence: bool;
            prefix_states (P, d) f16, the store's pre-image prefix (None for a store without it).
        """
        index, draw = index if isinstance(index, tuple) else (index, None)
        query_id = int(self.query_ids[index])
        sample = self.store.read_query(query_id, self.layer, variant=self.variant_for(query_id, draw))
        gt = self.target(query_id)
        original_size = np.asarray(sample["original_size"], dtype=np.int64)
        if tuple(gt.shape) != tuple(original_size):
            raise RuntimeError(
                f"store {self.url}: query {query_id} has a {gt.shape} mask but its image was cached at "
                f"{tuple(original_size)} (manifest and store disagree)"
            )
        return {
            "image_states": torch.from_numpy(np.ascontiguousarray(sample["image_states"])),
            "text_states": torch.from_numpy(np.ascontiguousarray(sample["text_states"])),
            "sam_embedding": torch.from_numpy(np.ascontiguousarray(sample["sam_embedding"])),
            "gt": torch.from_numpy(gt),
            "original_size": torch.from_numpy(original_size),
            "input_size": torch.from_numpy(np.asarray(sample["input_size"], dtype=np.int64)),
            "query_id": query_id,
            "store_index": self.store_index,
            "task": self._task[query_id],
            "dataset": self._dataset[query_id],
            "is_sentence": bool(self._is_sentence[query_id]),
            "prefix_states": self._prefix,
        }

    def variant_for(self, query_id: int, draw: float | None) -> int:
        """The cached question a sample reads: 0 (the evaluation question) without a ``draw``; with a draw
        u in [0, 1), training question ``1 + floor(u * n)`` of the n the store cached for the query (those the
        build refused are left out), or 0 when it has none."""
        if draw is None:
            return 0
        lengths = self.store.variant_text_len
        if lengths.shape[1] == 0:
            return 0
        usable = np.flatnonzero(lengths[query_id] > 0) + 1
        return int(usable[min(int(draw * len(usable)), len(usable) - 1)]) if len(usable) else 0

    @property
    def has_prefix(self) -> bool:
        """Whether the store keeps the pre-image prefix states (stores of format 4 and later)."""
        return self._prefix is not None


@dataclass
class Batch:
    """A collated batch of B queries.

    Attributes:
        image_states: (B, 576, d) float16 (or the device dtype after :meth:`to`).
        text_states: (B, L_max, d), right-padded with zeros.
        text_lengths: (B,) int64, valid rows of ``text_states``.
        sam_embeddings: (B, C, 64, 64), C = 256 for SAM, 64 for the toy SAM.
        gts: B uint8 tensors (H_b, W_b), 0/1/255, at the original sizes.
        original_sizes, input_sizes: (B, 2) int64 (h, w).
        query_ids, store_indices: (B,) int64.
        tasks, datasets: B strings. is_sentence: (B,) bool.
        prefix_states: (B, P, d) states of the tokens before the image, or None when a sample's store
            does not keep them (what ``Lens.forward`` takes as ``prefix_states``).
    """

    image_states: torch.Tensor
    text_states: torch.Tensor
    text_lengths: torch.Tensor
    sam_embeddings: torch.Tensor
    gts: list[torch.Tensor]
    original_sizes: torch.Tensor
    input_sizes: torch.Tensor
    query_ids: torch.Tensor
    store_indices: torch.Tensor
    tasks: list[str]
    datasets: list[str]
    is_sentence: torch.Tensor
    prefix_states: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.image_states.shape[0])

    def _map(self, fn) -> "Batch":
        values = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = fn(value)
            elif isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
                value = [fn(v) for v in value]
            values[f.name] = value
        return Batch(**values)

    def pin_memory(self) -> "Batch":
        """Called by the DataLoader (``pin_memory=True``): page-locked copies for async transfer."""
        return self._map(lambda t: t.pin_memory())

    def to(self, device: torch.device | str, *, features_dtype: torch.dtype = torch.float32) -> "Batch":
        """Move to ``device``; the three feature tensors become ``features_dtype``.

        The copy is non-blocking (it overlaps compute when the batch is pinned); the
        dtype cast happens on the device, after the float16 bytes crossed the bus.
        """
        device = torch.device(device)
        features = {"image_states", "text_states", "sam_embeddings", "prefix_states"}
        values = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = value.to(device, non_blocking=True)
                if f.name in features:
                    value = value.to(features_dtype)
            elif isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
                value = [v.to(device, non_blocking=True) for v in value]
            values[f.name] = value
        return Batch(**values)


def collate(samples: Sequence[Mapping[str, Any]]) -> Batch:
    """Stack samples of :meth:`QueryDataset.__getitem__` into a :class:`Batch` (text right-padded)."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    lengths = [int(s["text_states"].shape[0]) for s in samples]
    dim = int(samples[0]["text_states"].shape[1])
    text = torch.zeros(len(samples), max(lengths), dim, dtype=samples[0]["text_states"].dtype)
    for b, s in enumerate(samples):
        text[b, : lengths[b]] = s["text_states"]
    return Batch(
        image_states=torch.stack([s["image_states"] for s in samples]),
        text_states=text,
        text_lengths=torch.tensor(lengths, dtype=torch.int64),
        sam_embeddings=torch.stack([s["sam_embedding"] for s in samples]),
        gts=[s["gt"] for s in samples],
        original_sizes=torch.stack([s["original_size"] for s in samples]),
        input_sizes=torch.stack([s["input_size"] for s in samples]),
        query_ids=torch.tensor([s["query_id"] for s in samples], dtype=torch.int64),
        store_indices=torch.tensor([s["store_index"] for s in samples], dtype=torch.int64),
        tasks=[s["task"] for s in samples],
        datasets=[s["dataset"] for s in samples],
        is_sentence=torch.tensor([s["is_sentence"] for s in samples], dtype=torch.bool),
        prefix_states=_stack_prefixes([s.get("prefix_states") for s in samples]),
    )


def _stack_prefixes(prefixes: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    """(B, P, d) from the samples' prefix states; None if any sample has none (a store without them).

    Raises:
        ValueError: prefixes of different lengths in one batch (stores of different prompts, which the
            identity check keeps apart).
    """
    if any(p is None for p in prefixes):
        return None
    if len({tuple(p.shape) for p in prefixes}) != 1:
        raise ValueError(f"prefix states of different shapes in one batch: {sorted({tuple(p.shape) for p in prefixes})}")
    return torch.stack(list(prefixes))


# ----------------------------------------------------------------------------- the task mix


def parse_mix(text: str) -> dict[str, float]:
    """``"9:3:1"`` -> ``{"semantic": 9, "referring": 3, "reasoning": 1}`` (the order of :data:`TASKS`)."""
    parts = text.split(":")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != len(TASKS) or any(v < 0 for v in values) or not sum(values) > 0:
        raise UsageError(f"--mix takes three non-negative weights semantic:referring:reasoning (e.g. 9:3:1), got {text!r}")
    return dict(zip(TASKS, values))


def task_probabilities(mix: Mapping[str, float], present: Sequence[str]) -> dict[str, float]:
    """The mix restricted to the tasks present in the data, renormalised to sum to 1.

    Raises:
        ValueError: no present task has a positive weight.
    """
    unknown = set(mix) - set(TASKS)
    if unknown:
        raise UsageError(f"unknown task(s) in the mix: {sorted(unknown)}; tasks are {', '.join(TASKS)}")
    weights = {task: float(mix.get(task, 0.0)) for task in TASKS if task in set(present)}
    total = sum(weights.values())
    if not total > 0:
        ratio = ":".join(f"{mix.get(t, 0):g}" for t in TASKS)
        raise UsageError(
            f"the stores hold only {', '.join(sorted(set(present)))} queries, which the mix {ratio} "
            "(semantic:referring:reasoning) gives no weight: change --mix"
        )
    return {task: w / total for task, w in weights.items() if w > 0}


class MixedBatchSampler(Sampler[list[int]]):
    """Micro-batches of dataset indices for optimizer steps ``start_step .. end_step - 1``.

    Each step draws ``batch_size * grad_accum`` samples: first a task per sample (by the
    renormalised mix), then the next item of that task's current *epoch* (a seeded
    permutation of the task's items, renewed each pass), so every item of a task is
    seen once before any is seen twice. Task draws depend only on ``(seed, step)``;
    the position in each task's epoch is recovered by replaying the (cheap) task
    draws of the earlier steps, so ``start_step=k`` yields exactly what a run from 0
    yields from step k on.

    Args:
        tasks: task of every index of the (concatenated) dataset.
        mix: task -> weight (tasks absent from ``tasks`` are dropped, the rest renormalised).
        batch_size: samples per micro-batch; grad_accum: micro-batches per step.
        seed: the run's seed. start_step, end_step: the steps to yield.
        draw_questions: yield ``(index, u)`` with u in [0, 1) drawn from ``(seed, step)``, so the dataset
            reads one of the query's training questions (:meth:`QueryDataset.variant_for`); plain indices
            otherwise.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        mix: Mapping[str, float],
        *,
        batch_size: int,
        grad_accum: int = 1,
        seed: int = 0,
        start_step: int = 0,
        end_step: int,
        draw_questions: bool = False,
    ) -> None:
        if batch_size < 1 or grad_accum < 1:
            raise ValueError("batch_size and grad_accum must be >= 1")
        if not 0 <= start_step <= end_step:
            raise ValueError(f"need 0 <= start_step ({start_step}) <= end_step ({end_step})")
        self.probabilities = task_probabilities(mix, list(tasks))
        self.task_names = list(self.probabilities)
        self._p = np.asarray([self.probabilities[t] for t in self.task_names])
        self.members = [np.flatnonzero(np.asarray(tasks) == t).astype(np.int64) for t in self.task_names]
        self.batch_size, self.grad_accum, self.seed = batch_size, grad_accum, seed
        self.start_step, self.end_step = start_step, end_step
        self.draw_questions = draw_questions

    @property
    def samples_per_step(self) -> int:
        return self.batch_size * self.grad_accum

    def step_tasks(self, step: int) -> np.ndarray:
        """(samples_per_step,) int: which task (index into ``task_names``) each sample of ``step`` draws."""
        rng = np.random.default_rng([self.seed, _TASK_STREAM, step])
        return rng.choice(len(self.task_names), size=self.samples_per_step, p=self._p)

    def _order(self, task: int, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, _ORDER_STREAM, task, epoch])
        return self.members[task][rng.permutation(len(self.members[task]))]

    def __len__(self) -> int:
        return (self.end_step - self.start_step) * self.grad_accum

    def __iter__(self) -> Iterator[list[int]]:
        drawn = np.zeros(len(self.task_names), dtype=np.int64)
        for step in range(self.start_step):
            drawn += np.bincount(self.step_tasks(step), minlength=len(self.task_names))
        orders: dict[tuple[int, int], np.ndarray] = {}
        for step in range(self.start_step, self.end_step):
            picks = []
            for task in self.step_tasks(step):
                n = len(self.members[task])
                epoch, position = divmod(int(drawn[task]), n)
                if (task, epoch) not in orders:
                    orders = {k: v for k, v in orders.items() if k[0] != task}  # keep one epoch per task
                    orders[(task, epoch)] = self._order(task, epoch)
                picks.append(int(orders[(task, epoch)][position]))
                drawn[task] += 1
            if self.draw_questions:
                draws = np.random.default_rng([self.seed, _QUESTION_STREAM, step]).random(len(picks))
                picks = [(index, float(u)) for index, u in zip(picks, draws)]
            for micro in range(self.grad_accum):
                yield picks[micro * self.batch_size : (micro + 1) * self.batch_size]


# ----------------------------------------------------------------------------- the loader


def worker_seed(seed: int, rank: int, worker_id: int) -> int:
    """The 63-bit seed of one DataLoader worker: distinct for every (seed, rank, worker)."""
    return int(np.random.SeedSequence([seed, _WORKER_STREAM, rank, worker_id]).generate_state(2, np.uint64)[0] >> 1)


class WorkerSeeder:
    """``worker_init_fn``: seeds torch, numpy and ``random`` of each worker from (seed, rank, worker id).

    Loading is deterministic today (no augmentation); this keeps any future random
    transform reproducible and different across workers.
    """

    def __init__(self, seed: int, rank: int = 0) -> None:
        self.seed, self.rank = seed, rank

    def __call__(self, worker_id: int) -> None:
        value = worker_seed(self.seed, self.rank, worker_id)
        torch.manual_seed(value)
        np.random.seed(value % 2**32)
        random.seed(value)


class StoresDataset(ConcatDataset):
    """The queries of several stores in a row; an item is an index or ``(index, draw)`` (see
    :class:`MixedBatchSampler`'s ``draw_questions``), passed on to the store's :class:`QueryDataset`."""

    def __getitem__(self, item: int | tuple[int, float]) -> dict[str, Any]:
        index, draw = item if isinstance(item, tuple) else (item, None)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range ({len(self)} queries)")
        which = bisect.bisect_right(self.cumulative_sizes, index)
        local = index - (self.cumulative_sizes[which - 1] if which else 0)
        return self.datasets[which][(local, draw) if draw is not None else local]

    @property
    def has_training_questions(self) -> bool:
        """Whether any store caches training questions besides the evaluation one."""
        return any(d.store.max_text_variants > 1 for d in self.datasets)


def concat_datasets(datasets: Sequence[QueryDataset]) -> tuple[StoresDataset, list[str]]:
    """One dataset over several stores and the task of each of its indices."""
    tasks: list[str] = []
    for dataset in datasets:
        tasks += dataset.tasks
    return StoresDataset(list(datasets)), tasks


def make_loader(
    dataset: Dataset,
    batch_sampler: Sampler[list[int]],
    *,
    num_workers: int,
    device: torch.device | str = "cpu",
    seed: int = 0,
    rank: int = 0,
    prefetch_factor: int = 4,
) -> DataLoader:
    """A DataLoader that keeps the accelerator busy.

    Workers read and decode while the device computes (``prefetch_factor`` micro-batches
    each in flight), stay alive for the whole run (``persistent_workers``), and hand
    over page-locked batches on CUDA (``pin_memory``) so the host-to-device copy is async.
    """
    device = torch.device(device)
    extra: dict[str, Any] = {}
    if num_workers > 0:
        extra = {"persistent_workers": True, "prefetch_factor": prefetch_factor}
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        worker_init_fn=WorkerSeeder(seed, rank),
        # The loader's own generator only draws the base seed torch hands each worker;
        # WorkerSeeder then replaces every worker's seeds with ones derived from (seed, rank, id).
        generator=torch.Generator().manual_seed(
            int(np.random.SeedSequence([seed, _LOADER_STREAM, rank]).generate_state(1, np.uint64)[0] >> 1)
        ),
        **extra,
    )
