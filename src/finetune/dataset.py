"""What a dataset folder holds: its layout, its classes, its images (every unusable entry named), and the
stratified train/val split or k folds, with byte-identical files kept on one side."""

from __future__ import annotations

import os
import random
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from finetune import index
from finetune.errors import DatasetError
from finetune.images import IMAGE_EXTENSIONS, ignored, irregular_reason, is_image_file, unsupported_reason

VAL_DIR_NAMES = ("val", "valid", "validation")


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
    layout: str  # "train/ + val/ folders", "stratified split, ..." or "fold n of k, ..."
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

    def imbalance(self) -> float:
        """Largest over smallest training class (inf when one is empty)."""
        train = list(self.counts()["train"].values())
        return max(train) / min(train) if min(train) else float("inf")

    def files(self) -> dict:
        """The split as plain data (paths relative to root, labels by name): stored with a run, so that a
        resume can tell whether the data changed."""
        def rel(samples):
            return sorted([os.path.relpath(s.path, self.root), self.classes[s.label]] for s in samples)

        return {"classes": list(self.classes), "train": rel(self.train), "val": rel(self.val)}


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows links; raises on a link loop
    except OSError:
        return False


def class_dirs(root: Path) -> dict[str, Path]:
    """Class name (NFC-normalised) -> folder, ignoring hidden and OS folders."""
    classes: dict[str, Path] = {}
    seen_folded: dict[str, str] = {}
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as e:
        raise DatasetError(f"{root}: cannot read the folder ({e.strerror})") from None
    for entry in entries:
        if ignored(entry.name) or not _is_dir(entry):
            continue
        name = unicodedata.normalize("NFC", entry.name)
        folded = name.casefold()
        if folded in seen_folded:
            raise DatasetError(f"{root}: class folders '{seen_folded[folded]}' and '{entry.name}' differ only by "
                               "case or Unicode normalisation; merge or rename one of them")
        seen_folded[folded] = entry.name
        classes[name] = Path(entry.path)
    return classes


def images_under(folder: Path, skipped: list | None = None) -> list[str]:
    """Regular image files below folder, sorted; hidden/OS files ignored, link loops and repeat links once.

    Everything else is appended to skipped as (path, reason) when a list is given: other file types,
    FIFOs, sockets, devices, dangling links, link loops, unreadable folders. No file is opened here.
    One os.scandir per folder and no per-file system call unless the entry is a link or not a file.
    """
    found = []
    seen_dirs, seen_files = set(), {}
    note = skipped.append if skipped is not None else (lambda item: None)
    stack = [os.fspath(folder)]
    while stack:  # depth-first, folders and files in name order (what os.walk top-down gives)
        dirpath = stack.pop()
        real = os.path.realpath(dirpath)
        if real in seen_dirs:  # a symlink loop or a second link to the same folder
            continue
        seen_dirs.add(real)
        try:
            entries = sorted(os.scandir(dirpath), key=lambda e: e.name)
        except OSError as e:
            note((dirpath, f"cannot read this folder ({e.strerror}); nothing in it was used"))
            continue
        subdirs = []
        for e in entries:
            if ignored(e.name):
                continue
            if _is_dir(e):
                subdirs.append(e.path)
            elif not is_image_file(e.name):
                note((e.path, irregular_reason(e.path) or unsupported_reason(e.name)))
            elif e.is_symlink() or not e.is_file(follow_symlinks=False):
                _add_once(e, irregular_reason(e.path), os.path.realpath(e.path), found, seen_files, note)
            else:
                _add_once(e, None, os.path.join(real, e.name), found, seen_files, note)
        stack.extend(reversed(subdirs))
    return found


def _add_once(e: os.DirEntry, reason: str | None, target: str, found: list, seen_files: dict, note) -> None:
    """Add a regular file the first time its real path is seen; name a repeat (a link) or what is wrong."""
    if reason:
        note((e.path, reason))
        return
    if target in seen_files:
        note((e.path, f"same file as {os.path.basename(seen_files[target])} (a link); used once"))
        return
    seen_files[target] = e.path
    found.append(e.path)


