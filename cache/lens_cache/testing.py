"""Test helpers: a deterministic fake backbone and tiny manifests with real image files.

:class:`FakeExtractor` implements :class:`lens_cache.backbones.base.FeatureExtractor`
with tiny dimensions (d=16 by default, the real 576 image tokens and a 256x64x64
SAM embedding, or Cx64x64 with ``sam_channels=C``). Its features are computed from the pixels and the question text
only, so two builds of the same manifest must agree bit for bit, whichever
process or worker computed them.

Run as a module it builds a store with the fake backbone (the crash/resume test
starts it as a real subprocess and SIGKILLs it)::

    python -m lens_cache.testing --manifest m.parquet --out store --delay 0.2 --log calls.txt
"""

from __future__ import annotations

import functools
import os
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import numpy as np
import pyarrow as pa
import torch
import typer
from lens_cache.backbones.base import ImageFeatures, NoDecoderLayers
from PIL import Image

FAKE_PROMPT = "USER: <image>\n{question} ASSISTANT:"
#: Extra tokens around the question: "\n" before it, "ASSISTANT:" after it.
FAKE_TEMPLATE_TOKENS = 3


class FakeExtractor:
    """A deterministic stand-in for the frozen MLLM + SAM encoder.

    Args:
        hidden_size: d of the fake MLLM.
        layers: cached layers.
        prompt_template, mllm, sam: recorded in ``identity`` (change one to test refusals).
        sam_channels: C of the (C, 64, 64) SAM embedding.
        delay_s: sleep per ``extract`` call (to make a build slow enough to kill).
        call_log: file to which each ``extract`` call appends its number of images.
        grid_size: side of the image-token grid (24: LLaVA-1.5's 576 tokens; 27: LLaVA-OneVision's 729).
        prefix_tokens: P of the prompt's tokens before the image whose states :meth:`prefix_states` gives
            (0: none, the store then has no ``prefix/``, as one of format version 3).
        question_set: None (the default): one question per query, and the identity of a fake store from
            before question sets; a set or a built-in name (``authors``): every variant of it is cached
            (:meth:`questions_for`) and the set is recorded in the identity.
    """

    #: no MLLM adapter to chat with (``lens_train.inference.segmenter.Segmenter`` runs such an extractor on the CPU)
    mllm = None

    def __init__(
        self,
        *,
        hidden_size: int = 16,
        layers: Sequence[int] = (14,),
        prompt_template: str = FAKE_PROMPT,
        mllm: str = "fake-mllm",
        sam: str = "fake-sam",
        sam_channels: int = 256,
        delay_s: float = 0.0,
        call_log: str | Path | None = None,
        grid_size: int = 24,
        prefix_tokens: int = 0,
        question_set: "str | object | None" = None,
    ) -> None:
        self.grid_size = grid_size
        self.prefix_tokens = prefix_tokens
        self.num_image_tokens = grid_size**2
        self.hidden_size = hidden_size
        self.layers = tuple(layers)
        self.sam_channels = sam_channels
        self.prompt_template = prompt_template
        self.delay_s = delay_s
        self.call_log = Path(call_log) if call_log else None
        self.identity = {
            "mllm": {"name": mllm, "hidden_size": hidden_size},
            "sam": {"name": sam},
            "layers": list(self.layers),
            "prompt_template": prompt_template,
            "dtype": "float32",
        }
        from lens_cache.questions import question_set as resolve_question_set

        self.question_set = None if question_set is None else resolve_question_set(question_set)
        if self.question_set is not None:
            self.identity.update(self.question_set.identity())
        self.images_extracted = 0

    def question_for(self, text: str, is_sentence: bool) -> str:
        if self.question_set is not None:
            return self.question_set.question(text, is_sentence)
        return text if is_sentence else f"Can you segment the {text} in this image?"

    def questions_for(self, text: str, is_sentence: bool) -> list[str]:
        if self.question_set is not None:
            return self.question_set.questions(text, is_sentence)
        return [self.question_for(text, is_sentence)]

    def num_text_tokens(self, question: str) -> int:
        """Words + template tokens; a question holding ``<image>`` is refused, as the real tokeniser does."""
        if "<image>" in question:
            from lens_cache.errors import BadSampleError

            raise BadSampleError(f"the text contains '<image>', the image token, not text: {question!r}")
        return len(question.split()) + FAKE_TEMPLATE_TOKENS

    def _projection(self, layer: int, rows: int) -> np.ndarray:
        return np.random.default_rng(1000 + layer).standard_normal((rows, self.hidden_size)).astype(np.float32)

    def extract(self, images: Sequence[Image.Image], questions: Sequence[Sequence[str]]) -> list[ImageFeatures]:
        """Features for each image: (grid_size², d) image states, (L_t, d) text states, (C, 64, 64) SAM."""
        if len(images) != len(questions):
            raise ValueError("one list of questions per image")
        if self.delay_s:
            time.sleep(self.delay_s)
        sam_projection = np.random.default_rng(7).standard_normal((self.sam_channels, 3)).astype(np.float32)
        features = []
        for image, image_questions in zip(images, questions, strict=True):
            rgb = image.convert("RGB")
            side = self.grid_size
            grid = np.asarray(rgb.resize((side, side), Image.BILINEAR), dtype=np.float32).reshape(side * side, 3) / 255.0
            small = np.asarray(rgb.resize((64, 64), Image.BILINEAR), dtype=np.float32) / 255.0
            image_states = {
                layer: torch.from_numpy(grid @ self._projection(layer, 3) + layer / 100.0) for layer in self.layers
            }
            text_states = []
            for question in image_questions:
                length = self.num_text_tokens(question)
                rng = np.random.default_rng(zlib.crc32(question.encode()))
                base = rng.standard_normal((length, self.hidden_size)).astype(np.float32) * 0.5 + float(grid.mean())
                text_states.append({layer: torch.from_numpy(base + layer / 100.0) for layer in self.layers})
            sam = np.einsum("hwc,kc->khw", small, sam_projection).astype(np.float32)
            width, height = rgb.size
            scale = 1024.0 / max(height, width)
            features.append(
                ImageFeatures(
                    image_states=image_states,
                    text_states=text_states,
                    sam_embedding=torch.from_numpy(sam),
                    original_size=(height, width),
                    input_size=(int(height * scale + 0.5), int(width * scale + 0.5)),
                )
            )
        self.images_extracted += len(images)
        if self.call_log is not None:
            with open(self.call_log, "a") as log:
                log.write(f"{len(images)}\n")
        return features

    def prefix_states(self) -> tuple[list[int], dict[int, torch.Tensor]] | None:
        """``prefix_tokens`` ids (1, 2, ...) and deterministic (P, d) states per layer; None when 0."""
        if not self.prefix_tokens:
            return None
        rng = np.random.default_rng(99)
        base = rng.standard_normal((self.prefix_tokens, self.hidden_size)).astype(np.float32)
        return list(range(1, self.prefix_tokens + 1)), {
            layer: torch.from_numpy(base + layer / 100.0) for layer in self.layers
        }

    def extract_one(self, image: Image.Image, question: str) -> ImageFeatures:
        """Features of one image and one question (live segmentation, as ``LensFeatureExtractor``'s)."""
        return self.extract([image], [[question]])[0]

    def decoder_layers(self, indices: Sequence[int]) -> tuple[dict, list[dict[str, torch.Tensor]]]:
        raise NoDecoderLayers("the fake backbone has no decoder layers")


