"""Table 1 at toy scale (lens_train.reproduction.table1): the measured child's own memory and time,
the random rows, the table's cells from their inputs."""

from __future__ import annotations

import json
import sys

import pytest

from lens_train.errors import UserError
from lens_train.reproduction import table1


def test_each_child_reports_its_own_peak_memory(tmp_path):
    say = lambda line: None  # noqa: E731
    big = table1.measured_child([sys.executable, "-c", "import time; b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(0.6)"],
                                tmp_path / "big.json", say=say)
    small = table1.measured_child([sys.executable, "-c", "pass"], tmp_path / "small.json", say=say)
    assert big["peak_rss_bytes"] > small["peak_rss_bytes"] + 250 * 2**20  # the later, smaller child is not the max
    assert small["peak_rss_bytes"] < 200 * 2**20
    assert json.loads((tmp_path / "small.json").read_text())["peak_rss_bytes"] == small["peak_rss_bytes"]
    with pytest.raises(UserError, match="exit status 3"):
        table1.measured_child([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "bad.json", say=say)
    assert not (tmp_path / "bad.json").exists()


def test_random_vqa_is_chance_per_type():
    scores = table1.random_vqa(scenes=30)
    assert 0.35 < scores["acc_yesno"] < 0.65  # two answers
    assert scores["acc_colour"] < 0.35  # six colours
    assert set(scores) >= {"acc_colour", "acc_shape", "acc_size", "acc_count", "acc_yesno", "acc_verify"}


def _mme(total_per_subtask: float, subtasks: int = 4, lens: dict | None = None) -> dict:
    report = {"subtasks": {f"s{i}": {} for i in range(subtasks)},
              "perception": {"score": total_per_subtask * subtasks}, "cognition": {"score": 0.0}}
    if lens is not None:
        report["lens"] = lens
    return report


def test_the_table_shows_what_it_was_given():
    seg = {row: {"reason": {"giou": g, "ciou": g + 0.1}, "refer": {"giou": g / 2, "ciou": g / 2}}
           for row, g in (("lens", 0.4), ("lisa", 0.3))}
    mme = {"mllm": _mme(100.0), "lisa": _mme(20.0), "lens": _mme(100.0, lens={"identical": True, "differences": 0})}
    vqa = {row: {f"acc_{t}": v for t in table1.VQA_TYPES} for row, v in
           (("random", 0.25), ("mllm", 0.9), ("lisa", 0.5), ("lens", 0.9))}
    stats = {"lens": {"peak_rss_bytes": 2**30, "wall_s": 120.0}, "lisa": {"peak_rss_bytes": 3 * 2**30, "wall_s": 600.0}}
    settings = type("S", (), {"preset": "toy", "mllm": "toy"})()
    text = table1.render_table1(settings, seg=seg, mme=mme, vqa=vqa, stats=stats, params={"lens": 1234, "lisa": 5678},
                                checksums={"toy": "a", "lens": "a", "lisa": "b"}, lisa_steps=600, provenance="made here")
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert "| 1.00 GB (16 + 10 GB x 8) | 2.0 min | 1,234 | 40.0 / 50.0 (57.3) | 20.0 / 20.0 | 400.0 (1801.4) |" \
        in rows["LENS (toy)"]
    assert "| 3.00 GB (30 GB x 8) | 10.0 min | 5,678 | 30.0 / 40.0 (56.9) | 15.0 / 15.0 | 80.0 (184.5) |" \
        in rows["LISA-style (toy)"]
    assert "300.0 (expected) (1050.0)" in rows["random guess"] and "| 25.0 |" in rows["random guess"]
    assert "| 90.0 |" in rows["toy LLaVA alone"]
    assert "LENS attached: toy-MME answers identical to the plain MLLM's (0 differ)" in text
    assert "checksum equal to the toy LLaVA's after LENS: True; changed by the LISA-style fine-tune: True" in text


def test_paper_preset_asks_mme_with_and_without_lens(tmp_path, monkeypatch):
    """--preset paper: Table 2's LENS run (stages replaced here), its ReasonSeg test score, MME from MME_ROOT
    asked of the MLLM alone and with LENS attached; the LISA row only with --lisa-mllm; no MME_ROOT: one line."""
    from lens_train.reproduction import reproduce

    asked = []
    monkeypatch.setattr(reproduce, "train_run", lambda settings, run, caches, prefix: tmp_path / "runs" / "lens")
    monkeypatch.setattr(table1, "training_stores", lambda settings: ["train-store"])
    monkeypatch.setattr(table1, "build_store", lambda settings, spec, layers: f"store:{spec}")
    monkeypatch.setattr(table1, "evaluate_run", lambda settings, run, cache, spec: {"giou": 0.5, "ciou": 0.6})
    monkeypatch.setattr(table1, "trained_parameters", lambda run, kind: 42)

    def fake_mme(root, out, *, mllm=None, checkpoint=None, say):
        asked.append((mllm, checkpoint))
        return _mme(100.0, subtasks=14, lens={"identical": True, "differences": 0, "mllm_unchanged": True}
                    if checkpoint else None)

    monkeypatch.setattr(table1, "toy_mme_score", fake_mme)
    (tmp_path / "mme").mkdir()
    settings = reproduce.Settings(preset="paper", work=tmp_path / "work", results=tmp_path / "results",
                                  data_root=tmp_path, mllm="/ckpt/llava", sam="vit_h:/ckpt/sam.pth",
                                  mme_root=tmp_path / "mme", quiet=True)
    text = table1.reproduce_table1(settings).read_text()
    assert asked == [("/ckpt/llava", None), (None, tmp_path / "runs" / "lens")]
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert "| 50.0 / 60.0 (57.3) |" in rows["LENS"] and "| 1400.0 (1801.4) |" in rows["LENS"]
    assert "| — | — (56.9) | — | — (184.5) |" in rows["LISA-style"]
    assert "1050.0 (expected) (1050.0)" in rows["random guess"]
    assert "MME answers identical to the plain MLLM's (0 differ), MLLM checksum unchanged: True" in text
    settings.mme_root = None
    with pytest.raises(UserError, match="needs MME_ROOT"):
        table1.reproduce_table1(settings)
