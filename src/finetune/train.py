"""The training loop: data, model, optimiser, schedule, AMP, metrics, best-model saving, NaN guard, events."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from finetune import data as D
from finetune import distributed as dist
from finetune import models as M
from finetune.checkpoint import save_model_file, write_text_atomic
from finetune.config import TrainConfig
from finetune.errors import DivergedError, FinetuneError, ResourceError
from finetune.resume import Interrupted, save_state, set_rng_state

Emit = Callable[..., None]  # emit(event_name, **fields): the CLI renders, the library never prints

RUNS_ROOT = Path("runs")
LATEST_POINTER = RUNS_ROOT / "latest.json"
CACHE_BUDGET_BYTES = 4 * 1024**3  # decoded images kept in RAM up to this per machine; beyond it, stream from disk
CACHE_BUDGET_ENV = "FINETUNE_RAM_CACHE_GB"  # overrides it (GiB; 0 = always stream)
METRIC_FIELDS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "update_ratio_head",
                 "update_ratio_backbone", "seconds")
# A healthy step changes weights by about 1e-3 of their norm; far outside this band, the lr is suspect.
UPDATE_RATIO_BAND = (1e-4, 1e-2)

OPTIMIZERS = ("sgd", "adamw")
SCHEDULERS = ("step", "plateau", "cosine", "none")
MODES = ("finetune", "feature-extract")
BALANCE = ("none", "weighted-loss", "sampler")


@dataclass
class RunResult:
    run_dir: Path
    model_path: Path
    best_epoch: int
    best_val_acc: float
    best_val_loss: float
    history: list[dict]
    seconds: float
    classes: list[str]
    device: str


def validate(cfg: TrainConfig) -> None:
    """Reject bad options before any work (exit 2)."""

    def bad(msg: str):
        raise FinetuneError(msg, exit_code=2)

    if cfg.epochs < 1:
        bad(f"--epochs {cfg.epochs}: must be at least 1")
    if cfg.batch_size < 1:
        bad(f"--batch-size {cfg.batch_size}: must be at least 1")
    if cfg.lr is not None and not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        bad(f"--lr {cfg.lr}: must be a positive number, e.g. 0.001")
    if cfg.weight_decay < 0:
        bad(f"--weight-decay {cfg.weight_decay}: must be 0 or more")
    if not 0 <= cfg.dropout < 1:
        bad(f"--dropout {cfg.dropout}: must be in [0, 1)")
    if cfg.balance not in BALANCE:
        bad(f"--balance {cfg.balance}: choose one of {', '.join(BALANCE)}")
    if cfg.freeze_epochs < 0:
        bad(f"--freeze-epochs {cfg.freeze_epochs}: must be 0 or more")
    if cfg.backbone_lr_mult is not None and cfg.backbone_lr_mult < 0:
        bad(f"--backbone-lr-mult {cfg.backbone_lr_mult}: must be 0 or more")
    if cfg.overfit < 0:
        bad(f"--overfit {cfg.overfit}: must be a number of images, e.g. 50")
    if cfg.patience < 0:
        bad(f"--patience {cfg.patience}: must be 0 (off) or more")
    if cfg.train_size and cfg.train_size < 32:
        bad(f"--train-size {cfg.train_size}: must be 0 (automatic) or at least 32 pixels, e.g. 224")
    if cfg.folds == 1 or cfg.folds < 0:
        bad(f"--folds {cfg.folds}: must be 0 (off) or at least 2, e.g. 5")
    if cfg.folds and not 0 <= cfg.fold < cfg.folds:
        bad(f"fold {cfg.fold}: must be between 0 and {cfg.folds - 1}")
    if cfg.max_pixels < 1:
        bad(f"--max-pixels {cfg.max_pixels}: must be at least 1")
    if not 0 < cfg.val_fraction < 1:
        bad(f"--val-fraction {cfg.val_fraction}: must be between 0 and 1, e.g. 0.2")
    for value, choices, opt in ((cfg.optimizer, OPTIMIZERS, "--optimizer"), (cfg.scheduler, SCHEDULERS, "--scheduler"),
                                (cfg.mode, MODES, "--mode"), (cfg.augment, D.AUGMENTATIONS, "--augment")):
        if value not in choices:
            bad(f"{opt} {value}: choose one of {', '.join(choices)}")
    M.check_model_name(cfg.model)


def _check_world(cfg: TrainConfig, world: dist.World, device) -> None:
    """Options that need several processes, or that several processes cannot do."""
    if cfg.sync_bn and world.distributed and device.type != "cuda":
        raise dist.echoed(FinetuneError("--sync-bn: torch's SyncBatchNorm runs on GPUs only; drop it for a CPU run",
                                        exit_code=2))
    if cfg.overfit and world.distributed:
        raise dist.echoed(FinetuneError("--overfit: the sanity check runs in one process; launch it without torchrun "
                                        "or --gpus", exit_code=2))


def fold_configs(cfg: TrainConfig) -> tuple[Path, list[TrainConfig]]:
    """--folds K: the cross-validation folder and one config per fold, writing into FOLDER/fold-N/."""
    root = new_run_dir(cfg)
    return root, [dataclasses.replace(cfg, fold=i, output=str(root / f"fold-{i + 1}")) for i in range(cfg.folds)]


def summarize_folds(root: Path, results: list) -> dict:
    """Per-fold best val accuracy, their mean and sample standard deviation; written to ROOT/folds.json."""
    import statistics

    accs = [r.best_val_acc for r in results]
    folds = [{"fold": i, "model": str(r.model_path), "best_epoch": r.best_epoch, "val_acc": r.best_val_acc,
              "val_loss": r.best_val_loss, "val_images": _val_images(r.run_dir)} for i, r in enumerate(results, 1)]
    summary = {"folds": folds, "mean_val_acc": statistics.mean(accs),
               "sd_val_acc": statistics.stdev(accs) if len(accs) > 1 else 0.0,
               "images": sum(f["val_images"] for f in folds), "seconds": sum(r.seconds for r in results)}
    write_text_atomic(root / "folds.json", json.dumps(summary, indent=2))
    return summary


def _val_images(run_dir: Path) -> int:
    return json.loads((Path(run_dir) / "config.json").read_text())["val_images"]


def new_run_dir(cfg: TrainConfig) -> Path:
    """runs/<timestamp>-<model>, or --output as given."""
    if cfg.output:
        return Path(cfg.output)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = RUNS_ROOT / f"{stamp}-{cfg.model}"
    path, n = base, 2
    while path.exists():
        path, n = Path(f"{base}-{n}"), n + 1
    return path


def latest_model() -> Path:
    """The best model of the latest run, from runs/latest.json."""
    if not LATEST_POINTER.is_file():
        raise FinetuneError(f"no --model given and no {LATEST_POINTER} here; train first (`finetune train DATA`) "
                            "or pass --model PATH", exit_code=2)
    try:
        return Path(json.loads(LATEST_POINTER.read_text())["model"])
    except (ValueError, KeyError):
        raise FinetuneError(f"{LATEST_POINTER}: unreadable; pass --model PATH") from None


def _make_optimizer(cfg: TrainConfig, model, head: str, lr: float):
    """Head at the base lr, backbone at base lr x --backbone-lr-mult (discriminative learning rates)."""
    import torch

    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in trainable if n.startswith(head + ".")], "lr": lr},
              {"params": [p for n, p in trainable if not n.startswith(head + ".")], "lr": lr * cfg.backbone_lr()}]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=cfg.weight_decay)


def class_weights(labels: list[int], num_classes: int):
    """Inverse-frequency weights, normalised so a balanced dataset gets all ones."""
    import torch

    counts = torch.bincount(torch.tensor(labels), minlength=num_classes).float().clamp(min=1)
    return counts.sum() / (num_classes * counts)


def _make_scheduler(cfg: TrainConfig, optimizer):
    import torch

    s = torch.optim.lr_scheduler
    if cfg.scheduler == "step":
        return s.StepLR(optimizer, step_size=max(1, round(cfg.epochs * 0.3)), gamma=0.1)
    if cfg.scheduler == "plateau":
        return s.ReduceLROnPlateau(optimizer, mode="max", factor=0.5, patience=2)
    if cfg.scheduler == "cosine":
        return s.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    return None


def inference_batch(device, batch_size: int) -> int:
    """Batch size for forward-only passes (validation, feature extraction).

    On CPU small batches stay in cache: resnet18 inference on this project's 2-core CPU ran at 46 img/s
    with batches of 16 and 31 img/s with 64. GPUs want large batches.
    """
    return 16 if device.type == "cpu" else max(batch_size, 128)


def _loader(dataset, batch_size: int, shuffle: bool, workers: int, device, seed: int, sample_weights=None,
            batch_sampler=None):
    import torch

    g = torch.Generator()
    g.manual_seed(seed)
    common = {"num_workers": workers, "generator": g, "collate_fn": D.collate, "pin_memory": device.type == "cuda",
              "persistent_workers": workers > 0}  # no per-epoch worker start-up
    if batch_sampler is not None:  # several processes: this rank's share, in batches (distributed.EvenBatches)
        return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, **common)
    sampler = None
    if sample_weights is not None:  # --balance sampler: classes drawn equally often, with replacement
        sampler = torch.utils.data.WeightedRandomSampler(sample_weights, len(dataset), replacement=True, generator=g)
        shuffle = False
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler,
                                       drop_last=False, **common)


def evaluate(model, loader, device, criterion, autocast, memory_format=None,
             on_failed=lambda failed: None, logits_out: list | None = None) -> tuple[float, float, int]:
    """(summed loss, correct, images) over a loader, under inference_mode; files failing now go to on_failed.

    Sums, not means, so several processes' shares add up. logits_out, when given, receives each batch's
    logits (CPU, float32) in loader order.
    """
    import torch

    model.eval()
    total, loss_sum, correct = 0, 0.0, 0
    with torch.inference_mode():
        for x, y, failed in loader:
            on_failed(failed)
            if x is None:
                continue
            x, y = _to_device(x, y, device, memory_format)
            with autocast():
                logits = model(x)
            loss_sum += criterion(logits.float(), y).item() * y.numel()
            correct += (logits.argmax(1) == y).sum().item()
            total += y.numel()
            if logits_out is not None:
                logits_out.append(logits.float().cpu())
    return loss_sum, correct, total


def _to_device(x, y, device, memory_format):
    x = x.to(device, non_blocking=True)
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    return x, y.to(device, non_blocking=True)


def initial_loss_check(loss: float, num_classes: int) -> dict:
    """The first batch's loss against ln(classes), what a fresh head should give; far off means broken labels,
    broken preprocessing or an exploding start."""
    expected = math.log(num_classes)
    return {"loss": loss, "expected": expected, "suspicious": not 0.5 * expected <= loss <= 2.0 * expected + 0.5}


class _Trainer:
    """Optimiser, schedule, AMP and the guarded step, shared by image epochs and feature epochs."""

    def __init__(self, cfg: TrainConfig, model, head: str, device, emit: Emit, processes: int = 1):
        import contextlib

        import torch

        self.cfg, self.model, self.head, self.device, self.emit = cfg, model, head, device, emit
        self.stop: Callable[[], int] = lambda: 0
        self.num_classes = 0
        self.checked_initial_loss = False
        self.update_ratios: dict = {"head": None, "backbone": None}
        self.frozen = cfg.mode == "feature-extract"
        on_cuda = device.type == "cuda"
        # channels_last: measured 1.35x faster resnet18 training on this project's 2-core CPU too.
        self.memory_format = torch.channels_last if cfg.channels_last and device.type in ("cuda", "cpu") else None
        self.model = model.to(device, memory_format=self.memory_format or torch.preserve_format)
        if on_cuda:
            torch.backends.cudnn.benchmark = True
        amp_dtype = None
        if on_cuda and cfg.amp:
            amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.autocast = (lambda: torch.autocast("cuda", dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
        # processes: how many take a batch each per step; their images add up to the step's batch.
        self.lr = cfg.base_lr(processes)
        self.optimizer = _make_optimizer(cfg, model, head, self.lr)
        self.scheduler = _make_scheduler(cfg, self.optimizer)
        self.criterion = torch.nn.CrossEntropyLoss()  # for val: metrics stay comparable across --balance
        self.train_criterion = self.criterion
        self.forward = self.model  # what a training step calls: the model, or its DDP wrapper
        self._wrapped_for: tuple | None = None

    def wrap(self) -> None:
        """Under several processes, DDP over the parameters that train now (it averages their gradients).

        DDP registers its hooks for the parameters that require grad when it is built, so it is built
        again when --freeze-epochs unfreezes the backbone.
        """
        if not dist.current().distributed:
            return
        from torch.nn.parallel import DistributedDataParallel

        trainable = tuple(p.requires_grad for p in self.model.parameters())
        if trainable != self._wrapped_for:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward = DistributedDataParallel(self.model, device_ids=ids)
            self._wrapped_for = trainable

    def balance(self, labels: list[int]) -> None:
        """--balance weighted-loss: rarer classes weigh more in the training loss."""
        import torch

        if self.cfg.balance == "weighted-loss":
            weights = class_weights(labels, self.num_classes).to(self.device)
            self.train_criterion = torch.nn.CrossEntropyLoss(weight=weights)

    def step(self, x, y, epoch: int, step: int, forward) -> tuple[float, int] | None:
        """One optimiser step; returns (loss, correct), or None when x is None (every image of the batch failed).

        Stops on a non-finite loss or a stop request. Under several processes every rank takes part in
        each decision (stop, skip, diverged), so they all leave together at the same step.
        """
        import torch

        signum, empty = dist.all_max([self.stop(), x is None])
        if signum:
            raise dist.echoed(Interrupted(int(signum)))
        if empty:
            return None

        with self.autocast():
            logits = forward(x)
            loss = self.train_criterion(logits.float(), y)
        finite = bool(torch.isfinite(loss))
        if dist.all_max([not finite])[0]:
            lr_now = self.optimizer.param_groups[0]["lr"]
            value = loss.item() if not finite else "not finite in another process"
            raise dist.echoed(DivergedError(
                f"training diverged: loss is {value} at epoch {epoch}, step {step} (lr {lr_now:.3g}); "
                f"the learning rate is too high, try --lr {lr_now / 10:.3g}"
            ))
        if not self.checked_initial_loss:
            self.checked_initial_loss = True
            self.emit("initial_loss", **initial_loss_check(loss.item(), self.num_classes))
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        before = self._snapshot() if step == 1 else None  # one measured update per epoch is enough
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if before is not None:
            self.update_ratios = self._update_ratios(before)
        self.emit("batch", step=step, loss=loss.item(), size=len(y))
        return loss.item(), int((logits.argmax(1) == y).sum())

    def _groups(self) -> dict[str, list]:
        head = [p for n, p in self.model.named_parameters() if n.startswith(self.head + ".") and p.requires_grad]
        body = [p for n, p in self.model.named_parameters() if not n.startswith(self.head + ".") and p.requires_grad]
        return {"head": head, "backbone": body}

    def _snapshot(self) -> dict:
        return {g: [p.detach().clone() for p in ps] for g, ps in self._groups().items()}

    def _update_ratios(self, before: dict) -> dict:
        """Per group, the median over its weight tensors of ||w_after - w_before|| / ||w_before||, for the step
        just taken. Per tensor, as cs231n computes it: one pooled norm would be ruled by the few largest
        tensors (in some checkpoints a single folded-BatchNorm layer holds most of the norm)."""
        import torch

        out = {}
        for g, ps in self._groups().items():
            ratios = [float((p.detach() - b).norm() / b.norm()) for p, b in zip(ps, before[g]) if b.norm() > 0]
            out[g] = float(torch.tensor(ratios).median()) if ratios else None
        return out

    def state(self) -> dict:
        """Optimiser, schedule and scaler state for an exact resume."""
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None}

    def load_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])

    def schedule(self, val_acc: float) -> None:
        import torch

        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(val_acc)
        elif self.scheduler is not None:
            self.scheduler.step()


class _ImageEpochs:
    """The general path: forward and backward through the model on augmented images.

    Under several processes, split is this rank's share (distributed.shard) and val_order the paths of the
    whole val set, the order val logits are gathered into.
    """

    def __init__(self, trainer: _Trainer, split: D.DatasetSplit, pre: dict, cache: dict | None, workers: int,
                 train_size: int, val_order: list[str] | None = None):
        cfg = trainer.cfg
        self.t = trainer
        self.root = split.root
        self.world = dist.current()
        self.val_paths, self.val_order = [s.path for s in split.val], val_order
        short_side = pre["resize_size"]
        train_ds = D.ImageDataset(split.train, D.train_transform(pre, cfg.augment, train_size), short_side, cache,
                                  cfg.max_pixels)
        val_ds = D.ImageDataset(split.val, D.eval_transform(pre), short_side, cache, cfg.max_pixels)
        weights = None
        if cfg.balance == "sampler":
            weights = class_weights([s.label for s in split.train], len(split.classes))[
                [s.label for s in split.train]]
        even = None
        if self.world.distributed:
            longest = int(dist.all_max([len(train_ds)])[0])
            even = dist.EvenBatches(len(train_ds), -(-longest // cfg.batch_size), cfg.seed, self.world.rank, weights)
        self.train_loader = _loader(train_ds, cfg.batch_size, True, workers, trainer.device, cfg.seed, weights, even)
        self.val_loader = _loader(val_ds, inference_batch(trainer.device, cfg.batch_size), False, workers,
                                  trainer.device, cfg.seed)
        self.batches = len(self.train_loader)
        self.generator = self.train_loader.generator  # the shuffle order; saved for an exact resume
        self.reported: set[str] = set()
        self.pending: list = []  # files failed in this rank since the last report (several processes)

    def endless_batches(self):
        """Endless training batches on the device, for the lr range test: (inputs, labels, module to call)."""
        t = self.t
        M.set_train_mode(t.model, t.head, t.frozen)
        while True:
            for x, y, failed in self.train_loader:
                self._failed(failed)
                if x is not None:
                    yield (*_to_device(x, y, t.device, t.memory_format), t.model)

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

    def __call__(self, epoch: int) -> dict:
        import torch

        t = self.t
        frozen = t.frozen or epoch <= t.cfg.freeze_epochs
        for name, p in t.model.named_parameters():  # --freeze-epochs: the backbone joins after N epochs
            if not t.frozen and not name.startswith(t.head + "."):
                p.requires_grad = not frozen
        M.set_train_mode(t.model, t.head, frozen)
        t.wrap()
        if self.world.distributed:  # each epoch's randomness from (seed, rank, epoch): resumable at any world size
            self.train_loader.batch_sampler.set_epoch(epoch)
            torch.manual_seed(dist.epoch_seed(t.cfg.seed, self.world.rank, epoch))
        seen, loss_sum, correct = 0, 0.0, 0
        for step, (x, y, failed) in enumerate(self.train_loader, 1):
            self._failed(failed)
            if x is not None:
                x, y = _to_device(x, y, t.device, t.memory_format)
            done = t.step(x, y, epoch, step, t.forward)
            if done is not None:
                seen, loss_sum, correct = seen + len(y), loss_sum + done[0] * len(y), correct + done[1]
        seen, loss_sum, correct = dist.all_sum([seen, loss_sum, correct])
        if not seen:
            raise dist.echoed(FinetuneError(f"{self.root}: no training image could be read this epoch", exit_code=3))
        dist.broadcast_buffers(t.model)  # every rank evaluates the model rank 0 saves
        batches: list = []
        val_totals = evaluate(t.model, self.val_loader, t.device, t.criterion, t.autocast, t.memory_format,
                              self._failed, batches)
        val_loss_sum, val_correct, val_total = dist.all_sum(val_totals)
        self._report_failed()
        self.val_logits = self._gather(torch.cat(batches) if batches else torch.zeros(0, t.num_classes))
        return {"train_loss": loss_sum / seen, "train_acc": correct / seen, "val_loss": val_loss_sum / max(val_total, 1),
                "val_acc": val_correct / max(val_total, 1)}

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


class _FeatureEpochs:
    """Feature-extract mode: the frozen backbone runs once per image view; epochs train the head alone."""

    def __init__(self, trainer: _Trainer, train_feats, train_labels, val_feats, val_labels):
        import torch

        self.t = trainer
        dev = trainer.device
        self.train_feats = train_feats.to(dev)  # [views, N, D]
        self.train_labels = train_labels.to(dev)
        self.val_feats, self.val_labels = val_feats.to(dev), val_labels.to(dev)
        self.head_module = trainer.model.get_submodule(trainer.head)
        self.generator = torch.Generator().manual_seed(trainer.cfg.seed)
        self.batches = -(-len(train_labels) // trainer.cfg.batch_size)

    def endless_batches(self):
        """Endless training batches on the device, for the lr range test: (features, labels, head)."""
        import torch

        self.head_module.train()
        n, bs = len(self.train_labels), self.t.cfg.batch_size
        while True:
            view = int(torch.randint(len(self.train_feats), (1,), generator=self.generator))
            idx = torch.randperm(n, generator=self.generator)[:bs].to(self.train_feats.device)
            yield self.train_feats[view][idx], self.train_labels[idx], self.head_module

    def __call__(self, epoch: int) -> dict:
        import torch

        t, bs = self.t, self.t.cfg.batch_size
        feats = self.train_feats[(epoch - 1) % len(self.train_feats)]
        n = len(self.train_labels)
        if t.cfg.balance == "sampler":
            weights = class_weights(self.train_labels.tolist(), t.num_classes)[self.train_labels.cpu()]
            order = torch.multinomial(weights, n, replacement=True, generator=self.generator).to(feats.device)
        else:
            order = torch.randperm(n, generator=self.generator).to(feats.device)
        self.head_module.train()
        seen, loss_sum, correct = 0, 0.0, 0
        for step, start in enumerate(range(0, len(order), bs), 1):
            idx = order[start:start + bs]
            y = self.train_labels[idx]
            loss, ok = t.step(feats[idx], y, epoch, step, self.head_module)  # never None: features never fail
            seen, loss_sum, correct = seen + len(y), loss_sum + loss * len(y), correct + ok
        self.head_module.eval()
        with torch.inference_mode(), t.autocast():
            logits = self.head_module(self.val_feats).float()
        val_loss = t.criterion(logits, self.val_labels).item()
        val_acc = (logits.argmax(1) == self.val_labels).float().mean().item()
        self.val_logits = logits.cpu()
        return {"train_loss": loss_sum / seen, "train_acc": correct / seen, "val_loss": val_loss, "val_acc": val_acc}


def _decode(split: D.DatasetSplit, local: D.DatasetSplit, short_side: int, workers: int, cfg: TrainConfig,
            emit: Emit) -> dict | None:
    """Decode this rank's images (local; all of split in one process) once into RAM when the budget allows,
    else check each decodes (at reduced size).

    Either way a file that fails is named and dropped before epoch 1 (or stops the run under --strict),
    from every rank's view alike.
    """
    world = dist.current()
    paths = [s.path for s in local.train + local.val]
    budget = _cache_budget() // world.local_size  # the processes of one machine share its memory
    fits = D.estimate_cache_bytes(len(paths), short_side) <= budget
    emit("decode_start", total=len(paths), keep=fits, budget_gb=budget * world.local_size / 1024**3)
    # Checking at 1/8 scale is enough to catch truncation; the real decode happens in the loader.
    # Nothing else runs yet: decode on every core unless -j says otherwise.
    threads = max(1, (os.cpu_count() or 1) // world.local_size) if cfg.workers < 0 else max(1, workers)
    cache, failed = D.decode_all(paths, short_side if fits else 32, threads,
                                 lambda n: emit("decode_advance", n=n), keep=fits, max_pixels=cfg.max_pixels)
    if world.distributed:
        failed = [f for part in dist.all_gather(failed) for f in part]
        bad = {p for p, _ in failed}
        local.train = [s for s in local.train if s.path not in bad]
        local.val = [s for s in local.val if s.path not in bad]
    _drop(split, failed, emit, cfg.strict)
    return cache if fits else None


def _cache_budget() -> int:
    """Bytes of decoded images one machine may keep in RAM: $FINETUNE_RAM_CACHE_GB, else 4 GiB."""
    text = os.environ.get(CACHE_BUDGET_ENV)
    if text is None:
        return CACHE_BUDGET_BYTES
    try:
        gb = float(text)
    except ValueError:
        gb = -1.0
    if not (gb >= 0 and math.isfinite(gb)):
        raise dist.echoed(FinetuneError(f"{CACHE_BUDGET_ENV}={text!r}: must be a number of GiB, e.g. 8 (0 = always "
                                        "stream images from disk)", exit_code=2))
    return int(gb * 1024**3)


def _drop(split: D.DatasetSplit, failed: list, emit: Emit, strict: bool) -> None:
    if failed:
        bad = {p for p, _ in failed}
        split.skipped.extend(failed)
        split.train = [s for s in split.train if s.path not in bad]
        split.val = [s for s in split.val if s.path not in bad]
        emit("skipped", files=failed, root=split.root)
    if strict and split.skipped:  # every rank sees the same failures, so all raise this together
        path, reason = split.skipped[0]
        raise dist.echoed(FinetuneError(
            f"--strict: {len(split.skipped)} file(s) cannot be used, e.g. {os.path.relpath(path, split.root)}: "
            f"{reason}; fix or remove them, or drop --strict", exit_code=3))
    if not split.train or not split.val:
        raise dist.echoed(FinetuneError(
            f"{split.root}: no readable images left in {'train' if not split.train else 'val'}", exit_code=3))


def _feature_epochs(trainer: _Trainer, split, local, choice, pre, workers: int, emit: Emit,
                    train_size: int) -> _FeatureEpochs:
    """Backbone features from the disk cache, or computed now (a few augmented views when augmenting).

    Under several processes each rank extracts its share (local) and all ranks gather the whole set; the
    head then trains identically on every rank (it is tiny next to the backbone pass).
    """
    import torch

    from finetune import features as F

    cfg = trainer.cfg
    world = dist.current()
    views = 1 if cfg.augment == "none" else min(F.FEATURE_VIEWS, cfg.epochs)
    key = F.feature_key(cfg.model, choice.label, choice.path, pre | {"train_size": train_size}, cfg.augment, views,
                        cfg.seed, [s.path for s in split.train + split.val])
    hit = F.load(key)
    if not dist.all_max([hit is None])[0]:  # every machine has the cache (else all compute it together)
        _drop(split, [tuple(x) for x in hit["skipped"]], emit, cfg.strict)
        emit("features", cached=True, views=views)
        train_feats, val_feats = hit["train"], hit["val"]
    else:
        skipped_before = len(split.skipped)
        cache = _decode(split, local, pre["resize_size"], workers, cfg, emit)
        emit("features", cached=False, views=views)
        short_side = pre["resize_size"]
        bs = inference_batch(trainer.device, cfg.batch_size)
        args = (trainer.model, trainer.head)
        kw = {"device": trainer.device, "batch_size": bs, "memory_format": trainer.memory_format,
              "autocast": trainer.autocast}
        torch.manual_seed(cfg.seed + world.rank)
        train_ds = D.ImageDataset(local.train, D.train_transform(pre, cfg.augment, train_size), short_side, cache,
                                  cfg.max_pixels)
        train_feats = torch.stack([F.extract(*args, train_ds, **kw) for _ in range(views)])
        val_ds = D.ImageDataset(local.val, D.eval_transform(pre), short_side, cache, cfg.max_pixels)
        val_feats = F.extract(*args, val_ds, **kw)
        if world.distributed:
            train_feats = _gather_rows([s.path for s in split.train], [s.path for s in local.train], train_feats, 1)
            val_feats = _gather_rows([s.path for s in split.val], [s.path for s in local.val], val_feats, 0)
        if world.main:
            F.save(key, train_feats, val_feats, [list(x) for x in split.skipped[skipped_before:]])
    labels = lambda samples: torch.tensor([s.label for s in samples])  # noqa: E731
    return _FeatureEpochs(trainer, train_feats, labels(split.train), val_feats, labels(split.val))


def _gather_rows(order: list[str], mine: list[str], feats, dim: int):
    """Every rank's rows of feats (one per path in mine, along dim), gathered and put in order."""
    import torch

    paths, parts = [], []
    for p, f in dist.all_gather((mine, feats)):
        paths += p
        parts.append(f)
    at = {p: i for i, p in enumerate(paths)}
    return torch.cat(parts, dim).index_select(dim, torch.tensor([at[p] for p in order], dtype=torch.long))


