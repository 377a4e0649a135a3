"""How long `finetune suggest` takes to rank 2,000 photos: the first time (every photo's features computed) and the
next (features from the cache, as in every later round of labelling).

    python benchmarks/suggest_speed.py --shared ../shared --out benchmarks/results-suggest-speed.json

The model: the CPU default (`finetune train`: the converged probe on the MobileNetV2 ImageNet backbone) on the full
ants/bees set (its 397 photos are the labelled ones suggest compares against). The pool: 2,000 distinct files, the
1,000 dog-breed photos and a mirrored copy of each. Each run is the whole command, `finetune suggest POOL -m MODEL -n
30 --json`, timed from outside (Python and torch start-up included), and its own `seconds` (from loading the model
to the ranked list). A private cache folder, so the first run really computes every feature.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import begun, finished

HERE = Path(__file__).resolve().parent


def build_pool(shared: Path, pool: Path) -> int:
    from PIL import Image, ImageOps

    pool.mkdir(parents=True)
    n = 0
    for p in sorted((shared / "data" / "dog_breeds" / "train").glob("*.jpg")):
        (pool / p.name).symlink_to(p)
        with Image.open(p) as im:
            ImageOps.mirror(im.convert("RGB")).save(pool / f"mirrored-{p.name}", quality=90)
        n += 2
    return n


def timed(cmd: list[str], env: dict) -> tuple[float, dict]:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed: {done.stderr[-2000:]}")
    return wall, json.loads(done.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=str(HERE.parent.parent / "shared"))
    ap.add_argument("--out", default=str(HERE / "results-suggest-speed.json"))
    args = ap.parse_args()
    start = begun()  # the code measured and the load, as it starts: recorded with the results
    shared = Path(args.shared).resolve()
    weights = shared / "weights" / "mobilenet_v2-imagenet-int8dequant.pth"
    with tempfile.TemporaryDirectory() as tmp:
        env = os.environ | {"FINETUNE_CACHE": f"{tmp}/cache", "FINETUNE_LITE": "0"}
        photos = build_pool(shared, Path(tmp) / "pool")
        train = [sys.executable, "-m", "finetune", "train", str(shared / "data" / "hymenoptera_data"), "--model", "mobilenet_v2",
                 "--weights", str(weights), "-o", f"{tmp}/run", "-q"]
        t0 = time.perf_counter()
        subprocess.run(train, check=True, capture_output=True, env=env)
        train_seconds = time.perf_counter() - t0
        cmd = [sys.executable, "-m", "finetune", "suggest", f"{tmp}/pool", "-m", f"{tmp}/run/best.pt", "-n", "30", "--json", "-q"]
        runs = []
        for label in ("first (features computed)", "second (features cached)", "third (features cached)"):
            wall, r = timed(cmd, env)
            runs.append({"run": label, "wall_seconds": round(wall, 2), "suggest_seconds": round(r["seconds"], 2),
                         "ranked": r["ranked"], "labelled": r["labelled"], "features_cached": r["features_cached"],
                         "suggested": len(r["suggestions"])})
            print(json.dumps(runs[-1]), flush=True)
    result = {"pool_photos": photos, "model": "mobilenet_v2 probe on ants/bees (2 classes, 397 labelled photos)",
              "train_seconds": round(train_seconds, 1), "runs": runs} | finished(start)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
