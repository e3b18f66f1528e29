"""Question-template sets: how a manifest row's text becomes the question(s) put to the MLLM.

A row is a short phrase (a class name, a referring expression, a short ReasonSeg query) or a sentence
(a ReasonSeg sentence), ``is_sentence`` in the manifest. For each kind a :class:`QuestionSet` names

* the **evaluation** template (variant 0): the one question asked at evaluation and by a live backbone
  (``question_for``), with its phrase normalisation;
* the **training** templates (variants 1..n, in list order): one of them is drawn at random per sample
  when training, with their own normalisation.

A store caches the text states of every variant of every query (``lens_cache.store``, format version 5),
so a training loader can draw the template per sample as the authors do, and evaluate with variant 0.

Built-in sets (:data:`QUESTION_SETS`):

``authors``
    The LENS authors' (jiazhen-code/LENS at 29c4959, which take LISA's): training questions from
    ``lens/data/qa_template.py`` (4 short templates, the phrase lower-cased: ``refer_seg_dataset.py``,
    ``sem_seg_dataset.py``, ``reason_seg_dataset.py``; 2 long templates for sentences, the sentence as it
    is); evaluation from ``lens/data/test_dataset.py`` (the ``debug = True`` branch of the ReasonSeg
    test set): ``What is {text} in this image?`` with the phrase stripped (not lower-cased), a sentence
    as one space and the stripped sentence. The ``<image>\\n`` those templates start with is the prompt
    template's (``VICUNA_V1_TEMPLATE``), not the question's.
``single``
    This project's earlier rule, one template per kind used for training and evaluation alike:
    ``Can you segment the {text} in this image?`` for phrases, the sentence as it is. A store of this set
    has exactly the identity and text states of a store built before sets existed (only
    ``question_template`` is recorded).

The default of the LLaVA-1.5, Qwen2-VL and LLaVA-OneVision adapters is ``authors``; the toy and tiny
models keep ``single`` (the toy was trained with it, and its demo numbers stay comparable).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from lens_cache.errors import UsageError

#: The placeholder of a template: the row's text, normalised.
TEXT = "{text}"
#: Phrase normalisations (applied to the row's text before it is put in a template).
NORMALISATIONS = ("as_is", "strip", "lower")
#: The kinds of query, in the order a set records them.
KINDS = ("short", "sentence")


def normalise(text: str, how: str) -> str:
    """``text`` as a template receives it: ``as_is``, ``strip`` (leading/trailing whitespace) or ``lower``."""
    if how == "as_is":
        return text
    if how == "strip":
        return text.strip()
    if how == "lower":
        return text.lower()
    raise ValueError(f"unknown normalisation {how!r}: one of {', '.join(NORMALISATIONS)}")


@dataclass(frozen=True)
class QueryTemplates:
    """The templates of one kind of query.

    Attributes:
        evaluation: the evaluation question (variant 0), ``{text}`` once.
        training: the training questions (variants 1..), each with ``{text}`` once; may be empty (then the
            evaluation template is also the training one).
        evaluation_normalise / training_normalise: what is done to the text first (:data:`NORMALISATIONS`).
    """

    evaluation: str
    training: tuple[str, ...] = ()
    evaluation_normalise: str = "as_is"
    training_normalise: str = "as_is"

    def __post_init__(self) -> None:
        for template in self.templates:
            if template.count(TEXT) != 1:
                raise ValueError(f"a question template needs {TEXT} exactly once: {template!r}")
        for how in (self.evaluation_normalise, self.training_normalise):
            if how not in NORMALISATIONS:
                raise ValueError(f"unknown normalisation {how!r}: one of {', '.join(NORMALISATIONS)}")

    @property
    def templates(self) -> tuple[str, ...]:
        """Every variant's template: the evaluation one, then the training ones in list order."""
        return (self.evaluation, *self.training)

    @property
    def num_variants(self) -> int:
        return 1 + len(self.training)

    def question(self, text: str, variant: int = 0) -> str:
        """The question of ``variant`` (0: evaluation) for ``text``."""
        if not 0 <= variant < self.num_variants:
            raise IndexError(f"variant {variant} does not exist: this kind has {self.num_variants} (0..{self.num_variants - 1})")
        how = self.evaluation_normalise if variant == 0 else self.training_normalise
        return self.templates[variant].replace(TEXT, normalise(text, how))

    def questions(self, text: str) -> list[str]:
        """The question of every variant, variant 0 first."""
        return [self.question(text, v) for v in range(self.num_variants)]

    def names(self) -> list[str]:
        """One line per variant saying which template it is (``eval: ...``, ``train 1: ...``)."""
        return [f"eval ({self.evaluation_normalise}): {self.evaluation!r}"] + [
            f"train {i} ({self.training_normalise}): {t!r}" for i, t in enumerate(self.training, start=1)
        ]

    def record(self) -> dict:
        return {
            "evaluation": self.evaluation,
            "evaluation_normalise": self.evaluation_normalise,
            "training": list(self.training),
            "training_normalise": self.training_normalise,
        }


