"""What a dataset folder (or label file) holds: its layout, its classes, its images (every unusable entry named),
and the stratified train/val split or k folds, with byte-identical files kept on one side."""

from __future__ import annotations

import dataclasses
import os
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from finetune.data import content_index
from finetune.data.images import IMAGE_EXTENSIONS, ignored, irregular_reason, is_image_file, unsupported_reason
from finetune.data.labelfile import LabelFileOptions, LabelTable, is_label_file, read_label_file
from finetune.data.stratify import iterative_parts, stratified_folds, stratified_split
from finetune.errors import DatasetError

VAL_DIR_NAMES = ("val", "valid", "validation")


@dataclass(frozen=True)
class Sample:
    path: str
    label: int  # the class; in a multi-label dataset the first of labels
    labels: tuple[int, ...] = ()  # multi-label: every label of the image; () in a single-label dataset

    def label_set(self) -> tuple[int, ...]:
        return self.labels or (self.label,)


@dataclass
class DatasetSplit:
    """Train and val samples over one class list, plus how they were obtained."""

    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    layout: str  # "train/ + val/ folders", "stratified split, ..." or "fold n of k, ..."
    root: str
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    multi_label: bool = False  # samples carry labels (several per image); one sigmoid per class
    missing: list[tuple[int, str]] = field(default_factory=list)  # label file rows naming no image: (line, path)
    notes: list[str] = field(default_factory=list)  # what the user should know about the split (shown as warnings)

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per class in each split."""
        out = {}
        for name, samples in (("train", self.train), ("val", self.val)):
            c = [0] * len(self.classes)
            for s in samples:
                for label in s.label_set():
                    c[label] += 1
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
            return sorted([os.path.relpath(s.path, self.root), ";".join(self.classes[i] for i in s.label_set())]
                          for s in samples)

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


def content_groups(root: Path, samples: Sequence[Sample]) -> dict[str, str]:
    """path -> first path with identical bytes, for files with a twin (fingerprints kept in root's index)."""
    return content_index.content_groups([s.path for s in samples], root)


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
                 fold: int = 0, labels: LabelFileOptions | None = None) -> DatasetSplit:
    """Read DATA as train/+val/ folders, as class folders split into train/val (stratified), or as a label file
    (.csv/.tsv/.jsonl, read with `labels`; its split column, else a stratified or iterative split).

    With folds=k, every image (train/ and val/ together, if both exist) is split into k stratified folds;
    fold number `fold` (1..k) is the val set and the others train.
    """
    if is_label_file(data):
        return _label_file_split(read_label_file(data, labels or LabelFileOptions()), val_fraction, seed, folds, fold)
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
    return _folds_split(root, classes, samples, k, fold, seed, what, skipped)


def _folds_split(root: Path, classes: list[str], samples: list[Sample], k: int, fold: int, seed: int, what: str,
                 skipped: list, multi: bool = False, **extra) -> DatasetSplit:
    for name, n in zip(classes, _label_counts(samples, len(classes))):
        if n < k:
            raise DatasetError(f"{root}: class {name} has {n} image(s), too few for --folds {k} (each fold needs "
                               f"one of every class); use fewer folds or add images")
    groups = content_groups(root, samples)
    parts = iterative_parts(samples, [1 / k] * k, seed, groups) if multi else stratified_folds(samples, k, seed, groups)
    train = sorted((s for i, part in enumerate(parts, 1) if i != fold for s in part), key=lambda s: s.path)
    counts = _label_counts(train, len(classes))
    missing = [name for name, n in zip(classes, counts) if not n]
    if missing:
        raise DatasetError(f"{root}: class {missing[0]} has no training image in fold {fold} of {k} (its images "
                           "are copies of one file, which stay together); add distinct images or use fewer folds")
    return DatasetSplit(classes, train, parts[fold - 1], f"fold {fold} of {k}, stratified ({what}, seed {seed})",
                        str(root), skipped, multi, **extra)


def _label_counts(samples: Sequence[Sample], n: int) -> list[int]:
    """Images per class (a multi-label image counts for each of its labels)."""
    counts = [0] * n
    for s in samples:
        for label in s.label_set():
            counts[label] += 1
    return counts


