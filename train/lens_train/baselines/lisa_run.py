"""Training, evaluation and export of a LISA-style run (:mod:`.lisa`) on LENS's feature stores.

The baseline trains on exactly the data LENS trains on: a stage-1 store's queries (text, target
mask, SAM image embedding as cached) and the images its manifest names (the MLLM is fine-tuned, so
it runs live on the pixels; the store's cached MLLM states are not used). The MLLM is the one the
store was built with (checked by its weights fingerprint), SAM likewise
(:func:`lens_train.training.stores.resolve_sam_spec`).

A run folder holds ``lisa_config.json`` (its arguments and the store), ``lisa.ckpt`` (the resumable
checkpoint of :func:`lens_toy.loop.run_stage`: rerunning the same command after a kill resumes
it), ``lisa.log.jsonl`` (the loss curve) and ``train_stats.json`` (wall time, peak memory, trained
parameters). Batches are a pure function of ``(seed, step)``.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lens_cache.images import read_rgb
from lens_core.files import folder_replaced_on_success, write_text_atomically
from lens_core.geometry import postprocess_masks
from lens_core.metrics import giou_ciou_from_counts, intersection_union, query_iou

from ..errors import UserError
from .lisa import ANSWER, LisaStyle, add_seg_token

CONFIG_FILE = "lisa_config.json"
CHECKPOINT_NAME = "lisa"
STATS_FILE = "train_stats.json"
#: LISA's mask threshold: logits > 0.
MASK_THRESHOLD = 0.5


@dataclass(frozen=True)
class LisaRunConfig:
    cache: str
    mllm: str
    sam: str
    steps: int = 600
    batch: int = 4
    lr: float = 3e-4
    lora_rank: int = 8
    seed: int = 0


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class LisaQueries:
    """A store's valid queries as LISA-style examples: prompt + "It is [SEG]." ids, pixels, target.

    Args:
        cache: the store.
        backbone: the MLLM adapter the store was built with (its prompt and image geometry are used).
    """

    def __init__(self, cache: str, backbone: Any) -> None:
        from lens_cache.backbones.geometry import sam_frame
        from lens_cache.store import FeatureStore

        from ..training.data import QueryDataset

        store = FeatureStore.open(cache)
        self.dataset = QueryDataset(cache, store.layers[0])
        manifest = store.manifest
        self.texts = manifest.column("text").to_pylist()
        self.paths = manifest.column("image_path").to_pylist()
        self.backbone = backbone
        self._frame = sam_frame
        self._pixels: dict[str, torch.Tensor] = {}
        tok = backbone.processor.tokenizer
        self.answer_ids = tok(ANSWER, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0

    def __len__(self) -> int:
        return len(self.dataset)

    def pixels(self, path: str) -> torch.Tensor:
        if path not in self._pixels:
            image = self._frame(read_rgb(path)).padded_image()
            self._pixels[path] = self.backbone.processor.image_processor(images=[image], return_tensors="pt")[
                "pixel_values"][0]
        return self._pixels[path]

    def batch(self, indices: list[int]) -> dict[str, Any]:
        samples = [self.dataset[i] for i in indices]
        rows = []
        for s in samples:
            question = self.backbone.question_for(self.texts[s["query_id"]], s["is_sentence"])
            prefix, suffix = self.backbone._split_ids(question)
            prompt = prefix + suffix
            rows.append((prompt + self.answer_ids, [-100] * len(prompt) + self.answer_ids))
        length = max(len(r[0]) for r in rows)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), length), -100, dtype=torch.long)
        attention = torch.zeros((len(rows), length), dtype=torch.long)
        for b, (i, lab) in enumerate(rows):
            ids[b, : len(i)], labels[b, : len(lab)], attention[b, : len(i)] = torch.tensor(i), torch.tensor(lab), 1
        return {
            "input_ids": ids, "labels": labels, "attention_mask": attention,
            "pixel_values": torch.stack([self.pixels(self.paths[s["query_id"]]) for s in samples]),
            "image_embeddings": torch.stack([s["sam_embedding"] for s in samples]).float(),
            "gts": [s["gt"] for s in samples],
            "sizes": [(tuple(s["input_size"].tolist()), tuple(s["original_size"].tolist())) for s in samples],
            "samples": samples,
        }


def _specs(cache: str, mllm: str | None, sam: str | None) -> tuple[str, str]:
    """The ``--mllm`` and ``--sam`` specs of the store's backbones (the MLLM: the name its identity records)."""
    from lens_cache.store import FeatureStore

    from ..training.stores import resolve_sam_spec

    identity = FeatureStore.open(cache).identity
    return mllm or identity["name_or_path"], resolve_sam_spec(identity, sam)


