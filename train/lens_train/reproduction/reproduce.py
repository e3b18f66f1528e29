"""Reproduce the paper's tables end to end: caches -> training runs -> evaluations -> Markdown.

``make reproduce-table2`` / ``make reproduce-table3`` / ``make demo`` run these stages (command line: :mod:`.cli`)::

    python -m lens_train.reproduction table2 --preset paper --data-root DIR --mllm PATH --sam vit_h:PATH
    python -m lens_train.reproduction table2 --preset toy         # synthetic data, toy backbones, CPU
    python -m lens_train.reproduction table3 --preset toy
    python -m lens_train.reproduction demo                        # --preset toy (default) or tiny

Each stage writes a self-describing output with a completion marker (a complete store,
a run's final checkpoint, an evaluation's ``metrics.json``), and a stage whose output is
already complete is skipped, so an interrupted reproduction is continued by running the
same command again. Each table is one function (:func:`reproduce_table2`,
:func:`reproduce_table3`, :func:`demo`) that names its stores, its runs (:class:`RunSpec`)
and its evaluations, in that order; :class:`Settings` holds what the command line chose.

At the synthetic presets (``toy``: the project's pretrained toy backbones; ``tiny``: random
tiny ones, a pipeline check only) the datasets are replaced by their synthetic counterparts
written in the same formats (``synthetic:train`` for the training mix, ``synthetic-reason``
for ReasonSeg, ``synthetic-refer`` for RefCOCO), and the table says so.
"""

from __future__ import annotations

import functools
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lens_core.files import write_text_atomically

from ..errors import UserError

# torch, zarr, pyarrow and the modules that import them (..training's presets, trainer and checkpoint,
# ..evaluation.evaluate, lens_cache's backbones, builder and store, lens_manifests) are imported inside
# the stages, so `--help` answers at once; the stages look them up on each call (tests replace
# lens_cache.build.build_cache, lens_train.training.trainer.train and
# lens_train.evaluation.evaluate.evaluate to check which stages run).

# ----------------------------------------------------------------------------- the paper's numbers

#: Table 2 of the paper (ReasonSeg): val overall, test short, test long, test overall; (gIoU, cIoU).
PAPER_TABLE2: dict[str, dict[str, tuple[float, float]]] = {
    "lens": {"val": (61.4, 65.3), "short": (47.8, 41.7), "long": (59.3, 61.6), "test": (56.5, 57.3)},
    "layer30": {"val": (45.7, 43.6), "short": (32.6, 35.7), "long": (39.6, 40.8), "test": (37.9, 40.0)},
    "no_keypoint_description": {"val": (51.8, 48.5), "short": (42.1, 39.3), "long": (49.8, 49.8), "test": (47.9, 47.8)},
    "no_global_description": {"val": (56.0, 61.9), "short": (44.0, 40.3), "long": (50.4, 49.4), "test": (48.8, 47.9)},
    "no_attn_loss": {"val": (55.8, 51.7), "short": (42.9, 40.5), "long": (54.6, 53.4), "test": (51.7, 50.8)},
}
TABLE2_ROWS = {
    "lens": "LENS-7B",
    "layer30": "14th layer → 30th layer",
    "no_keypoint_description": "w/o keypoint description",
    "no_global_description": "w/o global description",
    "no_attn_loss": "w/o L_attn",
}
#: Table 3 of the paper (cIoU): RefCOCO val/testA/testB, RefCOCO+ val/testA/testB, RefCOCOg val(U)/test(U).
PAPER_TABLE3: dict[str, float] = {
    "refcoco:val": 76.5, "refcoco:testA": 78.3, "refcoco:testB": 71.4,
    "refcoco+:val": 66.1, "refcoco+:testA": 71.7, "refcoco+:testB": 58.3,
    "refcocog:val": 69.4, "refcocog:test": 70.6,
}
PAPER_TABLE3_MEAN = 70.3

# ----------------------------------------------------------------------------- what a table needs

