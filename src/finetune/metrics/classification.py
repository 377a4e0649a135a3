"""Honest metrics from predictions: accuracy with a Wilson interval, per-class precision/recall/F1, the
confusion matrix, and the most confidently wrong images."""

from __future__ import annotations

import math
import os
from typing import TypedDict

Z95 = 1.959964  # two-sided 95 % normal quantile


class ClassificationReport(TypedDict):
    """Single-label metrics of predictions against the truth."""

    images: int
    correct: int
    accuracy: float
    accuracy_ci95: list[float]  # Wilson 95 % interval [low, high]
    per_class: dict[str, dict[str, float]]  # class -> precision, recall, f1, support
    macro: dict[str, float]  # precision, recall, f1 averaged over the classes present
    confusion_matrix: list[list[int]]  # [true][predicted]

def wilson_interval(correct: int, total: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion: sound at small n and near 0 or 1, unlike p +- z*se."""
    if total == 0:
        return 0.0, 0.0
    p = correct / total
    denom = 1 + z * z / total
    center = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def classification_report(y_true: list[int], y_pred: list[int], classes: list[str]) -> ClassificationReport:
    """Accuracy (+ Wilson 95 % CI), per-class precision/recall/F1/support, macro averages, confusion matrix."""
    n = len(classes)
    matrix = [[0] * n for _ in range(n)]  # rows: true class, columns: predicted class
    for t, p in zip(y_true, y_pred):
        matrix[t][p] += 1
    predicted = [sum(col) for col in zip(*matrix)] if n else []
    per_class = {}
    for i, name in enumerate(classes):
        tp, support = matrix[i][i], sum(matrix[i])
        precision = tp / predicted[i] if predicted[i] else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    present = [c for c in classes if per_class[c]["support"]]  # classes absent from the folder don't vote
    correct = sum(matrix[i][i] for i in range(n))
    low, high = wilson_interval(correct, len(y_true))
    return {
        "images": len(y_true),
        "correct": correct,
        "accuracy": correct / len(y_true) if y_true else 0.0,
        "accuracy_ci95": [low, high],
        "per_class": per_class,
        "macro": {k: sum(per_class[c][k] for c in present) / len(present) if present else 0.0
                  for k in ("precision", "recall", "f1")},
        "confusion_matrix": matrix,
    }


def confident_mistakes(paths: list[str], y_true: list[int], probs, classes: list[str], n: int,
                       root: str | None = None) -> list[dict]:
    """The n wrong predictions with the highest probability, most confident first (probs: images x classes)."""
    confidence, predicted = probs.max(1)
    wrong = [{"path": os.path.relpath(p, root) if root else p, "true": classes[t], "predicted": classes[q],
              "probability": float(c)}
             for p, t, q, c in zip(paths, y_true, predicted.tolist(), confidence.tolist()) if q != t]
    return sorted(wrong, key=lambda w: -w["probability"])[:n]


def top_confusions(matrix: list[list[int]], classes: list[str], n: int = 20) -> list[dict]:
    """The n most frequent (true, predicted) pairs off the diagonal: what a many-class matrix cannot show."""
    pairs = [(count, t, p) for t, row in enumerate(matrix) for p, count in enumerate(row) if t != p and count]
    return [{"true": classes[t], "predicted": classes[p], "count": c} for c, t, p in sorted(pairs, key=lambda x: (-x[0], x[1], x[2]))[:n]]
