"""int8 exports for fast CPU inference: post-training static quantization calibrated on a few hundred training
images (onnxruntime for .onnx, NNCF for OpenVINO .xml). The int8 model is run against the fp32 model on the
labelled val images: top-1 agreement and both accuracies are reported, and the file is kept only when its
accuracy is within a margin of fp32's (unless forced)."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

from finetune._util.files import TEMP_PREFIX, atomic_write
from finetune.data.images import decode_all
from finetune.data.inputs import expand_inputs
from finetune.errors import CheckFailedError, UsageError
from finetune.formats import export, openvino_ir
from finetune.formats.load import load_runnable
from finetune.models.model_file import ModelFile

INT8_FORMATS = (".onnx", ".xml")
CALIBRATION_COUNT = 300  # training images the activation ranges are measured on (NNCF's default subset size)
MAX_ACCURACY_DROP = 1.0  # accuracy points int8 may lose against fp32 on the val images before it is refused
CHECK_LIMIT = 1000  # val images the check runs on, at most
BATCH = 32


@dataclass
class Int8Report:
    path: Path
    format: str
    calibration_images: int
    calibration_source: str
    checked_images: int
    image_source: str
    fp32_accuracy: float | None  # None: the check images carry no labels
    int8_accuracy: float | None
    agreement: float  # share of images where int8's top-1 class is fp32's
    forced: bool  # kept by --force although the accuracy check failed or could not run
    seconds: float


def export_int8(model_paths: list, out: str | os.PathLike, check_images: str | None = None,
                calibration_images: str | None = None, count: int = CALIBRATION_COUNT,
                max_drop: float = MAX_ACCURACY_DROP, force: bool = False, workers: int = 2) -> Int8Report:
    """Write an int8 .onnx or .xml of the model(s), checked against fp32 on labelled val images."""
    import torch

    t0 = time.perf_counter()
    out = Path(out)
    fmt = out.suffix.lower()
    if fmt not in INT8_FORMATS:
        raise UsageError(f"{out}: --int8 writes {' or '.join(INT8_FORMATS)} files (onnxruntime or OpenVINO)")
    if count < 1:
        raise UsageError(f"--calibration-count {count}: must be at least 1")
    module, mf = export._load(list(model_paths))
    calib, calib_source = _calibration(mf, calibration_images, count, workers)
    x, labels, source = _labelled(mf, check_images, workers)
    with torch.inference_mode():
        fp32 = torch.cat([module(b) for b in x.split(BATCH)])
    info, result = export.metadata(mf), {}

    def write_and_verify(tmp: str) -> None:
        with export.companion(tmp, out):
            model, forward = QUANTIZERS[fmt](module, mf, calib, out)
            int8 = torch.cat([forward(b) for b in x.split(BATCH)])
            result.update(_judge(fp32, int8, labels, max_drop, force, out))
            _SAVERS[fmt](model, _stamped(info, result, len(calib), source), tmp)
            again = load_runnable(tmp, "cpu", export.RUNTIME_OF[fmt]).forward(x[:export.CHECK_IMAGES])
            if not torch.allclose(again, int8[:export.CHECK_IMAGES], atol=1e-4, rtol=1e-4):
                raise CheckFailedError(f"{out}: the written int8 file does not reproduce the checked model; not kept")

    atomic_write(out, write_and_verify, "choose another OUT path")
    return Int8Report(out, fmt, len(calib), calib_source, len(x), source, result["fp32_accuracy"],
                      result["int8_accuracy"], result["agreement"], result["forced"], time.perf_counter() - t0)


def _split_entries(mf: ModelFile, key: str) -> list[tuple[str, str]]:
    """(path, class name) of the run's split.json train or val list; [] when there is none."""
    split_file, root = Path(mf.source).parent / "split.json", mf.config.get("data")
    try:
        return [(os.path.join(root, rel), label) for rel, label in json.loads(split_file.read_text("utf-8"))[key]]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def _preprocessed(mf: ModelFile, paths: list[str], workers: int, limit: int):
    """Up to limit readable images of paths, preprocessed as the model wants: (batch, the paths used)."""
    import torch

    pre, transform = mf.preprocessing, mf.preprocessing.eval_transform()
    used, tensors = [], []
    for start in range(0, len(paths), limit):  # decode in rounds of limit until enough are readable
        decoded, _ = decode_all(paths[start:start + limit], pre.resize_size, workers)
        for p in paths[start:start + limit]:
            if p in decoded and len(used) < limit:
                used.append(p)
                tensors.append(transform(decoded[p]))
        if len(used) >= limit:
            break
    return (torch.stack(tensors) if tensors else None), used


def _calibration(mf: ModelFile, images: str | None, count: int, workers: int):
    """The calibration batch: count images of --calibration-images, else of the run's training images."""
    paths = expand_inputs([images])[0] if images else [p for p, _ in _split_entries(mf, "train")]
    source = images or f"training images of {mf.config.get('data')}"
    random.Random(0).shuffle(paths)
    batch, _ = _preprocessed(mf, paths, workers, count)
    if batch is None:
        raise UsageError(f"--int8: no readable calibration images ({source if paths else 'no split.json beside the model'}"
                         "); pass --calibration-images IMAGES (a few hundred training images)")
    return batch, source


