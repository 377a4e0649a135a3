"""Benchmark `finetune train` against the PyTorch transfer-learning tutorial (tutorial_baseline.py).

    python benchmarks/bench.py --data ../shared/data/hymenoptera_data --weights resnet18.pth
    python benchmarks/bench.py --data sample_data --quick          # smoke test

Both tools run as fresh processes timed the same way (spawn to exit, the model already written),
then `finetune predict` and `finetune export` are timed on the last model. Results go to --out
after every run, so an interrupted benchmark keeps what it measured; a table goes to stdout.
"""
import argparse
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from machine import provenance

HERE = Path(__file__).resolve().parent
BASELINE = HERE / "tutorial_baseline.py"
# The CLI installed beside this Python, so an unactivated venv still benchmarks its own finetune.
FINETUNE = shutil.which("finetune", path=str(Path(sys.executable).parent)) or "finetune"
TOOLS = ("baseline", "finetune")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, type=Path, help="folder with train/ and val/ class folders")
    p.add_argument("--weights", default="none", help="torchvision resnet18 state_dict file, or none (random init)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=25)  # the tutorial's setting
    p.add_argument("--scenarios", nargs="+", choices=["finetune", "feature-extract"],
                   default=["finetune", "feature-extract"])
    p.add_argument("--finetune-seeds", type=int, default=None, metavar="N",
                   help="run the fine-tune scenario for the first N seeds only (its baseline takes 12-15 min a seed "
                        "on 2 CPU cores)")
    p.add_argument("--out", type=Path, default=HERE / "results-cpu.json")
    p.add_argument("--quick", action="store_true", help="smoke test: 1 epoch, seed 0")
    p.add_argument("--update", action="store_true",
                   help="keep the runs in --out of the (scenario, seed) pairs not run now (re-measure a part)")
    a = p.parse_args()
    if a.quick:
        a.epochs, a.seeds = 1, [0]
    # Children run in a temp folder (so finetune's runs/latest.json lands there), so paths must be absolute.
    a.data = a.data.resolve()
    if a.weights != "none":
        a.weights = str(Path(a.weights).resolve())
    return a


def machine() -> dict:
    return provenance() | {"platform": platform.platform(), "finetune": importlib.metadata.version("finetune"),
                           "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def run(cmd: list, cwd: Path) -> tuple[dict, str]:
    """Run cmd to completion: its timing record, and its stdout."""
    cmd = [str(c) for c in cmd]
    # stdout goes to a file: with a pipe nobody reads while we block in wait4, a large output would deadlock.
    with tempfile.TemporaryFile() as out:
        load = os.getloadavg()
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out)
        # wait4, not proc.wait(): only it returns the child's rusage. ru_maxrss is the largest single
        # process (the child or one of its reaped workers), in KiB on Linux, not a sum over workers.
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # already reaped: Popen must not wait again
        out.seek(0)
        stdout = out.read().decode()
    if proc.returncode:
        sys.exit(f"exit code {proc.returncode}: {shlex.join(cmd)}")
    return {"command": portable(shlex.join(cmd)), "seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024,
            "load_before": [round(x, 2) for x in load], "load_after": [round(x, 2) for x in os.getloadavg()]}, stdout


def portable(command: str) -> str:
    """The command as it reads from the repository root: no paths of the machine that ran it."""
    root = str(HERE.parent)
    return command.replace(root + "/", "").replace(str(Path(root).parent) + "/", "../")


def train_commands(a: argparse.Namespace, scenario: str, seed: int, tmp: Path) -> dict[str, list]:
    common = ["--mode", scenario, "--seed", seed, "--weights", a.weights]
    # finetune's feature-extract fits its converged probe once: --epochs is the tutorial's alone there (finetune
    # refuses an option its run would not use).
    epochs = ["--epochs", a.epochs]
    return {"baseline": [sys.executable, BASELINE, a.data, *common, *epochs,
                         "--out", tmp / "base.pt", "--json", tmp / "base.json"],
            "finetune": [FINETUNE, "train", a.data, "--model", "resnet18", *common,
                         *(epochs if scenario == "finetune" else []), "-o", tmp / "run", "--overwrite", "-q"]}


def summarize(runs: list[dict]) -> dict:
    summary = {}
    for scenario in dict.fromkeys(r["scenario"] for r in runs):
        s = {}
        for tool in TOOLS:
            rs = [r for r in runs if r["scenario"] == scenario and r["tool"] == tool]
            if rs:
                accs = [r["best_val_acc"] for r in rs]
                s[tool] = {"runs": len(rs), "mean_seconds": statistics.mean(r["seconds"] for r in rs),
                           "mean_acc": statistics.mean(accs), "min_acc": min(accs), "max_acc": max(accs),
                           "peak_rss_mb": max(r["peak_rss_mb"] for r in rs)}
        s["commits"] = sorted({r.get("commit", "?") for r in runs if r["scenario"] == scenario})
        s["cpus"] = sorted({r.get("cpu", "?") for r in runs if r["scenario"] == scenario})  # one, or say so
        if all(tool in s for tool in TOOLS):  # both measured: one tool alone (an interrupted pair) has no ratio
            s["seconds_ratio"] = s["baseline"]["mean_seconds"] / s["finetune"]["mean_seconds"]
        summary[scenario] = s
    return summary


def save(results: dict, path: Path) -> None:
    results["summary"] = summarize(results["runs"])
    tmp = path.with_name(f".{path.name}.tmp")  # replaced whole, so a reader never sees half a file
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, path)