def _scan(root: Path, classes: Sequence[str] | None = None,
          skipped: list | None = None) -> tuple[list[str], list[Sample]]:
    dirs = class_dirs(root)
    if not dirs:
        loose = [p for p in os.listdir(root) if is_image_file(p)]
        hint = " (images lie directly in it)" if loose else ""
        raise DatasetError(f"{root}: no class folders found{hint}; put each class's images in its own folder: "
                           f"{root}/<class>/<image>.jpg")
    names = list(dirs)
    if classes is not None and sorted(names) != sorted(classes):
        missing, extra = sorted(set(classes) - set(names)), sorted(set(names) - set(classes))
        raise DatasetError(f"{root}: its classes differ from the training folder's (missing: {missing or 'none'}, "
                           f"extra: {extra or 'none'}); make both folders hold the same class folders")
    names = list(classes) if classes is not None else names
    samples = []
    for label, name in enumerate(names):
        files = images_under(dirs[name], skipped)
        if not files:
            raise DatasetError(f"{dirs[name]}: class '{name}' has no images ({', '.join(IMAGE_EXTENSIONS)}); "
                               "add images or remove the folder")
        samples.extend(Sample(f, label) for f in files)
    return names, samples


def _units(samples: Sequence[Sample], groups: dict[str, str]) -> dict[int, list[list[Sample]]]:
    """Per class, the samples grouped by identical content, in a fixed order."""
    by_class: dict[int, dict[str, list[Sample]]] = {}
    for s in samples:
        by_class.setdefault(s.label, {}).setdefault(groups.get(s.path, s.path), []).append(s)
    return {label: [units[k] for k in sorted(units)] for label, units in sorted(by_class.items())}


def stratified_split(samples: Sequence[Sample], val_fraction: float, seed: int,
                     groups: dict[str, str] | None = None) -> tuple[list[Sample], list[Sample]]:
    """Seeded per-class split: every class keeps about val_fraction of its images in val.

    Samples sharing a group (identical content) land on the same side, so a duplicate never leaks
    between train and val.
    """
    rng = random.Random(seed)
    train, val = [], []
    for units in _units(samples, groups or {}).values():
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
    rng = random.Random(seed)
    folds: list[list[Sample]] = [[] for _ in range(k)]
    for units in _units(samples, groups or {}).values():
        rng.shuffle(units)
        units.sort(key=len, reverse=True)  # big groups first: the greedy fill stays balanced (stable sort)
        counts = [0] * k
        for unit in units:
            i = min(range(k), key=lambda f: (counts[f], f))
            folds[i].extend(unit)
            counts[i] += len(unit)
    return [sorted(f, key=lambda s: s.path) for f in folds]


def content_groups(root: Path, samples: Sequence[Sample]) -> dict[str, str]:
    """path -> first path with identical bytes, for files with a twin (fingerprints kept in root's index)."""
    return index.content_groups([s.path for s in samples], root)


def _check_classes(root: Path, classes: list[str]) -> None:
    if len(classes) < 2:
        raise DatasetError(f"{root}: found 1 class ('{classes[0]}'); a classifier needs at least 2 class folders")


def _min_per_class(val_fraction: float) -> int:
    """Fewest images a class needs so the split leaves at least one in val and one in train."""
    n = 2
    while not (1 <= round(n * val_fraction) <= n - 1):
        n += 1
    return n


def _layout_dirs(root: Path) -> tuple[Path | None, Path | None]:
    """(train/, val/) folders of root, where present."""
    try:
        subdirs = {e.name.lower(): Path(e.path) for e in os.scandir(root) if not ignored(e.name) and _is_dir(e)}
    except OSError as e:
        raise DatasetError(f"{root}: cannot read the folder ({e.strerror})") from None
    return subdirs.get("train"), next((subdirs[n] for n in VAL_DIR_NAMES if n in subdirs), None)


def _existing_folder(data: str | os.PathLike) -> Path:
    root = Path(data)
    if not root.exists():
        raise DatasetError(f"{root}: no such folder; pass a folder of class folders (DATA/<class>/*.jpg)")
    if not root.is_dir():
        raise DatasetError(f"{root}: is a file, not a folder; pass a folder of class folders (DATA/<class>/*.jpg)")
    return root


