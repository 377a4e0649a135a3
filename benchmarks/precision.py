"""bf16 on a CPU (issue 14): what torch reports, images/s of a training step and of inference in float32 and in
bfloat16 autocast (batch 32, ResNet-18 and MobileNetV2), and end-to-end runs of `finetune train --mode finetune`
with and without --amp on the same seeds (time and best val accuracy). Results: --out (JSON) and stdout.

    python benchmarks/precision.py --data ../shared/data/hymenoptera_data \\
        --weights ../shared/weights/mobilenet_v2-imagenet-int8dequant.pth --seeds 0 1 2 --epochs 5
"""

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import begun, finished

HERE = Path(__file__).resolve().parent


def throughput(arch: str, train: bool, dtype, batch: int = 32, steps: int = 6) -> float:
    import torch
    import torchvision

    model = torchvision.models.get_model(arch, num_classes=2).to(memory_format=torch.channels_last)
    size = 176 if train else 224  # finetune's training crop, the eval crop
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (batch,))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    model.train(train)

    def once():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"), torch.set_grad_enabled(train):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        if train:
            opt.zero_grad()
            loss.backward()
            opt.step()

    once()
    once()
    t0 = time.perf_counter()
    for _ in range(steps):
        once()
    return batch * steps / (time.perf_counter() - t0)


def run(args, seed: int, amp: bool, work: Path) -> dict:
    out = work / f"{seed}-{amp}"
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "finetune", "train", args.data, "--model", args.model, "--weights",
                    args.weights, "--mode", "finetune", "--epochs", str(args.epochs), "--seed", str(seed), "-o",
                    str(out), "-q", "--amp" if amp else "--no-amp"], check=True, capture_output=True)
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return {"seed": seed, "amp": amp, "wall": time.time() - t0, "best_val_acc": max(float(r["val_acc"]) for r in rows),
            "epoch_seconds": [float(r["seconds"]) for r in rows],
            "precision": json.loads((out / "config.json").read_text())["precision"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", default="mobilenet_v2")
    ap.add_argument("--weights", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--out", default=str(HERE / "results-precision.json"))
    args = ap.parse_args()
    start = begun()  # the code measured and the load, as it starts: recorded with the results
    import torch

    from finetune._util.devices import native_cpu_bf16

    result = {"native_bf16": native_cpu_bf16(),
              "mkldnn_bf16_supported": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()), "throughput": {}}
    for arch in ("resnet18", "mobilenet_v2"):
        for train in (True, False):
            key = f"{arch} {'train step (176 px)' if train else 'inference (224 px)'}"
            fp32, bf16 = throughput(arch, train, "fp32"), throughput(arch, train, "bf16")
            result["throughput"][key] = {"fp32": fp32, "bf16": bf16, "ratio": bf16 / fp32}
            print(f"{key}: fp32 {fp32:.1f} img/s, bf16 {bf16:.1f} img/s, {bf16 / fp32:.2f}x", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        result["runs"] = [run(args, seed, amp, Path(tmp)) for seed in args.seeds for amp in (False, True)]
    for r in result["runs"]:
        print(f"seed {r['seed']} amp {r['amp']}: {r['wall']:.1f}s, best {r['best_val_acc']:.4f}", flush=True)
    Path(args.out).write_text(json.dumps(finished(start) | result, indent=2) + "\n")


if __name__ == "__main__":
    main()