def fake_factory(**kwargs) -> functools.partial:
    """A picklable extractor factory (dask ships it to workers by reference)."""
    return functools.partial(FakeExtractor, **kwargs)


def fake_build_extractor(
    mllm: str = "toy",
    sam: str = "toy",
    layers: Sequence[int] | None = None,
    device: str | None = None,
    dtype: object = None,
) -> FakeExtractor:
    """Stands in for ``lens_cache.backbones.build_extractor`` in CLI tests (monkeypatched)."""
    from lens_cache.backbones import default_layers

    layers = tuple(layers) if layers is not None else default_layers(mllm)
    return FakeExtractor(layers=layers, mllm=f"fake-{mllm}", sam=f"fake-{sam}")


WORDS = ("red", "blue", "small", "large", "circle", "square", "left", "right", "striped", "triangle")


def make_test_manifest(
    out_dir: str | Path,
    *,
    num_images: int = 10,
    seed: int = 0,
    corrupt: Sequence[int] = (),
    missing: Sequence[int] = (),
) -> pa.Table:
    """Write ``num_images`` small PNGs under ``out_dir`` and return their manifest.

    Each image gets 1-3 queries of varied length (phrases and sentences), so
    images, queries and text lengths are all ragged. Images listed in ``corrupt``
    are written as garbage bytes, those in ``missing`` are not written.
    """
    from lens_manifests.schema import MANIFEST_SCHEMA

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    columns: dict[str, list] = {name: [] for name in MANIFEST_SCHEMA.names}
    for image in range(num_images):
        height, width = (int(v) for v in rng.integers(20, 64, size=2))
        path = out_dir / f"img_{image:04d}.png"
        if image in corrupt:
            path.write_bytes(b"this is not a png" * 4)
        elif image not in missing:
            pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(path)
        for _ in range(int(rng.integers(1, 4))):
            is_sentence = bool(rng.random() < 0.3)
            words = list(rng.choice(WORDS, size=int(rng.integers(1, 9 if is_sentence else 4))))
            text = " ".join(words) + ("." if is_sentence else "")
            row = {
                "dataset": "testset",
                "task": "reasoning" if is_sentence else "referring",
                "split": "val",
                "image_id": f"img_{image:04d}",
                "image_path": str(path),
                "query_id": len(columns["query_id"]),
                "text": text,
                "is_sentence": is_sentence,
                "height": height,
                "width": width,
                "mask_rle": "",
                "ignore_rle": None,
                "source_id": None,
            }
            for name, value in row.items():
                columns[name].append(value)
    return pa.table(columns, schema=MANIFEST_SCHEMA)


