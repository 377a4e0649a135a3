"""Export a trained model as .pt (plain torchvision state_dict), .safetensors, .pt2 (torch.export), .onnx or
OpenVINO IR (.xml + .bin), then re-run the exported file against eager PyTorch on real images before calling it
done. int8 exports: quantize.py."""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

from finetune._util.extras import require
from finetune._util.files import atomic_write
from finetune.data.dataset import images_under
from finetune.data.images import decode_to_tensor
from finetune.data.inputs import expand_inputs
from finetune.errors import CheckFailedError, UsageError
from finetune.formats import openvino_ir
from finetune.formats.load import load_runnable
from finetune.models.ensemble import ENSEMBLE_OUTPUT, combine
from finetune.models.model_file import EXPORT_FORMAT, ModelFile, load_model_file, network_from, versions
from finetune.models.timm import PREFIX as TIMM_PREFIX

FORMATS = (".pt", ".safetensors", ".pt2", ".onnx", ".xml")
RUNTIME_OF = {".onnx": "onnx", ".xml": "openvino"}  # what verifies each program format: what its users run
# Exported logits must match eager PyTorch within |a - b| <= ATOL + RTOL * |b|, and give the same top-1 class
# wherever eager's top-1 margin exceeds the tolerance (ties may legitimately flip).
ATOL, RTOL = 1e-3, 1e-3
CHECK_IMAGES = 8


@dataclass
class ExportReport:
    path: Path
    format: str
    checked_images: int
    image_source: str
    max_abs_diff: float
    top1_agree: int  # multi-label: images whose every label decision agrees
    seconds: float
    multi_label: bool = False  # max_abs_diff is then of the sigmoid probabilities


def metadata(mf: ModelFile) -> dict:
    """What every exported file carries: enough to use it without finetune."""
    info = {
        "format": EXPORT_FORMAT,
        "format_version": 1,
        "arch": mf.arch,
        "classes": mf.classes,
        "num_classes": len(mf.classes),
        "preprocessing": mf.preprocessing.to_dict(),
        "input": "float32 NCHW RGB, resized, center-cropped and normalised as in preprocessing",
        "output": "logits (probabilities: softmax(logits / temperature))",
        "temperature": float(mf.temperature),
        "base_weights": mf.base_weights,
        "metrics": mf.metrics,
        "versions": versions(),
    }
    if mf.members:
        info |= {"members": mf.members, "output": ENSEMBLE_OUTPUT}
    if mf.multi_label:  # version 2: an older finetune refuses it rather than reading the sigmoids as a softmax
        info |= {"format_version": 2, "multi_label": True, "thresholds": mf.thresholds or [0.5] * len(mf.classes),
                 "output": "logits, one per class (probabilities: sigmoid(logits / temperature); a class is "
                           "predicted when its probability >= its threshold)"}
    return info


def check_image_paths(mf: ModelFile, images: str | None) -> tuple[list[str], str]:
    """Real images for the equivalence check: --check-images, else the run's val images (split.json beside the
    model), else any images of the training data folder."""
    if images:
        return expand_inputs([images])[0], images
    split_file = Path(mf.source).parent / "split.json"
    root = mf.config.get("data_root") or mf.config.get("data")  # a label file's paths start at its image folder
    if split_file.is_file() and root:
        try:
            val = json.loads(split_file.read_text(encoding="utf-8"))["val"]
            return [os.path.join(root, rel) for rel, _ in val], f"val images of {root}"
        except (OSError, ValueError, KeyError, TypeError):
            pass
    if root and os.path.isdir(root):
        return images_under(Path(root)), f"images of {root}"
    return [], f"the training data {root or '(unknown)'}"


