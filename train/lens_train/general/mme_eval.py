"""One MME run: read the release, ask every question, score, write the outputs.

Outputs in ``--out``:

- ``mme_answers.parquet``: one row per question: subtask, category, image, question,
  answer, prediction, parsed, correct (+ lens_prediction, lens_identical with a checkpoint);
- ``mme_scores.json``: the report: per-subtask acc / acc+ / score, perception and
  cognition totals, what was skipped, the prompt, and with a checkpoint whether every
  answer with LENS attached is the plain MLLM's (and the MLLM's checksum before/after).

With ``--checkpoint RUN_DIR`` only one MLLM is loaded (a 7B model twice would not fit
many GPUs): the run's ``Segmenter`` builds it, every question is first asked of it
before LENS has run at all, then again through ``lens-chat``'s agent after LENS has
segmented each image (:class:`~lens_train.general.answer.LensAsker`).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lens_cache.errors import UserError as AnyUserError  # image errors are stage 1's UserError

from ..errors import UserError
from ..evaluation.frozen import mllm_checksum
from ..inference.segmenter import Segmenter, load_image
from .answer import DEFAULT_MAX_NEW_TOKENS, MME_SUFFIX, LensAsker, PlainAsker, lens_agent, load_mllm, mme_prompt
from .mme import RANDOM_SUBTASK_SCORE, MmeSet, grade, read_mme, score_mme
from .outputs import out_folder, write_json, write_table

ANSWER_COLUMNS = ("subtask", "category", "image", "question", "answer", "prediction", "parsed", "correct")
LENS_COLUMNS = ("lens_prediction", "lens_identical")
ANSWERS_FILE = "mme_answers.parquet"
SCORES_FILE = "mme_scores.json"
#: At most this many skipped items are listed by name in the report (all are counted).
LISTED = 20

Say = Callable[[str], None]


def answer_all(
    mme_set: MmeSet, asker: PlainAsker, *, style: str = "llava", say: Say | None = None
) -> tuple[list[dict], list[str]]:
    """Ask every question of ``mme_set``, image by image, in prompt ``style`` (see ``answer.mme_prompt``).

    Returns:
        (graded records in question order, ``subtask/image`` of images that could not be read).
    """
    records: list[dict] = []
    unreadable: list[str] = []
    groups = itertools.groupby(mme_set.questions, key=lambda q: (q.subtask, q.image))
    for done, ((subtask, name), questions) in enumerate(groups, start=1):
        questions = list(questions)
        try:
            image = load_image(questions[0].image_path)
        except AnyUserError:  # missing since reading, or not an image PIL can decode
            unreadable.append(f"{subtask}/{name}")
            continue
        asker.start_image(image, questions[0].question)
        records.extend(grade(q, asker.ask(image, mme_prompt(q.question, style))) for q in questions)
        if say is not None and done % 25 == 0:
            say(f"[{asker.label}] {done} images, {len(records)} questions answered")
    return records, unreadable


def compare_with_lens(records: list[dict], lens_records: list[dict]) -> int:
    """Add ``lens_prediction`` / ``lens_identical`` to ``records``; the number of answers that differ."""
    if [(r["subtask"], r["image"], r["question"]) for r in records] != \
            [(r["subtask"], r["image"], r["question"]) for r in lens_records]:
        raise RuntimeError("the two passes asked different questions")
    for record, lens in zip(records, lens_records):
        record["lens_prediction"] = lens["prediction"]
        record["lens_identical"] = lens["prediction"] == record["prediction"]
    return sum(not r["lens_identical"] for r in records)


def evaluate_mme(
    mme_set: MmeSet,
    plain: PlainAsker,
    lens: LensAsker | None = None,
    *,
    model: Any = None,
    style: str = "llava",
    say: Say | None = None,
) -> tuple[list[dict], dict]:
    """Answers and the report of one MME run (nothing written).

    Args:
        plain: the MLLM alone; asked first.
        lens: the same MLLM with a LENS run attached, asked second (optional).
        model: the MLLM's torch module, fingerprinted before and after when ``lens`` is given.
        style: the prompt style (``answer.PROMPT_STYLES``).
    Raises:
        UserError: no question could be asked.
    """
    if not mme_set.questions:
        raise UserError(f"no MME question with an image under {mme_set.root} "
                        f"({len(mme_set.missing_images)} question files without their image): check --data-root")
    mme_prompt("", style)  # an unknown style fails before any question is asked
    started = time.monotonic()
    records, unreadable = answer_all(mme_set, plain, style=style, say=say)
    if not records:
        raise UserError(f"none of the {mme_set.num_images()} MME images under {mme_set.root} could be read")
    report = {
        "benchmark": "mme",
        "data_root": str(mme_set.root),
        "layouts": mme_set.layouts,
        "prompt": {"style": style, "suffix": MME_SUFFIX if style == "llava" else None,
                   "example": mme_prompt(mme_set.questions[0].question, style),
                   "max_new_tokens": plain.max_new_tokens, "decoding": "greedy"},
        "questions": len(records),
        "images": len({(r["subtask"], r["image"]) for r in records}),
        "skipped": {
            "missing_images": len(mme_set.missing_images),
            "missing_image_questions": mme_set.skipped_questions,
            "unreadable_images": len(unreadable),
            "listed": (mme_set.missing_images + unreadable)[:LISTED],
        },
        **score_mme(records),
        "random_expectation_per_subtask": RANDOM_SUBTASK_SCORE,
    }
    if lens is not None:
        report["lens"] = _lens_pass(mme_set, records, lens, model, style, say)
    report["seconds"] = round(time.monotonic() - started, 1)
    return records, report


def _lens_pass(mme_set: MmeSet, records: list[dict], lens: LensAsker, model: Any, style: str,
               say: Say | None) -> dict:
    before = mllm_checksum(model) if model is not None else None
    lens_records, _ = answer_all(mme_set, lens, style=style, say=say)
    differences = compare_with_lens(records, lens_records)
    after = mllm_checksum(model) if model is not None else None
    return {
        "checkpoint": str(getattr(lens.agent.segmenter, "run_dir", "")),
        "identical": differences == 0,
        "differences": differences,
        "segmentations": lens.segmentations,
        "segmentation_failures": len(lens.segmentation_failures),
        "mllm_checksum_before": before,
        "mllm_checksum_after": after,
        "mllm_unchanged": None if model is None else before == after,
    }


def run_mme(
    data_root: str | Path,
    *,
    mllm: str | None,
    out: str | Path,
    checkpoint: str | Path | None = None,
    limit: int | None = None,
    subtasks: Sequence[str] | None = None,
    device: str | None = None,
    dtype: str | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    style: str = "llava",
    say: Say | None = None,
) -> dict:
    """``lens-general general --benchmark mme``: read, load, ask, score, write; returns the report.

    The data is read before any model is loaded, so a wrong ``--data-root`` fails at once.
    """
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    mme_prompt("", style)  # an unknown --prompt fails at once
    if mllm is None and checkpoint is None:
        raise UserError("say which MLLM to ask: --mllm SPEC (tiny, toy, a llava-hf folder) or --checkpoint RUN_DIR")
    mme_set = read_mme(data_root, subtasks=subtasks, limit=limit)
    folder = out_folder(out)
    if checkpoint is None:
        backbone = load_mllm(mllm, device=device, dtype=dtype)
        lens = None
    else:
        segmenter = Segmenter(checkpoint, mllm=mllm, device=device, dtype=dtype)
        backbone = segmenter.mllm
        lens = LensAsker(lens_agent(segmenter, max_new_tokens), max_new_tokens)
    plain = PlainAsker(backbone.generate, max_new_tokens)
    records, report = evaluate_mme(mme_set, plain, lens, model=backbone.model if lens else None,
                                   style=style, say=say)
    report["mllm"] = {"spec": mllm, "name_or_path": backbone.identity.get("name_or_path"),
                      "config_hash": backbone.identity.get("config_hash"),
                      "compute_dtype": backbone.identity.get("compute_dtype")}
    columns = ANSWER_COLUMNS + (LENS_COLUMNS if lens else ())
    report["files"] = {"answers": str(write_table(records, folder / ANSWERS_FILE, columns)),
                       "scores": str(folder / SCORES_FILE)}
    write_json(report, folder / SCORES_FILE)
    return report


def summary_lines(report: dict) -> list[str]:
    """The report as a few printable lines (a table of subtasks, the totals, the LENS check)."""
    lines = [f"{'subtask':<24}{'acc':>8}{'acc+':>8}{'score':>8}  questions"]
    for name, s in report["subtasks"].items():
        lines.append(f"{name:<24}{s['acc']:>8.2f}{s['acc_plus']:>8.2f}{s['score']:>8.2f}  {s['questions']}")
    for category in ("perception", "cognition"):
        total = report[category]
        if total["subtasks"]:
            lines.append(f"{category}: {total['score']:.2f} / {total['max']:.0f} over {total['subtasks']} of "
                         f"{total['of']} subtasks (random answers: {total['random_expectation']:.0f})")
    skipped = report["skipped"]
    if skipped["missing_images"] or skipped["unreadable_images"]:
        lines.append(f"warning: skipped {skipped['missing_images']} images missing "
                     f"({skipped['missing_image_questions']} questions) and {skipped['unreadable_images']} unreadable")
    if "lens" in report:
        lens = report["lens"]
        verdict = "identical" if lens["identical"] else f"DIFFERENT in {lens['differences']} answers"
        lines.append(f"with LENS attached ({lens['checkpoint']}): answers {verdict}; "
                     f"MLLM checksum unchanged: {lens['mllm_unchanged']}")
    return lines
