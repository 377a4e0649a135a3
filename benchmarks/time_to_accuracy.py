"""Time to a good model: the PyTorch tutorial's recipe against finetune, on real pretrained weights.

For each seed: the tutorial recipe (fine-tune all, 25 epochs; and its fixed-feature variant) and finetune
(--mode finetune with its defaults; the CPU default with a time budget: a probe, then fine-tuning from it;
--mode feature-extract, the converged probe), each a fresh process.
Reported per pair: the tutorial's final best val accuracy (the target), the time at which each first reached
it (seconds since the process started: the tutorial's rows and finetune's metrics.csv both record it), each
one's final best accuracy and total wall time. Results: --out (JSON), a table on stdout.

    python benchmarks/time_to_accuracy.py --data ../shared/data/hymenoptera_data --model mobilenet_v2 \\
        --weights ../shared/weights/mobilenet_v2-imagenet-int8dequant.pth --seeds 0 1 2 --work /tmp/tta
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

from machine import begun, finished

HERE = Path(__file__).resolve().parent
# (tutorial recipe, finetune run, its options): fine-tuning outright; the CPU default's fine-tuning path (a converged
# probe, then fine-tuning from it: LP-FT; a 10-minute budget leaves all 10 default epochs); the probe alone.
PAIRS = (("finetune", "finetune", ["--mode", "finetune"]),
         ("finetune", "lp-ft", ["--mode", "auto", "--time-budget", "10m"]),
         ("feature-extract", "feature-extract", ["--mode", "feature-extract"]))


def tutorial(args, mode: str, seed: int, work: Path) -> dict:
    """One tutorial run; with --work, a run already there (same data, model, epochs, seed) is reused: the recipe's
    side does not change when finetune does."""
    out = work / f"tutorial-{mode}-{seed}.json"
    r = json.loads(out.read_text()) if out.exists() else {}
    if r.get("wall") is None or r.get("run") != [args.data, args.model, Path(args.weights).name, args.tutorial_epochs]:
        t0 = time.time()
        subprocess.run([sys.executable, str(HERE / "tutorial_baseline.py"), args.data, "--mode", mode, "--model",
                        args.model, "--weights", args.weights, "--epochs", str(args.tutorial_epochs), "--seed",
                        str(seed), "--out", str(work / "t.pt"), "--json", str(out)], check=True, capture_output=True)
        r = json.loads(out.read_text())
        r |= {"wall": time.time() - t0, "run": [args.data, args.model, Path(args.weights).name, args.tutorial_epochs]}
        out.write_text(json.dumps(r))
    return {"wall": r["wall"], "best": r["best_val_acc"],
            "curve": [(row["elapsed"], row["val_acc"]) for row in r["history"]]}


def finetune(args, name: str, options: list[str], seed: int, work: Path, extra: list[str]) -> dict:
    run = work / f"finetune-{name}-{seed}"
    shutil.rmtree(run, ignore_errors=True)
    t0 = time.time()
    cache = work / "cache"  # cold every time: no run reuses features an earlier one computed
    shutil.rmtree(cache, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "finetune", "train", args.data, "--model", args.model, "--weights",
                    args.weights, *options, "--seed", str(seed), "-o", str(run), "-q", *extra], check=True,
                   capture_output=True, env={**os.environ, "FINETUNE_CACHE": str(cache)})
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    curve = [(float(r["elapsed"]), float(r["val_acc"])) for r in rows]
    return {"wall": time.time() - t0, "best": max(a for _, a in curve), "curve": curve}


def first_time(curve: list, target: float) -> float | None:
    return next((t for t, acc in curve if acc >= target - 1e-4), None)  # metrics.csv rounds to 6 places


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", default="mobilenet_v2")
    ap.add_argument("--weights", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--tutorial-epochs", type=int, default=25)
    ap.add_argument("--out", default=str(HERE / "results-time-to-accuracy.json"))
    ap.add_argument("--work", help="keep the runs here, and reuse the tutorial's runs found here")
    ap.add_argument("extra", nargs="*", help="more options for finetune train, after --")
    args = ap.parse_args()
    start = begun()  # the code measured and the load, as it starts: recorded with the results
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = args.work or tmp
        Path(tmp).mkdir(parents=True, exist_ok=True)
        for seed in args.seeds:
            for tut_mode, ft_mode, options in PAIRS:
                t = tutorial(args, tut_mode, seed, Path(tmp))
                f = finetune(args, ft_mode, options, seed, Path(tmp), args.extra)
                t_hit, f_hit = first_time(t["curve"], t["best"]), first_time(f["curve"], t["best"])
                rows.append({"seed": seed, "mode": ft_mode, "options": options, "tutorial_recipe": tut_mode,
                             "target": t["best"], "tutorial": t, "finetune": f,
                             "tutorial_time_to_target": t_hit, "finetune_time_to_target": f_hit,
                             "whole_run_ratio": t["wall"] / f["wall"],
                             "time_to_target_ratio": t_hit / f_hit if f_hit else None})
                print(f"seed {seed} {ft_mode:15s} target {t['best']:.3f}: tutorial {t_hit:.0f}s (run {t['wall']:.0f}s),"
                      f" finetune {f_hit if f_hit is None else round(f_hit)}s (run {f['wall']:.0f}s, best "
                      f"{f['best']:.3f})", flush=True)
    Path(args.out).write_text(json.dumps({**finished(start), "data": args.data,
                                          "model": args.model, "weights": Path(args.weights).name, "runs": rows},
                                         indent=2) + "\n")


if __name__ == "__main__":
    main()
