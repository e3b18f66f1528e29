"""The LENS agent (supplement S2, Algorithm S1): routing, memory, follow-ups, lens-chat.

Routing decisions are stubbed (``router=``) and so is generation where a test is about
the flow (``generate=`` records what the MLLM would see); one test routes and generates
with the real tiny LLaVA. Segmentation always runs the real run of ``tiny_real_run``.
"""

from __future__ import annotations


import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import lens_train.inference.agent as agent_module
import lens_train.inference.chat as chat_module
from lens_train.inference.agent import (
    FOLLOWUP_PROMPT,
    NO_IMAGE_REPLY,
    ROUTER_MAX_NEW_TOKENS,
    SEGMENTATION_REPLY,
    LensAgent,
    heuristic_intent,
    parse_intent,
    router_prompt,
    side_by_side,
)


@pytest.fixture()
def image(tiny_real_run) -> Image.Image:
    return Image.open(tiny_real_run.image_path(0)).convert("RGB")


class ScriptedRouter:
    """A router stub: answers from a table by instruction, records every call."""

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers = answers
        self.calls: list[tuple[str, bool, bool]] = []

    def __call__(self, instruction: str, has_image: bool, has_memory: bool) -> str:
        self.calls.append((instruction, has_image, has_memory))
        return self.answers[instruction]


class RecordingGenerator:
    """A generate() stub: records (image, prompt, max_new_tokens), answers 'answer N'."""

    def __init__(self) -> None:
        self.calls: list[tuple[Image.Image | None, str, int]] = []

    def __call__(self, image, prompt, max_new_tokens=64):
        self.calls.append((image, prompt, max_new_tokens))
        return f"answer {len(self.calls)}"


# ----------------------------------------------------------------------------- parsing and rules


@pytest.mark.parametrize(
    "answer, intent",
    [
        ("dialogue", "dialogue"),
        ("Dialog.", "dialogue"),
        ("Intent: Follow-up", "followup"),
        ("follow up", "followup"),
        ("FOLLOWUP", "followup"),
        ("follow_up please", "followup"),
        ("Segmentation", "segmentation"),
        ("seg", "segmentation"),
        (" segment it ", "segmentation"),
        ("segmentation, not dialogue", "segmentation"),
        ("just chat", "dialogue"),
        ("the segmented object", None),
        ("every every every", None),
        ("", None),
    ],
)
def test_parse_intent(answer, intent):
    assert parse_intent(answer) == intent


@pytest.mark.parametrize(
    "instruction, has_memory, intent",
    [
        ("Segment the red circle.", False, "segmentation"),
        ("Can you segment the thing used to cut bread?", True, "segmentation"),
        ("Where is the dog?", False, "segmentation"),
        ("What colour is the segmented object?", True, "followup"),
        ("What colour is the segmented object?", False, "dialogue"),
        ("Is it bigger than the car?", True, "followup"),
        ("Is it bigger than the car?", False, "dialogue"),
        ("Does the mask cover the whole animal?", True, "followup"),
        ("Tell me a story about the sea.", True, "dialogue"),
        ("hello", False, "dialogue"),
    ],
)
def test_heuristic_intent(instruction, has_memory, intent):
    assert heuristic_intent(instruction, has_image=True, has_memory=has_memory) == intent


def test_router_prompt_says_what_is_impossible():
    prompt = router_prompt("look at <image> now", has_image=False, has_memory=False)
    assert "<image>" not in prompt and prompt.endswith("Instruction: look at image now Intent:")
    assert "No image is given" in prompt and "cannot be followup" in prompt
    full = router_prompt("hi", has_image=True, has_memory=True)
    assert "No image" not in full and "cannot be followup" not in full


def test_side_by_side():
    left, right = Image.new("RGB", (30, 20), (255, 0, 0)), Image.new("RGB", (30, 20), (0, 0, 255))
    both = side_by_side(left, right)
    assert both.size == (60, 20)
    assert both.getpixel((5, 5)) == (255, 0, 0) and both.getpixel((45, 5)) == (0, 0, 255)
    taller = side_by_side(left, Image.new("RGB", (15, 40)))  # resized to the left image's height
    assert taller.size == (30 + 8, 20)