#: The ways a chunk file gets damaged that the stores must notice.
DAMAGE_KINDS = ("deleted", "truncated", "flipped")


def damage_chunk(path: str | Path, kind: str) -> None:
    """Damage one chunk file of a store as a disk, a sync tool or a careless hand would.

    ``deleted``: the file is gone (zarr would read the fill value, zeros); ``truncated``:
    half of it is left; ``flipped``: three bytes (start, middle, end) are inverted.
    """
    path = Path(path)
    if kind == "deleted":
        path.unlink()
    elif kind == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "flipped":
        data = bytearray(path.read_bytes())
        for position in (len(data) // 8, len(data) // 2, len(data) - 2):
            data[position] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        raise ValueError(f"unknown damage {kind!r}: one of {DAMAGE_KINDS}")


HOLD_LOCK_SCRIPT = """
import sys, time
from lens_cache.locks import WriterLock
WriterLock(sys.argv[1], command=sys.argv[2]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def hold_lock(target: str | Path, command: str = "lens-cache build"):
    """A separate process holding the writer lock of ``target`` (kill it to leave a stale lock).

    Returns the ``subprocess.Popen``, once the lock is held.
    """
    import subprocess
    import sys

    process = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK_SCRIPT, str(target), command], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None and process.stdout.readline().strip() == "locked"
    return process


def main(
    manifest: Annotated[str, typer.Option()],
    out: Annotated[str, typer.Option()],
    block_size: Annotated[int, typer.Option()] = 2,
    batch_size: Annotated[int, typer.Option()] = 1,
    delay: Annotated[float, typer.Option(help="seconds of sleep per extract call")] = 0.0,
    log: Annotated[str | None, typer.Option(help="file that counts extracted images")] = None,
) -> None:
    """Build a store from a manifest file with the fake backbone (a real, killable run)."""
    import pyarrow.parquet as pq
    from lens_cache.build import build_cache

    build_cache(
        pq.read_table(manifest),
        out,
        fake_factory(delay_s=delay, call_log=log),
        spec="testset:val",
        batch_size=batch_size,
        block_size=block_size,
        progress=bool(os.environ.get("LENS_PROGRESS")),
    )


if __name__ == "__main__":
    typer.run(main)
