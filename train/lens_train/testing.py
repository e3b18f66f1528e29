"""Test helpers of stage 2: small real feature stores in seconds.

:func:`fake_tiny_extractor` is stage 1's deterministic ``FakeExtractor`` at the tiny
preset's width (d=64) with the tiny SAM recorded in its identity, so ``lens-train
--preset tiny`` accepts its stores and rebuilds the right SAM. Its features come from
the pixels (image tokens and SAM embedding: a fixed projection of the colours) and the
question text, so the synthetic shapes are learnable. :func:`build_store` writes such
a store from a manifest with the real ``lens_cache.build.build_cache``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pyarrow as pa

TINY_SAM_IDENTITY = {"variant": "tiny", "weights": "tiny-seed0", "compute_dtype": "float32"}


def fake_tiny_extractor(
    *, hidden_size: int = 64, mllm: str = "fake-mllm", prompt_template: str | None = None, grounded: bool = False,
    sam: str | None = None, layers: tuple[int, ...] = (14,), identity: dict | None = None, grid_size: int = 24,
    prefix_tokens: int = 0, question_set: str | None = None,
):
    """A ``lens_cache.testing.FakeExtractor`` of width ``hidden_size`` whose identity names the tiny SAM.

    ``layers`` are the layers it computes; ``identity`` adds or replaces identity fields (e.g. a
    real MLLM's ``name_or_path`` and ``weights_fingerprint``, to test what compares).

    ``grounded=True`` replaces the per-question noise of the text states with a sum of
    fixed per-word vectors, so the same word means the same thing in every query (as in a
    trained MLLM) and a colour word can be matched with the image tokens' colours.
    ``sam="toy"`` (any SAM spec) replaces the fake SAM embedding by that SAM's real one:
    planted MLLM features with a real SAM isolate the downstream half of LENS.
    ``prefix_tokens`` > 0 gives the prompt that many tokens before the image, whose states the store keeps;
    ``question_set`` (``authors``) caches every question template of a query, not one.
    """
    from lens_cache.testing import FAKE_PROMPT, FakeExtractor

    cls = _grounded_class() if grounded else FakeExtractor
    if sam is not None:
        cls = _real_sam_class(cls)
    extractor = cls(hidden_size=hidden_size, mllm=mllm, prompt_template=prompt_template or FAKE_PROMPT, layers=layers,
                    grid_size=grid_size, prefix_tokens=prefix_tokens, question_set=question_set)
    extractor.identity["sam"] = dict(TINY_SAM_IDENTITY)
    extractor.identity.update(identity or {})
    if sam is not None:
        extractor.attach_sam(sam)
    if grounded:
        extractor.identity["mllm"]["text"] = "bag-of-words"
    return extractor


def _real_sam_class(base):
    class RealSamExtractor(base):
        """The fake MLLM features with a real SAM's image embeddings."""

        def attach_sam(self, spec: str) -> None:
            from lens_cache.backbones.sam import SamImageEncoder

            self.sam_encoder = SamImageEncoder.from_spec(spec, device="cpu", dtype="float32")
            self.sam_channels = self.sam_encoder.channels
            self.identity["sam"] = dict(self.sam_encoder.identity)

        def extract(self, images, questions):
            from lens_cache.backbones.geometry import sam_frame

            features = super().extract(images, questions)
            embeddings = self.sam_encoder.embed([sam_frame(image) for image in images])
            for feature, embedding in zip(features, embeddings):
                feature.sam_embedding = embedding
            return features

    return RealSamExtractor


def _word_vector(word: str, dim: int):
    import zlib

    import numpy as np

    return np.random.default_rng(zlib.crc32(word.lower().strip(".,?!").encode())).standard_normal(dim).astype("float32")


def _grounded_class():
    from lens_cache.testing import FakeExtractor

    class GroundedFakeExtractor(FakeExtractor):
        """FakeExtractor whose text state t is the running mean of the first t+1 word vectors."""

        def extract(self, images, questions):
            import numpy as np
            import torch

            features = super().extract(images, questions)
            for feature, image_questions in zip(features, questions):
                for states, question in zip(feature.text_states, image_questions):
                    length = next(iter(states.values())).shape[0]
                    words = (question.split() + ["ASSISTANT:"] * length)[:length]
                    vectors = np.stack([_word_vector(w, self.hidden_size) for w in words])
                    running = np.cumsum(vectors, axis=0) / np.arange(1, length + 1)[:, None]
                    for layer in states:
                        states[layer] = torch.from_numpy(running.astype(np.float32) + layer / 100.0)
            return features

    return GroundedFakeExtractor



def build_store(manifest: pa.Table, url: str | Path, *, spec: str = "test", block_size: int = 8, **extractor_kwargs):
    """Build a complete store from ``manifest`` with :func:`fake_tiny_extractor` (serial, quiet)."""
    from lens_cache.build import build_cache

    factory = functools.partial(fake_tiny_extractor, **extractor_kwargs)
    return build_cache(manifest, str(url), factory, spec=spec, block_size=block_size, progress=False, overwrite=True)


def small_synthetic(root: str | Path, *, images: int = 6, seed: int = 0) -> Path:
    """A small synthetic dataset (``images`` per split and set) under ``root``; idempotent."""
    from lens_manifests import write_synthetic

    write_synthetic(root, seed=seed, num_train_images=images, num_val_images=images, num_test_images=2, workers=1)
    return Path(root)

