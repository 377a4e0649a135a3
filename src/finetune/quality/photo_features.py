"""A model's own features of any photos (the input of its head), for `finetune suggest`: read from the per-photo,
per-backbone cache (inference/feature_cache.py, which a probe run also fills with its own photos), the rest computed
through predict's decoding and preprocessing and added to it."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from finetune._util.devices import resolve_device
from finetune.config import MAX_PIXELS
from finetune.data.inputs import Failure
from finetune.errors import UsageError
from finetune.formats.load import Runnable
from finetune.inference.feature_cache import backbone_key, identity, read_cache, write_cache
from finetune.inference.predictor import Predictor
from finetune.models.model_file import ModelFile, load_model_file, network_from
from finetune.models.registry import Network

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
    return LoadedModel(net, mf, backbone_key(net, mf.arch, mf.preprocessing), dev)


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
