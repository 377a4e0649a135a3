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
from finetune.checkpoint import atomic_write, check_ensemble, model_from_file, versions
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
    if "members" in meta:  # an ensemble: the members' architectures, and what the output is
        return _metadata(meta) | {
            "members": meta["members"],
            "output": "log of the mean of the members' softmax(logits / temperature): softmax of it gives the "
                      "ensemble's probabilities (its own temperature is 1)"}
    return _metadata(meta)


def _metadata(meta: dict) -> dict:
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
                c = meta["config"]
                split = D.find_dataset(root, c.get("val_fraction", 0.2), c.get("seed", 0), c.get("folds", 0),
                                       c.get("fold", 0))
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


def _ensemble_module(models: list, temperatures: list[float]):
    """One module for several models: log of the mean of their softmax(logits / T) (softmax of it gives the
    averaged probabilities). Traceable, so .pt2 and .onnx hold the whole ensemble."""
    import torch

    class Ensemble(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.members = torch.nn.ModuleList(models)
            self.register_buffer("temperatures", torch.tensor(temperatures, dtype=torch.float32))

        def forward(self, x):
            probs = [torch.softmax(m(x) / self.temperatures[i], dim=1) for i, m in enumerate(self.members)]
            return torch.log(torch.stack(probs).mean(0).clamp_min(1e-12))

    return Ensemble().eval()


def _load_ensemble(model_paths: list) -> tuple:
    """(module, meta) for several model files of the same classes and preprocessing."""
    loaded = [model_from_file(p) for p in model_paths]
    check_ensemble(model_paths, [m for _, m in loaded], same_preprocessing=True)
    first = loaded[0][1]
    temperatures = [float(m.get("temperature", 1.0)) for _, m in loaded]
    module = _ensemble_module([m for m, _ in loaded], temperatures)
    meta = {**first, "arch": "ensemble", "base_weights": None, "metrics": {}, "temperature": 1.0,
            "state_dict": {f"members.{i}.{k}": v for i, (_, m) in enumerate(loaded)
                           for k, v in m["state_dict"].items()},
            "members": [{"arch": m["arch"], "base_weights": m.get("base_weights"), "temperature": t,
                         "metrics": m.get("metrics", {}), "source": os.path.basename(str(p))}
                        for p, (_, m), t in zip(model_paths, loaded, temperatures)]}
    return module, meta


def export_model(model_path: str | os.PathLike | list, out: str | os.PathLike,
                 check_images: str | None = None) -> ExportReport:
    """Write model_path's model (or an ensemble of several files) to out (format from the suffix), verify it,
    return the report."""
    import torch

    t0 = time.perf_counter()
    out = Path(out)
    fmt = out.suffix.lower()
    if fmt not in FORMATS:
        raise FinetuneError(f"{out}: unknown export format '{out.suffix}'; use one of {', '.join(FORMATS)}",
                            exit_code=2)
    paths = [model_path] if isinstance(model_path, (str, os.PathLike)) else list(model_path)
    model, meta = model_from_file(paths[0]) if len(paths) == 1 else _load_ensemble(paths)
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

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return _run_state(ckpt, ckpt["state_dict"], x)


def _run_state(info: dict, state: dict, x):
    """Build the torchvision model(s) named in the metadata from a plain state_dict, as README shows."""
    import torch
    import torchvision

    n = len(info["classes"])
    with torch.inference_mode():
        if "members" not in info:
            m = torchvision.models.get_model(info["arch"], num_classes=n)
            m.load_state_dict(state)
            return m.eval()(x)
        probs = []
        for i, member in enumerate(info["members"]):
            m = torchvision.models.get_model(member["arch"], num_classes=n)
            prefix = f"members.{i}."
            m.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
            probs.append(torch.softmax(m.eval()(x) / member["temperature"], dim=1))
        return torch.log(torch.stack(probs).mean(0).clamp_min(1e-12))


# --- .safetensors: raw tensors + JSON metadata; runs no code on load --------------------------------


def _write_safetensors(model, meta, info, x, tmp):
    from safetensors.torch import save_file

    save_file(meta["state_dict"], tmp, metadata={"finetune": json.dumps(info)})


def _run_safetensors(path, x):
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        info = json.loads(f.metadata()["finetune"])
    return _run_state(info, load_file(str(path)), x)


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
