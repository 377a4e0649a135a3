"""--init-from MODEL: a new run that starts from a trained finetune model instead of ImageNet weights.

The model file gives the architecture, every weight and the preprocessing. Its head is kept when the new
data has the same classes (its rows put in the new data's class order), so training refines the model on
more photos; with other classes the head is replaced, as for any pretrained backbone.
"""

from __future__ import annotations

import os
from pathlib import Path

from finetune.config import TrainConfig
from finetune.errors import UsageError
from finetune.models.model_file import ModelFile, load_model_file
from finetune.models.weights import WeightsChoice


def init_arch(path: str) -> str:
    """The architecture of an --init-from model file (what --model becomes when it is not given)."""
    return _load(path).arch


def _load(path: str) -> ModelFile:
    mf = load_model_file(path)
    if mf.members:
        raise UsageError(f"--init-from {path}: an exported ensemble of {len(mf.members)} models; start from one of "
                         "its member models (a best.pt)")
    return mf


def load_init(cfg: TrainConfig) -> ModelFile | None:
    """The --init-from model file, checked against --model; None without --init-from."""
    if not cfg.init_from:
        return None
    mf = _load(cfg.init_from)
    if mf.arch != cfg.model:
        raise UsageError(f"--init-from {cfg.init_from}: a {mf.arch} model, not --model {cfg.model}; give --model "
                         f"{mf.arch} or leave --model out")
    return mf


def init_choice(cfg: TrainConfig, mf: ModelFile) -> WeightsChoice:
    """What the run records as its base weights: the model file, with the preprocessing it was trained with."""
    return WeightsChoice(mf.arch, None, os.path.abspath(cfg.init_from), f"init:{Path(cfg.init_from).name}",
                         mf.preprocessing)


def kept_head(mf: ModelFile, classes: list[str], head: str) -> dict | None:
    """The model file's whole state with its head rows in the order of classes, when it has exactly these classes;
    None when the classes differ (the head is then replaced)."""
    if sorted(mf.classes) != sorted(classes) or len(set(classes)) != len(classes):
        return None
    order = [mf.classes.index(c) for c in classes]
    state = dict(mf.state_dict)
    for key in (f"{head}.weight", f"{head}.bias"):
        if key in state:
            state[key] = state[key][order].clone()
    return state
