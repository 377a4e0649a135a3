"""timm models (`--model timm:NAME`, the timm extra): any timm classifier, described by its own data config.

timm's pretrained config names the model's input size, crop share, mean, std and interpolation (as a
torchvision weights enum does), the classifier layer and where its weights live on the Hugging Face
Hub. finetune builds the model with timm, keeps that description as the model file's preprocessing, and
loads weights itself: from the Hugging Face cache (each file's SHA-256 checked against the name the hub
stores it under), downloaded once into that cache when the network allows, or from --weights PATH;
never unpickling code.
"""

from __future__ import annotations

import difflib
import math
import os

from finetune._util.extras import require
from finetune.data.preprocessing import Preprocessing
from finetune.errors import UsageError
from finetune.models.weights import WeightsChoice

PREFIX = "timm:"
# Weight files a timm repository on the hub holds, in the order timm itself prefers them.
HUB_FILES = ("model.safetensors", "pytorch_model.bin")


def is_timm(arch: str) -> bool:
    return arch.startswith(PREFIX)


def _timm(what: str):
    return require("timm", "timm", what)


def check_name(arch: str) -> str:
    """arch if timm has the model (a name, optionally with its pretrained tag: convnext_tiny.fb_in1k); else raise
    naming the closest timm names."""
    timm = _timm(f"--model {arch}")
    name = arch[len(PREFIX):]
    if timm.is_model(name):
        return arch
    names = timm.list_models() + timm.list_models(pretrained=True)
    close = difflib.get_close_matches(name.lower(), names, n=4, cutoff=0.6)
    hint = f"did you mean {', '.join(PREFIX + c for c in close)}?" if close else \
        "see timm.list_models() for the names"
    raise UsageError(f"--model {arch}: not a timm model; {hint}")


def create(arch: str):
    """The timm model with its own classifier and random weights, and the dotted name of that classifier."""
    timm = _timm(f"--model {arch}")
    model = timm.create_model(arch[len(PREFIX):], pretrained=False)
    head = model.pretrained_cfg.get("classifier")
    return model, head if isinstance(head, str) and _is_layer(model, head) else None


def _is_layer(model, name: str) -> bool:
    import torch.nn as nn

    try:
        return isinstance(model.get_submodule(name), (nn.Linear, nn.Conv2d))
    except AttributeError:
        return False


def preprocessing(model) -> Preprocessing:
    """The model's timm data config as finetune's Preprocessing: crop = input size, resize = crop / crop_pct
    (timm's own eval transform), mean, std, interpolation."""
    timm = _timm("--model timm:NAME")
    cfg = timm.data.resolve_model_data_config(model)
    _, height, width = cfg["input_size"]
    if height != width:
        raise UsageError(f"--model timm:{model.pretrained_cfg.get('architecture')}: its input is {height}x{width}; "
                         "finetune's preprocessing crops squares, so choose a model with a square input")
    interpolation = cfg["interpolation"] if cfg["interpolation"] in ("bilinear", "bicubic", "nearest") else "bicubic"
    return Preprocessing(math.floor(height / cfg["crop_pct"]), height, tuple(float(x) for x in cfg["mean"]),
                         tuple(float(x) for x in cfg["std"]), interpolation)


def resolve_weights(arch: str, spec: str) -> WeightsChoice:
    """--weights for a timm model: DEFAULT (the Hugging Face hub repository of its pretrained config, from the
    local cache), none (random init), or a path to a state_dict file."""
    check_name(arch)
    model, _ = create(arch)
    pre, cfg = preprocessing(model), model.pretrained_cfg
    if spec.lower() == "none":
        return WeightsChoice(arch, None, None, "none", pre)
    if spec.upper() == "DEFAULT" and not os.path.exists(spec):
        repo = cfg.get("hf_hub_id")
        if not repo:
            raise UsageError(f"--model {arch}: timm names no Hugging Face weights for it; use --weights PATH or "
                             "--weights none")
        files = (cfg["hf_hub_filename"],) if cfg.get("hf_hub_filename") else HUB_FILES
        return WeightsChoice(arch, None, None, f"hf:{repo}", pre, hub=(repo, files))
    if os.path.isfile(spec):
        return WeightsChoice(arch, None, os.path.abspath(spec), f"file:{os.path.basename(spec)}", pre)
    raise UsageError(f"--weights {spec}: not a file; for a timm model use DEFAULT (its Hugging Face weights), none, "
                     "or a path to a state_dict file (.safetensors, .pth)")
