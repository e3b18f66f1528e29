import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_sam():
    """The tiny SAM built in code with the real segment_anything classes (same as stage 1's)."""
    from lens_cache.backbones.sam import build_sam

    return build_sam("tiny")
