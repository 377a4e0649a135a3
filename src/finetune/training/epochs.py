"""One epoch of training and validation: on augmented images through the whole model, or on cached
backbone features through the head alone. Both return the epoch's metrics and keep the val logits."""

from __future__ import annotations

from typing import Protocol

from finetune._util import ddp as dist
from finetune.data.dataset import DatasetSplit
from finetune.data.images import ImageDataset, collate
from finetune.data.preprocessing import Preprocessing
from finetune.errors import DatasetError
from finetune.tasks.base import class_weights
from finetune.training.trainer import Trainer


def inference_batch(device, batch_size: int) -> int:
    """Batch size for forward-only passes (validation, feature extraction).

    On CPU small batches stay in cache: resnet18 inference on this project's 2-core CPU ran at 46 img/s
    with batches of 16 and 31 img/s with 64. GPUs want large batches.
    """
    return 16 if device.type == "cpu" else max(batch_size, 128)


def make_loader(dataset, batch_size: int, shuffle: bool, workers: int, device, seed: int, sample_weights=None,
                batch_sampler=None):
    import torch

    g = torch.Generator()
    g.manual_seed(seed)
    common = {"num_workers": workers, "generator": g, "collate_fn": collate, "pin_memory": device.type == "cuda",
              "persistent_workers": workers > 0}  # no per-epoch worker start-up
    if batch_sampler is not None:  # several processes: this rank's share, in batches (distributed.EvenBatches)
        return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, **common)
    sampler = None
    if sample_weights is not None:  # --balance sampler: classes drawn equally often, with replacement
        sampler = torch.utils.data.WeightedRandomSampler(sample_weights, len(dataset), replacement=True, generator=g)
        shuffle = False
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler,
                                       drop_last=False, **common)


def evaluate(trainer: Trainer, loader, on_failed=lambda failed: None,
             logits_out: list | None = None) -> tuple[float, float, int]:
    """(summed loss, correct, images) over a loader, under inference_mode; files failing now go to on_failed.

    Sums, not means, so several processes' shares add up. logits_out, when given, receives each batch's
    logits (CPU, float32) in loader order.
    """
    import torch

    trainer.net.module.eval()
    total, loss_sum, correct = 0, 0.0, 0
    with torch.inference_mode():
        for x, y, failed in loader:
            on_failed(failed)
            if x is None:
                continue
            x, y = trainer.to_device(x, y)
            with trainer.autocast(training=False):
                logits = trainer.net.module(x).float()
            loss_sum += trainer.criterion(logits, y).item() * len(y)
            correct += trainer.task.correct(logits, y)
            total += len(y)
            if logits_out is not None:
                logits_out.append(logits.cpu())
    return loss_sum, correct, total


class Epochs(Protocol):
    """What a phase of a run trains with: ImageEpochs, FeatureEpochs or (training.probe) ProbeEpochs."""

    scheduled: bool  # SGD steps on an lr schedule; False: the probe, fitted once
    fixed_count: int | None  # the epochs it always takes (the probe: 1); None: as planned
    batches: int  # steps per epoch
    generator: object  # its random state (shuffling), saved for an exact resume
    val_logits: object | None  # the last epoch's val logits
    train_feats: object | None  # frozen-backbone features of the training images, where it has them
    probe: object | None  # the converged probe it fitted (training.probe.Probe), where it fits one

    def __call__(self, epoch: int) -> dict:
        """Train and validate one epoch: train_loss, train_acc, val_loss, val_acc."""

    def close(self) -> None:
        """Release what the epochs hold beyond memory (loader worker processes); called when the run ends."""


