"""How long finding and splitting a dataset takes as it grows: 1k, 10k, 100k files, first run and index reused.

    python benchmarks/index.py --work /tmp/index-bench          # writes benchmarks/results-index.json

Generates folders of small distinct JPEGs (10 class folders; kept in --work for later runs), then times
`finetune.data.find_dataset` in a fresh process twice per folder: with an empty cache (every file whose
size collides with another's is fingerprinted) and again (fingerprints read from the index). The page
cache is warm in both (the files were just written or read), so the numbers are CPU and system-call cost.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from machine import begun, finished

HERE = Path(__file__).resolve().parent
TIMER = """
import sys, time
from finetune.data.dataset import find_dataset
t = time.perf_counter()
split = find_dataset(sys.argv[1])
print(time.perf_counter() - t, len(split.train) + len(split.val))
"""


def generate(root: Path, n: int) -> None:
    import numpy as np
    from PIL import Image

    if root.is_dir() and sum(len(files) for _, _, files in os.walk(root)) == n:
        return
    rng = np.random.default_rng(n)
    for i in range(n):
        folder = root / f"class{i % 10:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        w, h = (int(v) for v in rng.integers(40, 90, 2))
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
            folder / f"img{i:06d}.jpg", quality=int(rng.integers(60, 95)))


def timed(root: Path, cache: Path) -> tuple[float, int]:
    env = os.environ | {"FINETUNE_CACHE": str(cache)}
    out = subprocess.run([sys.executable, "-c", TIMER, str(root)], env=env, check=True, capture_output=True,
                         text=True).stdout.split()
    return float(out[0]), int(out[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True, help="folder for the generated datasets")
    p.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    p.add_argument("--out", type=Path, default=HERE / "results-index.json")
    a = p.parse_args()
    start = begun()  # the code measured and the load, as it starts: recorded with the results
    rows = []
    for n in a.sizes:
        root = a.work / f"files-{n}"
        generate(root, n)
        with tempfile.TemporaryDirectory() as cache:
            first, found = timed(root, Path(cache))
            again, _ = timed(root, Path(cache))
        rows.append({"files": n, "found": found, "first_run_s": round(first, 3), "index_reused_s": round(again, 3),
                     "folder_mb": round(sum(f.stat().st_size for f in root.rglob("*.jpg")) / 1e6, 1)})
        print(f"{n:>7} files: first run {first:6.2f} s, index reused {again:6.2f} s", flush=True)
    a.out.write_text(json.dumps({**finished(start), "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
