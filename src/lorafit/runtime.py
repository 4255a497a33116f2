"""Device and precision choices, made once and explained: bf16 where the hardware computes it natively."""

from __future__ import annotations

import contextlib
import resource
import sys

import torch

from .errors import LorafitError

PRECISIONS = ("auto", "bf16", "fp32")


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise LorafitError(f"--device {name!r}: not a device (auto, cpu, cuda, cuda:N, mps)") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LorafitError(f"--device {name}: CUDA is not available on this machine")
    return device


def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX: bf16 matmuls then run at about twice the fp32 rate."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and _cpu_flags() & {"avx512_bf16", "amx_bf16"} != set()
    except (AttributeError, RuntimeError):
        return False


def _cpu_flags() -> set[str]:
    if not sys.platform.startswith("linux"):
        return set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype to use, or None for plain fp32."""
    if precision not in PRECISIONS:
        raise LorafitError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return None
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
    elif device.type == "cpu":
        supported = cpu_has_native_bf16()
    else:
        supported = False
    if precision == "bf16" and device.type in ("cuda", "cpu"):
        return torch.bfloat16  # asked for explicitly: honour it even where it is emulated
    return torch.bfloat16 if supported else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def peak_memory_mb(device: torch.device) -> dict:
    """Peak resident memory of this process (and of the GPU, when there is one), in MB."""
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"peak_rss_mb": round(rss_kb / (1024 if sys.platform != "darwin" else 1024 * 1024), 1)}
    if device.type == "cuda":
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out
