"""Which device and precision a process computes on: the one helper that training, evaluation,
the experiment scripts and the benchmarks share (nothing here knows about runs or models)."""

from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch

from .errors import ConfigError

__all__ = [
    "AMP_DTYPES",
    "launched_with_torchrun",
    "resolve_device",
    "cpu_has_native_bf16",
    "resolve_amp",
    "autocast",
    "cpu_capability",
]

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def launched_with_torchrun() -> bool:
    """torchrun (or any launcher of torch.distributed) describes the process in its environment."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def resolve_device(spec: str) -> torch.device:
    """``auto`` -> cuda if available, else cpu; a clear error for an unusable device. Under
    torchrun, ``cuda`` means this process's local GPU (one per local rank)."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda" and launched_with_torchrun():
        spec = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"--device {spec!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {spec!r}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {spec!r}: only {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {spec!r}: MPS is not available on this machine")
    return device


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 / AMX); without it, bf16 autocast
    is emulated and much slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_capability() -> dict:
    """What a CPU benchmark must record next to its figures: the vector ISA torch dispatches to
    and whether bf16 is native (figures compare only within one capability)."""
    return {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": cpu_has_native_bf16(),
    }


def resolve_amp(amp: str, device: torch.device) -> tuple[str, Optional[str]]:
    """(the autocast precision a run uses for ``--amp amp`` on ``device``, a warning or None).

    ``auto``: bf16 on CUDA devices that support it and on CPUs with native bf16, else none.
    ``bf16`` on a CPU without native bf16 runs (it is correct) but warns: it is ~20x slower
    than fp32 there (measured on an AVX2-only CPU). ``fp16`` needs CUDA (loss scaling)."""
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError(f"--amp 'fp16' needs a CUDA device (got {device}); use --amp bf16")
    if amp == "auto":
        if device.type == "cuda":
            return ("bf16" if torch.cuda.is_bf16_supported() else "none"), None
        return ("bf16" if device.type == "cpu" and cpu_has_native_bf16() else "none"), None
    if amp == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        return amp, (
            f"--amp bf16: this CPU ({torch.backends.cpu.get_cpu_capability()}) has no native bf16, "
            f"so autocast emulates it: expect it ~20x slower than fp32 (--amp none, or --amp "
            f"auto to choose by hardware)"
        )
    return amp, None


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """The autocast context of a resolved ``amp`` ("none", "bf16", "fp16") on ``device``."""
    dtype = AMP_DTYPES[amp]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
