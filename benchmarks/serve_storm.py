"""`finetune serve` under hostile load, on 127.0.0.1 only: memory, latency and answers when clients send images
whose pixels cost far more than their bytes.

    python benchmarks/serve_storm.py --model runs/mnv2/best.pt

Two scenarios, each against a fresh server process (its resident memory sampled from /proc every 50 ms):
- storm: 32 clients each upload one 12000x12000 PNG (144 MP, ~0.5 MB of bytes, 576 MB decoded) at once, with
  --max-pixels 150000000 so that the pixel limit lets them in and only the decode-memory budget bounds them; a
  poller asks /health (and the page, /) every 200 ms meanwhile; then a real bee photo must come back as bees.
  Repeated at the defaults, where the same uploads get 413 from their headers.
- mixed: 32 clients send 1,000 requests drawn (seeded) from photos, phone JPEGs, 48-MP PNG/JPEG/progressive
  JPEG/WebP files, 144-MP PNGs and garbage; resident memory before, at its peak, every 100 answers, and after.
Every answer must be 200, a 4xx or a 503, with a JSON body; anything else (a 5xx, a dropped connection, a
timeout) counts as unanswered.
- decode: the same bound outside the server: training's decode (kept at size), predict and check over a folder of
  16 48-MP PNGs with 2 workers, each in a fresh process; the rise of its peak resident memory (VmHWM) over its
  warm baseline, against the decoding module of --before (the commit before the budget) on the same files.
The test images are written once under --cache (a temp folder by default). Results:
benchmarks/results-serve-storm.json (--results; a scenario run alone replaces its rows only).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from pathlib import Path

import httpx
from machine import begun, finished
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
BEE = REPO / "sample_data" / "val" / "bees" / "10870992_eebeeb3a12.jpg"
# What the mixed scenario sends, and how often (weights out of 100).
MIX = {"bee photo (500x375 JPEG)": 30, "12-MP JPEG": 15, "48-MP JPEG": 10, "48-MP progressive JPEG": 5,
       "48-MP PNG": 15, "48-MP WebP": 5, "144-MP PNG": 10, "not an image": 5, "truncated JPEG": 5}
TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "WebP": "image/webp"}  # else application/octet-stream


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def striped_png(path: Path, width: int, height: int) -> None:
    """An RGB PNG of diagonal colour stripes, written row by row (never whole in memory): it compresses ~1000:1."""
    pattern = bytes(range(256)) * 3
    comp = zlib.compressobj(6)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)))
        idat = bytearray()
        for y in range(height):
            shift = (3 * y) % len(pattern)
            row = (pattern[shift:] + pattern * (3 * width // len(pattern) + 2))[:3 * width]
            idat += comp.compress(b"\0" + row)
            if len(idat) > 1 << 20:
                f.write(_chunk(b"IDAT", bytes(idat)))
                idat.clear()
        f.write(_chunk(b"IDAT", bytes(idat + comp.flush())) + _chunk(b"IEND", b""))


def images(cache: Path) -> dict[str, bytes]:
    """The uploads by kind, written under cache on first use."""
    cache.mkdir(parents=True, exist_ok=True)
    files = {"144-MP PNG": cache / "stripes-12000x12000.png", "48-MP PNG": cache / "stripes-8000x6000.png",
             "12-MP JPEG": cache / "bee-4000x3000.jpg", "48-MP JPEG": cache / "bee-8000x6000.jpg",
             "48-MP progressive JPEG": cache / "bee-8000x6000-progressive.jpg", "48-MP WebP": cache / "stripes.webp"}
    if not files["144-MP PNG"].exists():
        striped_png(files["144-MP PNG"], 12000, 12000)
    if not files["48-MP PNG"].exists():
        striped_png(files["48-MP PNG"], 8000, 6000)
    with Image.open(BEE) as bee:
        for name, size, progressive in (("12-MP JPEG", (4000, 3000), False), ("48-MP JPEG", (8000, 6000), False),
                                        ("48-MP progressive JPEG", (8000, 6000), True)):
            if not files[name].exists():
                bee.convert("RGB").resize(size, Image.Resampling.BICUBIC).save(files[name], quality=85,
                                                                               progressive=progressive)
    if not files["48-MP WebP"].exists():
        with Image.open(files["48-MP PNG"]) as png:
            png.save(files["48-MP WebP"], lossless=True)
    out = {name: path.read_bytes() for name, path in files.items()}
    out["bee photo (500x375 JPEG)"] = BEE.read_bytes()
    out["not an image"] = b"<html><body>not an image</body></html>" * 50
    out["truncated JPEG"] = out["12-MP JPEG"][:len(out["12-MP JPEG"]) // 3]
    return out


def content_type(kind: str) -> str:
    return next((t for key, t in TYPES.items() if key in kind), "application/octet-stream")


class Rss:
    """A server process's resident memory, sampled every 50 ms from /proc: now, and the most since reset()."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def now(self) -> int:
        try:
            with open(f"/proc/{self.pid}/status") as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            return 0

    def reset(self) -> None:
        self.peak = self.now()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.now())

    def stop(self) -> None:
        self._stop.set()


