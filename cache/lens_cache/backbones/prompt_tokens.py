"""An adapter's prompt and the token ids its MLLM sees: the template, the questions, the split at the image.

A prompt is the adapter's template (the checkpoint's chat template rendered for one user turn
[image, question], else the adapter's default) with a question in it: variant 0 of the adapter's
question set (:meth:`PromptTokens.question_for`, what evaluation asks), or every variant
(:meth:`~PromptTokens.questions_for`, what a store caches). Its token ids are split after the last
image token (:meth:`~PromptTokens.prompt_token_ids`): the prefix, the same for every question, and the
L_t tokens of the question's suffix, the last one the start of the answer.

- **Token ids.** Tokenising the prompt with ONE image token and repeating its id gives the processor's
  ids (a special token splits the text into independently tokenised pieces) at a fraction of the cost;
  :class:`~.prefix_sharing.PrefixSharingBackbone` checks them against the processor at construction.
- **Refusals.** A question holding a special token (the tokeniser would read it as that token, not as
  text), or a prompt past the MLLM's context, is a :class:`~lens_cache.errors.BadSampleError`: a build
  skips that query and lists it.

Where it sits: the text side of :class:`~.prefix_sharing.PrefixSharingBackbone`, whose forward runs the
prefix once per image; an adapter (:mod:`.llava`, :mod:`.qwen2vl`, :mod:`.onevision`) sets the class
attributes below and overrides a method where its family differs (LLaVA's ``<image>`` placeholder).
Nothing here runs the model.
"""

from __future__ import annotations

from typing import Any

from lens_cache.errors import BadSampleError, UsageError
from lens_cache.questions import QuestionSet

#: The question's place in a prompt template.
QUESTION = "{question}"
#: Stands for the question while a chat template is rendered.
_SENTINEL = "\x00LENS-QUESTION\x00"


class PromptTokens:
    """The prompt rule and token ids of a frozen MLLM (see the module docstring).

    The base of :class:`~.prefix_sharing.PrefixSharingBackbone`, which sets the instance attributes
    below at construction; an adapter sets the class attributes.
    """

    #: The image's place in ``prompt_template``.
    IMAGE_PLACEHOLDER: str
    #: The prompt when the processor has no chat template.
    DEFAULT_PROMPT_TEMPLATE: str
    #: Texts a question may not hold besides the tokeniser's special and added tokens (chat markers).
    SPECIAL_TEXTS: tuple[str, ...] = ()

    #: The ``*ForConditionalGeneration`` model (its text config gives the context length).
    model: Any
    #: Its processor: the tokenizer and the chat template.
    processor: Any
    #: ``{question}`` and :attr:`IMAGE_PLACEHOLDER` once each.
    prompt_template: str
    #: The question templates (:mod:`lens_cache.questions`).
    question_set: QuestionSet
    #: The id of the image token.
    image_token_id: int
    #: The image tokens in the prompt, cached or not (set by the adapter's ``_configure_image``).
    _sequence_image_tokens: int

    def _chat_prompt_template(self) -> str:
        """The checkpoint's chat template rendered for one user turn [image, question] + generation prompt."""
        if not getattr(self.processor, "chat_template", None):
            return self.DEFAULT_PROMPT_TEMPLATE
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": _SENTINEL}]}]
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if text.count(_SENTINEL) != 1 or text.count(self.IMAGE_PLACEHOLDER) != 1:
            raise UsageError(
                "the checkpoint's chat template does not render one image and one question: pass prompt_template")
        return text.replace(_SENTINEL, QUESTION)

    def question_for(self, text: str, is_sentence: bool) -> str:
        """The evaluation question (variant 0 of :attr:`question_set`) for a manifest row: with ``single``
        the sentence itself for reasoning queries, else ``question_template`` with the phrase."""
        return self.question_set.question(text, is_sentence)

    def questions_for(self, text: str, is_sentence: bool) -> list[str]:
        """Every variant's question for a manifest row: the evaluation one (variant 0), then the training
        ones in the set's order (a store caches the text states of each)."""
        return self.question_set.questions(text, is_sentence)

    def prompt_for(self, question: str) -> str:
        """The full prompt text with a single image placeholder."""
        return self._fill(self.prompt_template, question)

    def _fill(self, template: str, question: str) -> str:
        return template.replace(QUESTION, question)

    def num_text_tokens(self, question: str) -> int:
        """L_t: the number of tokens after the last image token."""
        return len(self._split_ids(question)[1])

    def prompt_token_ids(self, question: str) -> tuple[list[int], list[int]]:
        """The ids the MLLM sees for ``question``: (everything up to the last image token, the image run
        expanded; the L_t tokens after it, the last one the start of the answer) (``lens-cache prompt``).

        Raises:
            BadSampleError: the question holds a special token, or the prompt exceeds the context.
        """
        return self._split_ids(question)

    def _refused_texts(self) -> set[str]:
        """Texts a question may not hold: the tokeniser would read them as tokens, not text."""
        tokenizer = self.processor.tokenizer
        specials = set(tokenizer.all_special_tokens) | set(getattr(tokenizer, "added_tokens_encoder", {}) or {})
        return specials | set(self.SPECIAL_TEXTS)

    def _image_texts(self) -> set[str]:
        """Refused texts an error names "the image token" (by default it names each a special token)."""
        return set()

    def _check_question(self, question: str) -> None:
        """Refuse a question the prompt cannot carry as plain text.

        A special token written in the text (an image token, an end of turn, ...) is read by the
        tokeniser as that token, not as text: it would add image slots or end the turn.

        Raises:
            BadSampleError: the question holds one (a build skips that query and lists it).
        """
        image_texts = self._image_texts()
        found = sorted(token for token in image_texts | self._refused_texts() if token and token in question)
        if found:
            what = "the image token" if found[0] in image_texts else "a special token of the tokeniser"
            shown = question if len(question) <= 80 else question[:77] + "..."
            raise BadSampleError(f"the text contains {found[0]!r}, {what}, not text: {shown!r}")

    def _prompt_ids(self, question: str) -> list[int]:
        """The tokeniser's ids of the prompt with its one image token."""
        return self.processor.tokenizer(self.prompt_for(question))["input_ids"]

    def _split_ids(self, question: str) -> tuple[list[int], list[int]]:
        """Token ids of the prompt, split after the last image token: (prefix, suffix).

        Raises:
            BadSampleError: the question holds a special token, or the prompt would not fit the MLLM's
                context (``max_position_embeddings``).
        """
        self._check_question(question)
        ids = self._prompt_ids(question)
        positions = [i for i, t in enumerate(ids) if t == self.image_token_id]
        if len(positions) != 1:
            raise BadSampleError(f"expected one image token in the prompt, found {len(positions)}: {question!r}")
        at = positions[0]
        prefix, suffix = ids[:at] + [self.image_token_id] * self._sequence_image_tokens, ids[at + 1 :]
        context = int(self.model.config.text_config.max_position_embeddings)
        if len(prefix) + len(suffix) > context:
            raise BadSampleError(
                f"the prompt would be {len(prefix) + len(suffix)} tokens, more than the MLLM's context of {context}")
        return prefix, suffix