#: Training specs of LISA's mix without VQA (semantic, referring, reasoning).
REAL_TRAIN_SPECS = (
    "ade20k:train", "cocostuff:train", "mapillary:train", "paco_lvis:train", "pascal_part:train",
    "refcoco:train", "refcoco+:train", "refcocog:train", "refclef:train",
    "reasonseg:train",
)
#: Real spec -> its synthetic stand-in at --preset tiny (None: no stand-in, the cell stays empty).
TINY_SPECS: dict[str, str | None] = {
    "reasonseg:val": "synthetic-reason:val",
    "reasonseg:test": "synthetic-reason:test",
    "refcoco:val": "synthetic-refer:val",
    "refcoco:testA": "synthetic-refer:testA",
    "refcoco:testB": "synthetic-refer:testB",
}
#: Steps of each of the five tiny-table runs when --steps is not given (the CPU budget: minutes).
TINY_TABLE_STEPS = 60
#: Synthetic images per split and set of `make demo`.
DEMO_IMAGES = 48


@dataclass(frozen=True)
class RunSpec:
    """One training run: its name and the lens-train options that make it an ablation."""

    name: str
    layer: str = "main"  # the preset's "main" or "late" layer
    model_overrides: dict[str, Any] = field(default_factory=dict)
    train_overrides: dict[str, Any] = field(default_factory=dict)


TABLE2_RUNS = (
    RunSpec("lens"),
    RunSpec("layer30", layer="late"),
    RunSpec("no_keypoint_description", model_overrides={"use_keypoint_description": False}),
    RunSpec("no_global_description", model_overrides={"use_global_description": False}),
    RunSpec("no_attn_loss", train_overrides={"attn_weight": 0.0}),
)


@dataclass
class Settings:
    """Where things are and what to run with."""

    preset: str
    work: Path  # stores/ and runs/ go here
    results: Path
    data_root: Path | None = None
    mllm: str | None = None
    sam: str | None = None
    device: str | None = None
    steps: int | None = None  # override of the preset's steps (tiny tables: TINY_TABLE_STEPS)
    tiny_images: int = 16  # synthetic images per split and set at the synthetic presets
    seeds: tuple[int, ...] = (0,)  # Table 2: one set of five runs per seed (noise between seeds)
    runs: tuple[str, ...] | None = None  # Table 2: the rows to train (None: all five; ``lens`` is always one)
    quiet: bool = False
    mme_root: Path | None = None  # Table 1 at real presets: the MME release on disk
    lisa_mllm: str | None = None  # Table 1 at real presets: a LISA-style MLLM folder (optional)

    @property
    def name(self) -> str:
        """The preset's name in run folders and table files (a preset ``.json`` path: its file stem)."""
        return Path(self.preset).stem if self.preset.endswith(".json") else self.preset

    @property
    def synthetic(self) -> bool:
        """True for presets that run on the synthetic world (``toy``, ``tiny``)."""
        return self.loaded.synthetic is not None

    @property
    def loaded(self):
        from ..training.presets import load_preset

        return load_preset(self.preset)

    @property
    def layers(self) -> tuple[int, int]:
        """(main, late) MLLM layers of the preset: one store holds both (Table 2 trains on both)."""
        return self.loaded.main_layer, self.loaded.late_layer

    def say(self, line: str) -> None:
        if not self.quiet:
            print(f"[reproduce] {line}", flush=True)


def check_inputs(settings: Settings) -> None:
    """Every missing input in one message (real presets need data, an MLLM and a SAM)."""
    if settings.synthetic:
        backbones = settings.loaded.synthetic
        if settings.mllm not in (None, "", backbones["mllm"]) or settings.sam not in (None, "", backbones["sam"]):
            raise UserError(f"PRESET={settings.preset} runs its own backbones ({backbones['mllm']} MLLM, "
                            f"{backbones['sam']} SAM) on synthetic data: leave MLLM and SAM unset")
        settings.mllm, settings.sam, settings.data_root = backbones["mllm"], backbones["sam"], None
        return
    missing = []
    if not settings.data_root:
        missing.append("DATA_ROOT=<LISA-style dataset folder>")
    elif not Path(settings.data_root).is_dir():
        missing.append(f"DATA_ROOT ({settings.data_root} is not a folder)")
    if not settings.mllm:
        missing.append("MLLM=<llava-1.5-7b-hf folder or HF id in the offline cache>")
    if not settings.sam:
        missing.append("SAM=vit_h:<path to sam_vit_h_4b8939.pth>")
    if missing:
        raise UserError(f"preset {settings.preset} needs " + ", ".join(missing)
                        + " (or PRESET=toy to run it on synthetic data with the toy backbones)")