def _backbones(cache: str, mllm: str | None, sam: str | None) -> tuple[Any, Any]:
    """The store's MLLM adapter and SAM, the MLLM checked against the store's weights fingerprint."""
    from lens_cache.backbones import build_mllm
    from lens_cache.backbones.sam import build_sam
    from lens_cache.store import FeatureStore

    mllm, sam = _specs(cache, mllm, sam)
    backbone = build_mllm(mllm, layers=(1,), device="cpu")
    if backbone.identity.get("weights_fingerprint") != FeatureStore.open(cache).identity.get("weights_fingerprint"):
        raise UserError(f"--mllm {mllm} is not the MLLM store {cache} was built with (weights fingerprints differ): "
                        "pass the store's MLLM")
    return backbone, build_sam(sam)


def build_lisa(config: LisaRunConfig) -> tuple[LisaStyle, Any]:
    """A fresh LISA-style model (seeded) and the MLLM adapter whose model it fine-tunes."""
    backbone, sam = _backbones(config.cache, config.mllm, config.sam)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        seg = add_seg_token(backbone.model, backbone.processor.tokenizer)
        lisa = LisaStyle(backbone.model, seg, sam.prompt_encoder, sam.mask_decoder, lora_rank=config.lora_rank)
    return lisa, backbone


