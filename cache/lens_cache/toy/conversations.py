"""What the toy LLaVA is taught: captions and LLaVA-1.5-style conversations about a scene.

Every conversation is generated from the scene graph (the shapes' kind, colour, size,
position and box), so its answers are exact. Kinds of turns:

* attributes: "what colour is the triangle?" -> "red."; "what shape is the red object?";
  "is the red circle big or small?";
* yes/no: "is there a blue star in the image?" (present and absent combinations drawn
  50/50); "is the red circle to the left of the blue star?";
* counts: "how many shapes are there?", "how many red shapes are there?";
* region grounding in LLaVA-1.5's own format: "please provide the bounding box coordinate
  of the region this sentence describes: X" -> "[0.12, 0.40, 0.31, 0.62]" (corners on the
  padded square frame the model sees, two decimals), where X is any phrase that picks out
  one shape: REFER-style phrases and the dataset's reasoning clues ("the shape coloured
  like a ripe banana") -- the world knowledge a real MLLM brings;
* captions (the alignment stage): "describe the image briefly." -> "a big red circle, a
  small blue star." (left to right).

Never in this data: LENS's segmentation prompt ("can you segment ...") or anything
that maps text to masks. The toy is a chat model that knows where things are.
"""

from __future__ import annotations

import re

import numpy as np

from lens_core.geometry import SAM_IMAGE_SIZE
from lens_manifests.synthetic import COLOUR_CLUES, COLOURS, EXTREME_PHRASES, KIND_CLUES, SHAPE_KINDS, reason_candidates, refer_sentences

from .world import ToyScene

GROUNDING_QUESTION = "Please provide the bounding box coordinate of the region this sentence describes: {phrase}."
CAPTION_QUESTION = "Describe the image briefly."
#: Phrases LENS uses to ask for masks; the toy's data must never contain them (tested).
SEGMENTATION_WORDS = ("segment", "segmentation", "mask")

_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def box_text(scene: ToyScene, i: int) -> str:
    """LLaVA-1.5's box answer for shape ``i``: corners normalised by the padded square frame."""
    x, y, w, h = scene.shapes[i].bbox
    (x0, y0), (x1, y1) = scene.to_frame(np.array([[x, y], [x + w, y + h]])) / SAM_IMAGE_SIZE
    return "[" + ", ".join(f"{v:.2f}" for v in (x0, y0, x1, y1)) + "]"


def parse_box(text: str) -> tuple[float, float, float, float] | None:
    """The first ``[a, b, c, d]`` in ``text`` (tolerating spaces the decoder puts in), else None."""
    compact = re.sub(r"\s+", "", text)
    match = re.search(r"\[([-\d.]+),([-\d.]+),([-\d.]+),([-\d.]+)\]", compact)
    if not match:
        return None
    try:
        return tuple(float(v) for v in match.groups())  # type: ignore[return-value]
    except ValueError:
        return None


def caption(scene: ToyScene) -> str:
    order = sorted(range(len(scene.shapes)), key=lambda i: scene.shapes[i].centre[0])
    parts = [f"a {scene.shapes[i].size} {scene.shapes[i].colour} {scene.shapes[i].kind}" for i in order]
    return ", ".join(parts) + "."


def grounding_phrases(scene: ToyScene) -> list[tuple[str, int]]:
    """(phrase, shape index) for every phrase that picks out exactly one shape."""
    out = [(p, i) for i in range(len(scene.shapes)) for p in refer_sentences(scene.scene, i)]
    for query in reason_candidates(scene.scene):
        if len(query.targets) == 1:
            out.extend((text, query.targets[0]) for text in query.texts)
    return out


def turns(scene: ToyScene, rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """Every (type, question, answer) about ``scene``, in a seeded random order."""
    shapes = scene.shapes
    out: list[tuple[str, str, str]] = []
    kinds = [s.kind for s in shapes]
    colours = [s.colour for s in shapes]
    for i, s in enumerate(shapes):
        if kinds.count(s.kind) == 1:
            out.append(("colour", f"What colour is the {s.kind}?", f"{s.colour}."))
        if colours.count(s.colour) == 1:
            out.append(("shape", f"What shape is the {s.colour} object?", f"a {s.kind}."))
        if sum(t.kind == s.kind and t.colour == s.colour for t in shapes) == 1:
            out.append(("size", f"Is the {s.colour} {s.kind} big or small?", f"{s.size}."))
    # yes/no about presence: one present and one absent combination
    present = {(s.colour, s.kind) for s in shapes}
    colour, kind = shapes[int(rng.integers(len(shapes)))].colour, shapes[int(rng.integers(len(shapes)))].kind
    absent = [(c, k) for c in COLOURS for k in SHAPE_KINDS if (c, k) not in present]
    c_abs, k_abs = absent[int(rng.integers(len(absent)))]
    out.append(("yesno", f"Is there a {colour} {kind} in the image?", "yes." if (colour, kind) in present else "no."))
    out.append(("yesno", f"Is there a {c_abs} {k_abs} in the image?", "no."))
    # relations between two uniquely named shapes
    named = [i for i, s in enumerate(shapes) if sum(t.kind == s.kind and t.colour == s.colour for t in shapes) == 1]
    if len(named) >= 2:
        a, b = (int(v) for v in rng.choice(named, size=2, replace=False))
        sa, sb = shapes[a], shapes[b]
        if abs(sa.centre[0] - sb.centre[0]) > 0.1 * scene.scene.width:
            left = sa.centre[0] < sb.centre[0]
            out.append(("relation", f"Is the {sa.colour} {sa.kind} to the left of the {sb.colour} {sb.kind}?",
                        "yes." if left else "no."))
    out.append(("count", "How many shapes are there?", f"{_NUMBERS[len(shapes)]}."))
    colour = colours[int(rng.integers(len(colours)))]
    out.append(("count", f"How many {colour} shapes are there?", f"{_NUMBERS[colours.count(colour)]}."))
    phrases = grounding_phrases(scene)
    for k in rng.permutation(len(phrases))[:4]:
        phrase, i = phrases[int(k)]
        out.append(("box", GROUNDING_QUESTION.format(phrase=phrase), box_text(scene, i)))
    order = rng.permutation(len(out))
    return [out[int(k)] for k in order]


def vocabulary_words() -> list[str]:
    """Every word the toy's data and LENS's queries on the synthetic world can contain."""
    texts = [GROUNDING_QUESTION, CAPTION_QUESTION, *(" ".join(_NUMBERS),)]
    texts += ["what colour is the object shape big or small is there a in the image to the left of how many shapes are"]
    for table in (KIND_CLUES, COLOUR_CLUES):
        for clause, phrases in table.values():
            texts += [clause, *phrases]
    for phrases in EXTREME_PHRASES.values():
        texts += list(phrases)
    texts += ["among all the shapes the one that and", "the very top lowest biggest smallest leftmost rightmost"]
    return sorted({w for t in texts for w in re.findall(r"[a-z]+", t.lower())})
