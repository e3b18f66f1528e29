"""The authors' checkpoints: strict key mapping, conversion into a run folder, parity of the outputs.

A checkpoint is made with their key names and shapes (tests/helpers/authors_reference.py, from the facts
of their train.py / conditioner.py / decoder.py), converted with ``lens-convert authors``, loaded with
``load_run``, and run on their kind of input (the whole layer-k sequence with its masks); its heatmap,
keypoints and mask logits must equal a recomputation of their forward written from those facts.
"""

import dataclasses
import json

import pytest
import torch
from typer.testing import CliRunner

from lens_cache.errors import UsageError
from lens_train.training.loading import load_run
from lens_train.interop.authors import KEY_MAP, convert_state_dict, lens_inputs_from_sequence, our_key, read_checkpoint
from lens_train.interop.cli import app
from lens_train.training.presets import load_preset
from lens_train.training.loading import build_model

from tests.helpers.authors_reference import authors_forward, authors_state_dict

TINY = load_preset("tiny")
SWITCHES = {key: value for key, value in json.loads(
    (load_preset.__globals__["PRESET_DIR"] / "official.json").read_text())["model"].items()
    if key in ("head_input", "final_norm", "descriptor", "global_only_after_descriptor", "coords", "keypoint_strict",
               "detach_subpixel", "cls_position_std", "train_iou_head")}
CONFIG = dataclasses.replace(TINY.model, rms_norm_eps=1e-6, final_norm_eps=1e-6, **SWITCHES)


@pytest.fixture(scope="module")
def preset_file(tmp_path_factory):
    """The tiny preset with the official preset's structure (the authors' checkpoints need it)."""
    raw = json.loads((load_preset.__globals__["PRESET_DIR"] / "tiny.json").read_text())
    raw["model"] = dataclasses.asdict(CONFIG)
    raw["made_for"] = None
    path = tmp_path_factory.mktemp("preset") / "tiny-official.json"
    path.write_text(json.dumps(raw))
    return path


@pytest.fixture(scope="module")
def theirs(tiny_sam):
    return authors_state_dict(CONFIG, tiny_sam, seed=3)


@pytest.fixture(scope="module")
def converted_run(tmp_path_factory, theirs, preset_file):
    folder = tmp_path_factory.mktemp("authors")
    ckpt = folder / "full_7.pth"
    torch.save(theirs, ckpt)
    out = folder / "run"
    result = CliRunner().invoke(app, ["authors", str(ckpt), "--out", str(out), "--mllm", "tiny", "--sam", "tiny",
                                      "--preset", str(preset_file), "--layer", str(TINY.main_layer)])
    assert result.exit_code == 0, result.output
    return out


