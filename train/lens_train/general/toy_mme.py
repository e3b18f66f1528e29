"""A toy MME: the project's synthetic world written in MME's release layout.

Four perception subtasks, each image with two questions whose answers are opposite
(Yes first, then No, as MME pairs them), worded as MME words them:

- ``existence``: "Is there a red circle in this image? Please answer yes or no." Yes /
  "Is there a blue star in this image? ..." No (a colour-shape pair that is absent);
- ``count``: "Are there three shapes in this image? ..." Yes / "Are there four shapes ..." No;
- ``position``: "Is the red circle on the left of the blue star? ..." Yes / "... on the
  right of ..." No (two shapes named uniquely, clearly apart);
- ``color``: "Is the triangle green? ..." Yes / "Is the triangle purple? ..." No (a shape
  whose kind is unique in the image).

Layouts: existence and count are written as layout (a) (images and ``.txt`` side by
side), position and color as layout (b) (``images/`` + ``questions_answer_YN/``), so the
reader is exercised on both (the real release uses (a) for these four). Images are
JPEG (quality 95, as the synthetic dataset) except count's, which are PNG, so both kinds
are read too.

Scenes come from :func:`lens_manifests.synthetic.make_scene` seeded like the toy world's
(``lens_toy.world.scene_rng``) on stream :data:`TOY_MME_STREAM` = 2. The toy world
pretrains the toy models on stream 0 (``TRAIN``) and checks them on stream 1
(``HELD_OUT``); stream 2 is neither, so every toy-MME image is unseen by the toy LLaVA.
Each subtask draws from its own block of scene indices (:data:`SUBTASK_OFFSETS`);
a scene a subtask cannot ask about (e.g. no two uniquely named shapes for position) is
passed over, deterministically. The folder is a pure function of the arguments.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from lens_manifests.synthetic import COLOURS, JPEG_QUALITY, SHAPE_KINDS, Scene, make_scene
from lens_toy.world import TOY_NAMESPACE, scene_rng

from ..errors import UserError
from .mme import IMAGES_FOLDER, QUESTION_FOLDERS, RELEASE_FOLDER

#: The toy world's seed stream of toy-MME scenes (0: pretraining, 1: the toy's held-out checks).
TOY_MME_STREAM = 2
TOY_MME_SUBTASKS = ("existence", "count", "position", "color")
#: Layout per subtask: ``a`` side by side, ``b`` images/ + questions_answer_YN/.
TOY_LAYOUTS = {"existence": "a", "count": "a", "position": "b", "color": "b"}
TOY_IMAGE_SUFFIX = {"existence": ".jpg", "count": ".png", "position": ".jpg", "color": ".png"}
SUBTASK_OFFSETS = {"existence": 0, "count": 1_000_000, "position": 2_000_000, "color": 3_000_000}
YES_OR_NO = " Please answer yes or no."
MARKER = "TOY_MME.json"
#: Scenes tried per image before giving up (position needs two named shapes apart).
MAX_TRIES = 200
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

Pair = tuple[tuple[str, str], tuple[str, str]]


def _named(scene: Scene) -> list[int]:
    """Shapes whose colour-kind pair is unique in the scene."""
    combos = [(s.colour, s.kind) for s in scene.shapes]
    return [i for i, combo in enumerate(combos) if combos.count(combo) == 1]


def existence_pair(scene: Scene, rng: np.random.Generator) -> Pair | None:
    present = sorted({(s.colour, s.kind) for s in scene.shapes})
    absent = [(c, k) for c in COLOURS for k in SHAPE_KINDS if (c, k) not in present]
    if not present or not absent:
        return None
    (c1, k1), (c2, k2) = present[int(rng.integers(len(present)))], absent[int(rng.integers(len(absent)))]
    ask = "Is there a {} {} in this image?" + YES_OR_NO
    return (ask.format(c1, k1), "Yes"), (ask.format(c2, k2), "No")


def _count_question(n: int) -> str:
    if n == 1:
        return "Is there one shape in this image?" + YES_OR_NO
    return f"Are there {NUMBER_WORDS[n]} shapes in this image?" + YES_OR_NO


def count_pair(scene: Scene, rng: np.random.Generator) -> Pair | None:
    n = len(scene.shapes)
    if not 1 <= n <= 8:
        return None
    wrong = [m for m in (n - 1, n + 1) if m >= 1]
    return (_count_question(n), "Yes"), (_count_question(wrong[int(rng.integers(len(wrong)))]), "No")


def position_pair(scene: Scene, rng: np.random.Generator) -> Pair | None:
    named = _named(scene)
    apart = [(a, b) for a in named for b in named
             if scene.shapes[a].centre[0] < scene.shapes[b].centre[0] - 0.15 * scene.width]
    if not apart:
        return None
    left, right = apart[int(rng.integers(len(apart)))]
    name = [f"{scene.shapes[i].colour} {scene.shapes[i].kind}" for i in (left, right)]
    ask = "Is the {} on the {} of the {}?" + YES_OR_NO
    if rng.random() < 0.5:  # about the left one
        return (ask.format(name[0], "left", name[1]), "Yes"), (ask.format(name[0], "right", name[1]), "No")
    return (ask.format(name[1], "right", name[0]), "Yes"), (ask.format(name[1], "left", name[0]), "No")


def color_pair(scene: Scene, rng: np.random.Generator) -> Pair | None:
    kinds = [s.kind for s in scene.shapes]
    unique = [i for i, kind in enumerate(kinds) if kinds.count(kind) == 1]
    if not unique:
        return None
    shape = scene.shapes[unique[int(rng.integers(len(unique)))]]
    others = [c for c in COLOURS if c != shape.colour]
    ask = "Is the {} {}?" + YES_OR_NO
    wrong = others[int(rng.integers(len(others)))]
    return (ask.format(shape.kind, shape.colour), "Yes"), (ask.format(shape.kind, wrong), "No")


PAIR_MAKERS: dict[str, Callable[[Scene, np.random.Generator], Pair | None]] = {
    "existence": existence_pair, "count": count_pair, "position": position_pair, "color": color_pair,
}


def toy_item(subtask: str, index: int) -> tuple[Scene, Pair] | None:
    """Scene ``index`` of stream 2 and the subtask's question pair about it (None: it cannot ask)."""
    scene = make_scene(scene_rng(TOY_MME_STREAM, index), rule="cv2")
    rng = np.random.default_rng([TOY_NAMESPACE, TOY_MME_STREAM, index, 1])
    pair = PAIR_MAKERS[subtask](scene, rng)
    return None if pair is None else (scene, pair)


