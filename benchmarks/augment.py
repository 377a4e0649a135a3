"""Each augmentation and regularisation option against the default recipe, on real data with real weights:
short fine-tunes (the whole network trains), several seeds, val accuracy and loss per run.

    python benchmarks/augment.py --data ../shared/data/hymenoptera_data --model mobilenet_v2 \\
        --weights ../shared/weights/mobilenet_v2-imagenet-int8dequant.pth --epochs 3 --train-size 128 --seeds 0 1 2

Every run is finetune's own run_training in this process with the default settings plus one option (the
"variants" below); the seed sets the initial head, the shuffling and the augmentation draws. The results
file is rewritten after each run, and runs already in it are skipped, so an interrupted benchmark goes on.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from finetune.config import TrainConfig
from finetune.training import run_training
from machine import begun, finished

VARIANTS = {  # name: the options it adds to the default recipe (--augment standard, nothing else)
    "default (standard)": {},
    "--augment trivial": {"augment": "trivial"},
    "--augment randaugment": {"augment": "randaugment"},
    "--mixup 0.2": {"mixup": 0.2},
    "--cutmix 1.0": {"cutmix": 1.0},
    "--label-smoothing 0.1": {"label_smoothing": 0.1},
    "--erasing 0.25": {"erasing": 0.25},
}


def summary(runs: list[dict]) -> dict:
    out = {}
    for name in VARIANTS:
        rs = [r for r in runs if r["variant"] == name]
        if not rs:
            continue
        row = {"n": len(rs)}
        for key in ("best_val_acc", "last_val_acc", "last_val_loss", "seconds"):
            values = [r[key] for r in rs]
            row[key] = {"mean": round(statistics.mean(values), 4),
                        "sd": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
                        "min": round(min(values), 4), "max": round(max(values), 4)}
        out[name] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", default="mobilenet_v2")
    ap.add_argument("--weights", required=True)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--train-size", type=int, default=0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--out", default="benchmarks/results-augment.json")
    args = ap.parse_args()
    out = Path(args.out)
    runs = json.loads(out.read_text())["runs"] if out.is_file() else []
    done = {(r["variant"], r["seed"]) for r in runs}
    with tempfile.TemporaryDirectory() as work:
        for seed in args.seeds:  # seeds outermost: an interrupted run leaves every variant equally measured
            for name in args.variants:
                if (name, seed) in done:
                    continue
                cfg = TrainConfig(data=args.data, model=args.model, weights=args.weights, epochs=args.epochs,
                                  train_size=args.train_size, seed=seed, output=str(Path(work) / f"{seed}-{len(runs)}"),
                                  **VARIANTS[name])
                t0, start = time.perf_counter(), begun()  # the code and the load: recorded with the run
                r = run_training(cfg)
                last = r.history[-1]
                runs.append({"variant": name, "seed": seed, "best_val_acc": r.best_val_acc,
                             "last_val_acc": last["val_acc"], "last_val_loss": last["val_loss"],
                             "val_acc": [h["val_acc"] for h in r.history], "train_acc": [h["train_acc"] for h in
                                                                                         r.history],
                             "seconds": round(time.perf_counter() - t0, 1)} | finished(start))
                print(f"{name:24s} seed {seed}: best {r.best_val_acc:.4f} last {last['val_acc']:.4f} "
                      f"loss {last['val_loss']:.4f}", flush=True)
                out.write_text(json.dumps({"data": args.data, "model": args.model, "weights": Path(args.weights).name,
                                           "epochs": args.epochs, "train_size": args.train_size,
                                           "summary": summary(runs), "runs": runs}, indent=1) + "\n")
    print(json.dumps(summary(runs), indent=1))


if __name__ == "__main__":
    main()