def test_every_key_of_theirs_maps_once_and_fills_every_trainable_tensor(tiny_sam, theirs):
    model = build_model(CONFIG, "tiny", seed=0)
    converted = convert_state_dict(theirs, model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(converted) == trainable and len(converted) == len(theirs)
    assert our_key("conditioner.conditioning_module.cls_token_pos") == "prompt_decoder.cls_position"
    assert not any(k.startswith("prompt_decoder.mask_decoder.iou_prediction_head") for k in trainable)
    assert {p for p, _ in KEY_MAP} >= {"net.visual_model.mask_decoder.", "conditioner.conditioning_module.fusion_model.norm."}


def test_mapping_is_strict(theirs):
    model = build_model(CONFIG, "tiny", seed=0)
    less = dict(theirs)
    less.pop("conditioner.conditioning_module.norm2.bias")
    with pytest.raises(UsageError, match=r"left empty: descriptor.ffn_norm.bias"):
        convert_state_dict(less, model)
    more = {**theirs, "conditioner.conditioning_module.i_proj.weight": torch.zeros(1)}
    with pytest.raises(UsageError, match="no rule maps: conditioner.conditioning_module.i_proj.weight"):
        convert_state_dict(more, model)
    iou = {**theirs, "net.visual_model.mask_decoder.iou_prediction_head.layers.0.weight": torch.zeros(1)}
    with pytest.raises(UsageError, match="no rule maps"):  # their IoU head is frozen: never in a checkpoint
        convert_state_dict(iou, model)
    wide = {**theirs, "conditioner.conditioning_module.cls_token_pos": torch.zeros(1, 1, 128)}
    with pytest.raises(UsageError, match=r"prompt_decoder.cls_position is \(1, 1, 128\)"):
        convert_state_dict(wide, model)
    paper = build_model(dataclasses.replace(CONFIG, descriptor="paper"), "tiny", seed=0)
    with pytest.raises(UsageError, match="need the official structure"):
        convert_state_dict(theirs, paper)


def test_unsafe_or_foreign_files_are_refused(tmp_path):
    import os

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    evil = tmp_path / "full_1.pth"
    torch.save({"x": Evil()}, evil)
    with pytest.raises(UsageError, match="not a readable torch checkpoint"):
        read_checkpoint(evil)
    nested = tmp_path / "full_2.pth"
    torch.save({"model": {"a": torch.zeros(1)}}, nested)
    with pytest.raises(UsageError, match="flat dict of tensors"):
        read_checkpoint(nested)
    with pytest.raises(UsageError, match="not found"):
        read_checkpoint(tmp_path / "absent.pth")


def test_converted_run_holds_their_tensors(converted_run, theirs):
    run = load_run(converted_run)
    assert run.step == 7 and run.config.preset == "tiny-official" and run.config.model == CONFIG
    assert run.config.stores[0].identity["name_or_path"] == "tiny"
    params = dict(run.model.named_parameters())
    for key, tensor in theirs.items():
        torch.testing.assert_close(params[our_key(key)].detach(), tensor.float(), rtol=0, atol=0)


def test_converted_run_computes_what_their_code_computes(converted_run, theirs, tiny_sam):
    run = load_run(converted_run)
    g = torch.Generator().manual_seed(5)
    prefix, text = 6, 9
    hidden = torch.randn(1, prefix + 576 + text, CONFIG.hidden_size, generator=g)
    image_mask = torch.zeros(1, hidden.shape[1], dtype=torch.bool)
    image_mask[0, prefix : prefix + 576] = True
    text_mask = torch.zeros_like(image_mask)
    text_mask[0, prefix + 576 :] = True
    sam_embedding = torch.randn(1, 256, 64, 64, generator=g)

    inputs = lens_inputs_from_sequence(hidden, torch.ones_like(image_mask, dtype=torch.long), image_mask, text_mask)
    assert inputs.prefix_states.shape == (1, prefix, CONFIG.hidden_size) and inputs.text_lengths.tolist() == [text]
    with torch.no_grad():
        ours = run.model(inputs.image_states, inputs.text_states, inputs.text_lengths, sam_embedding,
                         prefix_states=inputs.prefix_states)
    ref = authors_forward(theirs, tiny_sam, hidden, image_mask, text_mask, sam_embedding, heads=CONFIG.num_heads,
                          mlp=CONFIG.mlp_size, descriptor_heads=CONFIG.descriptor_heads)
    torch.testing.assert_close(ours.heatmap[0], ref["heatmap"], atol=1e-5, rtol=1e-4)
    assert torch.equal(ours.valid[0], ref["valid"]) and int(ref["valid"].sum()) >= 2
    torch.testing.assert_close(ours.points[0][ours.valid[0]], ref["points"][ref["valid"]], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours.low_res_logits[0], ref["low_res"], atol=1e-4, rtol=1e-4)


def test_sequence_cutting_handles_left_padding():
    hidden = torch.arange(2 * 12 * 2, dtype=torch.float32).view(2, 12, 2)
    attention = torch.tensor([[1] * 12, [0, 0] + [1] * 10])
    image = torch.zeros(2, 12, dtype=torch.bool)
    image[0, 3:7], image[1, 5:9] = True, True
    text = torch.zeros_like(image)
    text[0, 7:], text[1, 9:] = True, True
    cut = lens_inputs_from_sequence(hidden, attention, image, text)
    assert cut.prefix_states.shape == (2, 3, 2) and cut.text_lengths.tolist() == [5, 3]
    torch.testing.assert_close(cut.prefix_states[1], hidden[1, 2:5])
    torch.testing.assert_close(cut.text_states[1, :3], hidden[1, 9:])
    bad = image.clone()
    bad[0, 5] = False
    with pytest.raises(UsageError, match="not one run"):
        lens_inputs_from_sequence(hidden, attention, bad, text)


def test_convert_refuses_a_non_empty_out(tmp_path, theirs, preset_file):
    ckpt = tmp_path / "full_1.pth"
    torch.save(theirs, ckpt)
    out = tmp_path / "run"
    out.mkdir()
    (out / "something").write_text("x")
    result = CliRunner().invoke(app, ["authors", str(ckpt), "--out", str(out), "--mllm", "tiny", "--sam", "tiny",
                                      "--preset", str(preset_file)])
    assert result.exit_code == 2 and "not empty" in result.output and (out / "something").exists()


def test_a_converted_run_segments_live(converted_run, tmp_path):
    """lens-segment takes the converted run: its recorded backbone is rebuilt live (tiny here), the identity
    check passes, and the head reads the live prefix."""
    from PIL import Image

    from lens_train.inference.segmenter import Segmenter

    segmenter = Segmenter(converted_run, device="cpu")
    image = Image.new("RGB", (40, 30), (200, 30, 30))
    result = segmenter.segment(image, "red square", is_sentence=False)
    assert result.mask.shape == (30, 40)
    assert segmenter.run.model.config.head_input == "full_sequence"