def overfit_config(cfg: TrainConfig) -> TrainConfig:
    """The sanity check's settings: no augmentation, no regularisation, so memorising is possible."""
    return dataclasses.replace(cfg, augment="none", weight_decay=0.0, dropout=0.0, balance="none", patience=0)


def overfit_split(split: D.DatasetSplit, n: int, seed: int) -> D.DatasetSplit:
    """n training images (spread over the classes) that are also the val set: can the model memorise them?"""
    import random

    by_class: dict[int, list[D.Sample]] = {}
    for s in split.train:
        by_class.setdefault(s.label, []).append(s)
    rng = random.Random(seed)
    for items in by_class.values():
        rng.shuffle(items)
    chosen: list[D.Sample] = []
    while len(chosen) < n and any(by_class.values()):  # round-robin over classes
        for label in sorted(by_class):
            if by_class[label] and len(chosen) < n:
                chosen.append(by_class[label].pop())
    return dataclasses.replace(split, train=sorted(chosen, key=lambda s: s.path),
                               val=sorted(chosen, key=lambda s: s.path), layout=f"overfit check on {len(chosen)} images")


def accepts_size(model, size: int) -> bool:
    """Does the model run on size x size inputs? (ViT-style models need the one size they were built for.)"""
    import torch

    was_training = model.training
    try:
        with torch.inference_mode():
            model.eval()(torch.zeros(1, 3, size, size, device=next(model.parameters()).device))
        return True
    except Exception:  # noqa: BLE001 - any failure means "not at this size"
        return False
    finally:
        model.train(was_training)


