"""Files finetune writes: atomic writes (never a half file), strict JSON, temp cleanup, the cache folder,
run-folder names and the runs/latest.json pointer."""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from finetune.errors import ModelFileError, ResourceError, UsageError

TEMP_PREFIX = ".finetune-tmp-"  # recognisable, so stale temp files can be found and removed
RUNS_ROOT = Path("runs")
LATEST_POINTER = RUNS_ROOT / "latest.json"


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], advice: str = "write elsewhere") -> Path:
    """Write via write(tmp_path) to a temp file beside path, fsync, then os.replace: never a half file.

    advice finishes the disk-full message (what the user can do instead, e.g. "choose another -o").
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=path.suffix, dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise ResourceError(f"{path}: could not write ({e.strerror or e}); check the folder and its permissions") \
            from None
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        if e.errno == errno.ENOSPC:
            raise ResourceError(_disk_full(path, advice)) from None
        raise ResourceError(f"{path}: could not write ({e.strerror or e}); check free space and permissions") from None
    except RuntimeError as e:
        _remove(tmp)
        # torch.save reports a full disk as "PytorchStreamWriter failed writing ... unexpected pos".
        if "unexpected pos" in str(e) or "failed writing" in str(e):
            raise ResourceError(_disk_full(path, advice)) from None
        raise
    except BaseException:
        _remove(tmp)
        raise
    return path


def _remove(tmp: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(tmp)


def _disk_full(path: Path, advice: str) -> str:
    try:
        free = f"{shutil.disk_usage(path.parent).free / 1e6:.0f} MB free"
    except OSError:
        free = "free space unknown"
    return f"{path}: could not write: the disk is full ({free}); free some space or {advice}"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike, text: str, advice: str = "write elsewhere") -> Path:
    """Atomic text file write."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, write, advice)


def finite(obj):
    """obj with every NaN/inf float replaced by None, so that it serialises as valid JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def dumps_json(obj, indent: int | None = 2) -> str:
    """Strict JSON (never a bare NaN): non-finite numbers become null."""
    return json.dumps(finite(obj), indent=indent, ensure_ascii=False, allow_nan=False, default=str)


def write_json_atomic(path: str | os.PathLike, obj) -> Path:
    return write_text_atomic(path, dumps_json(obj) + "\n")


def earlier_rows(log: Path) -> list[dict]:
    """The rows of a CSV log that earlier runs into the same folder wrote, to be kept (a damaged log is started
    afresh: it is ours, a record, not the user's data)."""
    try:
        with open(log, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    except (OSError, csv.Error, UnicodeDecodeError):
        return []


def write_csv_atomic(path: str | os.PathLike, fields: list[str], rows: Iterable[dict]) -> Path:
    """Atomic CSV with a header; floats in 6 significant digits, None as an empty cell."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for row in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else ("" if v is None else v)) for k, v in row.items()})
    return write_text_atomic(path, buf.getvalue())


def prune_stale_temp_files(folder: str | os.PathLike) -> None:
    """Remove temp files a killed run left behind."""
    folder = Path(folder)
    if folder.is_dir():
        for p in folder.glob(TEMP_PREFIX + "*"):
            p.unlink(missing_ok=True)


def cache_dir() -> Path:
    """$FINETUNE_CACHE, else $XDG_CACHE_HOME/finetune, else ~/.cache/finetune."""
    if os.environ.get("FINETUNE_CACHE"):
        return Path(os.environ["FINETUNE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "finetune"


CACHE_LIMIT_ENV = "FINETUNE_CACHE_LIMIT_GB"
CACHE_LIMIT_GB = 10.0  # the cache folder's default bound: features, ONNX exports, folder indexes


def cache_limit() -> int:
    """The cache folder's size bound in bytes: $FINETUNE_CACHE_LIMIT_GB gigabytes, else 10."""
    text = os.environ.get(CACHE_LIMIT_ENV, "").strip()
    if not text:
        return int(CACHE_LIMIT_GB * 1e9)
    try:
        gb = float(text)
        if not math.isfinite(gb) or gb < 0:
            raise ValueError
    except ValueError:
        raise UsageError(f"{CACHE_LIMIT_ENV}={text}: not a size in gigabytes; set a number such as 10 "
                         "(0 keeps only what the current command wrote)") from None
    return int(gb * 1e9)


def mark_used(path: str | os.PathLike) -> None:
    """A cache file just read counts as recently used, so trim_cache removes it after the files nobody reads."""
    with contextlib.suppress(OSError):
        os.utime(path)


def trim_cache(keep: str | os.PathLike) -> None:
    """Keep the cache folder within cache_limit(): remove the least recently used files (by modification time,
    which mark_used renews on every read) until it fits, never the file just written (keep) nor another process's
    temp file. Called after each write to the cache; every entry can be computed again."""
    root, limit, keep = cache_dir(), cache_limit(), Path(keep)
    entries, total = [], 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath, name)
            try:
                st = path.stat()
            except OSError:
                continue
            total += st.st_size
            if path != keep and not name.startswith(TEMP_PREFIX):
                entries.append((st.st_mtime_ns, st.st_size, path))
    for _, size, path in sorted(entries):
        if total <= limit:
            break
        with contextlib.suppress(OSError):
            path.unlink()
            total -= size


def timestamped_dir(kind: str, model: str) -> Path:
    """runs/[<kind>-]<date>-<time>-<model>, numbered when that name is taken."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = RUNS_ROOT / f"{kind + '-' if kind else ''}{stamp}-{model.replace('/', '_').replace(':', '-')}"
    path, n = base, 2
    while path.exists():
        path, n = Path(f"{base}-{n}"), n + 1
    return path


def point_latest(run_dir: Path, model_path: Path) -> None:
    """runs/latest.json names the best model of the run that last improved one."""
    write_json_atomic(LATEST_POINTER, {"run_dir": str(run_dir.resolve()), "model": str(model_path.resolve())})


def latest_model() -> Path:
    """The best model of the latest run, from runs/latest.json."""
    if not LATEST_POINTER.is_file():
        raise UsageError(f"no --model given and no {LATEST_POINTER} here; train first (`finetune train DATA`) "
                         "or pass --model PATH")
    try:
        model = json.loads(LATEST_POINTER.read_text(encoding="utf-8"))["model"]
        if not isinstance(model, str):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        raise ModelFileError(f"{LATEST_POINTER}: unreadable (not the pointer `finetune train` writes); delete it "
                             "or pass --model PATH") from None
    return Path(model)
