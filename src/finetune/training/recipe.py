"""The augmentation matched to the run and the photos, not one preset for all (--augment auto, the default).

Fine-tuning sees random crops of each photo. The standard crop (8-100 % of the photo, then resized to the training
crop) suits large photos and long runs from a random head; it underfits two kinds of run, measured with MobileNetV2
(ImageNet weights) on the benchmark sets (benchmarks/README.md#recipes):
- small photos: a thumbnail (128x96) is upsampled to the backbone's scale first, and an 8 % crop of it is a few
  dozen pixels of real content; fine-tuning from the probe with it kept train accuracy below val (78-84 %) and fell
  from 0.915 to 0.765 val accuracy; with the light crop (35-100 %) train accuracy reached 95-99 % and the run 0.935.
- fine-tuning from a converged probe (LP-FT): the probe was fitted on the plain view of each photo; the light crop
  keeps the views close to it (dog breeds, 120 classes with about 7 photos each: 0.708 best in 5 epochs with the
  standard crop, 0.748 with the light one, above the probe's 0.743).
Upsampling small photos to the backbone's scale was measured against training near their own size (a 112 crop, a
128 eval crop): 0.935 against 0.915 on the thumbnails, so the eval resolution stays the weights' own.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from finetune.config import TrainConfig
from finetune.data.dataset import DatasetSplit
from finetune.data.preprocessing import Preprocessing

SAMPLE = 200  # photos whose header is read for their size (evenly spaced over the training set)


@dataclass(frozen=True)
class Recipe:
    augment: str  # what --augment auto resolved to
    why: str  # one line for the run header
    photo_side: int | None  # the median shorter side of the training photos (None: not read)


def photo_side(split: DatasetSplit) -> int | None:
    """The median shorter side of (up to SAMPLE of) the training photos, from their headers; None if none reads."""
    from PIL import Image

    samples = split.train[:: max(1, len(split.train) // SAMPLE)][:SAMPLE]
    sides = []
    for s in samples:
        try:
            with Image.open(s.path) as img:
                sides.append(min(img.size))
        except Exception:  # noqa: BLE001 - an unreadable photo is named by the decode step, not here
            continue
    return int(statistics.median(sides)) if sides else None


def choose_recipe(cfg: TrainConfig, fine_tunes: bool, from_probe: bool, pre: Preprocessing,
                  split: DatasetSplit) -> Recipe:
    """--augment auto resolved for this run and these photos (a given --augment stands)."""
    if cfg.augment != "auto":  # typed, or (resuming) chosen by the run before
        return Recipe(cfg.augment, f"--augment {cfg.augment}" + (" as given" if "augment" in cfg.given else ""), None)
    if not fine_tunes:  # a frozen backbone's SGD head draws from a few cached views; the probe uses none
        return Recipe("standard", "standard crop for the head's cached views", None)
    side = photo_side(split)
    if side is not None and side < pre.resize_size:
        return Recipe("light", f"light crop (35-100 %): the photos are small (median shorter side {side} px, "
                      f"upsampled to {pre.resize_size}), and a smaller crop of them holds too little", side)
    if from_probe:
        return Recipe("light", "light crop (35-100 %): fine-tuning from the probe, whose features are of the whole "
                      "photo", side)
    return Recipe("standard", f"standard crop (8-100 %), flips, small rotations (median shorter side {side} px)",
                  side)
