"""The optimiser, the schedule, mixed precision and the guarded step, shared by image and feature epochs."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

from finetune._util import ddp as dist
from finetune._util.devices import autocast_dtype
from finetune.config import TrainConfig
from finetune.errors import DivergedError, Interrupted
from finetune.events import Emit
from finetune.models.registry import Network
from finetune.tasks.base import Task
from finetune.training.sanity import initial_loss_check, update_ratio


def make_optimizer(cfg: TrainConfig, net: Network, lr: float):
    """Head at the base lr, backbone at base lr x --backbone-lr-mult (discriminative learning rates)."""
    import torch

    groups = net.parameter_groups(trainable_only=True)
    params = [{"params": groups["head"], "lr": lr}, {"params": groups["backbone"], "lr": lr * cfg.backbone_lr()}]
    params = [g for g in params if g["params"]]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)


def schedule_factor(scheduler: str, epochs: int) -> Callable[[int], float]:
    """lr / base lr after a number of completed epochs, in closed form, so that a schedule can be stretched
    when a resumed run is given more --epochs: cosine to 0 over the run, or /10 every 30 % of it."""
    if scheduler == "cosine":
        return lambda e: 0.5 * (1 + math.cos(math.pi * min(e, epochs) / epochs))
    step = max(1, round(epochs * 0.3))
    return lambda e: 0.1 ** (e // step)


def make_scheduler(cfg: TrainConfig, optimizer):
    import torch

    if cfg.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5, patience=2)
    if cfg.scheduler == "none":
        return None
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_factor(cfg.scheduler, cfg.epochs))


def batch_mixer(cfg: TrainConfig, num_classes: int):
    """--mixup / --cutmix as torchvision's MixUp / CutMix on each training batch (one of the two, drawn per batch,
    when both are on): (images, labels) -> (mixed images, soft labels); None when both are off."""
    from torchvision.transforms import v2

    mixers = ([v2.MixUp(alpha=cfg.mixup, num_classes=num_classes)] if cfg.mixup else []) + \
        ([v2.CutMix(alpha=cfg.cutmix, num_classes=num_classes)] if cfg.cutmix else [])
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)


class Trainer:
    """Everything one optimiser step needs; complete once constructed."""

    def __init__(self, cfg: TrainConfig, net: Network, device, emit: Emit, *, task: Task, images_per_step: int,
                 train_targets, num_classes: int, stop: Callable[[], int] = lambda: 0,
                 check_initial_loss: bool = True):
        import torch

        self.cfg, self.net, self.device, self.emit, self.stop = cfg, net, device, emit, stop
        self.task, self.num_classes = task, num_classes
        self.checked_initial_loss = not check_initial_loss
        self.update_ratios: dict = {"head": None, "backbone": None}
        self.frozen = cfg.mode == "feature-extract"
        # channels_last: measured 1.35x faster resnet18 training on this project's 2-core CPU too.
        self.memory_format = torch.channels_last if cfg.channels_last and device.type in ("cuda", "cpu") else None
        net.module.to(device, memory_format=self.memory_format or torch.preserve_format)
        self.amp_dtype, self.precision = autocast_dtype(device, cfg.amp)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.lr = cfg.base_lr(images_per_step)
        self.optimizer = make_optimizer(cfg, net, self.lr)
        self.scheduler = make_scheduler(cfg, self.optimizer)
        self.criterion = task.val_loss()  # for val: metrics stay comparable across these options
        self.train_criterion = task.train_loss(train_targets, num_classes, cfg.balance == "weighted-loss",
                                               cfg.label_smoothing).to(device)
        self.mix = batch_mixer(cfg, num_classes)  # soft targets from mixing work with the cross-entropy
        self.forward = net.module  # what a training step calls: the model, its compiled form, or its DDP wrapper
        if cfg.compile:
            self.forward = torch.compile(net.module)
        self._wrapped_for: tuple | None = None

    def autocast(self, training: bool = True):
        """Mixed precision for a training step; for evaluation and feature extraction only on CUDA (on a CPU they
        stay float32, so the metrics a run reports are those predict and evaluate reproduce)."""
        import torch

        if self.amp_dtype is None or (not training and self.device.type != "cuda"):
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def to_device(self, x, y):
        x = x.to(self.device, non_blocking=True)
        if self.memory_format is not None:
            x = x.contiguous(memory_format=self.memory_format)
        return x, y.to(self.device, non_blocking=True)

    def wrap(self) -> None:
        """Under several processes, DDP over the parameters that train now (it averages their gradients).

        DDP registers its hooks for the parameters that require grad when it is built, so it is built
        again when --freeze-epochs unfreezes the backbone.
        """
        if not dist.current().distributed:
            return
        from torch.nn.parallel import DistributedDataParallel

        trainable = tuple(p.requires_grad for p in self.net.module.parameters())
        if trainable != self._wrapped_for:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward = DistributedDataParallel(self.net.module, device_ids=ids)
            self._wrapped_for = trainable

    def step(self, x, y, epoch: int, step: int, forward) -> tuple[float, int] | None:
        """One optimiser step; returns (loss, correct), or None when x is None (every image of the batch failed).

        Stops on a non-finite loss or a stop request. Under several processes every rank takes part in
        each decision (stop, skip, diverged), so they all leave together at the same step.
        """
        signum, empty = dist.all_max([self.stop(), x is None])
        if signum:
            raise dist.echoed(Interrupted(int(signum)))
        if empty:
            return None
        target = y
        if self.mix is not None:  # accuracy stays measured against the images' own labels
            x, target = self.mix(x, y)
        with self.autocast():
            logits = forward(x)
            loss = self.train_criterion(logits.float(), target)
        value = loss.item()
        self.check_finite("training", value, epoch, step)
        if not self.checked_initial_loss:
            self.checked_initial_loss = True
            self.emit("initial_loss", **initial_loss_check(value, self.task.fresh_loss(self.num_classes)))
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        before = self._snapshot() if step == 1 else None  # one measured update per epoch is enough
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if before is not None:
            self.update_ratios = self._update_ratios(before)
        self.emit("batch", step=step, loss=value, size=len(y))
        return value, self.task.correct(logits, y)

    def check_finite(self, what: str, value: float, epoch: int, step: int | None = None) -> None:
        """A NaN/inf loss ends the run (exit 6) before anything is saved from it, in every process at once."""
        if dist.all_max([not math.isfinite(value)])[0]:
            lr_now = self.optimizer.param_groups[0]["lr"]
            shown = value if not math.isfinite(value) else "not finite in another process"
            where = f"epoch {epoch}, step {step}" if step is not None else f"epoch {epoch}"
            raise dist.echoed(DivergedError(
                f"training diverged: {what} loss is {shown} at {where} (lr {lr_now:.3g}); the learning rate is "
                f"too high, try --lr {lr_now / 10:.3g}"))

    def _snapshot(self) -> dict:
        return {g: [p.detach().clone() for p in ps] for g, ps in self.net.parameter_groups().items()}

    def _update_ratios(self, before: dict) -> dict:
        return {g: update_ratio(before[g], ps) for g, ps in self.net.parameter_groups().items()}

    def state(self) -> dict:
        """Optimiser, schedule and scaler state for an exact resume."""
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None}

    def load_state(self, state: dict) -> None:
        """Continue from a saved state; a cosine or step schedule follows this run's --epochs (which a resume
        may have raised), from the epochs already completed."""
        import torch

        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if isinstance(self.scheduler, torch.optim.lr_scheduler.LambdaLR):
            done = state["epoch"]
            factor = schedule_factor(self.cfg.scheduler, self.cfg.epochs)
            self.scheduler.last_epoch = done
            for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
                group["lr"] = base * factor(done)
        elif self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])

    def set_schedule_length(self, epochs: int) -> None:
        """A cosine or step schedule now spans `epochs` epochs (--time-budget planned them)."""
        import torch

        if isinstance(self.scheduler, torch.optim.lr_scheduler.LambdaLR):
            factor = schedule_factor(self.cfg.scheduler, epochs)
            self.scheduler.lr_lambdas = [factor] * len(self.scheduler.lr_lambdas)

    def schedule(self, val_acc: float) -> None:
        import torch

        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(val_acc)
        elif self.scheduler is not None:
            self.scheduler.step()