def toy_items(subtask: str, images: int) -> list[tuple[int, Scene, Pair]]:
    """The first ``images`` usable scenes of ``subtask``'s block: (scene index, scene, pair)."""
    out: list[tuple[int, Scene, Pair]] = []
    index = SUBTASK_OFFSETS[subtask]
    tries = 0
    while len(out) < images:
        item = toy_item(subtask, index)
        tries = 0 if item is not None else tries + 1
        if tries > MAX_TRIES:  # pragma: no cover - the world always has such scenes
            raise RuntimeError(f"no usable {subtask} scene in {MAX_TRIES} tries from index {index}")
        if item is not None:
            out.append((index, *item))
        index += 1
    return out


def write_toy_mme(out: str | Path, images: int, subtasks: Sequence[str] = TOY_MME_SUBTASKS) -> Path:
    """Write a toy MME with ``images`` images per subtask under ``out/MME_Benchmark_release_version``.

    Returns:
        the release folder (what ``--data-root`` takes; its parent works too).
    Raises:
        UserError: ``images`` < 1, a subtask that is not a toy one, ``out`` is a file.
    """
    if images < 1:
        raise UserError(f"--images must be at least 1, got {images}")
    unknown = [s for s in subtasks if s not in TOY_MME_SUBTASKS]
    if unknown or not subtasks:
        raise UserError(f"toy MME subtasks are {', '.join(TOY_MME_SUBTASKS)}; got {', '.join(subtasks) or 'none'}")
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder: give a folder (it is created if missing)")
    root = out / RELEASE_FOLDER
    for subtask in subtasks:
        _write_subtask(root / subtask, subtask, images)
    marker = {"stream": TOY_MME_STREAM, "images_per_subtask": images, "subtasks": list(subtasks),
              "layouts": {s: TOY_LAYOUTS[s] for s in subtasks}, "writer": "lens_train.general.toy_mme"}
    (root / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
    return root


def _write_subtask(folder: Path, subtask: str, images: int) -> None:
    if TOY_LAYOUTS[subtask] == "a":
        image_dir = question_dir = folder
    else:
        image_dir, question_dir = folder / IMAGES_FOLDER, folder / QUESTION_FOLDERS[0]
    image_dir.mkdir(parents=True, exist_ok=True)
    question_dir.mkdir(parents=True, exist_ok=True)
    suffix = TOY_IMAGE_SUFFIX[subtask]
    for index, scene, pair in toy_items(subtask, images):
        stem = f"{index:07d}"
        picture = Image.fromarray(scene.image)
        if suffix == ".jpg":
            picture.save(image_dir / f"{stem}{suffix}", quality=JPEG_QUALITY)
        else:
            picture.save(image_dir / f"{stem}{suffix}")
        (question_dir / f"{stem}.txt").write_text("".join(f"{q}\t{a}\n" for q, a in pair), encoding="utf-8")
