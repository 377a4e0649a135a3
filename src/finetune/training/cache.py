"""Decoding the training images once before epoch 1: into RAM when they fit the budget, else a reduced
check so that every unusable file is named (or stops a --strict run) before training starts."""

from __future__ import annotations

import math
import os

from finetune._util import ddp as dist
from finetune.config import TrainConfig
from finetune.data.dataset import DatasetSplit
from finetune.data.images import decode_all, estimate_cache_bytes
from finetune.errors import DatasetError, UsageError

CACHE_BUDGET_BYTES = 4 * 1024**3  # decoded images kept in RAM up to this per machine; beyond it, stream from disk
CACHE_BUDGET_ENV = "FINETUNE_RAM_CACHE_GB"  # overrides it (GiB; 0 = always stream)


def cache_budget() -> int:
    """Bytes of decoded images one machine may keep in RAM: $FINETUNE_RAM_CACHE_GB, else 4 GiB."""
    text = os.environ.get(CACHE_BUDGET_ENV)
    if text is None:
        return CACHE_BUDGET_BYTES
    try:
        gb = float(text)
    except ValueError:
        gb = -1.0
    if not (gb >= 0 and math.isfinite(gb)):
        raise dist.echoed(UsageError(f"{CACHE_BUDGET_ENV}={text!r}: must be a number of GiB, e.g. 8 (0 = always "
                                     "stream images from disk)"))
    return int(gb * 1024**3)


def decode_for_training(split: DatasetSplit, local: DatasetSplit, short_side: int, workers: int, cfg: TrainConfig,
                        emit) -> dict | None:
    """Decode this rank's images (local; all of split in one process) once into RAM when the budget allows,
    else check each decodes (at reduced size). Returns the cache, or None when streaming.

    Either way a file that fails is named and dropped before epoch 1 (or stops the run under --strict),
    from every rank's view alike.
    """
    world = dist.current()
    paths = [s.path for s in local.train + local.val]
    budget = cache_budget() // world.local_size  # the processes of one machine share its memory
    fits = estimate_cache_bytes(len(paths), short_side) <= budget
    emit("decode_start", total=len(paths), keep=fits, budget_gb=budget * world.local_size / 1024**3)
    # Checking at 1/8 scale is enough to catch truncation; the real decode happens in the loader.
    # Nothing else runs yet: decode on every core unless -j says otherwise.
    threads = max(1, (os.cpu_count() or 1) // world.local_size) if cfg.workers < 0 else max(1, workers)
    cache, failed = decode_all(paths, short_side if fits else 32, threads, lambda n: emit("decode_advance", n=n),
                               keep=fits, max_pixels=cfg.max_pixels)
    if world.distributed:
        failed = [f for part in dist.all_gather(failed) for f in part]
        bad = {p for p, _ in failed}
        local.train = [s for s in local.train if s.path not in bad]
        local.val = [s for s in local.val if s.path not in bad]
    drop_failed(split, failed, emit, cfg.strict)
    return cache if fits else None


def drop_failed(split: DatasetSplit, failed: list, emit, strict: bool) -> None:
    """Take failed files out of the split and name them; --strict (or nothing left) stops the run."""
    if failed:
        bad = {p for p, _ in failed}
        split.skipped.extend(failed)
        split.train = [s for s in split.train if s.path not in bad]
        split.val = [s for s in split.val if s.path not in bad]
        emit("skipped", files=failed, root=split.root)
    if strict and split.skipped:  # every rank sees the same failures, so all raise this together
        path, reason = split.skipped[0]
        raise dist.echoed(DatasetError(
            f"--strict: {len(split.skipped)} file(s) cannot be used, e.g. {os.path.relpath(path, split.root)}: "
            f"{reason}; fix or remove them, or drop --strict"))
    if not split.train or not split.val:
        raise dist.echoed(DatasetError(
            f"{split.root}: no readable images left in {'train' if not split.train else 'val'}"))
