"""OpenVINO: convert a torch module to an IR (.xml + its .bin weights), write it with finetune's metadata, and
run IR or ONNX files on the CPU."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from finetune.errors import ModelFileError, UsageError

META_KEY = "finetune"  # the IR's rt_info entry holding finetune's metadata (the same JSON as the other exports)
# OpenVINO's CPU plugin computes in bf16 by default on CPUs with AVX512-BF16 or AMX, which moves logits by
# ~1e-2: ask for f32 so an fp32 IR computes what was checked at export, and an int8 IR keeps f32 between its
# quantized layers.
CPU_CONFIG = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}


_core = None  # the process's one ov.Core, made on first use (core())
_core_lock = threading.Lock()


def openvino():
    """The openvino package, or a UsageError naming the extra."""
    try:
        import openvino as ov
    except ImportError:
        raise UsageError("OpenVINO is not installed: pip install 'finetune[openvino]'") from None
    return ov


def core():
    """The process's one ov.Core, made on first use and reused for every read and compile: each Core loads its
    own plugins and thread pools, and several of them in one process is a known way to crash at exit."""
    global _core
    with _core_lock:
        if _core is None:
            _core = openvino().Core()
        return _core


def to_ir(program, crop_size: int):
    """An ov.Model from a torch.export program (dynamic batch), its spatial size fixed to the model's crop."""
    ov = openvino()
    model = ov.convert_model(program)
    model.reshape([-1, 3, crop_size, crop_size])
    return model


def save_ir(model, info: dict, xml_path: str) -> Path:
    """Write model to xml_path and its weights to the .bin beside it (fp32 weights: no fp16 compression, which
    would change logits beyond the export check's tolerance). Returns the .bin path."""
    ov = openvino()
    model.set_rt_info(json.dumps(info), [META_KEY])
    ov.save_model(model, xml_path, compress_to_fp16=False)
    return weights_path(xml_path)


def weights_path(xml_path: str | os.PathLike) -> Path:
    """The .bin an IR's .xml reads its weights from."""
    return Path(xml_path).with_suffix(".bin")


def read(p: Path):
    """The ov.Model in an .xml IR (with its .bin) or an .onnx file, refusing what OpenVINO cannot read."""
    ov_core = core()
    if p.suffix.lower() == ".xml" and not weights_path(p).is_file():
        raise ModelFileError(f"{p}: its weights file {weights_path(p).name} is missing; an OpenVINO IR is two files, "
                             "keep the .bin beside the .xml")
    try:
        return ov_core.read_model(str(p))
    except Exception as e:  # noqa: BLE001 - OpenVINO raises RuntimeError subclasses of its own
        raise ModelFileError(f"{p}: not a loadable OpenVINO model ({type(e).__name__}: "
                             f"{str(e).strip().splitlines()[0][:120] if str(e).strip() else ''})") from None


def metadata(model, p: Path) -> dict:
    """finetune's metadata stored in an IR (or, read by OpenVINO, in an ONNX file's metadata_props)."""
    keys = ["framework", META_KEY] if p.suffix.lower() == ".onnx" else [META_KEY]
    try:
        return json.loads(model.get_rt_info(keys).astype(str))
    except (RuntimeError, ValueError, TypeError):
        raise ModelFileError(f"{p}: an OpenVINO model without finetune's metadata (classes, preprocessing)") from None


def compiled_forward(model):
    """forward(batch) -> float32 logits (a torch tensor), compiled for the CPU; safe to call from any thread."""
    import torch

    compiled = core().compile_model(model, "CPU", CPU_CONFIG)
    request, lock = compiled.create_infer_request(), threading.Lock()

    def forward(x):
        with lock:  # one infer request, reused: calls from several threads take turns
            out = request.infer([x.float().contiguous().numpy()])
            return torch.from_numpy(out[compiled.outputs[0]].copy()).float()

    return forward
