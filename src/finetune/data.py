"""Find images, layouts and splits; decode safely; transforms; a decoded-image cache; loaders."""

from __future__ import annotations

import functools
import os
import random
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from finetune.errors import DatasetError

# torchvision's ImageFolder list, matched case-insensitively (phones write .JPG).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
VAL_DIR_NAMES = ("val", "valid", "validation")
# Files and folders that operating systems and tools drop into photo folders; never classes or samples.
IGNORED_NAMES = {"__macosx", "thumbs.db", "desktop.ini"}

# Composited under transparent pixels; documented in README.
BACKGROUND_RGB = (255, 255, 255)
# Refused from the header: beyond Pillow's own decompression-bomb error threshold (2 x 89.5 MP).
DEFAULT_MAX_PIXELS = 178_956_970
# Longer side over shorter side beyond which an image is refused (a 20000x1 strip would explode on resize).
MAX_ASPECT = 25


def _ignored(name: str) -> bool:
    return name.startswith(".") or name.lower() in IGNORED_NAMES


HEIF_EXTENSIONS = (".heic", ".heif")


@functools.cache
def _heif_ready() -> bool:
    """Register pillow-heif's HEIC/HEIF decoder with Pillow when that package is installed."""
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


def is_image_file(path: str | os.PathLike) -> bool:
    """True for a non-hidden file with an image extension (any case); HEIC/HEIF when pillow-heif is installed."""
    name = os.path.basename(path)
    if _ignored(name):
        return False
    lower = name.lower()
    return lower.endswith(IMAGE_EXTENSIONS) or (lower.endswith(HEIF_EXTENSIONS) and _heif_ready())


@dataclass(frozen=True)
class Sample:
    path: str
    label: int