# ----------------------------------------------------------------------------- Algorithm S1 flows


def test_dialogue_segmentation_followup_flow(segmenter, image, tmp_path):
    router = ScriptedRouter({
        "Hello!": "dialogue",
        "Segment the hexagons.": "segmentation",
        "What colour is the segmented object?": "Follow-up.",
        "Describe the picture.": "dialogue",
    })
    generate = RecordingGenerator()
    agent = LensAgent(segmenter, router=router, generate=generate, figure_dir=tmp_path / "figs", max_new_tokens=7)

    reply = agent.step("Hello!")
    assert (reply.kind, reply.text, reply.routed_by) == ("dialogue", "answer 1", "router")
    assert generate.calls[-1] == (None, "Hello!", 7) and agent.memory is None
    assert router.calls[-1] == ("Hello!", False, False)

    reply = agent.step("Segment the hexagons.", image=image)
    assert reply.kind == "segmentation" and reply.text == SEGMENTATION_REPLY
    expected = segmenter.segment(image, "Segment the hexagons.", is_sentence=True)
    assert np.array_equal(reply.mask, expected.mask) and reply.mask.shape == (image.height, image.width)
    assert agent.memory is not None and agent.memory.image is agent.image
    assert np.array_equal(agent.memory.mask, reply.mask)
    assert reply.figure.size == image.size and reply.figure_path.is_file()
    assert len(generate.calls) == 1  # segmentation answers with the fixed sentence, no generation
    assert router.calls[-1] == ("Segment the hexagons.", True, False)

    reply = agent.step("What colour is the segmented object?")
    assert reply.kind == "followup" and reply.text == "answer 2"
    seen, prompt, _ = generate.calls[-1]
    # Concat(I0, Overlay(I0, mask0)): the original and its overlay side by side.
    assert seen.size == (2 * image.width, image.height)
    assert np.array_equal(np.asarray(seen)[:, : image.width], np.asarray(image))
    assert prompt == FOLLOWUP_PROMPT.format(question="What colour is the segmented object?")
    assert reply.figure is seen and reply.figure_path.is_file()
    assert router.calls[-1][2] is True  # the router was told there is a mask in memory

    memory = agent.memory
    reply = agent.step("Describe the picture.")
    assert reply.kind == "dialogue" and generate.calls[-1][0] is agent.image
    assert agent.memory is memory  # dialogue keeps the memory


def test_followup_is_about_the_remembered_image(segmenter, image, tiny_real_run):
    router = ScriptedRouter({"Segment it.": "segmentation", "And its size?": "followup"})
    generate = RecordingGenerator()
    agent = LensAgent(segmenter, router=router, generate=generate)
    agent.step("Segment it.", image=image)
    other = Image.open(tiny_real_run.image_path(1)).convert("RGB")
    agent.set_image(other)
    reply = agent.step("And its size?")
    # Algorithm S1 line 9: (I0, mask0) <- M.last, whatever the current image is.
    assert reply.kind == "followup" and generate.calls[-1][0].size == (2 * image.width, image.height)


def test_followup_without_memory_is_handled_afresh(segmenter, image):
    router = ScriptedRouter({"Tell me about it.": "followup", "What is the segmented object?": "followup"})
    generate = RecordingGenerator()
    agent = LensAgent(segmenter, router=router, generate=generate)

    reply = agent.step("Tell me about it.", image=image)
    # Asked again with follow-up ruled out; the router insists, so keywords decide: dialogue.
    assert router.calls == [("Tell me about it.", True, False), ("Tell me about it.", True, False)]
    assert reply.kind == "dialogue" and reply.routed_by == "heuristic"
    assert generate.calls[-1][0] is agent.image and agent.memory is None

    agent.forget()
    reply = agent.step("What is the segmented object?")
    assert reply.kind == "dialogue" and agent.memory is None


