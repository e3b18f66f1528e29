"""Toy-world backbones: a LLaVA and a SAM of the real classes, pretrained by the project.

See ``lens_cache.toy.sam`` and ``lens_cache.toy.llava`` for what each is and how it is
trained, ``lens_cache.toy.cli`` (``lens-toy``) for the commands that remake the shipped
weights in ``weights/``.
"""

from pathlib import Path

#: The shipped weights (``lens-toy export --out`` writes there).
WEIGHTS_DIR = Path(__file__).parent / "weights"
#: The toy SAM's file in :data:`WEIGHTS_DIR`: the state dict of ``build_toy_sam()`` (safetensors).
TOY_SAM_FILE = "toy_sam.safetensors"
#: The toy LLaVA in :data:`WEIGHTS_DIR`: a llava-hf folder (config, model.safetensors, processor, tokenizer).
TOY_LLAVA_DIR = "toy_llava"
#: Hashes, held-out scores and provenance of the shipped weights.
MANIFEST_FILE = "MANIFEST.json"
#: The prompt the toy LLaVA was trained with (its conversations, ``lens_cache.toy.llava``) and its stores
#: record: the vicuna_v1 text as the project wrote it before LLaVA-1.5's adapter took LISA's wording
#: ("user", ``lens_cache.backbones.llava.VICUNA_V1_TEMPLATE``). Changing it would change the toy's inputs
#: and every toy store's identity; ``<image>`` stands for the image tokens.
TOY_PROMPT_TEMPLATE = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions. "
    "USER: <image>\n{question} ASSISTANT:"
)