# ----------------------------------------------------------------------------- stages


def synthetic_root(settings: Settings) -> Path:
    """The synthetic dataset of a synthetic-preset reproduction (written once; idempotent)."""
    from lens_manifests import write_synthetic

    root = settings.work / "data" / f"synthetic-{settings.tiny_images}"
    n = settings.tiny_images
    write_synthetic(root, seed=0, num_train_images=n, num_val_images=n, num_test_images=n)
    return root


def store_path(settings: Settings, spec: str, layers: tuple[int, ...]) -> Path:
    name = spec.replace(":", "-").replace("+", "plus")
    return settings.work / "stores" / f"{name}-L{'_'.join(map(str, layers))}"


def build_store(settings: Settings, spec: str, layers: tuple[int, ...]) -> str:
    """The complete store of ``spec`` at ``layers``: built, resumed or (if complete) reused."""
    from lens_cache.backbones import build_extractor
    from lens_cache.backbones.runtime import cpu_threads, resolve_device
    from lens_cache.build import build_cache
    from lens_cache.store import FeatureStore, StoreError
    from lens_manifests import build_manifest, manifest_hash

    data_root = synthetic_root(settings) if settings.synthetic else settings.data_root
    manifest = build_manifest(spec, data_root)
    url = str(store_path(settings, spec, layers))
    try:
        existing = FeatureStore.open(url)
        if existing.manifest_hash == manifest_hash(manifest) and tuple(existing.layers) == tuple(layers):
            settings.say(f"store {url} complete, skipped")
            return url
    except StoreError:
        pass
    settings.say(f"caching {spec} (layers {','.join(map(str, layers))}) -> {url}")
    factory = functools.partial(build_extractor, mllm=settings.mllm, sam=settings.sam, layers=layers,
                                device=settings.device)
    with cpu_threads(None, resolve_device(settings.device)):
        build_cache(manifest, url, factory, spec=spec, progress=not settings.quiet)
    return url


def train_run(settings: Settings, run: RunSpec, caches: list[str], prefix: str, seed: int = 0) -> Path:
    """A finished run of ``run`` (trained, resumed, or skipped if its last checkpoint exists).

    Seed 0 is the run ``PREFIX-NAME``; another seed is ``PREFIX-seedS-NAME``.
    """
    from ..training.checkpoint import checkpoint_step
    from ..training.presets import load_preset
    from ..training.trainer import TrainRequest, train

    out = settings.work / "runs" / (f"{prefix}-{run.name}" if seed == 0 else f"{prefix}-seed{seed}-{run.name}")
    overrides = dict(run.train_overrides)
    if settings.steps is not None:
        overrides["steps"] = settings.steps
    if seed != 0:
        overrides["seed"] = seed
    steps = load_preset(settings.preset, train_overrides=overrides).train.steps
    if checkpoint_step(out) == steps:
        settings.say(f"run {out} complete ({steps} steps), skipped")
        return out
    settings.say(f"training {run.name} -> {out}")
    train(TrainRequest(caches=tuple(caches), out=out, preset=settings.preset, model_overrides=dict(run.model_overrides),
                       train_overrides=overrides, layer=settings.layers[run.layer == "late"], device=settings.device,
                       resume=out.is_dir(), sam=None if settings.synthetic else settings.sam,
                       quiet=settings.quiet, cli={"reproduce": run.name}))
    return out


