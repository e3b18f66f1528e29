import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One intra-op thread: on the 2-core CI machine a 2-thread OpenMP team busy-waits against
# pytest, data-loader and writer threads and makes the tiny models 5-50x slower.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_sam():
    """The tiny SAM built in code with the real segment_anything classes (same as stage 1's)."""
    from lens_cache.backbones.sam import build_sam

    return build_sam("tiny")


@pytest.fixture(scope="session")
def tiny_real_run(tmp_path_factory):
    """A run trained 2 steps on a cache built with the REAL tiny LLaVA + tiny SAM (tests/helpers/tiny_real_run.py)."""
    from tests.helpers.tiny_real_run import build_tiny_real_run

    return build_tiny_real_run(tmp_path_factory.mktemp("tiny_real_run"))


@pytest.fixture(scope="module")
def segmenter(tiny_real_run):
    """A Segmenter of the tiny real run, attached to the very extractor that built its cache."""
    from lens_train.inference.segmenter import Segmenter

    return Segmenter(tiny_real_run.run_dir, extractor=tiny_real_run.extractor, device="cpu")


@pytest.fixture(scope="session")
def toy_sam_file(tmp_path_factory):
    """A toy SAM checkpoint as ``lens-toy export`` writes one: ``build_toy_sam(seed=1)``'s state dict, safetensors."""
    from lens_cache.backbones.toy import build_toy_sam
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("toy_sam") / "toy_sam.safetensors"
    save_file(build_toy_sam(seed=1).state_dict(), str(path))
    return path


@pytest.fixture(scope="session")
def toy_sam_store(tmp_path_factory, toy_sam_file):
    """A store cached with the real tiny LLaVA (layers 14 and 30) and a toy SAM: one image, one query (~3 s).

    Returns a namespace: ``store`` (FeatureStore), ``extractor`` (the LensFeatureExtractor
    that built it), ``sam`` (the ``toy:PATH`` spec).
    """
    from types import SimpleNamespace

    from lens_cache.backbones import build_extractor
    from lens_cache.build import build_cache
    from lens_manifests import build_manifest
    from lens_train.testing import small_synthetic

    root = small_synthetic(tmp_path_factory.mktemp("toy_sam_synthetic"), images=2)
    manifest = build_manifest("synthetic-reason:val", root).take([0])
    sam = f"toy:{toy_sam_file}"
    extractor = build_extractor(mllm="tiny", sam=sam, layers=(14, 30), device="cpu")
    store = build_cache(manifest, tmp_path_factory.mktemp("toy_sam_store") / "store", lambda: extractor,
                        spec="synthetic-reason:val", batch_size=1, progress=False)
    return SimpleNamespace(store=store, extractor=extractor, sam=sam)


@pytest.fixture(scope="session")
def fake_stores(tmp_path_factory):
    """lens-train's test stores by role (train, reason, other backbone, incomplete): tests/helpers/fake_stores.py."""
    from tests.helpers.fake_stores import build_fake_stores

    return build_fake_stores(tmp_path_factory)
