"""`finetune serve`'s web app (FastAPI): a page for people at / (drop photos, see their classes) and an HTTP API
for programs (POST /predict, GET /model, GET /health, OpenAPI docs at /docs). Everything the page and the docs
load is served by the app itself (package data and the swagger-ui-bundle package): no CDN, it works offline.

No `from __future__ import annotations` here: FastAPI reads the routes' parameter types (Request, Header), which
are imported inside the functions that define the routes."""

import asyncio
import contextlib
import os
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from finetune.data.memory import decode_budget, set_decode_memory
from finetune.errors import UsageError
from finetune.serving.batching import Batcher
from finetune.serving.handling import ApiError, ServeSettings, check_token, intake, predict
from finetune.serving.model import ServedModel

# The page may load only what the app serves (and show the photos the user picked, as blob: URLs).
PAGE_POLICY = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
               "connect-src 'self'; frame-ancestors 'none'")
EXAMPLE = [{"file": "photo.jpg", "predictions": [{"class": "bees", "probability": 0.93},
                                                 {"class": "ants", "probability": 0.07}]}]
ERRORS = {400: "Empty body, no files in the form, or too many files", 401: "Missing or wrong token",
          413: "Upload over --max-upload, or every image over --max-pixels (a decompression bomb included)",
          415: "Not multipart/form-data nor an image content type",
          422: "No upload is a usable image (not an image, truncated, too elongated, ...)",
          503: "Busy: no turn to be read, or no room in the decode memory, within --max-wait, or the queue of images "
               "is full; retry after Retry-After seconds"}
UPLOAD_BODY = {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "file": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
    "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
    "image/png": {"schema": {"type": "string", "format": "binary"}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}


def web():
    """The fastapi module, or a UsageError naming the extra when it (or uvicorn, or the docs' assets) is missing."""
    try:
        import fastapi
        import swagger_ui_bundle  # noqa: F401 - the docs page's assets, served locally
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise UsageError(f"finetune serve needs the serve extra ({e.name} is not installed): pip install "
                         "'finetune[serve]'") from None
    return fastapi


def create_app(model: ServedModel, paths: Sequence[str], settings: ServeSettings = ServeSettings()):
    """The app serving model (loaded from paths) with settings."""
    fastapi = web()
    batcher = Batcher(lambda items: list(model.probabilities(items)), settings.max_batch,
                      settings.batch_wait_ms / 1000, settings.max_queue)
    if settings.max_memory is not None:
        set_decode_memory(settings.max_memory)
    model.max_pixels = settings.max_pixels
    _limit_png_text()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        # Decoding has threads of its own, one per core (more only contend for the CPU and the GIL), at a lower
        # priority: requests waiting there for decode memory never hold up the page, /health or inference.
        app.state.decoders = ThreadPoolExecutor(min(settings.max_intake, os.cpu_count() or 1), "finetune-decode",
                                                initializer=_yielding_thread)
        await batcher.start()
        yield
        await batcher.stop()
        app.state.decoders.shutdown(wait=True, cancel_futures=True)

    app = fastapi.FastAPI(title="finetune", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                          summary=f"Image classifier: {model.info.describe()}")
    app.state.model, app.state.paths, app.state.settings = model, list(paths), settings
    app.state.batcher, app.state.started, app.state.served = batcher, time.time(), 0
    app.state.intake, app.state.waiting = asyncio.Semaphore(settings.max_intake), 0
    _api(app, fastapi)
    _pages(app, fastapi)
    _errors(app)
    return app


def _api(app, fastapi) -> None:
    from fastapi import Header, Query, Request

    settings: ServeSettings = app.state.settings

    @app.post("/predict", summary="Classify images", openapi_extra={"requestBody": UPLOAD_BODY},
              responses={200: {"content": {"application/json": {"example": EXAMPLE}}}}
              | {code: {"description": what} for code, what in ERRORS.items()})
    async def predict_route(request: Request, top_k: int | None = Query(None, ge=1, le=10_000, description=(
            "Classes per image (default: the server's --top-k).")), authorization: str | None = Header(None)):
        """Images as multipart file fields (several at once) or as the raw body -> their top classes, like
        `finetune predict --json`. A file that is not a usable image gets an `error` instead of `predictions`;
        when none is, the answer is 422."""
        check_token(settings, authorization)
        return await predict(app, await intake(app, request), top_k or settings.top_k)

    @app.get("/model", summary="The model: classes, preprocessing, metrics")
    async def model_route(authorization: str | None = Header(None)):
        check_token(settings, authorization)
        return app.state.model.card(app.state.paths) | {"top_k": settings.top_k,
                                                         "max_upload_mb": settings.max_upload / 2**20,
                                                         "max_files": settings.max_files,
                                                         "max_pixels": settings.max_pixels}

    @app.get("/health", summary="Liveness and load")
    async def health():
        stats, budget = app.state.batcher.stats, decode_budget()
        return {"status": "ok", "uptime_s": round(time.time() - app.state.started, 1),
                "images_served": app.state.served, "in_flight": app.state.batcher.in_flight, "batches": stats.batches,
                "mean_batch": round(stats.items / stats.batches, 2) if stats.batches else None,
                "largest_batch": stats.largest, "requests_waiting": app.state.waiting,
                "decodes_waiting": budget.waiting, "decode_memory_mb": {
                    "limit": round(budget.limit / 2**20), "in_use": round(budget.in_use / 2**20),
                    "peak": round(budget.peak / 2**20)}, "rss_mb": _rss_mb()}


def _limit_png_text() -> None:
    """PNG text chunks are inflated when the file is opened, before any budget sees its size, up to 64 MB an image
    in Pillow (a 60 KB upload held 60 MB): this process serves images, not their text, so 1 MB an image."""
    from PIL import PngImagePlugin

    PngImagePlugin.MAX_TEXT_MEMORY = min(PngImagePlugin.MAX_TEXT_MEMORY, 2**20)


def _yielding_thread() -> None:
    """This thread (not the process) at nice +10 on Linux, where a thread has an id of its own to renice."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


def _rss_mb() -> float | None:
    """This process's resident memory now (Linux; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return round(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def _pages(app, fastapi) -> None:
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.responses import FileResponse
    from starlette.staticfiles import StaticFiles
    from swagger_ui_bundle import swagger_ui_path

    app.mount("/static", StaticFiles(packages=[("finetune.serving", "static")]), name="static")
    app.mount("/docs-assets", StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")
    page = StaticFiles(packages=[("finetune.serving", "static")]).lookup_path("index.html")[0]

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(page, headers={"Content-Security-Policy": PAGE_POLICY, "Cache-Control": "no-cache"})

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return get_swagger_ui_html(openapi_url="/openapi.json", title="finetune API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon-32x32.png",
                                   swagger_ui_parameters={"validatorUrl": None})  # no badge from an online validator


def _errors(app) -> None:
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    def error(status: int, message: str, headers: dict | None = None):
        return JSONResponse({"error": message}, status, headers=headers)

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return error(e.status, e.message, e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        return error(e.status_code, str(e.detail).lower() if e.status_code != 404 else
                     f"no such page or endpoint: {request.url.path} (see /docs)", getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        return error(422, "; ".join(f"{'.'.join(map(str, x['loc'][1:])) or 'request'}: {x['msg']}"
                                    for x in e.errors()))

    @app.exception_handler(Exception)
    async def unexpected(request, e: Exception):
        first = str(e).splitlines()[0][:200] if str(e) else ""
        return error(500, f"internal error ({type(e).__name__}: {first}); the server goes on")
