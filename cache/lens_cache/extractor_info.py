"""What a build learns from its extractor before creating the store: identity, sizes, questions, prefix.

The parent's first step with the backbone (:func:`lens_cache.build.build_cache`, through its runner:
in this process, or on a dask worker): :func:`describe_extractor` gives the extractor's identity with
its warm-start record (:mod:`lens_cache.warm_start`), its sizes, every manifest row's questions (every
template of its question set) and their L_t, and the states of the prompt's tokens before the image,
which the store keeps once (:func:`store_prefix`). The store is created from that description
(:mod:`lens_cache.store_writer`); the blocks are then written by :mod:`lens_cache.block_job`. A
question the backbone refuses (:class:`~lens_cache.errors.BadSampleError`) is recorded, not raised:
its query is skipped and listed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from lens_cache.backbones.base import FeatureExtractor
from lens_cache.errors import BadSampleError
from lens_cache.store_format import to_float16
from lens_cache.store_records import StorePrefix, StoreVariants
from lens_cache.warm_start import warm_start_file

#: Builds the extractor of a build: picklable, called once in the parent (serial) or once per dask worker.
ExtractorFactory = Callable[[], FeatureExtractor]


@dataclass(frozen=True)
class ExtractorInfo:
    """What the parent needs from the extractor before creating the store.

    ``identity`` is the extractor's plus ``warm_start`` (see :func:`~lens_cache.warm_start.warm_start_file`);
    ``questions``/``text_len`` have one entry per manifest row; a row whose text the
    backbone refused has ``text_len`` 0 and its reason in ``text_failures``; ``prefix`` the
    states of the prompt's tokens before the image (:func:`store_prefix`), None if the extractor gives none;
    ``variants`` the question templates and the L_t of every row's other variants (None: an extractor with one
    question per row and no question set), ``variant_questions`` their questions (variants 1.., per row),
    ``variant_failures`` (row, variant) -> why the backbone refused one.
    """

    identity: dict
    layers: tuple[int, ...]
    hidden_size: int
    num_image_tokens: int
    sam_channels: int
    questions: list[str]
    text_len: np.ndarray
    text_failures: dict[int, str]
    prefix: StorePrefix | None = None
    variants: StoreVariants | None = None
    variant_questions: list[list[str]] | None = None
    variant_failures: dict[tuple[int, int], str] | None = None


def describe_extractor(extractor: FeatureExtractor, texts: Sequence[str], is_sentence: Sequence[bool]) -> ExtractorInfo:
    """The extractor's identity (with its warm-start record) and sizes, every row's questions (every variant
    of its question set: :func:`question_variants`) and their L_t, and the prefix states the store keeps once
    (:func:`store_prefix`)."""
    every = question_variants(extractor, texts, is_sentence)
    questions = [row[0] for row in every]
    text_len, failures = text_lengths(extractor, questions)
    variants, variant_questions, variant_failures = describe_variants(extractor, every, text_len)
    warm_start = warm_start_file(extractor)
    return ExtractorInfo(
        identity={**extractor.identity, "warm_start": warm_start},
        layers=tuple(int(layer) for layer in extractor.layers),
        hidden_size=int(extractor.hidden_size),
        num_image_tokens=int(extractor.num_image_tokens),
        sam_channels=int(extractor.sam_channels),
        questions=questions,
        text_len=text_len,
        text_failures=failures,
        prefix=store_prefix(extractor),
        variants=variants,
        variant_questions=variant_questions,
        variant_failures=variant_failures,
    )


def question_variants(extractor: FeatureExtractor, texts: Sequence[str], is_sentence: Sequence[bool]) -> list[list[str]]:
    """Every row's questions, variant 0 (the evaluation question, ``question_for``) first, then the training
    ones of the extractor's question set (``questions_for``; one per row for an extractor without)."""
    every = getattr(extractor, "questions_for", None)
    rows = []
    for text, sentence in zip(texts, is_sentence, strict=True):
        row = list(every(text, bool(sentence))) if every is not None else [extractor.question_for(text, bool(sentence))]
        rows.append(row)
    return rows


def describe_variants(
    extractor: FeatureExtractor, every: Sequence[Sequence[str]], text_len: np.ndarray
) -> tuple[StoreVariants | None, list[list[str]], dict[tuple[int, int], str]]:
    """The store's record of the rows' variants, the questions of variants 1.. per row, and the refused ones.

    The variants of a row whose variant 0 was refused are not asked (-1); one the backbone refuses alone
    (a prompt past the context) is -1 too, the query's other variants are cached.
    """
    question_set = getattr(extractor, "question_set", None)
    count = max((len(row) for row in every), default=1)
    if question_set is None and count == 1:
        return None, [[] for _ in every], {}
    lengths = np.zeros((len(every), count - 1), dtype=np.int32)
    failures: dict[tuple[int, int], str] = {}
    for row, questions in enumerate(every):
        for v, question in enumerate(questions[1:], start=1):
            if text_len[row] == 0:
                lengths[row, v - 1] = -1
                continue
            try:
                lengths[row, v - 1] = extractor.num_text_tokens(question)
            except BadSampleError as error:
                lengths[row, v - 1] = -1
                failures[(row, v)] = str(error)
    asked = [
        [q for v, q in enumerate(questions[1:], start=1) if lengths[row, v - 1] > 0] for row, questions in enumerate(every)
    ]
    record = StoreVariants(
        question_set=question_set.name if question_set is not None else "single",
        names=question_set.variant_names() if question_set is not None else {},
        count=count,
        lengths=lengths,
    )
    return record, asked, failures


def store_prefix(extractor: FeatureExtractor) -> StorePrefix | None:
    """The prompt's tokens before the image and their states at every cached layer, as the store keeps
    them (float16, once per store), from the extractor's optional ``prefix_states()``: None where it has
    none (a fake backbone) or gives none.

    Raises:
        RuntimeError: the states are not (P_pre, d) per cached layer, or not finite in float16.
    """
    get = getattr(extractor, "prefix_states", None)
    found = get() if get is not None else None
    if found is None:
        return None
    token_ids, states = found
    if not token_ids:
        return None
    shape = (len(token_ids), int(extractor.hidden_size))
    return StorePrefix(
        token_ids=tuple(int(t) for t in token_ids),
        states={int(k): to_float16(states[k], shape, f"layer-{k} prefix states") for k in extractor.layers},
    )


def text_lengths(extractor: FeatureExtractor, questions: Sequence[str]) -> tuple[np.ndarray, dict[int, str]]:
    """L_t of every question, 0 for one the backbone refuses (:class:`BadSampleError`), with its reason."""
    lengths = np.zeros(len(questions), dtype=np.int32)
    failures: dict[int, str] = {}
    for row, question in enumerate(questions):
        try:
            lengths[row] = extractor.num_text_tokens(question)
        except BadSampleError as error:
            failures[row] = str(error)
    return lengths, failures
