"""Safe decoding: what counts as an image, regular files only, header limits, a budget for decoded pixels, 8-bit RGB
at the size needed; the dataset over decoded images, batches that drop (and name) a failing file, the cache."""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import os
import stat
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

from finetune.config import MAX_PIXELS
from finetune.data.memory import decode_budget

# torchvision's ImageFolder list, matched case-insensitively (phones write .JPG).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
HEIF_EXTENSIONS = (".heic", ".heif")
# Pillow format names tried on images sent as bytes (JPEG also opens the MPO files phones write).
BYTES_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF", "PPM")
# Files and folders that operating systems and tools drop into photo folders; never classes or samples.
IGNORED_NAMES = {"__macosx", "thumbs.db", "desktop.ini"}
# Composited under transparent pixels.
BACKGROUND_RGB = (255, 255, 255)
# Longer side over shorter side beyond which an image is refused (a 20000x1 strip would explode on resize).
MAX_ASPECT = 25
# Bytes a pixel takes in Pillow by mode (others: 4, RGB included); bytes a pixel a decoder holds beside the image
# (WebP decodes into canvases of its own, then copies: 16 B/px at peak, measured, against PNG's 4.1); its own state.
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
_DECODER_BYTES, _DECODER_STATE = {"WEBP": 12}, 4 * 2**20
JPEG_FORMATS = ("JPEG", "MPO")
STRIP_BYTES = 4 * 2**20  # modes other than RGB and grey become RGB a strip of about this many bytes at a time
EXIF_TRANSPOSE = {2: 0, 3: 3, 4: 1, 5: 5, 6: 4, 7: 6, 8: 2}  # orientation -> Image.Transpose (exif_transpose's)


class ImageRejected(ValueError):
    """A file refused before decoding: not a regular file, too many pixels, too elongated."""


class TooManyPixels(ImageRejected):
    """An image whose header claims more pixels than the limit."""

    def __init__(self, size: tuple[int, int], limit: int):
        self.size, self.limit = size, limit
        super().__init__(f"{size[0]}x{size[1]} is {size[0] * size[1] / 1e6:.3g} megapixels, over the --max-pixels "
                         f"limit of {limit / 1e6:.3g}")


def ignored(name: str) -> bool:
    """Hidden files and OS litter (.DS_Store, ._IMG.jpg, __MACOSX, Thumbs.db)."""
    return name.startswith(".") or name.lower() in IGNORED_NAMES


@functools.cache
def heif_ready() -> bool:
    """Register pillow-heif's HEIC/HEIF decoder with Pillow when that package is installed."""
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


def is_image_file(path: str | os.PathLike) -> bool:
    """True for a non-hidden name with an image extension (any case); HEIC/HEIF when pillow-heif is installed."""
    name = os.path.basename(path)
    ext = name.lower()
    return not ignored(name) and (ext.endswith(IMAGE_EXTENSIONS) or (ext.endswith(HEIF_EXTENSIONS) and heif_ready()))


def unsupported_reason(name: str) -> str:
    """Why a file is not used, with what would make it usable."""
    ext = os.path.splitext(name)[1].lower()
    if ext in HEIF_EXTENSIONS:
        return f"{ext} photos need the pillow-heif package: pip install pillow-heif (or convert them to JPEG)"
    return f"not a supported image type ({ext or 'no extension'}); use {', '.join(IMAGE_EXTENSIONS)}"


_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"),
          (stat.S_ISBLK, "a device"), (stat.S_ISDIR, "a folder"))