def find_dataset(data: str | os.PathLike, val_fraction: float = 0.2, seed: int = 0, folds: int = 0,
                 fold: int = 0) -> DatasetSplit:
    """Read DATA as train/+val/ folders, or as class folders split into train/val (stratified).

    With folds=k, every image (train/ and val/ together, if both exist) is split into k stratified folds;
    fold number `fold` (1..k) is the val set and the others train.
    """
    root = _existing_folder(data)
    skipped: list[tuple[str, str]] = []
    train_dir, val_dir = _layout_dirs(root)
    if folds:
        return _fold_split(root, train_dir, val_dir, folds, fold, seed, skipped)
    if train_dir is not None and val_dir is not None:
        classes, train = _scan(train_dir, skipped=skipped)
        _check_classes(train_dir, classes)
        _, val = _scan(val_dir, classes, skipped)
        return DatasetSplit(classes, train, val, f"{train_dir.name}/ + {val_dir.name}/ folders", str(root), skipped)
    source = train_dir if train_dir is not None else root
    classes, samples = _scan(source, skipped=skipped)
    _check_classes(root, classes)
    need = _min_per_class(val_fraction)
    for label, name in enumerate(classes):
        n = sum(s.label == label for s in samples)
        if n < need:
            raise DatasetError(f"{source}/{name}: {n} image(s), too few to hold out a {val_fraction:.0%} validation "
                               f"share and keep some for training; add images (at least {need} per class) or add a "
                               "val/ folder")
    train, val = stratified_split(samples, val_fraction, seed, content_groups(root, samples))
    return DatasetSplit(classes, train, val, f"stratified split, {val_fraction:.0%} val (seed {seed})", str(root),
                        skipped)


def _fold_split(root: Path, train_dir: Path | None, val_dir: Path | None, k: int, fold: int, seed: int,
                skipped: list) -> DatasetSplit:
    if not 1 <= fold <= k:
        raise ValueError(f"fold {fold} of {k}: folds are numbered from 1")
    if train_dir is not None and val_dir is not None:
        classes, samples = _scan(train_dir, skipped=skipped)
        _check_classes(train_dir, classes)
        samples = samples + _scan(val_dir, classes, skipped)[1]
        what = f"{train_dir.name}/ + {val_dir.name}/ pooled"
    else:
        classes, samples = _scan(train_dir if train_dir is not None else root, skipped=skipped)
        _check_classes(root, classes)
        what = "class folders"
    for label, name in enumerate(classes):
        n = sum(s.label == label for s in samples)
        if n < k:
            raise DatasetError(f"{root}: class {name} has {n} image(s), too few for --folds {k} (each fold needs "
                               f"one of every class); use fewer folds or add images")
    parts = stratified_folds(samples, k, seed, content_groups(root, samples))
    train = sorted((s for i, part in enumerate(parts, 1) if i != fold for s in part), key=lambda s: s.path)
    missing = [name for label, name in enumerate(classes) if not any(s.label == label for s in train)]
    if missing:
        raise DatasetError(f"{root}: class {missing[0]} has no training image in fold {fold} of {k} (its images "
                           "are copies of one file, which stay together); add distinct images or use fewer folds")
    return DatasetSplit(classes, train, parts[fold - 1], f"fold {fold} of {k}, stratified ({what}, seed {seed})",
                        str(root), skipped)


def labelled_samples(data: str, classes: list[str]) -> tuple[list[Sample], list[tuple[str, str]], str]:
    """The images to evaluate: val/ of a train/val folder, else every image of a folder of class folders.

    Labels are the model's class indices; a folder class the model does not know is an error.
    """
    root = _existing_folder(data)
    train_dir, val_dir = _layout_dirs(root)
    if train_dir is not None and val_dir is not None:
        root = val_dir
    skipped: list[tuple[str, str]] = []
    dirs = class_dirs(root)
    if not dirs:
        raise DatasetError(f"{root}: no class folders found; put each class's images in its own folder")
    unknown = sorted(set(dirs) - set(classes))
    if unknown:
        raise DatasetError(f"{root}: classes {unknown} are not among the model's classes {classes}; evaluate on "
                           "folders named after the model's classes")
    samples = [Sample(p, classes.index(name)) for name, folder in dirs.items() for p in images_under(folder, skipped)]
    if not samples:
        raise DatasetError(f"{root}: no images to evaluate")
    return samples, skipped, str(root)
