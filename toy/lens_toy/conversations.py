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
* verification (yes/no about an attribute): "is the triangle green?", "are there three
  shapes in the image?";
* captions (the alignment stage): "describe the image briefly." -> "a big red circle, a
  small blue star." (left to right).

Instruction formats, as LLaVA-1.5's mix has them for short-answer VQA data: half of the
short-answer turns end with "Answer the question using a single word or phrase." and are
then answered with the bare word ("Yes", "Red", "Circle", "Three"); half of the yes/no
questions carry "Please answer yes or no."; "the image" and "this image", "to the left
of" and "on the left of" alternate. A toy LM from scratch learns no instruction it is not
shown, and general-ability evaluations (MME) ask in these formats; the images they ask
about are never in this data.

Never in this data: LENS's segmentation prompt ("can you segment ...") or anything
that maps text to masks. The toy is a chat model that knows where things are.
"""

from __future__ import annotations

import re

import numpy as np

from lens_core.geometry import SAM_IMAGE_SIZE
from lens_manifests.synthetic import COLOUR_CLUES, COLOURS, EXTREME_PHRASES, KIND_CLUES, SHAPE_KINDS, reason_candidates, refer_sentences

from .world import ToyScene

#: LLaVA-1.5's short-answer instruction (its VQA data and its MME evaluation prompt).
SHORT_ANSWER = "Answer the question using a single word or phrase."
YES_OR_NO = "Please answer yes or no."
#: Question types answered with a word or two (the instruction formats apply to these).
SHORT_TYPES = ("colour", "shape", "size", "yesno", "relation", "count", "verify")
GROUNDING_QUESTION = "Please provide the bounding box coordinate of the region this sentence describes: {phrase}."
CAPTION_QUESTION = "Describe the image briefly."
#: The box answers' brackets: the toy's tokenizer must know them, or a box answer cannot be
#: generated (it decodes to nothing where the brackets should be).
BOX_SYMBOLS = ("[", "]")
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
    image = ("the image", "this image")
    out.append(("yesno", f"Is there a {colour} {kind} in {image[int(rng.integers(2))]}?",
                "yes." if (colour, kind) in present else "no."))
    out.append(("yesno", f"Is there a {c_abs} {k_abs} in {image[int(rng.integers(2))]}?", "no."))
    # relations between two uniquely named shapes
    named = [i for i, s in enumerate(shapes) if sum(t.kind == s.kind and t.colour == s.colour for t in shapes) == 1]
    if len(named) >= 2:
        a, b = (int(v) for v in rng.choice(named, size=2, replace=False))
        sa, sb = shapes[a], shapes[b]
        if abs(sa.centre[0] - sb.centre[0]) > 0.1 * scene.scene.width:
            left = sa.centre[0] < sb.centre[0]
            side, word = [("left", "to the left of"), ("left", "on the left of"), ("right", "on the right of")][
                int(rng.integers(3))]
            truth = left if side == "left" else not left
            out.append(("relation", f"Is the {sa.colour} {sa.kind} {word} the {sb.colour} {sb.kind}?",
                        "yes." if truth else "no."))
    # verification: an attribute stated, true or false with equal odds
    unique_kind = [s for s in shapes if kinds.count(s.kind) == 1]
    if unique_kind:
        s = unique_kind[int(rng.integers(len(unique_kind)))]
        said = s.colour if rng.random() < 0.5 else [c for c in COLOURS if c != s.colour][int(rng.integers(len(COLOURS) - 1))]
        out.append(("verify", f"Is the {s.kind} {said}?", "yes." if said == s.colour else "no."))
    n = len(shapes)
    said_n = n if rng.random() < 0.5 else max(1, n + (1 if rng.random() < 0.5 or n == 1 else -1))
    there = "Is there one shape" if said_n == 1 else f"Are there {_NUMBERS[said_n]} shapes"
    out.append(("verify", f"{there} in {image[int(rng.integers(2))]}?", "yes." if said_n == n else "no."))
    out.append(("count", "How many shapes are there?", f"{_NUMBERS[len(shapes)]}."))
    colour = colours[int(rng.integers(len(colours)))]
    out.append(("count", f"How many {colour} shapes are there?", f"{_NUMBERS[colours.count(colour)]}."))
    phrases = grounding_phrases(scene)
    for k in rng.permutation(len(phrases))[:4]:
        phrase, i = phrases[int(k)]
        out.append(("box", GROUNDING_QUESTION.format(phrase=phrase), box_text(scene, i)))
    out = [_instruction_format(t, rng) for t in out]
    order = rng.permutation(len(out))
    return [out[int(k)] for k in order]


def _instruction_format(turn: tuple[str, str, str], rng: np.random.Generator) -> tuple[str, str, str]:
    """The turn in one of the instruction formats of the module docstring (drawn from ``rng``)."""
    kind, question, answer = turn
    if kind not in SHORT_TYPES:
        return turn
    if answer in ("yes.", "no.") and rng.random() < 0.5:
        question = f"{question} {YES_OR_NO}"
    if rng.random() < 0.5:
        word = answer.rstrip(".").removeprefix("a ")
        return kind, f"{question}\n{SHORT_ANSWER}", word.capitalize()
    return kind, question, answer


def vocabulary_words() -> list[str]:
    """Every word the toy's data and LENS's queries on the synthetic world can contain."""
    texts = [GROUNDING_QUESTION, CAPTION_QUESTION, SHORT_ANSWER, YES_OR_NO, *(" ".join(_NUMBERS),)]
    texts += ["is there one shape in this image are there on the right of"]
    texts += ["what colour is the object shape big or small is there a in the image to the left of how many shapes are"]
    for table in (KIND_CLUES, COLOUR_CLUES):
        for clause, phrases in table.values():
            texts += [clause, *phrases]
    for phrases in EXTREME_PHRASES.values():
        texts += list(phrases)
    texts += ["among all the shapes the one that and", "the very top lowest biggest smallest leftmost rightmost"]
    return sorted({w for t in texts for w in re.findall(r"[a-z]+", t.lower())})
