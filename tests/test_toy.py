"""The toy world's pretraining code: scenes, labels, conversations, losses, the resumable loop.

Fast checks only; the shipped weights are tested in test_toy_weights.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lens_toy.conversations import (
    CAPTION_QUESTION, GROUNDING_QUESTION, SEGMENTATION_WORDS, SHORT_ANSWER, box_text, caption, parse_box, turns, vocabulary_words,
)  # fmt: skip
from lens_toy.loop import Schedule, run_stage
from lens_toy.world import HELD_OUT, TRAIN, draw_scene


def test_scenes_are_a_pure_function_of_stream_and_index_and_streams_differ():
    a, b = draw_scene(TRAIN, 3), draw_scene(TRAIN, 3)
    assert np.array_equal(a.frame.resized, b.frame.resized)
    assert not np.array_equal(draw_scene(HELD_OUT, 3).scene.image, a.scene.image)


def test_pretraining_scenes_are_not_dataset_images(tmp_path):
    """The dataset writer's images (seed 0, every set's first val/test images) never equal a toy scene."""
    from lens_manifests.synthetic import _item_rng, make_scene

    toy = {draw_scene(s, i).scene.image.tobytes() for s in (TRAIN, HELD_OUT) for i in range(6)}
    for set_name, rule in (("reason", "cv2"), ("sem", "cv2")):
        for split in ("train", "val", "test"):
            for index in range(6):
                image = make_scene(_item_rng(0, set_name, split, index), rule=rule).image
                assert image.tobytes() not in toy


def test_patch_labels_match_mask_coverage_computed_independently():
    """A labelled cell is >= half covered by a shape of that colour and kind (coverage in numpy)."""
    from lens_toy.world import COLOUR_NAMES, KIND_NAMES

    scene = draw_scene(TRAIN, 11)
    colour, kind = scene.patch_labels(24)
    h, w = scene.frame.original_size
    scale = 1024 / max(h, w)
    for cell in np.nonzero(colour.numpy())[0][:40]:
        gy, gx = divmod(int(cell), 24)
        # centre of the cell, back in original pixels
        x, y = int((gx + 0.5) * 1024 / 24 / scale), int((gy + 0.5) * 1024 / 24 / scale)
        owners = [s for s in scene.shapes if s.mask[min(y, h - 1), min(x, w - 1)]]
        if owners:  # the centre pixel may sit on the boundary of a half-covered cell
            assert COLOUR_NAMES[int(colour[cell]) - 1] == owners[0].colour
            assert KIND_NAMES[int(kind[cell]) - 1] == owners[0].kind
    # coverage: labelled cells are about the shapes' total area in cells
    cells = sum(float(scene.low_res_mask(i, 24).sum()) for i in range(len(scene.shapes)))
    assert abs(int((colour > 0).sum()) - cells) <= 0.35 * cells + 4


def test_conversation_answers_follow_the_scene_graph():
    for index in range(8):
        scene = draw_scene(TRAIN, index)
        for kind, question, answer in turns(scene, np.random.default_rng(index)):
            if kind != "box":  # the short-answer instruction asks for the bare word, else a sentence's end
                assert answer == answer.capitalize() and not answer.endswith(".") if SHORT_ANSWER in question \
                    else answer.endswith(".")
            word = answer.rstrip(".").lower()
            if kind == "colour":
                shape = [s for s in scene.shapes if f" {s.kind}?" in question]
                assert len(shape) == 1 and word == shape[0].colour
            elif kind == "count" and question.startswith("How many shapes are there?"):
                words = ("zero", "one", "two", "three", "four", "five", "six")
                assert word == words[len(scene.shapes)]
            elif kind == "verify" and question.startswith("Is the "):
                shape = [s for s in scene.shapes if question.startswith(f"Is the {s.kind} ")]
                assert len(shape) == 1 and (word == "yes") == (f" {shape[0].colour}?" in question)
            elif kind == "box":
                box = parse_box(answer)
                assert box is not None and all(0 <= v <= 1 for v in box)
                assert question.startswith(GROUNDING_QUESTION.split(":")[0])


def test_toy_data_never_asks_for_masks():
    """LENS's segmentation prompt must not be in the toy LLaVA's training data."""
    for index in range(60):
        scene = draw_scene(TRAIN, index)
        texts = [CAPTION_QUESTION, caption(scene)] + [q + " " + a for _, q, a in turns(scene, np.random.default_rng(index))]
        for text in texts:
            assert not any(word in text.lower().split() or word in text.lower() for word in SEGMENTATION_WORDS), text


def test_box_text_round_trips_and_is_on_the_padded_frame():
    scene = draw_scene(TRAIN, 5)
    x, y, w, h = scene.shapes[0].bbox
    box = parse_box(box_text(scene, 0))
    scale = 1 / max(scene.frame.original_size)
    assert box == pytest.approx((x * scale, y * scale, (x + w) * scale, (y + h) * scale), abs=0.006)
    assert parse_box("[0 . 12 , 0 . 4 , 0 . 31 , 0 . 62]") == (0.12, 0.4, 0.31, 0.62)
    assert parse_box("no box here") is None


def test_toy_tokenizer_knows_every_word_of_the_synthetic_queries():
    from lens_toy.llava import build_toy_processor

    tok = build_toy_processor().tokenizer
    vocab = tok.get_vocab()
    missing = [w for w in vocabulary_words() if w not in vocab]
    assert missing == []
    ids = tok("the shape coloured like a ripe banana", add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids


def test_toy_tokenizer_round_trips_a_box_answer():
    """Without ``[`` and ``]`` in the vocabulary a box answer decodes without its brackets and
    can never be parsed (the first toy LLaVA scored box IoU 0 for that reason)."""
    from lens_toy.llava import build_toy_processor

    tok = build_toy_processor().tokenizer
    scene = draw_scene(HELD_OUT, 11)
    answer = box_text(scene, 0)
    ids = tok(answer, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    assert parse_box(tok.decode(ids, skip_special_tokens=True)) == parse_box(answer)


def test_answer_weights_give_each_answer_equal_weight():
    from lens_toy.llava import answer_weights, lm_loss

    targets = torch.full((2, 12), -100)
    targets[0, 1:4] = 5  # a 3-token answer
    targets[0, 6] = 7  # a 1-token answer
    targets[0, 9:12] = 2  # a 3-token answer that runs to the row's end ...
    targets[1, 0:2] = 3  # ... and is not merged with the next row's 2-token answer
    weights = answer_weights(targets)
    expected = torch.zeros(2, 12)
    expected[0, 1:4], expected[0, 6], expected[0, 9:12], expected[1, 0:2] = 1 / 3, 1.0, 1 / 3, 1 / 2
    torch.testing.assert_close(weights, expected / 4)

    # lm_loss(per_answer=True) is the mean over answers of each answer's mean cross-entropy
    class Model(torch.nn.Module):
        def forward(self, input_ids, attention_mask, pixel_values):
            return type("Out", (), {"logits": pixel_values})()

    logits = torch.randn(2, 13, 9)
    labels = torch.cat([torch.full((2, 1), -100), targets], 1)
    got = lm_loss(Model(), None, labels, None, logits, per_answer=True)
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:].clamp(min=0), reduction="none")
    answers = [ce[0, 1:4].mean(), ce[0, 6], ce[0, 9:12].mean(), ce[1, 0:2].mean()]
    torch.testing.assert_close(got, torch.stack(answers).mean())


def test_focal_loss_matches_torchvision():
    from torchvision.ops import sigmoid_focal_loss

    from lens_toy.sam import focal_loss

    logits, target = torch.randn(3, 2, 16, 16), (torch.rand(3, 2, 16, 16) > 0.7).float()
    ours = focal_loss(logits, target)
    ref = sigmoid_focal_loss(logits, target, reduction="none").mean((-2, -1))
    assert torch.allclose(ours, ref, atol=1e-6)


def test_sam_loss_trains_the_best_of_three_masks_only():
    from lens_toy.sam import sam_loss

    target = torch.zeros(1, 32, 32)
    target[0, 8:24, 8:24] = 1
    good = (target * 20 - 10)[:, None]
    logits = torch.cat([torch.randn(1, 1, 32, 32), good, torch.randn(1, 1, 32, 32)], 1).requires_grad_(True)
    loss, best_iou = sam_loss(logits, torch.zeros(1, 3), target)
    loss.backward()
    assert best_iou.item() == pytest.approx(1.0)
    # the mask term flows to the best mask only (the others get only the IoU head's zero-target gradient: none)
    assert logits.grad[0, 1].abs().sum() > 0
    assert logits.grad[0, 0].abs().sum() == 0 and logits.grad[0, 2].abs().sum() == 0


def _tiny_stage(work, steps, stop_after=None):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)

    def step_fn(step):
        if stop_after is not None and step == stop_after:
            raise KeyboardInterrupt  # a kill between steps
        g = torch.Generator().manual_seed(step)
        x = torch.randn(8, 4, generator=g)
        return {"loss": ((model(x) - x.sum(1, keepdim=True)) ** 2).mean()}

    run_stage("t", model, model.parameters(), step_fn, Schedule(steps=steps, lr=0.05, warmup=2), work,
              ckpt_every=2, log=lambda line: None)
    return model


def test_stage_resumes_after_a_kill_to_the_same_weights(tmp_path):
    straight = _tiny_stage(tmp_path / "a", 10)
    with pytest.raises(KeyboardInterrupt):
        _tiny_stage(tmp_path / "b", 10, stop_after=6)
    resumed = _tiny_stage(tmp_path / "b", 10)
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    assert straight.weight.grad is not None


def test_schedule_warms_up_holds_then_decays():
    s = Schedule(steps=100, lr=1.0, warmup=10, decay_frac=0.2)
    assert s.lr_at(0) == pytest.approx(0.1) and s.lr_at(9) == pytest.approx(1.0)
    assert s.lr_at(50) == 1.0 and s.lr_at(79) == 1.0
    assert s.lr_at(90) == pytest.approx(0.5) and s.lr_at(99) == pytest.approx(0.05)


def test_cell_occupancy_is_the_outline_inside_each_patch():
    """Sub-cells on a shape, computed again from the shape masks with numpy (nearest sampling at sub-cell centres)."""
    scene = draw_scene(TRAIN, 4)
    occ = scene.cell_occupancy(24, 4).numpy().reshape(24, 24, 4, 4)
    h, w = scene.frame.original_size
    scale = 1024 / max(h, w)
    union = np.any(np.stack([s.mask for s in scene.shapes]), axis=0)
    agree, total = 0, 0
    for gy in range(24):
        for gx in range(24):
            for sy in range(4):
                for sx in range(4):
                    x = ((gx * 4 + sx + 0.5) * 1024 / 96) / scale
                    y = ((gy * 4 + sy + 0.5) * 1024 / 96) / scale
                    inside = x < w and y < h and bool(union[int(y), int(x)])
                    agree += inside == bool(occ[gy, gx, sy, sx])
                    total += 1
    assert agree / total > 0.99
    assert occ.sum() > 0
