"""A toy routing benchmark from the synthetic world, in the routing reader's format.

``write_toy_routing(out, samples)`` writes ``out/routing.jsonl`` (one record per line:
``id``, ``tier``, ``query``, ``image``) and ``out/images/*.jpg``, ``samples`` per tier,
the tiers interleaved:

- ``non-seg``: questions that need no mask ("What colour is the triangle?", "How many
  shapes are there?", "Describe the image briefly.", "Is there a red star in the image?",
  and "Can you find a red star in the image? Answer yes or no.", which says "find");
- ``explicit``: "Segment the red circle.", "Please segment the leftmost shape in this image.",
  "Outline ...", "Mask out ...";
- ``reasoning``: the synthetic dataset's reasoning clues ("Can you segment the shape that
  has three corners?", "Highlight ...", "... Please output the segmentation mask.", and
  "Which part of the image shows the shape ...?", which names no segmentation word);
- ``mixed``: a question and a request together ("What colour is the star? Also segment it.").

Scenes are drawn like the toy world's on stream :data:`TOY_ROUTING_STREAM` = 3 (0 is
the toy models' pretraining, 1 their held-out checks, 2 the toy MME). Pure function of
the arguments. A few phrasings are meant to trip the agent's keyword fallback (the
"find" question, the "which part" request), so a perfect score needs the MLLM's routing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from lens_manifests.synthetic import (
    COLOURS,
    JPEG_QUALITY,
    SHAPE_KINDS,
    Scene,
    make_scene,
    reason_candidates,
    refer_sentences,
)
from lens_toy.world import TOY_NAMESPACE, scene_rng

from ..errors import UserError
from .routing import TIERS

TOY_ROUTING_STREAM = 3
BENCHMARK_FILE = "routing.jsonl"
IMAGES_FOLDER = "images"
MAX_TRIES = 200


def _pick(rng: np.random.Generator, options: list):
    return options[int(rng.integers(len(options)))] if options else None


def _unique_kinds(scene: Scene) -> list[str]:
    kinds = [s.kind for s in scene.shapes]
    return [k for k in kinds if kinds.count(k) == 1]


def _phrases(scene: Scene) -> list[str]:
    return [p for i in range(len(scene.shapes)) for p in refer_sentences(scene, i)]


def non_seg_query(scene: Scene, rng: np.random.Generator) -> str | None:
    colour, kind = _pick(rng, [(c, k) for c in COLOURS for k in SHAPE_KINDS])
    options = ["How many shapes are there?", "Describe the image briefly.",
               f"Is there a {colour} {kind} in the image?",  # present or not: no mask is wanted either way
               f"Can you find a {colour} {kind} in the image? Answer yes or no."]  # "find", yet no mask
    options += [f"What colour is the {k}?" for k in _unique_kinds(scene)]
    return _pick(rng, options)


def explicit_query(scene: Scene, rng: np.random.Generator) -> str | None:
    phrase = _pick(rng, _phrases(scene))
    if phrase is None:
        return None
    template = _pick(rng, ["Segment {}.", "Please segment {} in this image.", "Can you segment {}?",
                           "Outline {}.", "Mask out {}."])
    return template.format(phrase)


def reasoning_query(scene: Scene, rng: np.random.Generator) -> str | None:
    texts = [t for q in reason_candidates(scene) if q.is_sentence and len(q.targets) == 1 for t in q.texts]
    text = _pick(rng, texts)
    if text is None:
        return None
    if text.endswith("?"):
        return text[0].upper() + text[1:] + " Please output the segmentation mask."
    return _pick(rng, ["Can you segment {}?", "Please segment {}.", "Highlight {}.",
                       "Which part of the image shows {}?"]).format(text)  # the last: no keyword at all


def mixed_query(scene: Scene, rng: np.random.Generator) -> str | None:
    kind, phrase = _pick(rng, _unique_kinds(scene)), _pick(rng, _phrases(scene))
    options = []
    if kind is not None:
        options.append(f"What colour is the {kind}? Also segment it.")
    if phrase is not None:
        options += [f"How many shapes are there? Then segment {phrase}.",
                    f"Describe the image briefly and segment {phrase}."]
    return _pick(rng, options)


QUERY_MAKERS: dict[str, Callable[[Scene, np.random.Generator], str | None]] = {
    "non-seg": non_seg_query, "explicit": explicit_query, "reasoning": reasoning_query, "mixed": mixed_query,
}


def toy_sample(tier: str, index: int) -> tuple[Scene, str] | None:
    """Scene ``index`` of stream 3 and a ``tier`` query about it (None: this scene cannot give one)."""
    scene = make_scene(scene_rng(TOY_ROUTING_STREAM, index), rule="cv2")
    query = QUERY_MAKERS[tier](scene, np.random.default_rng([TOY_NAMESPACE, TOY_ROUTING_STREAM, index, 1]))
    return None if query is None else (scene, query)


def write_toy_routing(out: str | Path, samples: int) -> Path:
    """Write ``samples`` samples per tier under ``out``; returns the benchmark file.

    Raises:
        UserError: ``samples`` < 1 or ``out`` is a file.
    """
    if samples < 1:
        raise UserError(f"--samples must be at least 1, got {samples}")
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder: give a folder (it is created if missing)")
    (out / IMAGES_FOLDER).mkdir(parents=True, exist_ok=True)
    lines, index = [], 0
    for number in range(samples * len(TIERS)):
        tier = TIERS[number % len(TIERS)]
        for _ in range(MAX_TRIES):
            item = toy_sample(tier, index)
            index += 1
            if item is not None:
                break
        else:  # pragma: no cover - the world always has such scenes
            raise RuntimeError(f"no {tier} query in {MAX_TRIES} scenes")
        scene, query = item
        name = f"{IMAGES_FOLDER}/{index - 1:07d}.jpg"
        Image.fromarray(scene.image).save(out / name, quality=JPEG_QUALITY)
        lines.append(json.dumps({"id": f"toy-{number:05d}", "tier": tier, "query": query, "image": name}))
    path = out / BENCHMARK_FILE
    path.write_text("\n".join(lines) + "\n")
    return path
