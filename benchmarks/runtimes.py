"""CPU inference speed of one model file per runtime: eager PyTorch fp32, ONNX fp32 and int8 (onnxruntime), OpenVINO
fp32 and int8 (and OpenVINO running the fp32 .onnx), with the int8 files' checks against fp32 (top-1 agreement
and accuracy on the run's val images). Exports are written next to --out unless already there.

    python benchmarks/runtimes.py --model resnet18=runs/r18/best.pt --model mobilenet_v2=runs/mnv2/best.pt

Latency per image: batch 1, median and p90 over --iterations forward passes; throughput: batch 32 images/s. Each
variant runs in a fresh process (no other runtime's threads share the CPU), over --rounds rounds that alternate
the variants; the median round is kept (other processes share this machine). Results: benchmarks/results-runtimes.json (--results).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from finetune.formats.export import export_model
from finetune.formats.int8 import export_int8
from finetune.formats.load import load_runnable
from machine import begun, finished

# (name, file suffix, int8, runtime); "1 thread": OMP_NUM_THREADS=1 (torch's default on this machine is 2)
VARIANTS = [("eager fp32", "best.pt", False, "torch"), ("eager fp32, 1 thread", "best.pt", False, "torch"), ("ONNX fp32 (onnxruntime)", ".onnx", False, "onnx"),
            ("ONNX fp32 (OpenVINO)", ".onnx", False, "openvino"), ("ONNX int8 (onnxruntime)", "-int8.onnx", True, "onnx"),
            ("ONNX int8 (OpenVINO)", "-int8.onnx", True, "openvino"),
            ("OpenVINO fp32", ".xml", False, "openvino"), ("OpenVINO int8", "-int8.xml", True, "openvino")]


def files_for(name: str, model: Path, out: Path) -> dict:
    """Every export of model in out (written unless there), and the int8 checks."""
    out.mkdir(parents=True, exist_ok=True)
    paths, checks = {"best.pt": model}, {}
    for _, suffix, int8, _ in VARIANTS:
        if suffix == "best.pt" or suffix in paths:
            continue
        path = out / f"{name}{suffix}"
        paths[suffix] = path
        report_file = path.with_suffix(path.suffix + ".check.json")
        if not path.is_file():
            t0 = time.perf_counter()
            if int8:
                r = export_int8([str(model)], path, force=True)
                check = {"agreement": r.agreement, "fp32_accuracy": r.fp32_accuracy, "int8_accuracy": r.int8_accuracy,
                         "checked_images": r.checked_images, "calibration_images": r.calibration_images,
                         "kept_only_by_force": r.forced}
            else:
                r = export_model(model, path)
                check = {"max_abs_diff": r.max_abs_diff, "checked_images": r.checked_images}
            check["export_seconds"] = round(time.perf_counter() - t0, 1)
            report_file.write_text(json.dumps(check, indent=1))
        checks[suffix] = json.loads(report_file.read_text()) if report_file.is_file() else {}
    return {"paths": paths, "checks": checks}


def time_forward(forward, x, iterations: int) -> list[float]:
    for _ in range(3):
        forward(x)
    times = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        forward(x)
        times.append(time.perf_counter() - t0)
    return times


def measure_one(path: str, runtime: str, iterations: int) -> dict:
    """In this process: one file on one runtime (so no other runtime's threads share the CPU)."""
    r = load_runnable(path, "cpu", runtime)
    size = r.info.preprocessing.crop_size
    one, many = torch.randn(1, 3, size, size), torch.randn(32, 3, size, size)
    latency = time_forward(r.forward, one, iterations)
    batch_times = time_forward(r.forward, many, max(3, iterations // 8))
    return {"latency": latency, "images_per_s": 32 / statistics.median(batch_times)}


def measure(name: str, model: Path, out: Path, rounds: int, iterations: int, only: str | None) -> list[dict]:
    made = files_for(name, model, out)
    variants = [v for v in VARIANTS if only is None or only in v[0]]
    runs = {label: [] for label, *_ in variants}
    for _ in range(rounds):  # rounds alternate the variants, each in a fresh process
        for label, suffix, _, runtime in variants:
            env = os.environ | ({"OMP_NUM_THREADS": "1"} if "1 thread" in label else {})
            p = subprocess.run([sys.executable, __file__, "--one", str(made["paths"][suffix]), runtime,
                                str(iterations)], capture_output=True, text=True, check=True, env=env)
            runs[label].append(json.loads(p.stdout.strip().splitlines()[-1]))
    rows = []
    for label, suffix, _, runtime in variants:
        middle = sorted(runs[label], key=lambda r: statistics.median(r["latency"]))[rounds // 2]["latency"]
        rows.append({"model": name, "variant": label, "runtime": runtime, "file": Path(made["paths"][suffix]).name,
                     "latency_ms_median": round(statistics.median(middle) * 1000, 2),
                     "latency_ms_p90": round(sorted(middle)[int(0.9 * (len(middle) - 1))] * 1000, 2),
                     "images_per_s_batch32": round(statistics.median(r["images_per_s"] for r in runs[label]), 1),
                     "check": made["checks"].get(suffix, {})})
    return rows


def machine(start: dict) -> dict:
    import onnxruntime
    import openvino

    return finished(start) | {"torch_threads": torch.get_num_threads(), "onnxruntime": onnxruntime.__version__,
                                 "openvino": openvino.__version__}


def main() -> None:
    if sys.argv[1:2] == ["--one"]:
        path, runtime, iterations = sys.argv[2:5]
        print(json.dumps(measure_one(path, runtime, int(iterations))))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", required=True, metavar="NAME=PATH", help="a best.pt to measure")
    ap.add_argument("--out", default="benchmarks/exports", help="folder for the exports (not committed)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=40)
    ap.add_argument("--results", default="benchmarks/results-runtimes.json")
    ap.add_argument("--only", metavar="TEXT", help="measure only the variants whose name contains TEXT; their rows "
                    "replace those already in --results")
    args = ap.parse_args()
    start = begun()  # the code measured and the load, as it starts: recorded with the results
    rows = []
    for spec in args.model:
        name, path = spec.split("=", 1)
        new = measure(name, Path(path), Path(args.out), args.rounds, args.iterations, args.only)
        rows += new
        for row in new:
            print(f"{row['model']:>14} {row['variant']:<26} {row['latency_ms_median']:8.2f} ms/image "
                  f"(p90 {row['latency_ms_p90']:.2f})  {row['images_per_s_batch32']:7.1f} images/s at batch 32")
    if args.only and Path(args.results).is_file():
        done = {(r["model"], r["variant"]): r for r in rows}
        kept = [done.pop((r["model"], r["variant"]), r) for r in json.loads(Path(args.results).read_text())["rows"]]
        rows = kept + list(done.values())
        order = [v[0] for v in VARIANTS]
        rows.sort(key=lambda r: (r["model"] != "resnet18", order.index(r["variant"])))
    Path(args.results).write_text(json.dumps({"machine": machine(start), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
