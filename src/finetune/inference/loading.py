"""Which predictor a model gets, decided once for every caller (the CLI, the Python API, evaluate): the torch-free
ONNX path where it applies (one single-label model on the CPU, given as .onnx or with its ONNX export cached), else
the runtime asked for; and, after a prediction through torch, the cached export that makes the next one light."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from finetune.config import MAX_PIXELS
from finetune.inference.onnx_fast import LitePredictor, cache_export, light_predictor
from finetune.inference.predictor import Classifier, load_predictor


def open_predictor(model_paths: Sequence[str | os.PathLike], device: str = "auto", runtime: str = "auto",
                   tta: bool = False, max_pixels: int = MAX_PIXELS, thresholds: Sequence[str] | None = None,
                   needs_torch: bool = False) -> Classifier:
    """The predictor for these model files. runtime auto takes the torch-free path where it applies; thresholds and
    callers that need the network itself (explanations: needs_torch) take torch's."""
    paths = [str(p) for p in model_paths]
    light = None
    if runtime == "auto" and not thresholds and not needs_torch:
        light = light_predictor(paths, device, tta, max_pixels)
    return light or load_predictor(paths, device, tta, max_pixels, thresholds, runtime=runtime)


def prepare_next(predictor: Classifier, model_paths: Sequence[str | os.PathLike], device: str, images: Sequence[str]) -> Path | None:
    """After predictions through torch with one single-label model file on the CPU: cache its ONNX export (checked on
    one of these images, as export checks), so that the next prediction with it starts without torch. The cached
    file, or None when nothing was cached (another path applied, no onnx extra, an unexportable model)."""
    if isinstance(predictor, LitePredictor) or predictor.multi_label or \
            device not in ("auto", "cpu") or len(model_paths) != 1 or not images:
        return None
    return cache_export(model_paths[0], list(images[:1]))
