"""``lens-segment``: segment one image with a trained LENS run, running the frozen backbones live.

No cache is involved: the frozen MLLM and SAM's image encoder run on the image and the
instruction (:meth:`~lens_cache.backbones.LensFeatureExtractor.extract_one`), and the
features go through exactly the path cached features take in stage 2:

1. each feature tensor is rounded to float16 with the function the cache builder stores
   them with (``lens_cache.store.to_float16``), because the run was trained on float16
   features;
2. one sample shaped like :meth:`lens_train.training.data.QueryDataset.__getitem__` is collated
   with :func:`lens_train.training.data.collate` and moved with :meth:`Batch.to`;
3. :func:`lens_train.evaluation.evaluate.predict` runs the model; the mask is
   ``sigmoid(logit) > threshold`` at the image's original size.

So a live result equals the one ``lens-eval`` computes from a store built by the same
backbone (``tests/test_segment.py`` checks it).

The backbone must be the one the run's cache was built with: the live extractor's
identity and the one recorded in the run's ``config.json`` must have no
:func:`lens_cache.identity.feature_differences` (the rule training and ``lens-eval`` apply
to stores: ``layers``, ``warm_start`` and, where the weights are fingerprinted,
``name_or_path`` do not count), and the live backbone must compute the run's layer
(:func:`lens_cache.store.require_layer`).

Usage::

    lens-segment photo.jpg "the mug left of the laptop" --checkpoint runs/official -o out/
    # out/mask.png (0/255), out/overlay.png, out/panels.png, out/result.json
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from lens_cache.identity import feature_differences, format_differences
from lens_cache.images import read_rgb
from lens_manifests.files import replaced_on_success, write_text_atomically
from PIL import Image, ImageDraw

from ..cli import command_app, user_errors
from ..errors import UserError

# numpy, torch and what imports them (lens_cache.store, lens_cache.backbones and this package's
# .data, .evaluate, .trainer, .figures, .checkpoint) are imported where used, only to keep
# `lens-segment --help` (and `lens-chat --help`, which imports this module) from waiting for torch.
if TYPE_CHECKING:
    import numpy as np
    import torch
    from lens_cache.backbones import ImageFeatures, LensFeatureExtractor

    from ..training.data import Batch
    from ..evaluation.evaluate import LoadedRun
    from ..training.run_config import RunConfig

#: Colour of the predicted region in overlays (RGB).
MASK_COLOUR = (30, 220, 60)

app = command_app(help="Segment one image with a trained LENS run (frozen MLLM + SAM encoder run live).")


# ----------------------------------------------------------------------------- inputs


def load_image(image: str | Path | Image.Image) -> Image.Image:
    """An RGB PIL image from a path or URL (or a PIL image, converted), read as the cache builder reads it.

    Raises:
        ImageReadError (a UserError): the file does not exist or is not an image PIL can read (one line).
    """
    return read_rgb(image)


def check_instruction(instruction: str) -> str:
    """``instruction`` if it says something; an empty or blank one is refused (UserError, one line)."""
    if not instruction or not instruction.strip():
        raise UserError("the instruction is empty: say what to segment, e.g. \"the mug left of the laptop\"")
    return instruction


def check_out_dir(out_dir: str | Path) -> Path:
    """``out_dir`` as a Path; refused (UserError, one line) if it exists and is not a folder."""
    path = Path(out_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"-o/--out {path} is a file, not a folder: give a folder (it is created if missing)")
    return path


def check_backbone(live_identity: dict, run_config: RunConfig, run_dir: Path | str) -> None:
    """Refuse a live backbone whose features differ from those the run's cache holds.

    Args:
        live_identity: ``LensFeatureExtractor.identity`` of the backbone built here.
        run_config: the run's ``config.json`` (its ``stores[0].identity`` is the cache's).
    Raises:
        UserError: one line naming the settings that differ and what to pass instead.
    """
    recorded = run_config.stores[0].identity
    diffs = feature_differences(recorded, live_identity)
    if not diffs:
        return
    detail = format_differences(diffs, ("run", "live"))
    keys = {key.split(".")[0] for key, _, _ in diffs}
    if keys & {"sam"}:
        hint = f"pass --sam {run_config.sam!r} (the SAM the run's cache was built with)"
    elif keys <= {"compute_dtype"}:
        hint = f"pass --dtype {recorded.get('compute_dtype')}"
    else:
        hint = f"pass --mllm PATH to the checkpoint the run's cache was built with ({recorded.get('name_or_path', '?')})"
    raise UserError(f"the live backbone is not the one run {run_dir} was trained on ({detail}): {hint}")


# ----------------------------------------------------------------------------- results


@dataclass
class SegmentResult:
    """One segmentation of one image.

    Attributes:
        mask: (H, W) bool at the original size, ``probability > threshold``.
        probability: (H, W) float32, ``sigmoid(logits)``.
        logits: (H, W) float32 mask logits at the original size (CPU tensor).
        heatmap: (g, g) grounding map in (0, 1) over SAM's padded frame.
        points: (K, 2) keypoints (x, y) in grid cells; valid, used: (K,) bool.
        iou_prediction: SAM's predicted IoU of the mask.
        image: the RGB image that was segmented.
        instruction: the user's text; question: what the MLLM was asked.
        threshold: on the probability.
        input_size, original_size: (h, w) inside SAM's frame and as loaded.
    """

    mask: np.ndarray
    probability: np.ndarray
    logits: torch.Tensor
    heatmap: torch.Tensor
    points: torch.Tensor
    valid: torch.Tensor
    used: torch.Tensor
    iou_prediction: float
    image: Image.Image
    instruction: str
    question: str
    threshold: float
    input_size: tuple[int, int]
    original_size: tuple[int, int]

    @property
    def keypoints_xy(self) -> np.ndarray:
        """(m, 2) pixel (x, y) in the original image of the keypoints that prompted SAM."""
        from ..figures import grid_to_image_xy  # heavy: see the note on imports at the top

        grid_size = int(self.heatmap.shape[-1])
        xy = grid_to_image_xy(self.points, self.input_size, self.original_size, grid_size)
        return xy[(self.valid & self.used).numpy()]

    def summary(self) -> dict[str, Any]:
        """JSON-friendly facts: sizes, area, keypoints, threshold (``result.json``)."""
        area = int(self.mask.sum())
        return {
            "instruction": self.instruction,
            "question": self.question,
            "threshold": self.threshold,
            "original_size": list(self.original_size),
            "mask_pixels": area,
            "mask_fraction": area / max(1, self.mask.size),
            "iou_prediction": self.iou_prediction,
            "keypoints_xy": [[round(float(x), 2), round(float(y), 2)] for x, y in self.keypoints_xy],
        }


# ----------------------------------------------------------------------------- the segmenter


def features_to_batch(features: "ImageFeatures", layer: int, sam_channels: int) -> "Batch":
    """A batch of one query from live features, exactly as a cached query would come out of the loader.

    Each tensor goes through the cache builder's float16 conversion (the run was trained
    on float16 features), then a sample shaped like ``QueryDataset.__getitem__`` is
    collated. There is no ground truth: ``gts`` holds one empty (0, 0) tensor.

    Args:
        features: ``extract_one`` output (one image, one question).
        layer: the run's MLLM layer.
        sam_channels: C of the SAM embeddings the run was trained on (its ``prompt_dim``:
            256 for SAM, 64 for the toy SAM).
    Returns:
        Batch with image_states (1, 576, d), text_states (1, L_t, d), sam_embeddings
        (1, C, 64, 64), all float16 on the CPU.
    """
    import torch  # heavy: see the note on imports at the top
    from lens_cache.store import require_layer, sam_embedding_shape, to_float16

    from ..training.data import collate

    require_layer(features.image_states, layer, holder="the live backbone")
    image_states = features.image_states[layer]
    text_states = features.text_states[0][layer]
    sample = {
        "image_states": torch.from_numpy(to_float16(image_states, tuple(image_states.shape), "live image states")),
        "text_states": torch.from_numpy(to_float16(text_states, tuple(text_states.shape), "live text states")),
        "sam_embedding": torch.from_numpy(
            to_float16(features.sam_embedding, sam_embedding_shape(sam_channels), "live SAM embedding")
        ),
        "gt": torch.zeros((0, 0), dtype=torch.uint8),
        # The store keeps sizes as int32 and hands them out as int64: same values here.
        "original_size": torch.tensor(features.original_size, dtype=torch.int64),
        "input_size": torch.tensor(features.input_size, dtype=torch.int64),
        "query_id": -1,
        "store_index": 0,
        "task": "interactive",
        "dataset": "live",
        "is_sentence": True,
        # the prompt's tokens before the image, as the store keeps them (float16); absent for adapters without
        "prefix_states": (torch.from_numpy(to_float16(prefix, tuple(prefix.shape), "live prefix states"))
                          if (prefix := features.prefix_states.get(layer)) is not None else None),
    }
    return collate([sample])


class Segmenter:
    """A trained LENS run attached to its live frozen backbones (MLLM + SAM image encoder).

    Build it once and call :meth:`segment` per request; the agent (``lens_train.inference.agent``)
    shares its MLLM for dialogue.

    Args:
        run_dir: a run folder written by ``lens-train`` (config.json + checkpoint).
        extractor: a ready ``LensFeatureExtractor`` to use (tests, the agent); None builds one.
        mllm: MLLM checkpoint folder / HF-cache name or ``tiny``; default: the one recorded
            in the run's cache identity.
        sam: SAM spec (``tiny`` / ``vit_h:PATH``); default: the run's recorded SAM.
        device: ``cpu`` / ``cuda``; default CUDA when available (with ``extractor``: its device).
        dtype: compute dtype of the backbones; default: the one the cache was built with
            (it is part of the identity: bf16 and fp32 features differ).
        threshold: default mask threshold; None: the run's (its preset's) threshold.
    Raises:
        UserError: no run / no checkpoint there, or the backbone is not the run's (MissingLayerError,
            a StoreError: it does not compute the run's layer).
        FileNotFoundError: an MLLM or SAM checkpoint is missing (one-line message).
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        extractor: "LensFeatureExtractor | None" = None,
        mllm: str | None = None,
        sam: str | None = None,
        device: str | torch.device | None = None,
        dtype: str | None = None,
        threshold: float | None = None,
    ) -> None:
        import torch  # heavy: see the note on imports at the top
        from lens_cache.store import require_layer

        from lens_cache.backbones.runtime import resolve_device

        from ..evaluation.evaluate import load_run
        from ..training.run_config import read_run_config

        self.run_dir = Path(run_dir)
        if not self.run_dir.is_dir():
            raise UserError(f"checkpoint folder not found: {self.run_dir} (pass --checkpoint RUN_DIR written by lens-train)")
        self.config = read_run_config(self.run_dir)
        self.layer = self.config.layer
        recorded = self.config.stores[0].identity
        if extractor is None:
            dev = resolve_device(str(device) if device is not None else None)
        else:
            dev = torch.device(extractor.mllm.device) if hasattr(extractor.mllm, "device") else torch.device("cpu")
        self.threshold = _check_threshold(self.config.train.threshold if threshold is None else threshold)
        if extractor is None and mllm is None and sam is None:
            # The run's own backbones: the checkpoint first, so a missing one fails in a second, not after
            # loading a 7B MLLM.
            self.run: LoadedRun = load_run(self.run_dir, device=dev, sam=sam)
            extractor = self._build_extractor(recorded, mllm=mllm, sam=sam, device=dev, dtype=dtype)
            check_backbone(extractor.identity, self.config, self.run_dir)
        else:
            # Other backbones named: the identity check first, before a model is built for a SAM it may not fit.
            if extractor is None:
                extractor = self._build_extractor(recorded, mllm=mllm, sam=sam, device=dev, dtype=dtype)
            check_backbone(extractor.identity, self.config, self.run_dir)
            self.run = load_run(self.run_dir, device=dev, sam=sam)
        self.device = dev
        require_layer(extractor.layers, self.layer, holder="the live backbone",
                      fix=f"build it with layer {self.layer}, the layer run {self.run_dir} was trained on")
        self.extractor = extractor

    def _build_extractor(self, recorded: dict, *, mllm: str | None, sam: str | None, device: torch.device,
                         dtype: str | None) -> "LensFeatureExtractor":
        from lens_cache.backbones import build_extractor  # heavy: see the note on imports at the top

        mllm = mllm or recorded.get("name_or_path")
        if not mllm:
            raise UserError(
                f"run {self.run_dir} was trained on a cache whose backbone cannot be rebuilt live "
                f"({recorded.get('backbone') or recorded.get('mllm', 'unknown')}): pass --mllm PATH"
            )
        from lens_cache.questions import question_set_of

        return build_extractor(
            mllm=mllm,
            sam=sam or self.config.sam,
            layers=(self.layer,),
            device=device,
            dtype=dtype or recorded.get("compute_dtype"),
            question_set=question_set_of(recorded),  # ask as the store asked (its evaluation question)
        )

    @property
    def mllm(self) -> Any:
        """The frozen MLLM adapter (``LlavaBackbone``): ``generate`` for dialogue."""
        return self.extractor.mllm

    def features(self, image: Image.Image, question: str) -> "Batch":
        """The batch of one live query (see :func:`features_to_batch`)."""
        features = self.extractor.extract_one(image, question)
        return features_to_batch(features, self.layer, self.run.model.config.prompt_dim)

    def segment(
        self,
        image: str | Path | Image.Image,
        instruction: str,
        *,
        is_sentence: bool = True,
        threshold: float | None = None,
    ) -> SegmentResult:
        """Segment what ``instruction`` refers to in ``image``.

        Args:
            image: path or PIL image (any mode; used as RGB).
            instruction: asked as it is (a sentence), or with ``is_sentence=False`` wrapped
                in the referring template (``Can you segment the {phrase} in this image?``),
                the same rule the cache applies to manifest rows.
            threshold: overrides the segmenter's threshold.
        """
        import torch  # heavy: see the note on imports at the top

        from ..evaluation.evaluate import predict

        threshold = self.threshold if threshold is None else _check_threshold(threshold)
        check_instruction(instruction)
        rgb = load_image(image)
        question = self.extractor.question_for(instruction, is_sentence)
        batch = self.features(rgb, question).to(self.device)
        output, logits = predict(self.run.model, batch, precision=self.run.precision)
        logit = logits[0].float().cpu()
        probability = torch.sigmoid(logit)
        return SegmentResult(
            mask=(probability > threshold).numpy(),
            probability=probability.numpy(),
            logits=logit,
            heatmap=output.heatmap[0].float().cpu(),
            points=output.points[0].float().cpu(),
            valid=output.valid[0].cpu(),
            used=output.used[0].cpu(),
            iou_prediction=float(output.iou_predictions[0]),
            image=rgb,
            instruction=instruction,
            question=question,
            threshold=threshold,
            input_size=tuple(int(v) for v in batch.input_sizes[0]),
            original_size=tuple(int(v) for v in batch.original_sizes[0]),
        )