class ImageEpochs:
    """The general path: forward and backward through the model on augmented images.

    Under several processes, split is this rank's share (distributed.shard) and val_order the paths of the
    whole val set, the order val logits are gathered into.
    """

    def __init__(self, trainer: Trainer, split: DatasetSplit, pre: Preprocessing, cache: dict | None, workers: int,
                 train_size: int, val_order: list[str] | None = None, frozen_statistics: bool = False):
        cfg = trainer.cfg
        self.frozen_statistics = frozen_statistics  # BatchNorm keeps its running statistics (fine-tuning a probe)
        self.t, self.root, self.world = trainer, split.root, dist.current()
        self.val_paths, self.val_order = [s.path for s in split.val], val_order
        short = pre.resize_size
        target = trainer.task.sample_target(len(split.classes))
        train_ds = ImageDataset(split.train, pre.train_transform(cfg.augment, train_size, cfg.erasing), short, cache,
                                cfg.max_pixels, target)
        val_ds = ImageDataset(split.val, pre.eval_transform(), short, cache, cfg.max_pixels, target)
        labels = [s.label for s in split.train]
        weights = class_weights(labels, len(split.classes))[labels] if cfg.balance == "sampler" else None
        even = None
        if self.world.distributed:
            longest = int(dist.all_max([len(train_ds)])[0])
            even = dist.EvenBatches(len(train_ds), -(-longest // cfg.batch_size), cfg.seed, self.world.rank, weights)
        self.train_loader = make_loader(train_ds, cfg.batch_size, True, workers, trainer.device, cfg.seed, weights,
                                        even)
        self.val_loader = make_loader(val_ds, inference_batch(trainer.device, cfg.batch_size), False, workers,
                                      trainer.device, cfg.seed)
        self.batches = len(self.train_loader)
        self.generator = self.train_loader.generator  # the shuffle order; saved for an exact resume
        self.scheduled, self.fixed_count, self.train_feats, self.probe = True, None, None, None
        self.reported: set[str] = set()
        self.pending: list = []  # files failed in this rank since the last report (several processes)
        self.val_logits = None

    def endless_batches(self):
        """Endless training batches on the device, for the lr range test: (inputs, labels, module to call)."""
        t = self.t
        t.net.set_train_mode(t.frozen, self.frozen_statistics)
        while True:
            for x, y, failed in self.train_loader:
                self._failed(failed)
                if x is not None:
                    yield (*t.to_device(x, y), t.net.module)

    def close(self) -> None:
        """Shut the loaders' worker processes down now: persistent workers otherwise live as long as their loader's
        iterator, which a failed run's traceback (or an abandoned lr range test) can keep until the interpreter
        exits."""
        for loader in (self.train_loader, self.val_loader):
            if loader._iterator is not None:  # torch keeps the persistent workers' iterator here
                loader._iterator._shutdown_workers()
                loader._iterator = None

    def _failed(self, failed: list) -> None:
        """Name a file that fails mid-run (changed after the scan) once; it stays out of every batch.

        Under several processes the names are collected and rank 0 reports every rank's at the epoch's end.
        """
        new = [f for f in failed if f[0] not in self.reported]
        if new:
            self.reported.update(p for p, _ in new)
            if self.world.distributed:
                self.pending += new
            else:
                self.t.emit("skipped", files=new, root=self.root)

    def _report_failed(self) -> None:
        if self.world.distributed:
            new = [f for part in dist.all_gather(self.pending) for f in part]
            self.pending = []
            if new:
                self.t.emit("skipped", files=new, root=self.root)

    def _train(self, epoch: int) -> tuple[float, float, float]:
        import torch

        t = self.t
        frozen = t.frozen or epoch <= t.cfg.freeze_epochs
        if not t.frozen:
            t.net.freeze_backbone(frozen)  # --freeze-epochs: the backbone joins after N epochs
        t.net.set_train_mode(frozen, self.frozen_statistics)
        t.wrap()
        if self.world.distributed:  # each epoch's randomness from (seed, rank, epoch): resumable at any world size
            self.train_loader.batch_sampler.set_epoch(epoch)
            torch.manual_seed(dist.epoch_seed(t.cfg.seed, self.world.rank, epoch))
        seen, loss_sum, correct = 0, 0.0, 0
        for step, (x, y, failed) in enumerate(self.train_loader, 1):
            self._failed(failed)
            if x is not None:
                x, y = t.to_device(x, y)
            done = t.step(x, y, epoch, step, t.forward)
            if done is not None:
                seen, loss_sum, correct = seen + len(y), loss_sum + done[0] * len(y), correct + done[1]
        return tuple(dist.all_sum([seen, loss_sum, correct]))

    def __call__(self, epoch: int) -> dict:
        import torch

        seen, loss_sum, correct = self._train(epoch)
        if not seen:
            raise dist.echoed(DatasetError(f"{self.root}: no training image could be read this epoch"))
        dist.broadcast_buffers(self.t.net.module)  # every rank evaluates the model rank 0 saves
        batches: list = []
        val_loss_sum, val_correct, val_total = dist.all_sum(evaluate(self.t, self.val_loader, self._failed, batches))
        self._report_failed()
        self.val_logits = self._gather(torch.cat(batches) if batches else torch.zeros(0, self.t.num_classes))
        return {"train_loss": loss_sum / seen, "train_acc": correct / seen,
                "val_loss": val_loss_sum / max(val_total, 1), "val_acc": val_correct / max(val_total, 1)}

    def _gather(self, logits):
        """Val logits of the whole val set in val_order (one process: as they are)."""
        import torch

        if not self.world.distributed:
            return logits if len(logits) else None
        rows: dict[str, object] = {}
        complete = True
        for paths, part in dist.all_gather((self.val_paths, logits)):
            complete &= len(paths) == len(part)  # an image that failed mid-run leaves no row: positions unknown
            rows.update(zip(paths, part))
        if not complete or any(p not in rows for p in self.val_order):
            return None
        return torch.stack([rows[p] for p in self.val_order])


class FeatureEpochs:
    """Feature-extract mode: the frozen backbone ran once per image view; epochs train the head alone."""

    def __init__(self, trainer: Trainer, train_feats, train_labels, val_feats, val_labels):
        import torch

        self.t = trainer
        dev = trainer.device
        self.train_feats = train_feats.to(dev)  # [views, N, D]
        self.train_labels = train_labels.to(dev)
        self.val_feats, self.val_labels = val_feats.to(dev), val_labels.to(dev)
        self.head = trainer.net.head_module()
        self.generator = torch.Generator().manual_seed(trainer.cfg.seed)
        self.batches = -(-len(train_labels) // trainer.cfg.batch_size)
        self.val_logits = None
        self.scheduled, self.fixed_count, self.probe = True, None, None

    def close(self) -> None:
        """Nothing to release: the features are tensors."""

    def endless_batches(self):
        """Endless training batches on the device, for the lr range test: (features, labels, head)."""
        import torch

        self.head.train()
        n, bs = len(self.train_labels), self.t.cfg.batch_size
        while True:
            view = int(torch.randint(len(self.train_feats), (1,), generator=self.generator))
            idx = torch.randperm(n, generator=self.generator)[:bs].to(self.train_feats.device)
            yield self.train_feats[view][idx], self.train_labels[idx], self.head

    def _order(self, n: int):
        import torch

        if self.t.cfg.balance == "sampler":
            weights = class_weights(self.train_labels.tolist(), self.t.num_classes)[self.train_labels.cpu()]
            return torch.multinomial(weights, n, replacement=True, generator=self.generator)
        return torch.randperm(n, generator=self.generator)

    def __call__(self, epoch: int) -> dict:
        import torch

        t, bs = self.t, self.t.cfg.batch_size
        feats = self.train_feats[(epoch - 1) % len(self.train_feats)]
        order = self._order(len(self.train_labels)).to(feats.device)
        self.head.train()
        seen, loss_sum, correct = 0, 0.0, 0
        for step, start in enumerate(range(0, len(order), bs), 1):
            idx = order[start:start + bs]
            y = self.train_labels[idx]
            loss, ok = t.step(feats[idx], y, epoch, step, self.head)  # never None: features never fail
            seen, loss_sum, correct = seen + len(y), loss_sum + loss * len(y), correct + ok
        self.head.eval()
        with torch.inference_mode(), t.autocast(training=False):
            logits = self.head(self.val_feats).float()
        self.val_logits = logits.cpu()
        return {"train_loss": loss_sum / seen, "train_acc": correct / seen,
                "val_loss": t.criterion(logits, self.val_labels).item(),
                "val_acc": t.task.correct(logits, self.val_labels) / max(len(self.val_labels), 1)}
