"""Backbone features computed once for feature-extract mode, kept on disk so a second run reuses them.

A frozen backbone in eval mode maps a given image view to the same feature vector every epoch, so
recomputing it each epoch (as the classic recipe does) is pure waste. The linear probe is fitted on the plain
view of each image; for an SGD head with augmentation on, a few random views of each training image are
extracted and one is drawn per epoch.
"""

from __future__ import annotations

import hashlib
import json
import os

from finetune._about import __version__
from finetune._util import ddp as dist
from finetune._util.files import atomic_write, cache_dir, mark_used, trim_cache
from finetune.config import TrainConfig
from finetune.data.dataset import DatasetSplit
from finetune.data.images import ImageDataset, collate
from finetune.errors import ResourceError
from finetune.inference.feature_cache import add_rows, backbone_key
from finetune.models.weights import WeightsChoice
from finetune.training.cache import decode_for_training, drop_failed
from finetune.training.epochs import FeatureEpochs, inference_batch
from finetune.training.probe import ProbeEpochs
from finetune.training.trainer import Trainer

# Augmented views per training image: enough variety for a linear head at a fraction of the epochs' cost.
# Measured on ants/bees (MobileNetV2 ImageNet weights, 25 epochs, seeds 0/1): best val accuracy 0.961/0.967
# with 1 view, 0.967/0.974 with 2, 0.967/0.967 with 4, at 1x/1.7x/3x the extraction time.
FEATURE_VIEWS = 2


def feature_key(cfg: TrainConfig, choice: WeightsChoice, train_size: int, views, paths: list[str]) -> str:
    """Hash of everything the features depend on, file sizes and times included (an edited photo misses)."""
    files = []
    for p in paths:
        st = os.stat(p)
        files.append((os.path.abspath(p), st.st_size, st.st_mtime_ns))
    wfile = None
    if choice.path:
        st = os.stat(choice.path)
        wfile = (os.path.abspath(choice.path), st.st_size, st.st_mtime_ns)
    pre = choice.preprocessing.to_dict() | {"train_size": train_size}
    augment = cfg.augment + (f"+erasing{cfg.erasing:g}" if cfg.erasing else "")  # earlier keys stay valid
    blob = json.dumps([__version__, cfg.model, choice.label, wfile, pre, augment, views, cfg.seed, files])
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def extract(trainer: Trainer, dataset: ImageDataset, batch_size: int) -> tuple[list[str], object, list]:
    """Inputs of the head for each item of dataset -> (paths extracted, float32 [N, D] on CPU, failures).

    An image that fails now (changed after the scan) is left out and named, as in the image path.
    """
    import torch

    net, feats, paths, failures = trainer.net, [], [], []
    handle = net.head_module().register_forward_hook(lambda m, i, o: feats.append(i[0].float().cpu()))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0,
                                         collate_fn=collate)
    order = iter(s.path for s in dataset.samples)
    try:
        net.module.eval()
        with torch.inference_mode():
            for x, y, failed in loader:
                bad = {p for p, _ in failed}
                failures += failed
                paths += [p for p in (next(order) for _ in range(len(y) + len(failed))) if p not in bad]
                if x is not None:
                    with trainer.autocast(training=False):
                        net.module(trainer.to_device(x, y)[0])
    finally:
        handle.remove()
    return paths, torch.cat(feats).flatten(1) if feats else torch.zeros(0), failures


def load(key: str) -> dict | None:
    """Cached {train: [V, N, D], val: [M, D]} tensors and metadata, or None."""
    from safetensors import safe_open

    path = cache_dir() / f"{key}.safetensors"
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["finetune"])
            found = {"train": f.get_tensor("train"), "val": f.get_tensor("val"), **meta}
    except Exception:  # noqa: BLE001 - a broken cache entry is recomputed, never trusted
        return None
    mark_used(path)
    return found


def save(key: str, train, val, skipped: list) -> None:
    """Store features atomically; a cache that cannot be written only costs time next run."""
    from safetensors.torch import save_file

    meta = {"finetune": json.dumps({"skipped": skipped})}
    try:
        path = atomic_write(cache_dir() / f"{key}.safetensors", lambda tmp: save_file(
            {"train": train.contiguous(), "val": val.contiguous()}, tmp, metadata=meta))
    except ResourceError:
        return
    trim_cache(path)