def train_crop(cfg: TrainConfig, pre: dict, model) -> int:
    """The training crop size: --train-size, else 80 % of the eval crop (to a multiple of 16) in finetune mode.

    A random resized crop makes objects look larger than the eval center crop does, so training on a
    smaller crop than the eval one matches apparent object sizes better (Touvron et al. 2019, "Fixing
    the train-test resolution discrepancy"); torchvision's own reference recipe trains at 176 for a 224
    eval for that reason. It also costs about 40 % less compute per step. Feature-extract mode computes
    each view once, so there is nothing to save and the eval crop is kept; so is it without augmentation.
    """
    crop = pre["crop_size"]
    if cfg.train_size:
        if cfg.train_size != crop and not accepts_size(model, cfg.train_size):
            raise FinetuneError(f"--train-size {cfg.train_size}: {cfg.model} only runs on {crop}x{crop} inputs; "
                                f"use --train-size {crop} or leave it out", exit_code=2)
        return cfg.train_size
    if cfg.mode != "finetune" or cfg.augment == "none":
        return crop
    size = max(32, round(crop * 0.8 / 16) * 16)
    return size if accepts_size(model, size) else crop


@dataclass
class Prepared:
    """Everything a training loop (or an lr range test) needs, set up once."""

    device: object
    split: D.DatasetSplit
    choice: M.WeightsChoice
    pre: dict
    model: object
    head: str
    trainer: _Trainer
    epochs: object  # _ImageEpochs or _FeatureEpochs
    train_size: int  # the training crop (the eval crop is pre["crop_size"])


