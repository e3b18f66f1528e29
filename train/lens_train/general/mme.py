"""MME (Fu et al. 2023) as released, and its official scoring (``eval_tool/calculation.py``).

The release (``MME_Benchmark_release_version/``) has one folder per subtask, in one of
two layouts:

(a) images and same-named ``.txt`` files side by side (``code_reasoning/0020.png`` +
    ``code_reasoning/0020.txt``): existence, count, position, color, OCR and the four
    cognition subtasks in the real release;
(b) ``images/`` and ``questions_answer_YN/`` (``artwork/images/10002.jpg`` +
    ``artwork/questions_answer_YN/10002.txt``): artwork, celebrity, landmark, posters, scene.

The layout is detected per folder, so either works for any subtask. Each ``.txt`` holds
one ``question<TAB>answer`` line per question (two per image in the release, the first
answered Yes and the second No); answers are Yes/No.

Scoring, exactly as ``calculation.py``: the prediction is lower-cased; ``yes``/``no``
as a whole answer are taken as they are, otherwise its first four characters decide
(``yes`` in them -> yes, else ``no`` in them -> no, else "other", always wrong). Per
subtask, ``acc`` is the percentage of questions answered right and ``acc+`` the
percentage of images whose questions are ALL answered right; the subtask's score is
``acc + acc+`` (at most 200). Perception sums its 10 subtasks (at most 2000),
cognition its 4 (at most 800). Answering at random scores 50 + 25 = 75 per subtask.

Two details differ from ``calculation.py`` only where it would crash: it asserts two
questions per image and pairs consecutive lines; here questions are grouped by image
(the same thing for two-question images) and images with another number of questions
are counted in ``unpaired_images``. Predictions are stripped of surrounding white space
first, as LLaVA's ``model_vqa_loader`` does before writing them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from .paths import confined, resolve_root

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
SUBTASKS = PERCEPTION + COGNITION
#: The folder MME's release unpacks to.
RELEASE_FOLDER = "MME_Benchmark_release_version"
IMAGES_FOLDER = "images"
#: Layout (b)'s question folder (the second spelling occurs in some copies).
QUESTION_FOLDERS = ("questions_answer_YN", "questions_answers_YN")
IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg", ".JPG", ".PNG", ".JPEG")
ANSWERS = ("Yes", "No")
MAX_SUBTASK_SCORE = 200.0
#: Expected score of a uniform random yes/no answerer: acc 50 + acc+ 25.
RANDOM_SUBTASK_SCORE = 75.0
EXPECTED_ROOT = f".../{RELEASE_FOLDER} (the folder holding existence/, count/, ..., code_reasoning/)"


def category_of(subtask: str) -> str:
    """``perception`` or ``cognition``."""
    return "perception" if subtask in PERCEPTION else "cognition"


@dataclass(frozen=True)
class MmeQuestion:
    """One MME question.

    Attributes:
        subtask: e.g. ``existence``.
        image: the image's file name inside its subtask (``0020.png``): with ``subtask``, the pair key.
        image_path: the resolved file (inside the data root).
        question: as written in the ``.txt`` (MME's "Please answer yes or no." included).
        answer: ``Yes`` or ``No``.
    """

    subtask: str
    image: str
    image_path: Path
    question: str
    answer: str


@dataclass
class MmeSet:
    """What :func:`read_mme` found.

    Attributes:
        root: the resolved release folder.
        questions: in subtask order, then file order.
        layouts: subtask -> ``a`` (side by side) or ``b`` (images/ + questions_answer_YN/).
        missing_images: ``subtask/stem`` of every ``.txt`` without an image (its questions skipped).
        skipped_questions: questions skipped for those.
    """

    root: Path
    questions: list[MmeQuestion] = field(default_factory=list)
    layouts: dict[str, str] = field(default_factory=dict)
    missing_images: list[str] = field(default_factory=list)
    skipped_questions: int = 0

    @property
    def subtasks(self) -> list[str]:
        """Subtasks found, in MME's order."""
        return [name for name in SUBTASKS if name in self.layouts]

    @property
    def missing_subtasks(self) -> list[str]:
        return [name for name in SUBTASKS if name not in self.layouts]

    def num_images(self) -> int:
        return len({(q.subtask, q.image) for q in self.questions})


# ----------------------------------------------------------------------------- reading


def release_root(data_root: str | Path) -> Path:
    """The release folder: ``data_root`` itself, or its ``MME_Benchmark_release_version/``.

    Raises:
        UserError: no folder there, or no subtask folder in it (one line naming the expected folder).
    """
    root = resolve_root(data_root, option="--data-root", expected=EXPECTED_ROOT)
    if not _has_subtasks(root) and (root / RELEASE_FOLDER).is_dir():
        root = confined(root, RELEASE_FOLDER, what="MME folder")
    if not _has_subtasks(root):
        raise UserError(f"no MME subtask folder in {root}: pass --data-root {EXPECTED_ROOT}")
    return root


def _has_subtasks(root: Path) -> bool:
    return any((root / name).is_dir() for name in SUBTASKS)


def read_mme(
    data_root: str | Path, *, subtasks: Sequence[str] | None = None, limit: int | None = None
) -> MmeSet:
    """Every question of the MME release under ``data_root`` (see the module docstring).

    Args:
        subtasks: read only these (default: every subtask present).
        limit: read only the first ``limit`` images (sorted by name) of each subtask.
    Raises:
        UserError: no release there, an unknown subtask asked for, a path leading outside
            the root, a line that is not ``question<TAB>Yes|No`` (one line each).
    """
    root = release_root(data_root)
    wanted = check_subtasks(subtasks) if subtasks else SUBTASKS
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    found = MmeSet(root=root)
    for name in wanted:
        folder = root / name
        if folder.is_dir():
            _read_subtask(found, confined(root, name, what="subtask folder"), name, limit)
    return found


def check_subtasks(subtasks: Sequence[str]) -> tuple[str, ...]:
    """``subtasks`` if each is an MME subtask name (UserError naming the valid ones otherwise)."""
    unknown = [name for name in subtasks if name not in SUBTASKS]
    if unknown:
        raise UserError(f"unknown MME subtask(s) {', '.join(unknown)}: choose from {', '.join(SUBTASKS)}")
    return tuple(subtasks)


def _layout(folder: Path) -> tuple[str, Path, Path]:
    """(layout, question folder, image folder) of one subtask folder."""
    for name in QUESTION_FOLDERS:
        if (folder / name).is_dir():
            return "b", folder / name, folder / IMAGES_FOLDER
    return "a", folder, folder


def _read_subtask(found: MmeSet, folder: Path, name: str, limit: int | None) -> None:
    layout, question_dir, image_dir = _layout(folder)
    found.layouts[name] = layout
    question_dir = confined(found.root, question_dir.relative_to(found.root), what="question folder")
    texts = sorted(question_dir.glob("*.txt"))
    if limit is not None:
        texts = texts[:limit]
    for text in texts:
        text = confined(found.root, text.relative_to(found.root), what="question file")
        pairs = read_question_file(text)
        image = _find_image(found.root, image_dir, text.stem)
        if image is None:
            found.missing_images.append(f"{name}/{text.stem}")
            found.skipped_questions += len(pairs)
            continue
        found.questions.extend(MmeQuestion(name, image.name, image, q, a) for q, a in pairs)


def _find_image(root: Path, image_dir: Path, stem: str) -> Path | None:
    """The image ``stem.{jpg,png,jpeg}`` in ``image_dir`` (confined), or None."""
    for suffix in IMAGE_SUFFIXES:
        candidate = image_dir / f"{stem}{suffix}"
        if candidate.is_file() or candidate.is_symlink():
            resolved = confined(root, candidate.relative_to(root), what="image")
            return resolved if resolved.is_file() else None
    return None


def read_question_file(path: Path) -> list[tuple[str, str]]:
    """(question, ``Yes``/``No``) per non-blank line of an MME ``.txt``.

    Raises:
        UserError: a line is not ``question<TAB>yes|no`` or the file is not UTF-8 (one line).
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text: re-save it as UTF-8 or remove it") from None
    pairs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        pairs.append(parse_question_line(line, f"{path}:{number}"))
    return pairs


def parse_question_line(line: str, where: str) -> tuple[str, str]:
    """``question<TAB>answer`` -> (question, ``Yes``/``No``); the answer's case is free."""
    question, tab, answer = line.rpartition("\t")
    normalised = answer.strip().capitalize()
    if not tab or not question.strip() or normalised not in ANSWERS:
        shown = line if len(line) <= 60 else line[:57] + "..."
        raise UserError(f"{where}: expected 'question<TAB>Yes|No', got {shown!r}: fix the line or remove the file")
    return question.strip(), normalised


# ----------------------------------------------------------------------------- scoring


def parse_prediction(prediction: str) -> str:
    """``yes`` / ``no`` / ``other``, as ``calculation.py``'s ``parse_pred_ans`` (see the module docstring)."""
    text = prediction.strip().lower()
    if text in ("yes", "no"):
        return text
    prefix = text[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def grade(question: MmeQuestion, prediction: str) -> dict:
    """The per-question record: subtask, image, question, answer, prediction, parsed, correct."""
    parsed = parse_prediction(prediction)
    return {
        "subtask": question.subtask,
        "category": category_of(question.subtask),
        "image": question.image,
        "question": question.question,
        "answer": question.answer,
        "prediction": prediction,
        "parsed": parsed,
        "correct": parsed == question.answer.lower(),
    }


def subtask_score(records: Iterable[Mapping]) -> dict:
    """acc, acc+ and score (percent) of one subtask's graded records (``image``, ``correct``, ``parsed``)."""
    by_image: dict[str, list[bool]] = {}
    other = 0
    for record in records:
        by_image.setdefault(str(record["image"]), []).append(bool(record["correct"]))
        other += record.get("parsed") == "other"
    questions = sum(len(v) for v in by_image.values())
    if not questions:
        raise ValueError("no graded questions to score")
    correct = sum(sum(v) for v in by_image.values())
    all_right = sum(all(v) for v in by_image.values())
    acc = 100.0 * correct / questions
    acc_plus = 100.0 * all_right / len(by_image)
    return {
        "questions": questions,
        "images": len(by_image),
        "correct": correct,
        "images_all_correct": all_right,
        "acc": acc,
        "acc_plus": acc_plus,
        "score": acc + acc_plus,
        "other_answers": other,
        "unpaired_images": sum(len(v) != 2 for v in by_image.values()),
    }


def score_mme(records: Iterable[Mapping]) -> dict:
    """MME's scores of graded records: per subtask, and the perception / cognition totals.

    Totals sum the subtasks present; ``subtasks`` / ``complete`` say how many of 10 (4)
    there were, ``max`` what the total could reach with them.
    """
    by_subtask: dict[str, list[Mapping]] = {}
    for record in records:
        by_subtask.setdefault(str(record["subtask"]), []).append(record)
    unknown = sorted(set(by_subtask) - set(SUBTASKS))
    if unknown:
        raise ValueError(f"records of unknown subtasks: {unknown}")
    scores = {name: subtask_score(by_subtask[name]) for name in SUBTASKS if name in by_subtask}
    report: dict = {"subtasks": scores}
    for category, names in (("perception", PERCEPTION), ("cognition", COGNITION)):
        present = [name for name in names if name in scores]
        report[category] = {
            "score": sum(scores[name]["score"] for name in present),
            "max": MAX_SUBTASK_SCORE * len(present),
            "subtasks": len(present),
            "of": len(names),
            "complete": len(present) == len(names),
            "random_expectation": RANDOM_SUBTASK_SCORE * len(present),
        }
    report["missing_subtasks"] = [name for name in SUBTASKS if name not in scores]
    return report