def _check_threshold(threshold: float) -> float:
    if not 0.0 < float(threshold) < 1.0:
        raise UserError(f"--threshold is a probability in (0, 1), got {threshold}")
    return float(threshold)


def segment_image(
    image: str | Path | Image.Image,
    instruction: str,
    *,
    run_dir: str | Path,
    mllm: str | None = None,
    sam: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    threshold: float | None = None,
    is_sentence: bool = True,
    extractor: "LensFeatureExtractor | None" = None,
) -> SegmentResult:
    """One-shot :class:`Segmenter` (loads the run and the backbones, segments once).

    The instruction and the image are checked before anything is loaded, so a bad one
    fails at once. See :class:`Segmenter` and :meth:`Segmenter.segment` for the arguments.
    """
    check_instruction(instruction)
    rgb = load_image(image)
    segmenter = Segmenter(run_dir, extractor=extractor, mllm=mllm, sam=sam, device=device, dtype=dtype,
                          threshold=threshold)
    return segmenter.segment(rgb, instruction, is_sentence=is_sentence)


# ----------------------------------------------------------------------------- pictures


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    """4-neighbour binary dilation, ``steps`` times (numpy only)."""
    out = mask.copy()
    for _ in range(steps):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def overlay_image(
    image: Image.Image,
    mask: np.ndarray,
    *,
    keypoints_xy: np.ndarray | None = None,
    colour: tuple[int, int, int] = MASK_COLOUR,
    alpha: float = 0.45,
) -> Image.Image:
    """``image`` with ``mask`` tinted and outlined in ``colour``, keypoints as white dots.

    This is the paper's ``Overlay(I, mask)`` (Algorithm S1): same size as the image, so
    it can be shown beside it.

    Args:
        image: RGB (any mode is converted), size (W, H).
        mask: (H, W) bool.
        keypoints_xy: (m, 2) pixel (x, y), or None for no dots.
    Returns:
        RGB image of size (W, H).
    """
    import numpy as np  # heavy: see the note on imports at the top

    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != rgb.shape[:2]:
        raise ValueError(f"mask {mask.shape} does not match image {rgb.shape[:2]}")
    tint = np.asarray(colour, dtype=np.float32)
    out = rgb.copy()
    out[mask] = (1 - alpha) * out[mask] + alpha * tint
    # A solid outline keeps a thin or pale region visible at any size.
    thickness = max(1, round(min(mask.shape) / 250))
    outline = _dilate(mask, thickness) & ~mask
    out[outline] = tint
    result = Image.fromarray(out.round().clip(0, 255).astype(np.uint8))
    if keypoints_xy is not None and len(keypoints_xy):
        draw = ImageDraw.Draw(result)
        radius = max(2.0, min(mask.shape) / 80)
        for x, y in np.asarray(keypoints_xy, dtype=np.float64):
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=(255, 255, 255), outline=(0, 0, 0))
    return result


