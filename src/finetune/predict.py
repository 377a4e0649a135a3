"""Batched inference over files, folders and globs; unreadable files are reported, the rest predicted."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from finetune import data as D
from finetune.checkpoint import check_ensemble
from finetune.errors import FinetuneError


@dataclass
class Prediction:
    path: str
    top: list[tuple[str, float]]  # (class, probability), best first
    logits: list[float] | None = None  # raw, in the model's class order (before any temperature)
    members: list[list[float]] | None = None  # an ensemble's: each member's probabilities, in class order


@dataclass
class Failure:
    path: str
    reason: str


def expand_inputs(items: Sequence[str]) -> tuple[list[str], list[Failure]]:
    """Files as given, folders searched recursively for images, globs expanded; unmatched items reported."""
    found: list[str] = []
    missing: list[Failure] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found.extend(D.images_under(p))
        elif p.is_file():
            found.append(str(p))
        else:
            matches = sorted(glob.glob(item, recursive=True))
            files = [m for m in matches if os.path.isfile(m)]
            files += [f for m in matches if os.path.isdir(m) for f in D.images_under(Path(m))]
            if files:
                found.extend(files)
            else:
                missing.append(Failure(item, "no such file, folder or matching glob"))
    # Keep order, drop repeats (a file named twice, or by a folder and a glob).
    seen: set[str] = set()
    unique = [f for f in found if not (os.path.realpath(f) in seen or seen.add(os.path.realpath(f)))]
    return unique, missing


class Predictor:
    """A loaded model plus its own preprocessing, ready to classify images."""

    def __init__(self, model_path: str | os.PathLike, device: str = "auto", tta: bool = False):
        from finetune.checkpoint import model_from_file
        from finetune.devices import resolve_device

        self.device = resolve_device(device)
        model, meta = model_from_file(model_path)
        self.model = model.to(self.device)
        self.meta = meta
        self.classes: list[str] = meta["classes"]
        self.temperature = float(meta.get("temperature", 1.0))  # fitted by train --calibrate; 1.0 otherwise
        self.tta = tta  # test-time augmentation: logits averaged over the image and its mirror image
        self.transform = D.eval_transform(meta["preprocessing"])
        self.short_side = meta["preprocessing"]["resize_size"]

    def _load(self, path: str):
        return self.transform(D.decode_to_tensor(path, self.short_side))

    def logits(self, batch):
        """Raw logits for a preprocessed batch (with --tta, the mean of the batch's and its mirror's)."""
        import torch

        with torch.inference_mode():
            x = batch.to(self.device)
            out = self.model(x).float()
            if self.tta:
                out = (out + self.model(x.flip(-1)).float()) / 2
            return out.cpu()

    def batches(self, paths: Sequence[str], batch_size: int = 32, workers: int = 2):
        """Preprocessed batches, in order: ([(path, failure reason or None)], stacked good images or None);
        decoding runs in threads ahead of the model."""
        import torch

        def load(path):
            try:
                return path, self._load(path), None
            except Exception as e:  # noqa: BLE001 - any decode failure: report this file, go on
                return path, None, D.failure_reason(path, e)

        with ThreadPoolExecutor(max(1, workers)) as pool:
            for start in range(0, len(paths), batch_size):
                chunk = list(pool.map(load, paths[start:start + batch_size]))
                good = [x for _, x, err in chunk if err is None]
                yield [(path, err) for path, _, err in chunk], torch.stack(good) if good else None

    def predict(self, paths: Sequence[str], top_k: int = 3, batch_size: int = 32,
                workers: int = 2) -> Iterator[Prediction | Failure]:
        """Yield a Prediction or a Failure per path, in order."""
        k = max(1, min(top_k, len(self.classes)))
        for chunk, batch in self.batches(paths, batch_size, workers):
            logits = self.logits(batch) if batch is not None else None
            good = iter(range(len(batch) if batch is not None else 0))
            for path, err in chunk:
                if err is not None:
                    yield Failure(path, err)
                    continue
                z = logits[next(good)]
                yield Prediction(path, _top((z / self.temperature).softmax(0), self.classes, k), z.tolist())


def _top(probs, classes: list[str], k: int) -> list[tuple[str, float]]:
    values, indices = probs.topk(k)
    return [(classes[j], float(v)) for v, j in zip(values.tolist(), indices.tolist())]


class Ensemble:
    """Several models trained on the same classes; their probabilities (each model with its own
    preprocessing and temperature) are averaged. Same interface as Predictor."""

    def __init__(self, model_paths: Sequence[str | os.PathLike], device: str = "auto", tta: bool = False):
        self.members = [Predictor(p, device, tta) for p in model_paths]
        self.paths = [str(p) for p in model_paths]
        check_ensemble(self.paths, [m.meta for m in self.members])
        self.classes = self.members[0].classes
        self.temperature = 1.0  # each member applies its own; Prediction.logits are log mean probabilities

    def predict(self, paths: Sequence[str], top_k: int = 3, batch_size: int = 32,
                workers: int = 2) -> Iterator[Prediction | Failure]:
        """Yield a Prediction (mean probabilities; members' probabilities attached) or a Failure per path."""
        import torch

        k = max(1, min(top_k, len(self.classes)))
        if all(m.meta["preprocessing"] == self.members[0].meta["preprocessing"] for m in self.members):
            # One preprocessing: decode each image once and run every member on the same batch.
            for chunk, batch in self.members[0].batches(paths, batch_size, workers):
                probs = torch.stack([(m.logits(batch) / m.temperature).softmax(1) for m in self.members],
                                    dim=1) if batch is not None else None  # images x members x classes
                good = iter(range(len(batch) if batch is not None else 0))
                for path, err in chunk:
                    yield Failure(path, err) if err is not None else self._combine(path, probs[next(good)], k)
            return
        step = batch_size * 8  # members take turns over chunks: memory stays bounded on any folder size
        n = len(self.classes)
        for start in range(0, len(paths), step):
            chunk = list(paths[start:start + step])
            runs = [{r.path: r for r in m.predict(chunk, n, batch_size, workers)} for m in self.members]
            for path in chunk:
                results = [run[path] for run in runs]
                failed = next((r for r in results if isinstance(r, Failure)), None)
                if failed is not None:
                    yield failed
                    continue
                yield self._combine(path, torch.stack([(torch.tensor(r.logits) / m.temperature).softmax(0)
                                                       for r, m in zip(results, self.members)]), k)

    def _combine(self, path: str, member_probs, k: int) -> Prediction:
        """member_probs: members x classes. The mean, its log as the logits, and each member's probabilities."""
        mean = member_probs.mean(0)
        return Prediction(path, _top(mean, self.classes, k), mean.clamp_min(1e-12).log().tolist(),
                          member_probs.tolist())


def load_predictor(model_paths: Sequence[str | os.PathLike], device: str = "auto",
                   tta: bool = False) -> Predictor | Ensemble:
    """One model file: a Predictor; several: an Ensemble averaging their probabilities."""
    if len(model_paths) == 1:
        return Predictor(model_paths[0], device, tta)
    return Ensemble(model_paths, device, tta)


def check_inputs(paths: list[str], missing: list[Failure]) -> None:
    """Fail when nothing at all can be predicted."""
    if not paths:
        what = ", ".join(f.path for f in missing) or "(nothing given)"
        raise FinetuneError(f"no images found in {what}; pass image files, folders or globs", exit_code=2)


def sort_into(predictions: Sequence[Prediction], dest: str | os.PathLike, min_confidence: float = 0.0) -> Path:
    """Copy each image into dest/<predicted class>/ (dest/unsure/ below min_confidence) and log it to a CSV.

    Never moves or overwrites anything: a name already taken gets a numbered suffix. Returns the CSV path.
    """
    import csv
    import io
    import shutil

    from finetune.checkpoint import write_text_atomic

    dest = Path(dest)
    classes = {p.top[0][0] for p in predictions}
    unsure = "unsure" if "unsure" not in classes else "_unsure"
    rows = []
    for p in predictions:
        cls, prob = p.top[0]
        folder = dest / (cls if prob >= min_confidence else unsure)
        folder.mkdir(parents=True, exist_ok=True)
        target = _free_name(folder / Path(p.path).name)
        shutil.copy2(p.path, target)
        rows.append({"source": p.path, "predicted": cls, "probability": f"{prob:.6f}", "copied_to": str(target)})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["source", "predicted", "probability", "copied_to"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return write_text_atomic(_free_name(dest / "sorted.csv"), buf.getvalue())


def _free_name(path: Path) -> Path:
    """path, or path with -2, -3, ... before the suffix: the first name not taken."""
    n = 2
    candidate = path
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
        n += 1
    return candidate
