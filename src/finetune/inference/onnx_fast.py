"""Predictions without torch: an ONNX model run by onnxruntime, images prepared with Pillow and numpy exactly as
the torch path prepares them (the same safe loader, the same resize, crop and normalisation), so a one-photo
`finetune predict` starts in well under a second instead of importing torch and torchvision.

Used for .onnx models, and for a finetune model file whose ONNX export is in the cache (written by predict
after it ran a model file the first time, when the onnx extra is installed).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from finetune._util.files import cache_dir, mark_used, trim_cache
from finetune.config import MAX_PIXELS
from finetune.data.inputs import Failure, load_input, loaded_chunks
from finetune.data.preprocessing import Preprocessing
from finetune.errors import ModelFileError
from finetune.formats.export import export_model
from finetune.inference.predictor import Prediction
from finetune.models.model_file import ModelFile, validated_description

_PIL_FILTERS = {"nearest": 0, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5, "lanczos": 1}


LITE_ENV = "FINETUNE_LITE"  # 0: never the torch-free path, never cache an export for it


def available() -> bool:
    """Is onnxruntime installed (the onnx extra), and the torch-free path not switched off?"""
    if os.environ.get(LITE_ENV, "1") == "0":
        return False
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def cached_export(model_path: str | os.PathLike) -> Path:
    """Where the ONNX export of a model file is cached: keyed by its real path, size and modification time."""
    st = os.stat(model_path)
    key = json.dumps([os.path.realpath(model_path), st.st_size, st.st_mtime_ns])
    return cache_dir() / "onnx" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.onnx"


def prepare(img, pre: Preprocessing):
    """A decoded RGB PIL image -> float32 CHW array: shorter side to resize_size (torchvision's size rule and
    Pillow's filter, as the torch path decodes), center crop, scale to 0..1, normalise."""
    import numpy as np

    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    if short != pre.resize_size:
        new_short, new_long = pre.resize_size, int(pre.resize_size * long / short)
        size = (new_short, new_long) if w <= h else (new_long, new_short)
        img = img.resize(size, _PIL_FILTERS.get(pre.interpolation, 2))
    w, h = img.size
    c = pre.crop_size
    top, left = int(round((h - c) / 2.0)), int(round((w - c) / 2.0))
    arr = np.asarray(img, dtype=np.float32)[top:top + c, left:left + c] / 255.0
    arr = (arr - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


class LitePredictor:
    """The Predictor interface over an ONNX file, in numpy: predict(paths, top_k, ...) -> Prediction | Failure."""

    def __init__(self, onnx_path: str | os.PathLike, shown_as: str | os.PathLike | None = None, tta: bool = False,
                 max_pixels: int = MAX_PIXELS):
        import onnxruntime as ort

        try:
            self.session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
            info = json.loads(self.session.get_modelmeta().custom_metadata_map["finetune"])
        except KeyError:
            raise ModelFileError(f"{onnx_path}: an ONNX model without finetune's metadata (classes, "
                                 "preprocessing)") from None
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own error types
            raise ModelFileError(f"{onnx_path}: not a loadable ONNX model ({type(e).__name__})") from None
        self.info: ModelFile = validated_description(info, Path(shown_as or onnx_path))
        self.classes, self.temperature = self.info.classes, self.info.temperature
        self.input = self.session.get_inputs()[0].name
        self.tta, self.max_pixels = tta, max_pixels
        self.runtime = "onnxruntime (no torch)"
        self.multi_label, self.thresholds, self.members = False, None, [self]  # multi-label files take torch's path

    def _load(self, path: str):
        pre = self.info.preprocessing
        return prepare(load_input(path, pre.resize_size, self.max_pixels), pre)

    def logits(self, batch):
        out = self.session.run(None, {self.input: batch})[0]
        return (out + self.session.run(None, {self.input: batch[..., ::-1].copy()})[0]) / 2 if self.tta else out

    def predict(self, paths: Sequence[str], top_k: int = 3, batch_size: int = 32, workers: int = 2,
                on_progress: Callable[[int], None] = lambda n: None):
        import numpy as np

        k = max(1, min(top_k, len(self.classes)))
        for chunk, good in loaded_chunks(paths, self._load, batch_size, workers, on_progress):
            logits = iter(self.logits(np.stack(good)) if good else [])
            for path, err in chunk:
                yield Failure(path, err) if err is not None else self._prediction(path, next(logits), k)

    def _prediction(self, path: str, z, k: int) -> Prediction:
        import numpy as np

        scaled = z.astype(np.float64) / self.temperature
        p = np.exp(scaled - scaled.max())
        p /= p.sum()
        order = np.argsort(-p, kind="stable")[:k]
        return Prediction(path, [(self.classes[i], float(p[i])) for i in order], [float(v) for v in z])


def light_predictor(model_paths: Sequence[str], device: str, tta: bool, max_pixels: int) -> LitePredictor | None:
    """The torch-free predictor where it applies: one model, on the CPU, given as an .onnx file or as a model
    file whose ONNX export is cached; else None (the torch path)."""
    if len(model_paths) != 1 or device not in ("auto", "cpu") or not available():
        return None
    path = Path(model_paths[0])
    light = None
    if path.suffix.lower() == ".onnx":
        light = LitePredictor(path, None, tta, max_pixels)
    elif path.is_file() and path.suffix.lower() in (".pt", ".pth") and (cached := cached_export(path)).is_file():
        light = LitePredictor(cached, path, tta, max_pixels)
        mark_used(cached)
    return None if light is None or light.info.multi_label else light  # sigmoids and thresholds: the torch path


def cache_export(model_path: str | os.PathLike, images: Sequence[str]) -> Path | None:
    """Export a model file to the ONNX cache (checked on the given images, as `export` checks), so that the next
    prediction with it starts without torch. None when it cannot (no onnx extra, an unexportable model)."""
    if not available() or not images or Path(model_path).suffix.lower() not in (".pt", ".pth"):
        return None
    target = cached_export(model_path)
    try:
        export_model(model_path, target, images[0])
    except Exception:  # noqa: BLE001 - a cache: the predictions were already made and shown
        return None
    trim_cache(target)
    return target
