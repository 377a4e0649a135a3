"""The model behind `finetune serve`: an uploaded image's bytes -> its preprocessed input(s) -> batched
probabilities, with predict's preprocessing, temperatures, test-time augmentation and ensemble averaging."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from finetune.data.images import decode_bytes
from finetune.inference.predictor import Ensemble, Predictor

# Pixels in one upload: above every phone photo (12-50 MP) and far below Pillow's bomb limit (179 MP, whose images
# each cost 0.7 GB to decode; a 64-MP PNG costs 256 MB). Beyond it an upload gets 413, read from its header.
SERVE_MAX_PIXELS = 64_000_000


class ServedModel:
    """A Predictor or an Ensemble, taking images as bytes and probabilities in batches (thread-safe for one
    inference thread plus any number of decoding threads)."""

    def __init__(self, predictor: Predictor | Ensemble, max_pixels: int = SERVE_MAX_PIXELS):
        self.predictor = predictor
        self.members: list[Predictor] = list(predictor.members)
        self.classes: list[str] = predictor.classes
        self.info = predictor.info
        self.max_pixels = max_pixels
        # An image is prepared once per distinct preprocessing among the members.
        self.preprocessings = list(dict.fromkeys(m.info.preprocessing for m in self.members))
        self.group = [self.preprocessings.index(m.info.preprocessing) for m in self.members]
        self.transforms = [p.eval_transform() for p in self.preprocessings]
        # Multi-label (one model: ensembles of them are refused): sigmoids, and every label at its threshold.
        self.multi_label, self.thresholds = predictor.multi_label, predictor.thresholds

    def prepare(self, data: bytes, deadline: float | None = None) -> tuple:
        """One input per distinct preprocessing, from an image's bytes (raises what decoding raises: DecodeBusy
        when the decode budget has no room before deadline, a time.monotonic(); None: no deadline)."""
        from torchvision.transforms.v2 import functional as F

        inputs = []
        for pre, transform in zip(self.preprocessings, self.transforms):
            # Decoded for each preprocessing, as predict does: a JPEG's reduced-size decode depends on the size.
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            img = decode_bytes(data, min_side=pre.resize_size, max_pixels=self.max_pixels, wait=wait)
            img = F.resize(img, pre.resize_size, antialias=True) if min(img.size) > pre.resize_size else img
            inputs.append(transform(F.pil_to_tensor(img)))
        return tuple(inputs)

    def probabilities(self, items: Sequence[tuple]):
        """images x classes probabilities: softmax(logits / temperature), averaged over an ensemble's members;
        for a multi-label model sigmoid(logits / temperature), each class on its own."""
        import torch

        probs = []
        for member, g in zip(self.members, self.group):
            scaled = member.logits(torch.stack([item[g] for item in items])) / member.temperature
            probs.append(scaled.sigmoid() if self.multi_label else scaled.softmax(1))
        return torch.stack(probs).mean(0)

    def answer(self, probs, k: int) -> dict:
        """One image's answer, as predict --json writes it: the top k (and, multi-label, the labels chosen)."""
        out = {"predictions": self.top(probs, k)}
        if self.multi_label:
            out["labels"] = [{"class": c, "probability": round(float(p), 6)}
                             for c, p, t in zip(self.classes, probs.tolist(), self.thresholds) if p >= t]
        return out

    def top(self, probs, k: int) -> list[dict]:
        """The k most probable classes of one image, as predict --json writes them."""
        values, indices = probs.topk(max(1, min(k, len(self.classes))))
        return [{"class": self.classes[j], "probability": round(float(v), 6)}
                for v, j in zip(values.tolist(), indices.tolist())]

    def card(self, paths: Sequence[str]) -> dict:
        """What GET /model answers: names, classes, preprocessing, metrics, base weights, runtime."""
        info = self.info
        metrics = info.metrics
        return {"name": ", ".join(Path(p).name for p in paths), "arch": info.arch, "classes": self.classes,
                "num_classes": len(self.classes), "description": info.describe(),
                "val_accuracy": metrics.get("val_acc"), "base_weights": info.base_weights,
                "preprocessing": info.preprocessing.to_dict(), "temperature": info.temperature, "metrics": metrics,
                "runtime": ", ".join(sorted({m.model.runtime for m in self.members})),
                "int8": "int8" in metrics or any("int8" in m.info.metrics for m in self.members),
                "tta": self.members[0].tta,
                "members": [{"file": Path(p).name, "arch": m.info.arch, "val_accuracy": m.info.metrics.get("val_acc"),
                             "base_weights": m.info.base_weights} for p, m in zip(paths, self.members)]
                if len(self.members) > 1 else (info.members or [])}
