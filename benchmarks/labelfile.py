"""Label files and multi-label training: how long reading and validating a 100,000-row label file takes, and
what a multi-label training step costs next to a single-label one.

    python benchmarks/labelfile.py --work /tmp/labelfile-bench     # writes benchmarks/results-labelfile.json

1. Reading: --rows distinct tiny JPEGs under WORK/images/ (kept for later runs) and a label file naming them
   (ids without extension, as in the dog-breed file; 10 classes; plus 1 % of rows naming no image), then
   `read_label_file` and `find_dataset` on it in a fresh process each (the page cache is warm: CPU and
   system-call cost). find_dataset includes the duplicate index (first run, empty cache).
2. Step cost: MobileNetV2 (fresh weights; the arithmetic is what is measured) on the same batch of real
   photos, forward + backward + SGD step, CrossEntropyLoss on class indices against BCEWithLogitsLoss on
   multi-hot targets over the same classes; the two alternate, median of --steps each after warm-up.
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
REPO = HERE.parent
TIMER = """
import sys, time
from finetune.data.labelfile import read_label_file, LabelFileOptions
from finetune.data.dataset import find_dataset
opts = LabelFileOptions(path_col="id")
t, c = time.perf_counter(), time.process_time()
if sys.argv[2] == "read":
    n = len(read_label_file(sys.argv[1], opts).rows)
else:
    s = find_dataset(sys.argv[1], labels=opts)
    n = len(s.train) + len(s.val)
print(time.perf_counter() - t, time.process_time() - c, n)
"""


def generate(work: Path, rows: int) -> Path:
    import numpy as np
    from PIL import Image

    images = work / "images"
    images.mkdir(parents=True, exist_ok=True)
    have = len(os.listdir(images))
    rng = np.random.default_rng(0)
    for i in range(have, rows):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(images / f"{i:08x}.jpg", quality=80)
    path = work / f"labels-{rows}.csv"
    lines = ["id,breed"] + [f"{i:08x},class{i % 10}" for i in range(rows)]
    lines += [f"missing{i:06d},class{i % 10}" for i in range(rows // 100)]
    path.write_text("\n".join(lines) + "\n")
    return path


def timed(label_file: Path, what: str, cache: str) -> tuple[float, float, int]:
    """(wall s, CPU s of the process, images found): CPU time is what other load on the machine leaves alone."""
    env = os.environ | {"FINETUNE_CACHE": cache}
    out = subprocess.run([sys.executable, "-c", TIMER, str(label_file), what], env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    return float(out[0]), float(out[1]), int(out[2])


def step_cost(steps: int, batch: int) -> dict:
    import torch

    from finetune.data.images import decode_to_tensor
    from finetune.data.preprocessing import Preprocessing
    from finetune.models.registry import build_network

    photos = sorted((REPO / "sample_data").rglob("*.jpg"))[:batch]
    pre = Preprocessing(256, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bilinear")
    x = torch.stack([pre.eval_transform()(decode_to_tensor(str(p), 256)) for p in photos])
    classes = 10
    y_single = torch.arange(len(x)) % classes
    y_multi = torch.zeros(len(x), classes)
    y_multi[torch.arange(len(x)), y_single] = 1
    y_multi[torch.arange(len(x)), (y_single + 3) % classes] = 1
    torch.manual_seed(0)
    net = build_network("mobilenet_v2", classes).module.train()
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    losses = {"single-label": (torch.nn.CrossEntropyLoss(), y_single),
              "multi-label": (torch.nn.BCEWithLogitsLoss(pos_weight=torch.full((classes,), 3.0)), y_multi)}
    times = {k: [] for k in losses}
    cpu = {k: [] for k in losses}
    for i in range(steps + 2):
        for name, (loss_fn, y) in losses.items():
            t, c = time.perf_counter(), time.process_time()
            loss = loss_fn(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i >= 2:  # warm-up
                times[name].append(time.perf_counter() - t)
                cpu[name].append(time.process_time() - c)
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    return {"batch": len(x), "steps_each": steps, "median_s": med, "median_cpu_s": med_cpu,
            "ratio_multi_over_single": med["multi-label"] / med["single-label"],
            "ratio_cpu_multi_over_single": med_cpu["multi-label"] / med_cpu["single-label"],
            "loss_only_us": loss_only(batch, classes)}


def loss_only(batch: int, classes: int, reps: int = 2000) -> dict:
    """Microseconds per loss forward + backward on [batch, classes] logits: all that differs between the two."""
    import torch

    z = torch.randn(batch, classes, requires_grad=True)
    y_single = torch.arange(batch) % classes
    y_multi = torch.nn.functional.one_hot(y_single, classes).float()
    out = {}
    for name, fn, y in (("single-label", torch.nn.CrossEntropyLoss(), y_single),
                        ("multi-label", torch.nn.BCEWithLogitsLoss(pos_weight=torch.full((classes,), 3.0)), y_multi)):
        t = time.process_time()
        for _ in range(reps):
            fn(z, y).backward()
        out[name] = round((time.process_time() - t) / reps * 1e6, 1)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True, help="folder for the generated images and label file")
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--out", type=Path, default=HERE / "results-labelfile.json")
    a = p.parse_args()
    start = begun()  # the code measured and the load, as it starts: recorded with the results
    label_file = generate(a.work, a.rows)
    with tempfile.TemporaryDirectory() as cache:
        read_s, read_cpu, rows = timed(label_file, "read", cache)
        split_s, split_cpu, found = timed(label_file, "split", cache)
        again_s, again_cpu, _ = timed(label_file, "split", cache)
    load = os.getloadavg()[0]
    print(f"{a.rows} rows: read+validate {read_s:.2f} s ({read_cpu:.2f} s CPU); find_dataset {split_s:.2f} s "
          f"({split_cpu:.2f} CPU) first, {again_s:.2f} s ({again_cpu:.2f} CPU) with the index; load {load:.1f}",
          flush=True)
    steps = step_cost(a.steps, a.batch)
    print(f"step: single-label {steps['median_s']['single-label']:.3f} s, multi-label "
          f"{steps['median_s']['multi-label']:.3f} s (x{steps['ratio_multi_over_single']:.3f}; CPU time "
          f"x{steps['ratio_cpu_multi_over_single']:.3f}); loss alone {steps['loss_only_us']} us", flush=True)
    result = {**finished(start), "label_file": {"rows": a.rows + a.rows // 100, "usable_rows": rows,
                                                       "found_by_split": found, "read_validate_s": round(read_s, 3),
                                                       "find_dataset_first_s": round(split_s, 3),
                                                       "find_dataset_index_reused_s": round(again_s, 3),
                                                       "read_validate_cpu_s": round(read_cpu, 3),
                                                       "find_dataset_first_cpu_s": round(split_cpu, 3),
                                                       "find_dataset_index_reused_cpu_s": round(again_cpu, 3)},
              "load_average_1min": round(load, 1), "step_cost": steps}  # the load once the label file was read
    a.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
