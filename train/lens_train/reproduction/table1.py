"""Table 1 of the paper at toy scale: what segmentation training costs the MLLM's general abilities.

Rows (the paper's, where a toy counterpart exists): random guess; the toy LLaVA alone; a LISA-style
fine-tune of it (:mod:`lens_train.baselines`); LENS on the frozen toy LLaVA. Columns: training peak
memory (the training process's peak RSS on the CPU) and wall time, trained parameters, held-out
segmentation (gIoU / cIoU on ``synthetic-reason:val`` and ``synthetic-refer:val``), the toy MME
(:mod:`lens_train.general.toy_mme`, MME's scoring, LLaVA-1.5's prompt) and held-out VQA accuracy by
question type (:func:`lens_toy.llava.evaluate_llava`, teacher-forced exact answers).

Both trainings run as child processes of this one (``lens-train``, ``lens-lisa train``) so that each
peak RSS is that training's alone (:func:`measured_child`). Each stage writes its
output with a completion marker and is skipped when complete, as in the other reproductions.
The LENS row's general numbers are measured through the LENS-attached path: toy MME through
``lens-chat``'s agent after a segmentation per image (the report says whether every answer equals
the plain MLLM's), VQA on the MLLM the LENS run loaded, after it segmented.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lens_core.files import write_text_atomically

from ..errors import UserError
from .reproduce import _pct, _provenance, _write_text, build_store, check_inputs, evaluate_run, training_stores

#: Table 1 of the paper (LLaVA-1.5-7B rows): training memory, ReasonSeg test cIoU ("Seg"), MME.
PAPER_TABLE1: dict[str, dict[str, Any]] = {
    "random": {"mme": 1050.0},
    "mllm": {"mme": 1808.4},
    "lisa": {"memory": "30 GB x 8", "seg": 56.9, "mme": 184.5},
    "lens": {"memory": "16 + 10 GB x 8", "seg": 57.3, "mme": 1801.4},
}
ROWS = {"random": "random guess", "mllm": "toy LLaVA alone", "lisa": "LISA-style (toy)", "lens": "LENS (toy)"}
VQA_TYPES = ("colour", "shape", "size", "count", "yesno", "relation", "verify")
#: Toy MME images per subtask and held-out scenes for the VQA column.
TOY_MME_IMAGES = 30
VQA_SCENES = 30
LISA_STEPS = 600


def measured_child(cmd: list[str], stats_path: Path, *, say, interval: float = 0.2) -> dict:
    """Run ``cmd`` as a child process; its wall time and its own peak RSS to ``stats_path``.

    The peak is the child's ``VmHWM`` (Linux, ``/proc/PID/status``), read every ``interval`` seconds while it
    runs: it is per address space and starts afresh at ``exec``, whereas ``getrusage``'s ``ru_maxrss`` of a
    child also counts the parent's pages it was forked with. Elsewhere ``ru_maxrss`` is used.
    """
    say("running " + " ".join(cmd))
    started = time.monotonic()
    process = subprocess.Popen(cmd)
    status_file = Path(f"/proc/{process.pid}/status")
    peak_kib = 0
    while True:
        try:
            for line in status_file.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak_kib = max(peak_kib, int(line.split()[1]))
        except (OSError, ValueError):
            pass
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        time.sleep(interval)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise UserError(f"{' '.join(cmd[:3])} ... failed with exit status {process.returncode} (its output is above)")
    if peak_kib:
        peak = peak_kib * 1024
    else:  # no /proc: the child's ru_maxrss (an upper bound, see above)
        peak = usage.ru_maxrss if sys.platform == "darwin" else usage.ru_maxrss * 1024
    stats = {"wall_s": round(time.monotonic() - started, 1), "peak_rss_bytes": int(peak), "command": cmd}
    write_text_atomically(stats_path, json.dumps(stats, indent=2) + "\n")
    return stats


def _script(name: str) -> str:
    """The console script ``name`` of this environment (beside the interpreter), else its bare name."""
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else name


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def lens_training(settings, train_cache: str, out: Path) -> tuple[Path, dict]:
    """The LENS run of Table 1 (the preset's main layer), trained in a child process unless complete."""
    from ..training.checkpoint import checkpoint_step
    from ..training.presets import load_preset

    steps = settings.steps or load_preset(settings.preset).train.steps
    stats_path = out / "table1_train_stats.json"
    if checkpoint_step(out) == steps and stats_path.is_file():
        settings.say(f"run {out} complete, skipped")
        return out, json.loads(stats_path.read_text())
    shutil.rmtree(out, ignore_errors=True)  # a run without its measurement is redone, so the numbers are its own
    cmd = [_script("lens-train"), "--cache", train_cache, "--preset", settings.preset, "--out", str(out),
           "--steps", str(steps), "--quiet"]
    if settings.device:
        cmd += ["--device", settings.device]
    return out, measured_child(cmd, stats_path, say=settings.say)


def lisa_training(settings, train_cache: str, out: Path, steps: int) -> tuple[Path, dict]:
    """The LISA-style run, trained in a child process unless complete."""
    stats_path = out / "table1_train_stats.json"
    own = _json(out / "train_stats.json")
    if own is not None and own.get("steps") == steps and stats_path.is_file():
        settings.say(f"run {out} complete, skipped")
        return out, json.loads(stats_path.read_text())
    shutil.rmtree(out, ignore_errors=True)
    cmd = [_script("lens-lisa"), "train", "--cache", train_cache, "--out", str(out), "--steps", str(steps)]
    return out, measured_child(cmd, stats_path, say=settings.say)


def trained_parameters(run: Path, kind: str) -> int:
    if kind == "lisa":
        return int(json.loads((run / "train_stats.json").read_text())["trained_parameters"])
    from ..training.loading import load_run

    model = load_run(run).model
    return int(sum(p.numel() for p in model.parameters() if p.requires_grad))


def random_vqa(scenes: int = VQA_SCENES) -> dict[str, float]:
    """A random answerer on :func:`evaluate_llava`'s questions: uniform over the answers each type takes."""
    import numpy as np

    from lens_toy.conversations import turns
    from lens_toy.world import HELD_OUT, draw_scene

    asked: dict[str, list[str]] = {}
    for index in range(scenes):
        scene = draw_scene(HELD_OUT, index)
        for kind, _, answer in turns(scene, np.random.default_rng([HELD_OUT, 7, index])):
            if kind != "box":
                asked.setdefault(kind, []).append(answer.rstrip(".").lower())
    rng = np.random.default_rng(0)
    out = {}
    for kind, answers in asked.items():
        options = sorted(set(answers))
        out[f"acc_{kind}"] = float(np.mean([options[int(rng.integers(len(options)))] == a for a in answers]))
    return out


def vqa(model: Any, processor: Any, path: Path, *, say) -> dict:
    from lens_toy.llava import evaluate_llava

    if path.is_file():
        return json.loads(path.read_text())
    say(f"held-out VQA -> {path}")
    result = evaluate_llava(model, processor, scenes=VQA_SCENES, boxes=False)
    write_text_atomically(path, json.dumps(result, indent=2) + "\n")
    return result


def toy_mme_score(data: Path, out: Path, *, mllm: str | None = None, checkpoint: Path | None = None, say) -> dict:
    from ..general.mme_eval import SCORES_FILE, run_mme

    if (out / SCORES_FILE).is_file():
        return json.loads((out / SCORES_FILE).read_text())
    say(f"toy MME ({'LENS attached' if checkpoint else mllm}) -> {out}")
    return run_mme(data, mllm=mllm, out=out, checkpoint=checkpoint)


def reproduce_table1(settings) -> Path:
    """Stores, the two trainings, segmentation, toy MME and VQA for every row, ``table1-<preset>.md``."""
    from ..baselines.lisa_run import evaluate_lisa, export_mllm
    from ..evaluation.frozen import mllm_checksum
    from ..general.toy_mme import write_toy_mme
    from ..inference.segmenter import Segmenter

    check_inputs(settings)
    if not settings.synthetic:
        return reproduce_table1_real(settings)
    if settings.preset != "toy":
        raise UserError(f"Table 1 runs at --preset toy or paper, not {settings.preset!r} (the random tiny LLaVA "
                        "answers nothing)")
    started = time.perf_counter()
    say = settings.say
    work = settings.work
    train_cache = training_stores(settings)[0]
    evals = {name: build_store(settings, f"synthetic-{name}:val", settings.layers[:1]) for name in ("reason", "refer")}
    lens_dir, lens_stats = lens_training(settings, train_cache, work / "runs" / "table1-toy-lens")
    lisa_steps = settings.steps or LISA_STEPS
    lisa_dir, lisa_stats = lisa_training(settings, train_cache, work / "runs" / "table1-toy-lisa", lisa_steps)

    seg: dict[str, dict[str, dict]] = {"lens": {}, "lisa": {}}
    for name, cache in evals.items():
        seg["lens"][name] = evaluate_run(settings, lens_dir, cache, f"synthetic-{name}:val")
        path = lisa_dir / f"eval-synthetic-{name}-val" / "metrics.json"
        seg["lisa"][name] = _json(path) or evaluate_lisa(lisa_dir, cache, out=path.parent, log=say)

    mme_data = work / "data" / f"toy-mme-{TOY_MME_IMAGES}"
    if not (mme_data / "TOY_MME.json").is_file():
        write_toy_mme(mme_data, TOY_MME_IMAGES)
    lisa_mllm = lisa_dir / "mllm"
    if not (lisa_mllm / "model.safetensors").is_file():
        export_mllm(lisa_dir, lisa_mllm)
    mme = {
        "mllm": toy_mme_score(mme_data, work / "general" / "toy-llava", mllm="toy", say=say),
        "lisa": toy_mme_score(mme_data, work / "general" / "lisa", mllm=str(lisa_mllm), say=say),
        "lens": toy_mme_score(mme_data, work / "general" / "lens", checkpoint=lens_dir, say=say),
    }

    from lens_cache.backbones import build_mllm

    toy = build_mllm("toy", layers=(1,))
    lisa_backbone = build_mllm(str(lisa_mllm), layers=(1,))
    segmenter = Segmenter(lens_dir)
    vqa_scores = {
        "random": random_vqa(),
        "mllm": vqa(toy.model, toy.processor, work / "general" / "toy-llava" / "vqa.json", say=say),
        "lisa": vqa(lisa_backbone.model, lisa_backbone.processor, work / "general" / "lisa" / "vqa.json", say=say),
        "lens": vqa(segmenter.mllm.model, segmenter.mllm.processor, work / "general" / "lens" / "vqa.json", say=say),
    }
    checksums = {"toy": mllm_checksum(toy.model), "lens": mllm_checksum(segmenter.mllm.model),
                 "lisa": mllm_checksum(lisa_backbone.model)}
    params = {"lens": trained_parameters(lens_dir, "lens"), "lisa": trained_parameters(lisa_dir, "lisa")}
    stats = {"lens": lens_stats, "lisa": lisa_stats}
    path = settings.results / "table1-toy.md"
    _write_text(path, render_table1(settings, seg=seg, mme=mme, vqa=vqa_scores, stats=stats, params=params,
                                    checksums=checksums, lisa_steps=lisa_steps,
                                    provenance=_provenance(settings, time.perf_counter() - started)))
    say(f"wrote {path}")
    return path


def reproduce_table1_real(settings) -> Path:
    """Table 1 with real weights: the MLLM alone, LENS (Table 2's LENS run) and optionally a LISA-style MLLM
    folder, on MME from ``settings.mme_root``; LENS's "Seg" is its ReasonSeg test cIoU, as in the paper.

    Training memory and time are not measured here (``make bench-train`` measures a LENS step on the GPU);
    those cells and the VQA columns stay empty.
    """
    from .reproduce import TABLE2_RUNS, train_run

    if settings.mme_root is None or not Path(settings.mme_root).is_dir():
        raise UserError(f"--preset {settings.preset} needs MME_ROOT=<MME_Benchmark_release_version folder> "
                        f"(got {settings.mme_root})")
    started = time.perf_counter()
    say, work = settings.say, settings.work
    lens_dir = train_run(settings, TABLE2_RUNS[0], training_stores(settings), prefix=f"table2-{settings.name}")
    test_store = build_store(settings, "reasonseg:test", settings.layers)
    seg = {"lens": {"reason": evaluate_run(settings, lens_dir, test_store, "reasonseg:test")}}
    mme = {
        "mllm": toy_mme_score(settings.mme_root, work / "general" / "mllm", mllm=settings.mllm, say=say),
        "lens": toy_mme_score(settings.mme_root, work / "general" / "lens", checkpoint=lens_dir, say=say),
    }
    if settings.lisa_mllm:
        mme["lisa"] = toy_mme_score(settings.mme_root, work / "general" / "lisa", mllm=settings.lisa_mllm, say=say)
    path = settings.results / ("table1.md" if settings.preset == "paper" else f"table1-{settings.preset}.md")
    _write_text(path, render_table1(settings, seg=seg, mme=mme, vqa={}, stats={},
                                    params={"lens": trained_parameters(lens_dir, "lens")}, checksums=None,
                                    lisa_steps=None, provenance=_provenance(settings, time.perf_counter() - started)))
    say(f"wrote {path}")
    return path


def _mme_total(report: dict | None) -> float | None:
    return None if report is None else float(report["perception"]["score"] + report["cognition"]["score"])


def render_table1(settings, *, seg, mme, vqa, stats, params, checksums, lisa_steps, provenance) -> str:
    """The Markdown table (our numbers, the paper's in parentheses where it has the cell)."""
    subtasks = len(mme["mllm"]["subtasks"])
    random_mme = 75.0 * subtasks
    toy = settings.preset == "toy"

    def seg_cell(row: str, name: str) -> str:
        if name not in seg.get(row, {}):
            return "—"
        m = seg[row][name]
        return f"{_pct(m['giou'])} / {_pct(m['ciou'])}"

    def paper(row: str, key: str, fmt: str = "{}") -> str:
        value = PAPER_TABLE1.get(row, {}).get(key)
        return "" if value is None else " (" + fmt.format(value) + ")"

    def memory(row: str) -> str:
        if row not in stats:
            return "—" + paper(row, "memory")
        return f"{stats[row]['peak_rss_bytes'] / 2**30:.2f} GB{paper(row, 'memory')}"

    lines = [f"# Table 1 (general abilities kept), preset `{settings.preset}`", "", provenance, "",
             "| Method | training peak RSS (paper) | training time | trained parameters | seg reasoning gIoU / cIoU "
             "(paper: ReasonSeg test cIoU) | seg referring gIoU / cIoU | " + ("toy MME" if toy else "MME") + " (paper: MME) | "
             + " | ".join(f"VQA {t}" for t in VQA_TYPES) + " |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | " + " | ".join(["---:"] * len(VQA_TYPES)) + " |"]
    rows = ROWS if toy else {"random": "random guess", "mllm": f"{settings.mllm} alone", "lisa": "LISA-style",
                             "lens": "LENS"}
    for row, label in rows.items():
        total = _mme_total(mme.get(row))
        mme_cell = (f"{random_mme:.1f} (expected)" if row == "random" else "—" if total is None else f"{total:.1f}")
        cells = [
            memory(row),
            f"{stats[row]['wall_s'] / 60:.1f} min" if row in stats else "—",
            f"{params[row]:,}" if row in params else "—",
            seg_cell(row, "reason") + paper(row, "seg"),
            seg_cell(row, "refer"),
            mme_cell + paper(row, "mme", "{:.1f}"),
            *(f"{100 * vqa[row][f'acc_{t}']:.1f}" if f"acc_{t}" in vqa.get(row, {}) else "—" for t in VQA_TYPES),
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lens_report = mme["lens"].get("lens", {})
    identical = lens_report.get("identical")
    verdict = (f"MME answers {'identical to' if identical else 'DIFFERENT from'} the plain MLLM's "
               f"({lens_report.get('differences', '?')} differ), MLLM checksum unchanged: "
               f"{lens_report.get('mllm_unchanged')}")
    if not toy:
        lines += ["", f"MME from {settings.mme_root}: {subtasks} subtasks (random answers expect 75 each). The 'seg' "
                  "column is LENS's ReasonSeg test gIoU / cIoU (the paper's Seg is the cIoU). LENS attached: "
                  f"{verdict}. Training memory and time: `make bench-train` (not measured by this table)."]
        return "\n".join(lines) + "\n"
    lines += [
        "",
        "Segmentation: held-out `synthetic-reason:val` and `synthetic-refer:val`. "
        f"Toy MME: {subtasks} subtasks x {TOY_MME_IMAGES} held-out images x 2 questions (MME's layout and scoring; "
        f"random answers expect 75 per subtask, {random_mme:.0f} in all); the paper's MME has 14 subtasks (1050 "
        "random). VQA: held-out scenes, teacher-forced exact answers, by question type (random: uniform over the "
        "answers each type takes).",
        f"LENS attached: toy-{verdict}; MLLM checksum equal to the toy LLaVA's after LENS: "
        f"{checksums['lens'] == checksums['toy']}; changed by the LISA-style fine-tune: "
        f"{checksums['lisa'] != checksums['toy']}.",
        f"LISA-style: LoRA rank 8 on q/v + embeddings, lm_head, [SEG] projection and SAM's mask decoder, "
        f"{lisa_steps} steps x 4 queries at lr 3e-4; LENS: the `{settings.preset}` preset. Both train on the same "
        "store (synthetic:train) and are scored on the same held-out stores. Peak RSS is each training process's "
        "own (CPU; the paper's figures are GPU memory on 8 GPUs).",
    ]
    return "\n".join(lines) + "\n"
