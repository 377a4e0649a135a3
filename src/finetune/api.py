"""finetune's Python API: the library's front door, what the command line itself is a shell over.

    import finetune
    run = finetune.train("photos/", model="mobilenet_v2", epochs=3)   # -> Run (model_path, metrics, history)
    model = finetune.load(run.model_path)                              # -> Model, for every file finetune writes
    model.predict(["a.jpg", pil_image], top_k=2)                       # -> [Prediction | Failure]
    finetune.evaluate(model, "test/").accuracy                         # -> EvalResult
    finetune.export(model, "model.onnx")                               # -> Path, checked against PyTorch
    finetune.check("photos/")                                          # -> CheckResult

Settings are TrainConfig's fields, named as the command line's options (epochs, lr, batch_size, ...); a keyword
given here counts as typed. Nothing is printed: progress reaches a caller through an optional observer
(finetune.events.Observer, or a callable taking (event, **fields)).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from finetune.config import MAX_PIXELS, spelled_as
from finetune.data.inputs import Failure
from finetune.data.labelfile import LabelFileOptions
from finetune.errors import UsageError
from finetune.events import Emit, Observer, silent
from finetune.formats.export import export_model
from finetune.inference.evaluate import EvalReport, evaluate_folder
from finetune.inference.loading import open_predictor
from finetune.inference.predictor import Prediction
from finetune.quality.doctor import CheckReport, check_dataset
from finetune.training import request
from finetune.training.folds import CrossValidation
from finetune.training.loop import Run

__all__ = ["CheckResult", "CrossValidation", "EvalResult", "Failure", "Model", "Observer", "Prediction", "Run", "check", "evaluate",
           "export", "load", "train"]


def train(data: str | os.PathLike | None = None, *, config: str | os.PathLike | None = None,
          resume: str | os.PathLike | None = None, observer: Observer | Emit | None = None,
          stop: Callable[[], int] | None = None, **settings) -> Run | CrossValidation:
    """Train on a folder of photos (or a label file) with these settings: TrainConfig's fields, in the command line's
    words (time_budget="10m", init_from="run/best.pt" with its architecture), over a config file's and the defaults;
    every keyword counts as typed (under mode auto on a CPU, e.g., epochs=3 fine-tunes from the probe). resume: a run
    folder to continue. Returns the finished Run; with folds=K (and no fold), the CrossValidation of K runs. stop()
    returning a signal number ends training cleanly after its step (Interrupted, resumable)."""
    with spelled_as("keyword"):  # refusals name the keyword (batch_size=0), as the caller wrote it
        return request.train(data, settings, config=config, resume=resume, emit=observer or silent,
                             stop=stop or (lambda: 0))


class Model:
    """A model file ready to classify images: a finetune best.pt or any file finetune exports (.pt, .safetensors,
    .pt2, .onnx, .xml). runtime auto takes the torch-free ONNX path where it applies (an .onnx file, or a model
    file whose ONNX export is cached), else the file's own runtime."""

    def __init__(self, path: str | os.PathLike, runtime: str = "auto", device: str = "auto",
                 max_pixels: int = MAX_PIXELS):
        self.path = Path(path)
        self.device = device
        self._predictor = open_predictor([self.path], device, runtime, max_pixels=max_pixels)
        self.info = self._predictor.info  # the model file's description: arch, classes, preprocessing, metrics
        self.classes: list[str] = list(self.info.classes)
        self.multi_label: bool = bool(self.info.multi_label)
        self.runtime: str = self._predictor.runtime

    def predict(self, images: Sequence, top_k: int = 3, batch_size: int = 32) -> list[Prediction | Failure]:
        """One result per image, in order: a Prediction (top classes with probabilities; multi-label models also
        their labels at the thresholds) or a Failure naming why the image could not be used. images: paths or PIL
        images (a PIL image's result is named "image N", its position)."""
        if isinstance(images, (str, os.PathLike)) or hasattr(images, "getbands"):
            images = [images]
        items = list(images)
        results = list(self._predictor.predict(items, top_k, batch_size, workers=2))
        for i, (item, r) in enumerate(zip(items, results)):
            if not isinstance(item, (str, os.PathLike)):
                r.path = f"image {i}"
        return results

    def __repr__(self) -> str:
        return f"Model({str(self.path)!r}, {self.info.describe()}, runtime {self.runtime!r})"


def load(path: str | os.PathLike, runtime: str = "auto", device: str = "auto") -> Model:
    """A model file ready to predict (see Model)."""
    return Model(path, runtime, device)


@dataclass
class EvalResult:
    """A model measured on labelled images: accuracy with its 95 % interval, and the whole report (report's fields:
    EvalReport, the same as `evaluate --json`)."""

    accuracy: float
    accuracy_ci95: tuple[float, float] | None
    images: int
    report: dict = field(repr=False)


def evaluate(model: Model | str | os.PathLike, data: str | os.PathLike, *, batch_size: int = 32,
             labels: LabelFileOptions | None = None, runtime: str = "auto") -> EvalResult:
    """Run a model over a labelled folder (or label file) and measure it."""
    path = model.path if isinstance(model, Model) else Path(model)
    report: EvalReport = evaluate_folder(str(path), os.fspath(data), batch_size=batch_size, labels=labels,
                                         runtime=runtime)
    accuracy = report.get("accuracy", report.get("subset_accuracy"))
    ci = report.get("accuracy_ci95")
    return EvalResult(float(accuracy), tuple(ci) if ci else None, int(report.get("images", 0)), dict(report))


def export(model: Model | str | os.PathLike, out: str | os.PathLike, check_images: str | None = None) -> Path:
    """Write the model as out's format (.pt, .safetensors, .pt2, .onnx, .xml), checked against PyTorch on real
    images (check_images, else the val images of the run it came from) before it replaces anything at out."""
    path = model.path if isinstance(model, Model) else Path(model)
    if path.suffix.lower() not in (".pt", ".pth"):
        raise UsageError(f"{path}: export starts from a finetune model file (.pt); this is already an export")
    export_model(str(path), Path(out), check_images)
    return Path(out)


@dataclass
class CheckResult:
    """What `finetune check` finds in a dataset (report: CheckReport's fields, the same as `check --json`)."""

    images: int
    usable: int
    skipped: list[dict]
    duplicates: dict
    report: dict = field(repr=False)


def check(data: str | os.PathLike, *, val_fraction: float = 0.2, seed: int = 0,
          labels: LabelFileOptions | None = None) -> CheckResult:
    """Inspect every file of a dataset: counts, unusable files, duplicates and train/val leakage."""
    report: CheckReport = check_dataset(os.fspath(data), val_fraction, seed, labels=labels)
    return CheckResult(report["images"], report["usable"], report["skipped"], report["duplicates"], dict(report))