def evaluate_run(settings: Settings, run_dir: Path, cache: str, spec: str) -> dict[str, Any]:
    """``metrics.json`` of ``run_dir`` on ``cache`` (computed, or read if it is up to date)."""
    from ..training.checkpoint import checkpoint_step
    from ..evaluation.evaluate import evaluate

    out = run_dir / f"eval-{spec.replace(':', '-')}"
    path = out / "metrics.json"
    if path.is_file():
        metrics = json.loads(path.read_text())
        if metrics.get("step") == checkpoint_step(run_dir) and metrics.get("store") == cache:
            return metrics
    return evaluate(run_dir, cache, out=out, device=settings.device, sam=None if settings.synthetic else settings.sam,
                    log=settings.say if not settings.quiet else (lambda line: None))


def training_stores(settings: Settings) -> list[str]:
    specs = ("synthetic:train",) if settings.synthetic else REAL_TRAIN_SPECS
    return [build_store(settings, spec, settings.layers) for spec in specs]


def eval_spec(settings: Settings, spec: str) -> str | None:
    return TINY_SPECS.get(spec) if settings.synthetic else spec


# ----------------------------------------------------------------------------- tables


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def reproduce_table2(settings: Settings) -> Path:
    """Caches, the five runs of Table 2, their evaluations on ReasonSeg val/test, ``table2.md``."""
    check_inputs(settings)
    runs = table2_runs(settings)  # a misspelt row fails before any cache is built
    started = time.perf_counter()
    caches = training_stores(settings)
    evals = {split: build_store(settings, eval_spec(settings, f"reasonseg:{split}"), settings.layers)
             for split in ("val", "test")}
    results: dict[str, list[dict[str, Any]]] = {}
    for seed in settings.seeds:
        for run in runs:
            run_dir = train_run(settings, run, caches, prefix=f"table2-{settings.name}", seed=seed)
            results.setdefault(run.name, []).append({
                split: evaluate_run(settings, run_dir, evals[split], eval_spec(settings, f"reasonseg:{split}"))
                for split in evals
            })
    path = settings.results / ("table2.md" if settings.preset == "paper" else f"table2-{settings.name}.md")
    write_table2(path, results, settings, seconds=time.perf_counter() - started)
    settings.say(f"wrote {path}")
    return path


def table2_runs(settings: Settings) -> tuple[RunSpec, ...]:
    """The rows of Table 2 to train: ``settings.runs`` (LENS always among them, the others are compared
    with it), in the table's order.

    Raises:
        UserError: a name that is not a row of Table 2.
    """
    if settings.runs is None:
        return TABLE2_RUNS
    known = {run.name for run in TABLE2_RUNS}
    unknown = sorted(set(settings.runs) - known)
    if unknown:
        raise UserError(f"--runs: no Table 2 row {', '.join(unknown)}: choose among {', '.join(sorted(known))}")
    wanted = {"lens", *settings.runs}
    return tuple(run for run in TABLE2_RUNS if run.name in wanted)


def table2_cells(metrics: dict[str, dict[str, Any]]) -> dict[str, tuple[float | None, float | None]]:
    """val overall, test short/long/overall as (gIoU, cIoU) fractions from two metrics.json."""
    val, test = metrics["val"], metrics["test"]
    return {
        "val": (val["giou"], val["ciou"]),
        "short": (test["short"]["giou"], test["short"]["ciou"]),
        "long": (test["long"]["giou"], test["long"]["ciou"]),
        "test": (test["giou"], test["ciou"]),
    }


