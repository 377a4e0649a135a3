"""The bar of `finetune suggest` (issue 26), measured on real photos for several draws of the labelled photos.

A model is trained by the CPU default (MobileNetV2, the probe) on 10 ants + 10 bees photos drawn from ants/bees'
train/ (seeded); the other 225 training photos, in one flat folder, are the pool. The 30 photos `suggest` ranks first
should hold at least twice the pool's rate of photos that model gets wrong (`predict` on the whole pool against the
true folders), and `--json` should list exactly 30 distinct paths of the pool.

    python benchmarks/suggest_bar.py --data ../shared/data/hymenoptera_data \\
        --weights ../shared/weights/mobilenet_v2-imagenet-int8dequant.pth

Writes benchmarks/results-suggest-bar.json (one row per seed). tests/test_suggest.py holds the bar for seed 0.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from pathlib import Path

from machine import begun, finished

HERE = Path(__file__).resolve().parent


def one(data: Path, weights: str, seed: int, n: int) -> dict:
    from typer.testing import CliRunner

    from finetune.cli import app

    def invoke(*args):
        r = CliRunner().invoke(app, [str(a) for a in args])
        if r.exit_code != 0:
            raise RuntimeError(r.output)
        return r.stdout

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        truth, labelled, pool = {}, tmp / "labelled", tmp / "pool"
        pool.mkdir()
        for cls in sorted(p.name for p in (data / "train").iterdir() if p.is_dir()):
            files = sorted((data / "train" / cls).iterdir())
            random.Random(seed).shuffle(files)
            (labelled / cls).mkdir(parents=True)
            for f in files[:10]:
                shutil.copy(f, labelled / cls / f.name)
            for f in files[10:]:
                shutil.copy(f, pool / f.name)
                truth[f.name] = cls
        model = tmp / "run" / "best.pt"
        invoke("train", labelled, "--model", "mobilenet_v2", "--weights", weights, "-o", tmp / "run", "-q")
        t0 = time.perf_counter()
        paths = [s["path"] for s in json.loads(invoke("suggest", pool, "-m", model, "-n", n, "--json"))["suggestions"]]
        seconds = time.perf_counter() - t0
        predicted = json.loads(invoke("predict", pool, "-m", model, "--json", "-q"))
    wrong = {Path(p["path"]).name for p in predicted if p["predictions"][0]["class"] != truth[Path(p["path"]).name]}
    pool_rate = len(wrong) / len(truth)
    suggested_rate = sum(Path(p).name in wrong for p in paths) / len(paths)
    return {"seed": seed, "pool": len(truth), "pool_wrong": len(wrong), "pool_rate": round(pool_rate, 4),
            "suggested": len(paths), "distinct": len(set(paths)), "all_of_the_pool": all(Path(p).name in truth
                                                                                        for p in paths),
            "suggested_wrong": sum(Path(p).name in wrong for p in paths), "suggested_rate": round(suggested_rate, 4),
            "ratio": round(suggested_rate / pool_rate, 2) if pool_rate else None, "suggest_seconds": round(seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("-n", type=int, default=30)
    ap.add_argument("--out", default=str(HERE / "results-suggest-bar.json"))
    args = ap.parse_args()
    start = begun()  # the code measured and the load, as it starts: recorded with the results
    rows = []
    for seed in range(args.seeds):
        rows.append(one(Path(args.data), args.weights, seed, args.n))
        print(json.dumps(rows[-1]), flush=True)
    Path(args.out).write_text(json.dumps({**finished(start), "weights": Path(args.weights).name, "n": args.n,
                                          "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
