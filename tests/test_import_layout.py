"""The packages' import graph: no cycles, and stage packages depend in one direction only.

Every import counts, module-level and function-local (a lazy import that closes a circle is
still a circle a reader has to untangle). Parsed with ``ast``; nothing is imported.
"""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: package -> folder that holds it (a file's path names its module)
PACKAGES = {"lens_core": ROOT, "lens_cache": ROOT / "cache", "lens_manifests": ROOT / "manifests",
            "lens_train": ROOT / "train", "lens_toy": ROOT / "toy"}
#: what each package may import from the others (the stages' direction). ``lens_toy``, the toy backbones'
#: pretraining, sits beside stage 1: it uses the cache's backbones, and loading a backbone (lens_cache) never
#: needs it; lens_train uses its toy world (Table 1, the toy MME and routing sets, the LISA-style loop).
ALLOWED = {"lens_core": set(), "lens_manifests": {"lens_core"}, "lens_cache": {"lens_core", "lens_manifests"},
           "lens_toy": {"lens_core", "lens_manifests", "lens_cache"},
           "lens_train": {"lens_core", "lens_manifests", "lens_cache", "lens_toy"}}


def modules() -> dict[str, tuple[Path, bool]]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in sorted((folder / package).rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def import_graph(found: dict[str, tuple[Path, bool]]) -> dict[str, set[str]]:
    """module -> the project modules it imports (``from a import b`` counts b when b is a module)."""
    graph: dict[str, set[str]] = {}
    for name, (path, is_package) in found.items():
        package = name.split(".") if is_package else name.split(".")[:-1]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                module = base + (node.module.split(".") if node.module else [])
                candidates = [".".join(module + [alias.name]) for alias in node.names] + [".".join(module)]
            else:
                continue
            for candidate in candidates:
                while candidate and candidate not in found and "." in candidate:
                    candidate = candidate.rsplit(".", 1)[0]
                if candidate in found and candidate != name:
                    targets.add(candidate)
        graph[name] = targets
    return graph


def _drop_package_inits(graph: dict[str, set[str]], found) -> dict[str, set[str]]:
    """A package's ``__init__`` importing its own submodules is not a cycle with them."""
    return {m: {t for t in ts if not (found[t][1] and m.startswith(t + "."))} for m, ts in graph.items()}


def test_no_import_cycles_between_modules():
    found = modules()
    graph = _drop_package_inits(import_graph(found), found)
    try:
        tuple(TopologicalSorter(graph).static_order())
    except CycleError as error:
        pytest.fail(f"import cycle: {' -> '.join(error.args[1])}")


def test_no_cycles_between_lens_train_subpackages():
    found = modules()
    graph = import_graph(found)
    unit = lambda m: m.split(".")[1] if m.count(".") >= 1 else "__init__"  # noqa: E731
    units: dict[str, set[str]] = {}
    for module, targets in graph.items():
        if module.startswith("lens_train"):
            units.setdefault(unit(module), set()).update(
                unit(t) for t in targets if t.startswith("lens_train") and unit(t) != unit(module))
    try:
        tuple(TopologicalSorter(units).static_order())
    except CycleError as error:
        pytest.fail(f"lens_train subpackages import each other in a circle: {' -> '.join(error.args[1])}")


def test_packages_depend_in_the_stage_direction_only():
    found = modules()
    wrong = sorted(f"{m} imports {t}" for m, ts in import_graph(found).items() for t in ts
                   if t.split(".")[0] != m.split(".")[0] and t.split(".")[0] not in ALLOWED[m.split(".")[0]])
    assert wrong == []


def test_loading_a_backbone_needs_no_pretraining_code():
    """Every package is seen by the checks above, and lens_cache (the shipped toy backbones' loaders included)
    imports nothing of lens_toy: the toy world's pretraining sits above stage 1, never below it."""
    found = modules()
    assert {m.split(".")[0] for m in found} == set(PACKAGES) == set(ALLOWED)
    assert "lens_cache.backbones.toy" in found and "lens_toy.cli" in found
    assert not any(m == "lens_cache.toy" or m.startswith("lens_cache.toy.") for m in found)  # the pretraining left
    assert "lens_toy" not in ALLOWED["lens_cache"]


def test_using_a_trained_model_needs_no_training_loop():
    """Evaluation, live inference, the agent, the general-abilities checks and conversion load a model through
    lens_train.training.loading, never the trainer; and stage 1's backbones need nothing of the store."""
    graph = import_graph(modules())
    users = ("lens_train.evaluation", "lens_train.inference", "lens_train.general", "lens_train.interop",
             "lens_train.training.loading", "lens_train.training.model_folder")
    wrong = sorted(f"{m} imports {t}" for m, ts in graph.items() for t in ts
                   if m.startswith(users) and t == "lens_train.training.trainer")
    assert wrong == []
    allowed = ("lens_cache.backbones", "lens_cache.errors", "lens_cache.questions", "lens_cache.version")
    wrong = sorted(f"{m} imports {t}" for m, ts in graph.items() for t in ts
                   if m.startswith("lens_cache.backbones") and t.startswith("lens_cache") and not t.startswith(allowed))
    assert wrong == []