@dataclass
class DatasetSplit:
    """Train and val samples over one class list, plus how they were obtained."""

    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    layout: str  # "train/val folders" or "split <fraction>"
    root: str
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per class in each split."""
        out = {}
        for name, samples in (("train", self.train), ("val", self.val)):
            c = [0] * len(self.classes)
            for s in samples:
                c[s.label] += 1
            out[name] = dict(zip(self.classes, c))
        return out


def class_dirs(root: Path) -> dict[str, Path]:
    """Class name (NFC-normalised) -> folder, ignoring hidden and OS folders."""
    classes: dict[str, Path] = {}
    seen_folded: dict[str, str] = {}
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if _ignored(entry.name) or not entry.is_dir():
            continue
        name = unicodedata.normalize("NFC", entry.name)
        folded = name.casefold()
        if folded in seen_folded:
            raise DatasetError(
                f"{root}: class folders '{seen_folded[folded]}' and '{entry.name}' differ only by case "
                "or Unicode normalisation; merge or rename one of them"
            )
        seen_folded[folded] = entry.name
        classes[name] = Path(entry.path)
    return classes


def images_under(folder: Path, skipped: list | None = None) -> list[str]:
    """Image files below folder, sorted; hidden/OS files ignored, symlink loops and repeat links followed once.

    Other files are appended to skipped as (path, reason) when a list is given. One os.scandir per folder
    and no per-file system call unless the file is a link: 100k files list in well under a second.
    """
    found = []
    seen_dirs, seen_files = set(), {}
    stack = [os.fspath(folder)]
    while stack:  # depth-first, folders and files in name order (what os.walk top-down gives)
        dirpath = stack.pop()
        real = os.path.realpath(dirpath)
        if real in seen_dirs:  # a symlink loop or a second link to the same folder
            continue
        seen_dirs.add(real)
        try:
            entries = sorted(os.scandir(dirpath), key=lambda e: e.name)
        except OSError:  # unreadable folder: as os.walk, skip it
            continue
        subdirs = []
        for e in entries:
            if _ignored(e.name):
                continue
            if e.is_dir():  # follows links to folders
                subdirs.append(e.path)
                continue
            if not is_image_file(e.name):
                if skipped is not None:
                    skipped.append((e.path, unsupported_reason(e.name)))
                continue
            # Only a link can point at a file seen under another name (the folder's own links are resolved above).
            target = os.path.realpath(e.path) if e.is_symlink() else os.path.join(real, e.name)
            if target in seen_files:
                if skipped is not None:
                    skipped.append((e.path, f"same file as {os.path.basename(seen_files[target])} (a link); used once"))
                continue
            seen_files[target] = e.path
            found.append(e.path)
        stack.extend(reversed(subdirs))
    return found


def unsupported_reason(name: str) -> str:
    """Why a file is not used, with what would make it usable."""
    ext = os.path.splitext(name)[1].lower()
    if ext in HEIF_EXTENSIONS:
        return f"{ext} photos need the pillow-heif package: pip install pillow-heif (or convert them to JPEG)"
    return f"not a supported image type ({ext or 'no extension'}); use {', '.join(IMAGE_EXTENSIONS)}"


def _scan(root: Path, classes: Sequence[str] | None = None,
          skipped: list | None = None) -> tuple[list[str], list[Sample]]:
    dirs = class_dirs(root)
    if not dirs:
        loose = [p for p in os.listdir(root) if is_image_file(p)]
        hint = " (images lie directly in it)" if loose else ""
        raise DatasetError(
            f"{root}: no class folders found{hint}; put each class's images in its own folder: "
            f"{root}/<class>/<image>.jpg"
        )
    names = list(dirs)
    if classes is not None and sorted(names) != sorted(classes):
        missing = sorted(set(classes) - set(names))
        extra = sorted(set(names) - set(classes))
        raise DatasetError(
            f"{root}: its classes differ from the training folder's (missing: {missing or 'none'}, "
            f"extra: {extra or 'none'}); make both folders hold the same class folders"
        )
    names = list(classes) if classes is not None else names
    samples = []
    for label, name in enumerate(names):
        files = images_under(dirs[name], skipped)
        if not files:
            raise DatasetError(
                f"{dirs[name]}: class '{name}' has no images ({', '.join(IMAGE_EXTENSIONS)}); "
                "add images or remove the folder"
            )
        samples.extend(Sample(f, label) for f in files)
    return names, samples


def stratified_split(samples: Sequence[Sample], val_fraction: float, seed: int,
                     groups: dict[str, str] | None = None) -> tuple[list[Sample], list[Sample]]:
    """Seeded per-class split: every class keeps about val_fraction of its images in val.

    Samples sharing a group (identical content) land on the same side, so a duplicate never leaks
    between train and val.
    """
    groups = groups or {}
    by_class: dict[int, dict[str, list[Sample]]] = {}
    for s in samples:
        by_class.setdefault(s.label, {}).setdefault(groups.get(s.path, s.path), []).append(s)
    rng = random.Random(seed)
    train, val = [], []
    for label in sorted(by_class):
        units = [by_class[label][k] for k in sorted(by_class[label])]
        rng.shuffle(units)
        n_val = round(sum(map(len, units)) * val_fraction)
        taken = 0
        for i, unit in enumerate(units):
            if taken < n_val and i < len(units) - 1:  # the last unit always trains
                val.extend(unit)
                taken += len(unit)
            else:
                train.extend(unit)
    key = lambda s: s.path  # noqa: E731 - deterministic order independent of class iteration
    return sorted(train, key=key), sorted(val, key=key)


def stratified_folds(samples: Sequence[Sample], k: int, seed: int,
                     groups: dict[str, str] | None = None) -> list[list[Sample]]:
    """k disjoint folds covering every sample, each holding about 1/k of every class.

    Per class, groups of identical files are shuffled (seeded) and each goes to the fold that has the
    fewest images of that class so far, so a duplicate never sits in two folds.
    """
    groups = groups or {}
    by_class: dict[int, dict[str, list[Sample]]] = {}
    for s in samples:
        by_class.setdefault(s.label, {}).setdefault(groups.get(s.path, s.path), []).append(s)
    rng = random.Random(seed)
    folds: list[list[Sample]] = [[] for _ in range(k)]
    for label in sorted(by_class):
        units = [by_class[label][key] for key in sorted(by_class[label])]
        rng.shuffle(units)
        units.sort(key=len, reverse=True)  # big groups first: the greedy fill stays balanced (stable sort)
        counts = [0] * k
        for unit in units:
            i = min(range(k), key=lambda f: (counts[f], f))
            folds[i].extend(unit)
            counts[i] += len(unit)
    return [sorted(f, key=lambda s: s.path) for f in folds]


def file_hash(path: str) -> str:
    """SHA-256 of a file's bytes."""
    from finetune.index import full_hash

    return full_hash(path)


