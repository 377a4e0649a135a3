"""The model registry over torchvision: names, building with a fresh head, freezing, and the state_dict under
torchvision's own key names. A Network keeps the module with what describes it (arch, head, dropout)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from finetune.errors import ModelFileError, UsageError
from finetune.models import timm as timm_models
from finetune.models.timm import is_timm
from finetune.models.weights import strip_wrapper_prefixes


def available_models() -> list[str]:
    """Every torchvision classification model name."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def check_model_name(name: str) -> str:
    """Return name if torchvision (or, for timm:NAME, timm) has it, else raise naming the closest valid names."""
    if is_timm(name):
        return timm_models.check_name(name)
    names = available_models()
    if name in names:
        return name
    close = difflib.get_close_matches(name.lower(), names, n=4, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else "see `finetune train --help` for examples"
    raise UsageError(f"--model {name}: not a torchvision classification model; {hint}")


@dataclass
class Network:
    """A torchvision classifier whose head was replaced for our classes."""

    module: object  # torch.nn.Module
    arch: str
    head: str  # dotted name of the classifier layer (fc, classifier.1, heads.head, ...)
    dropout: float = 0.0

    def is_head(self, name: str) -> bool:
        """Does a parameter or module name belong to the head?"""
        return name == self.head or name.startswith(self.head + ".")

    def head_module(self):
        return self.module.get_submodule(self.head)

    def parameter_groups(self, trainable_only: bool = True) -> dict[str, list]:
        """{"head": [...], "backbone": [...]} parameters (those that train now, by default)."""
        groups: dict[str, list] = {"head": [], "backbone": []}
        for name, p in self.module.named_parameters():
            if p.requires_grad or not trainable_only:
                groups["head" if self.is_head(name) else "backbone"].append(p)
        return groups

    def freeze_backbone(self, frozen: bool = True) -> None:
        """Only the head trains (feature-extract mode, and the first --freeze-epochs)."""
        for name, p in self.module.named_parameters():
            p.requires_grad = self.is_head(name) or not frozen

    def set_train_mode(self, frozen_backbone: bool, frozen_statistics: bool = False) -> None:
        """train(), except a frozen backbone keeps BatchNorm/Dropout in eval so its statistics stay put; with
        frozen_statistics every BatchNorm layer normalises with its running statistics (its weights still train)."""
        import torch

        self.module.train()
        if frozen_backbone:
            for name, m in self.module.named_modules():
                if name and not self.is_head(name) and not list(m.children()):
                    m.eval()
        if frozen_statistics:
            for m in self.module.modules():
                if isinstance(m, torch.nn.modules.batchnorm._NormBase):
                    m.eval()

    def plain_state_dict(self) -> dict:
        """The state_dict under torchvision's own key names (a dropout-wrapped head `fc.1.*` becomes `fc.*`)."""
        out = {}
        for k, v in strip_wrapper_prefixes(self.module.state_dict()).items():
            if k.startswith(self.head + ".1."):
                k = self.head + "." + k[len(self.head) + 3:]
            out[k] = v.detach().cpu().contiguous()
        return out

    def load_plain_state(self, state: dict) -> None:
        """Inverse of plain_state_dict."""
        if self.dropout > 0:
            n = len(self.head) + 1
            state = {(self.head + ".1." + k[n:] if k.startswith(self.head + ".") else k): v for k, v in state.items()}
        self.module.load_state_dict(state, strict=True)

    def first_conv_weight(self):
        """A CPU copy of the first convolution's filters (what the network looks at first), or None."""
        import torch.nn as nn

        conv = next((m for m in self.module.modules() if isinstance(m, nn.Conv2d)), None)
        return None if conv is None else conv.weight.detach().float().cpu().clone()

    def accepts_size(self, size: int) -> bool:
        """Does it run on size x size inputs? (ViT-style models need the one size they were built for.)"""
        import torch

        was_training = self.module.training
        try:
            with torch.inference_mode():
                device = next(self.module.parameters()).device
                self.module.eval()(torch.zeros(1, 3, size, size, device=device))
            return True
        except Exception:  # noqa: BLE001 - any failure means "not at this size"
            return False
        finally:
            self.module.train(was_training)

    def head_gives_logits(self, crop_size: int) -> bool:
        """True when the head's output is the model's output (not SqueezeNet-style conv + pool after it)."""
        import torch

        seen = {}
        handle = self.head_module().register_forward_hook(lambda m, i, o: seen.setdefault("out", o))
        try:
            with torch.inference_mode():
                out = self.module.eval()(torch.zeros(1, 3, crop_size, crop_size))
        finally:
            handle.remove()
        return seen["out"].shape == out.shape and torch.equal(seen["out"], out)


def find_head(model) -> str:
    """Dotted name of the classifier layer: the last Linear (or 1x1 Conv, SqueezeNet) in the model."""
    import torch.nn as nn

    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1)
                                             and name.startswith("classifier")):
            last = name
    if last is None:
        raise UsageError(f"{type(model).__name__}: no classifier layer found to replace; choose another --model")
    return last


def _replace_head(model, head: str, num_classes: int, dropout: float) -> None:
    import torch.nn as nn

    old = model.get_submodule(head)
    new = nn.Linear(old.in_features, num_classes) if isinstance(old, nn.Linear) \
        else nn.Conv2d(old.in_channels, num_classes, kernel_size=1)
    if dropout > 0:
        new = nn.Sequential(nn.Dropout(dropout), new)
    parent_name, _, child = head.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def build_network(arch: str, num_classes: int, dropout: float = 0.0, pretrained_state: dict | None = None) -> Network:
    """torchvision (or timm:NAME) model with pretrained (or random) backbone weights and a fresh head for
    num_classes."""
    import torchvision

    if is_timm(arch):
        model, head = timm_models.create(arch)
        head = head or find_head(model)
    else:
        try:
            model = torchvision.models.get_model(arch, weights=None)
        except ValueError:
            check_model_name(arch)
            raise
        head = find_head(model)
    if pretrained_state is not None:
        _load_backbone(model, pretrained_state, head, arch)
    _replace_head(model, head, num_classes, dropout)
    return Network(model, arch, head, dropout)


def _load_backbone(model, state: dict, head: str, arch: str) -> None:
    own = model.state_dict()
    in_head = lambda k: k.startswith(head + ".")  # noqa: E731
    # A checkpoint with another class count still gives a good backbone: its head is replaced anyway.
    state = {k: v for k, v in state.items() if not (in_head(k) and k in own and v.shape != own[k].shape)}
    missing = [k for k in own if k not in state and not in_head(k)]
    unexpected = [k for k in state if k not in own]
    shape_bad = [k for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or shape_bad:
        detail = "; ".join(
            f"{label}: {', '.join(keys[:3])}{'...' if len(keys) > 3 else ''} ({len(keys)})"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shape_bad)) if keys)
        raise ModelFileError(f"weights do not fit {arch} ({detail}); use weights made for --model {arch}")
    model.load_state_dict(state, strict=False)