def write_panels(path: Path, result: SegmentResult) -> None:
    """image | heatmap + keypoints | prediction, like a row of ``lens-eval``'s overlays.png without ground truth."""
    import numpy as np  # heavy: see the note on imports at the top

    from ..figures import _pyplot, grid_to_image_xy, heatmap_on_image, save_figure

    plt = _pyplot()
    h, w = result.original_size
    image01 = np.asarray(result.image, dtype=np.float32) / 255.0
    heat = heatmap_on_image(result.heatmap, result.input_size, result.original_size)
    xy = grid_to_image_xy(result.points, result.input_size, result.original_size, int(result.heatmap.shape[-1]))
    good = (result.valid & result.used).numpy()
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.2), squeeze=False)
    axes[0, 0].imshow(image01)
    axes[0, 1].imshow(image01)
    axes[0, 1].imshow(heat, cmap="jet", alpha=0.5, vmin=0, vmax=1)
    axes[0, 1].scatter(xy[good, 0], xy[good, 1], c="white", s=22, edgecolors="black", linewidths=0.6)
    axes[0, 2].imshow(np.asarray(overlay_image(result.image, result.mask)))
    fraction = result.mask.mean() if result.mask.size else 0.0
    titles = (result.instruction[:60], "heatmap + keypoints", f"prediction ({100 * fraction:.1f}% of the image)")
    for c, title in enumerate(titles):
        axes[0, c].set_title(title, fontsize=8)
        axes[0, c].set_xticks([]), axes[0, c].set_yticks([])
        axes[0, c].set_xlim(-0.5, w - 0.5), axes[0, c].set_ylim(h - 0.5, -0.5)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def write_result(out_dir: Path, result: SegmentResult, *, panels: bool = True) -> dict[str, Path]:
    """Write ``mask.png`` (0/255), ``overlay.png``, ``panels.png`` and ``result.json`` into ``out_dir``.

    Returns:
        name -> path of every file written.
    """
    import numpy as np  # heavy: see the note on imports at the top


    out_dir = check_out_dir(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"mask": out_dir / "mask.png", "overlay": out_dir / "overlay.png", "result": out_dir / "result.json"}
    pictures = {
        "mask": Image.fromarray(result.mask.astype(np.uint8) * 255),  # (H, W) uint8: mode L
        "overlay": overlay_image(result.image, result.mask, keypoints_xy=result.keypoints_xy),
    }
    for name, picture in pictures.items():
        with replaced_on_success(paths[name], suffix=".tmp.png") as tmp:
            picture.save(tmp, format="PNG")
    if panels:
        paths["panels"] = out_dir / "panels.png"
        write_panels(paths["panels"], result)
    write_text_atomically(paths["result"], json.dumps(result.summary(), indent=2) + "\n")
    return paths


