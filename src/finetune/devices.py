"""Pick the torch device from --device."""

from __future__ import annotations

from finetune.errors import FinetuneError

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N, mps"


def resolve_device(spec: str):
    """auto -> CUDA, then MPS, then CPU; an explicit device must exist."""
    import torch

    spec = spec.strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "mps":
        if not torch.backends.mps.is_available():
            raise FinetuneError("--device mps: MPS is not available on this machine; use --device cpu", exit_code=2)
        return torch.device("mps")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise FinetuneError(f"--device {spec}: no CUDA GPU is available here; use --device cpu or auto",
                                exit_code=2)
        index = spec.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise FinetuneError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                                f"numbered from 0", exit_code=2)
        return torch.device(spec)
    raise FinetuneError(f"--device {spec}: unknown device; use one of {DEVICE_CHOICES}", exit_code=2)