def content_groups(root: Path, samples: Sequence[Sample]) -> dict[str, str]:
    """path -> first path with identical bytes, for files with a twin (fingerprints kept in root's index)."""
    from finetune.index import content_groups as groups

    return groups([s.path for s in samples], root)


def _check_classes(root: Path, classes: list[str]) -> None:
    if len(classes) < 2:
        raise DatasetError(f"{root}: found 1 class ('{classes[0]}'); a classifier needs at least 2 class folders")


def _min_per_class(val_fraction: float) -> int:
    """Fewest images a class needs so the split leaves at least one in val and one in train."""
    n = 2
    while not (1 <= round(n * val_fraction) <= n - 1):
        n += 1
    return n


def find_dataset(data: str | os.PathLike, val_fraction: float = 0.2, seed: int = 0, folds: int = 0,
                 fold: int = 0) -> DatasetSplit:
    """Read DATA as train/+val/ folders, or as class folders split into train/val (stratified).

    With folds=k, every image (train/ and val/ together, if both exist) is split into k stratified folds;
    fold number `fold` (0-based) is the val set and the others train.
    """
    root = Path(data)
    if not root.exists():
        raise DatasetError(f"{root}: no such folder; pass a folder of class folders (DATA/<class>/*.jpg)")
    if not root.is_dir():
        raise DatasetError(f"{root}: is a file, not a folder; pass a folder of class folders (DATA/<class>/*.jpg)")
    skipped: list[tuple[str, str]] = []
    subdirs = {e.name.lower(): Path(e.path) for e in os.scandir(root) if e.is_dir() and not _ignored(e.name)}
    train_dir = subdirs.get("train")
    val_dir = next((subdirs[n] for n in VAL_DIR_NAMES if n in subdirs), None)
    if folds:
        return _fold_split(root, train_dir, val_dir, folds, fold, seed, skipped)
    if train_dir is not None and val_dir is not None:
        classes, train = _scan(train_dir, skipped=skipped)
        _check_classes(train_dir, classes)
        _, val = _scan(val_dir, classes, skipped)
        layout = f"{train_dir.name}/ + {val_dir.name}/ folders"
    else:
        source = train_dir if train_dir is not None else root
        classes, samples = _scan(source, skipped=skipped)
        _check_classes(root, classes)
        if not 0 < val_fraction < 1:
            raise DatasetError(f"--val-fraction {val_fraction}: must be between 0 and 1 (exclusive)")
        need = _min_per_class(val_fraction)
        for label, name in enumerate(classes):
            n = sum(s.label == label for s in samples)
            if n < need:
                raise DatasetError(
                    f"{source}/{name}: {n} image(s), too few to hold out a {val_fraction:.0%} validation share "
                    f"and keep some for training; add images (at least {need} per class) or add a val/ folder"
                )
        train, val = stratified_split(samples, val_fraction, seed, content_groups(root, samples))
        layout = f"stratified split, {val_fraction:.0%} val (seed {seed})"
    return DatasetSplit(classes=classes, train=train, val=val, layout=layout, root=str(root), skipped=skipped)


