"""The :class:`Segmenter`: a trained LENS head attached to its live frozen backbones (MLLM + SAM encoder).

No cache is involved: the frozen MLLM and SAM's image encoder run on the image and the
instruction (:meth:`~lens_cache.backbones.LensFeatureExtractor.extract`), and the features go
through exactly the path cached features take in stage 2:

1. each feature tensor is rounded to float16 with the function the cache builder stores
   them with (``lens_cache.store.to_float16``), because the head was trained on float16
   features;
2. one sample per query shaped like :meth:`lens_train.training.data.QueryDataset.__getitem__` is
   collated with :func:`lens_train.training.data.collate` and moved with :meth:`Batch.to`;
3. :func:`lens_train.evaluation.evaluate.predict` runs the model; the mask is
   ``sigmoid(logit) > threshold`` at the image's original size.

So a live result equals the one ``lens-eval`` computes from a store built by the same backbone
(``tests/test_segment.py``). :meth:`Segmenter.batch` runs many (image, instruction) pairs: the
instructions about one image share its MLLM image prefix and its SAM embedding, as the cache builder's
questions do (one ``extract`` call per group of images, each with all its questions).

The checkpoint is anything :func:`lens_train.training.model_folder.open_trained` reads: a run folder, a
model folder (``lens-export-model``), ``toy`` (the head shipped beside the toy backbones) or a Hub id.
The backbone must be the one the head was trained on: the live extractor's identity and the recorded
one must have no :func:`lens_cache.identity.feature_differences` (the rule training and ``lens-eval``
apply to stores), and the live backbone must compute the head's layer.

Typical use::

    from lens_train import Segmenter

    seg = Segmenter.from_pretrained("toy")                   # or a run / model folder
    result = seg("photo.png", "the red circle")               # .mask (H, W) bool, .score, .heatmap, .keypoints
    result.overlay().save("overlay.png")
    results = seg.batch([("a.png", "the red circle"), ("a.png", "the square")])
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lens_cache.identity import feature_differences, format_differences
from lens_cache.images import original_size_of, working_image
from PIL import Image

from lens_cache.errors import UserError as AnyUserError  # stage 1's too: ImageReadError is one

from ..errors import UserError
from .result import SegmentResult

# numpy, torch and what imports them are imported where used, only to keep `lens-segment --help` (and
# `lens-chat --help`, which imports this module) from waiting for torch.
if TYPE_CHECKING:
    import torch
    from lens_cache.backbones import ImageFeatures, LensFeatureExtractor

    from ..training.loading import LoadedRun
    from ..training.data import Batch
    from ..training.run_config import RunConfig

def load_image(image: str | Path | Image.Image) -> Image.Image:
    """The RGB working image of a path or URL (or a PIL image), in bounded memory.

    Up to 4096 px on its longest side it is read exactly as the cache builder reads it; a larger one is
    decoded once and downscaled (``lens_cache.images.working_image``), carrying its original size, to
    which the mask is brought back.

    Raises:
        ImageReadError (a UserError): the file does not exist, is not an image PIL can read, or has a
            side above ``LENS_MAX_IMAGE_SIDE`` (16384 px; one line).
    """
    return working_image(image)[0]


def check_instruction(instruction: str) -> str:
    """``instruction`` if it says something; an empty or blank one is refused (UserError, one line)."""
    if not isinstance(instruction, str) or not instruction.strip():
        raise UserError("the instruction is empty: say what to segment, e.g. \"the mug left of the laptop\"")
    return instruction


def check_threshold(threshold: float) -> float:
    if not 0.0 < float(threshold) < 1.0:
        raise UserError(f"--threshold is a probability in (0, 1), got {threshold}")
    return float(threshold)


def check_backbone(live_identity: dict, run_config: RunConfig, run_dir: Path | str, *, kind: str = "run") -> None:
    """Refuse a live backbone whose features differ from those the head was trained on.

    Args:
        live_identity: ``LensFeatureExtractor.identity`` of the backbone built here.
        run_config: the head's config (its ``stores[0].identity`` is the training cache's).
        kind: ``run`` or ``model`` (a model folder), for the message.
    Raises:
        UserError: one line naming the settings that differ and what to pass instead.
    """
    recorded = run_config.stores[0].identity
    diffs = feature_differences(recorded, live_identity)
    if not diffs:
        return
    detail = format_differences(diffs, (kind, "live"))
    keys = {key.split(".")[0] for key, _, _ in diffs}
    if keys & {"sam"}:
        hint = f"pass --sam {run_config.sam!r} (the SAM the {kind}'s cache was built with)"
    elif keys <= {"compute_dtype"}:
        hint = f"pass --dtype {recorded.get('compute_dtype')}"
    else:
        hint = f"pass --mllm PATH to the checkpoint the {kind}'s cache was built with ({recorded.get('name_or_path', '?')})"
    raise UserError(f"the live backbone is not the one {kind} {run_dir} was trained on ({detail}): {hint}")


def feature_sample(features: ImageFeatures, question: int, layer: int, sam_channels: int,
                   image_states: torch.Tensor | None = None) -> dict[str, Any]:
    """One query's sample from live features, as :meth:`QueryDataset.__getitem__` gives a cached one.

    Each tensor goes through the cache builder's float16 conversion (the head was trained on float16
    features). There is no ground truth: ``gt`` is an empty (0, 0) tensor.

    Args:
        features: ``extract`` output for one image.
        question: which of its questions.
        layer: the head's MLLM layer; sam_channels: C of its SAM embeddings (256 for SAM, 64 for the toy SAM).
        image_states: the image's converted (L_i, d) float16 states, to convert them once per image.
    """
    import torch  # heavy: see the note on imports at the top
    from lens_cache.store import require_layer, sam_embedding_shape, to_float16

    require_layer(features.image_states, layer, holder="the live backbone")
    if image_states is None:
        states = features.image_states[layer]
        image_states = torch.from_numpy(to_float16(states, tuple(states.shape), "live image states"))
    text_states = features.text_states[question][layer]
    prefix = features.prefix_states.get(layer)
    return {
        "image_states": image_states,
        "text_states": torch.from_numpy(to_float16(text_states, tuple(text_states.shape), "live text states")),
        "sam_embedding": torch.from_numpy(
            to_float16(features.sam_embedding, sam_embedding_shape(sam_channels), "live SAM embedding")),
        "gt": torch.zeros((0, 0), dtype=torch.uint8),
        # The store keeps sizes as int32 and hands them out as int64: same values here.
        "original_size": torch.tensor(features.original_size, dtype=torch.int64),
        "input_size": torch.tensor(features.input_size, dtype=torch.int64),
        "query_id": -1, "store_index": 0, "task": "interactive", "dataset": "live", "is_sentence": True,
        # the prompt's tokens before the image, as the store keeps them (float16); absent for adapters without
        "prefix_states": (torch.from_numpy(to_float16(prefix, tuple(prefix.shape), "live prefix states"))
                          if prefix is not None else None),
    }


def features_to_batch(features: ImageFeatures, layer: int, sam_channels: int) -> Batch:
    """The batch of one live query (the image's first question), exactly as the loader gives a cached one.

    Returns:
        Batch with image_states (1, L_i, d), text_states (1, L_t, d), sam_embeddings (1, C, 64, 64),
        all float16 on the CPU.
    """
    from ..training.data import collate

    return collate([feature_sample(features, 0, layer, sam_channels)])


def _item(item: Any, position: int) -> tuple[Any, str, bool]:
    """(image, instruction, is_sentence) of one :meth:`Segmenter.batch` item (a tuple or a dict)."""
    if isinstance(item, dict):
        image, instruction, is_sentence = item.get("image"), item.get("instruction"), not item.get("phrase", False)
    elif isinstance(item, (tuple, list)) and len(item) in (2, 3):
        image, instruction, is_sentence = item[0], item[1], bool(item[2]) if len(item) == 3 else True
    else:
        raise UserError(f"item {position}: give (image, instruction), (image, instruction, is_sentence) or "
                        "{'image': ..., 'instruction': ...}")
    if image is None:
        raise UserError(f"item {position}: no image")
    try:
        check_instruction(instruction)
    except UserError as error:
        raise UserError(f"item {position}: {error}") from None
    return image, instruction, is_sentence


def _image_key(image: Any) -> tuple[str, Any]:
    """Items with equal keys are one image (a path, however written; or the same PIL object)."""
    if isinstance(image, Image.Image):
        return ("pil", id(image))
    text = str(image)
    return ("url", text) if "://" in text else ("path", str(Path(text).expanduser().resolve()))


class Segmenter:
    """A trained LENS head attached to its live frozen backbones (MLLM + SAM image encoder).

    Build it once (:meth:`from_pretrained`) and call it per request; the agent
    (``lens_train.inference.agent``) shares its MLLM for dialogue.

    Args:
        run_dir: a run folder (lens-train), a model folder (lens-export-model), ``toy`` or a Hub id.
        extractor: a ready ``LensFeatureExtractor`` to use (tests, the agent); None builds one.
        mllm: MLLM checkpoint folder / HF-cache name or ``tiny``; default: the one recorded
            in the head's backbone identity.
        sam: SAM spec (``tiny`` / ``vit_h:PATH``); default: the recorded SAM.
        device: ``cpu`` / ``cuda``; default CUDA when available (with ``extractor``: its device).
        dtype: compute dtype of the backbones; default: the one the cache was built with
            (it is part of the identity: bf16 and fp32 features differ).
        threshold: default mask threshold; None: the head's (its preset's) threshold.
    Raises:
        UserError: no checkpoint there, or the backbone is not the head's (MissingLayerError,
            a StoreError: it does not compute the head's layer).
        FileNotFoundError: an MLLM or SAM checkpoint is missing (one-line message).
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        extractor: LensFeatureExtractor | None = None,
        mllm: str | None = None,
        sam: str | None = None,
        device: str | torch.device | None = None,
        dtype: str | None = None,
        threshold: float | None = None,
    ) -> None:
        import torch  # heavy: see the note on imports at the top
        from lens_cache.backbones.runtime import resolve_device
        from lens_cache.store import require_layer

        from ..training.loading import load_run
        from ..training.model_folder import open_trained

        self.trained = open_trained(run_dir)
        self.run_dir = self.trained.path
        self.config = self.trained.config
        self.layer = self.config.layer
        recorded = self.config.stores[0].identity
        name = str(run_dir)
        if extractor is None:
            dev = resolve_device(str(device) if device is not None else None)
        else:
            dev = torch.device(extractor.mllm.device) if hasattr(extractor.mllm, "device") else torch.device("cpu")
        self.threshold = check_threshold(self.config.train.threshold if threshold is None else threshold)
        if extractor is None and mllm is None and sam is None:
            # The head's own backbones: its weights first, so a missing file fails in a second, not after
            # loading a 7B MLLM.
            self.run: LoadedRun = load_run(self.trained, device=dev, sam=sam)
            extractor = self._build_extractor(recorded, mllm=mllm, sam=sam, device=dev, dtype=dtype)
            check_backbone(extractor.identity, self.config, name, kind=self.trained.kind)
        else:
            # Other backbones named: the identity check first, before a model is built for a SAM it may not fit.
            if extractor is None:
                extractor = self._build_extractor(recorded, mllm=mllm, sam=sam, device=dev, dtype=dtype)
            check_backbone(extractor.identity, self.config, name, kind=self.trained.kind)
            self.run = load_run(self.trained, device=dev, sam=sam)
        self.device = dev
        require_layer(extractor.layers, self.layer, holder="the live backbone",
                      fix=f"build it with layer {self.layer}, the layer {name} was trained on")
        self.extractor = extractor

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        mllm: str | None = None,
        sam: str | None = None,
        device: str | torch.device | None = None,
        dtype: str | None = None,
        *,
        threshold: float | None = None,
        extractor: LensFeatureExtractor | None = None,
    ) -> Segmenter:
        """The segmenter of ``path``: a run folder, a model folder, ``"toy"`` or a Hub model id.

        The backbones are the recorded ones unless ``mllm`` / ``sam`` name others (checked: features of
        another backbone are refused in one line). See the class for the arguments.
        """
        return cls(path, extractor=extractor, mllm=mllm, sam=sam, device=device, dtype=dtype, threshold=threshold)

    def _build_extractor(self, recorded: dict, *, mllm: str | None, sam: str | None, device: torch.device,
                         dtype: str | None) -> LensFeatureExtractor:
        from lens_cache.backbones import build_extractor  # heavy: see the note on imports at the top
        from lens_cache.questions import question_set_of

        mllm = mllm or recorded.get("name_or_path")
        if not mllm:
            raise UserError(
                f"{self.run_dir} was trained on a cache whose backbone cannot be rebuilt live "
                f"({recorded.get('backbone') or recorded.get('mllm', 'unknown')}): pass --mllm PATH"
            )
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

    @property
    def sam_channels(self) -> int:
        return self.run.model.config.prompt_dim

    def features(self, image: Image.Image, question: str) -> Batch:
        """The batch of one live query (see :func:`features_to_batch`)."""
        features = self.extractor.extract_one(image, question)
        return features_to_batch(features, self.layer, self.sam_channels)

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
        threshold = self.threshold if threshold is None else check_threshold(threshold)
        check_instruction(instruction)
        return self._run([(load_image(image), [(instruction, is_sentence)])], threshold)[0]

    __call__ = segment

    def batch(
        self,
        items: Iterable[Any],
        *,
        batch_size: int = 8,
        threshold: float | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[SegmentResult]:
        """Segment many (image, instruction) pairs; results in the order of ``items``.

        Items about the same image (the same path, however written, or the same PIL object) are one
        group: the image is read once and its MLLM image prefix and SAM embedding run once for all its
        instructions. Each result equals :meth:`segment` of its pair up to float rounding (images run
        batched through the backbones).

        Args:
            items: ``(image, instruction)``, ``(image, instruction, is_sentence)`` or
                ``{"image": ..., "instruction": ..., "phrase": bool}``.
            batch_size: distinct images per backbone forward (each with all its instructions).
            progress: called ``progress(done, total)`` (items) after each forward.
        Raises:
            UserError: an item without an image, with an empty instruction or a missing image file
                (checked before anything runs), or an image that cannot be read (one line, naming the item).
        """
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        threshold = self.threshold if threshold is None else check_threshold(threshold)
        parsed = [_item(item, i) for i, item in enumerate(items)]
        groups: dict[tuple[str, Any], list[int]] = {}
        for i, (image, _, _) in enumerate(parsed):
            key = _image_key(image)
            if key[0] == "path" and key not in groups and not Path(key[1]).is_file():
                raise UserError(f"item {i}: image not found: {image}")  # before anything runs
            groups.setdefault(key, []).append(i)
        order = list(groups.values())
        results: list[SegmentResult | None] = [None] * len(parsed)
        done = 0
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            images = []
            for members in chunk:
                try:
                    images.append(load_image(parsed[members[0]][0]))
                except AnyUserError as error:
                    raise UserError(f"item {members[0]}: {error}") from None
            asked = [(rgb, [parsed[i][1:] for i in members]) for rgb, members in zip(images, chunk)]
            for i, result in zip((i for members in chunk for i in members), self._run(asked, threshold)):
                results[i] = result
            done += sum(len(members) for members in chunk)
            if progress is not None:
                progress(done, len(parsed))
        return results  # type: ignore[return-value]

    def _run(self, asked: Sequence[tuple[Image.Image, Sequence[tuple[str, bool]]]], threshold: float) -> list[SegmentResult]:
        """One backbone forward for ``asked`` (RGB image, its (instruction, is_sentence) list), one head forward
        for all their queries; the results in that order."""
        import torch  # heavy: see the note on imports at the top
        from lens_cache.store import to_float16

        from ..evaluation.evaluate import predict
        from ..training.data import collate
        from .large_images import upsampled_mask

        questions = []  # per image: its distinct questions; rows: (image index, question index, instruction)
        rows: list[tuple[int, int, str]] = []
        for b, (_, pairs) in enumerate(asked):
            distinct: dict[str, int] = {}
            for instruction, is_sentence in pairs:
                question = self.extractor.question_for(instruction, is_sentence)
                rows.append((b, distinct.setdefault(question, len(distinct)), instruction))
            questions.append(list(distinct))
        features = self.extractor.extract([rgb for rgb, _ in asked], questions)
        image_states = [
            torch.from_numpy(to_float16(f.image_states[self.layer], tuple(f.image_states[self.layer].shape),
                                        "live image states")) if self.layer in f.image_states else None
            for f in features
        ]
        samples = [feature_sample(features[b], q, self.layer, self.sam_channels, image_states[b]) for b, q, _ in rows]
        batch = collate(samples).to(self.device)
        output, logits = predict(self.run.model, batch, precision=self.run.precision)
        results = []
        for r, (b, q, instruction) in enumerate(rows):
            logit = logits[r].float().cpu()
            probability = torch.sigmoid(logit)
            full_size = original_size_of(asked[b][0])  # larger than the working image: the mask goes back to it
            mask = ((probability > threshold).numpy() if full_size == tuple(logit.shape)
                    else upsampled_mask(logit, full_size, threshold))
            results.append(SegmentResult(
                mask=mask,
                probability=probability.numpy(),
                logits=logit,
                heatmap=output.heatmap[r].float().cpu(),
                points=output.points[r].float().cpu(),
                valid=output.valid[r].cpu(),
                used=output.used[r].cpu(),
                iou_prediction=float(output.iou_predictions[r]),
                image=asked[b][0],
                instruction=instruction,
                question=questions[b][q],
                threshold=threshold,
                input_size=tuple(int(v) for v in batch.input_sizes[r]),
                original_size=tuple(int(v) for v in batch.original_sizes[r]),
                full_size=full_size,
            ))
        return results


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
    extractor: LensFeatureExtractor | None = None,
) -> SegmentResult:
    """One-shot :class:`Segmenter` (loads the head and the backbones, segments once).

    The instruction and the image are checked before anything is loaded, so a bad one
    fails at once. See :class:`Segmenter` and :meth:`Segmenter.segment` for the arguments.
    """
    check_instruction(instruction)
    rgb = load_image(image)
    segmenter = Segmenter(run_dir, extractor=extractor, mllm=mllm, sam=sam, device=device, dtype=dtype,
                          threshold=threshold)
    return segmenter.segment(rgb, instruction, is_sentence=is_sentence)
