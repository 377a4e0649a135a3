"""Start-up of one-photo commands (issue 14): `finetune --help`, and `finetune predict photo.jpg` through torch
(a model file) and without it (an .onnx export, or the model file's cached export), each a fresh process, median
of --repeats runs. Also what importing torch and torchvision alone costs here. Results: --out and stdout.

    python benchmarks/startup.py --model runs/x/best.pt --photo sample_data/val/ants/0013035.jpg
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import begun, finished

HERE = Path(__file__).resolve().parent


def timed(cmd: list, env: dict, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, env=env)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a finetune model file (best.pt)")
    ap.add_argument("--photo", required=True)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(HERE / "results-startup.json"))
    args = ap.parse_args()
    ft = [sys.executable, "-m", "finetune"]
    start = begun()  # the code measured and the load, as it starts: recorded with the results
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "FINETUNE_CACHE": tmp}
        onnx = Path(tmp) / "model.onnx"
        subprocess.run([*ft, "export", str(onnx), "-m", args.model, "-q"], check=True, capture_output=True, env=env)
        results = {
            "python_start_s": timed([sys.executable, "-c", "pass"], env, args.repeats),
            "import_torch_torchvision_s": timed([sys.executable, "-c", "import torch, torchvision"], env,
                                                args.repeats),
            "help_s": timed([*ft, "--help"], env, args.repeats),
            "predict_model_file_torch_s": timed([*ft, "predict", args.photo, "-m", args.model, "-q"],
                                                env | {"FINETUNE_LITE": "0"}, args.repeats),
            "predict_onnx_no_torch_s": timed([*ft, "predict", args.photo, "-m", str(onnx), "-q"], env, args.repeats),
        }
        # The model file itself, once its export is cached (the first predict writes the cache).
        subprocess.run([*ft, "predict", args.photo, "-m", args.model, "-q"], check=True, capture_output=True, env=env)
        results["predict_model_file_cached_export_s"] = timed([*ft, "predict", args.photo, "-m", args.model, "-q"],
                                                              env, args.repeats)
    record = {**finished(start), "model": Path(args.model).name, "repeats": args.repeats, **results}
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
