"""SAM builder, SAM's frozen image encoder and the shared image geometry."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from segment_anything.utils.transforms import ResizeLongestSide

from lens_cache.backbones.geometry import sam_frame
from lens_cache.backbones.sam import (
    SamCheckpointNotFoundError,
    SamImageEncoder,
    SamSpec,
    build_sam,
    build_tiny_sam,
    parse_sam_spec,
    sam_identity,
)


def test_geometry_non_square_image():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(1, 256, (300, 500, 3), dtype=np.uint8))
    frame = sam_frame(image)
    assert frame.original_size == (300, 500)
    assert frame.input_size == ResizeLongestSide.get_preprocess_shape(300, 500, 1024) == (614, 1024)
    np.testing.assert_array_equal(frame.resized, ResizeLongestSide(1024).apply_image(np.asarray(image)))
    padded = frame.padded()
    assert padded.shape == (1024, 1024, 3) and padded.dtype == np.uint8
    np.testing.assert_array_equal(padded[:614], frame.resized)
    assert not padded[614:].any()  # black padding, bottom only (the long side is the width)
    # Portrait image: padding on the right.
    tall = sam_frame(Image.new("L", (480, 640), color=200))
    assert tall.input_size == (1024, 768) and not tall.padded()[:, 768:].any() and tall.padded()[:, :768].min() == 200


def test_llava_input_is_the_padded_square():
    """The processor's 336 x 336 input shows black (CLIP-normalised 0) where SAM's frame is padding."""
    from lens_cache.backbones.tiny_llava import build_tiny_processor

    processor = build_tiny_processor()
    frame = sam_frame(Image.new("RGB", (500, 300), color=(255, 255, 255)))
    pixels = processor.image_processor(images=[frame.padded_image()], return_tensors="pt")["pixel_values"][0]
    assert pixels.shape == (3, 336, 336)
    mean = torch.tensor(processor.image_processor.image_mean)[:, None, None]
    std = torch.tensor(processor.image_processor.image_std)[:, None, None]
    black = (0 - mean) / std
    first_padded_row = int(np.ceil(614 * 336 / 1024)) + 1  # past the bicubic blend at the border
    torch.testing.assert_close(pixels[:, first_padded_row:], black.expand(3, 336 - first_padded_row, 336), atol=1e-5, rtol=0)
    assert (pixels[:, : 614 * 336 // 1024 - 2] > 0).all()  # white content above


def test_sam_embedding_matches_sam_preprocess_and_encoder(tiny_sam):
    encoder = SamImageEncoder.from_spec("tiny", device="cpu")
    assert encoder.dtype == torch.float32
    frames = [sam_frame(Image.new("RGB", (500, 300), color=(10, 200, 30))), sam_frame(Image.new("RGB", (64, 128)))]
    embeddings = encoder.embed(frames)
    assert embeddings.shape == (2, 256, 64, 64) and embeddings.dtype == torch.float32
    with torch.no_grad():
        pixels = torch.as_tensor(frames[0].resized).permute(2, 0, 1)[None].float()
        expected = tiny_sam.image_encoder(tiny_sam.preprocess(pixels))[0]
    torch.testing.assert_close(embeddings[0], expected, atol=1e-5, rtol=0)
    assert not any(p.requires_grad for p in encoder.sam.parameters())
    assert encoder.identity == {"variant": "tiny", "weights": "tiny-seed0", "compute_dtype": "float32"}


def test_tiny_sam_is_reproducible_and_keeps_global_rng():
    torch.manual_seed(7)
    expected = torch.rand(2)
    torch.manual_seed(7)
    a, b = build_sam("tiny"), build_tiny_sam()
    assert torch.equal(torch.rand(2), expected)
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(ta, tb), name
    # The stage-2 parts keep SAM's interface.
    assert a.prompt_encoder.embed_dim == 256 and a.prompt_encoder.image_embedding_size == (64, 64)
    assert a.mask_decoder.num_multimask_outputs == 3


def test_sam_specs_and_missing_checkpoint(tmp_path):
    assert parse_sam_spec("tiny").variant == "tiny"
    assert parse_sam_spec("vit_h:/ckpt/x.pth").variant == "vit_h"
    assert parse_sam_spec("/ckpt/sam_vit_b_01ec64.pth").variant == "vit_b"
    with pytest.raises(ValueError, match="bad SAM spec"):
        parse_sam_spec("vit_x:/a.pth")
    missing = tmp_path / "sam_vit_h_4b8939.pth"
    with pytest.raises(SamCheckpointNotFoundError) as err:
        build_sam(f"vit_h:{missing}")
    assert str(err.value) == (
        f"SAM checkpoint not found at {missing}: pass --sam vit_h:PATH to a local sam_vit_h_*.pth or 'tiny'"
    )
    with pytest.raises(SamCheckpointNotFoundError):
        sam_identity(f"vit_h:{missing}")


def test_real_variant_loads_strictly(tmp_path):
    """vit_b:PATH builds the registry architecture and refuses a state dict that does not fit it."""
    path = tmp_path / "not_vit_b.pth"
    torch.save(build_tiny_sam().state_dict(), path)
    with pytest.raises(RuntimeError, match="state_dict"):
        build_sam(f"vit_b:{path}")


def test_sam_identity_hashes_the_file_not_its_path(tmp_path):
    path = tmp_path / "a" / "sam_vit_b.pth"
    path.parent.mkdir()
    path.write_bytes(b"x" * 10_000_000)
    ident = sam_identity(f"vit_b:{path}")
    assert ident == {"variant": "vit_b", "weights": "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()}
    moved = tmp_path / "b.pth"
    shutil.copy(path, moved)
    assert sam_identity(f"vit_b:{moved}") == ident
    before = path.stat().st_mtime_ns
    path.write_bytes(b"y" * 10_000_000)  # same size, new content and mtime: recomputed, not served from the cache
    os.utime(path, ns=(before + 10**9, before + 10**9))
    assert sam_identity(f"vit_b:{path}") != ident


def test_toy_spec_loads_its_file_strictly_and_hashes_it(tmp_path, toy_sam_file):
    """toy:PATH is build_toy_sam() with exactly the file's tensors; its identity is the file's sha256."""
    import lens_cache.backbones.toy
    from lens_cache.backbones.toy import build_toy_sam
    from safetensors.torch import save_file

    shipped = Path(lens_cache.backbones.toy.__file__).parent / "toy_weights" / "toy_sam.safetensors"
    assert parse_sam_spec("toy") == SamSpec("toy", shipped)
    assert parse_sam_spec(f"toy:{toy_sam_file}") == SamSpec("toy", toy_sam_file)
    sam, expected = build_sam(f"toy:{toy_sam_file}"), build_toy_sam(seed=1).state_dict()
    assert sam.prompt_encoder.embed_dim == 64 and sam.state_dict().keys() == expected.keys()
    assert all(torch.equal(value, expected[key]) for key, value in sam.state_dict().items())
    truncated = tmp_path / "truncated.safetensors"
    save_file({k: v for k, v in expected.items() if "iou_prediction_head" not in k}, str(truncated))
    with pytest.raises(RuntimeError, match="Missing key"):
        build_sam(f"toy:{truncated}")

    copy = tmp_path / "copy.safetensors"
    shutil.copy(toy_sam_file, copy)
    ident = sam_identity(f"toy:{copy}")
    assert ident == {"variant": "toy", "weights": "sha256:" + hashlib.sha256(toy_sam_file.read_bytes()).hexdigest()}
    before = copy.stat().st_mtime_ns
    save_file(build_toy_sam(seed=2).state_dict(), str(copy))  # other weights: another identity
    os.utime(copy, ns=(before + 10**9, before + 10**9))
    assert sam_identity(f"toy:{copy}")["weights"] != ident["weights"]


def test_missing_toy_weights_is_one_line(tmp_path, monkeypatch):
    import lens_cache.backbones.toy

    monkeypatch.setattr(lens_cache.backbones.toy, "WEIGHTS_DIR", tmp_path)  # the shipped file, absent
    other = tmp_path / "x.safetensors"
    for spec, path in (("toy", tmp_path / "toy_sam.safetensors"), (f"toy:{other}", other)):
        with pytest.raises(SamCheckpointNotFoundError) as err:
            build_sam(spec)
        assert str(err.value) == (
            f"toy SAM weights not found at {path}: run `lens-toy export` "
            "or check out the repository's cache/lens_cache/backbones/toy_weights"
        )
        with pytest.raises(SamCheckpointNotFoundError):
            sam_identity(spec)


def test_toy_sam_store_is_read_and_trained_on_by_stage_2(toy_sam_store, tmp_path):
    """A store cached with the toy SAM holds (N, 64, 64, 64) embeddings; lens-train trains on it with prompt_dim 64."""
    import json

    from lens_cache.store import verify_store
    from lens_train.errors import UserError
    from lens_train.training.trainer import TrainRequest, train

    store = toy_sam_store.store
    assert store.sam_channels == 64 and store.identity["sam"]["variant"] == "toy"
    assert store.array("images/sam").shape == (1, 64, 64, 64) and store.array("images/sam").chunks == (1, 64, 64, 64)
    assert store.read_query(0, 14)["sam_embedding"].shape == (64, 64, 64)
    assert verify_store(store.url).ok

    fast = {"steps": 2, "batch_size": 1, "grad_accum": 1, "num_workers": 0, "warmup_steps": 1}
    request = TrainRequest(caches=(store.url,), out=tmp_path / "run", preset="tiny", model_overrides={"prompt_dim": 64},
                           train_overrides=fast, sam=toy_sam_store.sam, device="cpu", quiet=True)
    result = train(request)
    assert result.steps == 2 and np.isfinite(result.final_loss)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model"]["prompt_dim"] == 64 and config["sam"] == toy_sam_store.sam
    with pytest.raises(UserError, match="64-channel SAM embeddings but preset 'tiny' has prompt_dim 256"):
        train(TrainRequest(caches=(store.url,), out=tmp_path / "refused", preset="tiny", train_overrides=fast,
                           sam=toy_sam_store.sam, device="cpu", quiet=True))