@dataclass(frozen=True)
class QuestionSet:
    """A named set of question templates, one :class:`QueryTemplates` per kind of query."""

    name: str
    short: QueryTemplates
    sentence: QueryTemplates

    def kind(self, is_sentence: bool) -> QueryTemplates:
        return self.sentence if is_sentence else self.short

    def question(self, text: str, is_sentence: bool, variant: int = 0) -> str:
        """The question of ``variant`` for a manifest row (variant 0: evaluation)."""
        return self.kind(is_sentence).question(text, variant)

    def questions(self, text: str, is_sentence: bool) -> list[str]:
        """Every variant's question for a manifest row, variant 0 (evaluation) first."""
        return self.kind(is_sentence).questions(text)

    def num_variants(self, is_sentence: bool) -> int:
        return self.kind(is_sentence).num_variants

    @property
    def max_variants(self) -> int:
        """The most variants any query of this set has (a store's ``text_variants.count``)."""
        return max(self.short.num_variants, self.sentence.num_variants)

    @property
    def is_single(self) -> bool:
        """One template per kind, the sentence asked as it is: the rule stores recorded before sets existed
        (their identity holds ``question_template`` only)."""
        return (
            not self.short.training
            and not self.sentence.training
            and self.short.evaluation_normalise == "as_is"
            and self.sentence == QueryTemplates(TEXT)
        )

    def record(self) -> dict:
        """Every template string and normalisation, for the store identity (``question_set``)."""
        return {"name": self.name, "short": self.short.record(), "sentence": self.sentence.record()}

    def identity(self) -> dict:
        """The identity fields of the set: ``question_template`` (the short evaluation template, as stores
        recorded it before sets existed) and, unless :attr:`is_single`, ``question_set`` (:meth:`record`)."""
        fields: dict = {"question_template": self.short.evaluation}
        if not self.is_single:
            fields["question_set"] = self.record()
        return fields

    def variant_names(self) -> dict[str, list[str]]:
        """Kind -> one line per variant (``lens-cache info``, ``FeatureStore.text_variant_names``)."""
        return {"short": self.short.names(), "sentence": self.sentence.names()}


def single_set(question_template: str = "Can you segment the {text} in this image?", name: str = "single") -> QuestionSet:
    """One template for phrases (used for training and evaluation), sentences asked as they are."""
    return QuestionSet(name=name, short=QueryTemplates(question_template), sentence=QueryTemplates(TEXT))


#: The question for a referring phrase of the ``single`` set (this project's earlier and only rule).
SINGLE_QUESTION_TEMPLATE = "Can you segment the {text} in this image?"

#: LISA's lists as the LENS authors use them (jiazhen-code/LENS ``lens/data/qa_template.py``,
#: SHORT_QUESTION_TEMPLATE and LONG_QUESTION_TEMPLATE, ``<image>\n`` dropped, ``{class_name}``/``{sent}``
#: written ``{text}``); evaluation: ``lens/data/test_dataset.py`` (ReasonSeg, ``debug = True``).
AUTHORS = QuestionSet(
    name="authors",
    short=QueryTemplates(
        evaluation="What is {text} in this image?",
        training=(
            "Can you segment the {text} in this image?",
            "Please segment the {text} in this image.",
            "What is {text} in this image? Please respond with segmentation mask.",
            "What is {text} in this image? Please output segmentation mask.",
        ),
        evaluation_normalise="strip",
        training_normalise="lower",
    ),
    sentence=QueryTemplates(
        evaluation=" {text}",
        training=(
            "{text} Please respond with segmentation mask.",
            "{text} Please output segmentation mask.",
        ),
        evaluation_normalise="strip",
        training_normalise="as_is",
    ),
)

SINGLE = single_set(SINGLE_QUESTION_TEMPLATE)

#: The built-in sets by name.
QUESTION_SETS: Mapping[str, QuestionSet] = {"authors": AUTHORS, "single": SINGLE}


def question_set(value: str | QuestionSet | None, *, question_template: str | None = None,
                 default: str = "authors") -> QuestionSet:
    """Resolve an adapter's ``question_set`` / ``question_template`` arguments.

    ``question_template`` alone (the argument adapters took before sets existed) is a one-template set
    (:func:`single_set`); both together are refused; neither gives ``default``.

    Raises:
        UsageError: an unknown set name, or both arguments.
    """
    if question_template is not None:
        if value is not None:
            raise UsageError("give question_set or question_template, not both")
        name = "single" if question_template == SINGLE_QUESTION_TEMPLATE else "custom"
        return single_set(question_template, name=name)
    if value is None:
        value = default
    if isinstance(value, QuestionSet):
        return value
    if value not in QUESTION_SETS:
        raise UsageError(f"unknown question set {value!r}: one of {', '.join(QUESTION_SETS)}")
    return QUESTION_SETS[value]


def question_set_of(identity: Mapping) -> QuestionSet | None:
    """The question set a store identity (or a run's record of one) was cached with, to rebuild a live
    backbone that asks the same questions; None when the identity names none (a backbone without questions).

    Raises:
        UsageError: a set this code does not know by name (its strings are in the identity: pass it as a
            ``QuestionSet``).
    """
    record = identity.get("question_set")
    if record is None:
        template = identity.get("question_template")
        return None if template is None else question_set(None, question_template=template)
    name = record.get("name") if isinstance(record, Mapping) else None
    if name not in QUESTION_SETS or QUESTION_SETS[name].record() != record:
        raise UsageError(f"the identity's question set {name!r} is not one of {sorted(QUESTION_SETS)} as this "
                         "lens-seg defines it: rebuild the live backbone with that set")
    return QUESTION_SETS[name]
