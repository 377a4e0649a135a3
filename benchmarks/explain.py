"""Seconds per explanation on this machine: the Grad-CAM heatmap (load the photo, forward, backward, map onto the
photo) and the picture `predict --explain` writes, per image, for a few architectures on CPU.

    python benchmarks/explain.py --images sample_data/val --out benchmarks/results-explain.json

Wall-clock seconds and the process's CPU seconds (all threads together) are both recorded: on a shared machine
the wall clock includes time spent waiting for a core. Timing needs no trained weights (the work is the same), so each model is its architecture with random weights
and a 2-class head; the first image is a warm-up and not counted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from finetune.data.dataset import images_under
from finetune.inference.explain import Explainer, draw
from finetune.models.model_file import ModelFile, save_model_file
from finetune.models.registry import build_network
from finetune.models.weights import resolve_weights
from machine import begun, finished


def model_file(arch: str, folder: Path) -> Path:
    import torch

    torch.manual_seed(0)
    net = build_network(arch, 2)
    for p in net.head_module().parameters():  # torchvision starts some heads at zero: no gradient to show
        torch.nn.init.normal_(p, std=0.02)
    mf = ModelFile(arch=arch, classes=["ants", "bees"], preprocessing=resolve_weights(arch, "none").preprocessing,
                   state_dict=net.plain_state_dict(), head=net.head)
    return save_model_file(folder / f"{arch}.pt", mf)


def measure(arch: str, photos: list[str], folder: Path) -> dict:
    explainer = Explainer(model_file(arch, folder), "cpu")
    heat, picture, cpu_heat = [], [], []
    for i, photo in enumerate(photos):
        c0, t0 = time.process_time(), time.perf_counter()
        e = explainer.explain(photo, 1)
        c1, t1 = time.process_time(), time.perf_counter()
        draw(folder / f"{arch}-{i}.png", e, [("bees", 0.8), ("ants", 0.2)])
        t2 = time.perf_counter()
        if i:  # the first is a warm-up
            heat.append(t1 - t0)
            picture.append(t2 - t1)
            cpu_heat.append(c1 - c0)
    return {"arch": arch, "images": len(heat), "heatmap_s_median": round(statistics.median(heat), 3),
            "heatmap_s_max": round(max(heat), 3), "heatmap_s_min": round(min(heat), 3),
            "heatmap_cpu_s_median": round(statistics.median(cpu_heat), 3), "picture_s_median": round(statistics.median(picture), 3),
            "total_s_median": round(statistics.median(h + p for h, p in zip(heat, picture)), 3)}


def main() -> None:
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--images", default="sample_data/val")
    ap.add_argument("--archs", nargs="+", default=["resnet18", "mobilenet_v2", "vit_b_16"])
    ap.add_argument("--out", default="benchmarks/results-explain.json")
    args = ap.parse_args()
    photos = images_under(Path(args.images))
    start = begun()  # the code measured and the load, as it starts: recorded with the results
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(arch, photos, Path(tmp)) for arch in args.archs]
    result = {**finished(start), "torch_threads": torch.get_num_threads(), "results": rows}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
