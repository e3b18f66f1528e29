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
    """A run trained 2 steps on a cache built with the REAL tiny LLaVA + tiny SAM (lens_train.testing_real)."""
    from lens_train.testing_real import build_tiny_real_run

    return build_tiny_real_run(tmp_path_factory.mktemp("tiny_real_run"))


@pytest.fixture(scope="module")
def segmenter(tiny_real_run):
    """A Segmenter of the tiny real run, attached to the very extractor that built its cache."""
    from lens_train.segment import Segmenter

    return Segmenter(tiny_real_run.run_dir, extractor=tiny_real_run.extractor, device="cpu")
