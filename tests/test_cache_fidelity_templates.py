"""FIDELITY row 2, the questions: the LENS authors' question templates as a named set (``lens_cache.questions``),
every template's text states cached per query (store format 5), against a plain full forward of each exact
prompt (tiny LLaVA, CPU, float32), and the ``single`` set (the earlier rule) unchanged."""

from __future__ import annotations

import functools
import json
import shutil

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from lens_cache.backbones import build_extractor, build_mllm
from lens_cache.backbones.geometry import sam_frame
from lens_cache.build import build_cache
from lens_cache.cli import app
from lens_cache.errors import DamagedStoreError, StoreError
from lens_cache.identity import feature_differences
from lens_cache.questions import AUTHORS, QUESTION_SETS, SINGLE, question_set
from lens_cache.store import ATTRS_KEY, FeatureStore, check_compatible, verify_store
from lens_cache.store_format import to_float16
from lens_cache.testing import damage_chunk, fake_factory, make_test_manifest
from tests.helpers.images import padded_squares

ATOL = 1e-5
LAYERS = (14, 30)

# --------------------------------------------------------------------------------------------- the strings

#: jiazhen-code/LENS at 29c4959, ``lens/data/qa_template.py`` (LISA's lists): SHORT_QUESTION_TEMPLATE and
#: LONG_QUESTION_TEMPLATE as the authors' files write them, DEFAULT_IMAGE_TOKEN + "\n" included.
LISA_SHORT = [
    "<image>\n" + "Can you segment the {class_name} in this image?",
    "<image>\n" + "Please segment the {class_name} in this image.",
    "<image>\n" + "What is {class_name} in this image? Please respond with segmentation mask.",
    "<image>\n" + "What is {class_name} in this image? Please output segmentation mask.",
]
LISA_LONG = [
    "<image>\n" + "{sent} Please respond with segmentation mask.",
    "<image>\n" + "{sent} Please output segmentation mask.",
]


def _authors_eval_short(text: str) -> str:
    """``lens/data/test_dataset.py`` (TestReasoningDataset, ``debug = True``): the user turn of a short query."""
    return "<image>" + "\nWhat is {} in this image?".format(text.strip())


def _authors_eval_sentence(text: str) -> str:
    """The same branch for a sentence: the image token, a newline, one space, the stripped sentence."""
    return "<image>" + "\n {}".format(text.strip())


def _as_user_turn(question: str) -> str:
    """Our question as the authors' user turn (the prompt template puts ``<image>\\n`` before the question)."""
    return "<image>\n" + question


def test_authors_set_is_the_authors_templates_character_for_character():
    assert QUESTION_SETS["authors"] is AUTHORS and question_set("authors") is AUTHORS
    short, sentence = AUTHORS.short, AUTHORS.sentence
    assert [_as_user_turn(t).replace("{text}", "{class_name}") for t in short.training] == LISA_SHORT
    assert [_as_user_turn(t).replace("{text}", "{sent}") for t in sentence.training] == LISA_LONG
    # training: the phrase lower-cased (refer_seg_dataset.py, sem_seg_dataset.py, reason_seg_dataset.py:
    # ``format(class_name=text.lower())``), the sentence as it is (``format(sent=text)``)
    phrase, sent = "  The Big STAR ", "  What can hold Water? "
    for v, template in enumerate(LISA_SHORT, start=1):
        assert _as_user_turn(AUTHORS.question(phrase, False, v)) == template.format(class_name=phrase.lower())
    for v, template in enumerate(LISA_LONG, start=1):
        assert _as_user_turn(AUTHORS.question(sent, True, v)) == template.format(sent=sent)
    # evaluation (variant 0): stripped, not lower-cased
    assert _as_user_turn(AUTHORS.question(phrase, False)) == _authors_eval_short(phrase)
    assert AUTHORS.question(phrase, False) == "What is The Big STAR in this image?"
    assert _as_user_turn(AUTHORS.question(sent, True)) == _authors_eval_sentence(sent)
    assert AUTHORS.question(sent, True) == " What can hold Water?"
    assert AUTHORS.num_variants(False) == 5 and AUTHORS.num_variants(True) == 3 and AUTHORS.max_variants == 5
    assert AUTHORS.questions(phrase, False)[0] == AUTHORS.question(phrase, False)
    with pytest.raises(IndexError, match="variant 3 does not exist"):
        AUTHORS.question(sent, True, 3)


