"""What every MLLM adapter provides, and the checks shared by their loaders.

An adapter wraps one frozen MLLM family (LLaVA-1.5 in ``llava``, Qwen2-VL / Qwen2.5-VL in
``qwen2vl``; LLaVA-NeXT would
be new adapters registered in ``lens_cache.backbones``) behind :class:`MllmBackbone`.
It receives the image exactly as the MLLM should see it (the combined extractor owns
the SAM-aligned geometry) and returns the intermediate hidden states LENS reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

import torch
from PIL import Image
from transformers import AutoConfig, PretrainedConfig

from lens_cache.errors import UserError


class MllmCheckpointNotFoundError(FileNotFoundError, UserError):
    """No MLLM checkpoint at the given path or in the offline HF cache (message is one line)."""


class UnsupportedMllmError(ValueError, UserError):
    """The checkpoint exists but no registered adapter handles its model type."""


def not_found_message(name_or_path: str) -> str:
    return f"MLLM checkpoint not found at {name_or_path}: pass --mllm PATH to a local llava-hf folder or 'tiny'"


def load_mllm_config(name_or_path: str) -> PretrainedConfig:
    """The config of a local checkpoint folder or an HF-cache name, offline, no remote code.

    Raises:
        MllmCheckpointNotFoundError: neither a folder with ``config.json`` nor a cached HF name.
        UnsupportedMllmError: ``config.json`` names a model type transformers does not know.
    """
    local = Path(name_or_path).expanduser()
    if local.exists() and not (local / "config.json").is_file():
        raise MllmCheckpointNotFoundError(not_found_message(name_or_path))
    try:
        return AutoConfig.from_pretrained(str(local) if local.exists() else name_or_path, local_files_only=True)
    except OSError:
        raise MllmCheckpointNotFoundError(not_found_message(name_or_path)) from None
    except ValueError as err:  # an unknown model_type, or a name that is no valid repo id
        if local.exists():
            raise UnsupportedMllmError(f"{name_or_path} is not a supported MLLM checkpoint: {err}") from None
        raise MllmCheckpointNotFoundError(not_found_message(name_or_path)) from None


@dataclass
class MllmStates:
    """The MLLM's states for one image and its questions.

    Attributes:
        image_states: layer -> (L_i, d) float32, the image-token states (``hidden_states[layer]``).
        text_states: one per question, layer -> (L_t, d) float32, the tokens after the image;
            the last row is the start-of-answer token.
        prefix_states: layer -> (P, d) float32, the P prompt tokens before the first image token (BOS,
            system prompt, ``USER:``; Qwen2-VL's also ``<|vision_start|>``). A causal decoder computes
            them without seeing the image, so they are the same for every image (one tensor shared by
            the images of a batch); empty where the adapter gives none.
    """

    image_states: dict[int, torch.Tensor]
    text_states: list[dict[int, torch.Tensor]]
    prefix_states: dict[int, torch.Tensor] = field(default_factory=dict)


class MllmBackbone(Protocol):
    """A frozen MLLM as LENS uses it."""

    #: JSON-serialisable: family, checkpoint, config hash, layers, compute dtype, prompt rule.
    identity: dict
    layers: tuple[int, ...]
    hidden_size: int
    num_image_tokens: int
    num_hidden_layers: int
    #: Side of the image-token grid, row-major over SAM's padded frame (num_image_tokens = grid_size**2,
    #: plus CLIP's CLS for a LLaVA with the ``full`` feature strategy); 24 for LLaVA-1.5 and Qwen2-VL here.
    grid_size: int
    #: The ``LensConfig`` fields of a head made of its decoder layers: hidden_size,
    #: num_heads, mlp_size, rms_norm_eps, rope_theta (+ layer_type, num_key_value_heads when not
    #: LLaMA multi-head layers).
    head_sizes: dict

    def question_for(self, text: str, is_sentence: bool) -> str:
        """The question put to the MLLM for a manifest row."""

    def num_text_tokens(self, question: str) -> int:
        """L_t of this question (tokenisation only)."""

    def encode(self, images: Sequence[Image.Image], questions: Sequence[Sequence[str]]) -> list[MllmStates]:
        """States for a batch of images (as the MLLM sees them) and the questions about each."""

    def generate(self, image: Image.Image | None, prompt_text: str, max_new_tokens: int = 64) -> str:
        """Plain dialogue: the MLLM's greedy answer to ``prompt_text`` about ``image``."""

    def decoder_layer_state_dict(self, index: int) -> dict[str, torch.Tensor]:
        """Weights of decoder layer ``index`` (0-based), to warm-start the LENS head."""

    def image_attention_by_layer(self, image: Image.Image, question: str) -> torch.Tensor:
        """(num_hidden_layers, grid_size, grid_size): per decoder layer (0-based), the last prompt token's
        attention to the image tokens, averaged over heads, for ``image`` (as the MLLM sees it) and the
        question put as a store build puts it (``lens-cache probe-layers``)."""