def write_table2(path: Path, results: dict[str, list[dict[str, Any]]], settings: Settings, *, seconds: float) -> None:
    """The table; with several seeds each cell is mean ± sd over seeds, and a note says which
    ablation differs from LENS by more than seed noise."""
    columns = ("val", "short", "long", "test")
    seeds = len(results["lens"])
    lines = [
        f"# Table 2 (ReasonSeg), preset `{settings.preset}`",
        "",
        _provenance(settings, seconds),
        "",
        "| Method | val gIoU | val cIoU | test short gIoU | test short cIoU | test long gIoU | test long cIoU "
        "| test overall gIoU | test overall cIoU |",
        "| --- | " + " | ".join(["---:"] * 8) + " |",
    ]
    for name in (name for name in TABLE2_ROWS if name in results):
        label = row_label(name, settings)
        per_seed = [table2_cells(metrics) for metrics in results[name]]
        paper = PAPER_TABLE2[name]
        cells = []
        for column in columns:
            for k in (0, 1):
                cells.append(f"{_mean_sd([cell[column][k] for cell in per_seed])} ({paper[column][k]:.1f})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    baseline = results["lens"][0]["test"]["baselines"]
    lines += [
        "",
        ("Each cell: ours (paper)." if seeds == 1 else f"Each cell: ours, mean ± sd over {seeds} seeds "
         f"({', '.join(map(str, settings.seeds))}) (paper).") + " Trivial baselines on test, gIoU / cIoU: whole image "
        f"{_pct(baseline['whole_image']['giou'])} / {_pct(baseline['whole_image']['ciou'])}; heatmap alone "
        f"{_pct(baseline['heatmap']['giou'])} / {_pct(baseline['heatmap']['ciou'])}.",
    ]
    if seeds > 1 and len(results) > 1:  # with ablations to compare
        lines += ["", "Test overall gIoU, ablation minus LENS (difference of means; beyond noise when larger "
                  "than twice its standard error over seeds):", ""]
        lens = [table2_cells(m)["test"][0] for m in results["lens"]]
        for name in (name for name in list(TABLE2_ROWS)[1:] if name in results):
            label = row_label(name, settings)
            other = [table2_cells(m)["test"][0] for m in results[name]]
            diff, se = _difference(other, lens)
            verdict = "beyond noise" if abs(diff) > 2 * se else "within noise"
            lines.append(f"- {label}: {100 * diff:+.1f} (SE {100 * se:.1f}): {verdict}")
    _write_text(path, "\n".join(lines) + "\n")


def row_label(name: str, settings: Settings) -> str:
    """The paper's row label; the layer row names the preset's own layers when they are not 14 and 30."""
    main, late = settings.layers
    if name == "layer30" and (main, late) != (14, 30):
        return f"layer {main} → layer {late}"
    return TABLE2_ROWS[name]


def _mean_sd(values: list[float | None]) -> str:
    present = [v for v in values if v is not None]
    if not present:
        return "—"
    if len(values) == 1:
        return _pct(present[0])
    mean = sum(present) / len(present)
    sd = (sum((v - mean) ** 2 for v in present) / max(1, len(present) - 1)) ** 0.5
    return f"{100 * mean:.1f} ± {100 * sd:.1f}"


def _difference(a: list[float], b: list[float]) -> tuple[float, float]:
    """(mean(a) - mean(b), its standard error) for two independent samples over seeds."""

    def mean_var(x: list[float]) -> tuple[float, float]:
        m = sum(x) / len(x)
        return m, sum((v - m) ** 2 for v in x) / max(1, len(x) - 1)

    (ma, va), (mb, vb) = mean_var(a), mean_var(b)
    return ma - mb, (va / len(a) + vb / len(b)) ** 0.5


def reproduce_table3(settings: Settings) -> Path:
    """Caches, the main LENS run (shared with Table 2), RefCOCO/+/g cIoU, ``table3.md``."""
    check_inputs(settings)
    started = time.perf_counter()
    caches = training_stores(settings)
    run_dir = train_run(settings, TABLE2_RUNS[0], caches, prefix=f"table2-{settings.name}")
    ours: dict[str, float | None] = {}
    for spec in PAPER_TABLE3:
        actual = eval_spec(settings, spec)
        if actual is None:
            ours[spec] = None
            continue
        cache = build_store(settings, actual, settings.layers[:1])
        ours[spec] = evaluate_run(settings, run_dir, cache, actual)["ciou"]
    path = settings.results / ("table3.md" if settings.preset == "paper" else f"table3-{settings.name}.md")
    present = [v for v in ours.values() if v is not None]
    mean = sum(present) / len(present) if present else None
    header = " | ".join(spec for spec in PAPER_TABLE3)
    lines = [
        f"# Table 3 (referring segmentation, cIoU), preset `{settings.preset}`",
        "",
        _provenance(settings, time.perf_counter() - started),
        "",
        f"| Method | {header} | mean |",
        "| --- | " + " | ".join(["---:"] * (len(PAPER_TABLE3) + 1)) + " |",
        "| LENS-7B (paper) | " + " | ".join(f"{v:.1f}" for v in PAPER_TABLE3.values()) + f" | {PAPER_TABLE3_MEAN:.1f} |",
        "| LENS (ours) | " + " | ".join(_pct(ours[s]) for s in PAPER_TABLE3) + f" | {_pct(mean)} |",
    ]
    if settings.synthetic:
        lines += ["", f"At `{settings.preset}` the synthetic REFER set stands in for RefCOCO; RefCOCO+ and RefCOCOg have no "
                  "stand-in (—). The mean is over the filled cells."]
    _write_text(path, "\n".join(lines) + "\n")
    settings.say(f"wrote {path}")
    return path


def _provenance(settings: Settings, seconds: float) -> str:
    import torch  # see the note at the imports

    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    note = (f"Made by `python -m lens_train.reproduction` on {time.strftime('%Y-%m-%d')} ({platform.node()}, {device}, "
            f"{seconds / 60:.1f} min for the stages that ran). Backbones: MLLM `{settings.mllm}`, SAM `{settings.sam}`.")
    if settings.preset == "tiny":
        note += (" **Tiny scale:** random-weight tiny backbones and synthetic data in the real formats; these "
                 "numbers test the pipeline, they are not comparable with the paper's.")
    elif settings.synthetic:
        note += (" **Toy world:** the project's toy backbones (pretrained on synthetic scenes, never on these "
                 "images) and synthetic data in the real formats; not comparable with the paper's numbers.")
    return note


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, text)


