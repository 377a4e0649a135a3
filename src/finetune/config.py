"""TrainConfig: every training default listed once, with why."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class TrainConfig:
    data: str
    model: str = "resnet18"  # small, fast, strong on small datasets
    weights: str = "DEFAULT"  # ImageNet-pretrained: transfer learning is the point
    mode: str = "finetune"  # finetune | feature-extract
    dropout: float = 0.0  # before the new head; 0 disables
    optimizer: str = "sgd"  # sgd (Nesterov momentum) | adamw
    lr: float | None = None  # None: per-optimizer default scaled to the batch size
    momentum: float = 0.9
    weight_decay: float = 1e-4  # L2; the torchvision reference recipe's value
    scheduler: str = "cosine"  # step | plateau | cosine | none
    epochs: int = 10  # enough for a pretrained backbone on a small dataset
    batch_size: int = 32  # larger than the tutorial's 4: fewer, better-utilised steps
    workers: int = -1  # -1: min(4, cpu count - 1)
    augment: str = "standard"  # none | light | standard
    train_size: int = 0  # training crop in pixels; 0: 80 % of the eval crop in finetune mode (see train_crop)
    val_fraction: float = 0.2  # used only when DATA has no val folder
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    amp: bool = True  # bf16/fp16 autocast on CUDA only
    channels_last: bool = True  # on CUDA only
    output: str | None = None  # run folder; default runs/<timestamp>-<model>
    strict: bool = False  # any unusable file stops the run before epoch 1 instead of being skipped
    max_pixels: int = 178_956_970  # refuse larger images from the header (Pillow's bomb threshold)
    balance: str = "none"  # none | weighted-loss | sampler: counter class imbalance
    freeze_epochs: int = 0  # train the head alone this many epochs first, then everything
    backbone_lr_mult: float | None = None  # backbone lr = lr x this; None: 0.1 with --freeze-epochs, else 1
    overfit: int = 0  # sanity check: train and evaluate on this many training images; 0 = a normal run
    patience: int = 0  # early stopping: end after this many epochs without a better val accuracy; 0 = off
    folds: int = 0  # k-fold cross-validation: 0 = off; else this run trains fold `fold` (0-based) of k
    fold: int = 0
    calibrate: bool = False  # fit a softmax temperature on the val set after training (stored in the model)
    deterministic: bool = False  # deterministic kernels: bitwise-repeatable runs and resumes on CPU
    sync_bn: bool = False  # several GPU processes: BatchNorm statistics over the global batch, not each GPU's share

    def to_dict(self) -> dict:
        """Plain-types view, safe to store inside a model file."""
        return dataclasses.asdict(self)

    def backbone_lr(self) -> float:
        """Multiplier of the backbone's learning rate relative to the head's."""
        if self.backbone_lr_mult is not None:
            return self.backbone_lr_mult
        return 0.1 if self.freeze_epochs else 1.0

    def base_lr(self, processes: int = 1) -> float:
        """The learning rate actually used: explicit, or a default linearly scaled to the batch size summed
        over the processes (each of which takes batch_size images per step)."""
        if self.lr is not None:
            return self.lr
        # Linear scaling rule from the tutorial's (batch 4, lr 1e-3) SGD setting.
        per_sample = {"sgd": 1e-3 / 4, "adamw": 1e-4 / 32}[self.optimizer]
        return per_sample * self.batch_size * processes