def prepare(cfg: TrainConfig, emit: Emit = lambda *a, **k: None, stop: Callable[[], int] = lambda: 0,
            resume: dict | None = None) -> Prepared:
    """Validate options, read the data, build the model with its weights, decode or extract features."""
    import torch

    from finetune import features as F

    validate(cfg)
    world = dist.init(cfg.device)
    emit = emit if world.main else _silent
    device = dist.device(cfg.device)
    _check_world(cfg, world, device)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.manual_seed(cfg.seed)

    # Scanned once, by rank 0; every rank gets the same split.
    split = dist.on_main(lambda: D.find_dataset(cfg.data, cfg.val_fraction, cfg.seed, cfg.folds, cfg.fold))
    if cfg.overfit:
        split = overfit_split(split, cfg.overfit, cfg.seed)
    if len(split.train) < world.size:
        raise dist.echoed(FinetuneError(f"{cfg.data}: {len(split.train)} training images for {world.size} processes; "
                                        "use fewer processes", exit_code=3))
    # This rank's share of the images: it decodes, caches and trains on these only.
    local = dataclasses.replace(split, train=dist.shard(split.train), val=dist.shard(split.val)) \
        if world.distributed else split
    if resume is not None and resume["classes"] != split.classes:
        raise FinetuneError(f"{cfg.data}: classes {split.classes} differ from the resumed run's "
                            f"{resume['classes']}; resume on the same data or start a new run", exit_code=3)
    choice = M.resolve_weights(cfg.model, cfg.weights)
    pre = choice.preprocessing
    emit("dataset", split=split, device=str(device), weights=choice.label, processes=world.size)
    if split.skipped:
        emit("skipped", files=list(split.skipped), root=split.root)

    # A resumed run gets its weights from the state; no download needed. Rank 0 downloads, then the others read.
    state = dist.main_first(lambda: M.load_pretrained_state(choice)) if resume is None else None
    model, head = M.build_model(cfg.model, len(split.classes), cfg.dropout, state)
    if cfg.sync_bn and world.distributed:  # BatchNorm statistics over the global batch (same state_dict keys)
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if resume is not None:
        model.load_state_dict(resume["model"])
    workers = D.default_workers(world.local_size) if cfg.workers < 0 else cfg.workers
    if cfg.mode == "feature-extract":
        M.freeze_backbone(model, head)
    use_features = cfg.mode == "feature-extract" and F.head_gives_logits(model, head, pre["crop_size"])
    # Feature-extract mode trains the head on every rank alike, one batch per step; images split over ranks.
    trainer = _Trainer(cfg, model, head, device, emit, 1 if use_features else world.size)
    trainer.stop = stop
    trainer.num_classes = len(split.classes)
    trainer.checked_initial_loss = resume is not None
    trainer.balance([s.label for s in split.train])
    train_size = train_crop(cfg, pre, model)
    if use_features:
        epochs = _feature_epochs(trainer, split, local, choice, pre, workers, emit, train_size)
    else:
        cache = _decode(split, local, pre["resize_size"], workers, cfg, emit)
        # Decoded tensors live in this process and transforms on them are cheap: no worker processes then.
        epochs = _ImageEpochs(trainer, local, pre, cache, 0 if cache is not None else workers, train_size,
                              [s.path for s in split.val])

    return Prepared(device, split, choice, pre, model, head, trainer, epochs, train_size)


