"""Multi-label images made from the bundled ants/bees photos: every image is two photos side by side (a 256 x 256
canvas, each photo's central 1:2 strip in one half), labelled with the classes it shows: ant + ant "ants",
bee + bee "bees", ant + bee "ants;bees"; every third image is converted to greyscale and also labelled "grey".

Every image has the same seam, so the labels can only be learnt from what the photos show. Images from
sample_data/train/ get split "train", those from sample_data/val/ "val": the val collages hold photos no
training collage holds."""

from __future__ import annotations

import csv
from pathlib import Path

SIDE = 256


def _strip(path: Path):
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img).convert("RGB")
        return ImageOps.fit(img, (SIDE // 2, SIDE))  # the central strip, scaled


def collage(left: Path, right: Path, grey: bool):
    from PIL import Image

    canvas = Image.new("RGB", (SIDE, SIDE))
    canvas.paste(_strip(left), (0, 0))
    canvas.paste(_strip(right), (SIDE // 2, 0))
    return canvas.convert("L").convert("RGB") if grey else canvas


def pairs(ants: list[Path], bees: list[Path]) -> list[tuple[Path, Path, tuple[str, ...]]]:
    n = min(len(ants), len(bees))
    out = []
    for i in range(n):
        out += [(ants[i], ants[(i + 1) % n], ("ants",)), (bees[i], bees[(i + 1) % n], ("bees",)),
                (ants[i], bees[(i + 3) % n], ("ants", "bees")), (bees[i], ants[(i + 5) % n], ("ants", "bees"))]
    return out


def build(sample: Path, dest: Path, name: str = "labels.csv", split_column: bool = True) -> Path:
    """Write the collages under dest/images/ and their label file dest/NAME (path,labels[,split]); returns it."""
    rows = []
    for part in ("train", "val"):
        ants = sorted((sample / part / "ants").iterdir())
        bees = sorted((sample / part / "bees").iterdir())
        for i, (left, right, labels) in enumerate(pairs(ants, bees)):
            grey = i % 3 == 0
            rel = f"images/{part}-{i:03d}.jpg"
            (dest / "images").mkdir(parents=True, exist_ok=True)
            collage(left, right, grey).save(dest / rel, quality=90)
            rows.append([rel, ";".join(labels + (("grey",) if grey else ())), part])
    path = dest / name
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "labels", "split"] if split_column else ["path", "labels"])
        w.writerows(r if split_column else r[:2] for r in rows)
    return path
