"""Load any model file finetune writes, ready to run: the training checkpoint (best.pt) and every export
(.pt, .safetensors, .pt2, .onnx), each through the same safety checks, each with its description
(classes, preprocessing, temperature, metrics) as a ModelFile."""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from finetune.checkpoint import ModelFile, load_model_file, network_from, validated_description
from finetune.devices import resolve_device
from finetune.ensemble import module_from_file
from finetune.errors import ModelFileError, UsageError

PROGRAM_SUFFIXES = (".pt2", ".onnx")


@dataclass
class Runnable:
    """A model ready for inference: forward(batch) -> float32 logits on the CPU."""

    info: ModelFile
    forward: Callable
    device: object  # torch.device the inputs go to
    runtime: str  # torch | onnx


def load_runnable(path: str | os.PathLike, device: str = "auto") -> Runnable:
    """The model in path, whatever format finetune wrote it in."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix == ".onnx":
        return _onnx(p)
    if suffix == ".pt2":
        return _pt2(p, resolve_device(device))
    return _torch(load_model_file(p), resolve_device(device))


def _torch(mf: ModelFile, device) -> Runnable:
    import torch

    module = module_from_file(mf) if mf.members else network_from(mf, mf.arch, mf.state_dict, mf.dropout).module
    module = module.to(device).eval()

    def forward(x):
        with torch.inference_mode():
            return module(x.to(device)).float().cpu()

    return Runnable(mf, forward, device, "torch")


def _onnx(p: Path) -> Runnable:
    import torch

    try:
        import onnxruntime as ort
    except ImportError:
        raise UsageError(f"{p}: running an .onnx model needs onnxruntime: pip install 'finetune[onnx]'") from None
    _exists(p)
    try:
        session = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
        info = json.loads(session.get_modelmeta().custom_metadata_map["finetune"])
    except KeyError:
        raise ModelFileError(f"{p}: an ONNX model without finetune's metadata (classes, preprocessing)") from None
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own error types
        raise ModelFileError(f"{p}: not a loadable ONNX model ({type(e).__name__}: {str(e)[:120]})") from None
    name = session.get_inputs()[0].name

    def forward(x):
        return torch.from_numpy(session.run(None, {name: x.float().numpy()})[0]).float()

    return Runnable(validated_description(info, p), forward, torch.device("cpu"), "onnx")


def _exists(p: Path) -> None:
    if not p.is_file():
        raise ModelFileError(f"{p}: no such model file")
    if p.stat().st_size == 0:
        raise ModelFileError(f"{p}: the model file is empty (0 bytes)")


def _pt2(p: Path, device) -> Runnable:
    import torch

    _exists(p)
    info = check_pt2(p)
    program = torch.export.load(p)  # safe: check_pt2 found nothing torch would unpickle
    module = program.module().to(device)

    def forward(x):
        with torch.inference_mode():
            return module(x.to(device)).float().cpu()

    return Runnable(validated_description(info, p), forward, device, "torch")


def check_pt2(p: Path) -> dict:
    """finetune's metadata of a .pt2 archive, after checking that loading it unpickles nothing.

    torch.export.load falls back to pickle (weights_only=False) for weights or constants marked use_pickle,
    custom objects, and sample inputs that weights_only=True cannot read; a file needing any of those is
    refused before torch sees it.
    """
    import torch

    def refuse(why: str):
        raise ModelFileError(f"{p}: refused: {why}, so loading it could run code; use finetune's .pt, "
                             ".safetensors or .onnx export instead")

    try:
        with zipfile.ZipFile(p) as z:
            names = z.namelist()
            extra = [n for n in names if n.endswith("/extra/finetune.json")]
            if not extra:
                raise ModelFileError(f"{p}: not a .pt2 program exported by finetune (no finetune.json inside)")
            for n in names:
                if n.endswith("_config.json"):
                    for key, meta in json.loads(z.read(n))["config"].items():
                        if meta.get("use_pickle") or not meta.get("path_name", "").startswith(("weight_", "tensor_")):
                            refuse(f"{key} is stored as a Python object")
                elif n.endswith(".pt"):
                    try:
                        torch.load(io.BytesIO(z.read(n)), weights_only=True)
                    except Exception:  # noqa: BLE001
                        refuse(f"{n} holds Python objects")
            return json.loads(z.read(extra[0]))
    except (zipfile.BadZipFile, KeyError, ValueError, OSError) as e:
        raise ModelFileError(f"{p}: not a readable .pt2 archive ({type(e).__name__})") from None
