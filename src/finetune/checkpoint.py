"""One self-describing model file: save (atomic) and load (safe, weights_only=True)."""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from finetune.errors import FinetuneError, ModelFileError, ResourceError

FORMAT = "finetune-model"
FORMAT_VERSION = 1
TEMP_PREFIX = ".finetune-tmp-"  # recognisable, so stale temp files can be found and removed


def versions() -> dict:
    """Library versions that produced a file."""
    import torch
    import torchvision

    from finetune import __version__

    return {"finetune": __version__, "torch": str(torch.__version__), "torchvision": str(torchvision.__version__)}


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Write via write(tmp_path) to a temp file beside path, fsync, then os.replace: never a half file."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=path.suffix, dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise ResourceError(f"{path}: could not write ({e.strerror or e}); check the folder and its permissions") \
            from None
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if e.errno == errno.ENOSPC:
            raise ResourceError(_disk_full(path)) from None
        raise ResourceError(f"{path}: could not write ({e.strerror or e}); check free space and permissions") from None
    except RuntimeError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        # torch.save reports a full disk as "PytorchStreamWriter failed writing ... unexpected pos".
        if "unexpected pos" in str(e) or "failed writing" in str(e):
            raise ResourceError(_disk_full(path)) from None
        raise
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def _disk_full(path: Path) -> str:
    try:
        free = f"{shutil.disk_usage(path.parent).free / 1e6:.0f} MB free"
    except OSError:
        free = "free space unknown"
    return f"{path}: could not write: the disk is full ({free}); free some space or write elsewhere (-o)"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Atomic text file write."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, write)


def save_model_file(path: str | os.PathLike, *, arch: str, head: str, dropout: float, state_dict: dict,
                    classes: list[str], base_weights: str, preprocessing: dict, metrics: dict, config: dict,
                    temperature: float = 1.0) -> Path:
    """Write a finetune model file: plain types and tensors only, so weights_only=True can load it."""
    import torch

    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": arch,
        "head": head,
        "dropout": float(dropout),
        "classes": list(classes),
        "base_weights": base_weights,
        "preprocessing": dict(preprocessing),
        "metrics": metrics,
        "config": config,
        "temperature": float(temperature),  # probabilities = softmax(logits / temperature); 1.0 = uncalibrated
        "versions": versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "state_dict": state_dict,
    }
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def update_model_file(path: str | os.PathLike, **fields) -> Path:
    """Rewrite a model file (atomically) with some top-level fields replaced, e.g. a fitted temperature."""
    import torch

    payload = load_model_file(path) | fields
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_model_file(path: str | os.PathLike) -> dict:
    """Load and validate a finetune model file without unpickling code."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise ModelFileError(f"{p}: no such model file; train one with `finetune train DATA` or pass --model PATH")
    if p.stat().st_size == 0:
        raise ModelFileError(f"{p}: the model file is empty (0 bytes)")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch's advice (weights_only=False) must never reach users
        raise ModelFileError(
            f"{p}: not a finetune model file (truncated, corrupt, not PyTorch, or it holds Python objects "
            f"that could run code: {type(e).__name__}); refused"
        ) from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ModelFileError(f"{p}: a PyTorch file, but not a finetune model file (no '{FORMAT}' header); "
                             "use `--weights PATH` to start training from a plain state_dict")
    if obj.get("format_version", 0) > FORMAT_VERSION:
        raise ModelFileError(f"{p}: written by a newer finetune (format {obj['format_version']}); upgrade finetune")
    return obj


def model_from_file(path: str | os.PathLike):
    """(eval-mode model, metadata) from a finetune model file."""
    from finetune.models import build_model, load_plain_state

    meta = load_model_file(path)
    model, head = build_model(meta["arch"], len(meta["classes"]), meta.get("dropout", 0.0))
    try:
        load_plain_state(model, head, meta["state_dict"], meta.get("dropout", 0.0))
    except RuntimeError as e:
        raise ModelFileError(f"{path}: weights do not match {meta['arch']} ({str(e).splitlines()[0][:160]})") from None
    return model.eval(), meta


def check_ensemble(paths: list, metas: list[dict], same_preprocessing: bool = False) -> None:
    """Models can form an ensemble: the same classes in the same order (and, for one exported file that
    takes one input, the same preprocessing). Exit 2 naming the first file that differs."""
    first = metas[0]
    for path, meta in zip(paths[1:], metas[1:]):
        if meta["classes"] != first["classes"]:
            raise FinetuneError(f"{path}: its classes {meta['classes']} are not those of {paths[0]} "
                                f"{first['classes']}; an ensemble needs models of the same classes, in the same "
                                "order", exit_code=2)
        if same_preprocessing and meta["preprocessing"] != first["preprocessing"]:
            raise FinetuneError(f"{path}: its preprocessing {meta['preprocessing']} differs from {paths[0]}'s "
                                f"{first['preprocessing']}; one exported file takes one input, so export models "
                                "with the same preprocessing (or predict with several -m instead)", exit_code=2)
