"""Language of the synthetic dataset: the phrases that pick shapes out of a scene.

:func:`reason_candidates` lists every ReasonSeg-style query with a well-defined answer
(reasoning sentences from :data:`KIND_CLUES`, :data:`COLOUR_CLUES` and
:data:`EXTREME_PHRASES`, or short phrases, with near-ties to ignore);
:func:`refer_sentences` lists the REFER-style phrases that single out one shape.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .scenes import COLOURS, SHAPE_KINDS, Scene, Shape, make_scene

#: reasoning clues for a shape kind: (relative clause, full phrasings)
KIND_CLUES: dict[str, tuple[str, tuple[str, ...]]] = {
    "circle": (
        "is perfectly round",
        ("the round shape without any corners", "the shape that could roll like a wheel",
         "the shape as round as a coin"),
    ),
    "square": (
        "has four equal sides",
        ("the shape with four equal sides and four right angles", "the shape that looks like a floor tile",
         "the shape with four corners that are all right angles"),
    ),
    "triangle": (
        "has three corners",
        ("the shape that has three corners", "the shape with exactly three straight sides",
         "which shape in the picture is made of three straight edges?"),
    ),
    "star": (
        "has five pointed tips",
        ("the shape that looks like a star in the night sky", "the shape with five pointed tips",
         "the shape you might put on top of a christmas tree"),
    ),
    "hexagon": (
        "has six corners",
        ("the shape with six corners", "the shape like a single cell of a honeycomb",
         "the shape that has six equal sides"),
    ),
}  # fmt: skip

#: reasoning clues for a colour: (relative clause, full phrasings)
COLOUR_CLUES: dict[str, tuple[str, tuple[str, ...]]] = {
    "red": (
        "has the colour of a ripe tomato",
        ("the shape with the colour of a ripe tomato", "the shape coloured like a fire engine",
         "the object that has the colour of a strawberry"),
    ),
    "green": (
        "has the colour of fresh grass",
        ("the shape with the colour of fresh grass", "the shape coloured like a frog",
         "the object that has the colour of a lime"),
    ),
    "blue": (
        "has the colour of a clear sky",
        ("the shape with the colour of a clear sky", "the shape coloured like the deep sea",
         "the object that has the colour of blueberries"),
    ),
    "yellow": (
        "has the same colour as a ripe banana",
        ("the object with the same colour as a ripe banana", "the shape coloured like a lemon",
         "the shape that has the colour of sunflower petals"),
    ),
    "purple": (
        "has the colour of lavender flowers",
        ("the shape with the colour of lavender flowers", "the shape coloured like a ripe plum",
         "the object that has the colour of grape juice"),
    ),
    "orange": (
        "has the colour of a pumpkin",
        ("the shape coloured like a carrot", "the shape with the colour of a pumpkin",
         "the object with the same colour as a tangerine"),
    ),
}  # fmt: skip

EXTREME_PHRASES: dict[str, tuple[str, ...]] = {
    "largest": ("the largest shape in the picture", "the biggest object in this image",
                "the shape that takes up the most space"),
    "smallest": ("the smallest shape in the picture", "the tiniest object in this image",
                 "the shape that takes up the least space"),
    "left": ("the shape closest to the left edge of the image", "the leftmost object in the picture"),
    "right": ("the shape closest to the right edge of the image", "the rightmost object in the picture"),
    "top": ("the shape nearest the top of the picture", "the highest object in the image"),
    "bottom": ("the shape nearest the bottom of the picture", "the lowest object in the image"),
}  # fmt: skip


def _unique(shapes: tuple[Shape, ...], pred: Callable[[Shape], bool]) -> int | None:
    hits = [i for i, s in enumerate(shapes) if pred(s)]
    return hits[0] if len(hits) == 1 else None


def _extreme(
    shapes: tuple[Shape, ...], key: Callable[[Shape], float], margin: float, near: float
) -> tuple[int, list[int]] | None:
    """``(index, ambiguous)``: the shape with the largest ``key`` and the runners-up closer to it
    than ``margin`` (to be ignored); None when even the second one is closer than ``near``."""
    if len(shapes) < 2:
        return None
    order = sorted(range(len(shapes)), key=lambda i: key(shapes[i]), reverse=True)
    lead = key(shapes[order[0]]) - key(shapes[order[1]])
    if lead < near:
        return None
    ambiguous = [i for i in order[1:] if key(shapes[order[0]]) - key(shapes[i]) < margin]
    return order[0], ambiguous


@dataclass(frozen=True, slots=True)
class ReasonQuery:
    """A ReasonSeg-style query: phrasings, target shapes, shapes to ignore."""

    texts: tuple[str, ...]
    is_sentence: bool
    targets: tuple[int, ...]
    ignores: tuple[int, ...] = ()


def reason_candidates(scene: Scene) -> list[ReasonQuery]:
    """Every query with a well-defined answer in ``scene``."""
    shapes, w, h = scene.shapes, scene.width, scene.height
    out: list[ReasonQuery] = []
    for kind, (_, phrases) in KIND_CLUES.items():
        i = _unique(shapes, lambda s, k=kind: s.kind == k)
        if i is not None:
            out.append(ReasonQuery(phrases, True, (i,)))
    for colour, (_, phrases) in COLOUR_CLUES.items():
        i = _unique(shapes, lambda s, c=colour: s.colour == c)
        if i is not None:
            out.append(ReasonQuery(phrases, True, (i,)))
    for i, s in enumerate(shapes):
        same_kind = sum(t.kind == s.kind for t in shapes)
        same_colour = sum(t.colour == s.colour for t in shapes)
        combo = sum(t.kind == s.kind and t.colour == s.colour for t in shapes)
        if combo == 1 and same_kind > 1 and same_colour > 1:  # only the pair of clues pins it down
            kc, cc = KIND_CLUES[s.kind][0], COLOUR_CLUES[s.colour][0]
            texts = (f"the shape that {kc} and {cc}", f"among all the shapes, the one that {kc} and {cc}")
            out.append(ReasonQuery(texts, True, (i,)))
    # (name, key, clear lead, minimal lead): a runner-up closer than the clear lead is
    # ignored; under the minimal lead the question has no answer. Areas compare by ratio.
    for name, key, margin, near in (
        ("largest", lambda s: math.log(s.area), math.log(1.3), math.log(1.1)),
        ("smallest", lambda s: -math.log(s.area), math.log(1.3), math.log(1.1)),
        ("left", lambda s: -s.centre[0], 0.12 * w, 0.05 * w),
        ("right", lambda s: s.centre[0], 0.12 * w, 0.05 * w),
        ("top", lambda s: -s.centre[1], 0.12 * h, 0.05 * h),
        ("bottom", lambda s: s.centre[1], 0.12 * h, 0.05 * h),
    ):
        found = _extreme(shapes, key, margin, near)
        if found is not None:
            out.append(ReasonQuery(EXTREME_PHRASES[name], True, (found[0],), tuple(found[1])))
    # short phrases (is_sentence False), including multi-object targets
    for i, s in enumerate(shapes):
        if sum(t.kind == s.kind and t.colour == s.colour for t in shapes) == 1:
            out.append(ReasonQuery((f"the {s.colour} {s.kind}", f"{s.colour} {s.kind}"), False, (i,)))
    for colour in COLOURS:
        hits = tuple(i for i, s in enumerate(shapes) if s.colour == colour)
        if len(hits) >= 2:
            out.append(ReasonQuery((f"the {colour} shapes", f"all {colour} shapes"), False, hits))
    for kind in SHAPE_KINDS:
        hits = tuple(i for i, s in enumerate(shapes) if s.kind == kind)
        if len(hits) >= 2:
            out.append(ReasonQuery((f"the {kind}s", f"every {kind}"), False, hits))
    return out


def reason_scene(rng: np.random.Generator) -> tuple[Scene, list[ReasonQuery]]:
    """A scene of the ReasonSeg-format set and its :func:`reason_candidates` (never empty)."""
    while True:  # a scene nearly always has a candidate; the loop guards the rare empty one
        scene = make_scene(rng, rule="cv2")
        candidates = reason_candidates(scene)
        if candidates:
            return scene, candidates


def pick_reason_query(candidates: list[ReasonQuery], rng: np.random.Generator) -> ReasonQuery:
    """The ReasonSeg-format set's query of a scene: a sentence, or a short phrase one time in five (always
    a phrase where there is no sentence, a sentence where there is no phrase)."""
    sentences = [q for q in candidates if q.is_sentence]
    phrases = [q for q in candidates if not q.is_sentence]
    pool = phrases if phrases and (rng.random() < 0.2 or not sentences) else sentences
    return pool[int(rng.integers(len(pool)))]


def refer_scene(rng: np.random.Generator) -> Scene:
    """A scene of the REFER-format set: half of them draw from two kinds and/or two colours, so that
    lookalikes (and "the ... on the left") occur."""
    kinds = tuple(str(k) for k in rng.choice(SHAPE_KINDS, size=2, replace=False)) if rng.random() < 0.5 else SHAPE_KINDS
    colours = tuple(str(c) for c in rng.choice(list(COLOURS), size=2, replace=False)) if rng.random() < 0.5 else None
    return make_scene(rng, rule="coco", kinds=kinds, colours=colours or tuple(COLOURS))


def refer_sentences(scene: Scene, i: int) -> list[str]:
    """Phrases that pick out shape ``i`` and no other in ``scene`` (REFER style), in a fixed order."""
    shapes, w, h = scene.shapes, scene.width, scene.height
    s = shapes[i]
    found: list[str] = []

    def only(pred: Callable[[Shape], bool], text: str) -> None:
        if _unique(shapes, pred) == i:
            found.append(text)

    only(lambda t: t.kind == s.kind, f"the {s.kind}")
    only(lambda t: t.colour == s.colour, f"the {s.colour} shape")
    only(lambda t: t.kind == s.kind and t.colour == s.colour, f"the {s.colour} {s.kind}")
    only(lambda t: t.kind == s.kind and t.size == s.size, f"the {s.size} {s.kind}")
    only(
        lambda t: t.kind == s.kind and t.colour == s.colour and t.size == s.size,
        f"the {s.size} {s.colour} {s.kind}",
    )
    # "on the left/right", "at the top/bottom" within a group of two lookalikes
    for label, group in ((f"{s.kind}", lambda t: t.kind == s.kind),
                         (f"{s.colour} {s.kind}", lambda t: t.kind == s.kind and t.colour == s.colour),
                         (f"{s.size} {s.colour} {s.kind}",
                          lambda t: t.kind == s.kind and t.colour == s.colour and t.size == s.size)):  # fmt: skip
        members = [j for j, t in enumerate(shapes) if group(t)]
        if len(members) != 2:
            continue
        other = shapes[members[0] if members[1] == i else members[1]]
        dx, dy = s.centre[0] - other.centre[0], s.centre[1] - other.centre[1]
        if abs(dx) > 0.15 * w:
            found.append(f"the {label} on the {'left' if dx < 0 else 'right'}")
        if abs(dy) > 0.15 * h:
            found.append(f"the {label} at the {'top' if dy < 0 else 'bottom'}")
    for name, key, margin in (
        ("the leftmost shape", lambda t: -t.centre[0], 0.1 * w),
        ("the rightmost shape", lambda t: t.centre[0], 0.1 * w),
        ("the shape at the very top", lambda t: -t.centre[1], 0.1 * h),
        ("the lowest shape", lambda t: t.centre[1], 0.1 * h),
        ("the biggest shape", lambda t: math.log(t.area), math.log(1.3)),
        ("the smallest shape", lambda t: -math.log(t.area), math.log(1.3)),
    ):
        hit = _extreme(shapes, key, margin, margin)
        if hit is not None and hit[0] == i:
            found.append(name)
    return list(dict.fromkeys(found))  # de-duplicated, order kept