def _check_batch(mf: ModelFile, images: str | None):
    import torch

    paths, source = check_image_paths(mf, images)
    random.Random(0).shuffle(paths)
    pre = mf.preprocessing
    transform, batch = pre.eval_transform(), []
    for p in paths:
        try:
            batch.append(transform(decode_to_tensor(p, pre.resize_size)))
        except Exception:  # noqa: BLE001 - an unreadable image just isn't used for the check
            continue
        if len(batch) == CHECK_IMAGES:
            break
    if not batch:
        raise UsageError(f"no readable images to check the export against ({source}); pass --check-images FOLDER")
    return torch.stack(batch), source


def _load(model_paths: list) -> tuple[object, ModelFile]:
    files = [load_model_file(p) for p in model_paths]
    nets = [network_from(mf, mf.arch, mf.state_dict, mf.dropout) for mf in files]
    if len(files) == 1:
        return nets[0].module, files[0]
    return combine(files, nets)


def export_model(model_path: str | os.PathLike | list, out: str | os.PathLike,
                 check_images: str | None = None) -> ExportReport:
    """Write model_path's model (or an ensemble of several files) to out (format from the suffix), verify it,
    return the report."""
    import torch

    t0 = time.perf_counter()
    out = Path(out)
    fmt = out.suffix.lower()
    if fmt not in FORMATS:
        raise UsageError(f"{out}: unknown export format '{out.suffix}'; use one of {', '.join(FORMATS)}")
    paths = [model_path] if isinstance(model_path, (str, os.PathLike)) else list(model_path)
    module, mf = _load(paths)
    x, source = _check_batch(mf, check_images)
    with torch.inference_mode():
        expected = module(x)
    info = metadata(mf)
    writer = _WRITERS[fmt]
    checked = {}

    def write_and_verify(tmp: str) -> None:
        # Verify the temp file before it replaces anything: a failed check leaves the old file intact.
        with companion(tmp, out):
            writer(module, mf, info, x, tmp)
            got = _run(tmp, fmt, x)
            checked["diff"], checked["agree"] = _compare_sigmoids(expected, got, mf, out) if mf.multi_label \
                else _compare(expected, got, out)

    atomic_write(out, write_and_verify, "choose another OUT path")
    return ExportReport(out, fmt, len(x), source, checked["diff"], checked["agree"], time.perf_counter() - t0,
                        mf.multi_label)


@contextlib.contextmanager
def companion(tmp: str, out: Path):
    """An OpenVINO IR's weights (.bin beside the temp .xml) take their place beside out once the block succeeds,
    just before the .xml itself replaces out; on failure the temp .bin is removed."""
    if out.suffix.lower() != ".xml":
        yield
        return
    try:
        yield
        os.replace(openvino_ir.weights_path(tmp), openvino_ir.weights_path(out))
    except BaseException:
        openvino_ir.weights_path(tmp).unlink(missing_ok=True)
        raise


def _run(tmp: str, fmt: str, x):
    """The exported file run as a user would: plain torch + torchvision for .pt, else finetune's loaders on the
    runtime its users run it with."""
    return _run_plain_pt(tmp, x) if fmt == ".pt" else load_runnable(tmp, "cpu", RUNTIME_OF.get(fmt, "torch")).forward(x)


def _compare(expected, got, out: Path) -> tuple[float, int]:
    import torch

    got = torch.as_tensor(got).float()
    if got.shape != expected.shape:
        raise CheckFailedError(f"{out}: exported model returned shape {tuple(got.shape)}, expected "
                               f"{tuple(expected.shape)}; the file was not kept")
    diff = (got - expected).abs()
    max_diff = float(diff.max())
    top2 = expected.topk(2, dim=1).values
    decisive = (top2[:, 0] - top2[:, 1]) > 2 * (ATOL + RTOL * expected.abs().max(1).values)
    agree = expected.argmax(1) == got.argmax(1)
    if not torch.all(diff <= ATOL + RTOL * expected.abs()) or not torch.all(agree | ~decisive):
        raise CheckFailedError(f"{out}: exported model disagrees with PyTorch (max logit difference {max_diff:.2e}, "
                               f"tolerance {ATOL:g} + {RTOL:g}*|logit|); the file was not kept")
    return max_diff, int(agree.sum())


