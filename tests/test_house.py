"""House rules of the source: no file over 500 lines, no function over 80 lines unless its docstring says why.

The files are the repository's Python files, tracked or new (``git ls-files -co --exclude-standard``: what
``.gitignore`` leaves out, the virtual environment included, is not ours). A function's length runs from its
``def`` line to its last line (decorators not counted), nested functions and methods included. A function may
be longer when that is a decision written down: its docstring says ``Long because`` and the reason (a Typer
command whose options are declared in its signature, say).
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 80
#: What a long function's docstring must say: the phrase, then its reason.
LONG_BECAUSE = re.compile(r"Long because\s+\S")


def python_files() -> list[Path]:
    """The repository's .py files, tracked or new but not ignored, that exist (relative to :data:`ROOT`)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the files of the repository cannot be listed")
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z", "--", "*.py"], cwd=ROOT,
                            check=True, capture_output=True, text=True).stdout
    return sorted(Path(name) for name in set(listed.split("\0")) if name and (ROOT / name).is_file())


def long_files(limit: int = MAX_FILE_LINES) -> list[tuple[str, int]]:
    """(file, lines) of every file over ``limit`` lines."""
    counts = ((str(path), len((ROOT / path).read_text(encoding="utf-8").splitlines())) for path in python_files())
    return [(name, lines) for name, lines in counts if lines > limit]


def _functions(tree: ast.AST, prefix: str = "") -> list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """(qualified name, node) of every function and method under ``tree``, nested ones included."""
    found = []
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found.append((prefix + node.name, node))
            found += _functions(node, f"{prefix}{node.name}.")
        elif isinstance(node, ast.ClassDef):
            found += _functions(node, f"{prefix}{node.name}.")
        else:
            found += _functions(node, prefix)
    return found


def unexplained_in(source: str, path: str, limit: int = MAX_FUNCTION_LINES) -> list[tuple[str, int, str, int]]:
    """(path, line, qualified name, length) of every function of ``source`` over ``limit`` lines whose docstring
    does not say ``Long because ...``."""
    offenders = []
    for name, node in _functions(ast.parse(source, filename=path)):
        length = node.end_lineno - node.lineno + 1
        if length > limit and not LONG_BECAUSE.search(ast.get_docstring(node) or ""):
            offenders.append((path, node.lineno, name, length))
    return offenders


def unexplained_long_functions(limit: int = MAX_FUNCTION_LINES) -> list[tuple[str, int, str, int]]:
    """:func:`unexplained_in` of every file of the repository."""
    return [offender for path in python_files()
            for offender in unexplained_in((ROOT / path).read_text(encoding="utf-8"), str(path), limit)]


def test_no_file_is_over_500_lines():
    offenders = long_files()
    if offenders:
        pytest.fail(f"{len(offenders)} file(s) over {MAX_FILE_LINES} lines; split each by concept:\n"
                    + "\n".join(f"  {name}: {lines} lines" for name, lines in offenders), pytrace=False)


def test_a_function_over_80_lines_says_why():
    offenders = unexplained_long_functions()
    if offenders:
        pytest.fail(f"{len(offenders)} function(s) over {MAX_FUNCTION_LINES} lines without 'Long because <the "
                    "reason>' in their docstring; split each into pieces by concept, or write down why it is long:\n"
                    + "\n".join(f"  {name}:{line} {function}: {length} lines"
                                 for name, line, function, length in offenders), pytrace=False)


def test_the_checks_see_what_they_check():
    """The listing holds the repository's files and none of the ignored ones; a long function, a method or a
    nested one included, is caught unless its docstring gives the reason; a short one never is."""
    files = python_files()
    assert Path("tests/test_house.py") in files and Path("train/lens_train/training/trainer.py") in files
    assert not [path for path in files if path.parts[0] == ".venv"]

    def function(name: str, lines: int, docstring: str | None = None, indent: str = "") -> str:
        doc = [f'{indent}    """{docstring}"""'] if docstring is not None else []
        body = doc + [f"{indent}    x = {i}" for i in range(lines - 1 - len(doc))]
        return "\n".join([f"{indent}def {name}():", *body]) + "\n"

    source = (function("short", MAX_FUNCTION_LINES) + function("long", MAX_FUNCTION_LINES + 1)
              + function("explained", 90, "Long because it says why.")
              + function("phrase_only", 90, "Long because")
              + "class A:\n" + function("method", 90, "Too long.", indent="    ")
              + "def outer():\n" + function("inner", 85, indent="    "))
    found = [(name, length) for _, _, name, length in unexplained_in(source, "x.py")]
    assert found == [("long", 81), ("phrase_only", 90), ("A.method", 90), ("outer", 86), ("outer.inner", 85)]
