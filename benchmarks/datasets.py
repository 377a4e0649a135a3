"""The benchmark sets that judge finetune's defaults: the real photo sets in ../shared/data and honest derivations of
them, so that no default is chosen (or judged) on one easy set of 500-px photos alone.

    python benchmarks/datasets.py --shared ../shared/data --out /tmp/bench-data

writes (or reuses) under --out:
- antsbees/           the ants/bees folder as it is (a link): 245 train / 153 val photos, median 500x375
- antsbees-thumbs/    the same photos shrunk to 128 px on their longer side (thumbnails: 128x96 for most)
- antsbees-12mp/      the same photos upscaled to 12 MP (4000x3000 for 4:3) and saved as JPEG (phone-camera files)
- dogs/               the dog-breed photos in train/ and val/ class folders (links): finetune's own split of the
                      label file (stratified 20 %, seed 0), without the 3 breeds too small to hold a photo out
                      (117 fine-grained classes, 2-13 training photos each), so that the PyTorch tutorial's
                      ImageFolder recipe and finetune see the same split
- dogs-thumbs/        the same photos and split, shrunk to 128 px (small and fine-grained)
"""

import argparse
import os
import shutil
from pathlib import Path

from PIL import Image

SETS = ("antsbees", "antsbees-thumbs", "antsbees-12mp", "dogs", "dogs-thumbs")
THUMB = 128  # pixels on the longer side
PHONE_PIXELS = 12_000_000


def _link(src: Path, dst: Path) -> None:
    if not dst.exists():
        dst.symlink_to(src.resolve(), target_is_directory=True)


def _resized(src: Path, dst: Path, size) -> None:
    """Every JPEG under src, resized by size(w, h) -> (w, h), written under dst at the same relative path."""
    for p in sorted(src.rglob("*.jpg")):
        q = dst / p.relative_to(src)
        if q.exists():
            continue
        q.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(p) as im:
            im = im.convert("RGB")
            im.resize(size(*im.size), Image.LANCZOS).save(q, quality=90)


def thumb(w: int, h: int) -> tuple[int, int]:
    scale = THUMB / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def phone(w: int, h: int) -> tuple[int, int]:
    scale = (PHONE_PIXELS / (w * h)) ** 0.5
    return round(w * scale), round(h * scale)


def _split_folders(labels: Path, dst: Path) -> None:
    """finetune's split of a label file as train/ and val/ class folders of links (classes with a val photo only)."""
    from finetune.data.dataset import find_dataset

    if dst.exists():
        return
    split = find_dataset(labels)
    with_val = {s.label for s in split.val}
    for part, samples in (("train", split.train), ("val", split.val)):
        for s in samples:
            if s.label in with_val:
                link = dst / part / split.classes[s.label] / os.path.basename(s.path)
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(os.path.abspath(s.path))


def build(shared: Path, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    hym, dogs = shared / "hymenoptera_data", shared / "dog_breeds"
    _link(hym, out / "antsbees")
    _resized(hym, out / "antsbees-thumbs", thumb)
    _resized(hym, out / "antsbees-12mp", phone)
    _split_folders(dogs / "labels.csv", out / "dogs")
    small = out / "dog-photos-thumbs"
    _resized(dogs, small, thumb)
    shutil.copyfile(dogs / "labels.csv", small / "labels.csv")
    _split_folders(small / "labels.csv", out / "dogs-thumbs")
    return {name: out / name for name in SETS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
    ap.add_argument("--out", default="/tmp/bench-data")
    args = ap.parse_args()
    for name, path in build(Path(args.shared), Path(args.out)).items():
        print(name, path)


if __name__ == "__main__":
    main()
