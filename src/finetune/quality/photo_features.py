"""A model's own features of any photos (the input of its head), cached on disk per photo and per backbone.

`finetune suggest` ranks a pool of unlabelled photos by the model's features and probabilities. A probe run keeps
the pretrained backbone, so retraining the probe after a round of labelling leaves every feature valid: the cache
is keyed by the backbone's weights (never the head's) and each photo by its real path, size and modification time,
so the next round reads the features instead of running the backbone again, and an edited photo is recomputed.
It lives in finetune's cache folder beside training's features (`$FINETUNE_CACHE`, else ~/.cache/finetune).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from finetune._util.devices import resolve_device
from finetune._util.files import atomic_write, cache_dir
from finetune.config import MAX_PIXELS
from finetune.data.inputs import Failure
from finetune.errors import ResourceError, UsageError
from finetune.formats.load import Runnable
from finetune.inference.predictor import Predictor
from finetune.models.model_file import ModelFile, load_model_file, network_from
from finetune.models.registry import Network

FORMAT = "finetune-photo-features/1"
FOLDER = "photo-features"
RUNS_ON = (".pt", ".pth", ".safetensors")  # model files that hold the network itself, so its features can be read


@dataclass
class LoadedModel:
    """A model file opened for its features: the network (eval mode), its description and the backbone's key."""

    net: Network
    info: ModelFile
    key: str
    device: object  # torch.device


def open_model(path: str | os.PathLike, device: str = "auto") -> LoadedModel:
    """The network of a finetune model file (best.pt, or a .pt / .safetensors export); refused, with what to give
    instead, when its features cannot be read: a compiled program (.pt2, .onnx, .xml), an exported ensemble, or a
    head that is not a linear layer on one feature vector per image."""
    suffix = os.path.splitext(str(path))[1].lower()
    if suffix not in RUNS_ON:
        raise UsageError(f"--model {path}: a compiled export hides the features suggest ranks by; give the model "
                         "file it was exported from (the run's best.pt, or a .pt / .safetensors export)")
    mf = load_model_file(path)
    if mf.members:
        raise UsageError(f"--model {path}: an exported ensemble; suggest ranks by one model's features: give one "
                         "member's best.pt")
    net = network_from(mf, mf.arch, mf.state_dict, mf.dropout)
    if not net.head_gives_logits(mf.preprocessing.crop_size):
        raise UsageError(f"--model {path}: its head ({mf.arch}) is not a linear layer on one feature vector per "
                         "image, so it gives no features to compare photos by; train another family, e.g. "
                         "mobilenet_v2 or resnet18")
    dev = resolve_device(device)
    net.module.to(dev).eval()
    return LoadedModel(net, mf, backbone_key(net, mf), dev)


def backbone_key(net: Network, mf: ModelFile) -> str:
    """Hash of what a photo's features depend on: architecture, preprocessing and every weight outside the head."""
    import torch

    h = hashlib.sha256(json.dumps([FORMAT, mf.arch, mf.preprocessing.to_dict()]).encode())
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
    return dict(zip(ids, feats)) if len(ids) == len(feats) else {}


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
        atomic_write(_cache_file(key), lambda tmp: save_file({"features": feats}, tmp,
                                                            metadata={"photos": json.dumps(ids)}))
    except ResourceError:
        pass


def photo_features(model: LoadedModel, paths: Sequence[str], batch_size: int = 32, workers: int = 2,
                   max_pixels: int = MAX_PIXELS, on_progress: Callable[[int], None] = lambda n: None):
    """(features [photos read, dim] in path order, the paths read, [Failure], how many came from the cache)."""
    import torch

    rows = read_cache(model.key)
    ids = {p: identity(p) for p in paths}
    todo = [p for p in paths if ids[p] is None or ids[p] not in rows]
    cached = len(paths) - len(todo)
    on_progress(cached)
    fresh, failures = _extract(model, todo, batch_size, workers, max_pixels, on_progress)
    if fresh:
        write_cache(model.key, rows | {ids[p]: f for p, f in fresh.items() if ids[p] is not None})
    good = [p for p in paths if p in fresh or (ids[p] is not None and ids[p] in rows)]
    feats = [fresh[p] if p in fresh else rows[ids[p]] for p in good]
    dim = next(iter(rows.values())).shape[0] if rows else (next(iter(fresh.values())).shape[0] if fresh else 0)
    out = torch.stack(feats).float() if feats else torch.zeros(0, dim)
    return out, good, failures, cached


def _extract(model: LoadedModel, paths: Sequence[str], batch_size: int, workers: int, max_pixels: int,
             on_progress) -> tuple[dict, list[Failure]]:
    """{path: feature row} of the photos that decode, and a Failure for each that does not."""
    import torch

    if not paths:
        return {}, []
    module, seen = model.net.module, []
    handle = model.net.head_module().register_forward_hook(lambda m, i, o: seen.append(i[0].float().cpu()))
    runnable = Runnable(model.info, lambda x: module(x.to(model.device)), model.device, "torch")
    loader = Predictor(runnable, max_pixels=max_pixels)  # predict's decoding and preprocessing, exactly
    out, failures = {}, []
    try:
        with torch.inference_mode():
            for chunk, batch in loader.batches(paths, batch_size, workers, on_progress):
                seen.clear()
                if batch is not None:
                    module(batch.to(model.device))
                good = iter(seen[0].flatten(1) if seen else [])
                for path, err in chunk:
                    if err is not None:
                        failures.append(Failure(path, err))
                    else:
                        out[path] = next(good).clone()
    finally:
        handle.remove()
    return out, failures


def head_logits(model: LoadedModel, features):
    """The model's logits from its head's input features, in batches on the model's device."""
    import torch

    head = model.net.head_module().eval()
    with torch.inference_mode():
        parts = [head(features[i:i + 4096].to(model.device)).float().cpu() for i in range(0, len(features), 4096)]
    return torch.cat(parts) if parts else torch.zeros(0, len(model.info.classes))
