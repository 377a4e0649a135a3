"""Where `finetune suggest --into` puts the photos to label, in one of two forms, both ready for `finetune train`:

- a folder: each photo copied as DEST/<guess>/<photo>, so labelling is moving the wrong ones to their class folder
  (copies: the pool is never moved or changed), listed in DEST/suggested.csv with why each was chosen;
- a label file (DEST ends in .csv): one row per photo, `path,guess`, the guess to correct in place; a photo's several
  labels (multi-label) separated by ';'.

Either form grows round after round: earlier rows and copies are kept (a corrected guess is never overwritten), and
the photos already there are what the next round leaves out.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from finetune._util.files import earlier_rows, write_csv_atomic
from finetune.data.dataset import images_under
from finetune.data.labelfile import is_label_file
from finetune.errors import DatasetError, UsageError
from finetune.inference.predictor import copy_into

LOG = "suggested.csv"
LOG_FIELDS = ["rank", "source", "guess", "probability", "margin", "reason", "copied_to", "action"]
LABEL_FIELDS = ["path", "guess"]


def wants_label_file(dest: str | os.PathLike) -> bool:
    """DEST ending in .csv asks for the label-file form (any other name is a folder)."""
    return Path(dest).suffix.lower() == ".csv"


def check_into(dest: str | os.PathLike, multi_label: bool) -> None:
    """Refuse, before any work, a destination the suggestions cannot go to."""
    dest = Path(dest)
    if wants_label_file(dest):
        if dest.is_dir():
            raise UsageError(f"--into {dest}: a folder named like a label file; give a .csv file or another folder")
        if dest.exists():
            _read_rows(dest)  # one that is not a suggest label file is refused now, not after the ranking
        return
    if is_label_file(dest) or (dest.exists() and not dest.is_dir()):
        raise UsageError(f"--into {dest}: not a folder; give a folder (copies as FOLDER/<guess>/<photo>) or a .csv "
                         "label file")
    if multi_label:
        raise UsageError(f"--into {dest}: a multi-label model's photos can carry several labels, which class folders "
                         "cannot hold; give a label file instead, e.g. --into to-label.csv")


def pending_in(dest: str | os.PathLike) -> list[str]:
    """The photos already waiting in the destination from an earlier round (none when it does not exist yet)."""
    dest = Path(dest)
    if wants_label_file(dest):
        if not dest.is_file():
            return []
        return [_resolve(dest, r["path"]) for r in _read_rows(dest)[1] if r.get("path")]
    return images_under(dest) if dest.is_dir() else []


def suggest_into(suggestions: list, dest: str | os.PathLike, multi_label: bool) -> dict:
    """Copy the suggested photos into dest/<guess>/ (logged in dest/suggested.csv), or add them to the label file
    dest. Returns what was done (JSON-ready)."""
    check_into(dest, multi_label)
    if wants_label_file(dest):
        return _label_file(suggestions, Path(dest))
    return _folders(suggestions, Path(dest))


def folder_name(name: str) -> str:
    """A class name as one folder name: a separator or a bare '.'/'..' could not be one."""
    safe = name.replace("/", "_").replace(os.sep, "_")
    return safe if safe not in ("", ".", "..") else f"_{safe}_"


def _folders(suggestions: list, dest: Path) -> dict:
    rows, counts = [], {}
    for s in suggestions:
        folder = dest / folder_name(s.guess[0])
        folder.mkdir(parents=True, exist_ok=True)
        target, copied = copy_into(Path(s.path), folder)
        counts[folder.name] = counts.get(folder.name, 0) + 1
        rows.append({"rank": s.rank, "source": s.path, "guess": s.guess[0], "probability": s.probability,
                     "margin": s.margin, "reason": s.reason, "copied_to": str(target),
                     "action": "copied" if copied else "already there"})
    log = write_csv_atomic(dest / LOG, LOG_FIELDS, earlier_rows(dest / LOG) + rows)
    return {"form": "folders", "path": str(dest), "folders": dict(sorted(counts.items())), "log": str(log),
            "copied": sum(r["action"] == "copied" for r in rows)}


def _read_rows(path: Path) -> tuple[list[str], list[dict]]:
    """(header, rows) of an existing label file suggest wrote (it must have path and guess columns)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            header = list(reader.fieldnames or [])
    except (OSError, csv.Error, UnicodeDecodeError) as e:
        raise DatasetError(f"--into {path}: cannot read it ({e}); give another file") from None
    if not {"path", "guess"} <= set(header):
        raise UsageError(f"--into {path}: exists without the path and guess columns suggest writes; give a new file "
                         "(suggest never rewrites another label file)")
    return header, rows


def _resolve(label_file: Path, written: str) -> str:
    return written if os.path.isabs(written) else os.path.join(label_file.parent, written)


def _written(label_file: Path, photo: str) -> str:
    """A photo's path as the label file lists it: relative to its folder when under it, else absolute."""
    rel = os.path.relpath(os.path.abspath(photo), os.path.abspath(label_file.parent))
    return os.path.abspath(photo) if rel == ".." or rel.startswith(".." + os.sep) else rel


def _label_file(suggestions: list, dest: Path) -> dict:
    header, rows = _read_rows(dest) if dest.is_file() else (list(LABEL_FIELDS), [])
    listed = {os.path.realpath(_resolve(dest, r["path"])) for r in rows if r.get("path")}
    added = 0
    for s in suggestions:
        if os.path.realpath(s.path) in listed:
            continue
        rows.append({"path": _written(dest, s.path), "guess": ";".join(s.guess)})
        added += 1
    write_csv_atomic(dest, header, rows)
    return {"form": "label_file", "path": str(dest), "added": added, "rows": len(rows)}