def _labelled(mf: ModelFile, images: str | None, workers: int):
    """(val batch, labels or None, source): --check-images (labelled by their folder's name when it is a class),
    else the run's val images."""
    import torch

    if images:
        paths, source = expand_inputs([images])[0], images
        names = {p: Path(p).parent.name for p in paths}
    else:
        entries, source = _split_entries(mf, "val"), f"val images of {mf.config.get('data')}"
        paths, names = [p for p, _ in entries], dict(entries)
    batch, used = _preprocessed(mf, paths, workers, CHECK_LIMIT)
    if batch is None:
        raise UsageError(f"--int8: no readable images to check the int8 model on ({source}); pass --check-images "
                         "FOLDER (FOLDER/<class>/*.jpg)")
    known = [names[p] in mf.classes for p in used]
    labels = torch.tensor([mf.classes.index(names[p]) for p in used]) if all(known) else None
    return batch, labels, source


def _judge(fp32, int8, labels, max_drop: float, force: bool, out: Path) -> dict:
    """Agreement and accuracies; refuses (unless force) an accuracy drop over max_drop points, or no labels."""
    agreement = float((fp32.argmax(1) == int8.argmax(1)).float().mean())
    if labels is None:
        if not force:
            raise UsageError(f"{out}: --int8 checks accuracy on labelled images, and these are not (int8 agrees with "
                             f"fp32 on {agreement:.1%}); pass --check-images FOLDER/<class>/..., or --force to keep it")
        return {"fp32_accuracy": None, "int8_accuracy": None, "agreement": agreement, "forced": True}
    right32, right8, n = int((fp32.argmax(1) == labels).sum()), int((int8.argmax(1) == labels).sum()), len(labels)
    acc32, acc8, drop = right32 / n, right8 / n, (right32 - right8) * 100 / n  # counts: no float noise at the margin
    failed = drop > max_drop
    if failed and not force:
        raise CheckFailedError(f"{out}: int8 accuracy {acc8:.1%} is {drop:.1f} points below fp32's "
                               f"{acc32:.1%} on {len(labels)} val images (allowed: {max_drop:g}; top-1 agreement "
                               f"{agreement:.1%}); the file was not kept (--force keeps it, or use the fp32 export)")
    return {"fp32_accuracy": acc32, "int8_accuracy": acc8, "agreement": agreement, "forced": failed}


def _stamped(info: dict, result: dict, calibrated_on: int, source: str) -> dict:
    """The export metadata of an int8 file: how it was quantized and checked; val_acc is int8's own."""
    quantization = {"type": "int8", "calibration_images": calibrated_on, "check_images_source": source,
                    "fp32_accuracy": result["fp32_accuracy"], "int8_accuracy": result["int8_accuracy"],
                    "top1_agreement": result["agreement"], "forced": result["forced"]}
    metrics = dict(info["metrics"]) | {"int8": quantization}
    if result["int8_accuracy"] is not None and source.startswith("val images of"):
        metrics["val_acc"] = result["int8_accuracy"]
    return info | {"metrics": metrics, "quantization": quantization}


def _quantize_openvino(module, mf: ModelFile, calib, out: Path):
    """NNCF post-training quantization of the OpenVINO model: (ov.Model, forward)."""
    try:
        import nncf
    except ImportError:
        raise UsageError("--int8 .xml needs NNCF: pip install 'finetune[openvino]'") from None
    model = openvino_ir.to_ir(export._export_program(module, calib[:2]), mf.preprocessing.crop_size)
    data = nncf.Dataset([calib[i:i + 1].numpy() for i in range(len(calib))])
    with _quiet():
        quantized = nncf.quantize(model, data, subset_size=len(calib))
    return quantized, openvino_ir.compiled_forward(quantized)


@contextlib.contextmanager
def _quiet():
    """NNCF draws progress bars on stdout (where only results go) and logs INFO lines; torch's extension loader,
    which it touches, warns about CUDA; onnxruntime's quantizer warns on the root logger. The library prints
    nothing: all kept out."""
    chatty = [logging.getLogger("torch.utils.cpp_extension"), logging.getLogger("nncf"), logging.getLogger()]
    levels = [logger.level for logger in chatty]
    for logger in chatty:
        logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for logger, level in zip(chatty, levels):
            logger.setLevel(level)


def _save_openvino(model, info: dict, tmp: str) -> None:
    openvino_ir.save_ir(model, info, tmp)


def _quantize_onnx(module, mf: ModelFile, calib, out: Path):
    """onnxruntime static quantization (QDQ, per-channel int8 weights, uint8 activations): (ModelProto, forward)."""
    import onnx
    import torch
    from onnxruntime import InferenceSession
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(calib[i:i + 1].numpy() for i in range(len(calib)))

        def get_next(self):
            item = next(self.items, None)
            return None if item is None else {"image": item}

    fp32, quantized = (str(out.parent / f"{TEMP_PREFIX}{os.getpid()}-{what}.onnx") for what in ("fp32", "int8"))
    try:
        export._write_onnx(module, mf, export.metadata(mf), calib[:2], fp32)
        with _quiet():
            quant_pre_process(fp32, fp32)  # shape inference and graph fusions before quantizing, as ORT advises
            quantize_static(fp32, quantized, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        proto = onnx.load(quantized)
    finally:
        for p in (fp32, quantized):
            Path(p).unlink(missing_ok=True)
    session = InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return proto, lambda x: torch.from_numpy(session.run(None, {"image": x.float().numpy()})[0]).float()


def _save_onnx(proto, info: dict, tmp: str) -> None:
    import onnx

    del proto.metadata_props[:]
    for key, value in {"finetune": info, "classes": info["classes"], "preprocessing": info["preprocessing"]}.items():
        proto.metadata_props.add(key=key, value=json.dumps(value))
    onnx.save(proto, tmp)


QUANTIZERS = {".onnx": _quantize_onnx, ".xml": _quantize_openvino}
_SAVERS = {".onnx": _save_onnx, ".xml": _save_openvino}
