"""Honest metrics on a labelled folder: accuracy with a Wilson interval, per-class precision/recall/F1,
the confusion matrix, and the images the model got most confidently wrong."""

from __future__ import annotations

import math
import os

from finetune import data as D
from finetune.errors import DatasetError

Z95 = 1.959964  # two-sided 95 % normal quantile


def wilson_interval(correct: int, total: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion: sound at small n and near 0 or 1, unlike p +- z*se."""
    if total == 0:
        return 0.0, 0.0
    p = correct / total
    denom = 1 + z * z / total
    center = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def classification_report(y_true: list[int], y_pred: list[int], classes: list[str]) -> dict:
    """Accuracy (+ Wilson 95 % CI), per-class precision/recall/F1/support, macro averages, confusion matrix."""
    n = len(classes)
    matrix = [[0] * n for _ in range(n)]  # rows: true class, columns: predicted class
    for t, p in zip(y_true, y_pred):
        matrix[t][p] += 1
    per_class = {}
    for i, name in enumerate(classes):
        tp = matrix[i][i]
        predicted = sum(matrix[r][i] for r in range(n))
        support = sum(matrix[i])
        precision = tp / predicted if predicted else 0.0
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


def labelled_samples(data: str, classes: list[str]) -> tuple[list[D.Sample], list[tuple[str, str]], str]:
    """The images to evaluate: val/ of a train/val folder, else every image of a folder of class folders.

    Labels are the model's class indices; a folder class the model does not know is an error.
    """
    root = data
    subdirs = {e.name.lower(): e.path for e in os.scandir(root) if e.is_dir()} if os.path.isdir(root) else {}
    val = next((subdirs[n] for n in D.VAL_DIR_NAMES if n in subdirs), None)
    if "train" in subdirs and val is not None:
        root = val
    if not os.path.isdir(root):
        raise DatasetError(f"{root}: no such folder; pass a folder of class folders (DATA/<class>/*.jpg)")
    skipped: list[tuple[str, str]] = []
    dirs = D.class_dirs(root)
    if not dirs:
        raise DatasetError(f"{root}: no class folders found; put each class's images in its own folder")
    unknown = sorted(set(dirs) - set(classes))
    if unknown:
        raise DatasetError(f"{root}: classes {unknown} are not among the model's classes {classes}; evaluate on "
                           "folders named after the model's classes")
    samples = [D.Sample(p, classes.index(name)) for name, folder in dirs.items()
               for p in D.images_under(folder, skipped)]
    if not samples:
        raise DatasetError(f"{root}: no images to evaluate")
    return samples, skipped, root


def evaluate_folder(model_path: str | list[str], data: str, device: str = "auto", batch_size: int = 32,
                    workers: int = 2, wrong: int = 10, tta: bool = False) -> dict:
    """Run the model (or an ensemble of several) over a labelled folder and report metrics plus the most
    confidently wrong images; for an ensemble, each member's accuracy and ECE too."""
    from finetune.predict import Failure, load_predictor

    model_paths = [model_path] if isinstance(model_path, (str, os.PathLike)) else list(model_path)
    predictor = load_predictor(model_paths, device, tta)
    classes = predictor.classes
    samples, skipped, root = labelled_samples(data, classes)
    label = {s.path: s.label for s in samples}
    y_true, y_pred, mistakes, logits, member_probs = [], [], [], [], []
    for r in predictor.predict([s.path for s in samples], top_k=len(classes), batch_size=batch_size,
                               workers=workers):
        if isinstance(r, Failure):
            skipped.append((r.path, r.reason))
            continue
        true, (pred_name, prob) = label[r.path], r.top[0]
        pred = classes.index(pred_name)
        y_true.append(true)
        y_pred.append(pred)
        logits.append(r.logits)
        if r.members is not None:
            member_probs.append(r.members)
        if pred != true:
            mistakes.append({"path": os.path.relpath(r.path, root), "true": classes[true], "predicted": pred_name,
                             "probability": prob})
    if not y_true:
        raise DatasetError(f"{root}: none of the images could be read")
    report = classification_report(y_true, y_pred, classes)
    from finetune.calibrate import calibration_summary

    report["calibration"] = calibration_summary(logits, y_true, predictor.temperature) | {
        "fitted": predictor.temperature != 1.0}
    if member_probs:
        report["members"] = _members(model_paths, member_probs, y_true, classes)
    report.update({
        "model": model_paths[0] if len(model_paths) == 1 else model_paths,
        "tta": tta,
        "data": root,
        "classes": classes,
        "most_confident_wrong": sorted(mistakes, key=lambda m: -m["probability"])[:wrong],
        "skipped": [{"path": os.path.relpath(p, root), "reason": why} for p, why in skipped],
    })
    return report


def _members(model_paths: list[str], member_probs: list[list[list[float]]], y_true: list[int],
             classes: list[str]) -> list[dict]:
    """Each ensemble member alone, on the same images: accuracy with its interval, macro F1 and ECE."""
    import torch

    from finetune.calibrate import expected_calibration_error

    probs = torch.tensor(member_probs, dtype=torch.float64)  # images x members x classes
    out = []
    for i, path in enumerate(model_paths):
        p = probs[:, i]
        r = classification_report(y_true, p.argmax(1).tolist(), classes)
        out.append({"model": str(path), "accuracy": r["accuracy"], "accuracy_ci95": r["accuracy_ci95"],
                    "correct": r["correct"], "macro_f1": r["macro"]["f1"],
                    "ece": expected_calibration_error(p, y_true)})
    return out
