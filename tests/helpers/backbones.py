"""The reference every MLLM adapter's states are held to: a plain full forward of the whole prompt.

Used by ``tests/test_backbones_contract.py`` (the contract of every prefix-sharing adapter) and by the
per-adapter files for their own variants (Qwen2.5-VL, OneVision's AnyRes tile).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

ATOL = 1e-5


def full_forward(backbone, square: Image.Image, question: str):
    """Plain full forward of the whole prompt through the processor's own inputs, ``square`` shown as the
    adapter shows it (:meth:`model_image`); the model computes its own positions (Qwen2-VL: ``get_rope_index``).

    Returns:
        (input_ids (S,), positions of the image-token run, hidden_states)
    """
    inputs = backbone.processor(text=backbone.prompt_for(question), images=backbone.model_image(square),
                                return_tensors="pt")
    with torch.inference_mode():
        out = backbone.model(**inputs, output_hidden_states=True)
    input_ids = inputs["input_ids"][0]
    run = (input_ids == backbone.model.config.image_token_id).nonzero()[:, 0]
    return input_ids, run, out.hidden_states


def check_against_full_forward(backbone, squares: Sequence[Image.Image], questions: Sequence[Sequence[str]],
                               encoded, layers: Sequence[int], *, run_length: int, references=None) -> None:
    """Every cached state of ``encoded`` (``backbone.encode(squares, questions)``) equals ``hidden_states[k]`` of
    a full forward: the first ``num_image_tokens`` of the image run (``run_length`` tokens, one block) and every
    token after it, for each question of each image.

    Args:
        references: ``(image index, question) -> full_forward(...)``, where already computed (else computed here).
    """
    for i, (square, image_questions, states) in enumerate(zip(squares, questions, encoded, strict=True)):
        assert len(states.text_states) == len(image_questions)
        for question, text_states in zip(image_questions, states.text_states):
            known = (references or {}).get((i, question))
            input_ids, run, hidden = known[:3] if known else full_forward(backbone, square, question)
            assert len(run) == run_length and torch.equal(run, torch.arange(int(run[0]), int(run[0]) + run_length))
            cached = run[: backbone.num_image_tokens]
            text_pos = torch.arange(int(run[-1]) + 1, len(input_ids))
            assert text_states[layers[0]].shape[0] == len(text_pos) == backbone.num_text_tokens(question)
            for k in layers:
                assert states.image_states[k].shape == (backbone.num_image_tokens, backbone.hidden_size)
                torch.testing.assert_close(states.image_states[k], hidden[k][0, cached], atol=ATOL, rtol=0)
                torch.testing.assert_close(text_states[k], hidden[k][0, text_pos], atol=ATOL, rtol=0)