def table(results: dict) -> str:
    lines = ["| scenario | baseline s | finetune s | ratio | baseline acc (min-max) | finetune acc (min-max) "
             "| baseline peak MB | finetune peak MB | commit | CPU |", "|---|---:|---:|---:|---|---|---:|---:|---|---|"]
    for scenario, s in results["summary"].items():
        b, f = s["baseline"], s["finetune"]
        acc = [f"{t['mean_acc']:.3f} ({t['min_acc']:.3f}-{t['max_acc']:.3f})" for t in (b, f)]
        lines.append(f"| {scenario} | {b['mean_seconds']:.1f} | {f['mean_seconds']:.1f} | {s['seconds_ratio']:.2f}x "
                     f"| {acc[0]} | {acc[1]} | {b['peak_rss_mb']:.0f} | {f['peak_rss_mb']:.0f} | {', '.join(s['commits'])} "
                     f"| {', '.join(s['cpus'])} |")
    one, folder, export = results["predict"]["one_image"], results["predict"]["folder"], results["export"]
    if "feature_extract_cache_warm" in results:
        lines += ["", f"feature-extract again on the same data (feature cache warm): "
                      f"{results['feature_extract_cache_warm']['seconds']:.1f} s"]
    lines += ["", f"`finetune --help`: {results['help']['seconds']:.2f} s", f"predict, 1 image (cold): {one['seconds']:.1f} s", f"predict, {folder['images']} images: "
              f"{folder['seconds']:.1f} s ({folder['images_per_second']:.1f} images/s, start-up included)",
              f"export .pt: {export['seconds']:.1f} s"]
    return "\n".join(lines)


def main() -> None:
    a = parse_args()
    results = {"machine": machine(),
               "settings": {"data": str(a.data), "weights": a.weights, "epochs": a.epochs, "seeds": a.seeds,
                            "finetune_seeds": a.finetune_seeds, "scenarios": a.scenarios},
               "definitions": {"command": "run with a temp folder as working directory, deleted afterwards",
                               "seconds": "wall time from spawn to exit of a fresh process (model written)",
                               "peak_rss_mb": "ru_maxrss: largest single process, DataLoader workers not summed"},
               "runs": []}
    plan = [(scenario, seed) for seed in a.seeds for scenario in a.scenarios  # seed-major: an interrupted
            if not (scenario == "finetune" and a.finetune_seeds is not None  # run still has every scenario
                    and seed not in a.seeds[:a.finetune_seeds])]
    if a.update and a.out.exists():
        old = json.loads(a.out.read_text())
        results["runs"] = [r for r in old["runs"] if (r["scenario"], r["seed"]) not in plan]
        if "feature_extract_cache_warm" in old and "feature-extract" not in a.scenarios:
            results["feature_extract_cache_warm"] = old["feature_extract_cache_warm"]
    version = results["machine"]["commit"][:7] + ("-dirty" if results["machine"]["dirty"] else "")
    with tempfile.TemporaryDirectory(prefix="finetune-bench-") as tmp:
        tmp = Path(tmp)
        # Each run's feature cache starts empty; the warm re-run below measures reuse.
        os.environ["FINETUNE_CACHE"] = str(tmp / "feature-cache")
        for scenario, seed in plan:
            shutil.rmtree(tmp / "feature-cache", ignore_errors=True)
            cmds = train_commands(a, scenario, seed, tmp)
            for tool in TOOLS:  # alternating, so drift in machine load hits both tools alike
                print(f"[{scenario} seed {seed}] {tool} ...", file=sys.stderr, flush=True)
                timing, _ = run(cmds[tool], tmp)
                out = tmp / ("base.json" if tool == "baseline" else "run/results.json")
                record = {"tool": tool, "scenario": scenario, "seed": seed, "commit": version,
                          "cpu": results["machine"]["cpu"], **timing,
                          "best_val_acc": json.loads(out.read_text())["best_val_acc"]}
                results["runs"].append(record)
                save(results, a.out)
                print(f"  {record['seconds']:.1f} s, val acc {record['best_val_acc']:.3f}", file=sys.stderr)

        if "feature-extract" in a.scenarios:
            cmds = train_commands(a, "feature-extract", a.seeds[-1], tmp)
            timing, _ = run(cmds["finetune"], tmp)  # same data and seed again: features come from the cache
            results["feature_extract_cache_warm"] = timing
        results["help"], _ = run([FINETUNE, "--help"], tmp)
        results["help"]["commit"] = version

        model, val = tmp / "run" / "best.pt", a.data / "val"
        image = next(p for p in sorted(val.rglob("*")) if p.is_file())
        one, _ = run([FINETUNE, "predict", image, "--model", model, "--json"], tmp)
        folder, stdout = run([FINETUNE, "predict", val, "--model", model, "--json"], tmp)
        folder["images"] = len(json.loads(stdout))
        folder["images_per_second"] = folder["images"] / folder["seconds"]
        results["predict"] = {"one_image": one, "folder": folder}
        results["export"], _ = run([FINETUNE, "export", tmp / "model.pt", "--model", model], tmp)
        for timing in (one, folder, results["export"]):
            timing["commit"] = version
        save(results, a.out)
    print(table(results))
    print(f"\nwritten to {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
