"""Stage-2 data: the store dataset, collation, the task-mixing sampler and worker RNG streams."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from lens_train.training.data import (
    MixedBatchSampler,
    QueryDataset,
    WorkerSeeder,
    collate,
    concat_datasets,
    make_loader,
    parse_mix,
    task_probabilities,
)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """A semantic+referring+reasoning store (one image missing on disk) and a reasoning-only one."""
    from lens_manifests import build_manifest

    from lens_train.testing import build_store, small_synthetic

    root = small_synthetic(tmp_path_factory.mktemp("synthetic"), images=3)
    out = tmp_path_factory.mktemp("stores")
    mixed = build_manifest("synthetic:train", root)
    # The second image's file is gone: the build skips it and the dataset must leave its queries out.
    import pyarrow as pa

    ids = mixed.column("image_id").to_pylist()
    second = list(dict.fromkeys(ids))[1]
    paths = ["/nonexistent/gone.jpg" if i == second else p for i, p in zip(ids, mixed.column("image_path").to_pylist())]
    mixed = mixed.set_column(mixed.column_names.index("image_path"), "image_path", pa.array(paths, pa.string()))
    reason = build_manifest("synthetic-reason:val", root)
    return {
        "mixed": build_store(mixed, out / "mixed", spec="synthetic:train", block_size=2),
        "reason": build_store(reason, out / "reason", spec="synthetic-reason:val"),
        "missing_path": "/nonexistent/gone.jpg",
    }


def test_dataset_items_match_the_store_and_manifest(stores):
    from lens_manifests import decode_target

    store = stores["mixed"]
    dataset = QueryDataset(store.url, 14)
    manifest = store.manifest
    paths = manifest.column("image_path").to_pylist()
    skipped = [q for q in range(store.num_queries) if paths[q] == stores["missing_path"]]
    assert skipped and len(dataset) == store.num_queries - len(skipped)
    assert not set(skipped) & set(dataset.query_ids.tolist())
    for index in (0, len(dataset) - 1):
        item = dataset[index]
        query = item["query_id"]
        direct = store.read_query(query, 14)
        assert item["image_states"].dtype == torch.float16 and item["image_states"].shape == (576, 64)
        assert item["sam_embedding"].shape == (256, 64, 64) and item["sam_embedding"].dtype == torch.float16
        assert torch.equal(item["text_states"], torch.from_numpy(direct["text_states"]))
        assert item["text_states"].shape[0] == int(store.text_len[query])
        gt = decode_target(manifest, query)
        assert item["gt"].dtype == torch.uint8 and np.array_equal(item["gt"].numpy(), gt)
        assert tuple(item["original_size"].tolist()) == gt.shape
        assert item["task"] == manifest.column("task")[query].as_py()
        assert item["is_sentence"] == manifest.column("is_sentence")[query].as_py()


def test_dataset_refuses_a_layer_the_store_lacks(stores):
    with pytest.raises(ValueError, match=r"caches layer\(s\) \[14\], not 7"):
        QueryDataset(stores["mixed"].url, 7)


def test_collate_right_pads_text(stores):
    dataset = QueryDataset(stores["mixed"].url, 14)
    lengths = {i: dataset[i]["text_states"].shape[0] for i in range(len(dataset))}
    short, long = min(lengths, key=lengths.get), max(lengths, key=lengths.get)
    assert lengths[short] < lengths[long]
    batch = collate([dataset[short], dataset[long]])
    assert batch.text_states.shape == (2, lengths[long], 64)
    assert batch.text_lengths.tolist() == [lengths[short], lengths[long]]
    assert torch.equal(batch.text_states[0, : lengths[short]], dataset[short]["text_states"])
    assert not batch.text_states[0, lengths[short] :].any()
    assert batch.image_states.shape == (2, 576, 64) and batch.sam_embeddings.shape == (2, 256, 64, 64)
    moved = batch.to("cpu")
    assert moved.image_states.dtype == torch.float32 and moved.gts[0].dtype == torch.uint8


def test_parse_mix_and_renormalisation():
    assert parse_mix("9:3:1") == {"semantic": 9.0, "referring": 3.0, "reasoning": 1.0}
    for bad in ("9:3", "a:b:c", "0:0:0", "-1:1:1"):
        with pytest.raises(ValueError, match="--mix"):
            parse_mix(bad)
    assert task_probabilities({"semantic": 9, "referring": 3, "reasoning": 1}, ["referring", "reasoning"]) == {
        "referring": 0.75, "reasoning": 0.25}
    with pytest.raises(ValueError, match="gives no weight"):
        task_probabilities({"semantic": 1, "referring": 0, "reasoning": 0}, ["reasoning"])


def test_mixed_sampler_follows_the_ratio_and_epochs():
    tasks = ["semantic"] * 50 + ["referring"] * 30 + ["reasoning"] * 7
    sampler = MixedBatchSampler(tasks, {"semantic": 9, "referring": 3, "reasoning": 1}, batch_size=8, grad_accum=2,
                                seed=3, end_step=400)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 800 and all(len(b) == 8 for b in batches)
    drawn = [i for b in batches for i in b]
    counts = Counter(tasks[i] for i in drawn)
    total = len(drawn)
    for task, expected in (("semantic", 9 / 13), ("referring", 3 / 13), ("reasoning", 1 / 13)):
        assert abs(counts[task] / total - expected) < 0.02, (task, counts[task] / total)
    # Within a task, every item is drawn once before any is drawn twice (seeded epochs).
    reasoning = [i for i in drawn if tasks[i] == "reasoning"]
    for start in range(0, len(reasoning) - 7, 7):
        assert sorted(reasoning[start : start + 7]) == list(range(80, 87))


def test_mixed_sampler_is_deterministic_and_resumes_at_any_step():
    tasks = ["semantic"] * 11 + ["referring"] * 5
    mix = {"semantic": 1, "referring": 1, "reasoning": 5}  # reasoning absent: dropped, the rest renormalised
    full = list(MixedBatchSampler(tasks, mix, batch_size=3, grad_accum=2, seed=0, end_step=40))
    again = list(MixedBatchSampler(tasks, mix, batch_size=3, grad_accum=2, seed=0, end_step=40))
    other = list(MixedBatchSampler(tasks, mix, batch_size=3, grad_accum=2, seed=1, end_step=40))
    assert full == again and full != other
    for start in (1, 7, 23):
        resumed = list(MixedBatchSampler(tasks, mix, batch_size=3, grad_accum=2, seed=0, start_step=start, end_step=40))
        assert resumed == full[start * 2 :]
    assert set(MixedBatchSampler(tasks, mix, batch_size=3, seed=0, end_step=1).probabilities) == {"semantic", "referring"}


class _RandomDraws(Dataset):
    """Returns what each worker's RNGs produce (numpy, torch, python random) with the worker id."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int):
        import random

        info = torch.utils.data.get_worker_info()
        return {"worker": info.id if info else -1, "np": float(np.random.random()), "torch": float(torch.rand(())),
                "py": random.random()}