def test_single_set_is_the_rule_before_sets():
    assert SINGLE.name == "single" and SINGLE.is_single and not AUTHORS.is_single
    assert SINGLE.questions("red circle", False) == ["Can you segment the red circle in this image?"]
    assert SINGLE.questions(" What holds water? ", True) == [" What holds water? "]  # as it is
    # the identity of a store of this set is the one stores recorded before sets existed
    assert SINGLE.identity() == {"question_template": "Can you segment the {text} in this image?"}
    assert AUTHORS.identity()["question_template"] == "What is {text} in this image?"
    record = AUTHORS.identity()["question_set"]
    assert record["short"]["training"] == list(AUTHORS.short.training)
    assert record["sentence"]["evaluation"] == " {text}" and record["short"]["training_normalise"] == "lower"
    with pytest.raises(ValueError, match="unknown question set"):
        question_set("lisa")


def test_adapter_defaults_authors_for_real_backbones_single_for_tiny_and_toy():
    tiny = build_mllm("tiny", layers=(14,), device="cpu", dtype=torch.float32)
    assert tiny.question_set is SINGLE and "question_set" not in tiny.identity
    assert tiny.identity["question_template"] == "Can you segment the {text} in this image?"
    assert tiny.question_for("red circle", False) == "Can you segment the red circle in this image?"
    toy = build_mllm("toy", device="cpu", dtype=torch.float32)
    assert toy.question_set is SINGLE and "question_set" not in toy.identity
    # the adapter itself (as a llava-hf checkpoint loads it) defaults to the authors'
    from lens_cache.backbones.llava import LlavaBackbone

    real = LlavaBackbone(tiny.model, tiny.processor, name_or_path="x", layers=(14,))
    assert real.question_set is AUTHORS and real.identity["question_set"] == AUTHORS.record()
    assert real.question_for(" red circle ", False) == "What is red circle in this image?"
    assert build_mllm("tiny", layers=(14,), device="cpu", dtype=torch.float32, question_set="authors").question_set is AUTHORS


# --------------------------------------------------------------------------------------------- the states


def _full_forward(backbone, image, question):
    inputs = backbone.processor(text=backbone.prompt_for(question), images=image, return_tensors="pt")
    with torch.inference_mode():
        out = backbone.model(**inputs, output_hidden_states=True)
    return inputs["input_ids"][0], out.hidden_states


@pytest.fixture(scope="module")
def authors_backbone():
    return build_mllm("tiny", layers=LAYERS, device="cpu", dtype=torch.float32, question_set="authors")


