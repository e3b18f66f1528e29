"""lens-serve's request functions without a browser: good input, every kind of bad input, the chat, the app.

The model is the tiny real run of ``tiny_real_run`` (conftest); the browser test is
tests/test_serve_browser.py.
"""

from __future__ import annotations

import logging
import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import lens_train.inference.serve as serve
from lens_cache.errors import UserError  # the base of every one-line error (ImageReadError too)
from lens_train.inference.serve import MAX_INSTRUCTION_CHARS, DemoBackend, app, build_app, open_segmenter


def png_header_only(path, width: int, height: int) -> None:
    """A PNG file that declares ``width`` x ``height`` (8-bit gray) with almost no pixel data: instant to
    write, and only a reader that checks the header before decoding refuses it for its size."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(width + 1)))
                     + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def backend(segmenter, tmp_path_factory):
    return DemoBackend(segmenter, work_dir=tmp_path_factory.mktemp("serve"))


def test_segment_request_shows_the_python_apis_result(backend, segmenter, tiny_real_run):
    text, _ = tiny_real_run.query(0)
    path = tiny_real_run.image_path(0)
    overlay, heatmap, score, area, mask_file, status = backend.segment_request({"path": path}, text)
    expected = segmenter.segment(path, text)
    image = Image.open(path)
    mask = np.asarray(Image.open(mask_file))
    assert mask.shape == (image.height, image.width) and set(np.unique(mask)) <= {0, 255}
    assert np.array_equal(mask == 255, expected.mask)
    assert overlay.size == image.size and heatmap.size == image.size
    assert score == round(expected.iou_prediction, 4)
    assert area == round(100 * float(expected.mask.mean()), 3)
    assert status.startswith("score (SAM's predicted IoU)") and "keypoint" in status
    # the heatmap picture carries the keypoints as white dots
    x, y = expected.keypoints_xy[0].round().astype(int)
    assert np.asarray(heatmap)[y, x].tolist() == [255, 255, 255]


def test_an_instruction_at_the_limit_is_served(backend, tiny_real_run):
    instruction = ("segment the hexagons " * 100)[:MAX_INSTRUCTION_CHARS]
    *_, mask_file, status = backend.segment_request(tiny_real_run.image_path(0), instruction)
    assert mask_file is not None, status


@pytest.mark.parametrize("case", ["no image", "empty", "blank", "too long", "not an image", "huge", "missing"])
def test_bad_input_gets_a_message_and_no_result(backend, tiny_real_run, tmp_path, case):
    image, instruction = tiny_real_run.image_path(0), "the hexagons"
    if case == "no image":
        image, expected = None, "no image: upload one"
    elif case == "empty":
        instruction, expected = "", "the instruction is empty"
    elif case == "blank":
        instruction, expected = " \n\t ", "the instruction is empty"
    elif case == "too long":
        instruction, expected = "x" * 10_000, f"the instruction is 10000 characters long; the limit is {MAX_INSTRUCTION_CHARS}"
    elif case == "not an image":
        image = tmp_path / "notes.txt"
        image.write_text("not a picture")
        image, expected = {"path": str(image)}, "cannot read image notes.txt"
    elif case == "huge":
        image = tmp_path / "huge.png"
        png_header_only(image, 20_000, 20_000)
        image, expected = str(image), "huge.png is 20000x20000, above the limit of 16384 px per side"
        with pytest.raises(UserError):  # refused on its header: were it decoded, the backbones would need ~20 GB
            serve.require_image(image)
    else:
        image, expected = str(tmp_path / "gone.png"), "image not found"
    outputs = backend.segment_request(image, instruction)
    assert outputs[:5] == (None, None, None, None, None)
    assert outputs[5].startswith("**error:** ") and expected in outputs[5], outputs[5]
    assert str(tmp_path) not in outputs[5]  # the upload's name, not the server's folders


def test_the_image_side_limit_follows_the_environment(backend, tmp_path, monkeypatch):
    image = tmp_path / "wide.png"
    Image.new("RGB", (40, 20)).save(image)
    monkeypatch.setenv("LENS_MAX_IMAGE_SIDE", "32")
    status = backend.segment_request(str(image), "the hexagons")[5]
    assert "wide.png is 40x20, above the limit of 32 px per side" in status


def test_a_bug_is_logged_with_its_traceback_and_the_page_says_so(tmp_path, caplog):
    class Broken:
        def segment(self, image, instruction):
            raise RuntimeError("kaputt")

    image = tmp_path / "ok.png"
    Image.new("RGB", (8, 8)).save(image)
    with caplog.at_level(logging.ERROR, logger="lens_train.serve"):
        status = DemoBackend(Broken(), work_dir=tmp_path).segment_request(str(image), "anything")[5]
    assert "internal error (RuntimeError: kaputt)" in status and "server's log" in status
    record = next(r for r in caplog.records if r.name == "lens_train.serve")
    assert record.exc_info is not None and record.exc_info[0] is RuntimeError


def test_chat_routes_each_turn_and_keeps_a_memory_per_session(segmenter, tiny_real_run, tmp_path):
    calls = []

    def generate(image, prompt, max_new_tokens):
        calls.append((image, prompt, max_new_tokens))
        return "a reply"

    router = lambda text, has_image, has_memory: "segmentation" if "segment" in text.lower() else (  # noqa: E731
        "followup" if "it" in text.split() else "dialogue")
    backend = DemoBackend(segmenter, work_dir=tmp_path, router=router, generate=generate, max_new_tokens=7)
    text, _ = tiny_real_run.query(0)

    history, state, box, status = backend.chat_request(None, f"Segment {text}", {"path": tiny_real_run.image_path(0)})
    assert (box, status) == ("", "") and history[0] == {"role": "user", "content": f"Segment {text}"}
    assert history[1]["content"].startswith("[segmentation] Sure, the segmentation result is generated.")
    figure = history[2]["content"]["path"]
    assert Image.open(figure).size == Image.open(tiny_real_run.image_path(0)).size
    expected = segmenter.segment(tiny_real_run.image_path(0), f"Segment {text}")
    assert np.array_equal(state.memory.mask, expected.mask)

    history, state, *_ = backend.chat_request(state, "What colour is it ?")
    assert history[-2]["content"] == "[followup] a reply" and calls[-1][2] == 7
    assert calls[-1][0].width == 2 * Image.open(tiny_real_run.image_path(0)).width  # image | overlay

    other = backend.chat_request(None, "What colour is it ?")[1]  # another session: no memory, no image
    assert other.memory is None and other.image is None and other.history[-1]["content"] == "[dialogue] a reply"

    state, status = backend.forget_request(state)
    assert state.memory is None and status == "memory cleared"
    history, state, box, status = backend.chat_request(state, "   ")
    assert box == "   " and "the message is empty" in status and len(history) == 6
    history, state, box, status = backend.chat_request(state, "y" * (MAX_INSTRUCTION_CHARS + 1))
    assert f"the limit is {MAX_INSTRUCTION_CHARS}" in status


def test_the_app_queues_every_model_event_in_one_line(backend):
    demo = build_app(backend, queue_size=5)
    model_events = [fn for fn in demo.fns.values() if fn.concurrency_id == serve.MODEL]
    assert len(model_events) == 4  # segment: button and enter; chat: button and enter
    assert demo._queue.default_concurrency_limit == 1 and demo._queue.max_size == 5
    assert {fn.api_name for fn in model_events} >= {"segment"}
    assert all((serve.EXAMPLES_DIR / name).is_file() for name, _ in serve.EXAMPLES)


def test_open_segmenter_is_from_pretrained_and_the_toy_head_runs_on_the_cpu(monkeypatch):
    """The demo opens its model with Segmenter.from_pretrained; without --device the shipped toy head runs on the
    CPU (its backbones are made for one), another head where torch finds a GPU."""
    import lens_train.inference.segmenter as segment_module

    seen = []

    class Pretrained:
        @classmethod
        def from_pretrained(cls, checkpoint, **kwargs):
            seen.append((checkpoint, kwargs))
            raise SystemExit(0)  # stop the CLI once the model is asked for

    monkeypatch.setattr(segment_module, "Segmenter", Pretrained)
    CliRunner().invoke(app, [])
    CliRunner().invoke(app, ["--checkpoint", "runs/x"])
    assert seen == [("toy", {"mllm": None, "sam": None, "device": "cpu"}),
                    ("runs/x", {"mllm": None, "sam": None, "device": None})]


def test_cli_refuses_a_bad_checkpoint_or_port_in_one_line(tmp_path):
    result = CliRunner().invoke(app, ["--checkpoint", str(tmp_path / "nothing"), "--device", "cpu"])
    assert result.exit_code == 2 and "error:" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(app, ["--port", "70000"])
    assert result.exit_code == 2 and "--port 70000 is not a TCP port" in result.output
