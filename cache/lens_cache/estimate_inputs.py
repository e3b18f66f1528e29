"""What ``lens-cache estimate`` needs to know before a build: the backbones' sizes and each split's questions.

:func:`resolve_mllm` gives the MLLM's real dimensions (hidden size, decoder layers, image tokens, the prompt's
tokens before the image) and the config the FLOP model (:mod:`lens_cache.flops`) reads, without its weights:

- a built-in MLLM (``toy``, ``tiny``, ``tiny-qwen2vl``, ...) is built as a build builds it (small, on the CPU);
- a checkpoint whose ``config.json`` is here (a folder, or the offline HF cache) gives its own config;
- a published checkpoint named by its HF id (:data:`~lens_cache.backbones.real_configs.REAL_BACKBONES`:
  ``llava-hf/llava-1.5-7b-hf``, ``Qwen/Qwen2-VL-2B-Instruct``, ``llava-hf/llava-onevision-qwen2-7b-ov-hf``)
  gets the architecture the cache benchmark builds (:mod:`~lens_cache.backbones.real_configs`, written from
  memory of the public config files, not checked offline).

The questions' lengths L_t (tokens after the image, every template of the question set: what a store
caches per query) are counted with the built-in MLLM's own tokenizer, and for a real checkpoint with its tiny
counterpart's word-level tokenizer and the same prompt rule, as the cache benchmark does (a few tokens
shorter than the real tokenizer: BENCHMARKS.md). :func:`text_profile` counts a manifest's rows (at most
:data:`PROFILE_ROWS`, evenly spread); :func:`typical_profile` a representative text of a split's mean words.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from lens_cache.errors import BadSampleError, UsageError

#: The tiny counterpart of each MLLM family (``config.model_type``): its tokenizer counts a real checkpoint's L_t.
TINY_COUNTERPART = {"llava": "tiny", "qwen2_vl": "tiny-qwen2vl", "qwen2_5_vl": "tiny-qwen2.5vl",
                    "llava_onevision": "tiny-onevision"}
#: The question set of the real adapters (LLaVA-1.5, Qwen2-VL, OneVision: ``PrefixSharingBackbone``'s default).
REAL_QUESTION_SET = "authors"
#: Rows of a manifest whose questions are tokenised (evenly spread; all of them when there are fewer).
PROFILE_ROWS = 5000
#: Mean words of a query's text where no figure is published (``lens_manifests.published_counts``): assumed.
ASSUMED_WORDS = {"referring": 4.0, "semantic": 2.0, "reasoning": 15.0}
#: Bytes of a decoder layer's parameter per compute dtype (the warm-start file keeps them as computed).
DTYPE_BYTES = {"cuda": 2, "cpu": 4}


@dataclass(frozen=True)
class MllmShape:
    """An MLLM as the estimate sees it.

    Attributes:
        name: ``--mllm`` as given.
        model_type: its ``config.model_type``.
        config: the MLLM's config (``text_config``, ``vision_config``), as :mod:`lens_cache.flops` reads it.
        grid_size: side of its cached image-token grid.
        num_image_tokens: P, the image tokens a store keeps per image.
        prefix_tokens: P_pre, the prompt's tokens before the image (kept once per store).
        decoder_prefix: the tokens the decoder runs once per image (P_pre, every image token of the prompt).
        counter: the adapter whose tokenizer counts L_t (its ``questions_for``, ``num_text_tokens``).
        dims_from, tokens_from: where the sizes and the token counts come from (said in the output).
        default_layers: the layers a build caches without ``--layers``.
        preset: the training preset made for it, or None.
    """

    name: str
    model_type: str
    config: Any
    grid_size: int
    num_image_tokens: int
    prefix_tokens: int
    decoder_prefix: int
    counter: Any
    dims_from: str
    tokens_from: str
    default_layers: tuple[int, ...]
    preset: str | None

    @property
    def hidden_size(self) -> int:
        return int(self.config.text_config.hidden_size)

    @property
    def num_layers(self) -> int:
        return int(self.config.text_config.num_hidden_layers)

    @property
    def question_set(self) -> Any:
        return self.counter.question_set

    def flop_view(self) -> Any:
        """What :func:`lens_cache.flops.backbone_workload` reads of an adapter: ``model.config``, ``grid_size``."""
        return SimpleNamespace(model=SimpleNamespace(config=self.config), grid_size=self.grid_size)

    def decoder_layer_params(self) -> int:
        """Parameters of one decoder layer (attention, MLP, two norms; Qwen2's q/k/v biases)."""
        from lens_cache.flops import decoder_layer_matmul_params

        text = self.config.text_config
        heads, kv = int(text.num_attention_heads), int(getattr(text, "num_key_value_heads", None) or text.num_attention_heads)
        head_dim = int(getattr(text, "head_dim", None) or self.hidden_size // heads)
        bias = (heads + 2 * kv) * head_dim if self.model_type.startswith("qwen2") or "onevision" in self.model_type else 0
        return decoder_layer_matmul_params(self.hidden_size, int(text.intermediate_size), heads, kv, head_dim) + (
            2 * self.hidden_size + bias)

    def check_layers(self, layers: Sequence[int]) -> None:
        """Refuse a layer the MLLM has no ``hidden_states`` for (1..num_layers)."""
        bad = [layer for layer in layers if not 1 <= layer <= self.num_layers]
        if bad:
            raise UsageError(f"--layers {','.join(map(str, bad))} out of range for {self.name}: its hidden_states "
                             f"run 1..{self.num_layers} (e.g. --layers {','.join(map(str, self.default_layers))})")


def _known_checkpoints() -> dict[str, str]:
    """HF id of each published checkpoint the cache benchmark rebuilds -> its ``REAL_BACKBONES`` key."""
    from lens_cache.backbones.real_configs import REAL_BACKBONES

    return {row.checkpoint: key for key, row in REAL_BACKBONES.items()}


def unknown_mllm(name: str) -> UsageError:
    from lens_cache.backbones import BUILTIN_MLLMS

    return UsageError(
        f"unknown MLLM {name!r}: name a built-in ({', '.join(BUILTIN_MLLMS)}), a published checkpoint "
        f"({', '.join(_known_checkpoints())}) or a checkpoint folder with config.json")


def _real_config(key: str, tokenizer: Any) -> Any:
    """The architecture of ``REAL_BACKBONES[key]`` (from :mod:`~lens_cache.backbones.real_configs`)."""
    from lens_cache.backbones import real_configs

    if key == "llava-1.5":
        return real_configs.llava_1_5_7b_config(image_token_index=32000, pad_token_id=32001)
    if key == "qwen2vl-2b":
        return real_configs.qwen2vl_2b_config(tokenizer)
    return real_configs.onevision_7b_config(tokenizer)


def _checkpoint_config(name: str) -> tuple[Any | None, str | None]:
    """(config, model_type) of a checkpoint readable here (folder or offline HF cache), else (None, None)."""
    from lens_cache.backbones.mllm import load_mllm_config
    from lens_cache.errors import UserError

    try:
        config = load_mllm_config(name)
    except UserError:
        return None, None
    return config, config.model_type


@functools.cache
def resolve_mllm(name: str, question_set: str | None = None) -> MllmShape:
    """The :class:`MllmShape` of ``--mllm name`` (see the module docstring), its L_t counted for ``question_set``
    (None: the MLLM's default).

    Raises:
        UsageError: an MLLM that is neither built in, nor a checkpoint here, nor a published one known by name.
    """
    from lens_cache.backbones import BUILTIN_MLLMS, build_mllm
    from lens_cache.backbones.defaults import BUILTIN_DEFAULTS, MODEL_TYPE_DEFAULTS, default_layers

    if name in BUILTIN_MLLMS or name in BUILTIN_DEFAULTS:
        counter = build_mllm(name, layers=default_layers(name), device="cpu", question_set=question_set)
        row = BUILTIN_DEFAULTS.get(name)
        return _shape(name, counter.model.config, counter, row, "the built-in model", "its own tokenizer")
    config, model_type = _checkpoint_config(name)
    known = _known_checkpoints().get(name)
    if config is None and known is None:
        raise unknown_mllm(name)
    if model_type is None:
        from lens_cache.backbones.real_configs import REAL_BACKBONES

        model_type = {"llava-1.5": "llava", "qwen2vl-2b": "qwen2_vl", "onevision-7b": "llava_onevision"}[known]
        tiny = REAL_BACKBONES[known].tiny
    elif model_type in TINY_COUNTERPART:
        tiny = TINY_COUNTERPART[model_type]
    else:
        raise UsageError(f"{name} is a {model_type!r} checkpoint; the estimate knows {', '.join(TINY_COUNTERPART)}")
    counter = build_mllm(tiny, layers=default_layers(tiny), device="cpu", question_set=question_set or REAL_QUESTION_SET)
    dims_from = ("its config.json" if config is not None
                 else "lens_cache.backbones.real_configs (written from memory of the published config, not checked offline)")
    config = config if config is not None else _real_config(known, counter.processor.tokenizer)
    row = MODEL_TYPE_DEFAULTS.get(model_type)
    return _shape(name, config, counter, row, dims_from,
                  f"the word-level tokenizer of {tiny} (a few tokens short of the real one)")


def _shape(name: str, config: Any, counter: Any, row: Any, dims_from: str, tokens_from: str) -> MllmShape:
    grid = int(row.grid_size) if row is not None else int(counter.grid_size)
    image_tokens = grid * grid
    prefix = len(counter.prefix_token_ids)
    # the prompt's image tokens may exceed the cached grid (OneVision's tile): the tiny counterpart's run, else the grid
    in_prompt = max(len(counter._prefix_ids) - prefix, image_tokens)
    return MllmShape(
        name=name, model_type=str(config.model_type), config=config, grid_size=grid, num_image_tokens=image_tokens,
        prefix_tokens=prefix, decoder_prefix=prefix + in_prompt, counter=counter, dims_from=dims_from,
        tokens_from=tokens_from, default_layers=row.layers if row is not None else (14,),
        preset=row.preset if row is not None else None,
    )


# ----------------------------------------------------------------------------- SAM


@dataclass(frozen=True)
class SamShape:
    """SAM's image encoder as the estimate sees it: its variant, C and its FLOPs per image."""

    variant: str
    channels: int
    flops: int


def default_sam(mllm: str) -> str:
    """The SAM a build pairs with ``mllm``: the toy SAM for the toy MLLM, the tiny one for the tiny ones, else ViT-H."""
    if mllm == "toy":
        return "toy"
    return "tiny" if mllm.startswith("tiny") else "vit_h"


@functools.cache
def resolve_sam(spec: str) -> SamShape:
    """``vit_h``/``vit_l``/``vit_b`` (with or without ``:PATH``; no file is read), ``tiny`` or ``toy``.

    The encoder is built without weights (on the meta device for the real ones) and its shape read off it.
    """
    import torch
    from lens_cache.backbones.sam import SAM_VARIANTS, TOY_VARIANT, build_tiny_sam, parse_sam_spec
    from lens_cache.flops import SamEncoderShape, sam_encoder_flops

    variant = spec.partition(":")[0]
    if variant not in (*SAM_VARIANTS, TOY_VARIANT, "tiny"):
        variant = parse_sam_spec(spec).variant
    if variant == "tiny":
        encoder = build_tiny_sam().image_encoder
    elif variant == TOY_VARIANT:
        from lens_cache.backbones.toy import build_toy_sam

        encoder = build_toy_sam().image_encoder
    else:
        from segment_anything import sam_model_registry

        with torch.device("meta"):
            encoder = sam_model_registry[variant](checkpoint=None).image_encoder
    shape = SamEncoderShape.of(encoder)
    return SamShape(variant=variant, channels=shape.out_chans, flops=sam_encoder_flops(shape))


# ----------------------------------------------------------------------------- the questions


@dataclass(frozen=True)
class TextProfile:
    """The questions' lengths of a split: per counted row, L_t of each variant (0: refused), variant 0 first.

    Attributes:
        rows: the counted rows' lengths.
        total: rows of the split (``rows`` may be a sample of them).
        slots: V_t, the training variants a store has room for per query (the set's count - 1).
        source: how the lengths were obtained.
    """

    rows: tuple[tuple[int, ...], ...]
    total: int
    slots: int
    source: str

    def _mean(self, values: Sequence[float]) -> float:
        return sum(values) / len(values) if values else 0.0

    @property
    def mean_eval(self) -> float:
        """Mean L_t of the evaluation question (variant 0)."""
        return self._mean([row[0] for row in self.rows])

    @property
    def mean_training_sum(self) -> float:
        """Mean over queries of the summed L_t of their training questions (variants 1..)."""
        return self._mean([sum(row[1:]) for row in self.rows])

    @property
    def mean_training(self) -> float:
        """Mean L_t of one training question (what stage 2 draws), or of variant 0 where there are none."""
        values = [n for row in self.rows for n in row[1:] if n > 0]
        return self._mean(values) if values else self.mean_eval

    @property
    def max_eval(self) -> int:
        """T, the longest variant 0 (a store's ``max_text_len``)."""
        return max([1, *(row[0] for row in self.rows)])

    @property
    def max_training(self) -> int:
        """T_v, the longest training question."""
        return max([0, *(n for row in self.rows for n in row[1:])])


def _lengths(counter: Any, text: str, is_sentence: bool) -> tuple[int, ...]:
    """L_t of every variant of one row, as a build counts them (0: refused; the rest not asked)."""
    lengths = []
    for v, question in enumerate(counter.questions_for(text, bool(is_sentence))):
        try:
            lengths.append(counter.num_text_tokens(question))
        except BadSampleError:
            if v == 0:
                return tuple(0 for _ in counter.questions_for(text, bool(is_sentence)))
            lengths.append(0)
    return tuple(lengths)


def text_profile(mllm: MllmShape, texts: Sequence[str], is_sentence: Sequence[bool]) -> TextProfile:
    """L_t of every variant of the rows of a manifest (at most :data:`PROFILE_ROWS` of them, evenly spread)."""
    total = len(texts)
    step = max(1, -(-total // PROFILE_ROWS))
    picked = range(0, total, step)
    rows = tuple(_lengths(mllm.counter, texts[i], is_sentence[i]) for i in picked)
    counted = f"all {total} rows" if step == 1 else f"{len(rows)} of {total} rows"
    return TextProfile(rows, total, mllm.question_set.max_variants - 1,
                       f"tokenised, {counted} of the manifest, with {mllm.tokens_from}")


def typical_profile(mllm: MllmShape, mean_words: float, is_sentence: bool, total: int, words_from: str) -> TextProfile:
    """L_t of a representative text of ``mean_words`` words (rounded; no manifest to count)."""
    words = max(1, round(mean_words))
    row = _lengths(mllm.counter, " ".join(["thing"] * words), is_sentence)
    return TextProfile((row,), total, mllm.question_set.max_variants - 1,
                       f"a text of {words} word(s) ({words_from}) tokenised with {mllm.tokens_from}")
