"""SAM: one builder for every variant, and the frozen image encoder that stage 1 caches.

A SAM spec is a string:

- ``tiny``: a tiny SAM built in code with the real ``segment_anything`` classes,
  deterministic from seed 0 (its image encoder still outputs 256 x 64 x 64);
- ``toy``: the project's pretrained toy SAM (:mod:`.toy`: prompt width 64, so
  64 x 64 x 64 embeddings), its weights loaded strictly from the shipped
  ``cache/lens_cache/backbones/toy_weights/toy_sam.safetensors``; ``toy:PATH`` loads another toy checkpoint;
- ``vit_h:PATH`` / ``vit_l:PATH`` / ``vit_b:PATH``: the real architecture from
  ``sam_model_registry`` with the checkpoint at PATH loaded strictly.  A bare PATH whose
  file name names the variant (``sam_vit_h_4b8939.pth``) is accepted too.

Stage 2 calls :func:`build_sam` with the spec recorded in the cache identity to get
the prompt encoder and mask decoder that belong to the cached image embeddings, so the
tiny SAM must be (and is) exactly reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Sequence

import torch
from segment_anything import sam_model_registry
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from lens_cache.errors import UsageError, UserError

from lens_core.geometry import SAM_IMAGE_SIZE
from lens_core.files import sha256_file

from .runtime import dtype_name, resolve_device, resolve_dtype
from .sam_attention import CPU_ROWS, attention_in_row_bands
from .geometry import SamFrame

SAM_VARIANTS = ("vit_h", "vit_l", "vit_b")
#: The toy SAM's variant name: its architecture is :func:`.toy.build_toy_sam`.
TOY_VARIANT = "toy"
TINY_SAM_SEED = 0

# SAM's fixed prompt geometry (as in segment_anything/build_sam.py): every variant
# shares the prompt encoder and mask decoder shapes; only the image encoder differs.
_PROMPT_DIM = 256
_PATCH_SIZE = 16
_EMBEDDING_SIZE = SAM_IMAGE_SIZE // _PATCH_SIZE  # 64


class SamCheckpointNotFoundError(FileNotFoundError, UserError):
    """The SAM checkpoint named by a spec does not exist (message is one line)."""


@dataclass(frozen=True)
class SamSpec:
    """A parsed SAM spec: ``variant`` is ``tiny``, ``toy`` or one of :data:`SAM_VARIANTS`."""

    variant: str
    checkpoint: Path | None = None


def parse_sam_spec(spec: str) -> SamSpec:
    """``"tiny"`` / ``"toy"`` / ``"VARIANT:PATH"`` / a bare checkpoint path naming its variant -> :class:`SamSpec`."""
    if spec == "tiny":
        return SamSpec("tiny")
    if spec == TOY_VARIANT:
        from .toy import TOY_SAM_FILE, WEIGHTS_DIR

        return SamSpec(TOY_VARIANT, WEIGHTS_DIR / TOY_SAM_FILE)
    variant, sep, path = spec.partition(":")
    if sep and variant in (*SAM_VARIANTS, TOY_VARIANT) and path:
        return SamSpec(variant, Path(path).expanduser())
    # A bare path: the official file names carry the variant (sam_vit_h_4b8939.pth).
    named = [v for v in SAM_VARIANTS if v in Path(spec).name]
    if len(named) == 1:
        return SamSpec(named[0], Path(spec).expanduser())
    raise UsageError(
        f"bad SAM spec {spec!r}: use 'tiny', 'toy' or VARIANT:PATH with VARIANT in "
        f"{', '.join((*SAM_VARIANTS, TOY_VARIANT))}"
    )


def build_tiny_sam(seed: int = TINY_SAM_SEED) -> Sam:
    """A tiny SAM with the real classes: 2-block ViT (width 32) that still outputs 256 x 64 x 64.

    The prompt encoder and mask decoder keep SAM's interface (256-d prompts, 3 multimask
    outputs) with a narrow MLP. Initialisation is seeded without disturbing the caller's
    global RNG state, so every call returns the same weights.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Sam(
            image_encoder=ImageEncoderViT(
                depth=2,
                embed_dim=32,
                img_size=SAM_IMAGE_SIZE,
                mlp_ratio=2.0,
                norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                num_heads=2,
                patch_size=_PATCH_SIZE,
                qkv_bias=True,
                use_rel_pos=True,
                global_attn_indexes=(),  # windowed only: a global block over 64x64 tokens costs ~1 s per image on CPU
                window_size=14,
                out_chans=_PROMPT_DIM,
            ),
            prompt_encoder=PromptEncoder(
                embed_dim=_PROMPT_DIM,
                image_embedding_size=(_EMBEDDING_SIZE, _EMBEDDING_SIZE),
                input_image_size=(SAM_IMAGE_SIZE, SAM_IMAGE_SIZE),
                mask_in_chans=16,
            ),
            mask_decoder=MaskDecoder(
                num_multimask_outputs=3,
                transformer=TwoWayTransformer(depth=2, embedding_dim=_PROMPT_DIM, mlp_dim=256, num_heads=8),
                transformer_dim=_PROMPT_DIM,
                iou_head_depth=3,
                iou_head_hidden_dim=64,
            ),
        )


