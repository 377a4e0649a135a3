"""Photos' features (the input of a model's head), cached on disk per photo and per backbone.

Keyed by the backbone's weights (never the head's): a probe run keeps the pretrained backbone, so the features its
training computed for its own photos are the ones `finetune suggest` needs for the same photos with that run's
best.pt, and retraining the probe after a round of labelling leaves every feature of the pool valid. Each photo is
known by its real path, size and modification time, so an edited photo is computed again. In finetune's cache folder
(`$FINETUNE_CACHE`, else ~/.cache/finetune), beside training's own feature cache.
"""

from __future__ import annotations

import hashlib
import json
import os

from finetune._util.files import atomic_write, cache_dir, mark_used, trim_cache
from finetune.data.preprocessing import Preprocessing
from finetune.errors import ResourceError
from finetune.models.registry import Network

FORMAT = "finetune-photo-features/1"
FOLDER = "photo-features"


def backbone_key(net: Network, arch: str, preprocessing: Preprocessing) -> str:
    """Hash of what a photo's features depend on: architecture, preprocessing and every weight outside the head
    (the same for a run's network in training and for its best.pt loaded later)."""
    import torch

    h = hashlib.sha256(json.dumps([FORMAT, arch, preprocessing.to_dict()]).encode())
    for name, tensor in sorted(net.plain_state_dict().items()):
        if not net.is_head(name):
            h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def identity(path: str) -> str | None:
    """A photo as the cache knows it: real path, size, modification time (None when it cannot be read)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}"


def _cache_file(key: str):
    return cache_dir() / FOLDER / f"{key}.safetensors"


def read_cache(key: str) -> dict:
    """{photo identity: feature row} of one backbone; empty when absent or unreadable (then recomputed)."""
    from safetensors import safe_open

    path = _cache_file(key)
    if not path.is_file():
        return {}
    try:
        with safe_open(str(path), "pt") as f:
            ids = json.loads(f.metadata()["photos"])
            feats = f.get_tensor("features")
    except Exception:  # noqa: BLE001 - a damaged cache is recomputed, never trusted
        return {}
    if len(ids) != len(feats):
        return {}
    mark_used(path)
    return dict(zip(ids, feats))


def write_cache(key: str, rows: dict) -> None:
    """Store {identity: row} atomically: one version per real path (an edited photo's old row is dropped). A cache
    that cannot be written only costs time next run."""
    import torch
    from safetensors.torch import save_file

    latest = {}
    for ident in rows:
        latest[ident.rsplit("|", 2)[0]] = ident  # rows arrive oldest first: the last version of a path wins
    ids = list(latest.values())
    if not ids:
        return
    feats = torch.stack([rows[i] for i in ids]).float().contiguous()
    try:
        path = atomic_write(_cache_file(key), lambda tmp: save_file({"features": feats}, tmp,
                                                                   metadata={"photos": json.dumps(ids)}))
    except ResourceError:
        return
    trim_cache(path)


def add_rows(key: str, fresh: dict) -> None:
    """Add {path: feature row} of photos just computed to one backbone's cache (rows of other photos kept)."""
    ids = {p: identity(p) for p in fresh}
    if any(ids.values()):
        write_cache(key, read_cache(key) | {ids[p]: row for p, row in fresh.items() if ids[p] is not None})
