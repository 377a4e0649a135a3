"""Honest metrics for multi-label predictions: average precision per class and its macro and micro means
(mAP), per-class precision/recall/F1 at the model's thresholds with their 2x2 counts, exact-match (subset)
accuracy, Hamming loss, bootstrap 95 % intervals, label co-occurrence, and the images with the largest errors
(which labels were missed, which invented)."""

from __future__ import annotations

import math
import os
from typing import TypedDict

from finetune.tasks.multilabel import decide

BOOTSTRAP = 1000  # resamples of the images for the 95 % intervals
BOOTSTRAP_SEED = 0



class MultiLabelReport(TypedDict):
    """Multi-label metrics of probabilities against multi-hot truth, at the given thresholds."""

    multi_label: bool  # True
    images: int
    map_macro: float
    map_micro: float
    f1_macro: float
    ci95: dict[str, list[float]]  # bootstrap 95 % intervals of map_macro and f1_macro
    subset_accuracy: float  # every label right (exact match)
    exact_matches: int
    hamming_loss: float
    per_class: dict[str, dict]  # label -> ap, precision, recall, f1, support, threshold, 2x2 counts
    macro: dict[str, float]
    cooccurrence: list[list[int]]
    thresholds: list[float]

def average_precision(scores, y):
    """Per class AP (the mean precision at the rank of each positive; NaN for a class without positives)."""
    import torch

    scores, y = torch.as_tensor(scores, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    if scores.dim() == 1:
        scores, y = scores[:, None], y[:, None]
    order = torch.argsort(scores, dim=0, descending=True, stable=True)
    hits = y.gather(0, order)
    ranks = torch.arange(1, len(scores) + 1, dtype=torch.float64)[:, None]
    precision = hits.cumsum(0) / ranks
    positives = hits.sum(0)
    return torch.where(positives > 0, (precision * hits).sum(0) / positives.clamp(min=1), torch.nan)


def _macro(values) -> float:
    import torch

    kept = values[~torch.isnan(values)]
    return float(kept.mean()) if len(kept) else math.nan


def _f1(pred, y):
    """Per class F1 from boolean predictions and 0/1 targets (NaN where the class has no positive)."""
    import torch

    tp = (pred & (y > 0.5)).sum(0).double()
    fp = (pred & (y < 0.5)).sum(0).double()
    fn = (~pred & (y > 0.5)).sum(0).double()
    f1 = torch.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn).clamp(min=1), 0.0)
    return torch.where(y.sum(0) > 0, f1, torch.nan)


def bootstrap_intervals(probs, y, pred, resamples: int = BOOTSTRAP, seed: int = BOOTSTRAP_SEED) -> dict:
    """Percentile 95 % intervals of macro mAP, micro mAP and macro F1 over images resampled with replacement."""
    import torch

    g = torch.Generator().manual_seed(seed)
    n = len(y)
    stats = {"map_macro": [], "map_micro": [], "f1_macro": []}
    for _ in range(resamples):
        i = torch.randint(n, (n,), generator=g)
        p, t, d = probs[i], y[i], pred[i]
        stats["map_macro"].append(_macro(average_precision(p, t)))
        stats["map_micro"].append(float(average_precision(p.flatten(), t.flatten())[0]))
        stats["f1_macro"].append(_macro(_f1(d, t)))
    out = {}
    for key, values in stats.items():
        v = torch.tensor([x for x in values if not math.isnan(x)], dtype=torch.float64)
        out[key] = [float(v.quantile(0.025)), float(v.quantile(0.975))] if len(v) else [math.nan, math.nan]
    return out


def multilabel_report(probs, y, thresholds: list[float], classes: list[str],
                      resamples: int = BOOTSTRAP) -> MultiLabelReport:
    """mAP (macro, micro) and macro F1 with bootstrap 95 % intervals; per class AP, precision, recall, F1,
    support and 2x2 counts at the thresholds; subset accuracy; Hamming loss; label co-occurrence."""
    import torch

    probs, y = torch.as_tensor(probs, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    pred = decide(probs, thresholds)
    truth = y > 0.5
    ap, f1 = average_precision(probs, y), _f1(pred, y)
    per_class = {}
    for c, name in enumerate(classes):
        tp, fp = int((pred[:, c] & truth[:, c]).sum()), int((pred[:, c] & ~truth[:, c]).sum())
        fn, tn = int((~pred[:, c] & truth[:, c]).sum()), int((~pred[:, c] & ~truth[:, c]).sum())
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        per_class[name] = {"ap": float(ap[c]), "precision": precision, "recall": recall,
                           "f1": float(f1[c]) if not math.isnan(float(f1[c])) else 0.0, "support": tp + fn,
                           "threshold": float(thresholds[c]), "counts": {"tp": tp, "fp": fp, "fn": fn, "tn": tn}}
    exact = int((pred == truth).all(1).sum())
    present = [name for name in classes if per_class[name]["support"]]
    cooc = (truth.double().T @ truth.double()).long().tolist()
    return {
        "multi_label": True, "images": len(y),
        "map_macro": _macro(ap), "map_micro": float(average_precision(probs.flatten(), y.flatten())[0]),
        "f1_macro": _macro(f1), "ci95": bootstrap_intervals(probs, y, pred, resamples),
        "subset_accuracy": exact / len(y) if len(y) else 0.0, "exact_matches": exact,
        "hamming_loss": float((pred != truth).double().mean()) if len(y) else 0.0,
        "per_class": per_class,
        "macro": {k: sum(per_class[c][k] for c in present) / len(present) if present else 0.0
                  for k in ("precision", "recall", "f1", "ap")},
        "cooccurrence": cooc,
        "thresholds": [float(t) for t in thresholds],
    }


def label_mistakes(paths: list[str], probs, y, thresholds: list[float], classes: list[str], n: int,
                   root: str | None = None) -> list[dict]:
    """The n images with the largest errors (the largest gap between a label's probability and its truth, over
    the labels decided wrongly), with the labels missed and invented and their probabilities."""
    import torch

    probs, y = torch.as_tensor(probs, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    pred, truth = decide(probs, thresholds), y > 0.5
    out = []
    for i, path in enumerate(paths):
        wrong = pred[i] != truth[i]
        if not bool(wrong.any()):
            continue
        gap = float((probs[i] - y[i]).abs()[wrong].max())
        out.append({"path": os.path.relpath(path, root) if root else path,
                    "true": [classes[c] for c in truth[i].nonzero().flatten().tolist()],
                    "predicted": [classes[c] for c in pred[i].nonzero().flatten().tolist()],
                    "missed": [[classes[c], float(probs[i, c])] for c in (truth[i] & ~pred[i]).nonzero().flatten()
                               .tolist()],
                    "invented": [[classes[c], float(probs[i, c])] for c in (pred[i] & ~truth[i]).nonzero()
                                 .flatten().tolist()],
                    "error": gap})
    return sorted(out, key=lambda m: -m["error"])[:n]


def epoch_map(logits, y) -> float | None:
    """Macro mAP of an epoch's val logits (None when they do not cover the val set, or no class has a positive)."""
    import torch

    if logits is None or len(logits) != len(y):
        return None
    value = _macro(average_precision(torch.sigmoid(logits.double()), y))
    return None if math.isnan(value) else value