def irregular_reason(path: str | os.PathLike) -> str | None:
    """None for a regular file (links followed); else why it cannot be read as an image. Checked before any
    open(): a FIFO blocks open() forever, and a link to /dev/zero reads forever."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symbolic link loop"
        if e.errno == errno.ENOENT and os.path.islink(path):
            return "a link to a file that does not exist (dangling link)"
        return f"cannot read ({e.strerror})"
    if stat.S_ISREG(mode):
        return None
    kind = next((what for test, what in _KINDS if test(mode)), "not a regular file")
    return f"{kind}, not an image file"


def load_image(path: str | os.PathLike, min_side: int | None = None, max_pixels: int = MAX_PIXELS):
    """Open an image as 8-bit RGB PIL: EXIF-rotated, first frame, high bit depth scaled, alpha composited. min_side:
    it comes out reduced (JPEGs by PIL's draft, others box-filtered once decoded), its shorter side still at least
    that. Non-regular files, unsupported types, bombs and extreme aspect ratios are refused before any pixel
    exists; the decode waits for room in the process's decode budget."""
    from PIL import Image

    reason = irregular_reason(path) or (None if is_image_file(path) else unsupported_reason(os.fspath(path)))
    if reason:
        raise ImageRejected(reason)
    with Image.open(path) as img:
        return decode_image(img, min_side, max_pixels, own=True)


def decode_bytes(data: bytes, min_side: int | None = None, max_pixels: int = MAX_PIXELS, wait: float | None = None):
    """An image sent as bytes (an upload: no file name to trust) decoded as load_image does, trying only the
    formats photo files come in; DecodeBusy when the decode budget has no room within `wait` seconds."""
    from PIL import Image

    formats = BYTES_FORMATS + (("HEIF",) if heif_ready() else ())
    with Image.open(io.BytesIO(data), formats=formats) as img:
        return decode_image(img, min_side, max_pixels, wait, own=True)


def decode_image(img, min_side: int | None, max_pixels: int, wait: float | None = None, own: bool = False):
    """load_image's checks and conversions, the full-size pixels within a reservation of the decode budget (and
    drafted and closed in it when `own`: img was opened for this alone; an image a caller holds is left as is)."""
    w, h = img.size
    if w * h > max_pixels:
        raise TooManyPixels((w, h), max_pixels)
    if max(w, h) > MAX_ASPECT * max(1, min(w, h)):
        raise ImageRejected(f"{w}x{h} is more than {MAX_ASPECT}:1; not a photo a classifier can use")
    coefficients = _jpeg_coefficient_bytes(img)
    if own and min_side and img.format in JPEG_FORMATS and (scale := min(w, h) / min_side) >= 2:
        img.draft("RGB", (int(w / scale) + 1, int(h / scale) + 1))
    img.seek(0)
    factor = max(1, min(img.size) // min_side) if min_side else 1
    with decode_budget().reserve(decode_estimate(img, factor) + coefficients, wait):
        img.load()
        orientation = img.getexif().get(0x0112, 1)  # after load: a PNG's eXIf chunk may follow its pixels
        out = _reduced_rgb(img, factor)
        if own and out is not img:
            img.close()  # the full-size pixels go before the reservation does
    method = EXIF_TRANSPOSE.get(orientation)
    return out.transpose(method) if method is not None else out


def decode_estimate(img, factor: int = 1) -> int:
    """Peak bytes to decode an opened (maybe drafted) image, from its header: its pixels, the decoder's, the output."""
    w, h = img.size
    pixels = w * h * (_MODE_BYTES.get(img.mode, 4) + _DECODER_BYTES.get(img.format, 0))
    reduced = 0 if img.mode == "RGB" and factor == 1 else 4 * -(-w // factor) * -(-h // factor)
    strips = 0 if img.mode in ("RGB", "L") else 32 * w * min(h, _strip_rows(w, factor))  # crop, RGBA, floats
    return pixels + reduced + strips + _DECODER_STATE


def _jpeg_coefficient_bytes(img) -> int:
    """What libjpeg holds at any draft scale for a JPEG it buffers whole (2 bytes a sample at full size): progressive
    files, and sequential ones whose first scan (its header is what Pillow's parser read last) lacks a component."""
    whole = 2 * len(img.getbands()) * img.size[0] * img.size[1] if img.format in JPEG_FORMATS else 0
    fp = getattr(img, "fp", None)  # None: decoded already (an image a caller holds), no decoder will run
    if not whole or fp is None or img.info.get("progressive"):
        return whole if fp is not None else 0
    end = fp.tell()
    fp.seek(max(0, end - 16))
    tail, _ = fp.read(end - max(0, end - 16)), fp.seek(end)  # the scan header: FFDA, 6 + 2 ns, ns components, ...
    scans = [ns for ns in range(1, 5) if tail[-8 - 2 * ns:-3 - 2 * ns] == b"\xff\xda" + bytes([0, 6 + 2 * ns, ns])]
    return whole if not scans or scans[0] < len(img.getbands()) else 0  # no scan header found: assume the worst


def _strip_rows(width: int, factor: int) -> int:
    return max(factor, STRIP_BYTES // (4 * max(1, width)) // factor * factor)


def _reduced_rgb(img, factor: int):
    """A loaded image as 8-bit RGB box-filtered `factor` times smaller, other modes converted strip by strip."""
    from PIL import Image

    if img.mode in ("RGB", "L"):
        return _to_rgb(img.reduce(factor) if factor > 1 else img)
    w, h = img.size
    rows, value_range = _strip_rows(w, factor), _value_range(img)
    out = Image.new("RGB", (-(-w // factor), -(-h // factor)))
    for top in range(0, h, rows):
        strip = img.crop((0, top, w, min(h, top + rows)))
        rgb = _to_rgb(strip) if value_range is None else _scaled_rgb(strip, *value_range)
        out.paste(rgb.reduce(factor) if factor > 1 else rgb, (0, top // factor))
    return out


def _value_range(img) -> tuple[float, float] | None:  # the values of a high-bit-depth image that map to 0..255
    if img.mode not in ("I", "F"):
        return (0.0, 65535.0) if img.mode.startswith("I;16") else None
    lo, hi = (float(v) for v in img.getextrema())
    return (0.0, 1.0) if img.mode == "F" and 0.0 <= lo and hi <= 1.0 else (lo, hi)


def _scaled_rgb(img, lo: float, hi: float):
    """Scaled from lo..hi to 0..255, where convert("L") would clip 16-bit photos to white."""
    import numpy as np
    from PIL import Image

    arr = np.clip((np.asarray(img, dtype=np.float32) - lo) / max(hi - lo, 1e-12) * 255.0 + 0.5, 0, 255)
    return Image.fromarray(arr.astype(np.uint8), "L").convert("RGB")


def _to_rgb(img):
    from PIL import Image

    if (value_range := _value_range(img)) is not None:
        return _scaled_rgb(img, *value_range)
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        background = Image.new("RGBA", img.size, BACKGROUND_RGB + (255,))
        return Image.alpha_composite(background, img.convert("RGBA")).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def decode_to_tensor(path: str, short_side: int, max_pixels: int = MAX_PIXELS):
    """Decode to a uint8 CHW tensor whose shorter side is at most short_side (never upscaled)."""
    from torchvision.transforms.v2 import functional as F

    img = load_image(path, min_side=short_side, max_pixels=max_pixels)
    if min(img.size) > short_side:
        img = F.resize(img, short_side, antialias=True)
    return F.pil_to_tensor(img).contiguous()


def describe_failure(e: BaseException) -> str:
    """A short, user-facing reason why an image could not be used."""
    from PIL import Image, UnidentifiedImageError

    text = str(e).splitlines()[0] if str(e) else ""
    if isinstance(e, ImageRejected):
        return text
    if isinstance(e, Image.DecompressionBombError):
        return "refused as a decompression bomb (too many pixels for its file size)"
    if isinstance(e, UnidentifiedImageError):
        return "not an image (no image format recognises its bytes; an HTML page or text saved as an image?)"
    if isinstance(e, OSError) and "truncated" in text:
        return "truncated image (an interrupted download or copy?)"
    if isinstance(e, OSError) and e.errno is not None:
        return f"cannot read ({e.strerror})"
    return f"cannot decode ({type(e).__name__}: {text})" if text else f"cannot decode ({type(e).__name__})"


def failure_reason(path: str, e: BaseException) -> str:
    """Why path could not be used, for the user: empty file, not an image, truncated, refused, ..."""
    with contextlib.suppress(OSError, TypeError):  # TypeError: an image in memory (the Python API)
        if not isinstance(e, ImageRejected) and os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
    return describe_failure(e)


class ImageDataset:
    """(path, label) samples -> (tensor, label, None), or (None, label, (path, reason)) for a file failing now: it
    is dropped from its batch and named, never replaced by another sample (which would train on a wrong label)."""

    def __init__(self, samples: Sequence, transform: Callable, short_side: int, cache: dict | None = None,
                 max_pixels: int = MAX_PIXELS, target: Callable | None = None):
        self.samples, self.transform, self.short_side = list(samples), transform, short_side
        self.target = target  # sample -> training target (multilabel.MultiHot); None: the class index
        self.cache, self.max_pixels = cache, max_pixels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        s = self.samples[i]
        label = self.target(s) if self.target is not None else s.label
        try:
            img = self.cache[s.path] if self.cache is not None else decode_to_tensor(s.path, self.short_side,
                                                                                     self.max_pixels)
        except Exception as e:  # noqa: BLE001 - reported by the training loop, never substituted
            return None, label, (s.path, failure_reason(s.path, e))
        return self.transform(img), label, None


def collate(batch):
    """Stack the good items; pass failures along so the caller can name them. -> (x | None, y, failed)."""
    import torch

    good = [(x, y) for x, y, failed in batch if failed is None]
    failed = [f for _, _, f in batch if f is not None]
    x = torch.stack([x for x, _ in good]) if good else None
    ys = [y for _, y in good]
    y = torch.stack(ys) if ys and isinstance(ys[0], torch.Tensor) else torch.tensor(ys, dtype=torch.long)
    return x, y, failed


def decode_all(paths: Iterable[str], short_side: int, workers: int, on_progress: Callable[[int], None] | None = None,
               keep: bool = True, max_pixels: int = MAX_PIXELS) -> tuple[dict, list[tuple[str, str]]]:
    """Decode every image once (threads: PIL releases the GIL) -> {path: uint8 tensor}, [(path, reason)].
    keep=False only checks that each file decodes (at reduced size: enough to catch truncation)."""
    cache, failed = {}, []

    def one(p):
        try:
            return p, decode_to_tensor(p, short_side, max_pixels), None
        except Exception as e:  # noqa: BLE001 - any decoder failure means "skip this file, say why"
            return p, None, failure_reason(p, e)

    with ThreadPoolExecutor(max(1, workers)) as pool:
        for p, tensor, err in pool.map(one, list(paths)):
            if err is not None:
                failed.append((p, err))
            elif keep:
                cache[p] = tensor
            if on_progress:
                on_progress(1)
    return cache, failed


def estimate_cache_bytes(n_images: int, short_side: int) -> int:
    """Upper-ish estimate of the decoded cache: 4:3 photos at short_side, 3 bytes a pixel."""
    return n_images * short_side * int(short_side * 4 / 3) * 3


def default_workers(processes: int = 1) -> int:
    """Loader workers per training process: its share of the cores, less one for its training loop, at most 4."""
    return max(0, min(4, (os.cpu_count() or 1) // processes - 1))
