"""The GPU measurements benchmarks/gpu.sh runs: see there. Each run a fresh process, timed spawn to exit."""

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
EPOCHS = 25
VARIANTS = {"defaults": [], "no-amp": ["--no-amp"], "no-channels-last": ["--no-channels-last"],
            "stream (no RAM cache)": [], "compile": ["--compile"]}


def timed(cmd: list, env: dict | None = None) -> float:
    import os

    t0 = time.time()
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, **(env or {})})
    return time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--weights", default="none")
    ap.add_argument("--out", default=str(HERE / "results-gpu.json"))
    args = ap.parse_args()
    import torch

    info = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "torch": torch.__version__,
            "data": args.data, "weights": args.weights, "epochs": EPOCHS}
    startup = timed([sys.executable, "-c", "import torch, torchvision; torch.zeros(1, device='cuda'); "
                     "torch.cuda.synchronize()"])
    results = {"cuda_startup_s": startup}
    with tempfile.TemporaryDirectory() as tmp:
        results["tutorial_s"] = timed([sys.executable, str(HERE / "tutorial_baseline.py"), args.data, "--weights",
                                       args.weights, "--epochs", str(EPOCHS), "--out", f"{tmp}/t.pt",
                                       "--json", f"{tmp}/t.json"])
        results["tutorial_best"] = json.loads(Path(f"{tmp}/t.json").read_text())["best_val_acc"]
        for name, extra in VARIANTS.items():
            run = Path(tmp) / name.replace(" ", "_")
            env = {"FINETUNE_RAM_CACHE_GB": "0"} if name.startswith("stream") else None
            seconds = timed([sys.executable, "-m", "finetune", "train", args.data, "--weights", args.weights,
                             "--mode", "finetune", "--epochs", str(EPOCHS), "-o", str(run), "-q", *extra], env)
            with open(run / "metrics.csv") as f:
                rows = list(csv.DictReader(f))
            results[name] = {"seconds": seconds, "best_val_acc": max(float(r["val_acc"]) for r in rows),
                             "epoch_seconds": [float(r["seconds"]) for r in rows],
                             "ratio_vs_tutorial": results["tutorial_s"] / seconds,
                             "seconds_beyond_cuda_startup": seconds - startup}
            print(name, json.dumps(results[name]), flush=True)
    Path(args.out).write_text(json.dumps(info | results, indent=2) + "\n")
    print(json.dumps(info | {k: v for k, v in results.items() if not isinstance(v, dict)}, indent=2))


if __name__ == "__main__":
    main()
