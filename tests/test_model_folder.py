"""Model folders (lens-export-model, RUN/model): the Hugging Face layout, and the same head as the run folder.

Uses the session fixture ``tiny_real_run`` (conftest): a cache built with the REAL tiny LLaVA and tiny
SAM, and a run trained 2 steps on it (lens-train wrote RUN/model at its end).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from lens_train.cli import export_app
from lens_train.errors import UserError
from lens_train.training.model_folder import (MODEL_DIR, LensModel, export_model, model_config_of, open_trained,
                                              run_config_of)


@pytest.fixture(scope="module")
def model_dir(tiny_real_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("model") / "tiny-head"
    result = CliRunner().invoke(export_app, [str(tiny_real_run.run_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def _one_line_error(app, args: list[str]) -> str:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_the_folder_has_the_hugging_face_layout(tiny_real_run, model_dir):
    assert sorted(p.name for p in model_dir.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((model_dir / "config.json").read_text())
    run = json.loads((tiny_real_run.run_dir / "config.json").read_text())
    assert config["format"] == "lens-model" and config["preset"] == run["preset"] == "tiny"
    assert config["model"] == run["model"] and config["layer"] == 14 and config["sam"] == "tiny"
    assert config["train"]["threshold"] == run["train"]["threshold"] and config["train"]["precision"]
    assert config["identity"] == run["stores"][0]["identity"]
    backbone = config["backbone"]
    assert backbone["mllm"] == "tiny" and backbone["layer"] == 14 and backbone["sam_variant"] == "tiny"
    assert backbone["prompt_template"] == run["stores"][0]["identity"]["prompt_template"]
    assert config["step"] == 2
    # the trainable tensors exactly as the run's checkpoint holds them
    ours, theirs = load_file(model_dir / "model.safetensors"), load_file(tiny_real_run.run_dir / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    card = (model_dir / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: lens-seg") and "Intended use and limits" in card
    assert "synthetic-reason:val" in card and "Segmenter.from_pretrained" in card


def test_the_model_folder_segments_exactly_as_the_run_folder(tiny_real_run, segmenter, model_dir):
    from lens_train import Segmenter

    from_folder = Segmenter.from_pretrained(model_dir, extractor=tiny_real_run.extractor, device="cpu")
    assert from_folder.trained.kind == "model" and from_folder.run.step == segmenter.run.step
    for row in (0, 1):
        text, is_sentence = tiny_real_run.query(row)
        a = segmenter.segment(tiny_real_run.image_path(row), text, is_sentence=is_sentence)
        b = from_folder.segment(tiny_real_run.image_path(row), text, is_sentence=is_sentence)
        assert torch.equal(a.logits, b.logits) and np.array_equal(a.mask, b.mask)
        assert a.score == b.score and torch.equal(a.heatmap, b.heatmap)


def test_lens_train_writes_the_model_folder_at_the_end(tiny_real_run):
    trained = open_trained(tiny_real_run.run_dir / MODEL_DIR)
    assert trained.kind == "model" and trained.step == 2
    assert trained.config.to_dict()["model"] == open_trained(tiny_real_run.run_dir).config.to_dict()["model"]


def test_lens_eval_takes_a_model_folder(tiny_real_run, model_dir, tmp_path):
    from lens_train.evaluation.evaluate import evaluate

    kwargs = dict(figures=0, device="cpu", log=lambda line: None)
    by_run = evaluate(tiny_real_run.run_dir, tiny_real_run.store_url, out=tmp_path / "run", **kwargs)
    by_model = evaluate(model_dir, tiny_real_run.store_url, out=tmp_path / "model", **kwargs)
    assert by_model["giou"] == by_run["giou"] and by_model["ciou"] == by_run["ciou"] and by_model["step"] == 2


def test_hub_mixin_round_trip_touches_no_network(model_dir, tmp_path, monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise AssertionError("a local folder must not touch the network")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    monkeypatch.setattr("huggingface_hub.hub_mixin.hf_hub_download", offline)
    model = LensModel.from_pretrained(model_dir)
    assert model.config == json.loads((model_dir / "config.json").read_text())
    model.save_pretrained(tmp_path / "again")
    for name in ("config.json", "model.safetensors", "README.md"):
        assert (tmp_path / "again" / name).read_bytes() == (model_dir / name).read_bytes(), name


def test_export_refuses_a_non_empty_out_and_overwrites_when_asked(tiny_real_run, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    line = _one_line_error(export_app, [str(tiny_real_run.run_dir), "--out", str(out)])
    assert line == f"error: {out} exists and is not empty: choose another --out or pass --overwrite"
    assert (out / "mine.txt").read_text() == "keep"
    result = CliRunner().invoke(export_app, [str(tiny_real_run.run_dir), "--out", str(out), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob("*.old"))
    assert "already a model folder" in _one_line_error(export_app, [str(out), "--out", str(tmp_path / "x")])
    assert "run folder not found" in _one_line_error(export_app, [str(tmp_path / "nope"), "--out", str(tmp_path / "y")])


def test_the_card_lists_the_runs_evaluations_with_their_commands(tiny_real_run, tmp_path):
    from lens_train.evaluation.evaluate import evaluate

    run = tmp_path / "run"
    shutil.copytree(tiny_real_run.run_dir, run, ignore=shutil.ignore_patterns(MODEL_DIR))
    metrics = evaluate(run, tiny_real_run.store_url, figures=0, device="cpu", log=lambda line: None)
    card = (export_model(run, tmp_path / "model") / "README.md").read_text()
    assert f"lens-eval --checkpoint {run} --cache {tiny_real_run.store_url} --threshold 0.5" in card
    assert f"{100 * metrics['giou']:.1f}" in card and "No `lens-eval` results" not in card


def test_a_damaged_or_foreign_model_folder_is_one_line(model_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(model_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(UserError, match="model format 99"):
        open_trained(bad)
    (bad / "config.json").write_text(json.dumps({**config, "step": 7}))
    from lens_train.training.loading import load_run

    with pytest.raises(UserError, match="from step 2 but config.json says 7"):
        load_run(bad)
    (bad / "config.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(UserError, match="neither a lens-train run nor a LENS model folder"):
        open_trained(bad)
    stripped = {k: v for k, v in config.items() if k != "identity"}
    with pytest.raises(UserError, match="lacks 'identity'"):
        run_config_of(stripped, source="x")


def test_model_config_reads_back_as_the_runs_config(tiny_real_run):
    config = open_trained(tiny_real_run.run_dir).config
    again = run_config_of(json.loads(json.dumps(model_config_of(config, step=2))), source="x")
    for field in ("preset", "model", "train", "layer", "sam", "identity_hash"):
        assert getattr(again, field) == getattr(config, field), field
    assert again.stores[0].identity == config.stores[0].identity


def test_the_identity_check_holds_for_model_folders(tiny_real_run, model_dir, monkeypatch):
    """A live backbone other than the one the head was trained on is refused, in one line, before the model is built."""
    from lens_train.inference.segmenter import Segmenter

    built = []
    monkeypatch.setattr("lens_train.training.loading.build_model", lambda *a, **k: built.append(a) or 1 / 0)
    with pytest.raises(UserError, match=r"not the one model .* was trained on .*sam\.") as error:
        Segmenter(model_dir, mllm="tiny", sam="toy", device="cpu")
    assert "\n" not in str(error.value) and not built