def _worker_draws(seed: int, rank: int = 0) -> dict[int, tuple]:
    loader = DataLoader(_RandomDraws(), batch_size=1, num_workers=2, worker_init_fn=WorkerSeeder(seed, rank),
                        collate_fn=lambda items: items[0])
    firsts: dict[int, tuple] = {}
    for item in loader:
        firsts.setdefault(item["worker"], (item["np"], item["torch"], item["py"]))
    return firsts


def test_worker_rng_streams_differ_and_are_reproducible():
    draws = _worker_draws(seed=0)
    assert set(draws) == {0, 1}
    assert all(a != b for a, b in zip(draws[0], draws[1]))  # numpy, torch and random all differ
    assert _worker_draws(seed=0) == draws  # reproducible from the seed
    assert _worker_draws(seed=1) != draws
    assert _worker_draws(seed=0, rank=1) != draws


def test_loader_with_workers_yields_the_sampler_batches(stores):
    datasets = [QueryDataset(stores["mixed"].url, 14, store_index=0),
                QueryDataset(stores["reason"].url, 14, store_index=1)]
    dataset, tasks = concat_datasets(datasets)
    sampler = MixedBatchSampler(tasks, {"semantic": 1, "referring": 1, "reasoning": 1}, batch_size=2, seed=0,
                                end_step=4)
    loader = make_loader(dataset, sampler, num_workers=2, device="cpu", seed=0)
    got = [batch for batch in loader]
    expected = list(sampler)
    assert len(got) == len(expected)
    for batch, indices in zip(got, expected):
        assert batch.query_ids.tolist() == [int(dataset[i]["query_id"]) for i in indices]
        assert batch.store_indices.tolist() == [int(dataset[i]["store_index"]) for i in indices]
