"""lens-general: MME reader and official scoring, the toy MME, the routing reader and metrics,
end-to-end runs on the tiny random LLaVA, and answers with LENS attached equal to the plain MLLM's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from lens_train.errors import UserError
from lens_train.general.answer import MME_SUFFIX, mme_prompt
from lens_train.general.cli import app
from lens_train.general.mme import (
    COGNITION,
    PERCEPTION,
    RELEASE_FOLDER,
    SUBTASKS,
    parse_prediction,
    read_mme,
    score_mme,
    subtask_score,
)
from lens_train.general.routing import parse_tier_map, read_routing, routing_metrics
from lens_train.general.toy_mme import TOY_LAYOUTS, TOY_MME_STREAM, toy_items, write_toy_mme
from lens_train.general.toy_routing import write_toy_routing

# ----------------------------------------------------------------------------- helpers


def _image(path: Path, colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), colour).save(path)
    return path


def _text(path: Path, lines: list[str], newline: str = "\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(newline.join(lines).encode() + newline.encode())
    return path


def _small_release(tmp_path: Path) -> Path:
    """Two subtasks, one per layout, plus eval_tool/ (in the real release; not a subtask)."""
    root = tmp_path / RELEASE_FOLDER
    _image(root / "code_reasoning" / "0020.png")
    _text(root / "code_reasoning" / "0020.txt",
          ["The image shows a python code. Is the output of the code 'Hello'? Please answer yes or no.\tYes",
           "The image shows a python code. Is the output of the code 'World'? Please answer yes or no.\tNo"])
    _image(root / "artwork" / "images" / "10002.jpg")
    _text(root / "artwork" / "questions_answer_YN" / "10002.txt",
          ["Is this artwork created by Titian? Please answer yes or no.\tyes ",
           "", "Is this artwork created by Rubens? Please answer yes or no.\tNO"], newline="\r\n")
    _image(root / "artwork" / "images" / "10003.jpeg")
    _text(root / "artwork" / "questions_answer_YN" / "10003.txt", ["Is it a painting?\tYes", "Is it a photo?\tNo"])
    (root / "eval_tool").mkdir()
    return root


def _rows(subtask: str, answers: list[tuple[str, str]], image_size: int = 2) -> list[dict]:
    """Graded records: (answer, prediction) pairs, ``image_size`` consecutive ones per image."""
    rows = []
    for i, (answer, prediction) in enumerate(answers):
        parsed = parse_prediction(prediction)
        rows.append({"subtask": subtask, "image": f"{i // image_size}.jpg", "parsed": parsed,
                     "correct": parsed == answer.lower()})
    return rows


# ----------------------------------------------------------------------------- MME reader


def test_reader_reads_both_layouts(tmp_path):
    root = _small_release(tmp_path)
    for given in (root, tmp_path):  # the release folder, or the folder holding it
        found = read_mme(given)
        assert found.root == root.resolve()
        assert found.layouts == {"artwork": "b", "code_reasoning": "a"}
        assert found.subtasks == ["artwork", "code_reasoning"]  # MME's order
        assert found.missing_subtasks == [s for s in SUBTASKS if s not in ("artwork", "code_reasoning")]
        qs = found.questions
        assert [(q.subtask, q.image, q.answer) for q in qs] == [
            ("artwork", "10002.jpg", "Yes"), ("artwork", "10002.jpg", "No"),
            ("artwork", "10003.jpeg", "Yes"), ("artwork", "10003.jpeg", "No"),
            ("code_reasoning", "0020.png", "Yes"), ("code_reasoning", "0020.png", "No")]
        assert qs[0].question == "Is this artwork created by Titian? Please answer yes or no."  # CRLF, spaces gone
        assert qs[0].image_path == (root / "artwork" / "images" / "10002.jpg").resolve()
        assert found.num_images() == 3 and found.missing_images == []
    assert [q.image for q in read_mme(root, limit=1).questions] == ["10002.jpg"] * 2 + ["0020.png"] * 2
    assert {q.subtask for q in read_mme(root, subtasks=["code_reasoning"]).questions} == {"code_reasoning"}


def test_missing_image_is_skipped_and_counted(tmp_path):
    root = _small_release(tmp_path)
    _text(root / "code_reasoning" / "0021.txt", ["Q1?\tYes", "Q2?\tNo"])  # no 0021.png
    found = read_mme(root)
    assert found.missing_images == ["code_reasoning/0021"] and found.skipped_questions == 2
    assert len(found.questions) == 6


@pytest.mark.parametrize("escape", ["image", "subtask", "questions"])
def test_paths_leaving_the_root_are_refused(tmp_path, escape):
    root = _small_release(tmp_path / "data")
    outside = tmp_path / "outside"
    _image(outside / "0030.png")
    _text(outside / "0030.txt", ["Q?\tYes", "Q2?\tNo"])
    if escape == "image":
        _text(root / "code_reasoning" / "0030.txt", ["Q?\tYes", "Q2?\tNo"])
        (root / "code_reasoning" / "0030.png").symlink_to(outside / "0030.png")
    elif escape == "subtask":
        (root / "existence").symlink_to(outside, target_is_directory=True)
    else:
        (root / "scene" / "questions_answer_YN").parent.mkdir()
        (root / "scene" / "questions_answer_YN").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UserError, match="outside the data root") as info:
        read_mme(root)
    assert "\n" not in str(info.value)


def test_a_link_inside_the_root_is_fine(tmp_path):
    root = _small_release(tmp_path)
    _text(root / "code_reasoning" / "0031.txt", ["Q?\tYes", "Q2?\tNo"])
    (root / "code_reasoning" / "0031.png").symlink_to(root / "code_reasoning" / "0020.png")
    assert len(read_mme(root).questions) == 8
    linked = tmp_path / "linked-root"  # a data root that is itself a link: resolved first, then confined to
    linked.symlink_to(root, target_is_directory=True)
    assert len(read_mme(linked).questions) == 8


def test_empty_or_absent_root_names_the_expected_folder(tmp_path):
    for root in (tmp_path, tmp_path / "absent"):
        with pytest.raises(UserError, match=RELEASE_FOLDER) as info:
            read_mme(root)
        assert "\n" not in str(info.value)


def test_bad_lines_and_options_are_one_line_errors(tmp_path):
    root = _small_release(tmp_path)
    with pytest.raises(UserError, match="unknown MME subtask"):
        read_mme(root, subtasks=["existance"])
    with pytest.raises(UserError, match="--limit"):
        read_mme(root, limit=0)
    _text(root / "code_reasoning" / "0022.txt", ["Is it?\tMaybe"])
    _image(root / "code_reasoning" / "0022.png")
    with pytest.raises(UserError, match=r"0022\.txt:1: expected 'question<TAB>Yes\|No'"):
        read_mme(root)


def test_an_unreadable_image_is_skipped_and_counted(tmp_path):
    from lens_train.general.answer import PlainAsker
    from lens_train.general.mme_eval import evaluate_mme

    root = _small_release(tmp_path)
    (root / "artwork" / "images" / "10003.jpeg").write_bytes(b"not a jpeg")
    asked = []
    plain = PlainAsker(lambda image, prompt, n: asked.append(prompt) or "Yes", max_new_tokens=3)
    records, report = evaluate_mme(read_mme(root), plain)
    assert len(records) == len(asked) == 4 and report["skipped"]["unreadable_images"] == 1
    assert report["skipped"]["listed"] == ["artwork/10003.jpeg"]
    assert report["subtasks"]["artwork"]["score"] == pytest.approx(50.0)  # always "Yes": acc 50, acc+ 0
    assert all(p.endswith("\n" + MME_SUFFIX) for p in asked)


# ----------------------------------------------------------------------------- scoring


@pytest.mark.parametrize("prediction, parsed", [
    ("Yes", "yes"), ("yes", "yes"), ("No", "no"), ("No.", "no"), ("YES.", "yes"), (" yes\n", "yes"),
    ("Yes, there is a dog.", "yes"), ("no, it is not", "no"),
    # calculation.py's quirks, kept: the first four characters decide
    ("not sure", "no"), ("none", "no"), ("eyes", "yes"), ("I think yes", "other"),
    ("", "other"), ("0. 3 4, 0. 4 0", "other"), ("maybe", "other"),
])
def test_parse_prediction_as_official(prediction, parsed):
    assert parse_prediction(prediction) == parsed


def test_scores_match_hand_computation():
    # image 0: both right; image 1: one right; image 2: "other" (wrong) + right.
    rows = _rows("existence", [("Yes", "Yes"), ("No", "no."), ("Yes", "yes"), ("No", "Yes"),
                               ("Yes", "hmm"), ("No", "No")])
    s = subtask_score(rows)
    assert s["correct"] == 4 and s["images_all_correct"] == 1 and s["other_answers"] == 1
    assert s["acc"] == pytest.approx(400 / 6) and s["acc_plus"] == pytest.approx(100 / 3)
    assert s["score"] == pytest.approx(100.0) and s["unpaired_images"] == 0
    report = score_mme(rows + _rows("count", [("Yes", "Yes"), ("No", "No")])
                       + _rows("code_reasoning", [("Yes", "No"), ("No", "Yes")]))
    assert report["perception"]["score"] == pytest.approx(300.0)  # 100 + 200
    assert report["perception"]["subtasks"] == 2 and report["perception"]["max"] == 400
    assert not report["perception"]["complete"] and report["perception"]["of"] == 10
    assert report["cognition"]["score"] == 0.0 and report["cognition"]["max"] == 200
    assert "OCR" in report["missing_subtasks"] and "existence" not in report["missing_subtasks"]
    # an image with three questions: acc+ needs all three
    odd = subtask_score(_rows("color", [("Yes", "Yes"), ("No", "No"), ("No", "Yes")], image_size=3))
    assert odd["acc_plus"] == 0.0 and odd["unpaired_images"] == 1


def test_random_answers_score_75_per_subtask():
    rng = np.random.default_rng(0)
    rows = []
    for subtask in SUBTASKS:
        answers = [a for _ in range(3000) for a in ("Yes", "No")]
        guesses = rng.choice(["Yes", "No"], size=len(answers))
        rows += _rows(subtask, list(zip(answers, guesses)))
    report = score_mme(rows)
    scores = [report["subtasks"][s]["score"] for s in SUBTASKS]
    assert all(abs(score - 75.0) < 4.0 for score in scores), scores
    assert abs(np.mean(scores) - 75.0) < 1.0
    assert report["perception"]["score"] == pytest.approx(75.0 * len(PERCEPTION), abs=10)
    assert report["cognition"]["score"] == pytest.approx(75.0 * len(COGNITION), abs=8)
    assert report["perception"]["complete"] and report["cognition"]["complete"]
    assert report["perception"]["random_expectation"] == 750.0


def test_prompt_is_llavas():
    assert mme_prompt("Is it red? Please answer yes or no.") == f"Is it red? Please answer yes or no.\n{MME_SUFFIX}"
    assert mme_prompt("Is it red? Please answer yes or no.", "bare") == "Is it red?"
    assert MME_SUFFIX == "Answer the question using a single word or phrase."


# ----------------------------------------------------------------------------- toy MME


def test_toy_mme_round_trip(tmp_path):
    root = write_toy_mme(tmp_path / "toy", images=2)
    found = read_mme(tmp_path / "toy")
    assert found.root == root.resolve() and found.layouts == TOY_LAYOUTS
    assert len(found.questions) == 16 and found.num_images() == 8 and not found.missing_images
    assert {q.image_path.suffix for q in found.questions} == {".jpg", ".png"}
    by_image: dict = {}
    for q in found.questions:
        by_image.setdefault((q.subtask, q.image), []).append(q)
    assert all([q.answer for q in qs] == ["Yes", "No"] for qs in by_image.values())
    assert all(q.question.endswith("Please answer yes or no.") for q in found.questions)
    # the answers are true of the scenes (existence: the Yes pair is present, the No pair absent)
    for index, scene, ((yes_q, _), (no_q, _)) in toy_items("existence", 2):
        present = {f"a {s.colour} {s.kind} " for s in scene.shapes}
        assert any(p in yes_q for p in present) and not any(p in no_q for p in present)
    # a pure function of the arguments
    again = write_toy_mme(tmp_path / "again", images=2)
    assert (again / "count" / "1000000.txt").read_text() == (root / "count" / "1000000.txt").read_text()
    assert json.loads((root / "TOY_MME.json").read_text())["stream"] == TOY_MME_STREAM == 2
    with pytest.raises(UserError, match="toy MME subtasks"):
        write_toy_mme(tmp_path / "bad", images=1, subtasks=["OCR"])


# ----------------------------------------------------------------------------- routing reader


def _routing_images(root: Path, n: int) -> None:
    for i in range(n):
        _image(root / "imgs" / f"{i}.jpg")


ROUTING_RECORDS = [
    {"id": "a", "tier": "non_seg", "query": "What is this?", "image": "imgs/0.jpg"},
    {"qid": 7, "level": "Explicit", "question": "Segment the dog.", "image_path": "imgs/1.jpg"},
    {"question_id": "c", "category": "reason", "text": "What cuts bread?", "img": "imgs/2.jpg"},
    {"ID": "d", "type": "Hybrid", "prompt": "Describe it and segment the cat.", "file_name": "imgs/3.jpg"},
    {"id": "e", "tier": "none", "query": "Hello there"},  # no image: routed without one
    {"id": "f", "tier": "nonseg", "query": "Count them.", "image": "imgs/4.jpg"},
    {"id": "g", "tier": "mixed", "query": "Which one? Segment it.", "image": "imgs/5.jpg"},
    {"id": "h", "tier": "reasoning", "query": "The oldest one.", "image": "imgs/6.jpg"},
]


@pytest.mark.parametrize("form", ["jsonl", "array", "container"])
def test_routing_reader_reads_every_field_variant(tmp_path, form):
    _routing_images(tmp_path, 7)
    path = tmp_path / ("bench.jsonl" if form == "jsonl" else "bench.json")
    if form == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in ROUTING_RECORDS) + "\n\n")
    else:
        path.write_text(json.dumps(ROUTING_RECORDS if form == "array" else {"samples": ROUTING_RECORDS}, indent=1))
    found = read_routing(path)
    assert [s.id for s in found.samples] == ["a", "7", "c", "d", "e", "f", "g", "h"]
    assert [s.tier for s in found.samples] == ["non-seg", "explicit", "reasoning", "mixed", "non-seg", "non-seg",
                                               "mixed", "reasoning"]
    assert found.samples[2].query == "What cuts bread?" and found.samples[3].raw_tier == "Hybrid"
    assert found.samples[4].image is None and found.samples[1].image == (tmp_path / "imgs" / "1.jpg").resolve()
    assert [s.should_trigger for s in found.samples] == [False, True, True, True, False, False, True, True]
    assert len(read_routing(path, limit=3).samples) == 3


def test_routing_reader_tiers_images_and_errors(tmp_path):
    _routing_images(tmp_path, 2)
    path = tmp_path / "b.jsonl"

    def write(*records):
        path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
        return path

    write({"id": 1, "tier": "L0", "query": "hi", "image": "imgs/0.jpg"},
          {"id": 2, "tier": "L2", "query": "segment it", "image": "imgs/1.jpg"})
    with pytest.raises(UserError, match="unknown tier 'L0'.*--tier-map") as info:
        read_routing(path)
    assert "\n" not in str(info.value)
    mapped = read_routing(path, tier_map=parse_tier_map("L0=non-seg, L2 = Reasoning"))
    assert [s.tier for s in mapped.samples] == ["non-seg", "reasoning"]
    with pytest.raises(UserError, match="--tier-map entry"):
        parse_tier_map("L0=chitchat")
    # a missing image skips the sample, counted
    write({"id": 1, "tier": "explicit", "query": "segment it", "image": "imgs/0.jpg"},
          {"id": 2, "tier": "explicit", "query": "segment it", "image": "imgs/missing.jpg"})
    found = read_routing(path)
    assert [s.id for s in found.samples] == ["1"] and found.missing_images == ["2"]
    # images are confined to the image root
    _image(tmp_path / "elsewhere" / "x.jpg")
    write({"id": 1, "tier": "explicit", "query": "q", "image": "../elsewhere/x.jpg"})
    with pytest.raises(UserError, match="outside the data root"):
        read_routing(path, image_root=tmp_path / "imgs")
    write({"id": 1, "tier": "explicit", "query": "q", "image": str(tmp_path / "elsewhere" / "x.jpg")})
    with pytest.raises(UserError, match="outside the data root"):
        read_routing(path, image_root=tmp_path / "imgs")
    # one rule for every stage (lens_core.paths): a record's image is a relative name, even one inside the root
    write({"id": 1, "tier": "explicit", "query": "q", "image": str(tmp_path / "imgs" / "0.jpg")})
    with pytest.raises(UserError, match=r"is not a path inside .*imgs \(it is absolute\)"):
        read_routing(path, image_root=tmp_path / "imgs")
    (tmp_path / "imgs" / "linked.jpg").symlink_to(tmp_path / "elsewhere" / "x.jpg")
    write({"id": 1, "tier": "explicit", "query": "q", "image": "linked.jpg"})
    with pytest.raises(UserError, match="through a symlink, outside the data root; copy the file into"):
        read_routing(path, image_root=tmp_path / "imgs")
    write({"id": 1, "tier": "explicit", "image": "imgs/0.jpg"})
    with pytest.raises(UserError, match="has no a query"):
        read_routing(path)
    path.write_text('{"id": 1, "tier": "explicit", "query": "q"}\n{"id": 2, tier}\n')
    with pytest.raises(UserError, match=r"b\.jsonl:2 is not JSON"):
        read_routing(path)
    with pytest.raises(UserError, match="not found"):
        read_routing(tmp_path / "nope.jsonl")


def test_routing_metrics_on_hand_cases():
    rows = [
        {"tier": "non-seg", "triggered": False}, {"tier": "non-seg", "triggered": True},
        {"tier": "non-seg", "triggered": False}, {"tier": "non-seg", "triggered": False},
        {"tier": "explicit", "triggered": True}, {"tier": "explicit", "triggered": True},
        {"tier": "reasoning", "triggered": False}, {"tier": "reasoning", "triggered": True},
        {"tier": "mixed", "triggered": False},
    ]
    m = routing_metrics(rows)
    assert m["samples"] == 9 and m["accuracy"] == pytest.approx(6 / 9)  # 3 + 2 + 1 + 0
    assert m["per_tier"]["non-seg"] == {"samples": 4, "correct": 3, "accuracy": 0.75}
    assert m["per_tier"]["explicit"]["accuracy"] == 1.0 and m["per_tier"]["reasoning"]["accuracy"] == 0.5
    assert m["per_tier"]["mixed"]["accuracy"] == 0.0
    assert m["false_trigger_rate"] == pytest.approx(1 / 4) and m["missed_trigger_rate"] == pytest.approx(2 / 5)
    only_seg = routing_metrics([{"tier": "explicit", "triggered": True}])
    assert only_seg["false_trigger_rate"] is None and only_seg["missed_trigger_rate"] == 0.0
    assert list(routing_metrics(rows)["per_tier"]) == ["non-seg", "explicit", "reasoning", "mixed"]


# ----------------------------------------------------------------------------- end to end (tiny LLaVA)


def _invoke(args: list[str]):
    return CliRunner().invoke(app, args)


def test_general_on_the_tiny_llava(tmp_path):
    write_toy_mme(tmp_path / "toy", images=1, subtasks=["existence", "color"])  # 2 images, both layouts
    out = tmp_path / "out"
    result = _invoke(["general", "--benchmark", "mme", "--data-root", str(tmp_path / "toy"), "--mllm", "tiny",
                      "--out", str(out), "--device", "cpu", "--threads", "1", "--max-new-tokens", "3", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "perception:" in result.stdout
    report = json.loads((out / "mme_scores.json").read_text())
    assert report["questions"] == 4 and report["images"] == 2 and report["layouts"] == {"existence": "a", "color": "b"}
    assert set(report["subtasks"]) == {"existence", "color"}
    for s in report["subtasks"].values():
        assert 0.0 <= s["acc"] <= 100.0 and 0.0 <= s["acc_plus"] <= 100.0 and 0.0 <= s["score"] <= 200.0
        assert s["score"] == pytest.approx(s["acc"] + s["acc_plus"])
    assert report["perception"]["subtasks"] == 2 and report["cognition"]["subtasks"] == 0
    assert report["prompt"]["example"].endswith("\n" + MME_SUFFIX) and report["mllm"]["spec"] == "tiny"
    table = pq.read_table(out / "mme_answers.parquet")
    assert table.column_names == ["subtask", "category", "image", "question", "answer", "prediction", "parsed",
                                  "correct"]
    assert table.num_rows == 4 and set(table.column("parsed").to_pylist()) <= {"yes", "no", "other"}


def test_general_refuses_bad_input_in_one_line(tmp_path):
    for args in (["--data-root", str(tmp_path / "absent"), "--mllm", "tiny"],
                 ["--data-root", str(tmp_path), "--mllm", "tiny"],
                 ["--data-root", str(tmp_path), "--mllm", "tiny", "--benchmark", "pope"]):
        result = _invoke(["general", *args, "--out", str(tmp_path / "o")])
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr


def test_answers_with_lens_attached_are_the_plain_mllms(tiny_real_run, tmp_path):
    write_toy_mme(tmp_path / "toy", images=1, subtasks=["count", "position"])
    out = tmp_path / "out"
    result = _invoke(["general", "--data-root", str(tmp_path / "toy"), "--checkpoint", str(tiny_real_run.run_dir),
                      "--out", str(out), "--device", "cpu", "--threads", "1", "--max-new-tokens", "3", "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "mme_scores.json").read_text())
    lens = report["lens"]
    assert lens["identical"] is True and lens["differences"] == 0 and lens["segmentations"] == 2
    assert lens["mllm_unchanged"] is True and lens["mllm_checksum_before"] == tiny_real_run.checksums["initial"]
    assert "answers identical" in result.stdout
    table = pq.read_table(out / "mme_answers.parquet").to_pylist()
    assert all(row["lens_identical"] and row["lens_prediction"] == row["prediction"] for row in table)


def test_routing_on_the_tiny_llava(tmp_path):
    benchmark = write_toy_routing(tmp_path / "toy", samples=1)
    records = [json.loads(line) for line in benchmark.read_text().splitlines()]
    assert [r["tier"] for r in records] == ["non-seg", "explicit", "reasoning", "mixed"]
    assert read_routing(benchmark).samples[0].image.is_file()
    out = tmp_path / "out"
    result = _invoke(["routing", "--benchmark", str(benchmark), "--mllm", "tiny", "--out", str(out),
                      "--device", "cpu", "--threads", "1", "--format", "jsonl", "--quiet"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "routing_metrics.json").read_text())
    assert metrics["samples"] == 4 and set(metrics["per_tier"]) == {"non-seg", "explicit", "reasoning", "mixed"}
    assert sum(metrics["decided_by"].values()) == 4
    rows = [json.loads(line) for line in (out / "routing_predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [r["id"] for r in records]
    assert all(r["triggered"] == (r["intent"] == "segmentation") for r in rows)
    assert metrics["accuracy"] == pytest.approx(np.mean([r["correct"] for r in rows]))