def feature_epochs(trainer: Trainer, split: DatasetSplit, local: DatasetSplit, choice: WeightsChoice, workers: int,
                   emit, train_size: int, cache: dict | None = None) -> FeatureEpochs | ProbeEpochs:
    """Backbone features from the disk cache, or computed now (a few augmented views when augmenting).

    Under several processes each rank extracts its share (local) and all ranks gather the whole set; the
    head then trains identically on every rank (it is tiny next to the backbone pass). cache: images already
    decoded (and unusable files already dropped) when the run also fine-tunes after a probe.
    """
    cfg = trainer.cfg
    # The probe fits on the plain view alone, the one predict sees (the CLIP paper's protocol): augmented views
    # as extra rows cost it accuracy, measured with MobileNetV2 on ants/bees (0.967 plain; 0.935-0.948 with 2
    # augmented views over three draws) and on dog breeds (0.665 against 0.629). SGD heads draw a view per epoch.
    plain = cfg.solver == "lbfgs" or cfg.mode != "feature-extract"
    views = 1 if plain or (cfg.augment == "none" and not cfg.erasing) else min(FEATURE_VIEWS, cfg.epochs)
    paths = [s.path for s in split.train + split.val]
    key = feature_key(cfg, choice, train_size, [views, plain], paths)
    hit = load(key)
    if not dist.all_max([hit is None])[0]:  # every machine has the cache (else all compute it together)
        if cache is None:
            drop_failed(split, [tuple(x) for x in hit["skipped"]], emit, cfg.strict)
        emit("features", cached=True, views=views)
        train_feats, val_feats = hit["train"], hit["val"]
    else:
        train_feats, val_feats = _compute(trainer, split, local, choice, workers, emit, train_size, views, plain,
                                           cache)
        if dist.current().main:  # with every file of the key left out, whether decoding or extraction dropped it
            kept, why = {s.path for s in split.train + split.val}, dict(split.skipped)
            save(key, train_feats, val_feats, [[p, why.get(p, "unreadable")] for p in paths if p not in kept])
            if plain:
                _share_per_photo(trainer, choice, split, train_feats[0], val_feats)
    labels = lambda samples: trainer.task.targets(samples, len(split.classes))  # noqa: E731
    epochs = ProbeEpochs if cfg.solver == "lbfgs" or cfg.mode != "feature-extract" else FeatureEpochs
    return epochs(trainer, train_feats, labels(split.train), val_feats, labels(split.val))


def _share_per_photo(trainer: Trainer, choice: WeightsChoice, split: DatasetSplit, train_feats, val_feats) -> None:
    """The plain view's features of the run's own photos, also into the per-photo cache keyed by this backbone:
    `finetune suggest -m best.pt` of a probe run (its backbone unchanged) compares a pool with them and never runs
    the backbone on them again."""
    rows = dict(zip([s.path for s in split.train], train_feats)) | dict(zip([s.path for s in split.val], val_feats))
    add_rows(backbone_key(trainer.net, trainer.cfg.model, choice.preprocessing), rows)


def _compute(trainer, split, local, choice, workers, emit, train_size, views, plain, cache):
    import torch

    cfg, world, pre = trainer.cfg, dist.current(), choice.preprocessing
    if cache is None:
        cache = decode_for_training(split, local, pre.resize_size, workers, cfg, emit)
    emit("features", cached=False, views=views)
    bs = inference_batch(trainer.device, cfg.batch_size)
    torch.manual_seed(cfg.seed + world.rank)
    transform = pre.eval_transform() if plain else pre.train_transform(cfg.augment, train_size, cfg.erasing)
    train_ds = ImageDataset(local.train, transform, pre.resize_size, cache, cfg.max_pixels)
    runs = [extract(trainer, train_ds, bs) for _ in range(views)]
    val_paths, val_feats, val_failed = extract(trainer, ImageDataset(local.val, pre.eval_transform(), pre.resize_size,
                                                                     cache, cfg.max_pixels), bs)
    failed = {p: r for _, _, f in runs for p, r in f} | dict(val_failed)
    if world.distributed:
        failed = {p: r for part in dist.all_gather(failed) for p, r in part.items()}
    if failed:  # changed since the scan: named and left out of train/val alike, every view aligned
        for part in (split, local):
            part.train = [s for s in part.train if s.path not in failed]
            part.val = [s for s in part.val if s.path not in failed]
        drop_failed(split, list(failed.items()), emit, cfg.strict)
    train_feats = torch.stack([_rows(paths, feats, [s.path for s in local.train]) for paths, feats, _ in runs])
    val_feats = _rows(val_paths, val_feats, [s.path for s in local.val])
    if world.distributed:
        train_feats = _gather_rows([s.path for s in split.train], [s.path for s in local.train], train_feats, 1)
        val_feats = _gather_rows([s.path for s in split.val], [s.path for s in local.val], val_feats, 0)
    return train_feats, val_feats


def _rows(paths: list[str], feats, keep: list[str]):
    """The rows of feats (one per path) for the paths in keep, in keep's order."""
    import torch

    at = {p: i for i, p in enumerate(paths)}
    return feats.index_select(0, torch.tensor([at[p] for p in keep], dtype=torch.long))


def _gather_rows(order: list[str], mine: list[str], feats, dim: int):
    """Every rank's rows of feats (one per path in mine, along dim), gathered and put in order."""
    import torch

    paths, parts = [], []
    for p, f in dist.all_gather((mine, feats)):
        paths += p
        parts.append(f)
    at = {p: i for i, p in enumerate(paths)}
    return torch.cat(parts, dim).index_select(dim, torch.tensor([at[p] for p in order], dtype=torch.long))