# ----------------------------------------------------------------------------- CLI


@app.command()
def segment(
    image: Annotated[Path, typer.Argument(help="Image file to segment.")],
    instruction: Annotated[str, typer.Argument(help="What to segment (a sentence, or a phrase with --phrase).")],
    checkpoint: Annotated[Path, typer.Option(help="Run folder written by lens-train.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder: mask.png, overlay.png, panels.png, result.json.")],
    mllm: Annotated[str | None, typer.Option(help="MLLM checkpoint folder / HF name or 'tiny' (default: the run's cache's).")] = None,
    sam: Annotated[str | None, typer.Option(help="SAM as vit_h:PATH or 'tiny' (default: the run's).")] = None,
    phrase: Annotated[bool, typer.Option("--phrase", help="INSTRUCTION is a short referring phrase: ask "
                                         "'Can you segment the {phrase} in this image?'.")] = False,
    threshold: Annotated[float | None, typer.Option(help="Mask = sigmoid(logit) > threshold (default: the run's).")] = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda when available).")] = None,
    dtype: Annotated[str | None, typer.Option(help="Backbone compute dtype (default: the one the run's cache was built with).")] = None,
) -> None:
    """Segment IMAGE by INSTRUCTION with a trained LENS run; the frozen MLLM and SAM encoder run live.

    Default backbone: the run's own (the MLLM and SAM its training cache was built with, as
    recorded in its config.json); --mllm / --sam name them when they moved.
    """
    with user_errors(output=out):
        check_instruction(instruction)  # these fail before any model is loaded
        check_out_dir(out)
        rgb = load_image(image)
        result = segment_image(rgb, instruction, run_dir=checkpoint, mllm=mllm, sam=sam, device=device, dtype=dtype,
                               threshold=threshold, is_sentence=not phrase)
        paths = write_result(out, result)
        summary = result.summary()
        typer.echo(f"{paths['mask']}: {summary['mask_pixels']} px ({100 * summary['mask_fraction']:.1f}%), "
                   f"{len(summary['keypoints_xy'])} keypoint(s); overlay {paths['overlay']}")


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
