"""Fine-tuning from the converged probe (LP-FT) without losing it: which settings keep the first fine-tuning epochs
near the probe, measured on ants/bees, its thumbnails and dog breeds (benchmarks/datasets.py), MobileNetV2 with the
shared real ImageNet weights, 5 fine-tuning epochs after the probe, seed 0.

Each run is `finetune train DATA --model mobilenet_v2 --weights W --epochs 5 ...` as a user types it, a fresh process
with a cold feature cache: on a CPU, --epochs makes the run fit the probe first and fine-tune from it, with what
finetune decides for that (training/plan.py: BatchNorm statistics frozen, the backbone at 0.1x the head's lr;
training/recipe.py: the light crop). A variant adds options a user can type (--augment, --backbone-lr-mult, --lr).

    python benchmarks/datasets.py --out /tmp/bench-data
    python benchmarks/lpft.py --data /tmp/bench-data --sets antsbees antsbees-thumbs
    python benchmarks/lpft.py --data ../shared/data --sets dog_breeds/labels.csv \
        --variants "default (backbone 0.1x, light crop)" --update
    python benchmarks/lpft.py --table          # the table of benchmarks/results-lpft.json

On a crowded machine run it under OMP_NUM_THREADS=1 (recorded in each command): there, at the same load, an epoch
on torch's default two threads took more than ten times as long as on one (benchmarks/README.md, LP-FT section).

Writes benchmarks/results-lpft.json (every epoch's val and train accuracy and seconds, the probe's first; the command,
commit, machine and load).
"""

import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import provenance

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results-lpft.json"
# name -> the options added to the default command. BatchNorm statistics are always frozen when fine-tuning from the
# probe (no option updates them), so the earlier "updated-bn" variants cannot be run without patching finetune.
VARIANTS = {
    "default (backbone 0.1x, light crop)": [],
    "standard crop": ["--augment", "standard"],
    "backbone 1x, standard crop": ["--backbone-lr-mult", "1", "--augment", "standard"],
    "lr 0.0008 for all, light crop": ["--lr", "0.0008", "--backbone-lr-mult", "1", "--augment", "light"],
}
EPOCHS = 5


def command(data: Path, weights: str, options: list[str], out: Path) -> list[str]:
    return [sys.executable, "-m", "finetune", "train", str(data), "--model", "mobilenet_v2", "--weights", weights,
            "--epochs", str(EPOCHS), "--seed", "0", *options, "-o", str(out), "-q"]


def run(data: Path, variant: str, weights: str) -> dict:
    """One fresh `finetune train` process: every epoch's (val acc, train acc, seconds), the probe's first."""
    with tempfile.TemporaryDirectory(prefix="lpft-") as tmp:
        out = Path(tmp) / "run"
        cmd = command(data, weights, VARIANTS[variant], out)
        env = {**os.environ, "FINETUNE_CACHE": str(Path(tmp) / "cache")}  # cold: nothing from an earlier run
        load, t0 = os.getloadavg(), time.time()
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)  # its stderr said below
        wall = time.time() - t0
        if p.returncode:
            raise RuntimeError(f"{shlex.join(cmd)} failed: {p.stderr[-2000:]}")
        rows = list(csv.DictReader((out / "metrics.csv").open()))
        plan = json.loads((out / "config.json").read_text())["plan"]["why"]
    if rows[0]["lr"] != "" or len(rows) != EPOCHS + 1:
        raise RuntimeError(f"{variant} on {data}: expected the probe, then {EPOCHS} epochs; got {len(rows)} rows")
    val = [float(r["val_acc"]) for r in rows]
    train = [float(r["train_acc"]) if r["train_acc"] else None for r in rows]  # the probe's row may have none
    shown = ["python", *cmd[1:-3], "-o", "OUT", "-q"]  # as typed from the repository root; OUT a temp folder
    threads = os.environ.get("OMP_NUM_THREADS")  # set to 1 on a crowded machine: no thread waits on a descheduled one
    return {"command": (f"OMP_NUM_THREADS={threads} " if threads else "") + shlex.join(shown), "plan": plan,
            "val_acc": val, "train_acc": train, "seconds": [float(r["seconds"]) for r in rows],
            "probe": val[0], "best": max(val), "lowest_after_probe": min(val[1:]), "train_acc_last": train[-1],
            "wall": round(wall, 1),
            "load_before": [round(x, 2) for x in load], "load_after": [round(x, 2) for x in os.getloadavg()],
            "date": time.strftime("%Y-%m-%d %H:%M")}


def table() -> str:
    results = json.loads(RESULTS.read_text())
    lines = ["| set | options added | probe | fine-tuning epochs 1-5 (val acc) | lowest | best | train acc, epoch 5 |",
             "|---|---|---:|---|---:|---:|---:|"]
    order = list(VARIANTS)
    for key, r in sorted(results["runs"].items(), key=lambda kv: (kv[0].split(" | ")[0],
                                                                  order.index(kv[0].split(" | ", 1)[1]))):
        name, variant = key.split(" | ", 1)
        variant = f"`{' '.join(VARIANTS[variant])}`" if VARIANTS.get(variant) else "none (the default)"  # as typed
        epochs = ", ".join(f"{a:.3f}" for a in r["val_acc"][1:])
        lines.append(f"| {name} | {variant} | {r['probe']:.3f} | {epochs} | {r['lowest_after_probe']:.3f} | "
                     f"{r['best']:.3f} | {r['train_acc_last']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="/tmp/bench-data")
    ap.add_argument("--weights", default=str(HERE.parents[1] / "shared" / "weights" /
                                             "mobilenet_v2-imagenet-int8dequant.pth"))
    ap.add_argument("--sets", nargs="+", default=["antsbees", "antsbees-thumbs", "dogs"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--update", action="store_true", help="keep the runs in the results file not measured now")
    ap.add_argument("--table", action="store_true")
    args = ap.parse_args()
    if not args.table:
        results = json.loads(RESULTS.read_text()) if RESULTS.exists() and args.update else {"runs": {}}
        here = provenance()
        results |= {"machine": {k: v for k, v in here.items() if k not in ("commit", "dirty", "command")},
                    "script": here["command"], "epochs": EPOCHS, "seed": 0, "model": "mobilenet_v2",
                    "weights": Path(args.weights).name}
        for variant in args.variants:  # variant-major: a run cut short still has the first variants on every set
            for name in args.sets:
                code = provenance()  # commit and dirty as the run starts: the code it measures
                r = run(Path(args.data) / name, variant, args.weights)
                results["runs"][f"{name} | {variant}"] = r | {"commit": code["commit"], "dirty": code["dirty"]}
                RESULTS.write_text(json.dumps(results, indent=1) + "\n")
                print(f"{name} | {variant}: probe {r['probe']:.3f}, lowest {r['lowest_after_probe']:.3f}, "
                      f"best {r['best']:.3f}, {r['wall']:.0f} s", flush=True)
    print(table())


if __name__ == "__main__":
    main()
