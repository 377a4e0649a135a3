"""One interface for what differs per kind of head: the targets, the losses, what counts as correct, the
probabilities, the score that picks the best epoch, and the settings that do not apply. Training, evaluation and the
outputs ask the run's Task instead of testing a flag; a third kind of head is a third implementation.

SingleLabel: one softmax over the classes (an image has one class). MultiLabel: a sigmoid per class (an image has any
number of labels), decided per class at a threshold (tasks/multilabel.py)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol

from finetune.errors import UsageError
from finetune.tasks import multilabel


class Task(Protocol):
    name: str  # single-label | multi-label: what the model file records and reports show
    multi_label: bool
    best_by: str  # the val metric (a history column) that picks the best epoch

    def sample_target(self, num_classes: int) -> Callable | None:
        """sample -> its training target, for datasets (None: the class index)."""

    def targets(self, samples: Sequence, num_classes: int):
        """The training targets of samples, as one tensor."""

    def loss_weights(self, targets, num_classes: int):
        """Weights that make rarer classes (labels) count as much as common ones (--balance weighted-loss)."""

    def train_loss(self, targets, num_classes: int, weighted: bool, label_smoothing: float):
        """The training criterion (weighted: with loss_weights)."""

    def val_loss(self):
        """The criterion of the metrics a run reports (unweighted, so they compare across settings)."""

    def correct(self, logits, y) -> int:
        """Images predicted right in a batch."""

    def probabilities(self, logits, temperature: float = 1.0):
        """Per class probabilities of logits."""

    def fresh_loss(self, num_classes: int) -> float:
        """The loss a fresh (untrained) head gives: what the first step's loss is checked against."""

    def check(self, cfg) -> None:
        """Refuse settings this kind of head cannot use (UsageError)."""


class SingleLabel:
    name, multi_label, best_by = "single-label", False, "val_acc"

    def sample_target(self, num_classes: int) -> Callable | None:
        return None

    def targets(self, samples: Sequence, num_classes: int):
        import torch

        return torch.tensor([s.label for s in samples], dtype=torch.long)

    def loss_weights(self, targets, num_classes: int):
        return class_weights(targets.tolist(), num_classes)

    def train_loss(self, targets, num_classes: int, weighted: bool, label_smoothing: float):
        import torch

        weights = self.loss_weights(targets, num_classes) if weighted else None
        return torch.nn.CrossEntropyLoss(weight=weights, label_smoothing=label_smoothing)

    def val_loss(self):
        import torch

        return torch.nn.CrossEntropyLoss()

    def correct(self, logits, y) -> int:
        return int((logits.argmax(1) == y).sum())

    def probabilities(self, logits, temperature: float = 1.0):
        import torch

        return (torch.as_tensor(logits, dtype=torch.float64) / temperature).softmax(-1)

    def fresh_loss(self, num_classes: int) -> float:
        return math.log(num_classes)

    def check(self, cfg) -> None:
        pass


class MultiLabel:
    name, multi_label, best_by = "multi-label", True, "val_map"  # mAP: threshold-free, unlike exact match

    def sample_target(self, num_classes: int) -> Callable | None:
        return multilabel.MultiHot(num_classes)

    def targets(self, samples: Sequence, num_classes: int):
        return multilabel.targets(samples, num_classes)

    def loss_weights(self, targets, num_classes: int):
        return multilabel.pos_weight(targets)  # a rare label's positives weigh as much as its negatives

    def train_loss(self, targets, num_classes: int, weighted: bool, label_smoothing: float):
        return multilabel.criterion(targets if weighted else None)

    def val_loss(self):
        return multilabel.criterion()

    def correct(self, logits, y) -> int:
        return int(((logits > 0) == (y > 0.5)).all(1).sum())  # every label right at 0.5 (exact match)

    def probabilities(self, logits, temperature: float = 1.0):
        return multilabel.probabilities(logits, temperature)

    def fresh_loss(self, num_classes: int) -> float:
        return math.log(2)  # a fresh sigmoid's BCE, as a fresh two-class softmax's cross-entropy

    def check(self, cfg) -> None:
        multilabel.check_balance(cfg.balance)
        for name in ("mixup", "cutmix", "label_smoothing"):  # they mix or soften one class per image
            if getattr(cfg, name):
                raise UsageError(f"--{name.replace('_', '-')}: defined for single-label data (one class per image); "
                                 "this dataset is multi-label (leave it out)")


TASKS: dict[bool, Task] = {False: SingleLabel(), True: MultiLabel()}


def task_for(multi_label: bool) -> Task:
    """The task of a dataset or a model file."""
    return TASKS[bool(multi_label)]


def class_weights(labels: list[int], num_classes: int):
    """Inverse-frequency weights, normalised so a balanced dataset gets all ones."""
    import torch

    counts = torch.bincount(torch.tensor(labels, dtype=torch.long), minlength=num_classes).float().clamp(min=1)
    return counts.sum() / (num_classes * counts)
