"""What `finetune serve` does with a request: its settings, the token check, the bounded read of the body,
the uploads it holds (multipart files or a raw image), their decoding within the process's decode-memory budget,
and their predictions through the batcher. Bad input of any kind is an ApiError (4xx, a message naming the
problem), a server too busy to take it a 503 with Retry-After; requests never name files on the server. The
FastAPI app and its routes: app.py."""

from __future__ import annotations

import asyncio
import hmac
import time
from dataclasses import dataclass

from finetune.data.images import TooManyPixels, describe_failure
from finetune.data.memory import DecodeBusy, decode_budget
from finetune.serving.batching import Busy
from finetune.serving.model import SERVE_MAX_PIXELS, ServedModel

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
    max_pixels: int = SERVE_MAX_PIXELS  # beyond it an upload gets 413 (serving.model says why this value)
    # Bytes of decoded pixels at once, all requests together (the process's decode budget): an image is decoded when
    # its estimate (from its header) fits. None: memory.default_decode_memory(), 1/16 of the machine's memory.
    max_memory: int | None = None
    # How long a request may wait for its turn (to be read, then for decode memory) before it gets 503.
    max_wait_s: float = 10.0
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


def busy(message: str, retry_after_s: int = 1) -> ApiError:
    """503: the client should retry after the given seconds."""
    return ApiError(503, f"the server is busy: {message}; retry after {retry_after_s} s (Retry-After)",
                    {"Retry-After": str(retry_after_s)})


async def intake(app, request) -> list[tuple[str, tuple | None, str | None, int]]:
    """(name, model inputs or None, why not, status) per upload of request: read and decoded a few requests at a
    time, each image once its decode fits the decode budget; 503 when the turn does not come within --max-wait."""
    settings: ServeSettings = app.state.settings
    deadline = time.monotonic() + settings.max_wait_s
    app.state.waiting += 1
    try:
        async with asyncio.timeout(settings.max_wait_s):
            await app.state.intake.acquire()
    except TimeoutError:
        raise busy(f"{settings.max_intake} requests are being read and decoded, and this one waited "
                   f"{settings.max_wait_s:g} s (--max-wait) for its turn", _retry_after(settings)) from None
    finally:
        app.state.waiting -= 1
    try:
        items = await uploads(request, settings)
        loop = asyncio.get_running_loop()
        decoded = await asyncio.gather(*(loop.run_in_executor(app.state.decoders, _prepare, app.state.model, data,
                                                              deadline) for _, data in items))
    finally:
        app.state.intake.release()
    if any(status == 503 for _, _, status in decoded):
        budget = decode_budget()
        raise busy(f"its images did not fit the decode memory within {settings.max_wait_s:g} s (--max-wait; "
                   f"{budget.in_use / MB:.0f} of {budget.limit / MB:.0f} MB in use, --max-memory)",
                   _retry_after(settings))
    return [(name, x, why, status) for (name, _), (x, why, status) in zip(items, decoded)]


def _retry_after(settings: ServeSettings) -> int:
    return max(1, min(10, round(settings.max_wait_s / 2)))


async def predict(app, uploaded: list[tuple[str, tuple | None, str | None, int]], top_k: int) -> list[dict]:
    """[{"file", "predictions"} or {"file", "error"}] per upload, in order. When no upload is an image: 413 if every
    one is over the pixel limit, else 422."""
    model: ServedModel = app.state.model
    good = [x for _, x, _, _ in uploaded if x is not None]
    if not good:
        reasons = "; ".join(f"{name}: {why}" for name, _, why, _ in uploaded)
        status = 413 if all(s == 413 for *_, s in uploaded) else 422
        raise ApiError(status, reasons if len(uploaded) > 1 else uploaded[0][2])
    try:
        probs = iter(await app.state.batcher.submit(good))
    except Busy:
        raise busy(f"{app.state.settings.max_queue} images already wait for the model (--max-queue)") from None
    app.state.served += len(good)
    return [{"file": name} | model.answer(next(probs), top_k) if x is not None
            else {"file": name, "error": why} for name, x, why, _ in uploaded]


def _prepare(model: ServedModel, data: bytes, deadline: float):
    """(inputs, None, 200), or (None, why the bytes are not a usable image, 413 or 422), or (None, why, 503) when
    the decode budget had no room before the deadline."""
    from PIL import Image

    if not data:
        return None, "empty file (0 bytes)", 422
    try:
        return model.prepare(data, deadline), None, 200
    except DecodeBusy as e:
        return None, str(e), 503
    except TooManyPixels as e:
        return None, (f"{e.size[0]}x{e.size[1]} is {e.size[0] * e.size[1] / 1e6:.3g} megapixels, over the server's "
                      f"limit of {e.limit / 1e6:.3g} megapixels (--max-pixels); send a smaller image"), 413
    except Image.DecompressionBombError:
        return None, (f"refused as a decompression bomb: its header claims over "
                      f"{2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} megapixels (the server's limit: "
                      f"{model.max_pixels / 1e6:.3g}, --max-pixels)"), 413
    except Exception as e:  # noqa: BLE001 - any decoder failure is the upload's problem, told to its sender
        return None, describe_failure(e), 422
