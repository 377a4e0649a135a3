"""Backbone registry over torchvision: names, pretrained weights (cache, file, offline), head swap, freezing."""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from finetune.data import preprocessing_from_weights
from finetune.errors import FinetuneError, ModelFileError, ResourceError

# Prefixes left by DataParallel/DDP and torch.compile; stripped so their checkpoints load.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def available_models() -> list[str]:
    """Every torchvision classification model name."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def check_model_name(name: str) -> str:
    """Return name if torchvision has it, else raise naming the closest valid names."""
    names = available_models()
    if name in names:
        return name
    close = difflib.get_close_matches(name.lower(), names, n=4, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else "see `finetune train --help` for examples"
    raise FinetuneError(f"--model {name}: not a torchvision classification model; {hint}", exit_code=2)


@dataclass(frozen=True)
class WeightsChoice:
    """What --weights resolved to: a torchvision enum member, a local file, or nothing."""

    arch: str
    enum: object | None  # torchvision WeightsEnum member to download, or None
    path: str | None  # local state_dict file, or None
    label: str  # stored in the model file as base_weights
    preprocessing: dict


def resolve_weights(arch: str, spec: str) -> WeightsChoice:
    """Interpret --weights: DEFAULT, an enum name (IMAGENET1K_V2), none, or a path to a state_dict file."""
    from torchvision.models import get_model_weights

    enum_cls = get_model_weights(arch)
    members = list(enum_cls)
    # The architecture's classic preprocessing, used when no enum says otherwise (none / a file).
    classic = preprocessing_from_weights(members[0])
    if spec.lower() == "none":
        return WeightsChoice(arch, None, None, "none", classic)
    if spec.upper() == "DEFAULT":
        member = enum_cls.DEFAULT
        return WeightsChoice(arch, member, None, f"{enum_cls.__name__}.{member.name}", preprocessing_from_weights(member))
    by_name = {m.name.upper(): m for m in members}
    key = spec.upper().rsplit(".", 1)[-1]
    if key in by_name and not os.path.exists(spec):
        member = by_name[key]
        return WeightsChoice(arch, member, None, f"{enum_cls.__name__}.{member.name}", preprocessing_from_weights(member))
    if os.path.isfile(spec):
        return WeightsChoice(arch, None, os.path.abspath(spec), f"file:{Path(spec).name}", classic)
    choices = ", ".join(["DEFAULT", *[m.name for m in members], "none", "a path to a .pth state_dict file"])
    raise FinetuneError(f"--weights {spec}: not a weights name for {arch} nor an existing file; use one of: {choices}",
                        exit_code=2)


def _hub_file(url: str) -> Path:
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def load_pretrained_state(choice: WeightsChoice) -> dict | None:
    """The backbone's ImageNet state_dict, downloaded once into the torch hub cache; never unpickles code."""
    import torch

    if choice.path is not None:
        return load_state_dict_file(choice.path)
    if choice.enum is None:
        return None
    url = choice.enum.url
    target = _hub_file(url)
    if target.is_file():
        verify_cached_weights(target)
    try:
        # Our own call so weights_only=True is explicit (torchvision's builders pass False).
        return torch.hub.load_state_dict_from_url(url, progress=False, check_hash=True, map_location="cpu",
                                                  weights_only=True)
    except (OSError, RuntimeError) as e:
        if target.exists():
            raise ModelFileError(
                f"{target}: cached weights for {choice.label} are corrupt or unsafe ({_short(e)}); "
                "delete the file and run again"
            ) from None
        raise ResourceError(
            f"could not download {choice.label} weights ({_short(e)}). Needed file: {target.name} from {url}; "
            f"put it at {target} (or set TORCH_HOME), or use --weights PATH to a state_dict file, "
            "or --weights none to train from random initialisation (much lower accuracy)"
        ) from None
    except Exception as e:  # UnpicklingError and friends from a tampered cache file
        raise ModelFileError(f"{target}: cached weights for {choice.label} could not be loaded safely "
                             f"({type(e).__name__}); delete the file and run again") from None


# Full SHA-256 of cached weight files, where known; otherwise the hash prefix torchvision puts in every file
# name (resnet18-f37072fd.pth) is checked. torch.hub checks it only when downloading, not on each load.
# The pins are the default weights of resnet18 (V1) and resnet50 (V2); each digest is quoted identically by
# many unrelated public projects that verify these downloads, and begins with torchvision's published prefix.
PINNED_SHA256: dict[str, str] = {
    "resnet18-f37072fd.pth": "f37072fd47e89c5e827621c5baffa7500819f7896bbacec160b1a16c560e07ec",  # 46,830,571 B
    "resnet50-11ad3fa6.pth": "11ad3fa62ca79e40addfd354a8ec4b7c75143b3038b8d2a807fbc68deab379ca",  # 102,540,417 B
}


def verify_cached_weights(path: Path) -> None:
    """Refuse a cached weights file whose content does not match its pinned hash (tampered or corrupt)."""
    from finetune.data import file_hash

    match = re.search(r"-([a-f0-9]{6,})\.", path.name)
    expected = PINNED_SHA256.get(path.name) or (match.group(1) if match else None)
    if expected and not file_hash(str(path)).startswith(expected):  # a full pin must match in full
        raise ModelFileError(f"{path}: cached weights do not match their published SHA-256 (corrupt or tampered); "
                             "delete the file and run again to download it afresh")


