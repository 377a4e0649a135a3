"""Export a trained model as .pt (plain torchvision state_dict), .safetensors, .pt2 (torch.export) or .onnx,
then re-run the exported file against eager PyTorch on real images before calling it done."""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

from finetune import data as D
from finetune.checkpoint import atomic_write, model_from_file, versions
from finetune.errors import FinetuneError

FORMATS = (".pt", ".safetensors", ".pt2", ".onnx")
EXPORT_FORMAT = "finetune-export"
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
    top1_agree: int
    seconds: float


def metadata(meta: dict) -> dict:
    """What every exported file carries: enough to use it without finetune."""
    return {
        "format": EXPORT_FORMAT,
        "format_version": 1,
        "arch": meta["arch"],
        "classes": meta["classes"],
        "num_classes": len(meta["classes"]),
        "preprocessing": meta["preprocessing"],
        "input": "float32 NCHW RGB, resized, center-cropped and normalised as in preprocessing",
        "output": "logits (probabilities: softmax(logits / temperature))",
        "temperature": float(meta.get("temperature", 1.0)),
        "base_weights": meta.get("base_weights"),
        "metrics": meta.get("metrics", {}),
        "versions": versions(),
    }


def _check_inputs(meta: dict, images: str | None):
    """A batch of real images for the equivalence check: --check-images, else the training data's val images."""
    import torch

    pre = meta["preprocessing"]
    if images:
        from finetune.predict import expand_inputs

        paths, _ = expand_inputs([images])
        source = images
    else:
        root = (meta.get("config") or {}).get("data")
        paths = []
        if root and os.path.isdir(root):
            try:
                split = D.find_dataset(root, meta["config"].get("val_fraction", 0.2), meta["config"].get("seed", 0))
                paths = [s.path for s in split.val] or [s.path for s in split.train]
            except FinetuneError:
                paths = []
        source = f"val images of {root}"
    random.Random(0).shuffle(paths)
    transform = D.eval_transform(pre)
    batch = []
    for p in paths:
        try:
            batch.append(transform(D.decode_to_tensor(p, pre["resize_size"])))
        except Exception:  # noqa: BLE001 - an unreadable image just isn't used for the check
            continue
        if len(batch) == CHECK_IMAGES:
            break
    if not batch:
        raise FinetuneError(
            f"no readable images to check the export against ({source}); pass --check-images FOLDER", exit_code=2)
    return torch.stack(batch), source


def export_model(model_path: str | os.PathLike, out: str | os.PathLike, check_images: str | None = None) -> ExportReport:
    """Write model_path's model to out (format from the suffix), verify it, return the report."""
    import torch

    t0 = time.perf_counter()
    out = Path(out)
    fmt = out.suffix.lower()
    if fmt not in FORMATS:
        raise FinetuneError(f"{out}: unknown export format '{out.suffix}'; use one of {', '.join(FORMATS)}",
                            exit_code=2)
    model, meta = model_from_file(model_path)
    x, source = _check_inputs(meta, check_images)
    with torch.inference_mode():
        expected = model(x)
    info = metadata(meta)
    writer, runner = _FORMATS[fmt]
    checked = {}

    def write_and_verify(tmp: str) -> None:
        # Verify the temp file before it replaces anything: a failed check leaves the old file intact.
        writer(model, meta, info, x, tmp)
        checked["diff"], checked["agree"] = _compare(expected, runner(tmp, x), out)

    atomic_write(out, write_and_verify)
    diff, agree = checked["diff"], checked["agree"]
    return ExportReport(out, fmt, len(x), source, diff, agree, time.perf_counter() - t0)


