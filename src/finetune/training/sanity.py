"""The field's sanity checks: the first loss against ln(classes), the update-to-weight ratio, and whether
the model can overfit a few images (`--overfit N`)."""

from __future__ import annotations

import dataclasses
import random
from typing import TypedDict

from finetune.config import TrainConfig
from finetune.data.dataset import DatasetSplit, Sample

# The update/weight ratio ||dw|| / ||w|| of one step, judged per group against a band measured on real
# ImageNet weights (benchmarks/update_ratio.py; MobileNetV2 on ants/bees, epochs 1-3): a pretrained backbone
# moves 4e-4..6e-4 of its norm per step at the default lr, 1e-2..1e-1 at 30x it, 1e-5 at 1/30 of it, the
# classic ~1e-3. A fresh head is not judged by that rule: its small random weights make every healthy step
# large (1e-2..9e-2 at the default lr; 0.16..2.7 at 30x; 1.4e-3..4.3e-3 at 1/30).
UPDATE_RATIO_BANDS = {"backbone": (1e-4, 1e-2), "head": (5e-3, 0.15)}


def initial_loss_check(loss: float, expected: float) -> dict:
    """The first batch's loss against what a fresh head should give (ln(classes) for a softmax); far off means
    broken labels, broken preprocessing or an exploding start."""
    return {"loss": loss, "expected": expected, "suspicious": not 0.5 * expected <= loss <= 2.0 * expected + 0.5}


def update_ratio(before: list, after: list) -> float | None:
    """The median over weight tensors of ||w_after - w_before|| / ||w_before|| for one step. Per tensor, as
    cs231n computes it: one pooled norm would be ruled by the few largest tensors (in some checkpoints a single
    folded-BatchNorm layer holds most of the norm)."""
    import torch

    ratios = [float((a.detach() - b).norm() / b.norm()) for a, b in zip(after, before) if b.norm() > 0]
    return float(torch.tensor(ratios).median()) if ratios else None


def update_ratio_warnings(ratios: dict, lr_now: float, lr_base: float, backbone_lr_mult: float = 1.0) -> list[dict]:
    """Advice when the lr looks far off: the backbone's ratio is judged while it trains, else the head's (feature
    extraction, --freeze-epochs), each against its own band; only while the schedule has not decayed the lr much
    (late cosine epochs are meant to be tiny). A backbone trained at a fraction of the lr on purpose (fine-tuning
    from the probe: 0.1) is judged against the band scaled by that fraction, not told to raise --lr."""
    if lr_now < 0.5 * lr_base:
        return []
    group = "backbone" if ratios.get("backbone") is not None else "head"
    ratio = ratios.get(group)
    low, high = UPDATE_RATIO_BANDS[group]
    if group == "backbone" and backbone_lr_mult > 0:
        low, high = low * min(backbone_lr_mult, 1.0), high * max(backbone_lr_mult, 1.0)
    if ratio is None or low <= ratio <= high:
        return []
    return [{"group": group, "ratio": ratio, "band": (low, high),
             "advice": "lower --lr" if ratio > high else "raise --lr"}]


def overfit_config(cfg: TrainConfig) -> TrainConfig:
    """The sanity check's settings: no augmentation, no regularisation, so memorising is possible."""
    return dataclasses.replace(cfg, augment="none", weight_decay=0.0, dropout=0.0, balance="none", patience=0,
                               mixup=0.0, cutmix=0.0, label_smoothing=0.0, erasing=0.0)


def overfit_split(split: DatasetSplit, n: int, seed: int) -> DatasetSplit:
    """n training images (spread over the classes) that are also the val set: can the model memorise them?"""
    by_class: dict[int, list[Sample]] = {}
    for s in split.train:
        by_class.setdefault(s.label, []).append(s)
    rng = random.Random(seed)
    for items in by_class.values():
        rng.shuffle(items)
    chosen: list[Sample] = []
    while len(chosen) < n and any(by_class.values()):  # round-robin over classes
        for label in sorted(by_class):
            if by_class[label] and len(chosen) < n:
                chosen.append(by_class[label].pop())
    chosen.sort(key=lambda s: s.path)
    return dataclasses.replace(split, train=chosen, val=list(chosen), layout=f"overfit check on {len(chosen)} images")


class OverfitVerdict(TypedDict):
    """The sanity check's answer (Run.sanity): could the model memorise the images it trained on?"""

    passed: bool  # 100 % reached
    epoch: int | None  # the first epoch at 100 %
    best_acc: float  # the best accuracy on them
    images: int  # how many


def overfit_verdict(history: list[dict], images: int) -> OverfitVerdict:
    """Did the model reach 100 % on the images it trained on (train mode as it learns, or the eval pass)?"""
    reached = [r["epoch"] for r in history if r["train_acc"] == 1.0 or r["val_acc"] == 1.0]
    best = max((max(r["train_acc"], r["val_acc"]) for r in history), default=0.0)
    return {"passed": bool(reached), "epoch": reached[0] if reached else None, "best_acc": best, "images": images}
