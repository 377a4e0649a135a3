"""Batched inference over files, folders and globs; unusable files are named, the rest predicted."""

from __future__ import annotations

import filecmp
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from finetune._util.files import earlier_rows, write_csv_atomic
from finetune.config import MAX_PIXELS
from finetune.data.inputs import Failure, load_input, loaded_chunks
from finetune.errors import UsageError
from finetune.formats.load import Runnable, load_runnable
from finetune.models.ensemble import check_ensemble, mean_probabilities
from finetune.models.model_file import ModelFile
from finetune.tasks.multilabel import parse_thresholds


@dataclass
class Prediction:
    path: str
    top: list[tuple[str, float]]  # (class, probability), best first
    logits: list[float] | None = None  # raw, in the model's class order (before any temperature)
    members: list[list[float]] | None = None  # an ensemble's: each member's probabilities, in class order
    labels: list[tuple[str, float]] | None = None  # multi-label: every label at or above its threshold, best first


def _top(probs, classes: list[str], k: int) -> list[tuple[str, float]]:
    values, indices = probs.topk(k)
    return [(classes[j], float(v)) for v, j in zip(values.tolist(), indices.tolist())]


class Classifier(Protocol):
    """What every predictor offers (Predictor, Ensemble, the torch-free LitePredictor): predict, and what a caller
    may need to know about it, declared rather than probed for."""

    info: ModelFile  # the (first) model file's description: arch, classes, preprocessing, metrics
    classes: list[str]
    multi_label: bool  # sigmoids, each label decided at its threshold (ensembles and LitePredictor: never)
    thresholds: list[float] | None  # multi-label: each class's decision threshold; else None
    members: list  # the Predictors whose probabilities it averages (a single model: itself)
    runtime: str  # what runs it: torch, onnxruntime, openvino, ...

    def predict(self, paths: Sequence, top_k: int = 3, batch_size: int = 32, workers: int = 2,
                on_progress: Callable[[int], None] = lambda n: None) -> Iterator[Prediction | Failure]:
        """A Prediction or a Failure per input, in order."""


class Predictor:
    """A loaded model plus its own preprocessing, ready to classify images."""

    def __init__(self, model: Runnable, tta: bool = False, max_pixels: int = MAX_PIXELS,
                 thresholds: Sequence[str] | None = None):
        self.model = model
        self.info = model.info
        self.runtime: str = model.runtime  # what runs it: torch, onnxruntime, openvino, ...
        self.members = [self]
        self.classes: list[str] = model.info.classes
        self.multi_label = model.info.multi_label  # sigmoid per class, a label where it reaches its threshold
        if thresholds and not self.multi_label:
            raise UsageError(f"--threshold: {model.info.source} is a single-label model (its answer is the most "
                             "probable class); thresholds apply to multi-label models")
        self.thresholds = parse_thresholds(thresholds, self.classes, model.info.thresholds) if self.multi_label \
            else None
        self.temperature = model.info.temperature  # fitted by train --calibrate; 1.0 otherwise
        self.tta = tta  # test-time augmentation: logits averaged over the image and its mirror image
        self.transform = model.info.preprocessing.eval_transform()
        self.short_side = model.info.preprocessing.resize_size
        self.max_pixels = max_pixels

    def _load(self, path: str):
        from torchvision.transforms.v2 import functional as F

        img = load_input(path, self.short_side, self.max_pixels)
        if min(img.size) > self.short_side:
            img = F.resize(img, self.short_side, antialias=True)
        return self.transform(F.pil_to_tensor(img))

    def logits(self, batch):
        """Raw logits for a preprocessed batch (with --tta, the mean of the batch's and its mirror's)."""
        out = self.model.forward(batch)
        return (out + self.model.forward(batch.flip(-1))) / 2 if self.tta else out

    def batches(self, paths: Sequence[str], batch_size: int = 32, workers: int = 2,
                on_progress: Callable[[int], None] = lambda n: None):
        """Preprocessed batches, in order: ([(path, failure reason or None)], stacked good images or None)."""
        import torch

        for chunk, good in loaded_chunks(paths, self._load, batch_size, workers, on_progress):
            yield chunk, torch.stack(good) if good else None

    def predict(self, paths: Sequence[str], top_k: int = 3, batch_size: int = 32, workers: int = 2,
                on_progress: Callable[[int], None] = lambda n: None) -> Iterator[Prediction | Failure]:
        """Yield a Prediction or a Failure per path, in order."""
        k = max(1, min(top_k, len(self.classes)))
        for chunk, batch in self.batches(paths, batch_size, workers, on_progress):
            logits = self.logits(batch) if batch is not None else None
            good = iter(range(len(batch) if batch is not None else 0))
            for path, err in chunk:
                if err is not None:
                    yield Failure(path, err)
                    continue
                z = logits[next(good)]
                if self.multi_label:
                    yield self._labels(path, z, k)
                    continue
                yield Prediction(path, _top((z / self.temperature).softmax(0), self.classes, k), z.tolist())

    def _labels(self, path: str, z, k: int) -> Prediction:
        probs = (z / self.temperature).sigmoid()
        chosen = [(c, float(p)) for c, p, t in zip(self.classes, probs.tolist(), self.thresholds) if p >= t]
        return Prediction(path, _top(probs, self.classes, k), z.tolist(), labels=sorted(chosen, key=lambda x: -x[1]))


