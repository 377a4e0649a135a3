"""Optuna search (`finetune tune` now: TPE after random start-up trials, median pruner) against the coarse->fine
random search it replaced (benchmarks/random_search_baseline.py), at the same number of trials, the same
ranges and the same epochs per trial, over several search seeds; writes what each search found and spent.

    python benchmarks/tune_search.py --data ../shared/data/hymenoptera_data --model mobilenet_v2 \\
        --weights ../shared/weights/mobilenet_v2-imagenet-int8dequant.pth --mode feature-extract --seeds 0 1 2

Each search trains every trial with finetune's own run_training (in this process: the backbone features are
computed once per augmentation and read from the feature cache afterwards). The data split and the training
seed are the same in every search (--train-seed); only the search's own seed changes, so the spread is that of
the searches, not of the data. The val set both selects and scores, as in `finetune tune` itself: the best val
accuracy of a search is optimistic for both methods alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import random_search_baseline as baseline  # noqa: E402
from machine import begun, finished  # noqa: E402

from finetune import search as tune  # noqa: E402
from finetune.config import TrainConfig  # noqa: E402
from finetune.training import run_training  # noqa: E402


def counted(epochs: list):
    """An emit that counts the epochs each trial really trained (pruned and diverged trials included)."""
    def emit(event, **kw):
        if event == "epoch_end":
            epochs[-1] += 1
    return emit


def tee(*emits):
    def emit(event, **kw):
        for e in emits:
            e(event, **kw)
    return emit


def search(method: str, base: TrainConfig, root: Path, seed: int, args) -> dict:
    epochs: list[int] = []
    t0 = time.perf_counter()
    if method == "random":
        def run(cfg):
            epochs.append(0)
            return run_training(cfg, counted(epochs))

        r = baseline.run_search(base, root, args.trials, args.coarse_epochs, args.fine_epochs, seed=seed,
                                space=baseline.Space(mode=(base.mode,)), run=run)
        trials = [{"trial": t.number, "status": t.status, "val_acc": t.val_acc, "epochs_run": e}
                  for t, e in zip(r.trials, epochs)]
    else:
        def run(cfg, emit):
            epochs.append(0)
            return run_training(cfg, tee(emit, counted(epochs)))

        r = tune.run_search(base, root, args.trials, args.coarse_epochs, args.fine_epochs, seed=seed,
                            space=tune.Space(mode=(base.mode,)), run=run, pruner=args.pruner)
        trials = [{"trial": t.number, "status": t.status, "val_acc": t.val_acc, "epochs_run": e}
                  for t, e in zip(r.trials, epochs)]
    return {"method": method, "seed": seed, "best_val_acc": r.best.val_acc if r.best else None,
            "best_trial": r.best.number if r.best else None, "best_params": r.best.params if r.best else None,
            "epochs": sum(epochs), "seconds": round(time.perf_counter() - t0, 1), "trials": trials}


def best_within(trials: list[dict], epoch_budget: int) -> float | None:
    """The best finished (not pruned, not diverged) trial among those that ran before epoch_budget was spent."""
    spent, best = 0, None
    for t in trials:
        spent += t["epochs_run"]
        if spent > epoch_budget:
            break
        if t["status"] == "ok" and (best is None or t["val_acc"] > best):
            best = t["val_acc"]
    return best


def summary(results: list[dict]) -> dict:
    def stats(values):
        values = [v for v in values if v is not None]
        mean = sum(values) / len(values)
        sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
        return {"mean": round(mean, 4), "sd": round(sd, 4), "min": min(values), "max": max(values), "n": len(values)}

    out = {}
    for method in ("random", "optuna"):
        rs = [r for r in results if r["method"] == method]
        if rs:
            out[method] = {"best_val_acc": stats([r["best_val_acc"] for r in rs]),
                           "epochs": stats([r["epochs"] for r in rs]), "seconds": stats([r["seconds"] for r in rs])}
    paired = [(r, o) for r in results if r["method"] == "random" for o in results
              if o["method"] == "optuna" and o["seed"] == r["seed"]]
    if paired:
        out["optuna_at_random_epochs"] = stats([best_within(o["trials"], r["epochs"]) for r, o in paired])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", default="mobilenet_v2")
    ap.add_argument("--weights", required=True)
    ap.add_argument("--mode", default="feature-extract")
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--coarse-epochs", type=int, default=3)
    ap.add_argument("--fine-epochs", type=int, default=10)
    ap.add_argument("--pruner", default="median")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--train-seed", type=int, default=0)
    ap.add_argument("--methods", nargs="+", default=["random", "optuna"])
    ap.add_argument("--out", default="benchmarks/results-tune.json")
    args = ap.parse_args()
    base = TrainConfig(data=args.data, model=args.model, weights=args.weights, mode=args.mode, seed=args.train_seed)
    out = Path(args.out)
    results = json.loads(out.read_text())["searches"] if out.is_file() else []
    done = {(r["method"], r["seed"]) for r in results}
    with tempfile.TemporaryDirectory() as work:
        os.environ["FINETUNE_CACHE"] = str(Path(work) / "cache")
        for augment in tune.AUGMENTS:  # features extracted once before any search is timed (2 views, as trials)
            run_training(dataclasses.replace(base, augment=augment, solver="sgd", epochs=2,
                                             output=str(Path(work) / f"warm-{augment}")))
        for seed in args.seeds:
            for method in args.methods:
                if (method, seed) in done:
                    continue
                start = begun()  # the code and the load as this search starts: recorded with it
                r = search(method, base, Path(work) / f"{method}-{seed}", seed, args) | finished(start)
                results.append(r)
                print(f"{method:7s} seed {seed}: best {r['best_val_acc']:.4f} (trial {r['best_trial']}), "
                      f"{r['epochs']} epochs, {r['seconds']:.0f} s", flush=True)
                out.write_text(json.dumps({
                    "data": args.data, "model": args.model, "weights": Path(args.weights).name, "mode": args.mode,
                    "trials": args.trials, "coarse_epochs": args.coarse_epochs, "fine_epochs": args.fine_epochs,
                    "pruner": args.pruner, "train_seed": args.train_seed, "summary": summary(results), "searches": results}, indent=1) + "\n")
    print(json.dumps(summary(results), indent=1))


if __name__ == "__main__":
    main()
