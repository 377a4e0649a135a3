"""`finetune serve` under load on localhost: images/s and p50/p99 latency at 1, 8 and 32 concurrent clients, with
dynamic batching (the defaults: images that queued while the model was busy share the next pass; and with a 10 ms
wait for more) against one request at a time (--max-batch 1).

    python benchmarks/serve_load.py --model runs/mnv2/best.pt --model runs/mnv2-int8.xml

Each client posts a real photo (raw JPEG body) again and again until the level's request count is reached; the
server runs in its own process on 127.0.0.1, the clients in this one (asyncio + httpx), all on the same CPU.
Results: benchmarks/results-serve.json (--results).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from machine import begun, finished

PHOTO = Path(__file__).resolve().parents[1] / "sample_data" / "val" / "bees" / "10870992_eebeeb3a12.jpg"
MODES = {"batched": [], "batched, 10 ms wait": ["--batch-wait", "10"], "one at a time": ["--max-batch", "1"]}


def start(model: str, extra: list[str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "finetune", "serve", "-m", model, "--port", "0", "-q", *extra],
                            stdout=subprocess.PIPE, text=True)
    url = proc.stdout.readline().strip().rstrip("/")
    if not url:
        raise SystemExit(f"the server for {model} did not start")
    return proc, url


async def level(url: str, clients: int, requests: int, photo: bytes) -> dict:
    latencies, errors, left = [], 0, [requests]

    async def client(c: httpx.AsyncClient):
        nonlocal errors
        while left[0] > 0:
            left[0] -= 1
            t0 = time.perf_counter()
            r = await c.post(url + "/predict", content=photo, headers={"Content-Type": "image/jpeg"})
            latencies.append(time.perf_counter() - t0)
            errors += r.status_code != 200

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=300, limits=limits) as c:
        await c.post(url + "/predict", content=photo, headers={"Content-Type": "image/jpeg"})  # warm
        before = (await c.get(url + "/health")).json()
        t0 = time.perf_counter()
        await asyncio.gather(*(client(c) for _ in range(clients)))
        seconds = time.perf_counter() - t0
        after = (await c.get(url + "/health")).json()
    latencies.sort()
    batches = after["batches"] - before["batches"]
    return {"clients": clients, "requests": len(latencies), "errors": errors, "seconds": round(seconds, 2),
            "images_per_s": round(len(latencies) / seconds, 1),
            "p50_ms": round(statistics.median(latencies) * 1000, 1),
            "p99_ms": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1000, 1),
            "mean_batch": round((after["images_served"] - before["images_served"]) / batches, 2) if batches else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", required=True, help="model file to serve (repeat to compare)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=160, help="requests per level (at least 4 per client)")
    ap.add_argument("--results", default="benchmarks/results-serve.json")
    args = ap.parse_args()
    start = begun()  # the code measured and the load, as it starts: recorded with the results
    photo, rows = PHOTO.read_bytes(), []
    for model in args.model:
        for mode, extra in MODES.items():
            proc, url = start(model, extra)
            try:
                runtime = httpx.get(url + "/model", timeout=60).json()["runtime"]
                for clients in args.clients:
                    row = asyncio.run(level(url, clients, max(args.requests, 4 * clients), photo))
                    rows.append({"model": os.path.basename(model), "runtime": runtime, "mode": mode, **row})
                    print(f"{rows[-1]['model']:>22} {runtime:>8} {mode:>19} {clients:3d} clients: "
                          f"{row['images_per_s']:6.1f} images/s  p50 {row['p50_ms']:7.1f} ms  p99 {row['p99_ms']:7.1f} ms"
                          f"  mean batch {row['mean_batch']}  errors {row['errors']}", flush=True)
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=60)
    Path(args.results).write_text(json.dumps({**finished(start), "photo": PHOTO.name, "rows": rows}, indent=1)
                                  + "\n")


if __name__ == "__main__":
    main()
