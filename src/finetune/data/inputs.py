"""What the user named as input: files, folders, globs and label files expanded to image paths, and those paths
decoded in threads ahead of a model. Shared by predict, evaluate, export's check and int8 calibration."""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from finetune.data.dataset import images_under
from finetune.data.images import decode_image, failure_reason, load_image
from finetune.data.labelfile import is_label_file, read_label_file
from finetune.errors import UsageError


@dataclass
class Failure:
    path: str
    reason: str


def expand_inputs(items: Sequence[str]) -> tuple[list[str], list[Failure]]:
    """Files as given, folders searched recursively for images, globs expanded. Returns the files and what
    cannot be used: names that match nothing, and what folders hold besides images (named, as train does)."""
    found: list[str] = []
    missing: list[Failure] = []
    skipped: list[tuple[str, str]] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found.extend(images_under(p, skipped))
        elif is_label_file(item) and p.is_file():  # the images a label file lists (its labels are not used)
            table = read_label_file(item)
            found.extend(r.path for r in table.rows)
            skipped += table.skipped + [(os.path.join(table.root, w), f"line {n} of {p.name}: no such image")
                                        for n, w in table.missing]
        elif os.path.lexists(item):  # a file, or a FIFO, socket, device or broken link: decoding names which
            found.append(str(p))
        else:
            matches = sorted(glob.glob(item, recursive=True))
            files = [m for m in matches if os.path.isfile(m)]
            files += [f for m in matches if os.path.isdir(m) for f in images_under(Path(m), skipped)]
            found.extend(files)
            if not files:
                missing.append(Failure(item, "no such file, folder or matching glob"))
    seen: set[str] = set()  # keep order, drop repeats (a file named twice, or by a folder and a glob)
    unique = [f for f in found if not (os.path.realpath(f) in seen or seen.add(os.path.realpath(f)))]
    return unique, missing + [Failure(path, reason) for path, reason in skipped]


def load_input(item, min_side: int | None, max_pixels: int):
    """An image the caller named (a path: decoded by load_image) or holds (a PIL image, as the Python API takes
    them: checked and converted alike), as 8-bit RGB."""
    if isinstance(item, (str, os.PathLike)):
        return load_image(item, min_side=min_side, max_pixels=max_pixels)
    from PIL import Image

    if not isinstance(item, Image.Image):
        raise UsageError(f"{type(item).__name__}: not an image; give a path or a PIL image")
    return decode_image(item, min_side, max_pixels)


def check_inputs(paths: list[str], missing: list[Failure]) -> None:
    """Fail when nothing at all can be predicted."""
    if not paths:
        what = ", ".join(f.path for f in missing[:5]) or "(nothing given)"
        raise UsageError(f"no images found in {what}; pass image files, folders or globs")


def loaded_chunks(paths: Sequence[str], load: Callable, batch_size: int, workers: int,
                  on_progress: Callable[[int], None]) -> Iterator[tuple[list, list]]:
    """Chunks of batch_size paths, each decoded and preprocessed by load(path) in threads ahead of the model:
    ([(path, failure reason or None)], [the good ones' arrays]). A file that fails is named, never dropped."""
    def one(path):
        try:
            return path, load(path), None
        except Exception as e:  # noqa: BLE001 - any decode failure: report this file, go on
            return path, None, failure_reason(path, e)

    with ThreadPoolExecutor(max(1, workers)) as pool:
        for start in range(0, len(paths), batch_size):
            chunk = list(pool.map(one, paths[start:start + batch_size]))
            yield [(path, err) for path, _, err in chunk], [x for _, x, err in chunk if err is None]
            on_progress(len(chunk))
