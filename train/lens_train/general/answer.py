"""Asking the frozen MLLM a benchmark question, greedily, as LLaVA-1.5's evaluation does.

The prompt (style ``llava``, the default) is LLaVA-1.5's for MME
(``scripts/v1_5/eval/mme.sh``: ``model_vqa_loader`` with ``--conv-mode vicuna_v1
--temperature 0``): the question, a new line, and :data:`MME_SUFFIX`, inside the Vicuna v1 template
(``lens_cache.backbones.llava.VICUNA_V1_TEMPLATE``). Generation is the project's one
path, ``LlavaBackbone.generate`` (greedy), the very call ``lens_train.inference.agent`` makes
for dialogue in ``lens-chat``; the image is shown as the agent shows it (SAM's padded
square, resized by the processor).

One known difference from LLaVA-1.5's own evaluation: it pads each image to a square
*centred* on CLIP's mean colour (``expand2square``), while the project shows every image
in SAM's frame (top-left, zero-padded), as the cache and LENS see it. A real LLaVA-1.5's
MME score measured here can therefore differ a little from the paper's (1510.7 perception
for LLaVA-1.5-7B); with and without LENS it is measured the same way.

Two askers:

- :class:`PlainAsker`: the MLLM alone.
- :class:`LensAsker`: a LENS run attached (``lens_train.inference.agent.LensAgent`` around a
  ``Segmenter``). For each new image the agent first serves a segmentation turn for
  the image's first question (so LENS has read the MLLM's states of that image, as in
  ``lens-chat``), then the MLLM answers through the agent's generator. The answers must
  equal :class:`PlainAsker`'s: the MLLM is frozen and LENS only reads it.
  (The agent's ``step`` would flatten the question to one line, as ``lens-chat`` reads
  lines from stdin; LLaVA's MME prompt has a new line, so the generator is called directly.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lens_cache.errors import UserError as AnyUserError
from PIL import Image

from ..inference.agent import LensAgent
from ..errors import UserError

#: LLaVA-1.5's short-answer instruction, appended on a new line to every MME question.
MME_SUFFIX = "Answer the question using a single word or phrase."
#: Enough for "Yes"/"No" and a few words more (the parsed answer reads the first four characters).
DEFAULT_MAX_NEW_TOKENS = 10
#: Layers the MLLM adapter keeps for encoding; generation uses none, and every LLaVA has layer 1.
GENERATION_ONLY_LAYERS = (1,)

#: ``generate(image, prompt_text, max_new_tokens) -> answer`` (``LlavaBackbone.generate``).
Generate = Callable[..., str]


#: MME's own instruction at the end of every question.
MME_YES_OR_NO = "Please answer yes or no."
#: ``llava``: LLaVA-1.5's MME prompt (the paper's Table 1); ``question``: the MME question as
#: written, no suffix; ``bare``: also without MME's "Please answer yes or no." (a diagnostic
#: for models never taught those instructions, such as the toy LLaVA).
PROMPT_STYLES = ("llava", "question", "bare")


def mme_prompt(question: str, style: str = "llava") -> str:
    """The user message for one MME question in ``style`` (the template is added by ``generate``)."""
    if style == "llava":
        return f"{question}\n{MME_SUFFIX}"
    if style == "question":
        return question
    if style == "bare":
        return " ".join(question.replace(MME_YES_OR_NO, " ").split())
    raise UserError(f"--prompt takes {', '.join(PROMPT_STYLES)}, got {style!r}")


def load_mllm(spec: str, *, device: str | None = None, dtype: str | None = None) -> Any:
    """The frozen MLLM adapter for ``--mllm`` (``tiny``, ``toy``, a llava-hf folder or HF-cache name).

    Resolved by ``lens_cache.backbones.build_mllm`` (offline, never remote code).
    """
    from lens_cache.backbones import build_mllm  # torch and transformers: only when a model is loaded

    return build_mllm(spec, layers=GENERATION_ONLY_LAYERS, device=device, dtype=dtype)


class PlainAsker:
    """The frozen MLLM alone: ``generate(image, prompt, max_new_tokens)``."""

    label = "plain"

    def __init__(self, generate: Generate, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> None:
        self.generate = generate
        self.max_new_tokens = max_new_tokens

    def start_image(self, image: Image.Image, question: str) -> None:
        """Called once per image before its questions (nothing to do here)."""

    def ask(self, image: Image.Image, prompt: str) -> str:
        return self.generate(image, prompt, self.max_new_tokens)


class LensAsker(PlainAsker):
    """The MLLM with a LENS run attached, through ``lens-chat``'s agent (see the module docstring)."""

    label = "lens"

    def __init__(self, agent: "LensAgent", max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> None:
        super().__init__(agent.mllm.generate, max_new_tokens)
        self.agent = agent
        self.segmentations = 0
        #: Images LENS could not segment (a question the MLLM cannot take as a query); still asked.
        self.segmentation_failures: list[str] = []

    def start_image(self, image: Image.Image, question: str) -> None:
        """The agent's segmentation turn for ``question`` on ``image`` (LENS runs on the MLLM's states)."""
        try:
            reply = self.agent.step(question, image=image)
        except AnyUserError as error:  # e.g. a special token in the text: the answers are still compared
            self.segmentation_failures.append(str(error))
            return
        if reply.kind != "segmentation":  # pragma: no cover - the agent is built with a segmentation router
            raise RuntimeError(f"the agent served a {reply.kind} turn, not a segmentation")
        self.segmentations += 1



def lens_agent(segmenter: Any, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> "LensAgent":
    """``lens-chat``'s agent around ``segmenter``, routing every instruction to segmentation."""
    return LensAgent(segmenter, router=lambda *_: "segmentation", max_new_tokens=max_new_tokens)
