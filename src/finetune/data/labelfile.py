"""Label files (.csv, .tsv, .jsonl): one row per image, its path and its label(s), an optional split column.

Read and validated here, with the line number in every message; each path is resolved to an image file
under the label file's folder (or --image-dir) with one directory listing per folder, so a 100,000-row
file is checked without a system call per row. A path without an extension is tried with each image
extension (ids such as `000bec18` find `000bec18.jpg`). Rows whose image is missing are collected, not
fatal: the caller skips them with a summary, or stops under --strict.
"""

from __future__ import annotations

import csv
import io
import json
import os
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from finetune.data.images import IMAGE_EXTENSIONS, ignored, irregular_reason, is_image_file, unsupported_reason
from finetune.errors import DatasetError, UsageError

LABEL_SUFFIXES = (".csv", ".tsv", ".jsonl")
PATH_NAMES = ("path", "file", "image", "filename", "filepath", "file_name", "image_path", "image_id", "img")
LABEL_NAMES = ("label", "labels", "class", "tags", "category")
SPLIT_NAMES = ("split", "subset")
SPLITS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
AUTO_SEPARATORS = (";", "|")  # a space is only used when asked for: class names often hold one ("golden retriever")
SEPARATOR_NAMES = {"space": " ", "semicolon": ";", "pipe": "|", "comma": ","}
# Images looked for in the subfolders of the label file's folder, when its own folder holds none of them.
# Rows read to find the images' folder and, when no header names it, the path column by its values (a label file
# may list many images that are not here: the dog-breed file names 10,222, of which 1,000 are present).
DETECT_ROWS = 500
KNOWN_NAMES = set(PATH_NAMES + LABEL_NAMES + SPLIT_NAMES)


@dataclass(frozen=True)
class LabelFileOptions:
    """How to read a label file (the CLI's --path-col, --label-col, --label-sep, --multi-label, --image-dir)."""

    path_col: str | None = None  # None: detected from the header, or column 1 of a header-less file
    label_col: str | None = None
    label_sep: str | None = None  # None: ';' or '|' when a label cell holds one
    multi_label: bool = False  # one label per row still makes a multi-label dataset
    image_dir: str | None = None  # None: the label file's folder (or its one subfolder holding the images)


@dataclass
class Row:
    line: int  # line number in the file (the header is line 1), as an editor shows it
    path: str  # the image file, resolved
    labels: tuple[str, ...]
    split: str | None = None  # train | val | test, from a split column


@dataclass
class LabelTable:
    """A label file read and checked: its usable rows, the rows without an image, what was skipped."""

    source: Path
    root: str  # the folder the paths are relative to
    rows: list[Row]
    classes: list[str]
    multi_label: bool
    missing: list[tuple[int, str]] = field(default_factory=list)  # (line, path as written): no image there
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): not an image file
    has_split: bool = False
    columns: str = ""  # which columns were used, for the run's layout line


def is_label_file(data: str | os.PathLike) -> bool:
    """A path to a .csv, .tsv or .jsonl file (not a folder) is read as a label file."""
    return Path(data).suffix.lower() in LABEL_SUFFIXES and not os.path.isdir(data)


