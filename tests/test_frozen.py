"""The frozen guarantee: caching, training and attaching LENS never change the MLLM.

Checked on the real tiny LLaVA of ``tiny_real_run``: an exact checksum of every
parameter and buffer (before the cache build, after it, after training LENS beside the
live MLLM, after attaching LENS and segmenting) and the greedy answers to fixed prompts
(before LENS existed vs. with LENS attached, after segmentations).

``lens-train`` reads stores, so the run's own training never holds the MLLM; the check
that training cannot reach it therefore trains LENS in the process that runs the MLLM, on
features it computes live, with the head warm-started from the MLLM's own decoder layers.
"""

from __future__ import annotations

import copy

import torch
from PIL import Image
from torch import nn

from lens_train.inference.agent import LensAgent
from lens_train.evaluation.frozen import mllm_checksum, parameters_requiring_grad
from lens_train.inference.segmenter import Segmenter, segment_image
from tests.helpers.tiny_real_run import PROBE_MAX_NEW_TOKENS, PROBE_PROMPTS, probe_answers


def test_checksum_sees_every_change():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    reference = mllm_checksum(model)
    assert reference == mllm_checksum(copy.deepcopy(model)) and len(reference) == 64

    nudged = copy.deepcopy(model)
    with torch.no_grad():
        weight = nudged[0].weight
        weight[0, 0] = torch.nextafter(weight[0, 0], torch.tensor(1.0))  # one ulp
    assert mllm_checksum(nudged) != reference

    buffer = copy.deepcopy(model)
    buffer[1].running_mean[0] = 0.5
    assert mllm_checksum(buffer) != reference

    assert mllm_checksum(copy.deepcopy(model).to(torch.bfloat16)) != reference  # bf16 hashes too
    assert parameters_requiring_grad(model) == ["0.weight", "0.bias", "1.weight", "1.bias"]


def test_caching_leaves_the_mllm_untouched(tiny_real_run):
    checksums = tiny_real_run.checksums
    assert checksums["initial"] == checksums["after_cache"]
    assert mllm_checksum(tiny_real_run.extractor.mllm.model) == checksums["initial"]


def test_training_beside_the_live_mllm_leaves_it_untouched(tiny_real_run):
    """A LENS training step wired to the live MLLM (its decoder layers as the head's warm start, its
    live features as the input), then a segmentation with the trained model: the MLLM is unchanged."""
    from lens_manifests import decode_target

    from lens_train.training.trainer import compute_losses

    extractor = tiny_real_run.extractor
    model = extractor.mllm.model
    segmenter = Segmenter(tiny_real_run.run_dir, extractor=extractor, device="cpu")
    lens = segmenter.run.model
    layer = segmenter.layer
    _, warm_layers = extractor.decoder_layers([layer, layer + 1])  # what the cache exports, from the MLLM itself
    lens.head.load_decoder_layers(warm_layers)
    train_config = segmenter.config.train

    image = Image.open(tiny_real_run.image_path(0)).convert("RGB")
    text, is_sentence = tiny_real_run.query(0)
    batch = segmenter.features(image, extractor.question_for(text, is_sentence)).to("cpu")  # the MLLM runs here
    batch.gts = [torch.from_numpy(decode_target(tiny_real_run.manifest, 0))]
    optimizer = torch.optim.AdamW(lens.trainable_parameters(), lr=1e-2)
    before = {name: p.detach().clone() for name, p in lens.head.named_parameters()}
    lens.train()
    out = lens(batch.image_states, batch.text_states, batch.text_lengths, batch.sam_embeddings)
    compute_losses(lens, out, batch, train_config)["loss"].backward()
    optimizer.step()
    lens.eval()
    assert any(not torch.equal(before[name], p) for name, p in lens.head.named_parameters())  # the step did train
    segmenter.segment(image, text, is_sentence=is_sentence)

    assert mllm_checksum(model) == tiny_real_run.checksums["initial"]
    assert parameters_requiring_grad(model) == [] and not model.training


def test_attaching_lens_and_segmenting_leave_the_mllm_untouched(tiny_real_run):
    extractor = tiny_real_run.extractor
    model = extractor.mllm.model
    image = Image.open(tiny_real_run.image_path(0)).convert("RGB")

    # Attach LENS to the MLLM, segment (one-shot and through the agent, follow-up included).
    text, is_sentence = tiny_real_run.query(0)
    segment_image(image, text, run_dir=tiny_real_run.run_dir, extractor=extractor, is_sentence=is_sentence)
    segmenter = Segmenter(tiny_real_run.run_dir, extractor=extractor, device="cpu")
    intents = iter(["segmentation", "followup", *["dialogue"] * len(PROBE_PROMPTS)])
    agent = LensAgent(segmenter, router=lambda *args: next(intents), max_new_tokens=PROBE_MAX_NEW_TOKENS)
    assert agent.step("Segment the hexagons.", image=image).kind == "segmentation"
    assert agent.step("What colour is it?").kind == "followup"

    assert mllm_checksum(model) == tiny_real_run.checksums["initial"]
    assert parameters_requiring_grad(model) == [] and not model.training
    assert parameters_requiring_grad(extractor.sam.sam) == []

    # Greedy answers: the same as before LENS existed, whether asked directly or through the agent.
    assert probe_answers(extractor.mllm, tiny_real_run.image_path(0)) == tiny_real_run.probe_answers
    through_agent = []
    for with_image, prompt in PROBE_PROMPTS:
        agent.image = image if with_image else None
        through_agent.append(agent.step(prompt).text)
    assert through_agent == tiny_real_run.probe_answers