def _fold_split(root: Path, train_dir: Path | None, val_dir: Path | None, k: int, fold: int, seed: int,
                skipped: list) -> DatasetSplit:
    if train_dir is not None and val_dir is not None:
        classes, samples = _scan(train_dir, skipped=skipped)
        _check_classes(train_dir, classes)
        samples = samples + _scan(val_dir, classes, skipped)[1]
        what = f"{train_dir.name}/ + {val_dir.name}/ pooled"
    else:
        source = train_dir if train_dir is not None else root
        classes, samples = _scan(source, skipped=skipped)
        _check_classes(root, classes)
        what = "class folders"
    for label, name in enumerate(classes):
        n = sum(s.label == label for s in samples)
        if n < k:
            raise DatasetError(f"{root}: class {name} has {n} image(s), too few for --folds {k} (each fold needs "
                               f"one of every class); use fewer folds or add images")
    parts = stratified_folds(samples, k, seed, content_groups(root, samples))
    train = sorted((s for i, part in enumerate(parts) if i != fold for s in part), key=lambda s: s.path)
    missing = [name for label, name in enumerate(classes) if not any(s.label == label for s in train)]
    if missing:
        raise DatasetError(f"{root}: class {missing[0]} has no training image in fold {fold + 1} of {k} (its images "
                           "are copies of one file, which stay together); add distinct images or use fewer folds")
    return DatasetSplit(classes=classes, train=train, val=parts[fold], root=str(root), skipped=skipped,
                        layout=f"fold {fold + 1} of {k}, stratified ({what}, seed {seed})")


# ---------------------------------------------------------------------------------------------
# Decoding


class ImageRejected(ValueError):
    """An image refused from its header: too many pixels or too elongated."""


def load_image(path: str | os.PathLike, min_side: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS):
    """Open an image as 8-bit RGB PIL: EXIF-rotated, first frame, high bit depth scaled, alpha composited.

    min_side lets large JPEGs decode at reduced size (PIL draft) while keeping the shorter side
    at least that many pixels, which is all the resize that follows needs. Decompression bombs
    and extreme aspect ratios are refused from the header, before any pixel is allocated.
    """
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        w, h = img.size
        if w * h > max_pixels:
            raise ImageRejected(f"{w}x{h} is {w * h / 1e6:.0f} megapixels, over the --max-pixels limit of "
                                f"{max_pixels / 1e6:.0f}")
        if max(w, h) > MAX_ASPECT * max(1, min(w, h)):
            raise ImageRejected(f"{w}x{h} is more than {MAX_ASPECT}:1; not a photo a classifier can use")
        if min_side and img.format == "JPEG":
            w, h = img.size
            scale = min(w, h) / min_side
            if scale >= 2:
                img.draft("RGB", (int(w / scale) + 1, int(h / scale) + 1))
        img.seek(0)
        img.load()
        img = ImageOps.exif_transpose(img)
        return _to_rgb(img)


def _to_rgb(img):
    from PIL import Image
    import numpy as np

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
    if mode != "RGB":
        return img.convert("RGB")
    return img


def decode_to_tensor(path: str, short_side: int, max_pixels: int = DEFAULT_MAX_PIXELS):
    """Decode to a uint8 CHW tensor whose shorter side is at most short_side (never upscaled)."""
    from torchvision.transforms.v2 import functional as F

    img = load_image(path, min_side=short_side, max_pixels=max_pixels)
    if min(img.size) > short_side:
        img = F.resize(img, short_side, antialias=True)
    return F.pil_to_tensor(img).contiguous()


# ---------------------------------------------------------------------------------------------
# Transforms


def preprocessing_from_weights(weights) -> dict:
    """Plain-types preprocessing spec from a torchvision weights enum's own transforms()."""
    t = weights.transforms()
    return {
        "resize_size": int(t.resize_size[0]),
        "crop_size": int(t.crop_size[0]),
        "mean": [float(x) for x in t.mean],
        "std": [float(x) for x in t.std],
        "interpolation": t.interpolation.value,
    }