def train_lisa(
    cache: str, out: Path, *, mllm: str | None = None, sam: str | None = None, steps: int = 600, batch: int = 4,
    lr: float = 3e-4, lora_rank: int = 8, seed: int = 0, log: Callable[[str], None] = print,
) -> dict:
    """Train (or resume) a LISA-style run in ``out``; returns its ``train_stats.json``."""
    from lens_toy.loop import Schedule, run_stage

    if steps < 1 or batch < 1 or lr <= 0 or lora_rank < 0:
        raise UserError(f"need --steps >= 1, --batch >= 1, --lr > 0 and --lora-rank >= 0; got {steps}, {batch}, {lr}, "
                        f"{lora_rank}")
    out = Path(out)
    mllm, sam = _specs(cache, mllm, sam)
    config = LisaRunConfig(cache=str(cache), mllm=mllm, sam=sam, steps=steps, batch=batch, lr=lr, lora_rank=lora_rank,
                           seed=seed)
    if (out / CONFIG_FILE).exists():
        saved = json.loads((out / CONFIG_FILE).read_text())
        if saved != asdict(config):
            raise UserError(f"{out} holds a LISA-style run with other settings ({out / CONFIG_FILE}): "
                            "use another --out or the same options")
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomically(out / CONFIG_FILE, json.dumps(asdict(config), indent=2) + "\n")
    lisa, backbone = build_lisa(config)
    queries = LisaQueries(cache, backbone)
    if len(queries) == 0:
        raise UserError(f"store {cache} has no valid queries to train on")
    lisa.train()
    backbone.model.model.vision_tower.eval()  # frozen, as LISA's

    def step_fn(step: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([seed, step])
        b = queries.batch(rng.integers(len(queries), size=batch).tolist())
        ce, low_res = lisa(b["input_ids"], b["attention_mask"], b["labels"], b["pixel_values"], b["image_embeddings"])
        return lisa.loss(ce, low_res, b["gts"], b["sizes"])

    trainable = lisa.trainable_parameters()
    started = time.monotonic()
    run_stage(CHECKPOINT_NAME, lisa, trainable, step_fn, Schedule(steps=steps, lr=lr, warmup=min(50, steps // 10)), out,
              log=log)
    stats = {"steps": steps, "batch": batch, "wall_s_this_process": round(time.monotonic() - started, 1),
             "peak_rss_bytes": peak_rss_bytes(), "trained_parameters": int(sum(p.numel() for p in trainable)),
             "mllm_parameters_changed": True, "lora_rank": lora_rank}
    write_text_atomically(out / STATS_FILE, json.dumps(stats, indent=2) + "\n")
    return stats


def load_lisa(run: Path) -> tuple[LisaStyle, Any, LisaRunConfig]:
    """The trained model of a run folder (from its last checkpoint), in eval mode."""
    run = Path(run)
    if not (run / CONFIG_FILE).is_file() or not (run / f"{CHECKPOINT_NAME}.ckpt").is_file():
        raise UserError(f"{run} is not a LISA-style run folder (no {CONFIG_FILE} / {CHECKPOINT_NAME}.ckpt): "
                        "train one with `lens-lisa train`")
    config = LisaRunConfig(**json.loads((run / CONFIG_FILE).read_text()))
    lisa, backbone = build_lisa(config)
    state = torch.load(run / f"{CHECKPOINT_NAME}.ckpt", map_location="cpu", weights_only=True)
    lisa.load_state_dict(state["model"])
    return lisa.eval(), backbone, config


@torch.no_grad()
def evaluate_lisa(run: Path, cache: str, *, out: Path | None = None, limit: int | None = None, batch: int = 4,
                  log: Callable[[str], None] = print) -> dict:
    """gIoU / cIoU of a run on a store (LISA's teacher-forced answer, mask = sigmoid > 0.5), overall and per task."""
    lisa, backbone, config = load_lisa(run)
    from lens_cache.store import FeatureStore

    store = FeatureStore.open(cache)
    trained = FeatureStore.open(config.cache).identity
    if store.identity.get("weights_fingerprint") != trained.get("weights_fingerprint"):
        raise UserError(f"store {cache} was built with another MLLM than run {run} was trained on")
    queries = LisaQueries(cache, backbone)
    count = len(queries) if limit is None else min(limit, len(queries))
    inters, unions, tasks, sentence, ids = [], [], [], [], []
    started = time.monotonic()
    for start in range(0, count, batch):
        b = queries.batch(list(range(start, min(start + batch, count))))
        _, low_res = lisa(b["input_ids"], b["attention_mask"], b["labels"], b["pixel_values"], b["image_embeddings"])
        for k, s in enumerate(b["samples"]):
            logits = postprocess_masks(low_res[k][None, None], *b["sizes"][k])[0, 0]
            pred = (torch.sigmoid(logits) > MASK_THRESHOLD).numpy()
            inter, union = intersection_union(pred, s["gt"].numpy())
            inters.append(inter), unions.append(union), tasks.append(s["task"])
            sentence.append(bool(s["is_sentence"])), ids.append(int(s["query_id"]))
        done = min(start + batch, count)
        rate = done / max(1e-9, time.monotonic() - started)
        log(f"[lisa eval] {done}/{count} queries | {rate:.1f} queries/s")

    def summary(select: np.ndarray) -> dict:
        giou, ciou = giou_ciou_from_counts(np.asarray(inters)[select], np.asarray(unions)[select])
        return {"giou": giou, "ciou": ciou, "num_queries": int(select.sum())}

    everything = np.ones(len(inters), dtype=bool)
    task_array = np.asarray(tasks)
    metrics = {**summary(everything), "by_task": {t: summary(task_array == t) for t in sorted(set(tasks))},
               "run": str(run), "store": str(cache), "limit": limit}
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomically(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        per_query = [{"query_id": q, "task": t, "is_sentence": s, "iou": query_iou(i, u)}
                     for q, t, s, i, u in zip(ids, tasks, sentence, inters, unions)]
        write_text_atomically(out / "per_query.json", json.dumps(per_query) + "\n")
    log(f"LISA-style gIoU {metrics['giou']:.4f} cIoU {metrics['ciou']:.4f} on {metrics['num_queries']} queries")
    return metrics


def export_mllm(run: Path, folder: Path) -> Path:
    """The run's fine-tuned MLLM (LoRA merged, ``[SEG]`` in its tokenizer) as a llava-hf folder, so that the
    general-ability benchmarks load it like any checkpoint (``--mllm FOLDER``)."""
    folder = Path(folder)
    if folder.exists():
        raise UserError(f"{folder} exists: export into a new folder")
    lisa, backbone, _ = load_lisa(run)
    merged = lisa.merged_mllm()
    folder.parent.mkdir(parents=True, exist_ok=True)
    with folder_replaced_on_success(folder) as tmp:  # no half-written checkpoint under the name
        merged.save_pretrained(tmp)
        backbone.processor.save_pretrained(tmp)
    return folder
