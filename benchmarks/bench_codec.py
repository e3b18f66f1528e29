"""Bytes per image, speed and error of each ``--compression`` at LLaVA-1.5-7B + SAM ViT-H dimensions (issue 21 item 4).

One image of a store is layer k's states of its 576 image tokens (576 x 4096 float16) and SAM's (256, 64, 64)
embedding: 6.8 MB as float16. This writes ``--images`` such images through the store's own codecs
(``lens_cache.store_create.feature_codecs``, chunks as ``store_format.SCHEMA``: one image per chunk) into a
temporary Zarr v3 group per compression, and prints ONE JSON line with, per compression: bytes per image on
disk, the ratio to ``lossless``, encode and decode MB/s on one core (float16 MB per second through zarr,
``threading.max_workers`` 1), and the error of what reads back against the float16 written.

The data is SYNTHETIC (real activations cannot be produced here), with stated statistics, chosen to look like
what a store holds where compressibility and int8 error depend on it:

* states: N(0, 1) per value, times a per-token norm factor exp(N(0, 0.3)); two fixed channels (1415, 2533, the
  massive-activation channels reported for LLaMA-2-7B) hold +-U(80, 120), ~100x the rest, on ``--massive-tokens``
  tokens (6 of 576: the "visual attention sink" tokens of LLaVA), and ~N(0, 3^2) on the others;
* SAM: white noise blurred spatially (Gaussian, sigma 2 px), normalised over the channels at each position (the
  neck's LayerNorm2d), then a per-channel weight 0.5 * exp(N(0, 0.5)) and bias N(0, 0.1^2): std ~0.5, channels of
  their own range.

    python benchmarks/bench_codec.py                  # 4 images, ~1 min on 2 cores
    python benchmarks/bench_codec.py --images 8 --repeats 9
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr
from lens_cache.store_codec import roundtrip
from lens_cache.store_create import feature_codecs, feature_row_axes
from lens_cache.store_format import COMPRESSIONS, IMAGE_STATES, SAM_EMBEDDINGS, image_array_name
from lens_cache.store_location import quiet_numcodecs

MASSIVE_CHANNELS = (1415, 2533)
STATES, SAM = image_array_name(14), SAM_EMBEDDINGS.name
DATA = ("synthetic, not real activations: states N(0,1) x per-token exp(N(0,0.3)), channels 1415 and 2533 at "
        "+-U(80,120) on {massive} of {tokens} tokens and N(0,3^2) on the rest; SAM: Gaussian-blurred (sigma 2 px) "
        "noise, LayerNorm over channels, per-channel weight 0.5*exp(N(0,0.5)) and bias N(0,0.1^2)")


def synthetic_states(rng: np.random.Generator, tokens: int, hidden: int, massive: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, hidden) float16 LLaMA-like states and the indices of the tokens with massive activations."""
    x = rng.standard_normal((tokens, hidden), dtype=np.float32) * np.exp(rng.normal(0, 0.3, (tokens, 1)))
    channels = [c % hidden for c in MASSIVE_CHANNELS]
    x[:, channels] = rng.normal(0, 3, (tokens, len(channels)))
    rows = np.sort(rng.choice(tokens, size=massive, replace=False))
    x[np.ix_(rows, channels)] = rng.choice([-1, 1], (massive, len(channels))) * rng.uniform(80, 120, (massive, len(channels)))
    return x.astype(np.float16), rows


def synthetic_sam(rng: np.random.Generator, channels: int, side: int = 64) -> np.ndarray:
    """(channels, side, side) float16: smooth maps, LayerNorm over channels, per-channel weight and bias."""
    noise = rng.standard_normal((channels, side, side), dtype=np.float32)
    frequency = np.fft.fftfreq(side)
    kernel = np.exp(-2 * (np.pi * 2.0) ** 2 * (frequency[:, None] ** 2 + frequency[None, :] ** 2))  # sigma 2 px
    smooth = np.fft.ifft2(np.fft.fft2(noise) * kernel).real
    normalised = (smooth - smooth.mean(axis=0)) / smooth.std(axis=0)
    weight = 0.5 * np.exp(rng.normal(0, 0.5, (channels, 1, 1)))
    bias = rng.normal(0, 0.1, (channels, 1, 1))
    return (normalised * weight + bias).astype(np.float16)


