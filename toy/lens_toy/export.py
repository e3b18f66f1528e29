"""Shipped toy weights: write them with their manifest, load them back.

:data:`lens_cache.backbones.toy.WEIGHTS_DIR` (``cache/lens_cache/backbones/toy_weights/``) holds
``toy_sam.safetensors`` (the SAM's state dict), ``toy_llava/`` (a llava-hf folder: config,
``model.safetensors``, processor, tokenizer) and ``MANIFEST.json``: each file's sha256 and size,
the held-out scores measured at export, the commands and seed that made them and the git commit
of the code that ran. (The stage-1 loaders, ``--sam toy`` and ``--mllm toy``, read the same files
without this module; the loaders here are the pretraining's own, for its scores.)
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lens_cache.backbones.runtime import no_loading_bar
from lens_cache.backbones.toy import MANIFEST_FILE, TOY_LLAVA_DIR, TOY_SAM_FILE, WEIGHTS_DIR, build_toy_sam
from lens_core.files import folder_replaced_on_success, sha256_file

#: Held-out scenes of the quick check that the tests recompute.
QUICK_SCENES = 4


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def export_weights(work: Path, out: Path | None = None, *, command: str = "") -> Path:
    """Copy the final toy SAM and LLaVA of ``work`` to ``out`` and write MANIFEST.json."""
    out = Path(out) if out is not None else WEIGHTS_DIR
    with folder_replaced_on_success(out) as tmp:
        state = torch.load(work / "sam_final.pt", map_location="cpu", weights_only=True)
        save_file({k: v.contiguous() for k, v in state.items()}, tmp / TOY_SAM_FILE)
        shutil.copytree(work / "llava_final", tmp / TOY_LLAVA_DIR)
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {
            "made": time.strftime("%Y-%m-%d"),
            "commit": _commit(),
            "command": command,
            "files": {str(p.relative_to(tmp)): {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in files},
            "held_out": {
                "sam": json.loads((work / "sam_eval.json").read_text()),
                "llava": json.loads((work / "llava_eval.json").read_text()),
                "quick": quick_scores(tmp),
            },
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n")
    return out


def quick_scores(weights: Path) -> dict:
    """Scores on the first few held-out scenes, recomputed by the tests to check the shipped weights."""
    from .llava import evaluate_llava
    from .sam import evaluate_sam

    llava = evaluate_llava(*load_toy_llava(weights), scenes=QUICK_SCENES, boxes=False)
    return {"sam": evaluate_sam(load_toy_sam(weights), scenes=QUICK_SCENES), "llava": llava}


def read_manifest(weights: Path | None = None) -> dict:
    return json.loads(((weights or WEIGHTS_DIR) / MANIFEST_FILE).read_text())


def verify_weights(weights: Path | None = None) -> list[str]:
    """Files whose sha256 or size differs from MANIFEST.json (empty when all match)."""
    weights = weights or WEIGHTS_DIR
    bad = []
    for name, meta in read_manifest(weights)["files"].items():
        path = weights / name
        if not path.is_file() or path.stat().st_size != meta["bytes"] or sha256_file(path) != meta["sha256"]:
            bad.append(name)
    return bad


def load_toy_sam(weights: Path | None = None):
    sam = build_toy_sam()
    sam.load_state_dict(load_file((weights or WEIGHTS_DIR) / TOY_SAM_FILE), strict=True)
    return sam.eval().requires_grad_(False)


def load_toy_llava(weights: Path | None = None):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    folder = (weights or WEIGHTS_DIR) / TOY_LLAVA_DIR
    with no_loading_bar():
        model = LlavaForConditionalGeneration.from_pretrained(folder, local_files_only=True, attn_implementation="eager")
        processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    return model.eval().requires_grad_(False), processor
