"""The model card (README.md) of a model folder: what the head is, how to use it, how it was made and scored.

Written from the model folder's config.json (:func:`.model_folder.model_config_of`) and, when the run
folder is at hand, the ``lens-eval`` results found in it (``RUN/eval-*/metrics.json``, each with the
command that reproduces it). The YAML header is the Hugging Face Hub's model-card metadata.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["eval_results", "model_card"]


def eval_results(run_dir: str | Path) -> list[dict[str, Any]]:
    """The ``metrics.json`` of every ``lens-eval`` output inside ``run_dir``, sorted by folder name."""
    found = []
    for path in sorted(Path(run_dir).glob("*/metrics.json")):
        try:
            metrics = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(metrics, dict) and "giou" in metrics and "store" in metrics:
            found.append({**metrics, "folder": path.parent.name})
    return found


def _pct(value: Any) -> str:
    return f"{100 * value:.1f}" if isinstance(value, (int, float)) else "-"


def _eval_command(metrics: dict[str, Any]) -> str:
    parts = [f"lens-eval --checkpoint {metrics.get('run', 'RUN')} --cache {metrics['store']}"]
    if metrics.get("threshold") is not None:
        parts.append(f"--threshold {metrics['threshold']}")
    if metrics.get("limit"):
        parts.append(f"--limit {metrics['limit']}")
    return " ".join(parts)


def model_card(config: dict[str, Any], *, run_dir: str | Path | None = None) -> str:
    """README.md of the model folder whose config.json is ``config``."""
    stores = (config.get("source") or {}).get("stores") or []
    specs = ", ".join(f"`{s.get('spec') or s.get('url') or '?'}`" for s in stores) or "(not recorded)"
    lines = [*_header(config), *_use(), *_backbone(config), *_training(config, specs), *_evaluation(run_dir),
             *_limits(specs)]
    return "\n".join(lines)


def _header(config: dict[str, Any]) -> list[str]:
    """The Hub's YAML metadata, the title and what the head is."""
    return [
        "---",
        "library_name: lens-seg",
        "license: apache-2.0",
        "pipeline_tag: image-segmentation",
        "tags:",
        *(f"- {tag}" for tag in ("lens", "segmentation", "reasoning-segmentation", "referring-segmentation",
                                 "model_hub_mixin")),
        "---",
        "",
        f"# LENS head (preset `{config.get('preset')}`, step {config.get('step')})",
        "",
        "A trained LENS head: it reads the hidden states of a **frozen** multimodal LLM at one layer and prompts "
        "SAM's mask decoder with keypoints, to segment what an instruction refers to. This folder holds only the "
        "trainable tensors (head, keypoint descriptor, SAM's mask decoder) in `model.safetensors`; the MLLM and "
        "SAM are not included and are loaded from where the backbone table below says.",
        "",
    ]


def _use() -> list[str]:
    """How to segment with it, from Python and from the command line."""
    return [
        "## Use",
        "",
        "```python",
        "from lens_train import Segmenter",
        "",
        "seg = Segmenter.from_pretrained(\"PATH_TO_THIS_FOLDER\")  # or the Hub id it was pushed to",
        "result = seg(\"photo.jpg\", \"the mug left of the laptop\")",
        "result.mask, result.score  # (H, W) bool, SAM's predicted IoU",
        "result.overlay().save(\"overlay.png\")",
        "```",
        "",
        "Command line: `lens-segment photo.jpg \"the mug left of the laptop\" --checkpoint PATH_TO_THIS_FOLDER -o out/`.",
        "",
    ]


def _backbone(config: dict[str, Any]) -> list[str]:
    """The backbone the head only works on: MLLM, layer, prompt, SAM, compute dtype."""
    backbone = config.get("backbone") or {}
    return [
        "## Backbone (must match)",
        "",
        "The head only works on the features of the backbone it was trained on; another MLLM, layer, prompt, "
        "SAM or compute dtype is refused in one line (config.json `identity` is what is checked).",
        "",
        "| | |",
        "| --- | --- |",
        f"| MLLM | `{backbone.get('mllm')}` ({backbone.get('family')}) |",
        f"| MLLM weights | `{backbone.get('revision')}` |",
        f"| layer | {config.get('layer')} |",
        f"| prompt template | `{json.dumps(backbone.get('prompt_template'))[1:-1]}` |",
        f"| question set | {backbone.get('question_set') or '-'} (template `{backbone.get('question_template')}`) |",
        f"| compute dtype | {backbone.get('compute_dtype')} |",
        f"| SAM | `{backbone.get('sam')}` ({backbone.get('sam_variant')}, weights `{backbone.get('sam_weights')}`) |",
        "",
    ]


def _training(config: dict[str, Any], specs: str) -> list[str]:
    """How it was trained: preset, steps, lr, seed, precision, stores, code versions, threshold."""
    source = config.get("source") or {}
    stores = source.get("stores") or []
    train = config.get("train") or {}
    return [
        "## Training",
        "",
        f"- preset `{config.get('preset')}`: {config.get('preset_description') or ''}".rstrip(),
        f"- {config.get('step')} steps x batch {train.get('batch_size')} x {train.get('grad_accum')}, lr "
        f"{train.get('lr')}, seed {train.get('seed')}, precision {source.get('precision')} on {source.get('device')}",
        f"- stores: {specs}"
        + "".join(f"\n  - `{s.get('spec')}`: {s.get('num_valid_queries')} queries, `{s.get('url')}`" for s in stores),
        f"- started {source.get('created')}; code {', '.join(f'{k} {v}' for k, v in (source.get('versions') or {}).items())}",
        f"- mask threshold {train.get('threshold')} on sigmoid(logit)",
        "",
    ]


def _evaluation(run_dir: str | Path | None) -> list[str]:
    """The ``lens-eval`` results found in the run folder, with the commands that reproduce them."""
    lines = ["## Evaluation", ""]
    results = eval_results(run_dir) if run_dir is not None else []
    if results:
        lines += ["| store | queries | gIoU | cIoU | whole image gIoU | heatmap alone gIoU |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for m in results:
            base = m.get("baselines") or {}
            lines.append(f"| `{m['store']}` | {m.get('num_queries')} | {_pct(m.get('giou'))} | {_pct(m.get('ciou'))} "
                         f"| {_pct((base.get('whole_image') or {}).get('giou'))} "
                         f"| {_pct((base.get('heatmap') or {}).get('giou'))} |")
        lines += ["", "Commands (`lens-eval` metrics.json of the run folder, in %):", ""]
        lines += [f"- `{_eval_command(m)}` (step {m.get('step')})" for m in results]
    else:
        lines.append("No `lens-eval` results were found in the run folder when this card was written: score it with "
                     "`lens-eval --checkpoint PATH_TO_THIS_FOLDER --cache STORE` on a held-out store of its backbone.")
    return lines


def _limits(specs: str) -> list[str]:
    """Intended use and limits."""
    return [
        "",
        "## Intended use and limits",
        "",
        "- Research on referring and reasoning segmentation with a frozen MLLM; the MLLM's own answers are untouched.",
        f"- Trained on {specs} only: quality on other images or instructions is not measured here. The `toy` and "
        "`tiny` presets are synthetic-world demos and test fixtures, not models of real photos.",
        "- One mask per instruction, thresholded at the training threshold; `score` is SAM's own IoU estimate, "
        "not a calibrated probability.",
        "- Not for decisions about people (medical, surveillance, identification): no such use was evaluated.",
        "",
    ]
