"""How much of the image do the cached features keep? A linear probe of patch colour, by layer.

For synthetic scenes (lens_manifests.synthetic.make_scene) it extracts the MLLM's image-token
states at several layers and SAM's image embedding with the same extractor stage 1 uses, then
fits a ridge regression from each token's state to the mean RGB of its patch on SAM's padded
frame (24x24 for the MLLM, 64x64 for SAM) on the first images and reports R^2 on the rest.
Random-weight backbones lose spatial detail with depth; this says how much, per layer.

    python benchmarks/probes/probe_features.py             # tiny LLaVA + tiny SAM, CPU, ~10 s
    python benchmarks/probes/probe_features.py --mllm /ckpt/llava-1.5-7b-hf --sam vit_h:/ckpt/sam_vit_h_4b8939.pth
"""

from __future__ import annotations

import json
from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F
import typer
from PIL import Image

from lens_cache.backbones import build_extractor
from lens_cache.backbones.geometry import sam_frame
from lens_cache.cli import command_app
from lens_manifests.synthetic import make_scene


def patch_colours(image: Image.Image, grid: int) -> torch.Tensor:
    """(grid*grid, 3) mean RGB in [0, 1] of each cell of SAM's padded 1024 frame."""
    frame = sam_frame(image)
    h, w = frame.input_size
    canvas = torch.zeros(3, 1024, 1024)
    canvas[:, :h, :w] = torch.from_numpy(np.asarray(image.convert("RGB").resize((w, h), Image.BILINEAR),
                                                    dtype=np.float32) / 255).permute(2, 0, 1)
    return F.adaptive_avg_pool2d(canvas[None], grid)[0].reshape(3, -1).T


def ridge_r2(features: list[torch.Tensor], targets: list[torch.Tensor], num_fit: int, alpha: float = 0.1) -> float:
    """R^2 on images ``num_fit:`` of a ridge map fitted on images ``:num_fit`` (features standardised)."""
    x_fit, y_fit = torch.cat(features[:num_fit]).double(), torch.cat(targets[:num_fit]).double()
    x_test, y_test = torch.cat(features[num_fit:]).double(), torch.cat(targets[num_fit:]).double()
    mean, std = x_fit.mean(0), x_fit.std(0) + 1e-6
    design = lambda x: torch.cat([(x - mean) / std, torch.ones(len(x), 1, dtype=x.dtype)], 1)  # noqa: E731
    a = design(x_fit)
    weights = torch.linalg.solve(a.T @ a + alpha * torch.eye(a.shape[1], dtype=a.dtype), a.T @ y_fit)
    residual = ((design(x_test) @ weights - y_test) ** 2).sum()
    return float(1 - residual / ((y_test - y_fit.mean(0)) ** 2).sum())


app = command_app(context_settings={"help_option_names": ["-h", "--help"]})


@app.command(help=__doc__.splitlines()[0])
def main(
    mllm: Annotated[str, typer.Option()] = "tiny",
    sam: Annotated[str, typer.Option()] = "tiny",
    layers: Annotated[str, typer.Option(help="MLLM layers (hidden_states indices)")] = "1,7,14,30",
    images: Annotated[int, typer.Option()] = 12,
    fit: Annotated[int, typer.Option(help="images the probe is fitted on; the rest are held out")] = 8,
    device: Annotated[str | None, typer.Option()] = None,
    threads: Annotated[int, typer.Option()] = 1,
) -> None:
    """Fit and score the probes; prints one JSON line."""
    if not 0 < fit < images:
        raise typer.BadParameter("--fit must be between 1 and --images - 1")

    torch.set_num_threads(threads)
    layers = tuple(int(v) for v in layers.split(","))
    extractor = build_extractor(mllm=mllm, sam=sam, layers=layers, device=device)
    grid = int(round(extractor.num_image_tokens ** 0.5))
    mllm_states: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    sam_states, mllm_targets, sam_targets = [], [], []
    for index in range(images):
        image = Image.fromarray(make_scene(np.random.default_rng(index), rule="cv2").image)
        features = extractor.extract([image], [["what is in the image?"]])[0]
        for layer in layers:
            mllm_states[layer].append(features.image_states[layer].float().cpu())
        embedding = features.sam_embedding.float().cpu()
        sam_states.append(embedding.reshape(embedding.shape[0], -1).T)
        mllm_targets.append(patch_colours(image, grid))
        sam_targets.append(patch_colours(image, embedding.shape[-1]))
    result = {f"mllm_layer_{layer}": round(ridge_r2(mllm_states[layer], mllm_targets, fit), 3) for layer in layers}
    result["sam_embedding"] = round(ridge_r2(sam_states, sam_targets, fit), 3)
    print(json.dumps({"held_out_colour_r2": result, "mllm": mllm, "sam": sam,
                      "images": images, "fit": fit}))


if __name__ == "__main__":
    app()
