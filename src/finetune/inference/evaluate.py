"""Honest metrics on a labelled folder: accuracy with a Wilson interval, per-class precision/recall/F1,
the confusion matrix, calibration, the images the model got most confidently wrong, and for an ensemble
each member alone."""

from __future__ import annotations

import os
from collections.abc import Callable

from finetune.config import MAX_PIXELS
from finetune.data.dataset import labelled_samples
from finetune.data.inputs import Failure
from finetune.data.labelfile import LabelFileOptions
from finetune.errors import DatasetError
from finetune.inference.predictor import load_predictor
from finetune.metrics.calibrate import calibration_summary, expected_calibration_error
from finetune.metrics.classification import ClassificationReport, classification_report, confident_mistakes
from finetune.metrics.multilabel import MultiLabelReport, label_mistakes, multilabel_report
from finetune.tasks.multilabel import probabilities, targets


class EvalReport(ClassificationReport, total=False):
    """`evaluate --json` of a single-label model (or an ensemble): its metrics on a labelled folder."""

    calibration: dict  # ece, nll, the temperature and whether it was fitted
    members: list[dict]  # an ensemble's: each member's accuracy and ECE
    model: str | list[str]
    model_description: str
    tta: bool
    data: str  # the folder the paths are relative to
    classes: list[str]
    most_confident_wrong: list[dict]  # path, true, predicted, probability; most confident first
    skipped: list[dict]  # path, reason


class MultiLabelEvalReport(MultiLabelReport, total=False):
    """`evaluate --json` of a multi-label model."""

    model: str
    model_description: str
    tta: bool
    data: str
    classes: list[str]
    largest_errors: list[dict]  # path, true, predicted, the largest probability gap
    skipped: list[dict]

def evaluate_folder(model_path: str | list[str], data: str, device: str = "auto", batch_size: int = 32,
                    workers: int = 2, wrong: int = 10, tta: bool = False, max_pixels: int = MAX_PIXELS,
                    on_start: Callable[[int], None] = lambda n: None,
                    on_progress: Callable[[int], None] = lambda n: None, thresholds: list[str] | None = None,
                    labels: LabelFileOptions | None = None, runtime: str = "auto") -> EvalReport | MultiLabelEvalReport:
    """Run the model (or an ensemble of several) over a labelled folder and report metrics plus the most
    confidently wrong images; for an ensemble, each member's accuracy and ECE too."""
    import torch

    model_paths = [model_path] if isinstance(model_path, (str, os.PathLike)) else list(model_path)
    predictor = load_predictor(model_paths, device, tta, max_pixels, thresholds, runtime)
    classes = predictor.classes
    multi = predictor.multi_label
    samples, skipped, root = labelled_samples(data, classes, labels, multi)
    on_start(len(samples))
    label = {s.path: s.label for s in samples}
    if multi:
        return _multilabel(predictor, samples, skipped, root, batch_size, workers, wrong, on_progress) | {
            "model": model_paths[0], "tta": tta}
    paths, y_true, logits, member_probs = [], [], [], []
    for r in predictor.predict([s.path for s in samples], len(classes), batch_size, workers, on_progress):
        if isinstance(r, Failure):
            skipped.append((r.path, r.reason))
            continue
        paths.append(r.path)
        y_true.append(label[r.path])
        logits.append(r.logits)
        if r.members is not None:
            member_probs.append(r.members)
    if not y_true:
        raise DatasetError(f"{root}: none of the images could be read")
    z = torch.tensor(logits, dtype=torch.float64)
    probs = (z / predictor.temperature).softmax(1)
    report = classification_report(y_true, probs.argmax(1).tolist(), classes)
    report["calibration"] = calibration_summary(z, y_true, predictor.temperature) | {
        "fitted": predictor.temperature != 1.0}
    if member_probs:
        report["members"] = _members(model_paths, member_probs, y_true, classes)
    report.update({
        "model": model_paths[0] if len(model_paths) == 1 else model_paths,
        "model_description": predictor.info.describe(),
        "tta": tta,
        "data": root,
        "classes": classes,
        "most_confident_wrong": confident_mistakes(paths, y_true, probs, classes, wrong, root),
        "skipped": [{"path": os.path.relpath(p, root), "reason": why} for p, why in skipped],
    })
    return report


def _multilabel(predictor, samples: list, skipped: list, root: str, batch_size: int, workers: int, wrong: int,
                on_progress) -> dict:
    """A multi-label model on labelled images: mAP, per-label metrics at its thresholds, the largest errors."""
    import torch

    by_path = {s.path: s for s in samples}
    done, logits = [], []
    for r in predictor.predict([s.path for s in samples], 1, batch_size, workers, on_progress):
        if isinstance(r, Failure):
            skipped.append((r.path, r.reason))
        else:
            done.append(by_path[r.path])
            logits.append(r.logits)
    if not done:
        raise DatasetError(f"{root}: none of the images could be read")
    y = targets(done, len(predictor.classes))
    probs = probabilities(torch.tensor(logits, dtype=torch.float64), predictor.temperature)
    report = multilabel_report(probs, y, predictor.thresholds, predictor.classes)
    return report | {
        "model_description": predictor.info.describe(), "data": root, "classes": predictor.classes,
        "largest_errors": label_mistakes([s.path for s in done], probs, y, predictor.thresholds, predictor.classes,
                                         wrong, root),
        "skipped": [{"path": os.path.relpath(p, root), "reason": why} for p, why in skipped]}


def _members(model_paths: list[str], member_probs: list[list[list[float]]], y_true: list[int],
             classes: list[str]) -> list[dict]:
    """Each ensemble member alone, on the same images: accuracy with its interval, macro F1 and ECE."""
    import torch

    probs = torch.tensor(member_probs, dtype=torch.float64)  # images x members x classes
    out = []
    for i, path in enumerate(model_paths):
        p = probs[:, i]
        r = classification_report(y_true, p.argmax(1).tolist(), classes)
        out.append({"model": str(path), "accuracy": r["accuracy"], "accuracy_ci95": r["accuracy_ci95"],
                    "correct": r["correct"], "macro_f1": r["macro"]["f1"],
                    "ece": expected_calibration_error(p, y_true)})
    return out
