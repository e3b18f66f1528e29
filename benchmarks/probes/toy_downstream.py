"""The downstream half of LENS alone: planted grounded MLLM features + the real toy SAM.

Issue 10's check that head, keypoints, descriptor and SAM's decoder learn to segment
held-out scenes when the MLLM side is known to carry the answer: the image tokens are a
fixed projection of each cell's colour and the text states a bag of fixed word vectors
(``lens_train.testing``, ``grounded=True``), so colour phrases are answerable and
shape-only phrases are not (the planted image tokens carry no shape). SAM's embeddings
are the shipped toy SAM's. Trains ``--preset toy`` (no warm start: the fake MLLM has no
layers) on ``synthetic:train`` and scores held-out ``synthetic:val``.

    python benchmarks/probes/toy_downstream.py --images 48 --steps 300 --work /tmp/downstream
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Annotated

import typer

from lens_cache.cli import command_app


app = command_app(context_settings={"help_option_names": ["-h", "--help"]})


@app.command(help=__doc__.split("\n")[0])
def main(
    images: Annotated[int, typer.Option(help="synthetic images per split and set")] = 48,
    steps: Annotated[int, typer.Option()] = 300,
    work: Annotated[Path, typer.Option()] = Path("work/toy-downstream"),
    sam: Annotated[str, typer.Option(help="SAM spec [toy: the shipped toy SAM]")] = "toy",
) -> None:
    """Cache, train and evaluate; prints the summary as JSON."""
    from lens_cache.build import build_cache
    from lens_manifests import build_manifest, write_synthetic
    from lens_train.evaluation.evaluate import evaluate
    from lens_train.testing import fake_tiny_extractor
    from lens_train.training.trainer import TrainRequest, train

    started = time.perf_counter()
    root = work / "data"
    write_synthetic(root, seed=0, num_train_images=images, num_val_images=images, num_test_images=2)
    factory = functools.partial(fake_tiny_extractor, hidden_size=128, grounded=True, sam=sam)
    stores = {}
    for split in ("train", "val"):
        url = str(work / f"store-{split}")
        build_cache(build_manifest(f"synthetic:{split}", root), url, factory, spec=f"synthetic:{split}",
                    progress=True, overwrite=True)
        stores[split] = url
    run = work / "run"
    train(TrainRequest(caches=(stores["train"],), out=run, preset="toy", layer=14,
                       train_overrides={"steps": steps, "warm_start": False}, device="cpu", sam=sam,
                       resume=(run / "checkpoint.json").is_file()))
    metrics = evaluate(run, stores["val"], out=run / "eval-val", device="cpu", sam=sam)
    base = metrics["baselines"]
    summary = {
        "giou": metrics["giou"], "ciou": metrics["ciou"], "queries": metrics["num_queries"],
        "whole_image_giou": base["whole_image"]["giou"], "heatmap_giou": base["heatmap"]["giou"],
        "minutes": round((time.perf_counter() - started) / 60, 1),
    }
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    app()