# ----------------------------------------------------------------------------- demo


def demo(settings: Settings) -> Path:
    """The whole pipeline on the synthetic world: data -> cache -> train -> eval -> table + figures.

    Scored on ``synthetic:val``, whose images neither the backbones' pretraining nor LENS's
    training saw.
    """
    check_inputs(settings)
    started = time.perf_counter()
    train_cache = build_store(settings, "synthetic:train", settings.layers[:1])
    val_cache = build_store(settings, "synthetic:val", settings.layers[:1])
    run_dir = train_run(settings, RunSpec("lens"), [train_cache], prefix="demo")
    metrics = evaluate_run(settings, run_dir, val_cache, "synthetic:val")
    eval_dir = run_dir / "eval-synthetic-val"
    base = metrics["baselines"]
    lines = [
        f"# LENS demo (preset `{settings.preset}`)",
        "",
        _provenance(settings, time.perf_counter() - started),
        "",
        f"Validation: {metrics['num_queries']} queries of `synthetic:val`.",
        "",
        "| predictor | gIoU | cIoU |",
        "| --- | ---: | ---: |",
        f"| LENS (trained {metrics['step']} steps) | {_pct(metrics['giou'])} | {_pct(metrics['ciou'])} |",
        f"| whole image | {_pct(base['whole_image']['giou'])} | {_pct(base['whole_image']['ciou'])} |",
        f"| heatmap alone (thresholded at half its peak) | {_pct(base['heatmap']['giou'])} "
        f"| {_pct(base['heatmap']['ciou'])} |",
        "",
        f"Figures: `{eval_dir / 'overlays.png'}` (image | heatmap + keypoints | prediction | ground truth), "
        f"`{run_dir / 'curve.png'}` (training curve).",
    ]
    path = settings.results / "demo.md"
    _write_text(path, "\n".join(lines) + "\n")
    print("\n".join(lines[4:]))
    print(f"\nresults: {path}\noverlays: {eval_dir / 'overlays.png'}\ntraining curve: {run_dir / 'curve.png'}")
    return path
