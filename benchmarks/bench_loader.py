"""Stage-2 loader throughput: samples/s and MB/s that the DataLoader delivers from a Zarr store.

    python benchmarks/bench_loader.py --store STORE --layer 14 --workers 8 --batch-size 2 --batches 200
    python benchmarks/bench_loader.py --hidden-size 4096 --images 64        # builds a store of that width first

Without ``--store`` it writes a store at the given width with stage 1's deterministic fake
backbone (real code path of ``lens_cache.build``; 576 image tokens, 256x64x64 SAM
embedding, float16, the default compression) and reads it back with the training
loader (``lens_train.training.data``: task-mixing sampler, workers, pinned memory on CUDA). The
number to compare with is the training step rate of ``make bench-train`` times its batch:
the loader keeps the GPU busy when it delivers more samples/s than the step consumes.
Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Annotated

import typer

from lens_cache.cli import command_app


def build_fake_store(out: Path, hidden_size: int, images: int) -> str:
    from lens_manifests import build_manifest, write_synthetic

    from lens_cache.build import first_images
    from lens_train.testing import build_store

    root = out / "data"  # three sets (semantic, referring, reasoning) of images // 3 + 1 each
    write_synthetic(root, num_train_images=images // 3 + 1, num_val_images=1, num_test_images=1)
    manifest = first_images(build_manifest("synthetic:train", root), images)
    store = build_store(manifest, out / "store", spec="synthetic:train", block_size=16, hidden_size=hidden_size)
    return store.url


def evict_from_page_cache(folder: Path) -> int:
    """Ask the kernel to drop every file of ``folder`` from the page cache (``posix_fadvise`` DONTNEED: no root
    needed; clean pages go at once); returns the bytes asked for."""
    total = 0
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                total += os.fstat(fd).st_size
            finally:
                os.close(fd)
    return total


app = command_app(context_settings={"help_option_names": ["-h", "--help"]})


@app.command(help=__doc__.split("\n")[0])
def bench(
    store: Annotated[str | None, typer.Option(help="existing store (else one is built)")] = None,
    hidden_size: Annotated[int, typer.Option(help="width of the built store")] = 4096,
    images: Annotated[int, typer.Option(help="images of the built store")] = 64,
    layer: Annotated[int, typer.Option()] = 14,
    workers: Annotated[int, typer.Option()] = 8,
    batch_size: Annotated[int, typer.Option()] = 2,
    num_batches: Annotated[int, typer.Option("--batches")] = 200,  # `batches` is the loader's iterator below
    device: Annotated[str | None, typer.Option(help="copy batches to this device (cuda when available)")] = None,
    cold: Annotated[bool, typer.Option(help="evict the store's files from the page cache first (a cold read)")] = False,
) -> dict:
    """Measure the loader; prints the JSON line and returns it as a dict."""
    import torch

    from lens_train.training.data import MixedBatchSampler, QueryDataset, make_loader

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        url = store or build_fake_store(Path(tmp), hidden_size, images)
        build_s = time.perf_counter() - started
        if cold:
            evict_from_page_cache(Path(url))
        dataset = QueryDataset(url, layer)
        sampler = MixedBatchSampler(dataset.tasks, {"semantic": 9, "referring": 3, "reasoning": 1},
                                    batch_size=batch_size, seed=0, end_step=num_batches)
        loader = make_loader(dataset, sampler, num_workers=workers, device=device, seed=0)
        batches = iter(loader)
        first = next(batches).to(device)  # worker start-up is not throughput
        nbytes = sum(t.numel() * 2 for t in (first.image_states, first.text_states, first.sam_embeddings))
        count, samples = 1, len(first)
        started = time.perf_counter()
        for batch in batches:
            batch = batch.to(device)
            count, samples = count + 1, samples + len(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        timed = samples - len(first)
        result = {
            "store": store or f"built: d={hidden_size}, {images} images ({build_s:.1f} s)",
            "hidden_size": int(dataset.store.hidden_size),
            "device": str(device),
            "workers": workers,
            "page_cache": "cold" if cold else "warm",
            "batch_size": batch_size,
            "batches": count,
            "samples_per_s": timed / seconds if seconds > 0 else None,
            "feature_mb_per_s": timed * nbytes / len(first) / seconds / 1e6 if seconds > 0 else None,
            "feature_mb_per_sample": nbytes / len(first) / 1e6,
        }
    print(json.dumps(result))
    return result


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark on the command line ``argv`` (default: ``sys.argv[1:]``) and return its JSON object.

    Unlike ``app()`` (the script's entry point), a bad command line raises Click's ``UsageError``
    rather than printing it and exiting 2.
    """
    return app(args=argv, standalone_mode=False)


if __name__ == "__main__":
    app()
