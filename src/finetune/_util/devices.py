"""The torch device from --device, and the precision a device computes in (--amp)."""

from __future__ import annotations

from finetune.config import DEVICES
from finetune.errors import UsageError


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
            raise UsageError("--device mps: MPS is not available on this machine; use --device cpu")
        return torch.device("mps")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {spec}: no CUDA GPU is available here; use --device cpu or auto")
        index = spec.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise UsageError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             "numbered from 0")
        return torch.device(spec)
    raise UsageError(f"--device {spec}: unknown device; use one of {', '.join(DEVICES)}")


def native_cpu_bf16() -> bool:
    """Does torch report bf16 arithmetic in hardware here (AVX512-BF16 or AMX)? Without it bf16 is emulated,
    and was measured 2-9x slower than float32 (benchmarks/README.md, Precision)."""
    import torch

    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def autocast_dtype(device, amp: bool) -> tuple[object | None, str]:
    """(dtype for torch.autocast in training steps, or None for float32; why), decided from what torch reports."""
    import torch

    if not amp:
        return None, "float32 (--no-amp)"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "bfloat16 autocast (the GPU computes bf16 natively)"
        return torch.float16, "float16 autocast with loss scaling (no bf16 on this GPU)"
    if device.type == "cpu" and native_cpu_bf16():
        return torch.bfloat16, ("bfloat16 autocast in training steps (torch reports native bf16 on this CPU: "
                                "AVX512-BF16/AMX); evaluation in float32; --no-amp for float32 throughout")
    if device.type == "cpu":
        return None, "float32 (this CPU has no native bf16, which would be slower emulated)"
    return None, f"float32 (mixed precision is not used on {device.type})"
