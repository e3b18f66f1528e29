"""Does the frozen MLLM know which object a question picks out? A linear probe of the last prompt token.

The measurement issue 23 starts from. For each task of the synthetic world (semantic: a class name, every
shape of that kind; referring: a REFER-style phrase, one shape; reasoning: a ReasonSeg-style sentence or
phrase) it draws scenes with the dataset's own rules (:func:`lens_manifests.synthetic.language.refer_scene`,
:func:`~lens_manifests.synthetic.language.reason_scene`), puts each question to the MLLM exactly as a store
build does (SAM's padded frame, :meth:`question_for`, the backbone's ``encode``), and keeps, for every layer,
the state of the last prompt token (the start-of-answer token LENS's head reads last) and the image-token
states.

The probe scores each object of the scene by a linear map of that state, ``score_i = h^T W o_i``, and
is trained with a softmax over the scene's objects (targets: the referent set) on training scenes, then
scored on held-out scenes drawn from another seed. ``o_i`` describes object ``i`` in one of three ways:

- ``where``: its place and size on SAM's padded frame (centre x, y and the square root of its area, in
  frame units, from its cells on the MLLM's grid): whether the state knows *where* the referent is
  (leftmost, lowest, biggest);
- ``what``: the coverage-weighted mean of the layer's image-token states over its cells: whether the
  state matches the referent's own features (a colour or kind named in the question is enough);
- ``both``: the two concatenated.

Accuracy is the share of held-out queries whose best-scored object is a referent; chance is the mean of
(referents / objects); ``prior`` is the same probe given a constant instead of the state (the best rule
that ignores the question, e.g. "the big one", with both descriptors at the first probed layer), so a
layer knows the referent by as much as it beats ``prior``, not chance. The ridge strength is chosen on a
fifth of the training scenes, never on the held-out ones.

    lens-toy probe-referent                  # the shipped toy LLaVA, ~8 min on one thread
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from lens_core.geometry import mask_to_padded_frame
from lens_manifests.synthetic.language import pick_reason_query, reason_scene, refer_scene, refer_sentences
from lens_manifests.synthetic.scenes import Scene, make_scene
from PIL import Image

TASKS = ("semantic", "referring", "reasoning")
TOKENS = ("last", "mean")
DESCRIPTORS = ("where", "what", "both")
RIDGE_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
#: the seed of the training scenes; held-out scenes use ``TRAIN_SEED + 1`` (numpy streams of one entropy)
TRAIN_SEED = 2311


@dataclass(frozen=True)
class Question:
    """One query of a probe scene: its text, whether it is a sentence, and the referents (object indices)."""

    text: str
    is_sentence: bool
    targets: tuple[int, ...]


def draw_question(task: str, rng: np.random.Generator) -> tuple[Scene, Question, tuple[int, ...]]:
    """A scene of ``task``'s set, one question of it drawn as its dataset draws them, and the objects to
    leave out (a reasoning query's near-ties, which its dataset marks "ignore")."""
    if task == "semantic":  # ADE20K-format: the class name; every shape of that kind
        scene = make_scene(rng, rule="cv2")
        kind = scene.shapes[int(rng.integers(len(scene.shapes)))].kind
        targets = tuple(i for i, s in enumerate(scene.shapes) if s.kind == kind)
        return scene, Question(kind, False, targets), ()
    if task == "referring":
        while True:
            scene = refer_scene(rng)
            options = [(i, text) for i in range(len(scene.shapes)) for text in refer_sentences(scene, i)]
            if options:
                i, text = options[int(rng.integers(len(options)))]
                return scene, Question(text, False, (i,)), ()
    if task == "reasoning":
        scene, candidates = reason_scene(rng)
        query = pick_reason_query(candidates, rng)
        text = query.texts[int(rng.integers(len(query.texts)))]
        return scene, Question(text, query.is_sentence, query.targets), query.ignores
    raise ValueError(f"unknown task {task!r}: one of {', '.join(TASKS)}")


@dataclass
class ProbeItem:
    """What the probe sees of one query: per layer, the probed state (d,: the last prompt token's, or the mean
    of the text tokens after the image: ``token``) and each object's
    mean image-token state (N, d); each object's coverage weights on the grid (N, g*g, rows summing to 1)
    and geometry (N, 3: centre x, y and sqrt(area) in frame units); the referents."""

    task: str
    question: str
    text: str
    state: dict[int, torch.Tensor]
    object_states: dict[int, torch.Tensor]
    cells: torch.Tensor
    geometry: torch.Tensor
    targets: tuple[int, ...]


def probe_item(mllm, task: str, scene: Scene, question: Question, ignores: Sequence[int],
               token: str = "last") -> ProbeItem:
    """Put ``question`` about ``scene`` to ``mllm`` (a :class:`lens_cache.backbones.mllm.MllmBackbone`) as a
    store build does, and describe the scene's objects on its grid of image tokens. ``token``: ``last`` (the
    start-of-answer token) or ``mean`` (every text token after the image, the question's words included)."""
    from lens_cache.backbones.geometry import sam_frame

    if token not in TOKENS:
        raise ValueError(f"token must be one of {', '.join(TOKENS)}, got {token!r}")
    frame = sam_frame(Image.fromarray(scene.image))
    prompt = mllm.question_for(question.text, question.is_sentence)
    states = mllm.encode([frame.padded_image()], [[prompt]])[0]
    text = states.text_states[0]
    grid = int(math.isqrt(mllm.num_image_tokens))
    left_out = set(ignores)
    kept = [i for i in range(len(scene.shapes)) if i not in left_out]
    cells = torch.stack([
        mask_to_padded_frame(torch.from_numpy(scene.shapes[i].mask).float(), frame.input_size, grid).flatten()
        for i in kept
    ])
    weights = cells / cells.sum(1, keepdim=True).clamp_min(1e-6)
    return ProbeItem(
        task=task,
        question=prompt,
        text=question.text,
        state={k: (text[k][-1] if token == "last" else text[k].mean(0)).float() for k in mllm.layers},
        object_states={k: weights @ states.image_states[k].float() for k in mllm.layers},
        cells=weights,
        geometry=object_geometry(cells, grid),
        targets=tuple(kept.index(t) for t in question.targets),
    )


def object_geometry(coverage: torch.Tensor, grid: int) -> torch.Tensor:
    """(N, 3): each object's coverage-weighted centre (x, y) and the square root of its covered area, in
    units of the padded frame's side, from its (N, grid * grid) coverage of the grid's cells."""
    centres = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid
    ys, xs = torch.meshgrid(centres, centres, indexing="ij")
    area = coverage.sum(1).clamp_min(1e-6)
    cx = (coverage * xs.flatten()).sum(1) / area
    cy = (coverage * ys.flatten()).sum(1) / area
    return torch.stack([cx, cy, (area / grid**2).sqrt()], dim=1)


def collect(mllm, task: str, count: int, seed: int, progress=None, token: str = "last") -> list[ProbeItem]:
    """``count`` probe items of ``task`` from scenes of the numpy stream ``(seed, task)``."""
    rng = np.random.default_rng([seed, TASKS.index(task)])
    items = []
    for n in range(count):
        items.append(probe_item(mllm, task, *draw_question(task, rng), token=token))
        if progress is not None:
            progress(task, n + 1, count)
    return items


def descriptors(items: Sequence[ProbeItem], layer: int, kind: str):
    """(Q, d) last-token states, (Q, N_max, m) object descriptors (zero-padded), (Q, N_max) object mask,
    (Q, N_max) referent mask and the sizes of the descriptor's blocks (geometry, states)."""
    count = max(len(item.cells) for item in items)
    parts = {"where": lambda i: [i.geometry], "what": lambda i: [i.object_states[layer]],
             "both": lambda i: [i.geometry, i.object_states[layer]]}[kind]
    blocks = [part.shape[1] for part in parts(items[0])]
    objects = [torch.cat(parts(item), dim=1) for item in items]
    padded = torch.zeros(len(items), count, sum(blocks))
    valid = torch.zeros(len(items), count, dtype=torch.bool)
    targets = torch.zeros(len(items), count, dtype=torch.bool)
    for q, (o, item) in enumerate(zip(objects, items)):
        padded[q, : len(o)] = o
        valid[q, : len(o)] = True
        targets[q, list(item.targets)] = True
    return torch.stack([item.state[layer] for item in items]), padded, valid, targets, blocks


@dataclass
class Probe:
    """A fitted probe: ``score_i = [(h - mean) / std, 1]^T W (o_i / scale)`` (the appended 1: a prior over
    object descriptors)."""

    weight: torch.Tensor
    h_stats: tuple[torch.Tensor, torch.Tensor]
    o_scale: torch.Tensor

    def scores(self, h: torch.Tensor, objects: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        h = (h - self.h_stats[0]) / self.h_stats[1]
        h = torch.cat([h, torch.ones(len(h), 1)], dim=1)
        return torch.einsum("qd,dm,qnm->qn", h, self.weight, objects / self.o_scale).masked_fill(~valid, -torch.inf)


def block_scale(objects: torch.Tensor, valid: torch.Tensor, blocks: Sequence[int]) -> torch.Tensor:
    """(m,) the root mean square of each descriptor block's entries over the valid objects, repeated over
    the block: one scale per block, so that grid cells an object rarely covers are not blown up."""
    flat = objects[valid]
    scales, start = [], 0
    for size in blocks:
        rms = flat[:, start : start + size].pow(2).mean().sqrt().clamp_min(1e-6)
        scales.append(rms.expand(size))
        start += size
    return torch.cat(scales)


def fit_probe(h, objects, valid, targets, blocks: Sequence[int], ridge: float, steps: int = 300) -> Probe:
    """Softmax over the scene's objects, log-likelihood of the referent set, L2 ``ridge`` (full batch, L-BFGS)."""
    h_stats = (h.mean(0), h.std(0).clamp_min(1e-6))
    weight = torch.zeros(h.shape[1] + 1, objects.shape[2], requires_grad=True)
    probe = Probe(weight, h_stats, block_scale(objects, valid, blocks))
    optimizer = torch.optim.LBFGS([weight], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        scores = probe.scores(h, objects, valid)
        hit = torch.logsumexp(scores.masked_fill(~targets, -torch.inf), dim=1)
        loss = (torch.logsumexp(scores, dim=1) - hit).mean() + ridge * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return Probe(weight.detach(), h_stats, probe.o_scale)


def accuracy(probe: Probe, h, objects, valid, targets, blocks: Sequence[int] = ()) -> float:
    best = probe.scores(h, objects, valid).argmax(dim=1)
    return float(targets[torch.arange(len(best)), best].float().mean())


def chance(items: Sequence[ProbeItem]) -> float:
    return float(np.mean([len(item.targets) / len(item.cells) for item in items]))


def probe_layer(train: Sequence[ProbeItem], held_out: Sequence[ProbeItem], layer: int, kind: str,
                blind: bool = False) -> dict:
    """Fit on ``train`` (ridge chosen on its last fifth, then refitted on all of it); accuracy on ``held_out``.
    ``blind``: the state replaced by zeros (the probe's prior over object descriptors)."""
    split = len(train) * 4 // 5

    def data(items):
        h, *rest = descriptors(items, layer, kind)
        return (torch.zeros_like(h) if blind else h, *rest)

    fit, select, everything, held = data(train[:split]), data(train[split:]), data(train), data(held_out)
    chosen = max(RIDGE_GRID, key=lambda r: accuracy(fit_probe(*fit, ridge=r), *select))
    probe = fit_probe(*everything, ridge=chosen)
    return {"accuracy": accuracy(probe, *held), "train_accuracy": accuracy(probe, *everything), "ridge": chosen}


def word_share(items: Sequence[ProbeItem], layer: int) -> float:
    """Share of the variance of the last prompt token's state (at ``layer``) that the query's text explains
    (between-group over total variance, grouping the queries by text): for a semantic query, its class name."""
    states = torch.stack([item.state[layer] for item in items])
    groups: dict[str, list[int]] = {}
    for q, item in enumerate(items):
        groups.setdefault(item.text, []).append(q)
    centre = states.mean(0)
    between = sum(len(rows) * (states[rows].mean(0) - centre).pow(2).sum() for rows in groups.values())
    return float(between / (states - centre).pow(2).sum().clamp_min(1e-12))


def text_oracle(train: Sequence[ProbeItem], held_out: Sequence[ProbeItem], layer: int) -> float:
    """Held-out accuracy of the probe given, instead of the state, a one-hot of the query's text (for a
    semantic query its class name), objects described by ``what``: what a state that carried the question
    would allow; it checks the descriptors and the probe, not the MLLM."""
    texts = sorted({item.text for item in list(train) + list(held_out)})

    def one_hot(items):
        out = []
        for item in items:
            code = torch.zeros(len(texts))
            code[texts.index(item.text)] = 1.0
            out.append(ProbeItem(**{**vars(item), "state": {layer: code}}))
        return out

    return probe_layer(one_hot(train), one_hot(held_out), layer, "what")["accuracy"]


def run_probe(mllm, *, train_scenes: int, held_out_scenes: int, progress=None, token: str = "last") -> dict:
    """The table: for each task, layer and descriptor, held-out accuracy, with chance and the counts; for the
    semantic task also, per layer, the share of the last token's variance its class name explains
    (:func:`word_share`) and the probe's accuracy given the class name itself (:func:`text_oracle`)."""
    torch.manual_seed(0)
    report: dict = {"mllm": mllm.identity.get("name_or_path"), "token": token, "layers": list(mllm.layers), "train_scenes": train_scenes,
                    "held_out_scenes": held_out_scenes, "tasks": {}}
    for task in TASKS:
        train = collect(mllm, task, train_scenes, TRAIN_SEED, progress, token)
        held_out = collect(mllm, task, held_out_scenes, TRAIN_SEED + 1, progress, token)
        rows = {str(k): {kind: probe_layer(train, held_out, k, kind) for kind in DESCRIPTORS}
                for k in mllm.layers}
        prior = probe_layer(train, held_out, mllm.layers[0], "both", blind=True)["accuracy"]
        report["tasks"][task] = {"chance": chance(held_out), "prior": prior,
                                 "objects": float(np.mean([len(i.cells) for i in held_out])),
                                 "by_layer": rows, "example": held_out[0].question}
        if task == "semantic":
            report["class_name_share"] = {str(k): word_share(train, k) for k in mllm.layers}
            report["class_name_oracle"] = {str(k): text_oracle(train, held_out, k) for k in mllm.layers}
    return report


def report_markdown(report: dict, lens_layer: int | None = None) -> str:
    """The held-out accuracies as a table (task x layer; where / what / both), chance in its own column."""
    layers = report["layers"]
    head = "| task | chance | prior | " + " | ".join(
        f"layer {k}{' (LENS)' if k == lens_layer else ''}" for k in layers) + " |"
    lines = [head, "| --- | ---: | ---: | " + " | ".join("---:" for _ in layers) + " |"]
    for task, row in report["tasks"].items():
        cells = [" / ".join(f"{row['by_layer'][str(k)][kind]['accuracy']:.2f}" for kind in DESCRIPTORS) for k in layers]
        lines.append(f"| {task} | {row['chance']:.2f} | {row['prior']:.2f} | " + " | ".join(cells) + " |")
    if "class_name_share" in report:
        lines.append("| semantic: variance of the state its class name explains | | | " + " | ".join(
            f"{report['class_name_share'][str(k)]:.2f}" for k in layers) + " |")
        lines.append("| semantic: the probe given the class name instead of the state (what) | | | " + " | ".join(
            f"{report['class_name_oracle'][str(k)]:.2f}" for k in layers) + " |")
    lines.append("")
    lines.append(f"Each cell: held-out accuracy of the probe of the {report.get('token', 'last')} token's state, "
                 "the object described by where / what / both "
                 f"({report['train_scenes']} training and {report['held_out_scenes']} held-out scenes per task).")
    return "\n".join(lines)


def plot_report(report: dict, path: str | Path, lens_layer: int | None = None) -> None:
    """Accuracy by layer, one panel per task, a line per descriptor, chance dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = report["layers"]
    fig, axes = plt.subplots(1, len(report["tasks"]), figsize=(4 * len(report["tasks"]), 3.2), sharey=True)
    for ax, (task, row) in zip(np.atleast_1d(axes), report["tasks"].items()):
        for kind in DESCRIPTORS:
            ax.plot(layers, [row["by_layer"][str(k)][kind]["accuracy"] for k in layers], marker="o", label=kind)
        ax.axhline(row["chance"], color="grey", linestyle="--", label="chance")
        ax.axhline(row["prior"], color="grey", linestyle=":", label="prior (no state)")
        if lens_layer is not None:
            ax.axvline(lens_layer, color="black", linewidth=0.5)
        ax.set_title(task)
        ax.set_xlabel("layer (hidden_states index)")
        ax.set_ylim(0, 1)
    np.atleast_1d(axes)[0].set_ylabel("held-out referent accuracy")
    np.atleast_1d(axes)[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict, out: str | Path, lens_layer: int | None = None) -> Path:
    """``probe.json``, ``probe.md`` and ``probe.png`` in ``out``; returns the folder."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe.json").write_text(json.dumps(report, indent=1))
    (out / "probe.md").write_text(report_markdown(report, lens_layer) + "\n")
    plot_report(report, out / "probe.png", lens_layer)
    return out


__all__ = ["TASKS", "DESCRIPTORS", "Question", "ProbeItem", "draw_question", "probe_item", "collect",
           "fit_probe", "probe_layer", "run_probe", "report_markdown", "write_report"]