def build_sam(spec: str) -> Sam:
    """The SAM named by ``spec``, on the CPU, float32, parameters as built (stage 2 trains the decoder).

    Raises:
        SamCheckpointNotFoundError: the checkpoint file does not exist.
        ValueError: the spec cannot be parsed.
    """
    parsed = parse_sam_spec(spec)
    if parsed.variant == "tiny":
        return build_tiny_sam()
    path = _existing_checkpoint(parsed)
    if parsed.variant == TOY_VARIANT:
        from safetensors.torch import load_file

        from .toy import build_toy_sam

        sam, state_dict = build_toy_sam(), load_file(str(path))
    else:
        sam = sam_model_registry[parsed.variant](checkpoint=None)
        # weights_only: a checkpoint from disk is data, never code.
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    sam.load_state_dict(state_dict, strict=True)  # strict: no silently dropped keys
    return sam


def sam_identity(spec: str) -> dict:
    """What identifies a SAM in a cache: variant + weights (``sha256:<hex>`` of the file, or ``tiny-seed0``).

    The embedding's channel count is not part of it (the weights fix it); stores record it
    as ``sam_channels``.

    The path itself is left out on purpose: moving a checkpoint does not change a cache.
    """
    parsed = parse_sam_spec(spec)
    if parsed.variant == "tiny":
        return {"variant": "tiny", "weights": f"tiny-seed{TINY_SAM_SEED}"}
    path = _existing_checkpoint(parsed)
    stat = path.stat()
    return {"variant": parsed.variant, "weights": "sha256:" + _file_sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)}


def _existing_checkpoint(parsed: SamSpec) -> Path:
    assert parsed.checkpoint is not None
    if parsed.checkpoint.is_file():
        return parsed.checkpoint
    if parsed.variant == TOY_VARIANT:
        raise SamCheckpointNotFoundError(
            f"toy SAM weights not found at {parsed.checkpoint}: run `lens-toy export` "
            "or check out the repository's cache/lens_cache/backbones/toy_weights"
        )
    raise SamCheckpointNotFoundError(
        f"SAM checkpoint not found at {parsed.checkpoint}: pass --sam {parsed.variant}:PATH "
        f"to a local sam_{parsed.variant}_*.pth or 'tiny'"
    )


@lru_cache(maxsize=32)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a checkpoint, cached by (path, size, mtime) since ViT-H is 2.5 GB."""
    return sha256_file(path)


class SamImageEncoder:
    """SAM's frozen image encoder: :class:`SamFrame` s -> C x 64 x 64 embeddings.

    C (:attr:`channels`) is SAM's prompt width: 256 for SAM, 64 for the toy SAM.

    Normalisation and padding are SAM's own (``Sam.preprocess``, in float32); only the
    ViT runs in ``dtype``. The model handed in is frozen (eval, no grads) and moved to
    ``device``; build a separate one (``build_sam``) for training the decoder. On the CPU the global
    attention runs in bands of query rows (:mod:`.sam_attention`: same numbers, an eighth of the
    peak); ``attention_rows`` overrides (None: SAM's own forward).
    """

    def __init__(self, sam: Sam, *, spec: str, device: torch.device, dtype: torch.dtype, batch_size: int = 4,
                 attention_rows: int | None | str = "auto") -> None:
        self.sam = sam.eval().requires_grad_(False)
        if attention_rows == "auto":
            attention_rows = CPU_ROWS if torch.device(device).type == "cpu" else None
        self.attention_rows = attention_rows
        self.spec = spec
        self.device = device
        self.dtype = dtype
        self.batch_size = batch_size
        self.channels = int(sam.prompt_encoder.embed_dim)
        # Only the ViT changes dtype: pixel_mean/std stay float32 so that normalisation is exact.
        self.sam.to(device)
        self.sam.image_encoder.to(dtype)
        self.identity: dict = {**sam_identity(spec), "compute_dtype": dtype_name(dtype)}

    @classmethod
    def from_spec(
        cls, spec: str = "tiny", *, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None
    ) -> "SamImageEncoder":
        """Build from a spec (see module docstring); bf16 on CUDA, float32 on CPU by default."""
        dev = resolve_device(device)
        return cls(build_sam(spec), spec=spec, device=dev, dtype=resolve_dtype(dtype, dev))

    @torch.inference_mode()
    def embed(self, frames: Sequence[SamFrame]) -> torch.Tensor:
        """Image embeddings of a batch of frames.

        Returns:
            (B, C, 64, 64) float32 on the CPU.
        """
        out: list[torch.Tensor] = []
        for start in range(0, len(frames), self.batch_size):
            chunk = frames[start : start + self.batch_size]
            # preprocess pads each image to 1024 x 1024, so the chunk stacks.
            pixels = torch.stack([self.sam.preprocess(f.sam_pixels().to(self.device)) for f in chunk])
            with attention_in_row_bands(self.sam.image_encoder, self.attention_rows):
                out.append(self.sam.image_encoder(pixels.to(self.dtype)).float().cpu())
        if not out:
            return torch.empty(0, self.channels, _EMBEDDING_SIZE, _EMBEDDING_SIZE)
        return torch.cat(out)