def _compare_sigmoids(expected, got, mf: ModelFile, out: Path) -> tuple[float, int]:
    """Multi-label: the exported probabilities sigmoid(logits / temperature) must match eager PyTorch's within
    ATOL, and every label decision at the thresholds must agree except within ATOL of its threshold.
    Returns (largest probability difference, images whose labels all agree)."""
    import torch

    got = torch.as_tensor(got).float()
    if got.shape != expected.shape:
        raise CheckFailedError(f"{out}: exported model returned shape {tuple(got.shape)}, expected "
                               f"{tuple(expected.shape)}; the file was not kept")
    p, q = (torch.sigmoid(z.double() / mf.temperature) for z in (expected, got))
    t = torch.tensor(mf.thresholds or [0.5] * len(mf.classes), dtype=torch.float64)
    diff = float((p - q).abs().max())
    same = (p >= t) == (q >= t)
    near = (p - t).abs() <= ATOL
    if diff > ATOL or not bool((same | near).all()):
        raise CheckFailedError(f"{out}: exported model disagrees with PyTorch (max probability difference {diff:.2e}, "
                               f"tolerance {ATOL:g}); the file was not kept")
    return diff, int(same.all(1).sum())


def _run_plain_pt(path, x):
    """Load exactly as the docs tell users to: torch.load(weights_only=True) + torchvision.get_model (or
    timm.create_model for a timm:NAME model)."""
    import torch
    import torchvision

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if "members" in ckpt:  # an ensemble: finetune's own loader, as the docs say
        return load_runnable(path, "cpu").forward(x)
    arch, n = ckpt["arch"], len(ckpt["classes"])
    if arch.startswith(TIMM_PREFIX):  # as the docs say: timm is then the one extra dependency
        m = require("timm", "timm", f"checking a {arch} export").create_model(arch[len(TIMM_PREFIX):], num_classes=n)
    else:
        m = torchvision.models.get_model(arch, num_classes=n)
    m.load_state_dict(ckpt["state_dict"])
    with torch.inference_mode():
        return m.eval()(x)


def _write_pt(module, mf, info, x, tmp):
    import torch

    torch.save(info | {"state_dict": mf.state_dict}, tmp)


def _write_safetensors(module, mf, info, x, tmp):
    from safetensors.torch import save_file

    save_file(mf.state_dict, tmp, metadata={"finetune": json.dumps(info)})


def _export_program(module, x):
    import torch

    batch = torch.export.Dim("batch", min=1, max=1024)
    # Export with a batch of 2+ so the batch dimension is not specialised to 1.
    example = x[:2] if len(x) >= 2 else x.repeat(2, 1, 1, 1)
    return torch.export.export(module, (example,), dynamic_shapes=({0: batch},))


def _write_pt2(module, mf, info, x, tmp):
    import torch

    torch.export.save(_export_program(module, x), tmp, extra_files={"finetune.json": json.dumps(info)})


def _write_onnx(module, mf, info, x, tmp):
    import torch

    try:
        import onnxscript  # noqa: F401 - the dynamo exporter needs it
    except ImportError:
        raise UsageError("ONNX export needs the onnx extra: pip install 'finetune[onnx]'") from None
    program = torch.onnx.export(_export_program(module, x), dynamo=True, input_names=["image"],
                                output_names=["logits"], verify=False, verbose=False)
    program.model.metadata_props["finetune"] = json.dumps(info)
    for key in ("classes", "preprocessing"):
        program.model.metadata_props[key] = json.dumps(info[key])
    program.save(tmp, external_data=False)


def _write_xml(module, mf, info, x, tmp):
    model = openvino_ir.to_ir(_export_program(module, x), mf.preprocessing.crop_size)
    openvino_ir.save_ir(model, info, tmp)


_WRITERS = {".pt": _write_pt, ".safetensors": _write_safetensors, ".pt2": _write_pt2, ".onnx": _write_onnx,
            ".xml": _write_xml}
