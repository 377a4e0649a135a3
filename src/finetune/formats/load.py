"""Load any model file finetune writes, ready to run: the training checkpoint (best.pt) and every export
(.pt, .safetensors, .pt2, .onnx, OpenVINO .xml), each through the same safety checks, each with its description
(classes, preprocessing, temperature, metrics) as a ModelFile, on the runtime chosen for it (--runtime)."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from finetune._util.devices import resolve_device
from finetune.errors import ModelFileError, UsageError
from finetune.formats import openvino_ir
from finetune.models.ensemble import module_from_file
from finetune.models.model_file import ModelFile, load_model_file, network_from, validated_description

PROGRAM_SUFFIXES = (".pt2", ".onnx", ".xml")
RUNTIMES = ("auto", "torch", "onnx", "openvino")
# The runtimes that can run each kind of file, fastest first on this project's CPU measurements
# (benchmarks/README.md#cpu-runtimes); auto takes the first one installed. Files run by torch (.pt, best.pt,
# .safetensors, .pt2) stay on torch unless asked: converting them to OpenVINO takes 10-20 s at every start,
# while `finetune export model.xml` does it once.
CAN_RUN = {".xml": ("openvino",), ".onnx": ("openvino", "onnx"), ".pt2": ("torch", "openvino"),
           "": ("torch", "openvino")}


@dataclass
class Runnable:
    """A model ready for inference: forward(batch) -> float32 logits on the CPU."""

    info: ModelFile
    forward: Callable
    device: object  # torch.device the inputs go to
    runtime: str  # torch | onnx | openvino


def load_runnable(path: str | os.PathLike, device: str = "auto", runtime: str = "auto") -> Runnable:
    """The model in path, whatever format finetune wrote it in, on runtime (auto: the fastest installed)."""
    p = Path(path)
    suffix = p.suffix.lower()
    chosen = choose_runtime(p, runtime, device)
    if chosen == "openvino":
        return _openvino(p, suffix)
    if suffix == ".onnx":
        return _onnx(p)
    if suffix == ".pt2":
        return _pt2(p, resolve_device(device))
    return _torch(load_model_file(p), resolve_device(device))


def choose_runtime(p: Path, runtime: str, device: str = "auto") -> str:
    """The runtime a file runs on: the one asked for when it can run the file, else (auto) the fastest installed;
    on a GPU device, torch for the files torch runs."""
    kind = p.suffix.lower() if p.suffix.lower() in CAN_RUN else ""
    able = CAN_RUN[kind]
    if runtime not in RUNTIMES:
        raise UsageError(f"--runtime {runtime}: choose one of {', '.join(RUNTIMES)}")
    if runtime != "auto":
        if runtime not in able:
            raise UsageError(f"--runtime {runtime}: cannot run {p.name}; its runtimes are {', '.join(able)}"
                             + (" (export it with `finetune export model.onnx` first)" if runtime == "onnx" else ""))
        return runtime
    if "torch" in able and device not in ("auto", "cpu"):
        return "torch"
    return next((r for r in able if _installed(r)), able[-1])


def _installed(runtime: str) -> bool:
    return runtime == "torch" or importlib.util.find_spec({"onnx": "onnxruntime"}.get(runtime, runtime)) is not None


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


def _openvino(p: Path, suffix: str) -> Runnable:
    """Any file on OpenVINO's CPU runtime: IR and ONNX files read directly, torch files converted (slow)."""
    import torch

    if suffix in (".xml", ".onnx"):
        _exists(p)
        model = openvino_ir.read(p)
        info = validated_description(openvino_ir.metadata(model, p), p)
    else:
        info, program = _program(p, suffix)
        model = openvino_ir.to_ir(program, info.preprocessing.crop_size)
    return Runnable(info, openvino_ir.compiled_forward(model), torch.device("cpu"), "openvino")


def _program(p: Path, suffix: str):
    """(ModelFile, torch.export program) of a torch file, for conversion."""
    import torch

    if suffix == ".pt2":
        _exists(p)
        info = validated_description(check_pt2(p), p)
        return info, torch.export.load(p)  # safe: check_pt2 found nothing torch would unpickle
    mf = load_model_file(p)
    module = module_from_file(mf) if mf.members else network_from(mf, mf.arch, mf.state_dict, mf.dropout).module
    size = mf.preprocessing.crop_size
    batch = torch.export.Dim("batch", min=1, max=1024)
    return mf, torch.export.export(module.eval(), (torch.zeros(2, 3, size, size),), dynamic_shapes=({0: batch},))


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
