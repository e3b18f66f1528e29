"""The word-level tokenizer the tiny MLLMs built in code share (:mod:`.tiny_llava`, :mod:`.tiny_qwen2vl`,
:mod:`.tiny_onevision`), built locally with the ``tokenizers`` library: nothing is downloaded and the ids
are deterministic, so a tiny model's random weights always line up with its tokenizer.
"""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

# The words of the prompt templates, the question rule, the synthetic dataset (colours,
# shapes, positions, reasoning-style sentences) and everyday English; anything else
# maps to <unk>. Lower case: the tokenizer lower-cases its input.
WORDS = """
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

PUNCTUATION = tuple(".,:;?!'\"()-/")
DIGITS = tuple("0123456789")


def word_level_tokenizer(
    special_tokens: tuple[str, ...],
    *,
    extra_words: tuple[str, ...] | list[str] = (),
    extra_symbols: tuple[str, ...] = (),
    bos_token: str | None = None,
    **roles: str,
) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over :data:`WORDS` (+ ``extra_words``), ids in the order ``special_tokens``,
    punctuation (+ ``extra_symbols``), digits, words.

    Lower-cases its input, splits on whitespace, punctuation and single digits and maps unknown words to
    ``<unk>``. The special tokens (a family's image and chat markers) stay whole, so a processor's run of
    image tokens becomes as many ids. ``bos_token`` is prepended like LLaMA's tokenizer does (Qwen2 adds
    none); ``roles`` name the others (``eos_token``, ``pad_token``, ``unk_token``).
    """
    words = sorted({w for w in (*WORDS.split(), *extra_words) if w.isalpha()})
    symbols = (*PUNCTUATION, *(s for s in extra_symbols if s not in PUNCTUATION))
    vocab = {token: i for i, token in enumerate((*special_tokens, *symbols, *DIGITS, *words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(), pre_tokenizers.Digits(individual_digits=True)]
    )
    # normalized=False: special tokens are matched before lower-casing ("<image>" stays whole).
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    if bos_token is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A", pair=f"{bos_token} $A $B", special_tokens=[(bos_token, vocab[bos_token])]
        )
    tok.decoder = decoders.WordPiece(cleanup=True)  # joins words with spaces, no space before punctuation
    bos = {"bos_token": bos_token} if bos_token is not None else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, **bos, **roles)