def run_training(cfg: TrainConfig, emit: Emit = lambda *a, **k: None, stop: Callable[[], int] = lambda: 0,
                 resume: dict | None = None) -> RunResult:
    """Train cfg.model on cfg.data; write the run folder; return where the best model is.

    stop() returning a signal number ends training after the current step (Interrupted). resume is
    a state from load_resume_state: training continues after its last completed epoch.
    """
    import torch

    t_start = time.perf_counter()
    p = prepare(cfg, emit, stop, resume)
    device, split, choice, pre, model, head, trainer, epochs = (p.device, p.split, p.choice, p.pre, p.model, p.head,
                                                                p.trainer, p.epochs)
    world = dist.current()
    main = world.main  # under several processes, rank 0 alone reports and writes files
    emit = emit if main else _silent
    run_dir = dist.on_main(lambda: _make_run_dir(cfg))
    model_path = run_dir / "best.pt"
    config = cfg.to_dict() | {"lr_used": trainer.lr, "train_size_used": p.train_size, "classes": split.classes,
                              "layout": split.layout, "train_images": len(split.train), "val_images": len(split.val),
                              "device": str(device), "base_weights": choice.label, "preprocessing": pre,
                              "processes": world.size}
    history: list[dict] = []
    # best also carries what the run's pictures need: filters before training and at the best epoch, val logits.
    best = {"epoch": 0, "val_acc": -1.0, "val_loss": math.inf, "filters_before": M.first_conv_weight(model)}
    first = 1
    if resume is not None:
        trainer.load_state(resume)
        if not world.distributed:  # several processes seed each epoch from (seed, rank, epoch) instead
            set_rng_state(epochs, resume["rng"])
        history, best, first = list(resume["history"]), dict(resume["best"]), resume["epoch"] + 1
    elif main:
        write_text_atomic(run_dir / "config.json", json.dumps(config, indent=2))
    emit("start", run_dir=run_dir, epochs=cfg.epochs, batches=epochs.batches, lr=trainer.lr, first=first,
         sizes=(p.train_size, pre["crop_size"]))

    try:
        for epoch in range(first, cfg.epochs + 1):
            t0 = time.perf_counter()
            emit("epoch_start", epoch=epoch)
            lr_used = trainer.optimizer.param_groups[0]["lr"]
            row = {"epoch": epoch, **epochs(epoch), "lr": lr_used,
                   "update_ratio_head": trainer.update_ratios["head"],
                   "update_ratio_backbone": trainer.update_ratios["backbone"]}
            # Judged only while the schedule has not decayed the lr much: late cosine epochs are meant to be tiny.
            for group in ("head", "backbone") if lr_used >= 0.5 * trainer.lr else ():
                ratio = row[f"update_ratio_{group}"]
                if ratio is not None and not UPDATE_RATIO_BAND[0] <= ratio <= UPDATE_RATIO_BAND[1]:
                    advice = "lower --lr" if ratio > UPDATE_RATIO_BAND[1] else "raise --lr"
                    emit("update_ratio", group=group, ratio=ratio, advice=advice)
            trainer.schedule(row["val_acc"])
            row["seconds"] = time.perf_counter() - t0
            history.append(row)
            improved = row["val_acc"] > best["val_acc"] or (
                row["val_acc"] == best["val_acc"] and row["val_loss"] < best["val_loss"])
            if improved:
                best |= {"epoch": epoch, "val_acc": row["val_acc"], "val_loss": row["val_loss"],
                         "filters": M.first_conv_weight(model), "val_logits": epochs.val_logits}
            if improved and main:
                save_model_file(
                    model_path, arch=cfg.model, head=head, dropout=cfg.dropout,
                    state_dict=M.plain_state_dict(model, head), classes=split.classes, base_weights=choice.label,
                    preprocessing=pre, metrics={"best_epoch": epoch, "val_acc": row["val_acc"],
                                                "val_loss": row["val_loss"], "train_acc": row["train_acc"],
                                                "train_loss": row["train_loss"]},
                    config=config,
                )
                _point_latest(run_dir, model_path)
            if main:
                _write_metrics(run_dir, history)
                save_state(run_dir, epoch, model, trainer, epochs, history, best, cfg, split.classes)
            emit("epoch_end", row=row, improved=improved)
            if cfg.patience and epoch - best["epoch"] >= cfg.patience:
                emit("early_stop", epoch=epoch, best_epoch=best["epoch"], patience=cfg.patience)
                break
    except Interrupted as e:
        e.run_dir = run_dir
        raise
    except torch.OutOfMemoryError:
        raise ResourceError(f"out of {device.type.upper()} memory at batch size {cfg.batch_size}; try -b "
                            f"{max(1, cfg.batch_size // 2)} (the best model so far is in {run_dir})") from None

    seconds = time.perf_counter() - t_start
    result = RunResult(run_dir=run_dir, model_path=model_path, best_epoch=best["epoch"], best_val_acc=best["val_acc"],
                       best_val_loss=best["val_loss"], history=history, seconds=seconds, classes=split.classes,
                       device=str(device))
    if not main:
        return result
    summary = {"best_epoch": result.best_epoch, "best_val_acc": result.best_val_acc,
               "best_val_loss": result.best_val_loss, "seconds": seconds, "model": str(model_path),
               "skipped": [{"path": p, "reason": r} for p, r in split.skipped]}
    val_samples = split.val
    logits = best.get("val_logits")
    if logits is not None and len(logits) == len(val_samples):
        from finetune.evaluate import classification_report

        summary["val_metrics"] = classification_report([s.label for s in val_samples], logits.argmax(1).tolist(),
                                                       split.classes)
        summary["calibration"] = _calibration(cfg, logits, [s.label for s in val_samples], model_path, emit)
    write_text_atomic(run_dir / "results.json", json.dumps(summary, indent=2))
    _pictures(run_dir, split, best, history, config, summary, emit)
    return result