def test_every_variant_equals_a_full_forward_of_its_prompt(authors_backbone):
    backbone = authors_backbone
    squares = padded_squares()
    asked = [backbone.questions_for("Red Circle", False), backbone.questions_for("What can hold water?", True)]
    assert [len(q) for q in asked] == [5, 3]
    encoded = backbone.encode(squares, asked)  # every variant of every query as suffixes of one KV cache
    start = len(backbone.prefix_token_ids) + backbone.num_image_tokens
    for image, questions, states in zip(squares, asked, encoded, strict=True):
        assert len(states.text_states) == len(questions)
        for question, text in zip(questions, states.text_states, strict=True):
            ids, hidden = _full_forward(backbone, image, question)
            assert len(ids) - start == backbone.num_text_tokens(question)
            for k in LAYERS:
                torch.testing.assert_close(text[k], hidden[k][0, start:], atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return make_test_manifest(tmp_path_factory.mktemp("images"), num_images=3, seed=5)


def _tiny_store(manifest, out, question_set=None):
    extra = {"question_set": question_set} if question_set else {}
    factory = functools.partial(build_extractor, mllm="tiny", sam="tiny", layers=LAYERS, device="cpu", dtype="float32",
                                **extra)
    return build_cache(manifest, out, factory, spec="testset:val", block_size=2, batch_size=2, progress=False)


@pytest.fixture(scope="module")
def authors_store(manifest, tmp_path_factory):
    return _tiny_store(manifest, tmp_path_factory.mktemp("stores") / "authors", "authors")


def _stored_equals_full_forward(store, backbone, manifest, query, variant):
    row = manifest.slice(query, 1).to_pylist()[0]
    question = backbone.question_set.question(row["text"], row["is_sentence"], variant)
    square = sam_frame(_image(row["image_path"])).padded_image()
    _, hidden = _full_forward(backbone, square, question)
    start = len(backbone.prefix_token_ids) + backbone.num_image_tokens
    for k in LAYERS:
        stored = store.read_query(query, k, variant)["text_states"]
        want = to_float16(hidden[k][0, start:], tuple(hidden[k][0, start:].shape), "reference")
        assert stored.shape == want.shape
        # float16 as stored, from float32 states equal to the full forward's within 1e-5
        np.testing.assert_allclose(stored.astype(np.float32), want.astype(np.float32), rtol=2e-3, atol=1e-4)


def _image(path):
    from lens_cache.images import read_rgb

    return read_rgb(path)


def test_the_store_caches_every_variant_of_every_query(authors_store, authors_backbone, manifest):
    store = FeatureStore.open(authors_store.url)
    assert store.attrs["format_version"] == 6
    assert store.question_set == "authors" and store.max_text_variants == 5
    assert store.identity["question_set"] == AUTHORS.record()
    sentences = manifest.column("is_sentence").to_pylist()
    assert any(sentences) and not all(sentences)
    for query in store.valid_query_ids():
        count = store.num_text_variants(int(query))
        assert count == (3 if sentences[query] else 5)
        names = store.text_variant_names(int(query))
        assert len(names) == count and names[0].startswith("eval") and names[1].startswith("train 1")
        for variant in range(count):
            _stored_equals_full_forward(store, authors_backbone, manifest, int(query), variant)
        with pytest.raises(IndexError, match=f"has {count} text variant"):
            store.read_query(int(query), LAYERS[0], count)
    # every variant's L_t is what tokenisation promised
    assert (store.variant_text_len[~np.asarray(sentences)] > 0).all()
    assert (store.variant_text_len[np.asarray(sentences)][:, 2:] == 0).all()
    assert verify_store(store.url).ok


def test_a_single_store_is_the_store_of_before(manifest, tmp_path, authors_store):
    store = _tiny_store(manifest, tmp_path / "single")
    assert store.question_set == "single" and store.max_text_variants == 1
    assert store.text_variant_templates["short"] == ["eval (as_is): 'Can you segment the {text} in this image?'"]
    assert "question_set" not in store.identity
    assert store.identity["question_template"] == "Can you segment the {text} in this image?"
    assert not [name for name in store.array_names() if "variant" in name]  # the arrays of format 4
    backbone = build_mllm("tiny", layers=LAYERS, device="cpu", dtype=torch.float32)
    for query in store.valid_query_ids():
        assert store.num_text_variants(int(query)) == 1
        _stored_equals_full_forward(store, backbone, manifest, int(query), 0)
        with pytest.raises(IndexError, match="has 1 text variant"):
            store.read_query(int(query), 14, 1)
    # variant 0 of a `single` store is not the authors' evaluation question: different identities, refused
    differences = feature_differences(store.identity, FeatureStore.open(authors_store.url).identity)
    assert {key for key, _, _ in differences} >= {"question_template", "question_set.name"}
    with pytest.raises(StoreError, match="cannot be mixed"):
        check_compatible([store, FeatureStore.open(authors_store.url)])


# --------------------------------------------------------------------------------------------- the format


@pytest.fixture()
def fake_authors(tmp_path):
    manifest = make_test_manifest(tmp_path / "images", num_images=5, seed=3)
    out = tmp_path / "fake"
    store = build_cache(manifest, out, fake_factory(question_set="authors"), spec="testset:val", block_size=2,
                        batch_size=2, progress=False)
    return manifest, out, store


def test_a_build_of_another_set_is_refused(fake_authors):
    manifest, out, _ = fake_authors
    with pytest.raises(StoreError, match="question_set"):
        build_cache(manifest, out, fake_factory(question_set="single"), spec="testset:val", progress=False)
    with pytest.raises(StoreError, match="question_template"):
        build_cache(manifest, out, fake_factory(), spec="testset:val", progress=False)


def test_variant_rows_are_checked_verified_and_repaired(fake_authors):
    manifest, out, store = fake_authors
    assert [name for name in store.array_names() if "variant" in name] == [
        "queries/variant_text_len", "queries/variants_l14", "queries/variants_l14_crc32"]
    before = {q: [store.read_query(int(q), 14, v)["text_states"] for v in range(store.num_text_variants(int(q)))]
              for q in store.valid_query_ids()}
    query = int(store.valid_query_ids()[-1])
    damage_chunk(out / "queries" / "variants_l14" / "c" / str(query) / "0" / "0" / "0", "flipped")
    damage_chunk(out / "queries" / "variant_text_len" / "c" / "0" / "0", "flipped")
    report = verify_store(out)
    assert not report.ok
    assert any("queries/variant_text_len" in p for p in report.problems)
    fresh = FeatureStore.open(out)
    with pytest.raises(DamagedStoreError):
        fresh.read_query(query, 14, 1)
    # rerunning the build rewrites the index array and recomputes exactly the damaged block
    repaired = build_cache(manifest, out, fake_factory(question_set="authors"), spec="testset:val", progress=False)
    assert verify_store(out).ok
    for q, states in before.items():
        for v, values in enumerate(states):
            assert np.array_equal(repaired.read_query(int(q), 14, v)["text_states"], values)
    # a damaged variants chunk alone is found by the sample scan
    damage_chunk(out / "queries" / "variants_l14" / "c" / str(query) / "0" / "0" / "0", "deleted")
    report = verify_store(out)
    assert any("queries/variants_l14" in p for p in report.problems)
    # and by the structural check alone (--quick: the chunk listing, no values read), its folder gone
    shutil.rmtree(out / "queries" / "variants_l14" / "c" / str(query))
    quick = verify_store(out, quick=True)
    assert any(p.startswith("queries/variants_l14: 1 sample(s)") for p in quick.problems), quick.problems


def test_an_older_store_opens_with_one_variant(tmp_path):
    manifest = make_test_manifest(tmp_path / "images", num_images=3, seed=3)
    out = tmp_path / "v4"
    store = build_cache(manifest, out, fake_factory(), spec="testset:val", block_size=2, progress=False)
    group = zarr.open_group(str(out), mode="r+")
    attrs = dict(group.attrs[ATTRS_KEY])
    assert attrs["text_variants"] is None  # a backbone without a question set records none
    old = {key: value for key, value in attrs.items() if key != "text_variants"}
    group.attrs.put({ATTRS_KEY: {**old, "format_version": 4}})
    old_store = FeatureStore.open(out)
    assert old_store.attrs["format_version"] == 4 and old_store.text_variants is None
    assert old_store.question_set == "single" and old_store.max_text_variants == 1
    for query in old_store.valid_query_ids():
        assert old_store.num_text_variants(int(query)) == 1
        assert np.array_equal(old_store.read_query(int(query), 14)["text_states"],
                              store.read_query(int(query), 14, 0)["text_states"])
        with pytest.raises(IndexError):
            old_store.read_query(int(query), 14, 1)
    # the fake backbone records no question_template; a real one's is named (test_a_single_store_is_the_store_of_before)
    assert old_store.text_variant_templates["short"] == ["eval and train: the backbone's question rule"]
    assert verify_store(out).ok


# --------------------------------------------------------------------------------------------- the CLI

runner = CliRunner()


def test_prompt_shows_every_variant_and_info_the_set(fake_authors):
    result = runner.invoke(app, ["prompt", "--mllm", "tiny", "--question", "red circle", "--question-set", "authors",
                                 "--all-variants"])
    assert result.exit_code == 0, result.output
    assert result.output.count("--- variant ") == 5
    assert "question         'What is red circle in this image?'" in result.output
    assert "question         'What is red circle in this image? Please output segmentation mask.'" in result.output
    one = runner.invoke(app, ["prompt", "--mllm", "tiny", "--question", "red circle.", "--sentence", "--question-set",
                              "authors", "--variant", "2"])
    assert one.exit_code == 0, one.output
    assert "question         'red circle. Please output segmentation mask.'" in one.output
    bad = runner.invoke(app, ["prompt", "--mllm", "tiny", "--question", "x", "--sentence", "--question-set", "authors",
                              "--variant", "3"])
    assert bad.exit_code == 2 and "has 3 variant(s)" in bad.output
    _, out, _ = fake_authors
    info = runner.invoke(app, ["info", str(out)])
    assert info.exit_code == 0, info.output
    assert "set 'authors', up to 5 text variant(s) per query" in info.output
    assert "sentence 2: train 2 (as_is): '{text} Please output segmentation mask.'" in info.output
    json.loads(json.dumps(FeatureStore.open(out).text_variants))


def test_the_set_of_an_identity_rebuilds_the_same_questions():
    """lens-segment rebuilds the live backbone with the question set its run's store recorded."""
    from lens_cache.errors import UsageError
    from lens_cache.questions import QUESTION_SETS, question_set_of

    authors = QUESTION_SETS["authors"]
    assert question_set_of(authors.identity()) is authors
    single = question_set_of({"question_template": "Can you segment the {text} in this image?"})
    assert single.identity() == QUESTION_SETS["single"].identity()
    assert question_set_of({}) is None
    changed = authors.identity()
    changed["question_set"] = {**changed["question_set"], "name": "elsewhere"}
    with pytest.raises(UsageError, match="'elsewhere' is not one of"):
        question_set_of(changed)
