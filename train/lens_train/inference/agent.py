"""LENS inside an agent (paper supplement S2, Algorithm S1): dialogue, segmentation and follow-ups.

One frozen MLLM does everything that is language: it routes each instruction, answers
dialogue, and answers follow-ups; LENS only adds masks. Per instruction ``u`` with the
current image ``I`` (Algorithm S1):

1. ``intent <- A.Route(u, I)`` in {dialogue, segmentation, followup}: the MLLM is asked
   with a few-shot prompt (:data:`ROUTER_PROMPT`) and its answer parsed
   (:func:`parse_intent`). When the answer names no intent (the tiny test MLLM answers
   noise; a real one can ramble) :func:`heuristic_intent` decides from keywords.
2. **segmentation**: LENS segments ``I`` by ``u`` (live MLLM states -> head -> keypoints ->
   SAM); the memory keeps ``(I, mask)``; the reply is the fixed sentence
   :data:`SEGMENTATION_REPLY` with the overlay.
3. **followup**: ``(I0, mask0)`` from the memory; the MLLM gets ``Concat(I0, Overlay(I0,
   mask0))`` (side by side, :func:`side_by_side`) and the question. With nothing in the
   memory the instruction is handled afresh with follow-up ruled out (Algorithm S1,
   lines 10-11), so the recursion ends.
4. **dialogue**: plain greedy generation about ``I`` (or text only).

The memory holds the last segmentation only and survives image changes (a follow-up is
about what was segmented, as in the algorithm); ``/forget`` clears it in ``lens-chat``.

Python API::

    agent = LensAgent.from_run("runs/official", mllm="llava-hf/llava-1.5-7b-hf", sam="vit_h:sam.pth")
    agent.step("Segment the dog on the left.", image="park.jpg")   # -> AgentReply(kind="segmentation", ...)
    agent.step("What breed is it?")                                  # -> AgentReply(kind="followup", ...)

``lens-chat --checkpoint RUN_DIR [--image PATH]`` is the same loop on stdin.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from ..evaluation.frozen import mllm_checksum  # noqa: F401  (re-exported: the agent's frozen guarantee)
from .result import SegmentResult, overlay_image
from .segmenter import Segmenter, load_image

if TYPE_CHECKING:  # numpy/torch load with the models, not with `lens-chat --help`
    import numpy as np

INTENTS = ("dialogue", "segmentation", "followup")
#: Algorithm S1, line 7: the fixed answer to a segmentation request.
SEGMENTATION_REPLY = "Sure, the segmentation result is generated."
NO_IMAGE_REPLY = "There is no image to segment yet: give one first (/image PATH in lens-chat)."

#: The router's few-shot prompt (S2: "a few-shot prompt that asks it to output one of the three intent types").
ROUTER_PROMPT = (
    "Classify the user's instruction into exactly one intent.\n"
    "dialogue: a general question or conversation that needs no segmentation.\n"
    "segmentation: the user asks to segment, mask, outline or locate something in the image.\n"
    "followup: the user asks about the object or region that was segmented before.\n"
    "Instruction: What is happening in this picture? Intent: dialogue\n"
    "Instruction: Tell me a joke about cats. Intent: dialogue\n"
    "Instruction: Segment the dog on the left. Intent: segmentation\n"
    "Instruction: Can you segment the thing people use to cut bread? Intent: segmentation\n"
    "Instruction: What colour is the segmented object? Intent: followup\n"
    "Instruction: Is it bigger than the car next to it? Intent: followup\n"
    "{context}"
    "Instruction: {instruction} Intent:"
)
ROUTER_NO_MEMORY = "Nothing has been segmented yet, so the intent cannot be followup.\n"
ROUTER_NO_IMAGE = "No image is given.\n"
ROUTER_MAX_NEW_TOKENS = 8
#: What the MLLM is told about the side-by-side image of a follow-up.
FOLLOWUP_PROMPT = (
    "The left half is an image; the right half is the same image with the segmented region "
    "highlighted in green. {question}"
)

# Parsing the router's answer: the earliest intent named wins ("segmentation, not dialogue").
_INTENT_PATTERNS = (
    ("followup", re.compile(r"follow[\s_-]*up")),
    ("segmentation", re.compile(r"\bseg(?:ment(?:ation)?)?\b")),
    ("dialogue", re.compile(r"\b(?:dialog(?:ue)?|chat|conversation)\b")),
)
# Keyword fallback (see heuristic_intent).
_STRONG_FOLLOWUP = re.compile(
    r"\b(?:segmented|highlighted|masked|outlined|selected|marked|the mask|the result|the segmentation|"
    r"the region|that region|that object|this object|that part|this part)\b"
)
_SEGMENT_REQUEST = re.compile(
    r"\b(?:segment|segmentation|mask|outline|highlight|locate|find|point out|show me|where is|where are|"
    r"where's|select|mark|cut out)\b"
)
_WEAK_FOLLOWUP = re.compile(r"\b(?:it|its|it's|they|them|their|that one|this one)\b")

#: ``router(instruction, has_image, has_memory) -> intent`` (an intent name or text naming one).
Router = Callable[[str, bool, bool], str]
#: ``generate(image or None, prompt, max_new_tokens) -> answer`` (``LlavaBackbone.generate``).
Generator = Callable[..., str]


# ----------------------------------------------------------------------------- routing


def parse_intent(answer: str) -> str | None:
    """The intent an answer names (``dialogue`` / ``segmentation`` / ``followup``), or None.

    Tolerant of case, punctuation and spelling variants (``Follow-up``, ``follow up``,
    ``seg``, ``Segmentation.``, ``dialog``, ``chat``); when several are named, the first wins.
    """
    text = answer.lower()
    hits = [(match.start(), intent) for intent, pattern in _INTENT_PATTERNS if (match := pattern.search(text))]
    return min(hits)[1] if hits else None


def heuristic_intent(instruction: str, *, has_image: bool, has_memory: bool) -> str:
    """The keyword fallback when the MLLM's answer names no intent.

    Rules, in order (``has_image`` does not change the decision: a segmentation request
    without an image is answered with :data:`NO_IMAGE_REPLY`, not as dialogue):

    1. with a mask in memory, words pointing at it (``segmented``, ``highlighted``,
       ``the mask``, ``the region``, ``that object``, ...) -> followup;
    2. a segmentation verb (``segment``, ``mask``, ``outline``, ``locate``, ``find``,
       ``show me``, ``where is``, ...) -> segmentation;
    3. with a mask in memory, a pronoun (``it``, ``its``, ``they``, ``this one``, ...) -> followup;
    4. otherwise -> dialogue.
    """
    text = instruction.lower()
    if has_memory and _STRONG_FOLLOWUP.search(text):
        return "followup"
    if _SEGMENT_REQUEST.search(text):
        return "segmentation"
    if has_memory and _WEAK_FOLLOWUP.search(text):
        return "followup"
    return "dialogue"


def router_prompt(instruction: str, *, has_image: bool, has_memory: bool) -> str:
    """:data:`ROUTER_PROMPT` for one instruction, telling the MLLM what is impossible right now."""
    context = ("" if has_image else ROUTER_NO_IMAGE) + ("" if has_memory else ROUTER_NO_MEMORY)
    return ROUTER_PROMPT.format(context=context, instruction=_plain_text(instruction))


def _plain_text(text: str) -> str:
    """User text made safe for the prompt: one line, and no ``<image>`` (the processor would expand it)."""
    return " ".join(text.replace("<image>", "image").split())


def side_by_side(left: Image.Image, right: Image.Image) -> Image.Image:
    """``Concat(I0, Overlay(I0, mask0))``: ``right`` beside ``left`` (resized to its height if needed).

    Returns:
        RGB image of size (left.width + right.width', left.height).
    """
    left, right = left.convert("RGB"), right.convert("RGB")
    if right.height != left.height:
        width = max(1, round(right.width * left.height / right.height))
        right = right.resize((width, left.height), Image.BILINEAR)
    canvas = Image.new("RGB", (left.width + right.width, left.height))
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width, 0))
    return canvas


# ----------------------------------------------------------------------------- the agent


@dataclass
class Memory:
    """``M.last`` of Algorithm S1: the last segmented image, its mask and how it was asked."""

    image: Image.Image
    mask: np.ndarray
    instruction: str
    result: SegmentResult


@dataclass
class AgentReply:
    """One answer of the agent.

    Attributes:
        kind: ``dialogue`` | ``segmentation`` | ``followup`` (the intent that was served).
        text: what the agent says.
        mask: (H, W) bool for a segmentation, else None.
        figure: the picture shown with the answer (segmentation: the overlay; follow-up:
            the side-by-side image the MLLM saw), else None.
        figure_path: where ``figure`` was saved (when the agent has a ``figure_dir``).
        routed_by: ``router`` (injected), ``mllm`` (its answer parsed) or ``heuristic`` (fallback).
        router_answer: the MLLM's raw routing answer ("" when it was not asked).
    """

    kind: str
    text: str
    mask: np.ndarray | None = None
    figure: Image.Image | None = None
    figure_path: Path | None = None
    routed_by: str = "mllm"
    router_answer: str = ""


class LensAgent:
    """Algorithm S1 around one frozen MLLM and one trained LENS run.

    Args:
        segmenter: the LENS run attached to its live backbones; its MLLM answers too.
        router: ``router(instruction, has_image, has_memory) -> intent`` replacing the
            MLLM's routing (tests; a rule-based deployment). Its answer goes through
            :func:`parse_intent` (keyword fallback when it names nothing).
        generate: ``generate(image, prompt, max_new_tokens) -> text`` replacing the MLLM's
            generation (tests); default the segmenter's frozen MLLM.
        figure_dir: save every overlay / side-by-side picture there (numbered per turn).
        max_new_tokens: length limit of dialogue and follow-up answers.
    """

    def __init__(
        self,
        segmenter: Segmenter,
        *,
        router: Router | None = None,
        generate: Generator | None = None,
        figure_dir: str | Path | None = None,
        max_new_tokens: int = 128,
    ) -> None:
        self.segmenter = segmenter
        self.router = router
        self._generate = generate if generate is not None else segmenter.mllm.generate
        self.figure_dir = Path(figure_dir) if figure_dir is not None else None
        self.max_new_tokens = max_new_tokens
        self.image: Image.Image | None = None
        self.memory: Memory | None = None
        self.turn = 0
        #: (intent, source, raw answer) of the last MLLM routing call.
        self.last_route: tuple[str, str, str] = ("", "", "")

    @classmethod
    def from_run(
        cls,
        run_dir: str | Path,
        *,
        mllm: str | None = None,
        sam: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        threshold: float | None = None,
        **kwargs: Any,
    ) -> "LensAgent":
        """Load the run and its live backbones (see :class:`~lens_train.inference.segmenter.Segmenter`)."""
        segmenter = Segmenter(run_dir, mllm=mllm, sam=sam, device=device, dtype=dtype, threshold=threshold)
        return cls(segmenter, **kwargs)

    @property
    def mllm(self) -> Any:
        """The frozen MLLM adapter (``LlavaBackbone``)."""
        return self.segmenter.mllm

    def set_image(self, image: str | Path | Image.Image) -> Image.Image:
        """Make ``image`` the current image ``I`` (the memory is kept)."""
        self.image = load_image(image)
        return self.image

    def forget(self) -> None:
        """Clear the memory (no follow-up until the next segmentation)."""
        self.memory = None

    # -- routing ----------------------------------------------------------------

    def route(self, instruction: str, has_image: bool, has_memory: bool, *, image: Image.Image | None = None) -> str:
        """``A.Route(u, I)``: ask the frozen MLLM, parse its answer, fall back to keywords.

        The decision and the raw answer are kept in ``last_route`` as ``(intent, source, answer)``.
        """
        answer = self._generate(image if has_image else None,
                                router_prompt(instruction, has_image=has_image, has_memory=has_memory),
                                ROUTER_MAX_NEW_TOKENS)
        intent = parse_intent(answer)
        source = "mllm"
        if intent is None:
            intent, source = heuristic_intent(instruction, has_image=has_image, has_memory=has_memory), "heuristic"
        self.last_route = (intent, source, answer)
        return intent

    def _decide(self, instruction: str, *, has_image: bool, has_memory: bool) -> tuple[str, str, str]:
        """(intent, routed_by, raw answer) from the injected router or the MLLM."""
        if self.router is None:
            self.route(instruction, has_image, has_memory, image=self.image)
            return self.last_route
        raw = str(self.router(instruction, has_image, has_memory))
        intent = parse_intent(raw)
        if intent is None:
            return heuristic_intent(instruction, has_image=has_image, has_memory=has_memory), "heuristic", raw
        return intent, "router", raw

    # -- one turn ---------------------------------------------------------------

    def step(self, instruction: str, image: str | Path | Image.Image | None = None) -> AgentReply:
        """Algorithm S1 for one instruction; ``image`` (if given) becomes the current image first.

        Raises:
            UserError: the image cannot be read.
        """
        if image is not None:
            self.set_image(image)
        self.turn += 1
        has_image = self.image is not None
        intent, routed_by, raw = self._decide(instruction, has_image=has_image, has_memory=self.memory is not None)
        if intent == "followup" and self.memory is None:
            # Algorithm S1, lines 10-11: nothing was segmented -> handle u afresh, follow-up ruled out.
            intent, routed_by, raw = self._decide(instruction, has_image=has_image, has_memory=False)
            if intent == "followup":  # the router insists: decide by keywords, which never say followup here
                intent, routed_by = heuristic_intent(instruction, has_image=has_image, has_memory=False), "heuristic"
        if intent == "segmentation":
            reply = self._segment(instruction)
        elif intent == "followup":
            reply = self._follow_up(instruction)
        else:
            reply = AgentReply(kind="dialogue", text=self._generate(self.image, _plain_text(instruction),
                                                                    self.max_new_tokens))
        reply.routed_by, reply.router_answer = routed_by, raw if routed_by != "router" else ""
        return reply

    def _segment(self, instruction: str) -> AgentReply:
        if self.image is None:
            return AgentReply(kind="segmentation", text=NO_IMAGE_REPLY)
        # The instruction is asked as it is (a sentence), like a reasoning query.
        result = self.segmenter.segment(self.image, _plain_text(instruction), is_sentence=True)
        # the memory pairs the working image with its mask (a picture larger than 4096 px was downscaled)
        self.memory = Memory(image=self.image, mask=result.display_mask, instruction=instruction, result=result)
        figure = result.overlay()
        return AgentReply(kind="segmentation", text=SEGMENTATION_REPLY, mask=result.mask, figure=figure,
                          figure_path=self._save(figure, "segmentation"))

    def _follow_up(self, instruction: str) -> AgentReply:
        assert self.memory is not None
        # The MLLM sees the plain overlay (no keypoint dots): the region, as a person would show it.
        combined = side_by_side(self.memory.image, overlay_image(self.memory.image, self.memory.mask))
        text = self._generate(combined, FOLLOWUP_PROMPT.format(question=_plain_text(instruction)), self.max_new_tokens)
        return AgentReply(kind="followup", text=text, figure=combined, figure_path=self._save(combined, "followup"))

    def _save(self, figure: Image.Image, kind: str) -> Path | None:
        if self.figure_dir is None:
            return None
        self.figure_dir.mkdir(parents=True, exist_ok=True)
        path = self.figure_dir / f"{self.turn:03d}-{kind}.png"
        figure.save(path)
        return path