class Ensemble:
    """Several models trained on the same classes; their probabilities (each model with its own
    preprocessing and temperature) are averaged. Same interface as Predictor."""

    def __init__(self, members: Sequence[Predictor]):
        self.members = list(members)
        check_ensemble([m.info for m in self.members])  # multi-label members are refused
        self.info = self.members[0].info
        self.classes = self.members[0].classes
        self.multi_label, self.thresholds = False, None
        self.runtime = "/".join(dict.fromkeys(m.runtime for m in self.members))
        self.temperature = 1.0  # each member applies its own; Prediction.logits are log mean probabilities

    def predict(self, paths: Sequence[str], top_k: int = 3, batch_size: int = 32, workers: int = 2,
                on_progress: Callable[[int], None] = lambda n: None) -> Iterator[Prediction | Failure]:
        """Yield a Prediction (mean probabilities; members' probabilities attached) or a Failure per path."""
        import torch

        k = max(1, min(top_k, len(self.classes)))
        temperatures = [m.temperature for m in self.members]
        if all(m.info.preprocessing == self.info.preprocessing for m in self.members):
            # One preprocessing: decode each image once and run every member on the same batch.
            for chunk, batch in self.members[0].batches(paths, batch_size, workers, on_progress):
                logits = [m.logits(batch) for m in self.members] if batch is not None else []
                each = torch.stack([(z / t).softmax(1) for z, t in zip(logits, temperatures)], 1) if logits else None
                mean = mean_probabilities(logits, temperatures) if logits else None
                good = iter(range(len(batch) if batch is not None else 0))
                for path, err in chunk:
                    i = None if err is not None else next(good)
                    yield Failure(path, err) if err is not None else self._combine(path, mean[i], each[i], k)
            return
        yield from self._members_in_turn(paths, k, batch_size, workers, on_progress)

    def _members_in_turn(self, paths, k, batch_size, workers, on_progress):
        """Members with their own preprocessing take turns over chunks: memory stays bounded on any folder."""
        import torch

        step, n = batch_size * 8, len(self.classes)
        temperatures = [m.temperature for m in self.members]
        for start in range(0, len(paths), step):
            chunk = list(paths[start:start + step])
            runs = [{r.path: r for r in m.predict(chunk, n, batch_size, workers)} for m in self.members]
            on_progress(len(chunk))
            for path in chunk:
                results = [run[path] for run in runs]
                failed = next((r for r in results if isinstance(r, Failure)), None)
                if failed is not None:
                    yield failed
                    continue
                logits = [torch.tensor([r.logits]) for r in results]
                each = torch.stack([(z[0] / t).softmax(0) for z, t in zip(logits, temperatures)])
                yield self._combine(path, mean_probabilities(logits, temperatures)[0], each, k)

    def _combine(self, path: str, mean, member_probs, k: int) -> Prediction:
        return Prediction(path, _top(mean, self.classes, k), mean.clamp_min(1e-12).log().tolist(),
                          member_probs.tolist())


def load_predictor(model_paths: Sequence[str | os.PathLike], device: str = "auto", tta: bool = False,
                   max_pixels: int = MAX_PIXELS, thresholds: Sequence[str] | None = None,
                   runtime: str = "auto") -> Predictor | Ensemble:
    """One model file: a Predictor; several: an Ensemble averaging their probabilities. runtime: see runtimes.py."""
    members = [Predictor(load_runnable(p, device, runtime), tta, max_pixels, thresholds) for p in model_paths]
    return members[0] if len(members) == 1 else Ensemble(members)


SORTED_LOG = "sorted.csv"


def sort_into(predictions: Sequence[Prediction], dest: str | os.PathLike, min_confidence: float = 0.0) -> dict:
    """Copy each image into dest/<predicted class>/ (dest/unsure/ below min_confidence) and log it in
    dest/sorted.csv (after the rows of earlier sorts). Never moves or overwrites: an identical file already there is left as is (sorting again
    copies nothing twice); another file of the same name gets a numbered copy. Returns counts per folder."""
    dest = Path(dest)
    classes = {c for p in predictions for c, _ in (p.labels if p.labels is not None else p.top)}
    unsure = "unsure" if "unsure" not in classes else "_unsure"
    none = "none" if "none" not in classes else "_none"  # multi-label: no label reached its threshold
    rows, counts = [], {}
    for p in predictions:
        if p.labels is not None:  # a copy in every predicted label's folder
            places = [(c, prob, c) for c, prob in p.labels] or [("", 0.0, none)]
        else:
            cls, prob = p.top[0]
            places = [(cls, prob, cls if prob >= min_confidence else unsure)]
        for cls, prob, name in places:
            folder = dest / name
            folder.mkdir(parents=True, exist_ok=True)
            target, copied = copy_into(Path(p.path), folder)
            counts[folder.name] = counts.get(folder.name, 0) + 1
            rows.append({"source": p.path, "predicted": cls, "probability": f"{prob:.6f}", "copied_to": str(target),
                         "action": "copied" if copied else "already there"})
    log = write_csv_atomic(dest / SORTED_LOG, ["source", "predicted", "probability", "copied_to", "action"],
                           earlier_rows(dest / SORTED_LOG) + rows)
    return {"folders": dict(sorted(counts.items())), "log": log,
            "copied": sum(r["action"] == "copied" for r in rows)}


def copy_into(source: Path, folder: Path) -> tuple[Path, bool]:
    """(where source is in folder, whether it was copied now): the first free name, or an identical file."""
    candidate, n = folder / source.name, 2
    while candidate.exists():
        if filecmp.cmp(candidate, source, shallow=False):
            return candidate, False
        candidate, n = folder / f"{source.stem}-{n}{source.suffix}", n + 1
    shutil.copy2(source, candidate)
    return candidate, True
