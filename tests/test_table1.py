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
    settings = type("S", (), {"preset": "toy"})()
    text = table1.render_table1(settings, seg=seg, mme=mme, vqa=vqa, stats=stats, params={"lens": 1234, "lisa": 5678},
                                checksums={"toy": "a", "lens": "a", "lisa": "b"}, lisa_steps=600, provenance="made here")
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert "| 1.00 GB (16 + 10 GB x 8) | 2.0 min | 1,234 | 40.0 / 50.0 (57.3) | 20.0 / 20.0 | 400.0 (1801.4) |" \
        in rows["LENS (toy)"]
    assert "| 3.00 GB (30 GB x 8) | 10.0 min | 5,678 | 30.0 / 40.0 (56.9) | 15.0 / 15.0 | 80.0 (184.5) |" \
        in rows["LISA-style (toy)"]
    assert "300.0 (expected) (1050.0)" in rows["random guess"] and "| 25.0 |" in rows["random guess"]
    assert "| 90.0 |" in rows["toy LLaVA alone"]
    assert "answers identical to the plain toy LLaVA's (0 differ); MLLM checksum unchanged by LENS: True; " \
           "changed by the LISA-style fine-tune: True" in text
