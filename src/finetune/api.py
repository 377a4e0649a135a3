"""finetune's Python API: the library's front door, what the command line itself is a shell over.

    import finetune
    run = finetune.train("photos/", model="mobilenet_v2", time_budget="10m")  # -> Run (run.model: the Model)
    model = finetune.load(run.model_path)                     # -> Model, for every file finetune writes (a list: ensemble)
    model.predict(["a.jpg", pil_image], top_k=2)              # -> [Prediction | Failure]
    model.evaluate("test/").accuracy                          # -> EvalResult
    model.export("model.onnx", int8=True)                     # -> Int8Report (ExportReport without int8)
    model.explain(["a.jpg"], "why/"); model.suggest("unlabelled/", n=30)
    finetune.check("photos/"); finetune.lr_find("photos/"); finetune.tune("photos/", trials=20); finetune.serve(model)

Settings are TrainConfig's fields, in the command line's words (epochs, lr, batch_size, time_budget="10m", ...); a
keyword given here counts as typed, and a bad one is refused as its option is (UsageError naming the keyword).
Nothing is printed: progress reaches a caller through an optional observer (finetune.events.Observer, or a callable
taking (event, **fields)).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from finetune._util.files import timestamped_dir
from finetune.config import MAX_PIXELS, MODES, option, parse_duration, spelled_as
from finetune.data.inputs import Failure
from finetune.data.labelfile import LabelFileOptions
from finetune.errors import UsageError
from finetune.events import Emit, Observer, silent
from finetune.formats.export import ExportReport, export_model
from finetune.formats.int8 import CALIBRATION_COUNT, MAX_ACCURACY_DROP, Int8Report, export_int8
from finetune.inference.evaluate import EvalReport, MultiLabelEvalReport, evaluate_folder
from finetune.inference.explain import Explainer, explain_into
from finetune.inference.loading import open_predictor
from finetune.inference.predictor import Prediction, load_predictor
from finetune.quality.doctor import CheckReport, Duplicates, check_dataset
from finetune.quality.suggest import Suggestions, suggest
from finetune.serving.app import create_app, web
from finetune.serving.handling import ServeSettings
from finetune.serving.model import ServedModel
from finetune.serving.server import bind
from finetune.serving.server import run as run_server
from finetune.training import loop as training_loop
from finetune.training import request
from finetune.training.folds import CrossValidation
from finetune.training.lrfind import LrFindResult
from finetune.training.lrfind import lr_find as run_lr_find
from finetune.training.lrfind import write_result as write_lr_result
from finetune.search import Space, TuneResult, run_search

__all__ = ["CheckResult", "CrossValidation", "EvalResult", "Failure", "Model", "Observer", "Prediction", "Run", "check",
           "evaluate", "export", "load", "lr_find", "serve", "train", "tune"]


def train(data: str | os.PathLike | None = None, *, config: str | os.PathLike | None = None,
          resume: str | os.PathLike | None = None, observer: Observer | Emit | None = None,
          stop: Callable[[], int] | None = None, **settings) -> Run | CrossValidation:
    """Train on a folder of photos (or a label file) with these settings: TrainConfig's fields, in the command line's
    words (time_budget="10m", init_from="run/best.pt" with its architecture), over a config file's and the defaults;
    every keyword counts as typed (under mode auto on a CPU, e.g., epochs=3 fine-tunes from the probe). resume: a run
    folder to continue. Returns the finished Run; with folds=K (and no fold), the CrossValidation of K runs. stop()
    returning a signal number ends training cleanly after its step (Interrupted, resumable)."""
    with spelled_as("keyword"):  # refusals name the keyword (batch_size=0), as the caller wrote it
        result = request.train(data, settings, config=config, resume=resume, emit=observer or silent,
                               stop=stop or (lambda: 0))
    return Run.of(result) if isinstance(result, training_loop.Run) else result


class Model:
    """A model file ready to classify images: a finetune best.pt or any file finetune exports (.pt, .safetensors,
    .pt2, .onnx, .xml); several files: an ensemble averaging their probabilities. runtime auto takes the torch-free
    ONNX path where it applies (an .onnx file, or a model file whose ONNX export is cached), else the file's own
    runtime."""

    def __init__(self, path: str | os.PathLike | Sequence[str | os.PathLike], runtime: str = "auto",
                 device: str = "auto", max_pixels: int = MAX_PIXELS):
        self.paths = [Path(path)] if isinstance(path, (str, os.PathLike)) else [Path(p) for p in path]
        if not self.paths:
            raise UsageError("finetune.load: give a model file (or several, for an ensemble)")
        self.path = self.paths[0]
        self.device, self.max_pixels = device, max_pixels
        self._predictor = open_predictor(self.paths, device, runtime, max_pixels=max_pixels)
        self.info = self._predictor.info  # the model file's description: arch, classes, preprocessing, metrics
        self.classes: list[str] = list(self.info.classes)
        self.multi_label: bool = bool(self.info.multi_label)
        self.runtime: str = self._predictor.runtime

    def predict(self, images: Sequence, top_k: int = 3, batch_size: int = 32) -> list[Prediction | Failure]:
        """One result per image, in order: a Prediction (top classes with probabilities; multi-label models also
        their labels at the thresholds) or a Failure naming why the image could not be used. images: paths or PIL
        images (a PIL image's result is named "image N", its position)."""
        for name, value in (("top_k", top_k), ("batch_size", batch_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UsageError(f"predict: {name}={value!r}: must be a whole number, at least 1")
        if isinstance(images, (str, os.PathLike)) or hasattr(images, "getbands"):
            images = [images]
        items = list(images)
        results = list(self._predictor.predict(items, top_k, batch_size, workers=2))
        for i, (item, r) in enumerate(zip(items, results)):
            if not isinstance(item, (str, os.PathLike)):
                r.path = f"image {i}"
        return results

    def evaluate(self, data: str | os.PathLike, *, batch_size: int = 32,
                 labels: LabelFileOptions | None = None) -> EvalResult:
        """This model measured on a labelled folder (or label file): see finetune.evaluate."""
        return evaluate(self, data, batch_size=batch_size, labels=labels)

    def export(self, out: str | os.PathLike, **options) -> ExportReport | Int8Report:
        """This model (an ensemble as one file) written as out's format: see finetune.export."""
        return export(self, out, **options)

    def explain(self, images: Sequence[str | os.PathLike], out_dir: str | os.PathLike) -> list[Path]:
        """A Grad-CAM picture per image (OUT_DIR/<photo>.png) of what drove the top class; one model file with
        gradients (best.pt, .pt, .safetensors), the explain extra. Images that cannot be read are skipped."""
        if len(self.paths) > 1:
            raise UsageError("explain: an ensemble's members look at different things; explain one model file")
        explainer = Explainer(self.path, self.device, self.max_pixels)
        paths = [os.fspath(images)] if isinstance(images, (str, os.PathLike)) else [os.fspath(i) for i in images]
        good = [r for r in self._predictor.predict(paths, 3, 32, workers=2) if isinstance(r, Prediction)]
        return explain_into(explainer, good, out_dir)

    def suggest(self, pool: str | os.PathLike | Sequence[str | os.PathLike], n: int = 30, *,
                labelled: Sequence[str] | None = None, into: str | os.PathLike | None = None,
                seed: int = 0) -> Suggestions:
        """The n photos of an unlabelled pool to label next, most useful first, with the model's guess and why
        (finetune suggest); into: also copy them there (a folder) or list them (a .csv label file)."""
        pool = [os.fspath(pool)] if isinstance(pool, (str, os.PathLike)) else [os.fspath(p) for p in pool]
        if n < 1:
            raise UsageError(f"suggest: n={n!r}: must be at least 1")
        return suggest(str(self.path), pool, n, labelled, os.fspath(into) if into is not None else None, seed,
                       self.device, max_pixels=self.max_pixels)

    def __repr__(self) -> str:
        shown = str(self.path) if len(self.paths) == 1 else f"{len(self.paths)} files"
        return f"Model({shown!r}, {self.info.describe()}, runtime {self.runtime!r})"


@dataclass
class Run(training_loop.Run):
    """A finished training run (finetune.train): where its model is, how good it is, how it got there; run.model is
    the trained model, ready to use."""

    @classmethod
    def of(cls, run: training_loop.Run) -> Run:
        """The library's run record, as the API's Run."""
        return cls(**{f.name: getattr(run, f.name) for f in dataclasses.fields(run)})

    @functools.cached_property
    def model(self) -> Model:
        """best.pt, loaded."""
        return Model(self.model_path)


def load(path: str | os.PathLike | Sequence[str | os.PathLike], runtime: str = "auto", device: str = "auto") -> Model:
    """A model file (several: an ensemble) ready to predict (see Model)."""
    return Model(path, runtime, device)


@dataclass
class EvalResult:
    """A model measured on labelled images: accuracy (multi-label: exact match) with its 95 % interval, and the
    whole report (the same as `evaluate --json`)."""

    accuracy: float
    accuracy_ci95: tuple[float, float] | None
    images: int
    report: EvalReport | MultiLabelEvalReport = field(repr=False)


def evaluate(model: Model | str | os.PathLike, data: str | os.PathLike, *, batch_size: int = 32,
             labels: LabelFileOptions | None = None, runtime: str = "auto") -> EvalResult:
    """Run a model (or an ensemble) over a labelled folder (or label file) and measure it."""
    paths = _paths(model)
    report = evaluate_folder(paths, os.fspath(data), batch_size=batch_size, labels=labels, runtime=runtime)
    accuracy = report.get("accuracy", report.get("subset_accuracy"))
    ci = report.get("accuracy_ci95")
    return EvalResult(float(accuracy), tuple(ci) if ci else None, int(report.get("images", 0)), report)


def export(model: Model | str | os.PathLike | Sequence[str | os.PathLike], out: str | os.PathLike,
           check_images: str | None = None, *, int8: bool = False, calibration_images: str | None = None,
           calibration_count: int = CALIBRATION_COUNT, max_accuracy_drop: float = MAX_ACCURACY_DROP,
           force: bool = False) -> ExportReport | Int8Report:
    """Write the model (several files: an ensemble, as one file) as out's format (.pt, .safetensors, .pt2, .onnx,
    .xml), checked against PyTorch on real images (check_images, else the val images of the run it came from) before
    it replaces anything at out; the report says what was checked (report.path: the file). int8: post-training
    quantization (.onnx, .xml) calibrated on the run's training images, kept only within max_accuracy_drop points of
    fp32 on labelled images (CheckFailedError otherwise, unless force)."""
    paths = _paths(model)  # a model file or its .pt / .safetensors export; others are refused by the loader
    if int8:
        return export_int8(paths, out, check_images, calibration_images, calibration_count, max_accuracy_drop, force)
    return export_model(paths, Path(out), check_images)


def _paths(model: Model | str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """The model files a Model, a path or several paths name."""
    if isinstance(model, Model):
        return [str(p) for p in model.paths]
    paths = [os.fspath(model)] if isinstance(model, (str, os.PathLike)) else [os.fspath(p) for p in model]
    if not paths:
        raise UsageError("give a model file (or several, for an ensemble)")
    return paths


@dataclass
class CheckResult:
    """What `finetune check` finds in a dataset (report: the same as `check --json`)."""

    images: int
    usable: int
    skipped: list[dict]
    duplicates: Duplicates
    report: CheckReport = field(repr=False)


def check(data: str | os.PathLike, *, val_fraction: float = 0.2, seed: int = 0,
          labels: LabelFileOptions | None = None) -> CheckResult:
    """Inspect every file of a dataset: counts, unusable files, duplicates and train/val leakage."""
    report: CheckReport = check_dataset(os.fspath(data), val_fraction, seed, labels=labels)
    return CheckResult(report["images"], report["usable"], report["skipped"], report["duplicates"], report)


def lr_find(data: str | os.PathLike, *, start_lr: float = 1e-7, end_lr: float = 10.0, steps: int = 100,
            output: str | os.PathLike | None = None, observer: Observer | Emit | None = None,
            **settings) -> LrFindResult:
    """The learning-rate range test on data with these settings (as finetune.train's); lr_find.png and lr_find.json
    written to output (default runs/lr-find-<date>-<time>-<model>; result.files names them). The model is thrown
    away after."""
    with spelled_as("keyword"):
        cfg, _ = request.train_config(data, settings)
        result = run_lr_find(cfg, start_lr, end_lr, steps, observer or silent)
    result.files = write_lr_result(Path(output) if output is not None else timestamped_dir("lr-find", cfg.model),
                                   result)
    return result


def tune(data: str | os.PathLike, *, trials: int = 20, coarse_epochs: int = 3, fine_epochs: int = 10,
         budget: str | float | None = None, pruner: str = "median", modes: Sequence[str] = MODES,
         output: str | os.PathLike | None = None, observer: Observer | Emit | None = None,
         stop: Callable[[], int] | None = None, **settings) -> TuneResult:
    """Hyper-parameter search (Optuna: TPE, pruning) over the settings finetune tune searches, in these modes, the
    others as given (finetune.train's keywords); every trial and the best settings (best.json) in output."""
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise UsageError(f"tune: modes={list(modes)!r}: choose among {', '.join(MODES)}")
    with spelled_as("keyword"):
        cfg, _ = request.train_config(data, settings)
        root = Path(output) if output is not None else timestamped_dir("tune", cfg.model)
        seconds = parse_duration(budget, option("budget")) or None
        return run_search(cfg, root, trials, coarse_epochs, fine_epochs, seconds, cfg.seed, Space(mode=tuple(modes)),
                          observer or silent, pruner=pruner, stop=stop or (lambda: 0))


def serve(model: Model | str | os.PathLike | Sequence[str | os.PathLike], *, host: str = "127.0.0.1",
          port: int = 8000, settings: ServeSettings | None = None, tta: bool = False,
          on_ready: Callable[[str], None] = lambda url: None) -> int | None:
    """Serve a model (the page and the HTTP API of `finetune serve`) until SIGINT/SIGTERM; on_ready(url) once it
    listens. Returns the signal that stopped it."""
    web()  # the serve extra, before the model takes seconds to load
    settings = settings or ServeSettings()
    paths = _paths(model)
    predictor = load_predictor(paths, model.device if isinstance(model, Model) else "auto", tta, settings.max_pixels)
    app = create_app(ServedModel(predictor, settings.max_pixels), paths, settings)
    sock = bind(host, port)
    shown = f"[{host}]" if ":" in host else host
    on_ready(f"http://{shown}:{sock.getsockname()[1]}/")
    return run_server(app, sock)