def eval_transform(pre: dict):
    """Resize + center crop + normalise, exactly as the weights were evaluated."""
    import torch
    from torchvision.transforms import InterpolationMode, v2

    return v2.Compose([
        v2.ToImage(),
        v2.Resize(pre["resize_size"], interpolation=InterpolationMode(pre["interpolation"]), antialias=True),
        v2.CenterCrop(pre["crop_size"]),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(pre["mean"], pre["std"]),
    ])


AUGMENTATIONS = ("none", "light", "standard")


def train_transform(pre: dict, augment: str, size: int | None = None):
    """Training view: random resized crop (to size, default the eval crop), flips and small rotations on
    top of the eval normalisation."""
    import torch
    from torchvision.transforms import InterpolationMode, v2

    if augment == "none":
        return eval_transform(pre)
    interp = InterpolationMode(pre["interpolation"])
    crop = size or pre["crop_size"]
    if augment == "light":
        geometric = [v2.RandomResizedCrop(crop, scale=(0.35, 1.0), interpolation=interp, antialias=True),
                     v2.RandomHorizontalFlip()]
    elif augment == "standard":
        geometric = [v2.RandomResizedCrop(crop, scale=(0.08, 1.0), interpolation=interp, antialias=True),
                     v2.RandomHorizontalFlip(),
                     v2.RandomRotation(10, interpolation=interp)]
    else:
        raise ValueError(f"unknown augmentation {augment!r}; choose from {AUGMENTATIONS}")
    return v2.Compose([v2.ToImage(), *geometric, v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(pre["mean"], pre["std"])])


# ---------------------------------------------------------------------------------------------
# Datasets and loaders


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
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
    except OSError:
        pass
    return describe_failure(e)


class ImageDataset:
    """Samples -> (tensor, label, None), or (None, label, (path, reason)) for a file that fails now.

    A failing file is dropped from its batch and named; it is never replaced by another sample
    (which would train on a wrong label).
    """

    def __init__(self, samples: Sequence[Sample], transform: Callable, short_side: int, cache: dict | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        self.samples = list(samples)
        self.transform = transform
        self.short_side = short_side
        self.cache = cache
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        s = self.samples[i]
        try:
            img = self.cache[s.path] if self.cache is not None else decode_to_tensor(s.path, self.short_side,
                                                                                     self.max_pixels)
        except Exception as e:  # noqa: BLE001 - reported by the training loop, never substituted
            return None, s.label, (s.path, failure_reason(s.path, e))
        return self.transform(img), s.label, None


def collate(batch):
    """Stack the good items; pass failures along so the caller can name them. -> (x | None, y, failed)."""
    import torch

    good = [(x, y) for x, y, failed in batch if failed is None]
    failed = [f for _, _, f in batch if f is not None]
    x = torch.stack([x for x, _ in good]) if good else None
    return x, torch.tensor([y for _, y in good], dtype=torch.long), failed


def decode_all(
    paths: Iterable[str],
    short_side: int,
    workers: int,
    on_progress: Callable[[int], None] | None = None,
    keep: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[dict, list[tuple[str, str]]]:
    """Decode every image once (threads: PIL releases the GIL) -> {path: uint8 tensor}, [(path, reason)].

    keep=False only checks that each file decodes (at reduced size: enough to catch truncation).
    """
    paths = list(paths)
    cache, failed = {}, []

    def one(p):
        try:
            return p, decode_to_tensor(p, short_side, max_pixels), None
        except Exception as e:  # noqa: BLE001 - any decoder failure means "skip this file, say why"
            return p, None, failure_reason(p, e)

    with ThreadPoolExecutor(max(1, workers)) as pool:
        for p, tensor, err in pool.map(one, paths):
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
