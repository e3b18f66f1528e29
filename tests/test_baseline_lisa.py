"""The LISA-style baseline (lens_train.baselines): it trains, it changes the MLLM (LENS does not),
its [SEG] state is the one LISA reads, its evaluation and export are consistent.

On the tiny real run's store (real tiny LLaVA + tiny SAM, 2 queries): seconds, not minutes.
"""

from __future__ import annotations

import json

import pytest
import torch

from lens_train.baselines.lisa import ANSWER, SEG_TOKEN, LisaStyle
from lens_train.baselines.lisa_run import LisaQueries, LisaRunConfig, build_lisa, evaluate_lisa, export_mllm, train_lisa
from lens_train.errors import UserError
from lens_train.evaluation.frozen import mllm_checksum


@pytest.fixture(scope="module")
def lisa_run(tiny_real_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("lisa") / "run"
    train_lisa(tiny_real_run.store_url, out, steps=3, batch=2, lr=1e-3, log=lambda line: None)
    return out


def _batch(tiny_real_run, lisa: LisaStyle, backbone) -> dict:
    return LisaQueries(tiny_real_run.store_url, backbone).batch([0, 1])


def test_loss_falls_on_a_repeated_batch(tiny_real_run):
    torch.manual_seed(0)
    config = LisaRunConfig(cache=tiny_real_run.store_url, mllm="tiny", sam="tiny")
    lisa, backbone = build_lisa(config)
    batch = _batch(tiny_real_run, lisa, backbone)
    optimizer = torch.optim.AdamW(lisa.trainable_parameters(), lr=2e-3)
    losses = []
    for _ in range(6):
        ce, low_res = lisa(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["pixel_values"],
                           batch["image_embeddings"])
        loss = lisa.loss(ce, low_res, batch["gts"], batch["sizes"])
        optimizer.zero_grad()
        loss["loss"].backward()
        optimizer.step()
        losses.append((loss["ce"].item(), (loss["dice"] * 0.5 + loss["bce"] * 2.0).item()))
    assert losses[-1][0] < 0.85 * losses[0][0], losses  # the text answer "It is [SEG]." is being learned
    assert losses[-1][1] < 0.85 * losses[0][1], losses  # and the mask losses fall


def test_the_mask_comes_from_the_state_that_predicts_seg(tiny_real_run):
    """Recomputed by hand: the last layer's state one position before [SEG], fcs, SAM's decoder."""
    config = LisaRunConfig(cache=tiny_real_run.store_url, mllm="tiny", sam="tiny")
    lisa, backbone = build_lisa(config)
    lisa.eval()
    batch = _batch(tiny_real_run, lisa, backbone)
    tok = backbone.processor.tokenizer
    assert tok.convert_tokens_to_ids(SEG_TOKEN) == lisa.seg_token_id
    assert tok.tokenize(ANSWER).count(SEG_TOKEN) == 1
    with torch.no_grad():
        _, low_res = lisa(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["pixel_values"],
                          batch["image_embeddings"])
        out = lisa.mllm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        pixel_values=batch["pixel_values"], output_hidden_states=True)
        for row in range(2):
            at = int((batch["input_ids"][row] == lisa.seg_token_id).nonzero()[0, 0]) - 1
            prompt = lisa.text_hidden_fcs(out.hidden_states[-1][row, at])[None, None]
            torch.testing.assert_close(lisa.decode(prompt, batch["image_embeddings"][row : row + 1])[0], low_res[row])
            other = lisa.text_hidden_fcs(out.hidden_states[-1][row, at + 1])[None, None]  # the [SEG] token itself
            assert not torch.allclose(lisa.decode(other, batch["image_embeddings"][row : row + 1])[0], low_res[row])


def test_lisa_changes_the_mllm_and_lens_does_not(tiny_real_run, lisa_run, tmp_path):
    """LISA-style: q/v of the language model, the embeddings and lm_head move, the vision tower does not.
    LENS: the MLLM's checksum after caching and training equals the one before."""
    folder = export_mllm(lisa_run, tmp_path / "lisa-mllm")
    from lens_cache.backbones import build_mllm

    tuned = build_mllm(str(folder), layers=(1,)).model
    original = tiny_real_run.extractor.mllm.model
    assert mllm_checksum(tuned) != mllm_checksum(original)
    tuned_sd, original_sd = tuned.state_dict(), original.state_dict()
    moved = {name for name, value in original_sd.items()
             if tuned_sd[name].shape == value.shape and not torch.equal(tuned_sd[name], value)}
    assert any("q_proj" in n for n in moved) and any("v_proj" in n for n in moved)
    assert not any("k_proj" in n or "vision_tower" in n or "multi_modal_projector" in n for n in moved), sorted(moved)[:5]
    assert tuned_sd["lm_head.weight"].shape[0] == original_sd["lm_head.weight"].shape[0] + 1  # [SEG]
    # the frozen guarantee of LENS on the same MLLM, as recorded by the tiny run
    assert tiny_real_run.checksums["initial"] == tiny_real_run.checksums["after_cache"] == mllm_checksum(original)


def test_evaluation_is_the_mean_of_its_per_query_ious(tiny_real_run, lisa_run, tmp_path):
    metrics = evaluate_lisa(lisa_run, tiny_real_run.store_url, out=tmp_path / "eval", log=lambda line: None)
    per_query = json.loads((tmp_path / "eval" / "per_query.json").read_text())
    assert metrics["num_queries"] == len(per_query) == 2
    assert metrics["giou"] == pytest.approx(sum(q["iou"] for q in per_query) / len(per_query))
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["giou"] == metrics["giou"]


def test_a_rerun_resumes_and_other_settings_are_refused(tiny_real_run, lisa_run):
    stats = train_lisa(tiny_real_run.store_url, lisa_run, steps=3, batch=2, lr=1e-3, log=lambda line: None)
    assert stats["steps"] == 3  # complete: nothing retrained
    with pytest.raises(UserError, match="other settings"):
        train_lisa(tiny_real_run.store_url, lisa_run, steps=4, batch=2, lr=1e-3, log=lambda line: None)


def test_cli_errors_are_one_line(tmp_path):
    from typer.testing import CliRunner

    from lens_train.baselines.cli import app

    result = CliRunner().invoke(app, ["eval", "--run", str(tmp_path), "--cache", str(tmp_path)])
    assert result.exit_code == 2
    assert "not a LISA-style run folder" in result.output and len(result.output.strip().splitlines()) == 1