def _label_file_split(table: LabelTable, val_fraction: float, seed: int, folds: int, fold: int) -> DatasetSplit:
    """A label file's rows as a split: its split column (test rows left for evaluate), else stratified (iterative
    when multi-label); with folds, train and val rows pooled into k folds."""
    index = {name: i for i, name in enumerate(table.classes)}
    multi, root, name = table.multi_label, Path(table.root), table.source.name
    rows = [r for r in table.rows if r.split != "test"]
    samples = [Sample(r.path, index[r.labels[0]], tuple(index[c] for c in r.labels) if multi else ()) for r in rows]
    extra = {"missing": list(table.missing)}
    what = f"{name}, {'multi-label, ' if multi else ''}{table.columns}"
    if folds:
        return _folds_split(root, table.classes, samples, folds, fold, seed, what, list(table.skipped), multi, **extra)
    if table.has_split:
        parts = {p: [s for s, r in zip(samples, rows) if r.split == p] for p in ("train", "val")}
        if not parts["train"] or not parts["val"]:
            empty = "train" if not parts["train"] else "val"
            raise DatasetError(f"{table.source}: its split column names no {empty} row; mark some rows {empty}, or "
                               "remove the split column for a stratified split")
        return DatasetSplit(table.classes, parts["train"], parts["val"], f"{what}; its split column", str(root),
                            list(table.skipped), multi, **extra)
    need = _min_per_class(val_fraction)
    few = [f"{label} {n}" for label, n in zip(table.classes, _label_counts(samples, len(table.classes))) if n < need]
    if few:  # a label file lists what it has; its small classes train rather than stop the run
        extra["notes"] = [f"{len(few)} class(es) have fewer than {need} images, too few to hold one out for "
                          f"validation: they train only, and val metrics leave them out ({', '.join(few[:8])}"
                          f"{', ...' if len(few) > 8 else ''})"]
    groups = content_groups(root, samples)
    if multi:
        (train, val), how = iterative_parts(samples, (1 - val_fraction, val_fraction), seed, groups), "iterative"
    else:
        (train, val), how = stratified_split(samples, val_fraction, seed, groups), "stratified"
    return DatasetSplit(table.classes, train, val, f"{what}; {how} split, {val_fraction:.0%} val (seed {seed})", str(root),
                        list(table.skipped), multi, **extra)


def labelled_samples(data: str, classes: list[str], labels: LabelFileOptions | None = None,
                     multi_label: bool = False) -> tuple[list[Sample], list[tuple[str, str]], str]:
    """The images to evaluate: val/ of a train/val folder, else every image of a folder of class folders; of a
    label file, its test rows, else its val rows, else every row.

    Labels are the model's class indices (every label of an image for a multi-label model); a class the model
    does not know is an error.
    """
    if is_label_file(data):
        return _label_file_samples(data, classes, labels or LabelFileOptions(), multi_label)
    root = _existing_folder(data)
    train_dir, val_dir = _layout_dirs(root)
    if train_dir is not None and val_dir is not None:
        root = val_dir
    skipped: list[tuple[str, str]] = []
    dirs = class_dirs(root)
    if not dirs:
        raise DatasetError(f"{root}: no class folders found; put each class's images in its own folder")
    _known(root, dirs, classes)
    samples = [Sample(p, classes.index(name), (classes.index(name),) if multi_label else ())
               for name, folder in dirs.items() for p in images_under(folder, skipped)]
    if not samples:
        raise DatasetError(f"{root}: no images to evaluate")
    return samples, skipped, str(root)


def _known(where, names, classes: list[str]) -> None:
    unknown = sorted(set(names) - set(classes))
    if unknown:
        raise DatasetError(f"{where}: classes {unknown} are not among the model's classes {classes}; evaluate on "
                           "data labelled with the model's classes")


def _label_file_samples(data, classes: list[str], opts: LabelFileOptions, multi: bool):
    table = read_label_file(data, dataclasses.replace(opts, multi_label=opts.multi_label or multi))
    _known(table.source, table.classes, classes)
    rows = next((chosen for part in ("test", "val") if (chosen := [r for r in table.rows if r.split == part])),
                table.rows)
    samples = [Sample(r.path, classes.index(r.labels[0]), tuple(classes.index(c) for c in r.labels) if multi else ())
               for r in rows]
    skipped = list(table.skipped) + [(os.path.join(table.root, w), f"line {n} of {table.source.name}: no such image")
                                     for n, w in table.missing]
    return samples, skipped, table.root
