"""The content index of a dataset folder: which files are byte-identical, remembered between runs.

Duplicates must stay on one side of any split, so every file whose size matches another's is
fingerprinted. In a folder of 100k photos most sizes collide with some other file's, so hashing them
all would read gigabytes. Two steps keep that cheap: a quick fingerprint (size plus the first and last
4 KiB) separates nearly every pair of distinct photos, and only files that still match are hashed in
full. Fingerprints are kept per folder under the cache directory, keyed by path, size and
modification time, so the next run over the same folder re-reads only files that changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from finetune._util.files import cache_dir, mark_used, trim_cache, write_text_atomic

FORMAT = "finetune-index"
FORMAT_VERSION = 1
EDGE_BYTES = 4096  # read from each end of a file for the quick fingerprint


def index_path(root: str | os.PathLike) -> Path:
    """Where the index of the folder root is kept (one file per folder, by its real path)."""
    key = hashlib.sha256(os.path.realpath(root).encode()).hexdigest()[:32]
    return cache_dir() / "index" / f"{key}.json"


def load(root: str | os.PathLike) -> dict:
    """{path relative to root: [size, mtime_ns, quick, full]}; empty when absent, unreadable or from elsewhere."""
    try:
        stored = json.loads(index_path(root).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(stored, dict) or stored.get("format") != FORMAT or stored.get("version") != FORMAT_VERSION \
            or stored.get("root") != os.path.realpath(root) or not isinstance(stored.get("files"), dict):
        return {}
    mark_used(index_path(root))
    return stored["files"]


def save(root: str | os.PathLike, files: dict) -> None:
    """Write the index atomically; a cache that cannot be written only costs the next run time."""
    blob = {"format": FORMAT, "version": FORMAT_VERSION, "root": os.path.realpath(root), "files": files}
    try:
        index_path(root).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(index_path(root), json.dumps(blob, separators=(",", ":")))
    except Exception:  # noqa: BLE001 - read-only cache dir, disk full: the index is an optimisation
        return
    trim_cache(index_path(root))


def quick_fingerprint(path: str, size: int) -> str:
    """SHA-256 of the first and last EDGE_BYTES of a file (the whole file when it is smaller than both).

    Never reads past size: a file that grew, or a special file posing as one, cannot make it read forever.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(min(EDGE_BYTES, size)))
        if size > 2 * EDGE_BYTES:
            f.seek(size - EDGE_BYTES)
        h.update(f.read(max(0, min(EDGE_BYTES, size - EDGE_BYTES))))
    return h.hexdigest()


def full_hash(path: str, size: int | None = None) -> str:
    """SHA-256 of a file's first size bytes (default: its size now); never reads more."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = os.fstat(f.fileno()).st_size if size is None else size
        while left > 0:
            chunk = f.read(min(1 << 20, left))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def _regular_stats(paths: Sequence[str]) -> dict[str, os.stat_result]:
    out = {}
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            out[p] = st
    return out


def content_groups(paths: Sequence[str], root: str | os.PathLike | None = None) -> dict[str, str]:
    """path -> first path (in the given order) with identical bytes, for files that have a twin.

    With root, fingerprints are read from and written back to that folder's index.
    """
    known = load(root) if root is not None else {}
    prefix = os.path.join(os.fspath(root), "") if root is not None else ""
    rel = lambda p: p[len(prefix):] if prefix and p.startswith(prefix) else p  # noqa: E731 - relpath is 10x slower
    stats = _regular_stats(paths)  # a file gone or replaced since the scan has no twin; decoding names it
    by_size: dict[int, list[str]] = {}
    for p in stats:
        by_size.setdefault(stats[p].st_size, []).append(p)
    entries: dict[str, list] = {}  # what the index will hold: every file that needed a fingerprint

    def entry(p: str) -> list:
        st = stats[p]
        old = known.get(rel(p))
        fresh = isinstance(old, list) and len(old) == 4 and old[:2] == [st.st_size, st.st_mtime_ns]
        return entries.setdefault(p, list(old) if fresh else [st.st_size, st.st_mtime_ns, None, None])

    def fill(items: list[str], slot: int, fn) -> None:
        # One file after another: on this project's 2-core machine, 2-8 threads made 100k small reads 2-3x slower.
        for p in items:
            if entry(p)[slot] is None:
                try:
                    entries[p][slot] = fn(p)
                except OSError:  # unreadable now: unique, so never grouped with another file
                    entries[p][slot] = f"unreadable:{p}"

    candidates = [p for same in by_size.values() if len(same) > 1 for p in same]
    fill(candidates, 2, lambda p: quick_fingerprint(p, stats[p].st_size))
    by_quick: dict[tuple, list[str]] = {}
    for p in candidates:
        by_quick.setdefault((stats[p].st_size, entries[p][2]), []).append(p)
    suspects = [p for same in by_quick.values() if len(same) > 1 for p in same]
    fill(suspects, 3, lambda p: full_hash(p, stats[p].st_size))
    out, first_by_hash = {}, {}
    for p in suspects:
        out[p] = first_by_hash.setdefault(entries[p][3], p)
    if root is not None:
        files = {rel(p): e for p, e in entries.items()}
        if files != known:
            save(root, files)
    return out
