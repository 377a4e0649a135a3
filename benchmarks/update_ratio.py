"""Which update/weight ratios a healthy run has, and whether train's advice fires when (and only when) the lr is
far off: runs `finetune train` at the default lr, 30x it and 1/30 of it, in both modes, with real weights, and
records each epoch's ratios and every update-ratio warning the run printed.

    python benchmarks/update_ratio.py --data ../shared/data/hymenoptera_data --model mobilenet_v2 \\
        --weights ../shared/weights/mobilenet_v2-imagenet-int8dequant.pth --out benchmarks/results-update-ratio.json
"""

import argparse
import csv
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from machine import begun, finished

DEFAULT_LR = 1e-3 / 4 * 32  # finetune's SGD default at -b 32


def run(args, mode: str, factor: float, work: Path) -> dict:
    lr = DEFAULT_LR * factor
    out = work / f"{mode}-{factor:g}"
    cmd = [sys.executable, "-m", "finetune", "train", args.data, "--model", args.model, "--weights", args.weights,
           "--epochs", str(args.epochs), "--mode", mode, "--lr", f"{lr:g}", "-o", str(out), *args.extra]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(p.stderr[-2000:])
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return {"mode": mode, "lr": lr, "lr_factor": factor,
            "epochs": [{k: r[k] for k in ("epoch", "val_acc", "lr", "update_ratio_head", "update_ratio_backbone")}
                       for r in rows],
            "warnings": [line.strip() for line in p.stderr.splitlines() if "update/weight ratio" in line]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", default="mobilenet_v2")
    ap.add_argument("--weights", required=True)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results-update-ratio.json")
    ap.add_argument("extra", nargs="*", help="more train options, after --")
    args = ap.parse_args()
    start = begun()  # the code measured and the load, as it starts: recorded with the results
    with tempfile.TemporaryDirectory() as work:
        results = [run(args, mode, factor, Path(work)) for mode in ("finetune", "feature-extract")
                   for factor in (1, 30, 1 / 30)]
    Path(args.out).write_text(json.dumps({**finished(start), "data": args.data, "model": args.model,
                                          "weights": Path(args.weights).name, "runs": results}, indent=2) + "\n")
    for r in results:
        print(f"{r['mode']:16s} lr x{r['lr_factor']:<8.3g} warnings: {len(r['warnings'])}")


if __name__ == "__main__":
    main()