def relative_errors(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """``rms``: ||y - x|| / ||x||; ``max``: the largest |y - x| in units of its own row's RMS (rows: last axis)."""
    x, y = x.astype(np.float64).reshape(-1, x.shape[-1]), y.astype(np.float64).reshape(-1, y.shape[-1])
    diff = y - x
    row_rms = np.sqrt((x**2).mean(axis=1))
    nonzero = row_rms > 0
    return {"rms": float(np.sqrt((diff**2).sum() / (x**2).sum())),
            "max": float((np.abs(diff[nonzero]) / row_rms[nonzero, None]).max())}


def state_errors(x: np.ndarray, y: np.ndarray, massive_rows: np.ndarray) -> dict[str, dict[str, float]]:
    """The errors of (tokens, d) states: all rows, ordinary rows, massive-activation rows (all channels, and their
    other channels alone: what a row scale set by a ~100 value costs the ~1 values beside it)."""
    ordinary = np.setdiff1d(np.arange(len(x)), massive_rows)
    rest = np.setdiff1d(np.arange(x.shape[1]), [c % x.shape[1] for c in MASSIVE_CHANNELS])
    return {"all_rows": relative_errors(x, y), "ordinary_rows": relative_errors(x[ordinary], y[ordinary]),
            "massive_rows": relative_errors(x[massive_rows], y[massive_rows]),
            "massive_rows_other_channels": relative_errors(x[np.ix_(massive_rows, rest)], y[np.ix_(massive_rows, rest)])}


def best_seconds(action, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        best = min(best, time.perf_counter() - started)
    return best


def measure(compression: str, data: dict[str, np.ndarray], root: Path, repeats: int) -> dict:
    """Write every image of ``data`` through ``compression``'s codecs, read it back; bytes, speed, read-back values."""
    folder = root / compression
    group = zarr.open_group(str(folder), mode="w")
    arrays = {}
    with quiet_numcodecs():
        for name, spec in ((STATES, IMAGE_STATES), (SAM, SAM_EMBEDDINGS)):
            values = data[name]
            arrays[name] = group.create_array(name, shape=values.shape, chunks=(1, *values.shape[1:]), dtype="float16",
                                              fill_value=0, **feature_codecs(compression, feature_row_axes(spec)))

    def write() -> None:
        for name, array in arrays.items():
            for image in range(len(data[name])):
                array[image] = data[name][image]

    def read() -> None:
        for name, array in arrays.items():
            for image in range(len(data[name])):
                array[image]  # noqa: B018 - one chunk through zarr: read, decompress, decode

    megabytes = sum(values.nbytes for values in data.values()) / 1e6
    encode_s, decode_s = best_seconds(write, repeats), best_seconds(read, repeats)
    images = len(data[STATES])
    on_disk = {name: sum(f.stat().st_size for f in (folder / name / "c").rglob("*") if f.is_file()) for name in arrays}
    return {
        "bytes_per_image": sum(on_disk.values()) / images,
        "states_bytes_per_image": on_disk[STATES] / images, "sam_bytes_per_image": on_disk[SAM] / images,
        "encode_MBps": megabytes / encode_s, "decode_MBps": megabytes / decode_s,
        "read_back": {name: array[:] for name, array in arrays.items()},
    }


def sam_row_choices(sam: np.ndarray) -> dict[str, dict[str, float]]:
    """int8 error of SAM's (N, C, 64, 64) embeddings for each choice of row: a channel's 64x64 map (the store's),
    a spatial position's C channels, one scale for the whole (C, 64, 64) chunk."""
    by_position = np.moveaxis(sam, 1, -1)  # (N, 64, 64, C): a position's channels last
    choices = {
        "channel_map (stored)": roundtrip(sam, 2),
        "spatial_position": np.moveaxis(roundtrip(np.ascontiguousarray(by_position), 1), -1, 1),
        "whole_chunk": roundtrip(sam, 3),
    }
    flat = lambda v: np.moveaxis(v, 1, -1).reshape(-1, v.shape[1])  # noqa: E731 - rows: positions, for the metric
    return {name: relative_errors(flat(sam), flat(values)) for name, values in choices.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=576)
    parser.add_argument("--hidden-size", type=int, default=4096)
    parser.add_argument("--sam-channels", type=int, default=256)
    parser.add_argument("--massive-tokens", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=5, help="best of this many passes for each timing")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    zarr.config.set({"threading.max_workers": 1, "async.concurrency": 1})  # one core
    rng = np.random.default_rng(args.seed)
    states, massive = zip(*(synthetic_states(rng, args.tokens, args.hidden_size, args.massive_tokens)
                            for _ in range(args.images)), strict=True)
    data = {STATES: np.stack(states), SAM: np.stack([synthetic_sam(rng, args.sam_channels) for _ in range(args.images)])}
    root = Path(tempfile.mkdtemp(prefix="bench_codec_"))
    try:
        results = {compression: measure(compression, data, root, args.repeats) for compression in COMPRESSIONS}
    finally:
        shutil.rmtree(root)
    print(json.dumps(report(args, data, massive, results)), flush=True)


def report(args: argparse.Namespace, data: dict[str, np.ndarray], massive: tuple, results: dict) -> dict:
    """The JSON line: what was measured on what, then one row per compression."""
    lossless = results["lossless"]["bytes_per_image"]
    rows = {}
    for compression, result in results.items():
        back = result.pop("read_back")
        result["ratio_to_lossless"] = result["bytes_per_image"] / lossless
        result["ratio_to_float16"] = result["bytes_per_image"] / (sum(v[0].nbytes for v in data.values()))
        per_image = [state_errors(x, y, rows_) for x, y, rows_ in zip(data[STATES], back[STATES], massive, strict=True)]
        result["states_error"] = {key: {m: max(e[key][m] for e in per_image) for m in ("rms", "max")}
                                  for key in per_image[0]}
        result["sam_error"] = relative_errors(np.moveaxis(data[SAM], 1, -1), np.moveaxis(back[SAM], 1, -1))
        rows[compression] = {key: round(value, 4) if isinstance(value, float) else value for key, value in result.items()}
    whole = np.stack([roundtrip(x, 2) for x in data[STATES]])  # one scale per image's (576, d) chunk, for contrast
    return {
        "benchmark": "bench_codec", "data": DATA.format(massive=args.massive_tokens, tokens=args.tokens),
        "dims": {"tokens": args.tokens, "hidden_size": args.hidden_size, "sam": [args.sam_channels, 64, 64],
                 "images": args.images, "float16_bytes_per_image": sum(v[0].nbytes for v in data.values())},
        "machine": f"{platform.processor() or platform.machine()}, one core for the codecs (zarr threading.max_workers 1)",
        "errors_are": "rms: ||y-x||/||x||; max: max |y-x| in units of its row's RMS (states: a token; SAM: a position)"
                      "; the worst image of the run",
        "compressions": rows,
        "int8_states_one_scale_per_chunk": {"massive_rows_other_channels": state_errors(
            data[STATES][0], whole[0], massive[0])["massive_rows_other_channels"],
            "ordinary_rows": state_errors(data[STATES][0], whole[0], massive[0])["ordinary_rows"]},
        "int8_sam_row_choice": sam_row_choices(data[SAM]),
    }


if __name__ == "__main__":
    main()
