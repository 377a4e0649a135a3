"""Safe decoding: what counts as an image, regular files only, header limits, 8-bit RGB out; the dataset
over decoded images, batches that drop (and name) a failing file, and the decoded-image cache."""

from __future__ import annotations

import errno
import functools
import io
import os
import stat
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

from finetune.config import MAX_PIXELS

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


class ImageRejected(ValueError):
    """A file refused before decoding: not a regular file, too many pixels, too elongated."""


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
    if ignored(name):
        return False
    lower = name.lower()
    return lower.endswith(IMAGE_EXTENSIONS) or (lower.endswith(HEIF_EXTENSIONS) and heif_ready())


def unsupported_reason(name: str) -> str:
    """Why a file is not used, with what would make it usable."""
    ext = os.path.splitext(name)[1].lower()
    if ext in HEIF_EXTENSIONS:
        return f"{ext} photos need the pillow-heif package: pip install pillow-heif (or convert them to JPEG)"
    return f"not a supported image type ({ext or 'no extension'}); use {', '.join(IMAGE_EXTENSIONS)}"


_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"),
          (stat.S_ISBLK, "a device"), (stat.S_ISDIR, "a folder"))


def irregular_reason(path: str | os.PathLike) -> str | None:
    """None for a regular file (links followed); else why it cannot be read as an image.

    Checked before any open(): a FIFO blocks open() forever, and a link to /dev/zero reads forever.
    """
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
    """Open an image as 8-bit RGB PIL: EXIF-rotated, first frame, high bit depth scaled, alpha composited.

    min_side lets large JPEGs decode at reduced size (PIL draft) while keeping the shorter side at least
    that many pixels, which is all the resize that follows needs. Non-regular files, unsupported types,
    decompression bombs and extreme aspect ratios are refused before any pixel is allocated.
    """
    from PIL import Image

    reason = irregular_reason(path) or (None if is_image_file(path) else unsupported_reason(os.fspath(path)))
    if reason:
        raise ImageRejected(reason)
    with Image.open(path) as img:
        return _decode(img, min_side, max_pixels)


def decode_bytes(data: bytes, min_side: int | None = None, max_pixels: int = MAX_PIXELS):
    """An image sent as bytes (an upload: no file name to trust) decoded as load_image does, trying only the
    formats photo files come in."""
    from PIL import Image

    formats = BYTES_FORMATS + (("HEIF",) if heif_ready() else ())
    with Image.open(io.BytesIO(data), formats=formats) as img:
        return _decode(img, min_side, max_pixels)


def _decode(img, min_side: int | None, max_pixels: int):
    """The checks and conversions of load_image on an opened image."""
    from PIL import ImageOps

    w, h = img.size
    if w * h > max_pixels:
        raise ImageRejected(f"{w}x{h} is {w * h / 1e6:.0f} megapixels, over the --max-pixels limit of "
                            f"{max_pixels / 1e6:.0f}")
    if max(w, h) > MAX_ASPECT * max(1, min(w, h)):
        raise ImageRejected(f"{w}x{h} is more than {MAX_ASPECT}:1; not a photo a classifier can use")
    if min_side and img.format == "JPEG" and min(w, h) / min_side >= 2:
        scale = min(w, h) / min_side
        img.draft("RGB", (int(w / scale) + 1, int(h / scale) + 1))
    img.seek(0)
    img.load()
    return _to_rgb(ImageOps.exif_transpose(img))


def _to_rgb(img):
    import numpy as np
    from PIL import Image

    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # Scale the actual range to 0..255; convert("L") would clip 16-bit photos to white.
        arr = np.asarray(img, dtype=np.float32)
        lo, hi = (0.0, 65535.0) if mode.startswith("I;16") else (float(arr.min()), float(arr.max()))
        if mode == "F" and 0.0 <= lo and hi <= 1.0:
            lo, hi = 0.0, 1.0
        arr = np.clip((arr - lo) / max(hi - lo, 1e-12) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND_RGB + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img if mode == "RGB" else img.convert("RGB")


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
    try:
        if not isinstance(e, ImageRejected) and os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
    except OSError:
        pass
    return describe_failure(e)


class ImageDataset:
    """(path, label) samples -> (tensor, label, None), or (None, label, (path, reason)) for a file failing now.

    A failing file is dropped from its batch and named; it is never replaced by another sample (which
    would train on a wrong label).
    """

    def __init__(self, samples: Sequence, transform: Callable, short_side: int, cache: dict | None = None,
                 max_pixels: int = MAX_PIXELS, target: Callable | None = None):
        self.samples = list(samples)
        self.target = target  # sample -> training target (multilabel.MultiHot); None: the class index
        self.transform = transform
        self.short_side = short_side
        self.cache = cache
        self.max_pixels = max_pixels

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

    keep=False only checks that each file decodes (at reduced size: enough to catch truncation).
    """
    cache, failed = {}, []

    def one(p):
        try:
            return p, decode_to_tensor(p, short_side, max_pixels), None
        except Exception as e:  # noqa: BLE001 - any decoder failure means "skip this file, say why"
            return p, None, failure_reason(p, e)

    with ThreadPoolExecutor(max(1, workers)) as pool:
        for p, tensor, err in pool.map(one, list(paths)):
            if err is None:
                if keep:
                    cache[p] = tensor
            else:
                failed.append((p, err))
            if on_progress:
                on_progress(1)
    return cache, failed


def estimate_cache_bytes(n_images: int, short_side: int) -> int:
    """Upper-ish estimate of the decoded cache: 4:3 photos at short_side, 3 bytes a pixel."""
    return n_images * short_side * int(short_side * 4 / 3) * 3


def default_workers(processes: int = 1) -> int:
    """Loader workers per training process: its share of the cores, less one for its training loop, at most 4."""
    return max(0, min(4, (os.cpu_count() or 1) // processes - 1))