def _short(e: BaseException) -> str:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    return msg[:160]


def load_state_dict_file(path: str) -> dict:
    """A state_dict from a .pth/.pt or .safetensors file, loaded without running code."""
    import torch

    p = Path(path)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(p))
        except Exception as e:  # noqa: BLE001
            raise ModelFileError(f"{p}: not a readable safetensors file ({_short(e)})") from None
    if p.stat().st_size == 0:
        raise ModelFileError(f"{p}: the file is empty (0 bytes); download or copy it again")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types; none of its advice applies
        raise ModelFileError(
            f"{p}: not a loadable PyTorch weights file (truncated, corrupt, not PyTorch, or it holds Python "
            f"objects that could run code: {type(e).__name__})"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    elif isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelFileError(f"{p}: holds no state_dict (a mapping of parameter names to tensors)")
    return strip_wrapper_prefixes(obj)


def strip_wrapper_prefixes(state: dict) -> dict:
    """Remove module./_orig_mod. prefixes that DDP and torch.compile add."""
    out = {}
    for k, v in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in _WRAPPER_PREFIXES:
                if k.startswith(prefix):
                    k, changed = k[len(prefix):], True
        out[k] = v
    return out


def find_head(model) -> str:
    """Dotted name of the classifier layer: the last Linear (or 1x1 Conv, SqueezeNet) in the model."""
    import torch.nn as nn

    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1)
                                             and name.startswith("classifier")):
            last = name
    if last is None:
        raise FinetuneError(f"{type(model).__name__}: no classifier layer found to replace")
    return last


def _get_submodule_parent(model, dotted: str):
    parent_name, _, child = dotted.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def replace_head(model, head_name: str, num_classes: int, dropout: float = 0.0):
    """Swap the classifier for num_classes outputs, with optional dropout in front of it."""
    import torch.nn as nn

    old = model.get_submodule(head_name)
    if isinstance(old, nn.Linear):
        new = nn.Linear(old.in_features, num_classes)
    else:
        new = nn.Conv2d(old.in_channels, num_classes, kernel_size=1)
    if dropout > 0:
        new = nn.Sequential(nn.Dropout(dropout), new)
    parent, child = _get_submodule_parent(model, head_name)
    setattr(parent, child, new)
    return model


def build_model(arch: str, num_classes: int, dropout: float = 0.0, pretrained_state: dict | None = None):
    """torchvision model with ImageNet (or random) backbone weights and a fresh head; returns (model, head_name)."""
    import torchvision

    model = torchvision.models.get_model(arch, weights=None)
    head = find_head(model)
    if pretrained_state is not None:
        _load_backbone(model, pretrained_state, head, arch)
    replace_head(model, head, num_classes, dropout)
    return model, head


def _load_backbone(model, state: dict, head: str, arch: str) -> None:
    own = model.state_dict()
    # A checkpoint with another class count still gives a good backbone: its head is replaced anyway.
    state = {k: v for k, v in state.items() if not (k.startswith(head + ".") and k in own and v.shape != own[k].shape)}
    missing, unexpected = [], []
    for k in own:
        if k not in state and not k.startswith(head + "."):
            missing.append(k)
    unexpected = [k for k in state if k not in own]
    shape_bad = [k for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or shape_bad:
        detail = "; ".join(
            f"{label}: {', '.join(keys[:3])}{'...' if len(keys) > 3 else ''} ({len(keys)})"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shape_bad)) if keys
        )
        raise ModelFileError(f"weights do not fit {arch} ({detail}); use weights made for --model {arch}")
    model.load_state_dict(state, strict=False)


def freeze_backbone(model, head: str) -> None:
    """Only the head trains (feature-extract mode)."""
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith(head + ".")


def set_train_mode(model, head: str, frozen_backbone: bool) -> None:
    """model.train(), except a frozen backbone keeps BatchNorm/Dropout in eval so its statistics stay put."""
    model.train()
    if frozen_backbone:
        for name, module in model.named_modules():
            if name and not (name == head or name.startswith(head + ".")) and not list(module.children()):
                module.eval()


def plain_state_dict(model, head: str) -> dict:
    """The state_dict under torchvision's own key names (a dropout-wrapped head `fc.1.*` becomes `fc.*`)."""
    out = {}
    for k, v in strip_wrapper_prefixes(model.state_dict()).items():
        if k.startswith(head + ".1."):
            k = head + "." + k[len(head) + 3:]
        out[k] = v.detach().cpu().contiguous()
    return out


def load_plain_state(model, head: str, state: dict, dropout: float) -> None:
    """Inverse of plain_state_dict: load torchvision-named keys into a model whose head may be dropout-wrapped."""
    if dropout > 0:
        state = {(head + ".1." + k[len(head) + 1:] if k.startswith(head + ".") else k): v for k, v in state.items()}
    model.load_state_dict(state, strict=True)


def first_conv_weight(model):
    """A CPU copy of the first convolution's filters (what the network looks at first), or None."""
    import torch.nn as nn

    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return None if conv is None else conv.weight.detach().float().cpu().clone()
