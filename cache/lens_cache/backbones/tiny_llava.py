"""A tiny LLaVA-1.5 built in code with the real classes, for tests and the embedded default.

It keeps everything the pipeline depends on and nothing else: a CLIP vision tower at
336 px with 14 px patches (24 x 24 = 576 image tokens, ``vision_feature_layer=-2``,
CLS dropped by the ``default`` strategy), a 32-layer LLaMA (so layers 14 and 30 exist)
only 64 wide, a real :class:`~transformers.LlavaProcessor` whose ``<image>`` expands to
576 tokens, and a word-level tokenizer built locally with the ``tokenizers`` library
(nothing is downloaded). :func:`save_tiny_llava` writes it as a llava-hf style folder,
so the real loader (``from_pretrained``) is exercised offline.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

TINY_SEED = 0

# LLaMA's special tokens first (<unk>=0, <s>=1, </s>=2 as in LLaMA), then LLaVA's.
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")

# The words of the prompt template, the question rule, the synthetic dataset (colours,
# shapes, positions, reasoning-style sentences) and everyday English; anything else
# maps to <unk>. Lower case: the tokenizer lower-cases its input.
_WORDS = """
a an the this that these those it its is are was were be been being am do does did done
can could would should will shall may might must have has had having not no yes
and or but if then than so because while when where which who whom whose what why how
of in on at to from by with without into onto over under above below behind beside between
near far next inside outside around through across along toward towards up down out off
left right top bottom middle center centre upper lower front back side corner edge
chat curious human artificial intelligence assistant gives give helpful detailed polite
answers answer questions question user you your me my i we our they them their he she his her
segment segmentation mask image picture photo scene object objects thing things part parts region area
please show find locate identify point highlight select mark describe tell see look
red green blue yellow orange purple pink brown black white gray grey cyan magenta violet
gold silver dark light bright pale colour color colored coloured
circle circles square squares triangle triangles rectangle rectangles ellipse ellipses oval
star stars diamond hexagon pentagon polygon shape shapes disk disc ring cross line lines dot dots
small smaller smallest large larger largest big bigger biggest tiny huge little medium
tall short wide narrow long thin thick round flat
first second third last one two three four five six seven eight nine ten
only other another each every all some any both either neither most least more less
same different similar like unlike closest nearest farthest furthest leftmost rightmost
topmost highest lowest
used use for help helps useful someone person people man woman child dog cat car bus
table chair cup bottle plate food fruit apple banana tree sky grass road water house window door
wall floor building sign street bird horse sheep cow bicycle boat train plane
sit sits sitting hold holds holding stand stands standing eat eating drink drinking play playing
wear wearing ride riding carry carrying cut cutting open close keep make makes
surface background foreground appears appear shown contains contain visible located placed
something anything nothing everything here there very also just most much many few
"""

_PUNCTUATION = tuple(".,:;?!'\"()-/")
_DIGITS = tuple("0123456789")


def build_tiny_tokenizer(
    extra_words: tuple[str, ...] | list[str] = (), extra_symbols: tuple[str, ...] = ()
) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over a fixed vocabulary, built locally (deterministic).

    Lower-cases its input, splits on whitespace, punctuation and single digits, maps
    unknown words to ``<unk>`` and prepends ``<s>`` like LLaMA's tokenizer. ``<image>``
    is a special token, so the processor's run of 576 ``<image>`` s becomes 576 ids.
    ``extra_words`` extend the vocabulary (the toy LLaVA adds its world's words) and
    ``extra_symbols`` its punctuation (the toy's box answers need ``[`` and ``]``).
    """
    words = sorted({w for w in (*_WORDS.split(), *extra_words) if w.isalpha()})
    symbols = (*_PUNCTUATION, *(s for s in extra_symbols if s not in _PUNCTUATION))
    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *symbols, *_DIGITS, *words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(), pre_tokenizers.Digits(individual_digits=True)]
    )
    # normalized=False: special tokens are matched before lower-casing ("<image>" stays whole).
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tok.decoder = decoders.WordPiece(cleanup=True)  # joins words with spaces, no space before punctuation
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def tiny_llava_config(tokenizer: PreTrainedTokenizerFast) -> LlavaConfig:
    """LLaVA-1.5's structure at toy width: 576 image tokens, 32 decoder layers of width 64."""
    vision = CLIPVisionConfig(
        image_size=336,
        patch_size=14,  # 336 / 14 = 24 -> 24 x 24 = 576 patches (+ CLS, dropped)
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=32,  # as LLaVA-1.5-7B, so layers 14 and 30 exist
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=576,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )


def build_tiny_processor(tokenizer: PreTrainedTokenizerFast | None = None) -> LlavaProcessor:
    """A real LlavaProcessor: CLIP preprocessing at 336 px; ``<image>`` -> (336/14)^2 + 1 - 1 = 576 tokens."""
    image_processor = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer if tokenizer is not None else build_tiny_tokenizer(),
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS, removed again by the "default" strategy
    )


def build_tiny_llava(seed: int = TINY_SEED) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """The tiny LLaVA (float32, CPU, eval mode, frozen) and its processor.

    Initialisation is seeded without disturbing the caller's global RNG state, so every
    call returns the same weights.
    """
    processor = build_tiny_processor()
    config = tiny_llava_config(processor.tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    return model.eval().requires_grad_(False), processor


def save_tiny_llava(directory: str | Path, seed: int = TINY_SEED) -> Path:
    """Write the tiny LLaVA as a llava-hf style folder (config, safetensors, processor, tokenizer)."""
    directory = Path(directory)
    model, processor = build_tiny_llava(seed)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory
