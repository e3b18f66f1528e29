"""Building stores: resume after SIGKILL, refusals, skipped images, dask == serial bit for bit."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from lens_cache.build import build_cache, first_images
from lens_cache.errors import LockHeldError
from lens_cache.store import (
    ATTRS_KEY,
    PARTIAL_KEY,
    FeatureStore,
    StoreError,
    manifest_to_parquet_bytes,
    open_group,
    verify_store,
)
from lens_cache.testing import FakeExtractor, damage_chunk, fake_factory, make_test_manifest

SPEC = "testset:val"


def assert_stores_identical(a: FeatureStore, b: FeatureStore) -> None:
    """Same self-description (but for the creation's own build_id), same manifest, every array equal bit for bit."""
    assert {**a.attrs, "build_id": None} == {**b.attrs, "build_id": None}
    assert a.manifest.equals(b.manifest)
    assert a.array_names() == b.array_names()
    for name in a.array_names():
        x, y = a.array(name)[:], b.array(name)[:]
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert x.tobytes() == y.tobytes(), name


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes): a store, bit for bit."""
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def count_logged_images(log: Path) -> int:
    return sum(int(line) for line in log.read_text().split()) if log.exists() else 0


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return make_test_manifest(tmp_path_factory.mktemp("images"), num_images=12, seed=1)


@pytest.fixture(scope="module")
def reference(manifest, tmp_path_factory) -> FeatureStore:
    """The store built in one go, serially."""
    out = tmp_path_factory.mktemp("reference") / "store"
    return build_cache(manifest, out, fake_factory(), spec=SPEC, block_size=2, batch_size=1, progress=False)


def test_resume_after_sigkill_of_a_real_run(manifest, reference, tmp_path):
    manifest_file = tmp_path / "manifest.parquet"
    pq.write_table(manifest, manifest_file)
    out, first_log, second_log = tmp_path / "store", tmp_path / "calls-1.txt", tmp_path / "calls-2.txt"
    command = [sys.executable, "-m", "lens_cache.testing", "--manifest", str(manifest_file), "--out", str(out)]
    command += ["--block-size", "2", "--batch-size", "1", "--delay", "0.25", "--log", str(first_log)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    flags = out / "blocks" / "done" / "c"
    deadline = time.monotonic() + 60
    while not (flags.exists() and len(os.listdir(flags)) >= 2):
        assert process.poll() is None, process.communicate()[1].decode()
        assert time.monotonic() < deadline, "the build never finished two blocks"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()

    killed = FeatureStore.open(out, require_complete=False)
    assert not killed.complete
    done_before = [int(b) for b in np.flatnonzero(killed.done_flags())]
    assert 2 <= len(done_before) < killed.num_blocks
    with pytest.raises(StoreError, match=r"is incomplete \(\d+/6 blocks\): rerun"):
        FeatureStore.open(out)
    done_images = [j for b in done_before for j in killed.block_image_range(b)]
    chunk_files = [out / "images" / "mllm_l14" / "c" / str(j) / "0" / "0" for j in done_images]
    mtimes = {path: path.stat().st_mtime_ns for path in chunk_files}

    resumed = build_cache(
        manifest, out, fake_factory(call_log=second_log), spec=SPEC, block_size=2, batch_size=1, progress=False
    )
    # Finished blocks were not recomputed, nor rewritten; the rest was.
    assert count_logged_images(second_log) == killed.num_images - len(done_images)
    assert {path: path.stat().st_mtime_ns for path in chunk_files} == mtimes
    assert_stores_identical(resumed, reference)
    assert verify_store(out).ok


def test_all_blocks_done_but_not_marked_complete(manifest, tmp_path):
    """Killed between the last done flag and the completion marker: the rerun only finalises."""
    out, log = tmp_path / "store", tmp_path / "calls.txt"
    build_cache(manifest, out, fake_factory(), spec=SPEC, block_size=4, progress=False)
    group = open_group(FeatureStore.open(out).location, mode="r+")
    group.attrs.put({ATTRS_KEY: {**group.attrs[ATTRS_KEY], "complete": False}})
    finished = build_cache(manifest, out, fake_factory(call_log=log), spec=SPEC, block_size=4, progress=False)
    assert finished.complete and count_logged_images(log) == 0
    again = build_cache(manifest, out, fake_factory(call_log=log), spec=SPEC, block_size=4, progress=False)
    assert again.complete and count_logged_images(log) == 0  # complete: report and return


def test_killed_while_creating_is_recreated(manifest, tmp_path):
    out = tmp_path / "store"
    import zarr

    zarr.open_group(str(out), mode="w").attrs.put({PARTIAL_KEY: {"format_version": 1}})
    with pytest.raises(StoreError, match="killed while being created"):
        FeatureStore.open(out)
    assert build_cache(manifest, out, fake_factory(), spec=SPEC, progress=False).complete


@pytest.mark.parametrize(
    ("factory", "block_size", "expected"),
    [
        (
            fake_factory(layers=(14, 30)),
            2,
            "store {out} was built with layers [14] but this build asks for [14, 30]: use another --out or --overwrite",
        ),
        (
            fake_factory(prompt_template="Q: {question} A:"),
            2,
            "prompt_template 'USER: <image>\\n{question} ASSISTANT:' but this build asks for 'Q: {question} A:'",
        ),
        (fake_factory(sam="other-sam"), 2, "sam.name 'fake-sam' but this build asks for 'other-sam'"),
        (fake_factory(), 3, "block_size 2 but this build asks for 3"),
    ],
)
def test_refuses_a_store_of_another_build(manifest, reference, factory, block_size, expected):
    with pytest.raises(StoreError) as error:
        build_cache(manifest, reference.url, factory, spec=SPEC, block_size=block_size, progress=False)
    message = str(error.value)
    assert "\n" not in message
    assert expected.replace("{out}", reference.url) in message


def test_refuses_another_manifest_and_foreign_folders(manifest, reference, tmp_path):
    with pytest.raises(StoreError, match=r"manifest [0-9a-f]{12} \(\d+ queries\) but this build's manifest is"):
        build_cache(first_images(manifest, 5), reference.url, fake_factory(), spec=SPEC, block_size=2, progress=False)
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("precious")
    with pytest.raises(StoreError, match="is not a lens feature store: refusing"):
        build_cache(manifest, foreign, fake_factory(), spec=SPEC, overwrite=True, progress=False)
    assert (foreign / "notes.txt").read_text() == "precious"


def test_overwrite_rebuilds(manifest, tmp_path):
    out = tmp_path / "store"
    build_cache(manifest, out, fake_factory(), spec=SPEC, progress=False)
    rebuilt = build_cache(manifest, out, fake_factory(layers=(14, 30)), spec=SPEC, overwrite=True, progress=False)
    assert rebuilt.layers == (14, 30) and verify_store(out).ok


def test_corrupt_and_missing_images_are_skipped_and_listed(tmp_path):
    manifest = make_test_manifest(tmp_path / "images", num_images=7, seed=2, corrupt=[1], missing=[4])
    store = build_cache(manifest, tmp_path / "store", fake_factory(), spec=SPEC, block_size=3, progress=False)
    assert store.complete and store.attrs["num_failed_images"] == 2
    failed = store.failed_images()
    assert [(f["image_index"], f["image_id"], f["reason"]) for f in failed] == [
        (1, "img_0001", "unreadable"),
        (4, "img_0004", "missing"),
    ]
    bad_queries = set(np.flatnonzero(np.isin(store.image_index, [1, 4])))
    assert set(store.valid_query_ids()) == set(range(store.num_queries)) - bad_queries
    assert set(np.flatnonzero(store.array("queries/failed")[:])) == bad_queries
    with pytest.raises(StoreError, match="skipped at build time"):
        store.read_query(min(bad_queries), 14)
    store.read_query(int(store.first_query[2]), 14)
    report = verify_store(store.url)
    assert report.ok and [f["image_index"] for f in report.failed_images] == [1, 4]
    assert any("img_0004" in line and "missing" in line for line in report.lines())


def test_progress_line(manifest, tmp_path, capsys):
    build_cache(first_images(manifest, 4), tmp_path / "store", fake_factory(), spec=SPEC, block_size=2, progress=True)
    err = capsys.readouterr().err
    assert "4/4 images (100.0%)" in err and "img/s" in err and "q/s" in err and "ETA" in err


def test_manifest_contract_is_checked(manifest, tmp_path):
    shuffled = manifest.take([1, 0] + list(range(2, manifest.num_rows)))
    with pytest.raises(ValueError, match="query_id must equal the row index"):
        build_cache(shuffled, tmp_path / "s", fake_factory(), spec=SPEC, progress=False)
    with pytest.raises(ValueError, match="unknown compression"):
        build_cache(manifest, tmp_path / "s", fake_factory(), spec=SPEC, compression="jpeg", progress=False)


def test_backbone_disagreeing_with_its_tokeniser_fails_loudly(manifest, tmp_path):
    class Liar(FakeExtractor):
        """Its forward sees one token fewer than its tokeniser promised."""

        def extract(self, images, questions):
            features = super().extract(images, questions)
            for feature in features:
                feature.text_states = [{k: v[:-1] for k, v in states.items()} for states in feature.text_states]
            return features

    with pytest.raises(RuntimeError, match="text states of query 0"):
        build_cache(first_images(manifest, 2), tmp_path / "s", Liar, spec=SPEC, progress=False)


def test_dask_local_cluster_equals_serial_build(manifest, reference, tmp_path):
    """Two worker processes, one task per block: the same bytes as the serial build."""
    distributed_store = build_cache(
        manifest, tmp_path / "dask", fake_factory(), spec=SPEC, block_size=2, batch_size=1, workers=2, progress=False
    )
    assert_stores_identical(distributed_store, reference)
    assert verify_store(distributed_store.url).ok


def test_store_holds_the_mllm_decoder_layers_for_the_warm_start(toy_sam_store, reference, tmp_path):
    """Paper 3.1: the head starts as the MLLM's decoder layers k, k+1, for every cached layer k (14 and 30)."""
    import hashlib

    from lens_cache.backbones import LensFeatureExtractor, LlavaBackbone
    from lens_cache.warm_start import warm_start_file
    from lens_cache.store import WARM_START_FILE
    from safetensors.torch import load

    store, mllm = toy_sam_store.store, toy_sam_store.extractor.mllm
    record = store.warm_start
    data = store.location.read_bytes(WARM_START_FILE)
    assert record == {"file": WARM_START_FILE, "layers": [14, 15], "by_layer": {"14": [14, 15], "30": [30, 31]},
                      "sha256": hashlib.sha256(data).hexdigest(),
                      "head": {"hidden_size": 64, "num_heads": 4, "mlp_size": 128, "rms_norm_eps": 1e-6,
                               "rope_theta": 10000.0}}
    tensors = load(data)
    assert {key.split(".")[1] for key in tensors} == {"14", "15", "30", "31"}
    for index in (14, 15, 30, 31):
        expected = mllm.decoder_layer_state_dict(index)
        assert {k.removeprefix(f"decoder.{index}.") for k in tensors if k.startswith(f"decoder.{index}.")} == set(expected)
        assert all(torch.equal(tensors[f"decoder.{index}.{name}"], value) for name, value in expected.items())
    assert verify_store(store.url).ok

    sam = toy_sam_store.extractor.sam
    # Adjacent layers share a decoder layer: it is saved once.
    adjacent = warm_start_file(LensFeatureExtractor(
        mllm=LlavaBackbone(mllm.model, mllm.processor, name_or_path="tiny", layers=(14, 15)), sam=sam))
    assert adjacent["by_layer"] == {"14": [14, 15], "15": [15, 16]}
    # The last layer has no k+1: none for it, the other layer's still written.
    path = tmp_path / "partial.safetensors"
    partial = warm_start_file(LensFeatureExtractor(
        mllm=LlavaBackbone(mllm.model, mllm.processor, name_or_path="tiny", layers=(14, 31)), sam=sam), path)
    assert partial["by_layer"] == {"14": [14, 15], "31": None} and partial["layers"] == [14, 15]
    assert {key.split(".")[1] for key in load(path.read_bytes())} == {"14", "15"}
    assert partial["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    # No cached layer has one, or no decoder at all: nothing written, and why.
    last = LlavaBackbone(mllm.model, mllm.processor, name_or_path="tiny", layers=(31,))
    assert warm_start_file(LensFeatureExtractor(mllm=last, sam=sam), tmp_path / "none.safetensors") == {
        "layers": None, "reason": "no warm start for layer 31: the MLLM has no decoder layer 32 (it has 32: 0..31)"}
    assert not (tmp_path / "none.safetensors").exists()
    reason = "no warm start for layer 14: the fake backbone has no decoder layers"
    assert reference.warm_start == {"layers": None, "reason": reason}
    assert not reference.location.filesystem()[0].exists(f"{reference.location.local_path}/{WARM_START_FILE}")


def test_rebuild_repairs_exactly_the_damaged_blocks(manifest, reference, tmp_path):
    """Issue 11: the build command recomputes the damaged blocks only, and the store is then bit-identical."""
    out, log = tmp_path / "store", tmp_path / "calls.txt"
    shutil.copytree(reference.location.local_path, out)
    damage_chunk(out / "images" / "sam" / "c" / "1" / "0" / "0" / "0", "deleted")  # image 1: block 0
    query = int(reference.first_query[6])  # image 6's first query: block 3
    damage_chunk(out / "queries" / "text_l14" / "c" / str(query) / "0" / "0", "truncated")
    damage_chunk(out / "images" / "mllm_l14" / "c" / "9" / "0" / "0", "flipped")  # image 9: block 4
    (out / "manifest.parquet").write_bytes(manifest_to_parquet_bytes(first_images(manifest, 3), spec=SPEC))
    report = verify_store(out)
    assert not report.ok and report.damaged_blocks == [0, 3, 4]

    repaired = build_cache(manifest, out, fake_factory(call_log=log), spec=SPEC, block_size=2, batch_size=1, progress=False)
    assert count_logged_images(log) == 6  # blocks 0, 3 and 4, two images each; nothing else recomputed
    assert repaired.complete and verify_store(out).ok
    assert tree_bytes(out) == tree_bytes(reference.location.local_path)
    build_cache(manifest, out, fake_factory(call_log=log), spec=SPEC, block_size=2, batch_size=1, progress=False)
    assert count_logged_images(log) == 6  # intact and complete: the rerun only checks


def test_a_build_killed_while_creating_the_store_is_recreated(manifest, reference, tmp_path, monkeypatch):
    """A kill between the group's creation and its last metadata write leaves a store marked partial (the marker
    is in the group's first write), which the next build recreates; it was once refused as "not a lens store"."""
    import zarr.core.attributes
    from lens_cache.store_location import StoreLocation, store_state

    class Killed(BaseException):
        pass

    def killed(self, *args, **kwargs):
        raise Killed

    out = tmp_path / "store"
    monkeypatch.setattr(zarr.core.attributes.Attributes, "put", killed)  # every later metadata write "kills" it
    with pytest.raises(Killed):
        build_cache(manifest, out, fake_factory(), spec=SPEC, block_size=2, progress=False)
    monkeypatch.undo()
    assert store_state(StoreLocation(str(out))) == "partial"
    finished = build_cache(manifest, out, fake_factory(), spec=SPEC, block_size=2, batch_size=1, progress=False)
    assert_stores_identical(finished, reference)


def test_a_second_build_of_a_store_is_refused_and_a_dead_builds_lock_taken_over(manifest, reference, tmp_path, capsys):
    """Issue 11: two builds on one store both ran; now the second is refused, naming the first."""
    manifest_file = tmp_path / "manifest.parquet"
    pq.write_table(manifest, manifest_file)
    out = tmp_path / "store"
    command = [sys.executable, "-m", "lens_cache.testing", "--manifest", str(manifest_file), "--out", str(out)]
    process = subprocess.Popen([*command, "--block-size", "2", "--delay", "0.25"], stderr=subprocess.PIPE)
    lock = tmp_path / "store.lock"
    deadline = time.monotonic() + 60
    while not (lock.exists() and lock.read_text().strip()):
        assert process.poll() is None, process.communicate()[1].decode()
        assert time.monotonic() < deadline, "the first build never took its lock"
        time.sleep(0.02)
    try:
        with pytest.raises(LockHeldError) as error:
            build_cache(manifest, out, fake_factory(), spec=SPEC, block_size=2, progress=False)
        holder = f"lens-cache build (pid {process.pid} on {socket.gethostname()}, since "
        assert str(error.value).startswith(f"{out} is in use by {holder}") and "\n" not in str(error.value)
        assert str(error.value).endswith(f"wait for it to finish or stop it (two writers would mix their output; lock file {lock})")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert lock.exists()  # a dead process's lock: the next build takes it over and finishes the store
    finished = build_cache(manifest, out, fake_factory(), spec=SPEC, block_size=2, batch_size=1, progress=True)
    assert f"took over the lock of lens-cache build (pid {process.pid} on" in capsys.readouterr().err
    assert not lock.exists()
    assert_stores_identical(finished, reference)


def test_a_resume_under_other_library_versions_is_refused_unless_allowed(manifest, tmp_path, monkeypatch):
    """Issue 24 row 11: the versions that shape the features are recorded; a resume (or a repair) under other
    versions would mix two kinds of features, so it is refused in one line, or, when allowed, recorded."""
    import lens_cache.store_writer as store_writer
    from lens_cache.version import library_versions

    out = tmp_path / "store"
    store = build_cache(manifest, out, fake_factory(), spec=SPEC, block_size=4, progress=False)
    assert store.attrs["libraries"] == library_versions() and "libraries_mixed" not in store.attrs
    # a build killed after its first block: the others not done
    group = open_group(store.location, mode="r+")
    group["blocks/done"][1:] = 0
    attrs = dict(group.attrs[ATTRS_KEY])
    group.attrs.put({ATTRS_KEY: {**attrs, "complete": False}})
    upgraded = {**library_versions(), "transformers": "99.0"}
    monkeypatch.setattr(store_writer, "library_versions", lambda: upgraded)
    before = tree_bytes(out)
    with pytest.raises(StoreError, match=r"was built with other library versions \(transformers .* -> 99\.0\).*"
                                         r"--allow-library-change"):
        build_cache(manifest, out, fake_factory(), spec=SPEC, progress=False)
    assert tree_bytes(out) == before  # nothing written
    resumed = build_cache(manifest, out, fake_factory(), spec=SPEC, progress=False, allow_library_change=True)
    assert resumed.complete and resumed.attrs["libraries"] == library_versions()  # what it was created with
    assert resumed.attrs["libraries_mixed"] == [upgraded]
    assert verify_store(resumed.url).ok


def test_readers_and_rebuilds_exclude_each_other(manifest, tmp_path):
    """Issue 24 row 3: while a training or an evaluation reads a store (a shared lock beside it), a build that
    would change it (--overwrite, a resume, a repair) is refused in one line; while a build changes it, a reader
    is refused; afterwards both go on, and the build leaves no lock file."""
    from lens_cache.locks import no_readers, reading

    out = tmp_path / "store"
    build_cache(manifest, out, fake_factory(), spec=SPEC, block_size=4, progress=False)
    with reading(out), reading(out):  # readers share
        with pytest.raises(LockHeldError, match=r"is being read by another process .*wait for that process to finish"):
            build_cache(manifest, out, fake_factory(), spec=SPEC, progress=False, overwrite=True)
        assert FeatureStore.open(out).complete  # untouched
    with no_readers(out):
        with pytest.raises(LockHeldError, match=r"is being rebuilt or repaired by another process"):
            with reading(out):
                pass
    build_cache(manifest, out, fake_factory(), spec=SPEC, progress=False, overwrite=True)
    assert not (tmp_path / "store.readers").exists() and not (tmp_path / "store.lock").exists()


def test_training_holds_its_stores_read_lock(manifest, tmp_path, monkeypatch):
    """lens-train takes the readers' lock of every --cache for the whole run."""
    from lens_train.training import trainer

    out = tmp_path / "store"
    build_cache(manifest, out, fake_factory(), spec=SPEC, block_size=4, progress=False)
    seen = []

    def fake_train(request, log=None):
        with pytest.raises(LockHeldError):
            build_cache(manifest, out, fake_factory(), spec=SPEC, progress=False, overwrite=True)
        seen.append(True)

    monkeypatch.setattr(trainer, "_train", fake_train)
    trainer.train(trainer.TrainRequest(caches=(str(out),), out=tmp_path / "run", quiet=True))
    assert seen == [True]


def test_a_reader_of_a_rebuilt_store_is_told_so_not_to_repair(manifest, tmp_path):
    """A reader that did not lock (an older process) and finds other bytes: the store was rebuilt under it, which
    it says, instead of calling the store damaged and advising a repair."""
    from lens_cache.errors import StoreReplacedError

    out = tmp_path / "store"
    build_cache(manifest, out, fake_factory(), spec=SPEC, block_size=4, progress=False)
    old = FeatureStore.open(out)
    old.read_sample("images/mllm_l14", 0)  # its block's checksums are now known to this reader
    build_cache(manifest, out, fake_factory(hidden_size=8), spec=SPEC, block_size=4, progress=False, overwrite=True)
    with pytest.raises(StoreReplacedError, match=r"was rebuilt while this process read it.*start this command again"):
        old.read_sample("images/mllm_l14", 1)
    shutil.rmtree(out)
    with pytest.raises(StoreReplacedError, match="was removed while this process read it"):
        old.read_sample("images/mllm_l14", 5)


def test_links_inside_a_store_are_read_through_never_deleted_through(manifest, tmp_path):
    """The symlink policy (issue 24): a store assembled from links reads (and verifies) as the files they name;
    --overwrite removes a link, never what it points to; a store whose root is a link is replaced beside it."""
    out = tmp_path / "store"
    build_cache(manifest, out, fake_factory(), spec=SPEC, block_size=4, progress=False)
    elsewhere = tmp_path / "elsewhere"
    shutil.move(out / "images" / "sam", elsewhere)
    (out / "images" / "sam").symlink_to(elsewhere, target_is_directory=True)
    assert verify_store(out).ok  # read through the link, every checksum checked
    kept = tree_bytes(elsewhere)
    build_cache(manifest, out, fake_factory(), spec=SPEC, block_size=4, progress=False, overwrite=True)
    assert tree_bytes(elsewhere) == kept and not (out / "images" / "sam").is_symlink()
    linked_root = tmp_path / "root-link"
    linked_root.symlink_to(out, target_is_directory=True)
    build_cache(manifest, linked_root, fake_factory(), spec=SPEC, block_size=4, progress=False, overwrite=True)
    assert tree_bytes(out)  # the linked store was not deleted through its link


def test_evaluation_holds_its_stores_read_lock(manifest, tmp_path, monkeypatch):
    """lens-eval takes the readers' lock of its --cache for the whole evaluation."""
    from lens_train.evaluation import evaluate as evaluation

    out = tmp_path / "store"
    build_cache(manifest, out, fake_factory(), spec=SPEC, block_size=4, progress=False)
    seen = []

    def fake_evaluate(run_dir, cache, **options):
        with pytest.raises(LockHeldError):
            build_cache(manifest, out, fake_factory(), spec=SPEC, progress=False, overwrite=True)
        seen.append(cache)
        return {}

    monkeypatch.setattr(evaluation, "_evaluate", fake_evaluate)
    evaluation.evaluate(tmp_path / "run", str(out))
    assert seen == [str(out)]
