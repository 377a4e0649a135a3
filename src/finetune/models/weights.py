"""Pretrained weights: what --weights names (an enum, a file, none), downloaded once into torch's hub cache
and checked before torch reads it, or loaded from a local file; never unpickling code."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from finetune.data.content_index import full_hash
from finetune.data.preprocessing import Preprocessing
from finetune.errors import ModelFileError, ResourceError, UsageError

# Prefixes left by DataParallel/DDP and torch.compile; stripped so their checkpoints load.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")

# Full SHA-256 of cached weight files, where known; otherwise the hash prefix torchvision puts in every file
# name (resnet18-f37072fd.pth) is checked. torch.hub checks it only when downloading, not on each load.
# The pins are the default weights of resnet18 (V1) and resnet50 (V2); each digest is quoted identically by
# many unrelated public projects that verify these downloads, and begins with torchvision's published prefix.
PINNED_SHA256: dict[str, str] = {
    "resnet18-f37072fd.pth": "f37072fd47e89c5e827621c5baffa7500819f7896bbacec160b1a16c560e07ec",  # 46,830,571 B
    "resnet50-11ad3fa6.pth": "11ad3fa62ca79e40addfd354a8ec4b7c75143b3038b8d2a807fbc68deab379ca",  # 102,540,417 B
}


@dataclass(frozen=True)
class WeightsChoice:
    """What --weights resolved to: a torchvision enum member, a local file, or nothing."""

    arch: str
    enum: object | None  # torchvision WeightsEnum member to download, or None
    path: str | None  # local state_dict file, or None
    label: str  # stored in the model file as base_weights
    preprocessing: Preprocessing
    hub: tuple | None = None  # (Hugging Face repository, weight file names to try): timm's pretrained weights


def resolve_weights(arch: str, spec: str) -> WeightsChoice:
    """Interpret --weights: DEFAULT, an enum name (IMAGENET1K_V2), none, or a path to a state_dict file."""
    from torchvision.models import get_model_weights

    enum_cls = get_model_weights(arch)
    members = list(enum_cls)
    # The architecture's classic preprocessing, used when no enum says otherwise (none / a file).
    classic = Preprocessing.from_weights(members[0])
    if spec.lower() == "none":
        return WeightsChoice(arch, None, None, "none", classic)
    by_name = {m.name.upper(): m for m in members} | {"DEFAULT": enum_cls.DEFAULT}
    key = spec.upper().rsplit(".", 1)[-1]
    if key in by_name and not os.path.exists(spec):
        member = by_name[key]
        return WeightsChoice(arch, member, None, f"{enum_cls.__name__}.{member.name}",
                             Preprocessing.from_weights(member))
    if os.path.isfile(spec):
        return WeightsChoice(arch, None, os.path.abspath(spec), f"file:{Path(spec).name}", classic)
    choices = ", ".join(["DEFAULT", *[m.name for m in members], "none", "a path to a .pth state_dict file"])
    raise UsageError(f"--weights {spec}: not a weights name for {arch} nor an existing file; use one of: {choices}")


def hub_file(url: str) -> Path:
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def load_pretrained_state(choice: WeightsChoice) -> dict | None:
    """The backbone's ImageNet state_dict, downloaded once into the torch hub cache; never unpickles code."""
    import torch

    if choice.path is not None:
        return load_state_dict_file(choice.path)
    if choice.hub is not None:
        return load_state_dict_file(str(hub_weights(*choice.hub, choice.label)))
    if choice.enum is None:
        return None
    url = choice.enum.url
    target = hub_file(url)
    if target.is_file():
        verify_cached_weights(target)
    try:
        # Our own call so weights_only=True is explicit (torchvision's builders pass False).
        return torch.hub.load_state_dict_from_url(url, progress=False, check_hash=True, map_location="cpu",
                                                  weights_only=True)
    except (OSError, RuntimeError) as e:
        if target.exists():
            raise ModelFileError(f"{target}: cached weights for {choice.label} are corrupt or unsafe ({_short(e)}); "
                                 "delete the file and run again") from None
        raise ResourceError(
            f"could not download {choice.label} weights ({_short(e)}). Needed file: {target.name} from {url}; "
            f"put it at {target} (or set TORCH_HOME), or use --weights PATH to a state_dict file, "
            "or --weights none to train from random initialisation (much lower accuracy)") from None
    except Exception as e:  # noqa: BLE001 - UnpicklingError and friends from a tampered cache file
        raise ModelFileError(f"{target}: cached weights for {choice.label} could not be loaded safely "
                             f"({type(e).__name__}); delete the file and run again") from None


