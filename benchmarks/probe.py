"""The converged linear probe (feature-extract's default head) against a sweep of SGD heads (lr x epochs), on the
same cached features: best val accuracy of each, and the seconds each took. The probe chooses its L2 strength by
cross-validation on the training images only; each SGD run is scored by its best epoch on val, which flatters it,
and by its last epoch.

    python benchmarks/probe.py --data ../shared/data/hymenoptera_data \\
        --weights ../shared/weights/mobilenet_v2-imagenet-int8dequant.pth
    python benchmarks/probe.py --data ../shared/data/dog_breeds/labels.csv --path-col id --val-fraction 0.5 \\
        --weights ../shared/weights/mobilenet_v2-imagenet-int8dequant.pth --out benchmarks/results-probe-dogs.json
"""

import argparse
import csv
import json
import os
import tempfile
import time
from pathlib import Path

from machine import begun, finished

HERE = Path(__file__).resolve().parent
LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
EPOCHS = (5, 10, 25)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", default="mobilenet_v2")
    ap.add_argument("--weights", required=True)
    ap.add_argument("--val-fraction", type=float, default=0.2)
    ap.add_argument("--path-col", help="a label file's path column, where its name is not a usual one")
    ap.add_argument("--out", default=str(HERE / "results-probe.json"))
    args = ap.parse_args()
    start = begun()  # the code measured and the load, as it starts: recorded with the results
    from finetune.config import TrainConfig
    from finetune.training import run_training

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("FINETUNE_CACHE", str(Path(tmp) / "cache"))
        base = dict(data=args.data, model=args.model, weights=args.weights, mode="feature-extract",
                    val_fraction=args.val_fraction, path_col=args.path_col, workers=0)
        run_training(TrainConfig(**base, output=f"{tmp}/warm"))  # features computed and cached once
        for solver, lr, epochs in [("lbfgs", None, 1)] + [("sgd", lr, e) for lr in LRS for e in EPOCHS]:
            t0 = time.perf_counter()
            r = run_training(TrainConfig(**base, solver=solver, lr=lr, epochs=epochs,
                                         output=f"{tmp}/{solver}-{lr}-{epochs}"))
            with open(f"{tmp}/{solver}-{lr}-{epochs}/metrics.csv") as f:
                last = list(csv.DictReader(f))[-1]
            rows.append({"solver": solver, "lr": lr, "epochs": epochs, "best_val_acc": r.best_val_acc,
                         "best_epoch": r.best_epoch, "final_val_acc": float(last["val_acc"]),
                         "seconds": time.perf_counter() - t0})
            print(json.dumps(rows[-1]), flush=True)
    sgd = [r for r in rows if r["solver"] == "sgd"]
    best = max(sgd, key=lambda r: r["best_val_acc"])
    summary = {"probe": rows[0], "best_sgd": best,
               "sgd_better_than_probe": sum(r["best_val_acc"] > rows[0]["best_val_acc"] for r in sgd),
               "sgd_final_better_than_probe": sum(r["final_val_acc"] > rows[0]["best_val_acc"] for r in sgd),
               "sgd_runs": len(sgd)}
    Path(args.out).write_text(json.dumps({**finished(start), "data": args.data, "model": args.model,
                                          "weights": Path(args.weights).name, "summary": summary, "runs": rows},
                                         indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