def _compare(expected, got, out: Path) -> tuple[float, int]:
    import torch

    got = torch.as_tensor(got).float()
    if got.shape != expected.shape:
        raise FinetuneError(f"{out}: exported model returned shape {tuple(got.shape)}, expected {tuple(expected.shape)}")
    diff = (got - expected).abs()
    max_diff = float(diff.max())
    top2 = expected.topk(2, dim=1).values if expected.shape[1] > 1 else None
    decisive = (top2[:, 0] - top2[:, 1]) > 2 * (ATOL + RTOL * expected.abs().max(1).values) if top2 is not None \
        else torch.ones(len(expected), dtype=torch.bool)
    agree = expected.argmax(1) == got.argmax(1)
    if not torch.all(diff <= ATOL + RTOL * expected.abs()) or not torch.all(agree | ~decisive):
        raise FinetuneError(f"{out}: exported model disagrees with PyTorch (max logit difference {max_diff:.2e}, "
                            f"tolerance {ATOL:g} + {RTOL:g}*|logit|); the file was not kept")
    return max_diff, int(agree.sum())


# --- .pt: torchvision state_dict + metadata; loads with torch + torchvision alone -------------------


def _write_pt(model, meta, info, x, tmp):
    import torch

    torch.save(info | {"state_dict": meta["state_dict"]}, tmp)


def _run_pt(path, x):
    """Load exactly as README tells users to: torch.load(weights_only=True) + torchvision.get_model."""
    import torch
    import torchvision

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    m = torchvision.models.get_model(ckpt["arch"], num_classes=len(ckpt["classes"]))
    m.load_state_dict(ckpt["state_dict"])
    with torch.inference_mode():
        return m.eval()(x)


# --- .safetensors: raw tensors + JSON metadata; runs no code on load --------------------------------


def _write_safetensors(model, meta, info, x, tmp):
    from safetensors.torch import save_file

    save_file(meta["state_dict"], tmp, metadata={"finetune": json.dumps(info)})


def _run_safetensors(path, x):
    import torch
    import torchvision
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        info = json.loads(f.metadata()["finetune"])
    m = torchvision.models.get_model(info["arch"], num_classes=len(info["classes"]))
    m.load_state_dict(load_file(str(path)))
    with torch.inference_mode():
        return m.eval()(x)


# --- .pt2: torch.export program, batch size dynamic --------------------------------------------------


def _export_program(model, x):
    import torch

    batch = torch.export.Dim("batch", min=1, max=1024)
    # Export with a batch of 2+ so the batch dimension is not specialised to 1.
    example = x[:2] if len(x) >= 2 else x.repeat(2, 1, 1, 1)
    return torch.export.export(model, (example,), dynamic_shapes=({0: batch},))


def _write_pt2(model, meta, info, x, tmp):
    import torch

    torch.export.save(_export_program(model, x), tmp, extra_files={"finetune.json": json.dumps(info)})


def _run_pt2(path, x):
    import torch

    extra = {"finetune.json": ""}
    program = torch.export.load(path, extra_files=extra)
    json.loads(extra["finetune.json"])  # the metadata must come back too
    with torch.inference_mode():
        return program.module()(x)


# --- .onnx: dynamo exporter, metadata in the model's properties ----------------------------------------


def _write_onnx(model, meta, info, x, tmp):
    import torch

    try:
        import onnxscript  # noqa: F401 - the dynamo exporter needs it
    except ImportError:
        raise FinetuneError("ONNX export needs the onnx extra: pip install 'finetune[onnx]'", exit_code=2) from None
    program = torch.onnx.export(_export_program(model, x), dynamo=True, input_names=["image"],
                                output_names=["logits"], verify=False, verbose=False)
    program.model.metadata_props["finetune"] = json.dumps(info)
    for key in ("classes", "preprocessing"):
        program.model.metadata_props[key] = json.dumps(info[key])
    program.save(tmp, external_data=False)


def _run_onnx(path, x):
    try:
        import onnxruntime as ort
    except ImportError:
        raise FinetuneError("checking an ONNX export needs onnxruntime: pip install 'finetune[onnx]'",
                            exit_code=2) from None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    json.loads(session.get_modelmeta().custom_metadata_map["finetune"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


_FORMATS = {
    ".pt": (_write_pt, _run_pt),
    ".safetensors": (_write_safetensors, _run_safetensors),
    ".pt2": (_write_pt2, _run_pt2),
    ".onnx": (_write_onnx, _run_onnx),
}