def hub_weights(repo: str, files: tuple, label: str) -> Path:
    """A weight file of a Hugging Face repository: from the local cache (HF_HOME), else downloaded into it unless
    HF_HUB_OFFLINE is set; its content checked against the SHA-256 the hub stores it under."""
    import huggingface_hub as hf
    from huggingface_hub import constants, errors, utils

    for name in files:
        cached = hf.try_to_load_from_cache(repo, name)
        if isinstance(cached, str):
            return verify_hub_file(Path(cached))
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    reason = "HF_HUB_OFFLINE is set"
    quiet, hub_log = utils.are_progress_bars_disabled(), logging.getLogger("huggingface_hub")
    level = hub_log.level
    utils.disable_progress_bars()  # the library stays silent: no download bars, no retry warnings on stderr
    hub_log.setLevel(logging.ERROR)
    try:
        for name in files if not offline else ():
            try:
                return verify_hub_file(Path(hf.hf_hub_download(repo, name)))
            except errors.RemoteEntryNotFoundError:  # the repository has no such file: try the next name
                continue
            except errors.LocalEntryNotFoundError:
                reason = "no connection to the Hugging Face Hub and not in the cache"
                break
            except Exception as e:  # noqa: BLE001 - network and hub errors come in many types
                reason = _short(e)
                break
    finally:
        hub_log.setLevel(level)
        if not quiet:
            utils.enable_progress_bars()
    raise ResourceError(
        f"could not get {label} weights ({reason}). Needed file: {files[0]} of https://huggingface.co/{repo}; put "
        f"it in the Hugging Face cache ({constants.HF_HUB_CACHE}, e.g. `hf download {repo}` on a connected "
        "machine, then copy the cache), or use --weights PATH to a state_dict file, or --weights none to train from "
        "random initialisation (much lower accuracy)")


def verify_hub_file(path: Path) -> Path:
    """Refuse a cached hub file whose content does not match the SHA-256 it is stored under (the hub names large
    files' blobs by their SHA-256); returns path."""
    blob = Path(os.path.realpath(path))
    if re.fullmatch(r"[0-9a-f]{64}", blob.name) and full_hash(str(blob)) != blob.name:
        raise ModelFileError(f"{path}: cached weights do not match their published SHA-256 (corrupt or tampered); "
                             f"delete {blob} and run again to download it afresh")
    return path


def verify_cached_weights(path: Path) -> None:
    """Refuse a cached weights file whose content does not match its pinned hash (tampered or corrupt)."""
    match = re.search(r"-([a-f0-9]{6,})\.", path.name)
    expected = PINNED_SHA256.get(path.name) or (match.group(1) if match else None)
    if expected and not full_hash(str(path)).startswith(expected):  # a full pin must match in full
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
            return strip_wrapper_prefixes(load_file(str(p)))
        except Exception as e:  # noqa: BLE001
            raise ModelFileError(f"{p}: not a readable safetensors file ({_short(e)})") from None
    if p.stat().st_size == 0:
        raise ModelFileError(f"{p}: the file is empty (0 bytes); download or copy it again")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types; none of its advice applies
        raise ModelFileError(f"{p}: not a loadable PyTorch weights file (truncated, corrupt, not PyTorch, or it holds "
                             f"Python objects that could run code: {type(e).__name__})") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelFileError(f"{p}: holds no state_dict (a mapping of parameter names to tensors)")
    return strip_wrapper_prefixes(obj)


def strip_wrapper_prefixes(state: dict) -> dict:
    """Remove module./_orig_mod. prefixes that DDP and torch.compile add."""
    out = {}
    for k, v in state.items():
        while k.startswith(WRAPPER_PREFIXES):
            k = k.split(".", 1)[1]
        out[k] = v
    return out
