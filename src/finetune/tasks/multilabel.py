"""Multi-label training and decisions: one sigmoid per class. Multi-hot targets, the loss (BCEWithLogitsLoss,
pos_weight under --balance), per-class thresholds fitted on the val images, and the predicted label sets.

A class's probability is sigmoid(logit / temperature); the class is predicted when it reaches the class's
threshold. Thresholds are fitted to maximise each class's F1 on val, never below THRESHOLD_FLOOR.
"""

from __future__ import annotations

from collections.abc import Sequence

from finetune.errors import UsageError

# A label is never predicted on a probability under this: on a small val set the F1-best cut of a rare class can
# fall to almost 0 (a cut below its one positive), which would predict that label on nearly every image.
THRESHOLD_FLOOR = 0.1
DEFAULT_THRESHOLD = 0.5  # a class without any positive val image keeps it (nothing to fit on)


class MultiHot:
    """sample -> float multi-hot target over num_classes (a class, not a lambda: loader workers pickle it)."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes

    def __call__(self, sample):
        import torch

        target = torch.zeros(self.num_classes)
        target[list(sample.label_set())] = 1.0
        return target


def targets(samples: Sequence, num_classes: int):
    """The [N, classes] float multi-hot matrix of samples."""
    import torch

    out = torch.zeros(len(samples), num_classes)
    for i, s in enumerate(samples):
        out[i, list(s.label_set())] = 1.0
    return out


def pos_weight(train_targets):
    """Per class negatives / positives of the training images (BCEWithLogitsLoss's pos_weight): a rare label's
    positives weigh as much as its negatives. Clamped to 1..1000 (a class with no positive gets 1)."""
    pos = train_targets.sum(0)
    neg = len(train_targets) - pos
    return (neg / pos.clamp(min=1)).clamp(1.0, 1000.0)


def criterion(train_targets=None):
    """BCEWithLogitsLoss, with pos_weight when the training targets are given (--balance weighted-loss)."""
    import torch

    weight = pos_weight(train_targets) if train_targets is not None else None
    return torch.nn.BCEWithLogitsLoss(pos_weight=weight)


def count_correct(logits, y) -> int:
    """Correct predictions in a batch: argmax for class labels; for multi-hot targets, images whose every label
    is right at probability 0.5 (exact match)."""
    if y.dim() == 2:
        return int(((logits > 0) == (y > 0.5)).all(1).sum())
    return int((logits.argmax(1) == y).sum())


def probabilities(logits, temperature: float = 1.0):
    import torch

    return torch.sigmoid(torch.as_tensor(logits, dtype=torch.float64) / temperature)


def fit_thresholds(probs, y, floor: float = THRESHOLD_FLOOR) -> list[float]:
    """Per class, the probability cut with the best F1 on (probs, y): midway between the last image predicted
    and the next one, clipped to [floor, 1 - floor]; DEFAULT_THRESHOLD for a class without positives."""
    import torch

    probs, y = torch.as_tensor(probs, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    out = []
    for c in range(probs.shape[1]):
        positives = float(y[:, c].sum())
        if positives == 0:
            out.append(DEFAULT_THRESHOLD)
            continue
        p, order = probs[:, c].sort(descending=True)
        tp = y[order, c].cumsum(0)
        k = torch.arange(1, len(p) + 1, dtype=torch.float64)
        f1 = 2 * tp / (k + positives)
        distinct = torch.ones(len(p), dtype=torch.bool)  # cut only between different probabilities
        distinct[:-1] = p[:-1] > p[1:]
        f1[~distinct] = -1
        i = int(f1.argmax())
        cut = float(p[i] + p[i + 1]) / 2 if i + 1 < len(p) else float(p[i]) / 2
        out.append(min(max(cut, floor), 1 - floor))
    return out


def decide(probs, thresholds):
    """Boolean [N, classes]: which labels are predicted."""
    import torch

    return torch.as_tensor(probs) >= torch.as_tensor(thresholds, dtype=torch.float64)


def parse_thresholds(given: Sequence[str] | None, classes: list[str], stored: list[float] | None) -> list[float]:
    """--threshold P (every class) and/or CLASS=P over the stored thresholds (0.5 where none were stored)."""
    out = list(stored) if stored else [DEFAULT_THRESHOLD] * len(classes)
    for text in given or []:
        name, _, value = text.rpartition("=")
        try:
            p = float(value)
        except ValueError:
            p = -1.0
        if not 0 < p < 1:
            raise UsageError(f"--threshold {text}: give a probability between 0 and 1, e.g. 0.4 or {classes[0]}=0.4")
        if not name:
            out = [p] * len(classes)
        elif name in classes:
            out[classes.index(name)] = p
        else:
            raise UsageError(f"--threshold {text}: no class '{name}' in the model (its classes: {', '.join(classes)})")
    return out


def check_balance(balance: str) -> None:
    """--balance sampler draws images by their class; an image with several labels has none to draw by."""
    if balance == "sampler":
        raise UsageError("--balance sampler: not defined for multi-label data (an image has several labels to draw "
                         "by); use --balance weighted-loss (BCE pos_weight per class)")


def binary_pairs(logits):
    """[N, classes] logits as N*classes two-class logits [0, z]: softmax of them is [1 - sigmoid(z), sigmoid(z)],
    so the softmax calibration tools (temperature, ECE, reliability) apply to every (image, label) decision."""
    import torch

    z = torch.as_tensor(logits, dtype=torch.float64).flatten()
    return torch.stack([torch.zeros_like(z), z], 1)


def cross_fitted_f1(probs, y) -> float:
    """Macro F1 with thresholds fitted on one half of the images and measured on the other (both ways, averaged):
    what the fitted thresholds give on images they were not fitted on."""
    import torch

    probs, y = torch.as_tensor(probs, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    halves = (torch.arange(0, len(y), 2), torch.arange(1, len(y), 2))
    if min(len(h) for h in halves) == 0:
        return float("nan")
    scores = []
    for fit, test in (halves, halves[::-1]):
        pred = decide(probs[test], fit_thresholds(probs[fit], y[fit]))
        truth = y[test] > 0.5
        tp, fp, fn = ((pred & truth).sum(0), (pred & ~truth).sum(0), (~pred & truth).sum(0))
        present = truth.sum(0) > 0
        f1 = 2 * tp / (2 * tp + fp + fn).clamp(min=1)
        scores.append(float(f1[present].double().mean()) if bool(present.any()) else float("nan"))
    return sum(scores) / 2