def start(model: str, extra: list[str], log: Path, src: Path | None) -> tuple[subprocess.Popen, str, Rss]:
    """The server (src: the package from another commit), its stderr into log (a pipe nobody reads would block it
    once full)."""
    env = {**os.environ, "PYTHONPATH": str(src)} if src else None
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "finetune", "serve", "-m", model, "--port", "0", *extra],
                                stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    url = proc.stdout.readline().strip().rstrip("/")
    if not url.startswith("http://127.0.0.1:"):
        proc.kill()
        raise SystemExit(f"the server did not start: {log.read_text()[-2000:]}")
    return proc, url, Rss(proc.pid)


def stop(proc: subprocess.Popen, rss: Rss) -> int:
    rss.stop()
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


async def post(client: httpx.AsyncClient, url: str, kind: str, data: bytes) -> tuple[str, int | None, float, str]:
    """(kind, status or None when unanswered, seconds, the error or the top class)."""
    t0 = time.perf_counter()
    try:
        r = await client.post(url + "/predict", content=data, headers={"Content-Type": content_type(kind)})
    except httpx.HTTPError as e:
        return kind, None, time.perf_counter() - t0, f"{type(e).__name__}: {e}"
    seconds = time.perf_counter() - t0
    try:
        body = r.json()
    except ValueError:
        return kind, None, seconds, f"{r.status_code} without a JSON body"
    if r.status_code == 200:
        return kind, 200, seconds, body[0]["predictions"][0]["class"]
    if r.status_code >= 500 and r.status_code != 503 or "error" not in body:
        return kind, None, seconds, f"{r.status_code}: {body}"
    if r.status_code == 503 and "retry-after" not in r.headers:
        return kind, None, seconds, "503 without Retry-After"
    return kind, r.status_code, seconds, body["error"]


# /health and / every 200 ms, each on a new connection (as a load balancer's probe), from a process of its own so
# that the clients' work does not delay it; until its stdin closes, then their latencies (seconds; a failure: 60).
POLL = r"""
import json, sys, threading, time, urllib.request
url, stop, lat = sys.argv[1], threading.Event(), {"/health": [], "/": []}
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
while not stop.is_set():
    for path in lat:
        t0 = time.perf_counter()
        try:
            with urllib.request.urlopen(url + path, timeout=60) as r:
                ok = r.status == 200 and r.read() is not None
        except Exception:
            ok = False
        lat[path].append(time.perf_counter() - t0 if ok else 60.0)
    stop.wait(0.2)
print(json.dumps(lat))
"""


def summary(latencies: list[float]) -> dict:
    if not latencies:
        return {}
    s = sorted(latencies)
    return {"n": len(s), "p50_ms": round(statistics.median(s) * 1000, 1),
            "p99_ms": round(s[min(len(s) - 1, int(0.99 * len(s)))] * 1000, 1), "max_ms": round(s[-1] * 1000, 1),
            "over_1s": sum(x > 1 for x in s), "over_2s": sum(x > 2 for x in s)}


