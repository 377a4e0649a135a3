"""The model file: one self-describing file per model (plain types and tensors only), written atomically and
read with weights_only=True. Its .pt and .safetensors exports carry the same description and read back here."""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from finetune._about import __version__
from finetune._util.files import atomic_write
from finetune.data.preprocessing import Preprocessing
from finetune.errors import ModelFileError
from finetune.models.registry import Network, build_network
from finetune.models.timm import is_timm

FORMAT = "finetune-model"
FORMAT_VERSION = 2  # the newest this finetune reads; 2: multi_label and thresholds (only multi-label files need it)
EXPORT_FORMAT = "finetune-export"  # the .pt and .safetensors exports (export.py)
_PREPROCESSING_KEYS = ("resize_size", "crop_size", "mean", "std", "interpolation")


def versions() -> dict:
    """Library versions that produced a file."""
    import torch
    import torchvision

    return {"finetune": __version__, "torch": str(torch.__version__), "torchvision": str(torchvision.__version__)}


@dataclass
class ModelFile:
    """What a model file holds. state_dict uses torchvision's key names (see Network.plain_state_dict)."""

    arch: str
    classes: list[str]
    preprocessing: Preprocessing
    state_dict: dict
    head: str = ""
    dropout: float = 0.0
    base_weights: str | None = None
    metrics: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    temperature: float = 1.0  # probabilities = softmax(logits / temperature); 1.0 = uncalibrated
    members: list[dict] | None = None  # an exported ensemble: each member's arch, temperature, metrics
    multi_label: bool = False  # one sigmoid per class: probabilities = sigmoid(logits / temperature)
    thresholds: list[float] | None = None  # multi-label: a class is predicted at probability >= its threshold
    source: str = ""  # the path it was read from

    def payload(self) -> dict:
        """The dict torch.save writes: plain types and tensors only, so weights_only=True can read it."""
        # A single-label file stays version 1, so an older finetune still reads it; a multi-label one is version 2,
        # which an older finetune refuses rather than misreading its sigmoids as a softmax.
        extra = {"multi_label": True, "thresholds": [float(t) for t in self.thresholds or []]} \
            if self.multi_label else {}
        return {"format": FORMAT, "format_version": 2 if self.multi_label else 1, **extra,
                "arch": self.arch, "head": self.head,
                "dropout": float(self.dropout), "classes": list(self.classes), "base_weights": self.base_weights,
                "preprocessing": self.preprocessing.to_dict(), "metrics": self.metrics, "config": self.config,
                "temperature": float(self.temperature), "versions": versions(),
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "state_dict": self.state_dict}

    def describe(self) -> str:
        """One line for users: arch, classes, val accuracy."""
        acc, mean_ap = self.metrics.get("val_acc"), self.metrics.get("val_map")
        what = f"ensemble of {len(self.members)}" if self.members else self.arch
        if self.multi_label:
            return f"{what}, multi-label, {len(self.classes)} classes" + (
                f", val mAP {mean_ap:.3f}" if mean_ap is not None else "")
        return f"{what}, {len(self.classes)} classes" + (f", val accuracy {acc:.1%}" if acc is not None else "")


def save_model_file(path: str | os.PathLike, model: ModelFile) -> Path:
    """Write a finetune model file atomically."""
    import torch

    return atomic_write(path, lambda tmp: torch.save(model.payload(), tmp), "choose another run folder with -o")


def update_model_file(path: str | os.PathLike, **fields) -> Path:
    """Rewrite a model file (atomically) with some fields replaced, e.g. a fitted temperature."""
    return save_model_file(path, replace(load_model_file(path), **fields))


def _read(p: Path) -> dict:
    import torch

    if p.suffix.lower() == ".safetensors":
        return _read_safetensors(p)
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch's advice (weights_only=False) must never reach users
        raise ModelFileError(f"{p}: not a finetune model file (truncated, corrupt, not PyTorch, or it holds Python "
                             f"objects that could run code: {type(e).__name__}); refused") from None
    if not isinstance(obj, dict) or obj.get("format") not in (FORMAT, EXPORT_FORMAT):
        raise ModelFileError(f"{p}: a PyTorch file, but not a finetune model file (no '{FORMAT}' header); "
                             "use `--weights PATH` to start training from a plain state_dict")
    return obj


