"""What `finetune serve` does with a request: its settings, the token check, the bounded read of the body,
the uploads it holds (multipart files or a raw image), and their predictions through the batcher. Bad input of
any kind is an ApiError (4xx, a message naming the problem); requests never name files on the server. The
FastAPI app and its routes: app.py."""

from __future__ import annotations

import asyncio
import hmac
from dataclasses import dataclass

from finetune.config import MAX_PIXELS
from finetune.data.images import describe_failure
from finetune.serving.batching import Busy
from finetune.serving.model import ServedModel

MB = 1024 * 1024
RAW_TYPES = ("image/", "application/octet-stream")  # a raw image body; anything else but multipart is refused


@dataclass(frozen=True)
class ServeSettings:
    top_k: int = 3  # classes per image unless ?top_k= asks for others
    max_upload: int = 20 * MB  # bytes in one request body (the page sends one photo per request)
    max_files: int = 16  # files in one multipart request
    max_batch: int = 16  # images in one forward pass
    # How long a forward pass waits for more images to join it. 0: none; images that arrive while the model is busy
    # still share the next pass, and a lone request is not delayed (benchmarks/README.md#serving-under-load).
    batch_wait_ms: float = 0.0
    max_queue: int = 256  # images waiting for the model; beyond it requests get 503 at once
    token: str | None = None  # when set, /predict and /model need `Authorization: Bearer <token>`
    max_pixels: int = MAX_PIXELS
    # Requests whose bodies are read and decoded at once: memory holds at most this many bodies of --max-upload
    # (others wait, their bytes still with their senders); decoding threads beyond the cores gain nothing.
    max_intake: int = 16


class ApiError(Exception):
    """An answer with a 4xx/5xx status and {"error": message}."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def check_token(settings: ServeSettings, authorization: str | None) -> None:
    """401 unless the request carries the token (when one is set); compared in constant time."""
    if settings.token is None:
        return
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), settings.token.encode()):
        raise ApiError(401, "missing or wrong token: send the header `Authorization: Bearer TOKEN` (the token "
                            "`finetune serve` was started with)", {"WWW-Authenticate": "Bearer"})


async def read_body(request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed limit (never read further)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"upload of {int(declared) / MB:.1f} MB is over the server's limit of {limit / MB:g} MB "
                            "(--max-upload); send a smaller image")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"upload is over the server's limit of {limit / MB:g} MB (--max-upload); send a "
                                "smaller image")
        chunks.append(chunk)
    return b"".join(chunks)


async def uploads(request, settings: ServeSettings) -> list[tuple[str, bytes]]:
    """(name, bytes) of each image in a request: a multipart form's files, or the raw body."""
    ctype = request.headers.get("content-type", "").lower()
    raw = not ctype or ctype.startswith(RAW_TYPES)
    if not raw and not ctype.startswith("multipart/form-data"):
        raise ApiError(415, f"content type {ctype.split(';')[0]!r} is not an image upload: send multipart/form-data "
                            "with image files (curl -F file=@photo.jpg), or the image itself as the body with "
                            "Content-Type image/jpeg, image/png, ... (curl --data-binary @photo.jpg -H "
                            "'Content-Type: image/jpeg')")
    body = await read_body(request, settings.max_upload)
    if not body:
        raise ApiError(400, "empty request body: send an image (multipart file fields, or the image as the body)")
    if raw:
        return [("body", body)]
    return await _form_files(request, body, settings.max_files)


async def _form_files(request, body: bytes, max_files: int) -> list[tuple[str, bytes]]:
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def stream():
        yield body

    try:
        form = await MultiPartParser(request.headers, stream(), max_files=max_files, max_fields=100).parse()
    except MultiPartException as e:
        if "Too many files" in str(e):
            raise ApiError(400, f"too many files in one request: at most {max_files} (--max-files); send the "
                                "rest in another request") from None
        raise ApiError(400, f"malformed multipart form: {e}") from None
    files = [(field, value) for field, value in form.multi_items() if not isinstance(value, str)]
    if not files:
        raise ApiError(400, "the form holds no files: send each image as a file field (curl -F file=@photo.jpg)")
    out = []
    for field, f in files:
        out.append((f.filename or field, await f.read()))
        await f.close()
    return out


async def intake(app, request) -> list[tuple[str, tuple | None, str | None]]:
    """(name, model inputs or None, why not) per upload of request, read and decoded a few requests at a time."""
    from starlette.concurrency import run_in_threadpool

    async with app.state.intake:
        items = await uploads(request, app.state.settings)
        decoded = await asyncio.gather(*(run_in_threadpool(_prepare, app.state.model, data) for _, data in items))
    return [(name, x, why) for (name, _), (x, why) in zip(items, decoded)]


async def predict(app, uploaded: list[tuple[str, tuple | None, str | None]], top_k: int) -> list[dict]:
    """[{"file", "predictions"} or {"file", "error"}] per upload, in order; 422 when no upload is an image."""
    model: ServedModel = app.state.model
    good = [x for _, x, _ in uploaded if x is not None]
    if not good:
        reasons = "; ".join(f"{name}: {why}" for name, _, why in uploaded)
        raise ApiError(422, reasons if len(uploaded) > 1 else uploaded[0][2])
    try:
        probs = iter(await app.state.batcher.submit(good))
    except Busy:
        raise ApiError(503, f"the server is busy ({app.state.settings.max_queue} images already waiting); retry "
                            "shortly", {"Retry-After": "1"}) from None
    app.state.served += len(good)
    return [{"file": name} | model.answer(next(probs), top_k) if x is not None
            else {"file": name, "error": why} for name, x, why in uploaded]


def _prepare(model: ServedModel, data: bytes):
    """(inputs, None) or (None, why the bytes are not a usable image)."""
    if not data:
        return None, "empty file (0 bytes)"
    try:
        return model.prepare(data), None
    except Exception as e:  # noqa: BLE001 - any decoder failure is the upload's problem, told to its sender
        reason = describe_failure(e)
        return None, reason.replace("--max-pixels limit", "server's --max-pixels limit")