async def run_requests(url: str, plan: list[tuple[str, bytes]], clients: int, rss: Rss) -> dict:
    """plan's requests from `clients` concurrent clients, with /health and / polled meanwhile."""
    results, left, timeline = [], list(reversed(plan)), []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    poller = subprocess.Popen([sys.executable, "-c", POLL, url], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    async with httpx.AsyncClient(timeout=180, limits=limits) as client:

        async def one_client():
            while left:
                kind, data = left.pop()
                results.append(await post(client, url, kind, data))
                if len(results) % 100 == 0:
                    timeline.append({"answers": len(results), "rss_mb": round(rss.now() / 2**20)})

        t0 = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        seconds = time.perf_counter() - t0
    polled = json.loads(poller.communicate(timeout=120)[0])
    return {"results": results, "seconds": seconds, "polled": polled, "timeline": timeline}


def report(run: dict) -> dict:
    results = run["results"]
    statuses = Counter(str(status) if status is not None else "unanswered" for _, status, _, _ in results)
    ok = [s for _, status, s, _ in results if status == 200]
    per_kind = {}
    for kind in dict.fromkeys(k for k, _, _, _ in results):
        mine = [(status, s) for k, status, s, _ in results if k == kind]
        per_kind[kind] = {"statuses": dict(Counter(str(st) for st, _ in mine)), **summary([s for _, s in mine])}
    return {"requests": len(results), "seconds": round(run["seconds"], 1), "statuses": dict(statuses),
            "unanswered": statuses.get("unanswered", 0),
            "unanswered_examples": [why for _, status, _, why in results if status is None][:5],
            "images_per_s": round(len(ok) / run["seconds"], 2), "latency_all": summary([s for _, _, s, _ in results]),
            "latency_200": summary(ok), "per_kind": per_kind, "health_during": summary(run["polled"]["/health"]),
            "page_during": summary(run["polled"]["/"]), "rss_every_100_answers": run["timeline"]}


async def after_storm(url: str) -> dict:
    """A normal photo right after: its answer and latency."""
    async with httpx.AsyncClient(timeout=60) as client:
        kind, status, seconds, top = await post(client, url, "bee photo", BEE.read_bytes())
        health = (await client.get(url + "/health")).json()
    return {"status": status, "top_class": top, "ms": round(seconds * 1000, 1), "health": health}


def scenario(model: str, extra: list[str], plan: list[tuple[str, bytes]], clients: int,
             src: Path | None = None) -> dict:
    log = Path(tempfile.mkstemp(prefix="serve-storm-", suffix=".log")[1])
    proc, url, rss = start(model, extra, log, src)
    try:
        asyncio.run(run_requests(url, [("bee photo", BEE.read_bytes())] * clients, clients, rss))  # inference warm
        time.sleep(1)
        before = rss.now()
        rss.reset()
        run = asyncio.run(run_requests(url, plan, clients, rss))
        peak = rss.peak
        right_after = asyncio.run(after_storm(url))
        time.sleep(3)
        after = rss.now()
    finally:
        code = stop(proc, rss)
    stderr = log.read_text().splitlines()
    log.unlink()
    return {"server_options": extra, "clients": clients, **report(run), "normal_photo_after": right_after,
            "server_stderr_lines": len(stderr), "server_stderr_tail": stderr[-4:],
            "rss_mb": {"before": round(before / 2**20), "peak": round(peak / 2**20),
                       "after_3s_idle": round(after / 2**20)}, "server_exit_code": code}


DECODE = r"""
import json, sys, importlib.util
what, folder, model, workers, source, warm = sys.argv[1:7]
if source:  # another commit's decoding module, for a before/after comparison on the same files
    spec = importlib.util.spec_from_file_location("finetune.data.images", source)
    module = importlib.util.module_from_spec(spec)
    sys.modules["finetune.data.images"] = module
    spec.loader.exec_module(module)
    module.decode_image = getattr(module, "decode_image", None) or module._decode
from pathlib import Path
from finetune.data import images as D

def status(key):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key + ":"))

paths, workers = sorted(str(p) for p in Path(folder).rglob("*.png")), int(workers)
if what == "training":
    run = lambda files: D.decode_all(files, 256, workers)[0]
elif what == "predict":
    from finetune.inference.predictor import load_predictor
    predictor = load_predictor([model], "cpu")
    run = lambda files: list(predictor.predict(files, batch_size=8, workers=workers))
else:
    from finetune.quality.doctor import check_dataset
    run = lambda files: check_dataset(folder if files == paths else warm, workers=workers)
run([warm] if what != "check" else None)
before = status("VmRSS")
kept = run(paths)
print(json.dumps({"rise": status("VmHWM") - before, "kept": sum(t.numel() for t in kept.values())
                  if what == "training" else 0}))
"""


def decode_scenario(model: str, cache: Path, before: str) -> dict:
    """Training's decode, predict and check over 16 48-MP PNGs with 2 workers: peak RSS rise, now and at --before."""
    folder, warm = cache / "folder-48mp", cache / "warm"
    for i in range(16):
        path = folder / ("train" if i < 12 else "val") / ("a" if i % 2 else "b") / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            os.link(cache / "stripes-8000x6000.png", path)
    for cls in ("a", "b"):
        for split in ("train", "val"):
            (warm / split / cls).mkdir(parents=True, exist_ok=True)
            Image.open(BEE).save(warm / split / cls / "bee.png")
    old = cache / f"images-{before}.py"
    old.write_bytes(subprocess.run(["git", "show", f"{before}:src/finetune/data/images.py"], capture_output=True,
                                   check=True, cwd=REPO).stdout)
    with Image.open(cache / "stripes-8000x6000.png") as img:
        from finetune.data.images import decode_estimate
        one = decode_estimate(img, min(img.size) // 256)
    rows = {"one_decode_estimate_mb": round(one / 2**20, 1), "workers": 2}
    for what in ("training", "predict", "check"):
        for name, source in (("now", ""), (f"at {before}", str(old))):
            out = subprocess.run([sys.executable, "-c", DECODE, what, str(folder), model, "2", source,
                                  str(warm / "train" / "a" / "bee.png") if what != "check" else str(warm)],
                                 capture_output=True, text=True, timeout=900)
            if out.returncode != 0:
                raise SystemExit(f"decode scenario {what} ({name}) failed: {out.stderr[-2000:]}")
            m = json.loads(out.stdout)
            rows[f"{what}, {name}"] = {"peak_rss_rise_mb": round(m["rise"] / 2**20), "kept_tensors_mb":
                                       round(m["kept"] / 2**20, 1)}
            print(f"decode {what:8s} {name:14s}: peak RSS rise {rows[f'{what}, {name}']}", flush=True)
    return rows


def show(name: str, row: dict) -> None:
    print(f"{name}: {row['requests']} requests in {row['seconds']} s, statuses {row['statuses']}, "
          f"{row['images_per_s']} images/s, p50 {row['latency_all'].get('p50_ms')} ms, "
          f"p99 {row['latency_all'].get('p99_ms')} ms; RSS MB {row['rss_mb']}; /health during: "
          f"{row['health_during']}; page: {row['page_during']}; photo after: {row['normal_photo_after']['status']} "
          f"{row['normal_photo_after']['top_class']}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="model file to serve")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=1000, help="requests of the mixed scenario")
    ap.add_argument("--only", choices=("storm", "mixed", "decode"), help="run one scenario")
    ap.add_argument("--before", default="63ae81a", help="the commit whose decoding the decode scenario compares")
    ap.add_argument("--server-at", metavar="COMMIT", help=(
        "storm only: serve with the package as it was at COMMIT (each of its decodes of a 144-MP PNG held ~1.2 GB: "
        "keep --clients small)"))
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "finetune-serve-storm"))
    ap.add_argument("--results", default="benchmarks/results-serve-storm.json")
    args = ap.parse_args()
    start = begun()  # the code measured and the load, as it starts: recorded with the results
    data = images(Path(args.cache))
    rows = {}
    if args.server_at:
        if args.only != "storm":
            raise SystemExit("--server-at goes with --only storm")
        src = Path(args.cache) / f"src-{args.server_at}"
        if not src.exists():
            archive = subprocess.run(["git", "archive", args.server_at, "src"], capture_output=True, check=True,
                                     cwd=REPO).stdout
            src.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(["tar", "-x", "-C", str(src.parent), "--transform", f"s,^src,src-{args.server_at},"],
                           input=archive, check=True)
    suffix = (f", {args.clients} clients" if args.clients != 32 else "") + \
        (f", server at {args.server_at}" if args.server_at else "")
    if args.only in (None, "storm"):
        storm = [("144-MP PNG", data["144-MP PNG"])] * args.clients
        name = "storm, --max-pixels 150000000" + suffix
        rows[name] = scenario(args.model, ["--max-pixels", "150000000"], storm, args.clients,
                              src if args.server_at else None)
        show(name, rows[name])
    if args.only in (None, "storm") and not args.server_at:
        rows["storm, defaults" + suffix] = scenario(args.model, [], storm, args.clients)
        show("storm, defaults" + suffix, rows["storm, defaults" + suffix])
    if args.only in (None, "mixed"):
        rng = random.Random(0)
        kinds = rng.choices(list(MIX), weights=list(MIX.values()), k=args.requests)
        rows["mixed, defaults" + suffix] = scenario(args.model, [], [(k, data[k]) for k in kinds], args.clients)
        show("mixed, defaults" + suffix, rows["mixed, defaults" + suffix])
    if args.only in (None, "decode"):
        rows["decode, 16 48-MP PNGs, 2 workers"] = decode_scenario(args.model, Path(args.cache), args.before)
    results = Path(args.results)
    earlier = json.loads(results.read_text())["scenarios"] if args.only and results.exists() else {}
    results.write_text(json.dumps({
        "machine": finished(start),  # this invocation's; with --only, the other scenarios are kept from earlier
        "upload_bytes": {k: len(v) for k, v in data.items()}, "mix": MIX, "scenarios": earlier | rows},
        indent=1) + "\n")


if __name__ == "__main__":
    main()