def _read_safetensors(p: Path) -> dict:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(p), "pt") as f:
            info = json.loads((f.metadata() or {})["finetune"])
        return info | {"state_dict": load_file(str(p))}
    except (KeyError, ValueError, TypeError):
        raise ModelFileError(f"{p}: a safetensors file without finetune's metadata; use `--weights PATH` to start "
                             "training from it") from None
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise ModelFileError(f"{p}: not a readable safetensors file ({type(e).__name__})") from None


def load_model_file(path: str | os.PathLike) -> ModelFile:
    """Load and validate a finetune model file (or its .pt / .safetensors export) without unpickling code."""
    p = Path(path)
    if not p.is_file():
        raise ModelFileError(f"{p}: no such model file; train one with `finetune train DATA` or pass --model PATH")
    if p.stat().st_size == 0:
        raise ModelFileError(f"{p}: the model file is empty (0 bytes)")
    obj = _read(p)
    if obj.get("format_version", 0) > FORMAT_VERSION:
        raise ModelFileError(f"{p}: written by a newer finetune (format {obj['format_version']}); upgrade finetune")
    return validated_description(obj, p, with_state=True)


def validated_description(obj: dict, p: Path, with_state: bool = False) -> ModelFile:
    """A ModelFile from a loaded dict (or an exported program's metadata), refusing one whose description is
    missing or malformed; with_state, its state_dict of tensors too (a description alone needs no torch)."""
    def bad(what: str):
        raise ModelFileError(f"{p}: a damaged finetune model file ({what}); train or export it again")

    state = obj.get("state_dict", {}) if with_state else {}
    if with_state and not _tensors(state):
        bad("no state_dict of tensors")
    classes = obj.get("classes")
    if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) for c in classes):
        bad("no list of class names")
    if not isinstance(obj.get("arch"), str):
        bad("no architecture name")
    pre = obj.get("preprocessing")
    if not isinstance(pre, dict) or any(k not in pre for k in _PREPROCESSING_KEYS):
        bad("no preprocessing")
    try:
        return ModelFile(arch=obj["arch"], classes=classes, preprocessing=Preprocessing.from_dict(pre),
                         state_dict=state, head=str(obj.get("head") or ""), dropout=float(obj.get("dropout") or 0.0),
                         base_weights=obj.get("base_weights"), metrics=dict(obj.get("metrics") or {}),
                         config=dict(obj.get("config") or {}), temperature=float(obj.get("temperature", 1.0)),
                         members=obj.get("members"), source=str(p), multi_label=bool(obj.get("multi_label", False)),
                         thresholds=_thresholds(obj, len(classes), bad))
    except (TypeError, ValueError):
        bad("malformed fields")


def _tensors(state) -> bool:
    import torch

    return isinstance(state, dict) and bool(state) and all(isinstance(v, torch.Tensor) for v in state.values())


def _thresholds(obj: dict, n: int, bad) -> list[float] | None:
    """A multi-label file's thresholds: one number per class in (0, 1); none stored means 0.5 each."""
    values = obj.get("thresholds") or None
    if values is None:
        return None
    if not isinstance(values, list) or len(values) != n or not all(
            isinstance(v, (int, float)) and 0 < v < 1 for v in values):
        bad("thresholds are not one probability per class")
    return [float(v) for v in values]


def network_from_file(path: str | os.PathLike) -> tuple[Network, ModelFile]:
    """(eval-mode Network, its ModelFile) from a single-model file; its weights must fit its architecture."""
    mf = load_model_file(path)
    if mf.members:
        raise ModelFileError(f"{path}: an exported ensemble; load it with finetune.models.ensemble.load_members")
    return network_from(mf, mf.arch, mf.state_dict, mf.dropout), mf


def network_from(mf: ModelFile, arch: str, state: dict, dropout: float) -> Network:
    """Build arch for mf's classes and load state (torchvision key names) into it."""
    import torchvision

    if not is_timm(arch) and arch not in torchvision.models.list_models(module=torchvision.models):
        raise ModelFileError(f"{mf.source}: names architecture {arch!r}, which this torchvision "
                             f"({torchvision.__version__}) does not have; upgrade torchvision or re-export the model")
    net = build_network(arch, len(mf.classes), dropout)
    try:
        net.load_plain_state(state)
    except RuntimeError as e:
        raise ModelFileError(f"{mf.source}: weights do not match {arch} ({str(e).splitlines()[0][:160]})") from None
    net.module.eval()
    return net
