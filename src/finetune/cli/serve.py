"""`finetune serve`: a trained model (or an ensemble) behind a web page and an HTTP API."""

from __future__ import annotations

import signal
from typing import Annotated

import typer

from finetune.cli import options as o
from finetune.cli.app import command
from finetune.cli.infer import model_paths, name_model, runtime_note
from finetune.cli.render import err, esc, out, warn
from finetune.data.memory import DECODE_MEMORY_MAX, DECODE_MEMORY_MIN, DECODE_MEMORY_SHARE, decode_budget
from finetune.errors import UsageError
from finetune.inference.predictor import load_predictor
from finetune.serving.app import create_app, web
from finetune.serving.handling import MB, ServeSettings
from finetune.serving.model import ServedModel
from finetune.serving.server import bind, is_loopback, run

TOKEN_ENV = "FINETUNE_TOKEN"
D = ServeSettings()


@command(epilog="Example: finetune serve -m runs/20261123-101500-resnet18/best.pt   (then open http://127.0.0.1:8000)")
def serve(
    model: o.Models = None,
    host: Annotated[str, typer.Option(metavar="ADDRESS", help=(
        "Address to listen on. The default answers this machine only; 0.0.0.0 opens it to the network (then set "
        "--token)."))] = "127.0.0.1",
    port: Annotated[int, typer.Option(metavar="PORT", help="TCP port (0: any free port, printed).")] = 8000,
    token: Annotated[str | None, typer.Option(metavar="TOKEN", envvar=TOKEN_ENV, show_envvar=True, help=(
        "Require `Authorization: Bearer TOKEN` on /predict and /model (the page asks for it). Prefer the "
        f"environment variable {TOKEN_ENV}: a command line is visible to other users."))] = None,
    runtime: o.Runtime = "auto", tta: o.Tta = False,
    top_k: Annotated[int, typer.Option("--top-k", "-k", metavar="K", help=(
        "Classes per image when a request does not ask (?top_k=)."))] = D.top_k,
    max_upload: Annotated[float, typer.Option(metavar="MB", help="Largest request body (one photo per request "
                                                                  "from the page).")] = D.max_upload / MB,
    max_files: Annotated[int, typer.Option(metavar="N", help="Most files in one request.")] = D.max_files,
    max_batch: Annotated[int, typer.Option(metavar="N", help="Most images in one forward pass.")] = D.max_batch,
    batch_wait: Annotated[float, typer.Option(metavar="MS", help=(
        "How long a forward pass waits for more requests to join its batch. 0: it starts at once with every image "
        "that queued while the previous pass ran."))] = D.batch_wait_ms,
    max_queue: Annotated[int, typer.Option(metavar="N", help=(
        "Most images waiting for the model; requests beyond it get 503 with Retry-After."))] = D.max_queue,
    max_pixels: Annotated[int, typer.Option(metavar="N", help=(
        "Most pixels in one image, read from its header before any is decoded; an upload over it gets 413. A phone "
        "photo has 12-50 million."))] = D.max_pixels,
    max_memory: Annotated[float | None, typer.Option(metavar="MB", help=(
        "Memory for decoded pixels, all requests together: an image is decoded once its need (estimated from its "
        f"header) fits; the others wait (see --max-wait). Default: 1/{round(1 / DECODE_MEMORY_SHARE)} of the "
        f"machine's memory (or its container's), at least {DECODE_MEMORY_MIN // MB} and at most "
        f"{DECODE_MEMORY_MAX // MB}."))] = None,
    max_wait: Annotated[float, typer.Option(metavar="S", help=(
        "How long a request may wait for its turn to be read and decoded before it gets 503 with "
        "Retry-After."))] = D.max_wait_s,
    device: o.InferDevice = "auto",
    access_log: Annotated[bool, typer.Option("--access-log", help="Log every request on stderr.")] = False,
    quiet: o.InferQuiet = False,
) -> None:
    """Serve a model: a page to drop photos on, and an HTTP API (POST /predict, GET /model, /health, /docs)."""
    web()  # the serve extra, before the model takes seconds to load
    settings = _settings(top_k, max_upload, max_files, max_batch, batch_wait, max_queue, token, max_pixels,
                         max_memory, max_wait)
    chosen = model_paths(model)
    predictor = load_predictor(chosen, device, tta, max_pixels, runtime=runtime)
    name_model(chosen, predictor.info.describe() + runtime_note(predictor), bool(model), quiet)
    app = create_app(ServedModel(predictor, max_pixels), chosen, settings)
    sock = bind(host, port)
    if not is_loopback(host) and token is None:
        warn(f"listening on {esc(host)} without --token: anyone who can reach this machine can use the model "
             f"(set {TOKEN_ENV})")
    _announce(host, sock.getsockname()[1], settings, quiet)
    stopped_by = run(app, sock, access_log)
    if stopped_by is not None:
        err.print(f"stopped by {signal.Signals(stopped_by).name} after finishing the requests in flight",
                  highlight=False)


def _announce(host: str, port: int, settings: ServeSettings, quiet: bool) -> None:
    """Where to find the server (the URL alone on stdout, for scripts) and the limits it decodes within."""
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/"
    err.print(f"serving on {esc(url)} (page), API: POST {esc(url)}predict, docs {esc(url)}docs; Ctrl-C stops",
              highlight=False)
    if not quiet:
        err.print(f"images of up to {settings.max_pixels / 1e6:.3g} megapixels (--max-pixels), decoded within "
                  f"{decode_budget().limit / MB:.0f} MB (--max-memory)", highlight=False)
    out.print(url, highlight=False, soft_wrap=True)
    out.file.flush()


def _settings(top_k, max_upload, max_files, max_batch, batch_wait, max_queue, token, max_pixels, max_memory,
              max_wait) -> ServeSettings:
    for name, value in (("--top-k", top_k), ("--max-files", max_files), ("--max-batch", max_batch),
                        ("--max-queue", max_queue), ("--max-pixels", max_pixels)):
        if value < 1:
            raise UsageError(f"{name} {value}: must be at least 1")
    if max_upload <= 0 or batch_wait < 0:
        raise UsageError("--max-upload must be above 0 and --batch-wait at least 0")
    if max_memory is not None and not 0 < max_memory < 2**40:
        raise UsageError(f"--max-memory {max_memory:g}: must be above 0 (megabytes for decoded pixels)")
    if not 0 <= max_wait <= 3600:
        raise UsageError(f"--max-wait {max_wait:g}: must be between 0 and 3600 (seconds)")
    if token is not None and not token.strip():
        raise UsageError(f"--token (or {TOKEN_ENV}) is empty: give a token, or leave it unset")
    return ServeSettings(top_k=top_k, max_upload=int(max_upload * MB), max_files=max_files, max_batch=max_batch,
                         batch_wait_ms=batch_wait, max_queue=max_queue, token=token.strip() if token else None,
                         max_pixels=max_pixels, max_memory=None if max_memory is None else int(max_memory * MB),
                         max_wait_s=max_wait)
