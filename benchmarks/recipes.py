"""finetune's defaults judged on data of several characters: accuracy against time on each benchmark set.

For each set of benchmarks/datasets.py (ants/bees; its thumbnails; its 12-MP copies; dog breeds; their thumbnails):
- probe:    `finetune train DATA` as a new user runs it on a CPU (the default: a converged linear probe)
- budget10: `finetune train DATA --time-budget 10m` (the probe, then fine-tuning from it for the time left)
- budget30: `finetune train DATA --time-budget 30m`
- tutorial: the PyTorch transfer-learning tutorial's recipe (benchmarks/tutorial_baseline.py: fine-tune all, batch 4,
            SGD lr 1e-3 momentum 0.9, StepLR(7, 0.1), 25 epochs)
each a fresh process with a cold feature cache, MobileNetV2 with the shared real ImageNet weights, seed 0. Every
epoch's (seconds since the process started, val accuracy) is kept, so accuracy can be read against time.

    python benchmarks/datasets.py --out /tmp/bench-data
    python benchmarks/recipes.py --data /tmp/bench-data --weights ../shared/weights/mobilenet_v2-imagenet-int8dequant.pth
    python benchmarks/recipes.py ... --sets dogs --runs budget10 --update     # re-measure some, keep the rest
    python benchmarks/recipes.py --plot-only                                  # redraw recipes.png from the results

Writes benchmarks/results-recipes.json and benchmarks/recipes.png.
"""

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_name, provenance

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results-recipes.json"
PLOT = HERE / "recipes.png"
SETS = ("antsbees", "antsbees-thumbs", "antsbees-12mp", "dogs", "dogs-thumbs")
RUNS = {"probe": [], "budget10": ["--time-budget", "10m"], "budget30": ["--time-budget", "30m"]}
TUTORIAL_EPOCHS = 25


def run_finetune(data: Path, weights: str, options: list[str], work: Path) -> dict:
    out = work / "run"
    env = {**os.environ, "FINETUNE_CACHE": str(work / "cache")}  # cold: nothing computed by an earlier run
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "finetune", "train", str(data), "--model", "mobilenet_v2", "--weights",
                        weights, *options, "-o", str(out), "-q"], capture_output=True, text=True, env=env)
    wall = time.time() - t0
    if p.returncode != 0:
        raise RuntimeError(f"finetune {' '.join(options)} on {data} failed: {p.stderr[-2000:]}")
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    config = json.loads((out / "config.json").read_text())
    curve = [(float(r["elapsed"]), float(r["val_acc"]), r["lr"] == "") for r in rows]  # (s, acc, is the probe)
    return {"wall": wall, "best": max(a for _, a, _ in curve), "curve": curve, "epochs": len(rows),
            "plan": config["plan"]["why"], "recipe": config.get("recipe"), "augment": config["augment"]}


def run_tutorial(data: Path, weights: str, work: Path) -> dict:
    out = work / "tutorial.json"
    t0 = time.time()
    subprocess.run([sys.executable, str(HERE / "tutorial_baseline.py"), str(data), "--mode", "finetune", "--model",
                    "mobilenet_v2", "--weights", weights, "--epochs", str(TUTORIAL_EPOCHS), "--seed", "0", "--out",
                    str(work / "t.pt"), "--json", str(out)], check=True, capture_output=True)
    wall = time.time() - t0
    r = json.loads(out.read_text())
    curve = [(row["elapsed"], row["val_acc"], False) for row in r["history"]]
    return {"wall": wall, "best": r["best_val_acc"], "curve": curve, "epochs": len(curve)}


def measure(args) -> None:
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() and args.update else {"runs": {}}
    results |= {"cpu": cpu_name(), "cores": os.cpu_count(), "model": "mobilenet_v2",
                "weights": Path(args.weights).name}
    for name in args.sets:
        data = Path(args.data) / name
        for run in args.runs:
            with tempfile.TemporaryDirectory(prefix="recipes-") as tmp:
                before = provenance()  # commit and dirty as the run starts: the code it measures
                load = os.getloadavg()
                r = run_tutorial(data, args.weights, Path(tmp)) if run == "tutorial" else \
                    run_finetune(data, args.weights, RUNS[run], Path(tmp))
            r |= before | {"load_before": [round(x, 2) for x in load],
                           "load_after": [round(x, 2) for x in os.getloadavg()],
                           "date": time.strftime("%Y-%m-%d %H:%M")}
            results["runs"][f"{name}/{run}"] = r
            RESULTS.write_text(json.dumps(results, indent=1) + "\n")
            print(f"{name:16s} {run:9s} best {r['best']:.3f}  wall {r['wall']:7.1f} s  epochs {r['epochs']}",
                  flush=True)


def plot() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = json.loads(RESULTS.read_text())["runs"]
    sets = [s for s in SETS if any(k.startswith(s + "/") for k in runs)]
    fig, axes = plt.subplots(1, len(sets), figsize=(4.2 * len(sets), 3.8), squeeze=False)
    styles = {"probe": ("tab:green", "o"), "budget10": ("tab:blue", "."), "budget30": ("tab:purple", "."),
              "tutorial": ("tab:red", ".")}
    for ax, name in zip(axes[0], sets):
        for run, (color, marker) in styles.items():
            r = runs.get(f"{name}/{run}")
            if r is None:
                continue
            t = [c[0] / 60 for c in r["curve"]]
            acc = [100 * c[1] for c in r["curve"]]
            label = {"probe": "default (probe)", "budget10": "--time-budget 10m", "budget30": "--time-budget 30m",
                     "tutorial": "PyTorch tutorial, 25 ep."}[run]
            ax.plot(t, acc, marker=marker, color=color, label=f"{label}: {100 * r['best']:.1f}", linewidth=1)
        ax.set(title=name, xlabel="minutes since the process started", ylabel="val accuracy (%)")
        ax.set_xscale("symlog", linthresh=1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="/tmp/bench-data")
    ap.add_argument("--weights", default=str(HERE.parents[1] / "shared" / "weights" /
                                             "mobilenet_v2-imagenet-int8dequant.pth"))
    ap.add_argument("--sets", nargs="+", default=list(SETS), choices=SETS)
    ap.add_argument("--runs", nargs="+", default=[*RUNS, "tutorial"], choices=[*RUNS, "tutorial"])
    ap.add_argument("--update", action="store_true", help="keep the results of runs not measured now")
    ap.add_argument("--plot-only", action="store_true")
    args = ap.parse_args()
    if not args.plot_only:
        if shutil.which("git") is None:
            raise SystemExit("git is needed to record the commit measured")
        measure(args)
    plot()


if __name__ == "__main__":
    main()
