"""What the MLLM sees for one question: the exact prompt text and token ids, parts named (``lens-cache prompt``).

A store build and ``lens-segment`` put a question to the MLLM through its adapter's prompt rule
(:meth:`~lens_cache.backbones.prefix_sharing.PrefixSharingBackbone.question_for`, ``prompt_for``) and its
tokenisation (the ids of :meth:`prompt_token_ids`, checked against the processor's when the adapter is
built). :func:`view_prompt` reads them off a loaded adapter and :meth:`PromptView.lines` renders them with the
image span collapsed (``<image x576>`` in the text, ``[32000 x 576]`` in the ids), the P tokens before the
image (stored once per store, ``prefix/mllm_l{L}``), the L_t text tokens after it and the start-of-answer
token (the prompt's last, the head's ``f_s``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PromptView:
    """One question's prompt as the MLLM sees it.

    Attributes:
        name: the ``--mllm`` given; backbone: ``identity["backbone"]``.
        question: what is put in the prompt template (the phrase or sentence in its question template).
        text: the prompt text, the image placeholder once (as the template has it).
        image_text: the image placeholder's text in ``text``; image_token: the processor's image token.
        prefix: the P ids before the first image token; image: the image tokens' ids (one run);
            suffix: the L_t ids after the image, the last is the start of the answer.
        tokens: the token string of every id of ``prefix + image + suffix``.
        num_cached: the image tokens a store caches (OneVision: its base grid, of the whole run).
    """

    name: str
    backbone: str
    question: str
    text: str
    image_text: str
    image_token: str
    prefix: list[int]
    image: list[int]
    suffix: list[int]
    tokens: list[str]
    num_cached: int

    @property
    def ids(self) -> list[int]:
        return [*self.prefix, *self.image, *self.suffix]

    def marked_text(self) -> str:
        """The prompt text with the image span written ``<image xN>`` (N: the tokens it expands to)."""
        marker = f"<image x{len(self.image)}>"
        span = self.image_text.replace(self.image_token, marker) if self.image_token in self.image_text else marker
        return self.text.replace(self.image_text, span, 1)

    def lines(self) -> list[str]:
        """The report ``lens-cache prompt`` prints."""
        p, n, lt = len(self.prefix), len(self.image), len(self.suffix)
        image_id = self.image[0] if self.image else None
        shown_ids = ", ".join(map(str, self.prefix)) + f", [{image_id} x {n}], " + ", ".join(map(str, self.suffix))
        last = len(self.ids) - 1
        return [
            f"mllm             {self.name} ({self.backbone})",
            f"question         {self.question!r}",
            "prompt text (exact; the image span marked):",
            self.marked_text(),
            f"token ids        [{shown_ids}]  ({len(self.ids)} tokens)",
            f"prefix P         {p} tokens before the first image token (positions 0..{p - 1}; stored once per "
            f"store): {' '.join(self.tokens[:p])}",
            f"image tokens     {n} (id {image_id}, positions {p}..{p + n - 1}; {self.num_cached} cached per image)",
            f"text after image {lt} tokens (L_t, positions {p + n}..{last}): {' '.join(self.tokens[p + n:])}",
            f"start of answer  {self.tokens[-1]!r} (id {self.ids[-1]}), the last prompt token, position {last}",
        ]


def view_prompt(
    mllm: Any, question: str, *, name: str | None = None, is_sentence: bool = False, variant: int = 0
) -> PromptView:
    """The prompt ``mllm`` (a loaded adapter) builds for ``question``: a short phrase or (``is_sentence``) a
    sentence put in its question set's template ``variant`` (0: the evaluation question, 1..: the training
    ones, numbered as a store numbers them), as a store build asks manifest rows.

    Raises:
        BadSampleError: the question holds a special token, or the prompt exceeds the MLLM's context.
        IndexError: the set has no such variant for this kind of query.
    """
    asked = mllm.question_set.question(question, is_sentence, variant)
    prefix, suffix = mllm.prompt_token_ids(asked)
    before = len(mllm.prefix_token_ids)
    tokenizer = mllm.processor.tokenizer
    ids = [*prefix, *suffix]
    return PromptView(
        name=name or mllm.name_or_path,
        backbone=mllm.identity["backbone"],
        question=asked,
        text=mllm.prompt_for(asked),
        image_text=mllm.IMAGE_PLACEHOLDER,
        image_token=str(getattr(mllm.processor, "image_token", mllm.IMAGE_PLACEHOLDER)),
        prefix=prefix[:before],
        image=prefix[before:],
        suffix=suffix,
        tokens=[str(t) for t in tokenizer.convert_ids_to_tokens(ids)],
        num_cached=int(mllm.num_image_tokens),
    )
