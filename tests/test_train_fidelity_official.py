"""The authors' structure end to end on a small store: the prefix travels from the store to the head.

`lens-train --set ...` with the official preset's structural switches at tiny dimensions trains from a store
that keeps the pre-image prefix, records the switches in its run, and `lens-eval` evaluates it; a store
without the prefix is refused in one line by both; the batch's prefix is the store's.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from lens_train.cli import eval_app, train_app

FAST = ["--batch-size", "2", "--grad-accum", "1", "--workers", "0", "--steps", "3", "--device", "cpu", "--quiet"]
OFFICIAL_STRUCTURE = {"head_input": "full_sequence", "final_norm": "true", "descriptor": "official",
                      "global_only_after_descriptor": "true", "coords": "align_corners", "keypoint_strict": "true",
                      "detach_subpixel": "false", "cls_position_std": "1.0", "train_iou_head": "false"}
OFFICIAL_TRAINING = {"lr_schedule": "constant", "warmup_steps": "0", "grad_clip": "null", "precision": "bf16-pure",
                     "attn_target_resize": "nearest"}


def settings(values: dict) -> list[str]:
    return [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    from lens_manifests import build_manifest

    from lens_train.testing import build_store, small_synthetic

    root = small_synthetic(tmp_path_factory.mktemp("synthetic"), images=2)
    out = tmp_path_factory.mktemp("stores")
    with_prefix = build_store(build_manifest("synthetic:train", root), out / "prefix", spec="synthetic:train",
                              prefix_tokens=5)
    without = build_store(build_manifest("synthetic:train", root), out / "plain", spec="synthetic:train")
    authors = build_store(build_manifest("synthetic:train", root), out / "authors", spec="synthetic:train",
                          prefix_tokens=5, question_set="authors")
    return {"prefix": with_prefix.url, "plain": without.url, "authors": authors.url}


def test_the_batch_carries_the_stores_prefix(stores):
    from lens_cache.store import FeatureStore
    from lens_train.training.data import QueryDataset, collate

    dataset = QueryDataset(stores["prefix"], 14)
    batch = collate([dataset[0], dataset[1]])
    expected = torch.from_numpy(FeatureStore.open(stores["prefix"]).prefix_states(14)).half()
    assert batch.prefix_states.shape == (2, 5, expected.shape[1])
    assert torch.equal(batch.prefix_states[1], expected)
    assert batch.to("cpu").prefix_states.dtype == torch.float32
    assert collate([QueryDataset(stores["plain"], 14)[0]]).prefix_states is None


def test_official_structure_trains_and_evaluates_from_the_store(stores, tmp_path, monkeypatch):
    import lens_core.head as head_module

    seen = []
    forward = head_module.SegmentationHead.forward

    def spy(self, image_states, text_states, text_lengths, prefix_states=None):
        seen.append(None if prefix_states is None else tuple(prefix_states.shape))
        return forward(self, image_states, text_states, text_lengths, prefix_states)

    monkeypatch.setattr(head_module.SegmentationHead, "forward", spy)
    run = tmp_path / "run"
    result = CliRunner().invoke(train_app, ["--cache", stores["prefix"], "--preset", "tiny", "--out", str(run), *FAST,
                                            *settings(OFFICIAL_STRUCTURE), *settings(OFFICIAL_TRAINING)])
    assert result.exit_code == 0, result.output
    assert seen and all(shape is not None and shape[1] == 5 for shape in seen)
    config = json.loads((run / "config.json").read_text())
    for key, value in OFFICIAL_STRUCTURE.items():
        assert config["model"][key] == json.loads(value if value not in ("official", "full_sequence", "align_corners")
                                                  else json.dumps(value)), key
    assert config["train"]["precision"] == "bf16-pure" and config["train"]["grad_clip"] is None
    seen.clear()
    out = tmp_path / "eval"
    result = CliRunner().invoke(eval_app, ["--checkpoint", str(run), "--cache", stores["prefix"], "--out", str(out),
                                           "--figures", "0", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert seen and all(shape is not None and shape[1] == 5 for shape in seen)
    assert json.loads((out / "metrics.json").read_text())["num_queries"] > 0

    # a store without the prefix: refused by lens-eval and lens-train in one line
    result = CliRunner().invoke(eval_app, ["--checkpoint", str(run), "--cache", stores["plain"], "--out",
                                           str(tmp_path / "eval2"), "--figures", "0", "--device", "cpu"])
    assert result.exit_code == 2 and "keeps no states of the prompt's tokens before the image" in result.output
    result = CliRunner().invoke(train_app, ["--cache", stores["plain"], "--preset", "tiny", "--out",
                                            str(tmp_path / "run2"), *FAST, "--set", "head_input=full_sequence"])
    assert result.exit_code == 2 and "head_input=image_text" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_set_refuses_an_unknown_setting(stores, tmp_path):
    result = CliRunner().invoke(train_app, ["--cache", stores["prefix"], "--preset", "tiny", "--out", str(tmp_path / "r"),
                                            *FAST, "--set", "no_such_switch=1"])
    assert result.exit_code == 2 and "--set no_such_switch: no such setting" in result.output
    result = CliRunner().invoke(train_app, ["--cache", stores["prefix"], "--preset", "tiny", "--out", str(tmp_path / "r"),
                                            *FAST, "--set", "descriptor"])
    assert result.exit_code == 2 and "NAME=VALUE" in result.output


def test_training_samples_draw_one_cached_question_with_the_seed(stores):
    """Row 2: lens/data/*_dataset.py draw a question template per sample; here a sample reads one of the
    training questions the store cached for its query (variants 1..), drawn from (seed, step); evaluation
    reads variant 0."""
    from lens_train.training.data import MixedBatchSampler, QueryDataset, concat_datasets

    dataset, tasks = concat_datasets([QueryDataset(stores["authors"], 14)])
    assert dataset.has_training_questions
    store = dataset.datasets[0].store
    sampler = lambda seed: MixedBatchSampler(tasks, {"semantic": 1, "referring": 1, "reasoning": 1}, batch_size=4,
                                             seed=seed, end_step=30, draw_questions=True)
    picks = [item for batch in sampler(0) for item in batch]
    assert picks == [item for batch in sampler(0) for item in batch]  # the seed fixes the draws
    assert picks != [item for batch in sampler(1) for item in batch]
    chosen = set()
    for index, draw in picks:
        query = int(dataset.datasets[0].query_ids[index])
        variant = dataset.datasets[0].variant_for(query, draw)
        assert 1 <= variant < store.num_text_variants(query)
        chosen.add((store.num_text_variants(query), variant))
        sample = dataset[(index, draw)]
        expected = store.read_query(query, 14, variant=variant)["text_states"]
        assert torch.equal(sample["text_states"], torch.from_numpy(expected))
    assert {v for n, v in chosen if n == 5} == {1, 2, 3, 4}  # every training template of a phrase is used
    plain = dataset[0]  # no draw: the evaluation question
    query = int(dataset.datasets[0].query_ids[0])
    assert torch.equal(plain["text_states"], torch.from_numpy(store.read_query(query, 14)["text_states"]))
    # a resumed sampler yields the same draws from its step on
    resumed = MixedBatchSampler(tasks, {"semantic": 1, "referring": 1, "reasoning": 1}, batch_size=4, seed=0,
                                start_step=10, end_step=30, draw_questions=True)
    assert [item for batch in resumed for item in batch] == picks[40:]


@pytest.mark.parametrize("questions, expect_training", [("random", True), ("evaluation", False)])
def test_the_trainer_draws_questions_unless_told(stores, tmp_path, monkeypatch, questions, expect_training):
    from lens_cache.store import FeatureStore

    variants = []
    read = FeatureStore.read_query

    def spy(self, query, layer, variant=0):
        variants.append(variant)
        return read(self, query, layer, variant)

    monkeypatch.setattr(FeatureStore, "read_query", spy)
    result = CliRunner().invoke(train_app, ["--cache", stores["authors"], "--preset", "tiny", "--out", str(tmp_path / "r"),
                                            *FAST, "--set", f"train_questions={questions}"])
    assert result.exit_code == 0, result.output
    assert variants and (max(variants) > 0) == expect_training
