"""The prompt the MLLM sees, against the LENS authors' (LLaVA-1.5: LISA's conv_vicuna_v1); the toy keeps its own."""

from __future__ import annotations

import pytest
import torch

from lens_cache.backbones.llava import VICUNA_V1_TEMPLATE, LlavaBackbone
from lens_cache.backbones.toy import TOY_PROMPT_TEMPLATE

# Source: LISA/model_lisa/llava/conversation.py, conv_vicuna_v1 (LLaVA v1), rendered with
# SeparatorStyle.TWO and an empty assistant message, as the LENS authors' code (jiazhen-code/LENS) does:
# system prompt, one space, "USER: ", the image token, a new line, the question, one space, "ASSISTANT:".
AUTHORS_LLAVA15_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions. USER: <image>\n{question} ASSISTANT:"
)
#: What the toy LLaVA was trained on (its conversations) and what every toy store records.
TOY_TRAINED_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human's questions. USER: <image>\n{question} ASSISTANT:"
)


@pytest.fixture(scope="module")
def tiny() -> LlavaBackbone:
    return LlavaBackbone.tiny(layers=(14,), device="cpu", dtype=torch.float32)


def test_llava15_template_is_the_authors_character_for_character():
    assert VICUNA_V1_TEMPLATE == AUTHORS_LLAVA15_PROMPT
    assert VICUNA_V1_TEMPLATE.format(question="What is the dog in this image?").endswith(
        "questions. USER: <image>\nWhat is the dog in this image? ASSISTANT:")


def test_the_llava15_adapter_defaults_to_it_and_the_tiny_tokenizer_knows_every_word(tiny):
    assert tiny.prompt_template == AUTHORS_LLAVA15_PROMPT
    assert tiny.identity["prompt_template"] == AUTHORS_LLAVA15_PROMPT
    tokenizer = tiny.processor.tokenizer
    ids = tiny._prompt_ids("Can you segment the red circle in this image?")
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokenizer.unk_token_id not in ids, [t for t in tokens if t == tokenizer.unk_token]
    assert tokens[:2] == ["<s>", "a"] and tokens[-2:] == ["assistant", ":"]
    assert "user" in tokens and tokens[tokens.index("'") - 1 : tokens.index("'") + 2] == ["user", "'", "s"]


def test_the_toy_keeps_the_template_it_was_trained_with():
    """The shipped toy LLaVA's stores keep their identity: its prompt is the one of its conversations."""
    from lens_cache.backbones import build_mllm
    from lens_toy.llava import SYSTEM

    assert TOY_PROMPT_TEMPLATE == TOY_TRAINED_PROMPT
    assert SYSTEM == TOY_TRAINED_PROMPT.partition("USER:")[0]  # what lens_toy.llava trains on
    toy = build_mllm("toy", device="cpu", dtype=torch.float32)
    assert toy.prompt_template == TOY_TRAINED_PROMPT
    assert toy.identity["prompt_template"] == TOY_TRAINED_PROMPT


# ----------------------------------------------------------------------------- lens-cache prompt


def _prompt(*args: str):
    from typer.testing import CliRunner

    from lens_cache.cli import app

    return CliRunner().invoke(app, ["prompt", *args])


def test_prompt_command_shows_what_the_tiny_llava_sees(tiny):
    result = _prompt("--mllm", "tiny", "--question", "red circle")
    assert result.exit_code == 0, result.output
    question = "Can you segment the red circle in this image?"
    prefix, suffix = tiny.prompt_token_ids(question)
    p = len(tiny.prefix_token_ids)
    image_id = tiny.image_token_id
    assert prefix[p:] == [image_id] * 576 and len(suffix) == tiny.num_text_tokens(question)
    exact = AUTHORS_LLAVA15_PROMPT.format(question=question).replace("<image>", "<image x576>")
    assert exact in result.stdout  # the exact text, new line included
    ids = ", ".join(map(str, prefix[:p])) + f", [{image_id} x 576], " + ", ".join(map(str, suffix))
    assert f"token ids        [{ids}]  ({p + 576 + len(suffix)} tokens)" in result.stdout
    assert f"prefix P         {p} tokens before the first image token" in result.stdout
    assert f"text after image {len(suffix)} tokens (L_t" in result.stdout
    assert f"start of answer  ':' (id {suffix[-1]}), the last prompt token, position {p + 576 + len(suffix) - 1}" in (
        result.stdout)

    sentence = _prompt("--mllm", "tiny", "--question", "What holds water?", "--sentence")
    assert sentence.exit_code == 0 and "USER: <image x576>\nWhat holds water? ASSISTANT:" in sentence.stdout
    refused = _prompt("--mllm", "tiny", "--question", "the <image> here")
    assert refused.exit_code == 2 and refused.stderr.strip().count("\n") == 0
    assert refused.stderr.startswith("error: the text contains '<image>'")


def test_prompt_command_on_the_toy_shows_its_own_template():
    result = _prompt("--mllm", "toy", "--question", "the big star")
    assert result.exit_code == 0, result.output
    assert TOY_TRAINED_PROMPT.format(question="Can you segment the the big star in this image?").replace(
        "<image>", "<image x576>") in result.stdout
    assert "mllm             toy (llava-1.5)" in result.stdout
    assert " x 576]" in result.stdout and "start of answer  ':'" in result.stdout
