"""``lens-cache``: build, inspect, verify and export feature stores (stage 1).

Heavy imports (torch, zarr, dask, the backbones) happen inside the commands, so
``lens-cache --help`` answers at once. User errors (missing data, missing
checkpoint, a store of another build, a damaged store, a store another build is
writing, ...: ``lens_cache.errors.UserError`` and ``lens_manifests.ManifestError``)
print one line on stderr and exit with code 2; so does an output that cannot be written
because its disk is full or read-only (``lens_cache.errors.output_error``; the writers
remove their temporary files first). Set ``LENS_DEBUG=1`` to get the traceback instead.
Any other exception is a bug and keeps its traceback.

The project's commands (``lens-cache``, ``lens-train``, ``lens-eval``, ``lens-segment``,
``lens-chat``, ``lens-general``, ``python -m lens_train.reproduction``) are Typer apps made by
:func:`command_app` that map errors to exit codes with :func:`user_errors`, both defined here
once. (``lens-toy``, the toy backbones' pretraining in ``lens_toy``, keeps its own app.)
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any

import typer
from lens_cache.estimate import OPTION_HELP as ESTIMATE_HELP, run_estimate


def command_app(**options: Any) -> typer.Typer:
    """A Typer app as every console script of the project makes it.

    No shell-completion options, plain tracebacks for bugs (user errors are one line, see
    :func:`user_errors`), and help text printed as written: with Rich markup, a default
    written in square brackets (``[official]``, ``[preset's]``) would be taken for a style
    tag and vanish from ``--help``.
    """
    return typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None, **options)


app = command_app(
    name="lens-cache",
    help="Stage 1 of LENS: run the frozen MLLM and SAM's encoder once and cache their features in a Zarr store.",
    no_args_is_help=True,
)

#: exit status of a user error (one line on stderr); a bug keeps its traceback (exit 1)
USER_ERROR_EXIT = 2
#: skipped images (and refused queries) ``info`` lists one per line; ``verify`` lists all
INFO_FAILURES = 20


def user_error_types() -> tuple[type[BaseException], ...]:
    """The exceptions that are the user's to fix (StoreError, LockHeldError, ... are UserErrors)."""
    from lens_cache.errors import UserError
    from lens_manifests import ManifestError

    return (UserError, ManifestError)


def as_user_error(error: Exception, output: str | Path | None = None) -> Exception | None:
    """``error`` if it is the user's to fix, the one-line ``OutputError`` for a full or read-only
    disk under ``output`` (what the command writes), else None (a bug)."""
    from lens_cache.errors import output_error

    if isinstance(error, user_error_types()):
        return error
    return output_error(error, output)


@contextlib.contextmanager
def user_errors(
    output: str | Path | None = None,
    *,
    exit_codes: Mapping[type[BaseException], int] | None = None,
    also: tuple[type[BaseException], ...] = (),
) -> Iterator[None]:
    """Turn user errors into one line on stderr and exit code 2; anything else keeps its traceback.

    The one place where an exception becomes an exit status, for every command of the project.

    Args:
        output: what the command writes, named when its disk turns out full or read-only.
        exit_codes: other expected failures and their exit status, checked first (stage 2:
            ``NonFiniteLossError`` -> 1); each is printed as one line too.
        also: further exception types that count as the user's (exit 2) for this command.
    ``LENS_DEBUG=1`` keeps every traceback.
    """
    try:
        yield
    except Exception as error:
        if os.environ.get("LENS_DEBUG"):
            raise
        from lens_cache.errors import one_line

        for kind, code in (exit_codes or {}).items():
            if isinstance(error, kind):
                typer.echo(f"error: {one_line(error)}", err=True)
                raise typer.Exit(code) from None
        mine = error if also and isinstance(error, also) else as_user_error(error, output)
        if mine is None:
            raise
        quiet_sibling_failures(mine)
        typer.echo(f"error: {one_line(mine)}", err=True)
        raise typer.Exit(USER_ERROR_EXIT) from None


def quiet_sibling_failures(error: Exception) -> None:
    """After a full or read-only disk, keep asyncio from logging the same failure of every other
    write zarr had in flight ("Future exception was never retrieved", at exit): one line is enough."""
    from lens_cache.errors import OutputError

    if isinstance(error, OutputError):
        import logging

        logging.getLogger("asyncio").setLevel(logging.CRITICAL)


def parse_layers(text: str) -> tuple[int, ...]:
    """``"14"`` or ``"14,30"`` -> (14,) / (14, 30)."""
    from lens_cache.errors import UsageError

    try:
        layers = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UsageError(f"--layers takes a comma-separated list of integers (e.g. 14,30), got {text!r}") from None
    if not layers or min(layers) < 1:
        raise UsageError(f"--layers takes positive layer numbers (e.g. 14,30), got {text!r}")
    return tuple(sorted(set(layers)))


@app.command()
def build(
    *,
    split: Annotated[
        str | None, typer.Option(help="Dataset split spec: refcoco, refcoco:val, reasonseg:val, synthetic:train, ...")
    ] = None,
    out: Annotated[str, typer.Option(help="Store to write: a local path or fsspec URL (s3://..., gs://...).")],
    data_root: Annotated[
        Path | None, typer.Option(help="LISA-style dataset folder (not needed for synthetic specs).")
    ] = None,
    manifest: Annotated[
        Path | None, typer.Option(help="Use this manifest .parquet instead of building one from --split.")
    ] = None,
    mllm: Annotated[str, typer.Option(help="LLaVA-1.5 / Qwen2-VL / Qwen2.5-VL / LLaVA-OneVision checkpoint folder or HF id, or 'toy', 'tiny' ('tiny-qwen2vl', 'tiny-qwen2.5vl' = 'tiny-qwen25vl', 'tiny-onevision').")] = "toy",
    sam: Annotated[str, typer.Option(help="SAM as vit_h:PATH (vit_l:/vit_b:), 'tiny', or 'toy' (toy:PATH).")] = "toy",
    layers: Annotated[
        str | None,
        typer.Option(help="MLLM layers to cache, comma-separated (hidden_states index) [the main layer of the preset made for the MLLM: 3 for toy, 14 for LLaVA-1.5, 20 for Qwen2-VL, 26 for Qwen2.5-VL, 20 for OneVision; else 14].", show_default=False),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Images per backbone call.")] = 4,
    block_size: Annotated[
        int | None,
        typer.Option(
            help="Images per block, the unit of work and of resume [default: 32, or the store's own when resuming]."
        ),
    ] = None,
    workers: Annotated[int, typer.Option(help="Local dask worker processes, one GPU each (0 = run here).")] = 0,
    scheduler: Annotated[
        str | None, typer.Option(help="Address of a running dask scheduler (tcp://host:8786).")
    ] = None,
    compression: Annotated[
        str | None,
        typer.Option(
            help="lossless (zstd), bitround (7 mantissa bits + zstd, ~1.3x), int8 (int8 rows, a scale per row, + zstd, ~2x, lossy: cache/README.md) or none [default: lossless, or the store's own when resuming]."
        ),
    ] = None,
    device: Annotated[str | None, typer.Option(help="cuda or cpu (default: cuda when available).")] = None,
    threads: Annotated[
        int | None,
        typer.Option(help="CPU threads of the backbones when they run on the CPU (default: half the cores, at least 1)."),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Delete an existing store at --out first.")] = False,
    allow_library_change: Annotated[bool, typer.Option(
        "--allow-library-change",
        help="Resume or repair a store built under other versions of torch/transformers/segment-anything/pillow/numpy "
             "(its features then mix two versions; the store records it). Refused without this.")] = False,
    limit: Annotated[int | None, typer.Option(help="Cache only the first N images (smoke tests).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of manifest building (class sampling, synthetic data).")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress line.")] = False,
    question_set: Annotated[
        str | None,
        typer.Option(help="Question templates: 'authors' (the LENS authors' evaluation question + LISA's training templates, every one cached per query) or 'single' (one template) [default: authors; single for toy and tiny].", show_default=False),
    ] = None,
) -> None:
    """Cache the backbone features of one dataset split (resumes an interrupted build).

    Default backbones: --mllm toy --sam toy, the toy-world LLaVA and SAM shipped with the
    project (no download; run on a CPU), layer 3. For the paper's setting name the
    checkpoints: --mllm llava-hf/llava-1.5-7b-hf --sam vit_h:PATH (layer 14). lens-train
    then picks the preset made for the store's MLLM. --mllm tiny --sam tiny are random-weight
    models built in code, for pipeline tests only.
    \f
    Long because its 20 options are declared in its signature, as Typer reads them (one to six lines
    each, with their help); the body only turns them into one :func:`lens_cache.build.build_cache` call.
    (The form feed above ends the help text ``lens-cache build --help`` shows.)
    """
    with user_errors(output=out):
        import functools

        from lens_cache.backbones import default_layers
        from lens_cache.build import build_cache, first_images

        started = time.monotonic()
        layer_list = parse_layers(layers) if layers is not None else default_layers(mllm)
        table, spec = _load_manifest(split, data_root, manifest, seed)
        if limit is not None:
            table = first_images(table, limit)
        from lens_cache.backbones import build_extractor
        from lens_cache.backbones.runtime import cpu_threads, resolve_device

        factory = functools.partial(build_extractor, mllm=mllm, sam=sam, layers=layer_list, device=device,
                                    **({"question_set": question_set} if question_set is not None else {}))
        # Serial CPU builds: a narrower OpenMP team than the machine (the loader and writer
        # threads need cores too); dask workers are started single-threaded by their nanny.
        with cpu_threads(threads, resolve_device(device)):
            store = build_cache(
                table,
                out,
                factory,
                spec=spec,
                batch_size=batch_size,
                block_size=block_size,
                compression=compression,
                workers=workers,
                scheduler=scheduler,
                overwrite=overwrite,
                progress=not quiet,
                allow_library_change=allow_library_change,
            )
        typer.echo(
            f"{store.url}: {store.num_images} images, {store.num_queries} queries, layers {list(store.layers)} "
            f"({time.monotonic() - started:.1f}s)"
        )


def _load_manifest(split: str | None, data_root: Path | None, manifest: Path | None, seed: int):
    from lens_manifests import build_manifest, read_manifest

    if manifest is not None:
        table = read_manifest(manifest)
        recorded = (table.schema.metadata or {}).get(b"spec")
        return table, split or (recorded.decode() if recorded else manifest.stem)
    if split is None:
        from lens_cache.errors import UsageError

        raise UsageError("give --split SPEC (e.g. refcoco:val) or --manifest FILE.parquet")
    return build_manifest(split, data_root, seed=seed), split


@app.command("manifest")
def manifest_command(
    split: Annotated[str, typer.Option(help="Dataset split spec (refcoco:val, synthetic:train, ...).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Parquet file to write.")],
    data_root: Annotated[
        Path | None, typer.Option(help="LISA-style dataset folder (not needed for synthetic specs).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of class sampling / synthetic data.")] = 0,
) -> None:
    """Build a manifest (one Parquet row per query) without caching anything."""
    with user_errors(output=out):
        from lens_manifests import build_manifest, write_manifest

        table = build_manifest(split, data_root, seed=seed)
        digest = write_manifest(table, out, spec=split)
        images = len(set(zip(table.column("dataset").to_pylist(), table.column("image_id").to_pylist(), strict=True)))
        typer.echo(f"{out}: {table.num_rows} queries of {images} images (hash {digest[:12]})")


@app.command()
def synth(
    out: Annotated[Path, typer.Option(help="Folder for the synthetic dataset (ReasonSeg, REFER and ADE20K formats).")],
    seed: Annotated[int, typer.Option(help="Random seed; the data is a pure function of it.")] = 0,
) -> None:
    """Generate the synthetic dataset (idempotent)."""
    with user_errors(output=out):
        from lens_manifests.synthetic import write_synthetic

        marker = write_synthetic(out, seed=seed)
        typer.echo(f"{out}: {json.dumps(marker.get('counts', {}), sort_keys=True)}")


@app.command()
def info(store: Annotated[str, typer.Argument(help="Store path or URL.")]) -> None:
    """Identity, sizes, bytes on disk per image and per query, completion."""
    with user_errors():
        from lens_cache.store import FeatureStore, failure_lines
        from lens_cache.store_format import is_image_array, is_query_array
        from lens_manifests import get_skipped

        opened = FeatureStore.open(store, require_complete=False)
        attrs = opened.attrs
        done = int(opened.done_flags().sum())
        per_array = {name: opened.location.bytes_under(name) for name in opened.array_names()}
        failed_images, failed_queries = opened.failed_images(), opened.failed_queries()
        left_out = get_skipped(opened.unchecked_manifest())  # what the manifest's adapter skipped, and why
        image_bytes = sum(size for name, size in per_array.items() if is_image_array(name))
        query_bytes = sum(size for name, size in per_array.items() if is_query_array(name))
        lines = [
            f"store        {opened.url}",
            f"format       lens_cache v{attrs['format_version']} ({attrs['created_by']})",
            f"spec         {attrs['spec']}",
            f"complete     {attrs['complete']} ({done}/{opened.num_blocks} blocks of {opened.block_size} images)",
            f"identity     {attrs['identity_hash'][:16]}",
            f"layers       {list(opened.layers)}  (d={opened.hidden_size}, {opened.num_image_tokens} image tokens)",
            "prefix       " + (f"{len(opened.prefix_token_ids)} tokens before the image, stored once per layer"
                               if opened.prefix_token_ids is not None else "none (format 3 or older, or none given)"),
            f"size         {opened.num_images} images, {opened.num_queries} queries, max_text_len {opened.max_text_len}",
            f"questions    set {opened.question_set!r}, up to {opened.max_text_variants} text variant(s) per query "
            "(variant 0: evaluation; 1..: training)"
            + (f", training variants up to {opened.text_variants['max_len']} tokens" if opened.max_text_variants > 1 else ""),
            *[f"  {kind:<8} {v}: {name}" for kind, names in opened.text_variant_templates.items()
              for v, name in enumerate(names)],
            f"storage      {attrs['storage_dtype']}, compression {attrs['compression']}",
            "libraries    " + (", ".join(f"{k} {v}" for k, v in attrs["libraries"].items())
                               if attrs.get("libraries") else "not recorded (format 5 or older)")
            + (f"; resumed under {len(attrs['libraries_mixed'])} other set(s): "
               + " | ".join(", ".join(f"{k} {v}" for k, v in m.items()) for m in attrs["libraries_mixed"])
               if attrs.get("libraries_mixed") else ""),
            f"manifest     {attrs['manifest_hash'][:16]}",
            f"failed       {len(failed_images)} image(s) and {len(failed_queries)} other query(ies) skipped; "
            f"{len(left_out)} item(s) left out of the manifest",
            *["  " + line for line in failure_lines(failed_images, failed_queries, most=INFO_FAILURES)],
            *[f"  left out of the manifest: {item['path']}: {item['reason']}" for item in left_out[:INFO_FAILURES]],
            *([f"  ... and {len(left_out) - INFO_FAILURES} more left out"] if len(left_out) > INFO_FAILURES else []),
            f"bytes        {_human(sum(per_array.values()))} total; "
            f"{_human(image_bytes / max(opened.num_images, 1))} per image, {_human(query_bytes / max(opened.num_queries, 1))} per query",
        ]
        lines += [f"  {name:<22} {_human(size)}" for name, size in per_array.items()]
        lines.append("identity:")
        lines += ["  " + line for line in json.dumps(attrs["identity"], indent=2, sort_keys=True).splitlines()]
        typer.echo("\n".join(lines))


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"  # pragma: no cover


@app.command()
def verify(
    store: Annotated[str, typer.Argument(help="Store path or URL.")],
    quick: Annotated[
        bool, typer.Option("--quick", help="Structure only (blocks, arrays, hashes, chunk listing): read no values.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress line.")] = False,
) -> None:
    """Read every value back and check it against its checksum, with every block, array and hash;
    exit 1 if anything is wrong (`lens-cache build` with the same options repairs what is damaged)."""
    with user_errors():
        from lens_cache.store import verify_store

        report = verify_store(store, quick=quick, progress=not quiet)
    for line in report.lines():
        typer.echo(line)
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def export(
    store: Annotated[str, typer.Argument(help="Store path or URL (must be complete).")],
    out: Annotated[Path, typer.Argument(help="HDF5 file to write.")],
    compression: Annotated[str, typer.Option(help="gzip, lzf or none.")] = "gzip",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing file that is not an export of this store.")] = False,
) -> None:
    """Copy a complete store into one HDF5 file (same arrays and attributes); an earlier export of the same
    store is replaced, any other existing file only with --overwrite."""
    with user_errors(output=out):
        from lens_cache.export import export_hdf5

        path = export_hdf5(store, out, compression=compression, overwrite=overwrite)
        typer.echo(f"{path}: {_human(path.stat().st_size)}")


@app.command("prompt")
def prompt_command(
    *,
    question: Annotated[str, typer.Option(help="A short phrase (put in the question template) or, with --sentence, a sentence.")],
    mllm: Annotated[
        str, typer.Option(help="LLaVA-1.5 / Qwen2-VL / Qwen2.5-VL / LLaVA-OneVision checkpoint folder or HF id, or 'toy', 'tiny', 'tiny-qwen2vl', 'tiny-onevision'.")
    ] = "toy",
    sentence: Annotated[bool, typer.Option("--sentence", help="Ask the text as it is (a reasoning query), as build does for sentence rows.")] = False,
    device: Annotated[str | None, typer.Option(help="cuda or cpu (default: cpu: nothing runs, the model is only loaded).")] = "cpu",
    question_set: Annotated[
        str | None, typer.Option(help="Question templates, as for build (default: the MLLM's: authors; single for toy and tiny).", show_default=False)
    ] = None,
    variant: Annotated[int, typer.Option(help="Which template: 0 the evaluation question, 1.. the training ones (as a store numbers them).")] = 0,
    all_variants: Annotated[bool, typer.Option("--all-variants", help="Show every variant a store caches for this question.")] = False,
) -> None:
    """Print the exact prompt and token ids the MLLM sees for one question (no forward).

    The MLLM is loaded as build loads it; printed: the prompt text with the image span marked
    (<image xN>), the ids with the image run collapsed ([ID x N]), the prefix length P (tokens before
    the image, stored once per store), the text tokens after the image (L_t) and the start-of-answer token.
    """
    with user_errors():
        from lens_cache.backbones import build_mllm, default_layers
        from lens_cache.errors import UsageError
        from lens_cache.prompt_view import view_prompt

        # bfloat16: nothing runs but the loader's checks, so a 7B checkpoint loads in half the memory on a CPU
        loaded = build_mllm(mllm, layers=default_layers(mllm), device=device, dtype="bfloat16", question_set=question_set)
        count = loaded.question_set.num_variants(sentence)
        if not 0 <= variant < count:
            raise UsageError(f"--variant {variant}: question set {loaded.question_set.name!r} has {count} variant(s) "
                             f"for a {'sentence' if sentence else 'short phrase'} (0..{count - 1})")
        for v in range(count) if all_variants else [variant]:
            if all_variants:
                typer.echo(f"--- variant {v} of {count} ({loaded.question_set.kind(sentence).names()[v]})")
            for line in view_prompt(loaded, question, name=mllm, is_sentence=sentence, variant=v).lines():
                typer.echo(line)


@app.command("probe-layers")
def probe_layers_command(
    *,
    split: Annotated[
        str | None, typer.Option(help="Dataset split spec: synthetic:val, refcoco:val, reasonseg:val, ...")
    ] = None,
    data_root: Annotated[
        Path | None, typer.Option(help="LISA-style dataset folder (not needed for synthetic specs).")
    ] = None,
    manifest: Annotated[
        Path | None, typer.Option(help="Use this manifest .parquet instead of building one from --split.")
    ] = None,
    mllm: Annotated[
        str, typer.Option(help="LLaVA-1.5 / Qwen2-VL / Qwen2.5-VL / LLaVA-OneVision checkpoint folder or HF id, or 'toy', 'tiny', 'tiny-qwen2vl', 'tiny-onevision'.")
    ] = "toy",
    limit: Annotated[int | None, typer.Option(help="Probe only the queries of the first N images.")] = None,
    out: Annotated[Path, typer.Option(help="Folder for probe_layers.json, .csv and .png.")] = Path("probe-layers"),
    device: Annotated[str | None, typer.Option(help="cuda or cpu (default: cuda when available).")] = None,
    threads: Annotated[
        int | None,
        typer.Option(help="CPU threads of the MLLM when it runs on the CPU (default: half the cores, at least 1)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of manifest building (class sampling, synthetic data).")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress line.")] = False,
) -> None:
    """Score every decoder layer's image attention against the ground truth (no training).

    Per query: one forward of the image and the store's prompt; per decoder layer, the last token's
    attention to the image tokens (mean of heads) on the adapter's grid, scored by the pointing game
    and by IoU of the map above half its peak with the target cells; chance = target cells / grid cells.
    Prints the table, writes OUT/probe_layers.json, .csv and .png, and names the best layers.
    """
    with user_errors(output=out):
        from lens_cache.build import first_images
        from lens_cache.probe_layers import format_table, run_probe

        table, spec = _load_manifest(split, data_root, manifest, seed)
        if limit is not None:
            table = first_images(table, limit)
        result, paths = run_probe(table, split=spec, mllm=mllm, out=out, device=device, progress=not quiet,
                                  threads=threads)
        typer.echo(f"{spec}, --mllm {mllm}: {result.num_layers} decoder layers, {result.grid_size}x{result.grid_size} "
                   f"grid, {result.queries} queries scored ({result.meta['elapsed_s']:.1f}s)")
        typer.echo(format_table(result))
        typer.echo("wrote " + ", ".join(str(path) for path in paths))


@app.command("estimate")
def estimate_command(
    split: Annotated[str, typer.Option(help=ESTIMATE_HELP["split"])],
    data_root: Annotated[Path | None, typer.Option(help=ESTIMATE_HELP["data_root"])] = None,
    mllm: Annotated[str, typer.Option(help=ESTIMATE_HELP["mllm"])] = "toy",
    layers: Annotated[str | None, typer.Option(help=ESTIMATE_HELP["layers"], show_default=False)] = None,
    sam: Annotated[str | None, typer.Option(help=ESTIMATE_HELP["sam"], show_default=False)] = None,
    compression: Annotated[str, typer.Option(help=ESTIMATE_HELP["compression"])] = "lossless",
    gpu: Annotated[str, typer.Option(help=ESTIMATE_HELP["gpu"])] = "h100",
    mfu: Annotated[float, typer.Option(help=ESTIMATE_HELP["mfu"])] = 0.4,
    preset: Annotated[str | None, typer.Option(help=ESTIMATE_HELP["preset"], show_default=False)] = None,
    question_set: Annotated[str | None, typer.Option(help=ESTIMATE_HELP["question_set"], show_default=False)] = None,
    device: Annotated[str, typer.Option(help=ESTIMATE_HELP["device"])] = "cuda",
    train_samples_per_s: Annotated[float | None, typer.Option(help=ESTIMATE_HELP["train_samples_per_s"])] = None,
    as_json: Annotated[bool, typer.Option("--json", help=ESTIMATE_HELP["json"])] = False,
) -> None:
    """What a build takes, before running it: counts, store bytes, free disk, build GPU-hours, stage-2 time."""
    with user_errors():
        from lens_cache.estimate_report import as_json as estimate_json, report_lines

        result = run_estimate(split, mllm, layers=parse_layers(layers) if layers is not None else None, sam=sam,
                              data_root=data_root, compression=compression, gpu=gpu, mfu=mfu, preset=preset,
                              question_set=question_set, device=device, train_samples_per_s=train_samples_per_s)
    typer.echo(json.dumps(estimate_json(result), indent=2) if as_json else "\n".join(report_lines(result)))


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
