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

from finetune.config import IMBALANCE_WARNING, MAX_PIXELS
from finetune.dataset import content_groups, find_dataset
from finetune.images import decode_to_tensor, failure_reason


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
                  on_progress: Callable[[int, int], None] | None = None) -> dict:
    """Inspect every file of a dataset folder; returns a JSON-ready report."""
    split = find_dataset(data, val_fraction, seed)
    root = split.root
    rel = lambda p: os.path.relpath(p, root)  # noqa: E731
    samples = [("train", s) for s in split.train] + [("val", s) for s in split.val]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        infos = []
        for i, info in enumerate(pool.map(lambda s: _inspect(s[1].path, max_pixels), samples), 1):
            infos.append(info)
            if on_progress:
                on_progress(i, len(samples))

    counts = split.counts()
    skipped = [{"path": rel(p), "reason": r} for p, r in split.skipped]
    skipped += [{"path": rel(i["path"]), "reason": i["error"]} for i in infos if "error" in i]
    usable = [(part, s, i) for (part, s), i in zip(samples, infos) if "error" not in i]

    # The split's own duplicate finder (fingerprints from the folder's index): only size-matched files are read.
    twins = content_groups(Path(root), [s for _, s, _ in usable])
    by_hash = defaultdict(list)
    for part, s, i in usable:
        by_hash[twins.get(s.path, s.path)].append((part, split.classes[s.label], rel(s.path)))
    within, across_classes, leakage = [], [], []
    for members in by_hash.values():
        if len(members) < 2:
            continue
        group = [{"split": p, "class": c, "path": f} for p, c, f in members]
        if len({c for _, c, _ in members}) > 1:
            across_classes.append(group)
        if len({p for p, _, _ in members}) > 1:
            leakage.append(group)
        if len({c for _, c, _ in members}) == 1 and len({p for p, _, _ in members}) == 1:
            within.append(group)

    sizes = [i["size"] for _, _, i in usable]
    per_split_imbalance = {}
    for part, per_class in counts.items():
        values = [v for v in per_class.values()]
        per_split_imbalance[part] = (max(values) / min(values)) if min(values) else None
    return {
        "root": root,
        "layout": split.layout,
        "classes": split.classes,
        "counts": counts,
        "images": len(samples),
        "usable": len(usable),
        "imbalance": per_split_imbalance,  # largest class / smallest class
        "imbalance_warning": IMBALANCE_WARNING,
        "skipped": skipped,
        "modes": dict(Counter(i["mode"] for _, _, i in usable)),
        "formats": dict(Counter(i["format"] for _, _, i in usable)),
        "sizes": {
            "min": [min(w for w, _ in sizes), min(h for _, h in sizes)] if sizes else None,
            "median": [statistics.median(w for w, _ in sizes), statistics.median(h for _, h in sizes)] if sizes else None,
            "max": [max(w for w, _ in sizes), max(h for _, h in sizes)] if sizes else None,
        },
        "exif_rotated": [rel(i["path"]) for _, _, i in usable if i.get("exif_rotated")],
        "duplicates": {"within_class": within, "across_classes": across_classes, "train_val_leakage": leakage},
    }
