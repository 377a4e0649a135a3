"""The dataset doctor: what training would see in a folder, before training.

Counts per class and split, imbalance, every file that would be skipped and why, image modes and
sizes, EXIF-rotated files, and exact duplicates (by content) within a class, across classes
(conflicting labels) and across train and val (leakage).
"""

from __future__ import annotations

import os
import statistics
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypedDict

from finetune.config import IMBALANCE_WARNING, MAX_PIXELS
from finetune.data.dataset import content_groups, find_dataset
from finetune.data.images import decode_to_tensor, failure_reason
from finetune.data.labelfile import LabelFileOptions


# One file of a group of identical files: its split (train | val), its class (a label file's several labels joined
# by ;) and its path relative to the dataset's root. ("class" is a keyword, hence this form.)
Copy = TypedDict("Copy", {"split": str, "class": str, "path": str})


class Duplicates(TypedDict):
    """Groups of byte-identical files (CheckReport.duplicates)."""

    within_class: list[list[Copy]]  # the same class and split: harmless, but weighs the photo twice
    across_classes: list[list[Copy]]  # conflicting labels
    train_val_leakage: list[list[Copy]]  # in train and val: val accuracy overstated


class CheckReport(TypedDict):
    """`check --json`: what training would see in a dataset."""

    root: str  # the folder paths are relative to
    layout: str  # train/ + val/ folders, a stratified split, a label file's columns
    classes: list[str]
    counts: dict[str, dict[str, int]]  # train / val -> class -> images
    images: int
    usable: int
    imbalance: dict[str, float | None]  # train / val: largest class over smallest
    imbalance_warning: float  # the ratio above which train and check warn
    skipped: list[dict]  # path, reason: what training would skip
    modes: dict[str, int]  # Pillow mode -> images (RGB, L, P, ...)
    formats: dict[str, int]  # JPEG, PNG, ...
    sizes: dict[str, list | None]  # min, median, max [width, height]
    exif_rotated: list[str]
    duplicates: Duplicates  # identical files within a class, across classes, across train and val
    multi_label: bool
    rows_without_image: list[dict]  # a label file's rows naming no image: line, path
    notes: list[str]

def _inspect(path: str, max_pixels: int) -> dict:
    """Header facts, and whether the image decodes (at reduced size: enough to catch truncation)."""
    from PIL import Image

    info = {"path": path}
    try:
        decode_to_tensor(path, 32, max_pixels)  # refuses what is not a regular image file before opening it
        with Image.open(path) as img:
            info["mode"], info["size"], info["format"] = img.mode, list(img.size), img.format
            orientation = img.getexif().get(0x0112, 1)
            info["exif_rotated"] = orientation not in (0, 1)
    except Exception as e:  # noqa: BLE001 - every failure is a finding, not a crash
        info["error"] = failure_reason(path, e)
    return info


def check_dataset(data: str, val_fraction: float = 0.2, seed: int = 0, workers: int = 2,
                  max_pixels: int = MAX_PIXELS,
                  on_progress: Callable[[int, int], None] | None = None,
                  labels: LabelFileOptions | None = None) -> CheckReport:
    """Inspect every file of a dataset folder (or label file); returns a JSON-ready report."""
    split = find_dataset(data, val_fraction, seed, labels=labels)
    root = split.root
    rel = lambda p: os.path.relpath(p, root)  # noqa: E731
    samples = [("train", s) for s in split.train] + [("val", s) for s in split.val]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        infos = []
        for i, info in enumerate(pool.map(lambda s: _inspect(s[1].path, max_pixels), samples), 1):
            infos.append(info)
            if on_progress:
                on_progress(i, len(samples))
    skipped = [{"path": rel(p), "reason": r} for p, r in split.skipped]
    skipped += [{"path": rel(i["path"]), "reason": i["error"]} for i in infos if "error" in i]
    usable = [(part, s, i) for (part, s), i in zip(samples, infos) if "error" not in i]
    counts = split.counts()
    return {
        "root": root,
        "layout": split.layout,
        "classes": split.classes,
        "counts": counts,
        "images": len(samples),
        "usable": len(usable),
        "imbalance": {part: (max(c.values()) / min(c.values())) if min(c.values()) else None  # largest / smallest
                      for part, c in counts.items()},
        "imbalance_warning": IMBALANCE_WARNING,
        "skipped": skipped,
        "modes": dict(Counter(i["mode"] for _, _, i in usable)),
        "formats": dict(Counter(i["format"] for _, _, i in usable)),
        "sizes": _sizes([i["size"] for _, _, i in usable]),
        "exif_rotated": [rel(i["path"]) for _, _, i in usable if i.get("exif_rotated")],
        "duplicates": _duplicates(split, usable, rel),
        "multi_label": split.multi_label,
        "rows_without_image": [{"line": n, "path": p} for n, p in split.missing],
        "notes": list(split.notes),
    }


def _sizes(sizes: list) -> dict:
    if not sizes:
        return {"min": None, "median": None, "max": None}
    widths, heights = [w for w, _ in sizes], [h for _, h in sizes]
    return {"min": [min(widths), min(heights)], "median": [statistics.median(widths), statistics.median(heights)],
            "max": [max(widths), max(heights)]}


def _duplicates(split, usable: list, rel) -> Duplicates:
    """Identical files within a class, across classes (conflicting labels) and across train and val (leakage)."""
    # The split's own duplicate finder (fingerprints from the folder's index): only size-matched files are read.
    twins = content_groups(Path(split.root), [s for _, s, _ in usable])
    by_hash = defaultdict(list)
    for part, s, _ in usable:
        names = ";".join(split.classes[i] for i in s.label_set())
        by_hash[twins.get(s.path, s.path)].append((part, names, rel(s.path)))
    within, across_classes, leakage = [], [], []
    for members in by_hash.values():
        if len(members) < 2:
            continue
        group = [{"split": p, "class": c, "path": f} for p, c, f in members]
        classes, parts = {c for _, c, _ in members}, {p for p, _, _ in members}
        if len(classes) > 1:
            across_classes.append(group)
        if len(parts) > 1:
            leakage.append(group)
        if len(classes) == 1 and len(parts) == 1:
            within.append(group)
    return {"within_class": within, "across_classes": across_classes, "train_val_leakage": leakage}