def _records(path: Path) -> tuple[list[str] | None, list[tuple[int, list]]]:
    """(header or None, [(line, cells)]) of a .csv/.tsv; for .jsonl, the keys in order and each line's values."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM from spreadsheet exports is not part of the header
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such label file") from None
    except UnicodeDecodeError:
        raise DatasetError(f"{path}: not UTF-8 text; save the label file as UTF-8 CSV") from None
    except OSError as e:
        raise DatasetError(f"{path}: cannot read the label file ({e.strerror})") from None
    if path.suffix.lower() == ".jsonl":
        return _jsonl(path, text)
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    records = []
    try:
        for cells in reader:
            if any(c.strip() for c in cells):
                records.append((reader.line_num, [c.strip() for c in cells]))
    except csv.Error as e:
        raise DatasetError(f"{path} line {reader.line_num}: not valid CSV ({e})") from None
    return None, records


def _jsonl(path: Path, text: str) -> tuple[list[str], list[tuple[int, list]]]:
    keys: list[str] = []
    objects = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            raise DatasetError(f"{path} line {n}: not a JSON object; each line of a .jsonl label file is one "
                               'object such as {"path": "a.jpg", "label": "cat"}') from None
        if not isinstance(obj, dict):
            raise DatasetError(f"{path} line {n}: not a JSON object")
        keys += [k for k in obj if k not in keys]
        objects.append((n, obj))
    return keys, [(n, [obj.get(k, "") for k in keys]) for n, obj in objects]


def _find(names: list[str], given: str | None, known: tuple[str, ...], what: str, path: Path) -> int | None:
    folded = [unicodedata.normalize("NFC", str(n)).strip().casefold() for n in names]
    if given is not None:
        if given.casefold() in folded:
            return folded.index(given.casefold())
        raise UsageError(f"--{what}-col {given}: {path} has no such column (its columns: {', '.join(names)})")
    return next((folded.index(k) for k in known if k in folded), None)


def _columns(path: Path, header: list[str] | None, records: list, opts: LabelFileOptions):
    """(path column, label column, split column or None, data records, description)."""
    if header is None and records:
        first = [str(c) for c in records[0][1]]
        named = opts.path_col or opts.label_col or any(c.casefold() in KNOWN_NAMES for c in first)
        if named or len(first) != 2 or not _looks_like_file(first[0]):
            header, records = first, records[1:]
    if header is None:  # header-less: path, label
        if records and len(records[0][1]) != 2:
            raise DatasetError(f"{path}: no header and {len(records[0][1])} columns; add a header row naming the "
                               "path and label columns (e.g. path,label)")
        return 0, 1, None, records, "columns 1 (path) and 2 (label), no header"
    p = _find(header, opts.path_col, PATH_NAMES, "path", path)
    lab = _find(header, opts.label_col, LABEL_NAMES, "label", path)
    split = _find(header, None, SPLIT_NAMES, "split", path)
    how = {}
    if p is None:  # as a user would: the column whose values name image files that exist
        p = _path_column_by_values(path, header, records, opts, {lab, split})
        how[p] = " (its values name image files)"
    if lab is None and p is not None:  # the one column left besides the paths and the split
        rest = [i for i in range(len(header)) if i not in (p, split)]
        lab = rest[0] if len(rest) == 1 else None
        how[lab] = " (the other column)"
    if p is None or lab is None:
        missing = "image paths" if p is None else "labels"
        raise DatasetError(f"{path}: cannot tell which column holds the {missing} (columns: {', '.join(header)}); "
                           f"name it with --{'path' if p is None else 'label'}-col")
    return p, lab, split, records, (f"path column '{header[p]}'{how.get(p, '')}, label column "
                                    f"'{header[lab]}'{how.get(lab, '')}")


def _path_column_by_values(path: Path, header: list[str], records: list, opts: LabelFileOptions,
                           taken: set) -> int | None:
    """The one column whose values (in the first rows) name the most image files, wherever the images are found
    (the label file's folder, its one subfolder holding them, or --image-dir); None when no column names any."""
    rows = records[:DETECT_ROWS]
    hits = {}
    for i in range(len(header)):
        if i in taken:
            continue
        written = [str(c[i]).strip() for _, c in rows if i < len(c) and isinstance(c[i], (str, int))]
        written = [w for w in written if w and ".." not in w]
        resolver = _Resolver(_image_root(path, opts, written))
        hits[i] = sum(resolver.resolve(w, "")[0] is not None for w in written)
    best = max(hits.values(), default=0)
    found = [i for i, n in hits.items() if n == best]
    return found[0] if best and len(found) == 1 else None


def _looks_like_file(cell: str) -> bool:
    return is_image_file(cell) or "/" in cell or "\\" in cell


def _split_labels(cell, sep: str | None) -> tuple[str, ...]:
    if isinstance(cell, list):  # .jsonl: a list of labels
        items = [str(c) for c in cell]
    elif sep is None:
        items = [str(cell)]
    else:
        items = str(cell).split(sep)
    out = []
    for item in items:
        name = item.strip()
        name = name if name.isascii() else unicodedata.normalize("NFC", name)
        if name and name not in out:
            out.append(name)
    return tuple(out)


def _separator(opts: LabelFileOptions, cells: list) -> str | None:
    if opts.label_sep is not None:
        return SEPARATOR_NAMES.get(opts.label_sep.lower(), opts.label_sep)
    texts = [c for c in cells if isinstance(c, str)]
    return next((s for s in AUTO_SEPARATORS if any(s in c for c in texts)), None)


def read_label_file(data: str | os.PathLike, opts: LabelFileOptions = LabelFileOptions()) -> LabelTable:
    """Read, validate and resolve a label file; raises DatasetError (exit 3) naming the line for a path outside
    the folder, an empty label, a repeated row or image, and a file with fewer than 2 classes."""
    path = Path(data)
    header, records = _records(path)
    p, lab, sp, records, columns = _columns(path, header, records, opts)
    if not records:
        raise DatasetError(f"{path}: no rows; list one image per row with its label")
    sep = _separator(opts, [r[1][lab] if lab < len(r[1]) else "" for r in records])
    multi = opts.multi_label or sep is not None or any(isinstance(r[1][lab], list) for r in records
                                                       if lab < len(r[1]))
    root = _image_root(path, opts, [str(c[p]) for _, c in records[:DETECT_ROWS] if p < len(c)])
    if root != os.fspath(path.parent):
        columns += f", images in {root}"
    resolver = _Resolver(root)
    table = LabelTable(path, root, [], [], multi, has_split=sp is not None, columns=columns)
    seen: dict[str, tuple[int, tuple]] = {}
    for line, cells in records:
        written = str(cells[p]).strip() if p < len(cells) else ""
        labels = _split_labels(cells[lab] if lab < len(cells) else "", sep)
        if not written or not labels:
            raise DatasetError(f"{path} line {line}: " + (f"{written} has no label; label it or remove the row"
                                                          if written else "no image path; fill it in or remove "
                                                          "the row"))
        found, reason = resolver.resolve(written, f"{path} line {line}" if ".." in written else "")
        if reason is not None:
            table.skipped.append((os.path.join(root, written), f"line {line}: {reason}"))
        if found is None:
            if reason is None:
                table.missing.append((line, written))
            continue
        if found in seen:
            raise DatasetError(_repeat(f"{path} line {line}", written, labels, seen[found], multi))
        seen[found] = (line, labels)
        split = None if sp is None else _split_value(cells[sp] if sp < len(cells) else "", f"{path} line {line}")
        table.rows.append(Row(line, found, labels, split))
    _check_classes(table)
    return table


def _repeat(where: str, written: str, labels: tuple, first: tuple[int, tuple], multi: bool) -> str:
    line, before = first
    if tuple(before) == tuple(labels):
        return f"{where}: repeats line {line} ({written}); remove one of the two rows"
    merge = "into one row" + (f" with both labels ('{';'.join(dict.fromkeys(before + labels))}')" if multi else
                              "; an image with several labels needs --multi-label and 'a;b' in one cell")
    return (f"{where}: {written} is labelled '{';'.join(labels)}' here and '{';'.join(before)}' on line {line}; "
            f"merge the rows {merge}")


def _split_value(cell, where: str) -> str:
    value = SPLITS.get(str(cell).strip().lower())
    if value is None:
        raise DatasetError(f"{where}: split '{cell}' is not train, val or test; fix the cell (or leave the split "
                           "column out for a stratified split)")
    return value


def _check_classes(table: LabelTable) -> None:
    if not table.rows:
        shown = f"e.g. line {table.missing[0][0]}: {table.missing[0][1]}" if table.missing else "none"
        raise DatasetError(f"{table.source}: no row names an image under {table.root} ({shown}); check the paths, "
                           "or give --image-dir FOLDER where the images are")
    names = sorted({name for r in table.rows for name in r.labels})
    if len(names) < 2:
        raise DatasetError(f"{table.source}: every row has the label '{names[0]}'; a classifier needs at least 2 "
                           "classes")
    table.classes = names


def _image_root(path: Path, opts: LabelFileOptions, probe: list[str]) -> str:
    """--image-dir, else the label file's folder, else its one subfolder holding the first rows' images."""
    if opts.image_dir is not None:
        if not os.path.isdir(opts.image_dir):
            raise UsageError(f"--image-dir {opts.image_dir}: no such folder")
        return os.fspath(opts.image_dir)
    home = os.fspath(path.parent)
    relative = [p for p in probe if p and not os.path.isabs(p)]
    if not relative or _Resolver(home).hits(relative):
        return home
    try:
        subdirs = sorted(e.path for e in os.scandir(home) if e.is_dir() and not ignored(e.name))
    except OSError:
        return home
    holding = [d for d in subdirs if _Resolver(d).hits(relative)]
    return holding[0] if len(holding) == 1 else home


class _Resolver:
    """Paths as written -> image files under root, from one listing per folder (names, case-folded extensions)."""

    def __init__(self, root: str):
        self.root = root
        self.listings: dict[str, dict[str, os.DirEntry]] = {}
        self.stems: dict[str, dict[str, str]] = {}

    def _listing(self, folder: str) -> dict[str, os.DirEntry]:
        if folder not in self.listings:
            try:
                self.listings[folder] = {e.name: e for e in os.scandir(folder)}
            except OSError:
                self.listings[folder] = {}
        return self.listings[folder]

    def _by_stem(self, folder: str) -> dict[str, str]:
        """stem -> name of an image file in folder, for paths written without an extension."""
        if folder not in self.stems:
            found: dict[str, str] = {}
            for name in sorted(self._listing(folder)):
                stem, ext = os.path.splitext(name)
                if ext.lower() in IMAGE_EXTENSIONS:
                    found.setdefault(stem, name)
            self.stems[folder] = found
        return self.stems[folder]

    def hits(self, written: list[str]) -> bool:
        """Does any of these paths name an image here?"""
        return any(self.resolve(w, "")[0] is not None for w in written if ".." not in w)  # outside: named later

    def resolve(self, written: str, where: str) -> tuple[str | None, str | None]:
        """(image file, None), or (None, None) when missing, or (None, why) when not usable as an image."""
        if "/" not in written and os.sep not in written and written not in (".", ".."):
            folder, name = self.root, written  # the common case, without path arithmetic
        elif os.path.isabs(written):
            folder, name = os.path.split(os.path.normpath(written))
        else:
            rel = os.path.normpath(written)
            if rel == ".." or rel.startswith(".." + os.sep):
                raise DatasetError(f"{where}: {written} lies outside {self.root}; paths are relative to the label "
                                   "file's folder (or --image-dir), or absolute")
            folder, name = os.path.split(os.path.join(self.root, rel))
        listing = self.listings.get(folder)
        if listing is None:
            listing = self._listing(folder)
        entry = listing.get(name)
        ext = os.path.splitext(name)[1].lower()
        if entry is None and ext not in IMAGE_EXTENSIONS:
            stems = self.stems.get(folder)
            other = (stems if stems is not None else self._by_stem(folder)).get(name)
            entry = listing[other] if other else None
            ext = os.path.splitext(other)[1].lower() if other else ext
        if entry is None:
            return None, None
        if ext not in IMAGE_EXTENSIONS and not is_image_file(entry.name):
            return None, irregular_reason(entry.path) or unsupported_reason(entry.name)
        if entry.name.startswith(".") or entry.is_symlink() or not entry.is_file(follow_symlinks=False):
            reason = irregular_reason(entry.path) if not entry.name.startswith(".") else "a hidden file"
            if reason:
                return None, reason
        return entry.path, None


def options_from(cfg) -> LabelFileOptions:
    """The label file options of a TrainConfig."""
    return LabelFileOptions(cfg.path_col, cfg.label_col, cfg.label_sep, cfg.multi_label, cfg.image_dir)
