"""Fine-tuning from the converged probe (LP-FT) without losing it: which settings keep the first fine-tuning epochs
near the probe, measured on ants/bees, its thumbnails and dog breeds (benchmarks/datasets.py), MobileNetV2 with the
shared real ImageNet weights, 5 fine-tuning epochs after the probe, seed 0.

A variant sets what finetune decides for a run from the probe (training.plan.Plan: BatchNorm statistics frozen or
updated, the backbone's lr multiplier) and the options a user can type (--lr, --augment, --train-size); "eval" sets
the eval resize and crop (small photos near their own size instead of upsampled). Each run is a fresh process.

    python benchmarks/lpft.py --data /tmp/bench-data --sets antsbees antsbees-thumbs
    python benchmarks/lpft.py --data ../shared/data --sets dog_breeds/labels.csv --variants updated-bn
    python benchmarks/lpft.py --table          # the table of benchmarks/results-lpft.json

Writes benchmarks/results-lpft.json (every epoch's val and train accuracy).
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from machine import cpu_name

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results-lpft.json"
# name -> (plan fields, TrainConfig settings, eval (resize, crop) or None)
VARIANTS = {
    "updated-bn": ({"frozen_statistics": False, "backbone_lr_mult": None}, {"augment": "standard"}, None),
    "updated-bn, backbone 0.1x": ({"frozen_statistics": False, "backbone_lr_mult": 0.1}, {"augment": "standard"}, None),
    "frozen-bn": ({"frozen_statistics": True, "backbone_lr_mult": None}, {"augment": "standard"}, None),
    "frozen-bn, backbone 0.1x": ({"frozen_statistics": True, "backbone_lr_mult": 0.1}, {"augment": "standard"}, None),
    "frozen-bn, backbone 0.1x, light (default)": ({"frozen_statistics": True, "backbone_lr_mult": 0.1},
                                                  {"augment": "light"}, None),
    "frozen-bn, lr 0.0008, light": ({"frozen_statistics": True, "backbone_lr_mult": None},
                                    {"augment": "light", "lr": 0.0008}, None),
    "near own size (train 112, eval 128)": ({"frozen_statistics": True, "backbone_lr_mult": 0.1},
                                            {"augment": "light", "train_size": 112}, (146, 128)),
}
DEFAULT = "frozen-bn, backbone 0.1x, light (default)"

CHILD = """
import dataclasses, json, sys
from finetune.config import TrainConfig
from finetune.training import run_training, setup
plan_fields, settings, ev, data, out, weights = json.loads(sys.argv[1])
make_plan, resolve = setup.make_plan, setup.resolve_weights
setup.make_plan = lambda cfg, device: dataclasses.replace(make_plan(cfg, device), **plan_fields)
if ev:
    setup.resolve_weights = lambda arch, w: dataclasses.replace(resolve(arch, w), preprocessing=dataclasses.replace(
        resolve(arch, w).preprocessing, resize_size=ev[0], crop_size=ev[1]))
cfg = TrainConfig(data=data, model="mobilenet_v2", weights=weights, epochs=5, output=out, overwrite=True,
                  given=("epochs", *settings), **settings)
r = run_training(cfg)
print(json.dumps([[h["val_acc"], h["train_acc"], h["seconds"]] for h in r.history]))
"""


def run(data: Path, variant: str, weights: str, out: Path) -> dict:
    plan_fields, settings, ev = VARIANTS[variant]
    t0 = time.time()
    p = subprocess.run([sys.executable, "-c", CHILD, json.dumps([plan_fields, settings, ev, str(data), str(out),
                                                                  weights])], capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(p.stderr[-2000:])
    hist = json.loads(p.stdout.strip().splitlines()[-1])
    return {"history": hist, "probe": hist[0][0], "best": max(h[0] for h in hist),
            "lowest_after_probe": min(h[0] for h in hist[1:]), "wall": time.time() - t0}


def table() -> str:
    results = json.loads(RESULTS.read_text())
    lines = ["| set | variant | probe | fine-tuning epochs 1-5 (val acc) | lowest | best | train acc, epoch 5 |",
             "|---|---|---:|---|---:|---:|---:|"]
    for key, r in results["runs"].items():
        name, variant = key.split(" | ", 1)
        epochs = ", ".join(f"{h[0]:.3f}" for h in r["history"][1:])
        lines.append(f"| {name} | {variant} | {r['probe']:.3f} | {epochs} | {r['lowest_after_probe']:.3f} | "
                     f"{r['best']:.3f} | {r['history'][-1][1]:.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="/tmp/bench-data")
    ap.add_argument("--weights", default=str(HERE.parents[1] / "shared" / "weights" /
                                             "mobilenet_v2-imagenet-int8dequant.pth"))
    ap.add_argument("--sets", nargs="+", default=["antsbees", "antsbees-thumbs", "dogs"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--work", default="/tmp/lpft-bench")
    ap.add_argument("--table", action="store_true")
    args = ap.parse_args()
    if not args.table:
        results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"runs": {}}
        results["cpu"] = cpu_name()
        for name in args.sets:
            for variant in args.variants:
                r = run(Path(args.data) / name, variant, args.weights, Path(args.work) / "run")
                results["runs"][f"{name} | {variant}"] = r | {"date": time.strftime("%Y-%m-%d %H:%M")}
                RESULTS.write_text(json.dumps(results, indent=1) + "\n")
                print(f"{name} | {variant}: best {r['best']:.3f}, lowest {r['lowest_after_probe']:.3f}", flush=True)
    print(table())


if __name__ == "__main__":
    main()
