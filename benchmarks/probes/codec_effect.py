"""What a lossy store costs in held-out gIoU at toy scale: the same runs on a lossless and an int8 store.

For each compression the toy backbones cache ``synthetic:train`` and the held-out ``synthetic:val`` (the
demo's data: 48 images per split and set); for each seed LENS trains with the ``toy`` preset on the train
store and is scored on the val store of the same compression. Seeds pair the runs (same initialisation,
same batches), so the figure is the mean of the per-seed differences and its standard error. Resumable:
a finished run or evaluation is not redone. One JSON line per run, then the summary.

    python benchmarks/probes/codec_effect.py --seeds 0,1,2 --steps 300 --work work/codec
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Annotated

import typer

from lens_cache.cli import command_app

app = command_app(context_settings={"help_option_names": ["-h", "--help"]})


def stores(work: Path, compression: str, images: int, layer: int) -> dict[str, str]:
    """The train and val stores of ``compression`` (built once)."""
    from lens_cache.backbones import build_extractor
    from lens_cache.build import build_cache
    from lens_cache.store import FeatureStore
    from lens_manifests import build_manifest, write_synthetic

    root = work / "data"
    if not (root / "SYNTHETIC_DONE.json").is_file():
        write_synthetic(root, seed=0, num_train_images=images, num_val_images=images, num_test_images=2)
    factory = functools.partial(build_extractor, mllm="toy", sam="toy", layers=(layer,), device="cpu")
    urls = {}
    for split in ("train", "val"):
        url = work / "stores" / f"{split}-{compression}"
        try:
            complete = FeatureStore.open(str(url)).complete
        except Exception:  # noqa: BLE001 - absent or unfinished: (re)build it
            complete = False
        if not complete:
            build_cache(build_manifest(f"synthetic:{split}", root), str(url), factory, spec=f"synthetic:{split}",
                        compression=compression, progress=False)  # an unfinished store resumes
        urls[split] = str(url)
    return urls


def run(work: Path, urls: dict[str, str], compression: str, seed: int, steps: int) -> dict:
    """Train (or resume) and evaluate one run; its metrics."""
    from lens_train.evaluation.evaluate import evaluate
    from lens_train.training.checkpoint import checkpoint_step
    from lens_train.training.trainer import TrainRequest, train

    out = work / "runs" / f"{compression}-seed{seed}"
    metrics_file = out / "eval" / "metrics.json"
    if not metrics_file.is_file():
        if checkpoint_step(out) != steps:
            train(TrainRequest(caches=(urls["train"],), out=out, preset="toy", device="cpu", quiet=True,
                               resume=out.is_dir(), train_overrides={"seed": seed, "steps": steps}))
        evaluate(out, urls["val"], out=out / "eval", figures=0, log=lambda line: None)
    return json.loads(metrics_file.read_text())


@app.command(help=__doc__.splitlines()[0])
def main(
    seeds: Annotated[str, typer.Option(help="comma-separated training seeds")] = "0,1,2",
    steps: Annotated[int, typer.Option(help="training steps of each run")] = 300,
    images: Annotated[int, typer.Option(help="synthetic images per split and set")] = 48,
    work: Annotated[Path, typer.Option()] = Path("work/codec"),
    compressions: Annotated[str, typer.Option(help="the reference first")] = "lossless,int8",
) -> None:
    from lens_train.training.presets import load_preset

    layer = load_preset("toy").main_layer
    names = compressions.split(",")
    urls = {name: stores(work, name, images, layer) for name in names}
    scores: dict[str, dict[int, float]] = {name: {} for name in names}
    for seed in (int(s) for s in seeds.split(",")):
        for name in names:
            metrics = run(work, urls[name], name, seed, steps)
            scores[name][seed] = metrics["giou"]
            print(json.dumps({"compression": name, "seed": seed, "steps": steps, "giou": metrics["giou"],
                              "ciou": metrics["ciou"], "num_queries": metrics["num_queries"]}), flush=True)
    reference = names[0]
    for name in names[1:]:
        diffs = [scores[name][s] - scores[reference][s] for s in scores[reference]]
        mean = sum(diffs) / len(diffs)
        se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs)) if len(diffs) > 1 else float("nan")
        print(json.dumps({"summary": f"{name} - {reference}", "giou_difference": round(100 * mean, 2),
                          "standard_error": round(100 * se, 2), "seeds": len(diffs),
                          reference: round(100 * sum(scores[reference].values()) / len(diffs), 2),
                          name: round(100 * sum(scores[name].values()) / len(diffs), 2)}), flush=True)


if __name__ == "__main__":
    app()