def _make_run_dir(cfg: TrainConfig) -> Path:
    run_dir = new_run_dir(cfg)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ResourceError(f"{run_dir}: cannot create the run folder ({e.strerror}); choose another with -o") \
            from None
    prune_stale_temp_files(run_dir)
    return run_dir


def _silent(*args, **kwargs) -> None:
    """The emit of ranks other than 0: they train, rank 0 reports."""


def _calibration(cfg: TrainConfig, logits, labels: list[int], model_path: Path, emit: Emit) -> dict:
    """The best epoch's calibration on the val set: ECE, reliability bins; with --calibrate, also a fitted
    temperature, stored in the model file (predictions then use softmax(logits / T))."""
    from finetune import calibrate as C
    from finetune.checkpoint import update_model_file

    temperature = C.fit_temperature(logits, labels) if cfg.calibrate else 1.0
    out = C.calibration_summary(logits, labels, temperature) | {"fitted": cfg.calibrate}
    if cfg.calibrate:
        update_model_file(model_path, temperature=temperature)
        emit("calibrated", temperature=temperature, ece_before=out["ece_before"], ece_after=out["ece_after"],
             images=len(labels))
    return out


def _pictures(run_dir: Path, split: D.DatasetSplit, best: dict, history: list[dict], config: dict, summary: dict,
              emit: Emit) -> None:
    """Curves, confusion matrix, confident mistakes, first-layer filters and report.html. Failing here only
    warns: the model is already safe on disk."""
    n = len(split.classes)
    confusion = summary.get("val_metrics", {}).get("confusion_matrix", [[0] * n for _ in range(n)])
    wrong = []
    if "val_metrics" in summary:
        temperature = summary.get("calibration", {}).get("temperature", 1.0)
        confidence, predicted = (best["val_logits"] / temperature).softmax(1).max(1)
        for s, p, c in zip(split.val, predicted.tolist(), confidence.tolist()):
            if p != s.label:
                wrong.append({"path": s.path, "true": split.classes[s.label], "predicted": split.classes[p],
                              "probability": c})
        wrong = sorted(wrong, key=lambda w: -w["probability"])[:16]
    try:
        from finetune.report import write_report

        paths = write_report(run_dir, history=history, classes=split.classes, confusion=confusion, wrong=wrong,
                             filters_before=best.get("filters_before"), filters_after=best.get("filters"),
                             config=config, summary=summary)
    except Exception as e:  # noqa: BLE001 - pictures are a bonus; never lose a finished run over them
        emit("report_failed", reason=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return
    emit("report", paths=paths)


def _point_latest(run_dir: Path, model_path: Path) -> None:
    write_text_atomic(LATEST_POINTER, json.dumps({"run_dir": str(run_dir.resolve()),
                                                  "model": str(model_path.resolve())}, indent=2))


def _write_metrics(run_dir: Path, history: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, lineterminator="\n")
    w.writeheader()
    for row in history:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else ("" if v is None else v)) for k, v in row.items()})
    write_text_atomic(run_dir / "metrics.csv", buf.getvalue())


def prune_stale_temp_files(folder: str | os.PathLike) -> None:
    """Remove temp files a killed run left behind."""
    from finetune.checkpoint import TEMP_PREFIX

    folder = Path(folder)
    if folder.is_dir():
        for p in folder.glob(TEMP_PREFIX + "*"):
            p.unlink(missing_ok=True)