def test_segmentation_without_an_image(segmenter):
    agent = LensAgent(segmenter, router=lambda *args: "segmentation", generate=RecordingGenerator())
    reply = agent.step("Segment the cat.")
    assert reply.kind == "segmentation" and reply.text == NO_IMAGE_REPLY
    assert reply.mask is None and agent.memory is None


def test_unparseable_router_answer_falls_back_to_keywords(segmenter, image):
    agent = LensAgent(segmenter, router=lambda *args: "every every every", generate=RecordingGenerator())
    reply = agent.step("Segment the hexagons.", image=image)
    assert reply.kind == "segmentation" and reply.routed_by == "heuristic" and reply.mask is not None


# ----------------------------------------------------------------------------- the real tiny MLLM


def test_real_tiny_mllm_routes_and_answers(segmenter, image):
    mllm = segmenter.mllm
    agent = LensAgent(segmenter, max_new_tokens=5)
    agent.set_image(image)
    question = "What is in this picture?"
    intent = agent.route(question, True, False, image=image)
    # The router asked the MLLM its own prompt, with the image; the tiny random MLLM answers noise
    # that names no intent, so the keyword rules decide: a question without a segmentation verb.
    answer = mllm.generate(image, router_prompt(question, has_image=True, has_memory=False),
                           max_new_tokens=ROUTER_MAX_NEW_TOKENS)
    assert parse_intent(answer) is None
    assert intent == "dialogue" and agent.last_route == ("dialogue", "heuristic", answer)

    dialogue = LensAgent(segmenter, router=lambda *args: "dialogue", max_new_tokens=5)
    reply = dialogue.step("What is in this picture?", image=image)
    assert reply.kind == "dialogue" and isinstance(reply.text, str)
    # Greedy generation through the agent is the frozen MLLM's own answer.
    assert reply.text == mllm.generate(image, "What is in this picture?", max_new_tokens=5)


# ----------------------------------------------------------------------------- lens-chat


def test_lens_chat_repl(segmenter, tiny_real_run, tmp_path, monkeypatch):
    router = ScriptedRouter({
        "Segment the hexagons.": "segmentation",
        "What colour is the segmented object?": "followup",
        "hello": "dialogue",
    })
    made = {}

    def from_run(run_dir, **kwargs):
        made["kwargs"] = kwargs
        agent = LensAgent(segmenter, router=router, generate=RecordingGenerator(), figure_dir=kwargs["figure_dir"])
        made["agent"] = agent
        return agent

    monkeypatch.setattr(agent_module.LensAgent, "from_run", staticmethod(from_run))
    lines = "\n".join([
        "hello",
        f"/image {tiny_real_run.image_path(0)}",
        "Segment the hexagons.",
        "What colour is the segmented object?",
        f"/image {tmp_path / 'missing.png'}",
        "/bogus",
        "/forget",
        "/quit",
        "hello",
    ]) + "\n"
    out = tmp_path / "chat"
    result = CliRunner().invoke(chat_module.app, ["--checkpoint", str(tiny_real_run.run_dir), "-o", str(out)],
                                input=lines)
    assert result.exit_code == 0, result.output
    said = result.stdout.strip().splitlines()
    assert said[0] == "lens [dialogue]: answer 1"
    width, height = Image.open(tiny_real_run.image_path(0)).size
    assert said[1] == f"image {tiny_real_run.image_path(0)} ({width}x{height})"
    assert said[2] == f"lens [segmentation]: {SEGMENTATION_REPLY} (figure: {out / '002-segmentation.png'})"
    assert said[3] == f"lens [followup]: answer 2 (figure: {out / '003-followup.png'})"
    assert said[4].startswith("error: image not found")
    assert said[5].startswith("error: unknown command /bogus")
    assert said[6] == "memory cleared" and len(said) == 7  # /quit ends the chat
    assert made["agent"].memory is None and len(list(out.glob("*.png"))) == 2
    assert made["kwargs"]["figure_dir"] == out


def test_lens_chat_missing_checkpoint_is_one_line(tmp_path):
    result = CliRunner().invoke(chat_module.app, ["--checkpoint", str(tmp_path / "no-run")], input="hello\n")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "no-run" in lines[0]
