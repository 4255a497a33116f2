"""Device and precision choices, made once and explained: bf16 where the hardware computes it natively."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import platform
import resource
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from .errors import FieldError

PRECISIONS = ("auto", "bf16", "fp32")
INFERENCE_PRECISIONS = PRECISIONS + ("int8",)  # int8: frozen linears quantised (lorafit.backbones.int8), no training

# oneDNN, which runs bf16 matmuls on CPUs, keeps a built kernel with its scratch memory for every input shape
# it meets, in two caches of 1,024 entries (oneDNN's own and PyTorch's ideep LRU). Length-bucketed batches make
# nearly every batch a new shape, so the caches only grow: about 0.5 GB of peak RSS training GPT-2 small. A few
# dozen entries hold a step's shapes and cost no speed (README, "bf16 on a bf16-fast CPU"). They are read when
# the first bf16 kernel is built (fp32 work before it, such as loading and building the model, does not
# fix them; measured), so resolve_compute sets them, before anything computes in bf16; a user's own setting wins.
ONEDNN_CACHE_CAPACITY = "32"
ONEDNN_CACHES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def cap_onednn_caches() -> None:
    """Cap oneDNN's kernel caches (see above) unless the user set them."""
    for name in ONEDNN_CACHES:
        os.environ.setdefault(name, ONEDNN_CACHE_CAPACITY)


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
        raise FieldError("{device} {!r}: not a device (auto, cpu, cuda, cuda:N, mps)", name) from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FieldError("{device} {}: CUDA is not available on this machine", name)
    return device


def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX: bf16 matmuls then run at about twice the fp32 rate."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and cpu_flags() & {"avx512_bf16", "amx_bf16"} != set()
    except (AttributeError, RuntimeError):
        return False


def _cpuinfo(field: str) -> str | None:
    """The first ``field`` line of /proc/cpuinfo (Linux), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags, read from /proc/cpuinfo once per process (every int8 linear asks)."""
    return frozenset((_cpuinfo("flags") or "").split())


def cpu_name() -> str:
    """The CPU's model name, for naming the machine beside a measured number."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


@functools.lru_cache(maxsize=None)
def bf16_matmul_pays(width: int = 768) -> bool:
    """Whether bf16 matmuls actually beat fp32 on this CPU, timed on a feed-forward product of the model's
    width (256 tokens, ``width`` -> 4 ``width``; ~0.1 s for GPT-2 small).

    Native bf16 instructions alone do not settle it: on some AVX-512 BF16 parts oneDNN's bf16 kernels
    run at half MKL's fp32 speed, on others (AMX, Zen 4) at two to three times it, and for narrow
    models bf16's fixed costs outweigh its faster arithmetic.
    """
    if not cpu_has_native_bf16():
        return False
    x, w = torch.randn(256, width), torch.randn(4 * width, width)
    xb, wb = x.bfloat16(), w.bfloat16()
    best = {torch.float32: float("inf"), torch.bfloat16: float("inf")}
    for i in range(14):  # interleaved, best of each: a burst of other load slows both, not one
        a, b = (x, w) if i % 2 else (xb, wb)
        t0 = time.perf_counter()
        torch.nn.functional.linear(a, b)
        if i >= 4:  # the first calls create kernels
            best[a.dtype] = min(best[a.dtype], time.perf_counter() - t0)
    return best[torch.bfloat16] < 0.8 * best[torch.float32]


def check_precision(precision: str, device: torch.device, inference: bool = False) -> None:
    """Refuse a precision the device cannot run, before any work (``auto`` is decided by :func:`resolve_compute`).
    ``inference``: for predicting, evaluating and serving, where int8 is one more choice."""
    if precision == "int8" and not inference:
        raise FieldError("{precision} int8 is for inference (predict, eval, serve); train in auto, bf16 or fp32")
    allowed = INFERENCE_PRECISIONS if inference else PRECISIONS
    if precision not in allowed:
        raise FieldError("{precision} must be one of {}, got {!r}", ", ".join(allowed), precision)
    if precision == "int8" and device.type != "cpu":
        raise FieldError("{precision} int8 runs on the cpu, not {}", device.type)
    if precision == "bf16" and device.type not in ("cuda", "cpu"):
        raise FieldError("{precision} bf16 is supported on cpu and cuda, not {}", device.type)


def choose_autocast_dtype(precision: str, device: torch.device, width: int = 768) -> torch.dtype | None:
    """The autocast dtype ``precision`` means on ``device``, or None for plain fp32.

    ``auto``: bf16 on CPUs where bf16 matmuls of the model's ``width`` measure faster than fp32; fp32
    on GPUs (launch-bound at these batch sizes; ``--precision bf16`` still forces it). ``bf16`` forces
    bf16 autocast (cpu, cuda); ``fp32`` turns autocast off.
    """
    check_precision(precision, device)
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        # At classification batch sizes a GPU step waits on kernel launches, and autocast adds casts:
        # measured on an H200, gpt2-small batch 8, bf16 took 33 s an epoch against fp32's 7.5 s (README)
        return None
    if device.type == "cpu":
        return torch.bfloat16 if bf16_matmul_pays(width) else None
    return None


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


@functools.lru_cache(maxsize=None)
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") else None
    except OSError:
        return None


def _mallopt(mmap_threshold: int, trim_threshold: int) -> bool:
    libc = _glibc()
    return libc is not None and bool(libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)) \
        and bool(libc.mallopt(M_TRIM_THRESHOLD, trim_threshold))


def return_freed_buffers_to_the_os() -> bool:
    """For training: pin glibc's mmap threshold at 1 MiB (where glibc is the allocator; a no-op elsewhere).

    Training allocates activation buffers of a different size at every batch length. glibc raises its
    mmap threshold each time such a buffer is freed, after which buffers come from the heap and stay
    there, fragmented, and peak RSS grows (README gives the measured effect). With the threshold pinned,
    large buffers go back to the OS when freed.
    """
    return _mallopt(1 << 20, 128 << 10)  # glibc's default trim threshold


def keep_freed_buffers() -> bool:
    """For inference: buffers up to 32 MiB come from glibc's heap and stay there when freed (a no-op where glibc
    is not the allocator).

    A forward pass frees and allocates the same few activation sizes again and again. Each such buffer that
    glibc maps fresh costs a page fault per 4 KiB on first touch: at GPT-2 small's 1,000-token batches an
    int8 feed-forward took 20.7 ms instead of 9.1 (Zen 5, one thread), and whole-model int8 inference ran at
    0.80x. Kept buffers are reused as an arena allocator (ONNX Runtime's) reuses them; with them, scoring
    100,000 lines peaked 69 MiB above scoring 100 (README, ``predict --file``).
    """
    return _mallopt(32 << 20, 1 << 30)


def check_compute(device: str, precision: str, inference: bool = False) -> torch.device:
    """``device`` and ``precision`` checked before any work; the device they name."""
    dev = resolve_device(device)
    check_precision(precision, dev, inference)
    return dev


@dataclass(frozen=True)
class Compute:
    """Where a model computes and in which precision, decided once: the device and the autocast dtype."""

    device: torch.device = torch.device("cpu")
    autocast_dtype: torch.dtype | None = None  # None: plain fp32, no autocast
    int8: bool = False  # inference only: frozen linears in int8, the rest in fp32 (lorafit.backbones.int8)

    @property
    def precision(self) -> str:
        """What the choice is called in settings and reports: ``int8``, ``bf16`` or ``fp32``."""
        return "int8" if self.int8 else "fp32" if self.autocast_dtype is None else "bf16"

    def autocast(self):
        """The context a forward pass runs in."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)


def resolve_compute(device: str | torch.device = "auto", precision: str = "auto", width: int = 768, *,
                    agree: Callable[[torch.dtype | None], torch.dtype | None] | None = None) -> Compute:
    """Resolve ``device`` and ``precision`` for a model of hidden size ``width``, and tune the backend
    for variable-length batches. Called once per run, when the model is built. ``agree``: makes every
    process of a torchrun job use the same choice (``auto`` times the CPU: rank 0's result for all)."""
    cap_onednn_caches()  # before the first bf16 kernel, which choosing "auto" may run
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    dtype = choose_autocast_dtype(precision, dev, width)
    if agree is not None:
        dtype = agree(dtype)
    if dev.type == "cuda":
        # cuDNN's attention builds a new graph for every sequence length, and length-bucketed batches
        # change length almost every step: the flash and memory-efficient kernels need no such warm-up.
        torch.backends.cuda.enable_cudnn_sdp(False)
    return Compute(dev, dtype)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Random draws inside the block (weight initialisation) start from ``seed``; the global generator is
    left as it was, so building a model never reseeds what the caller draws next."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def peak_memory_mb(device: torch.device) -> dict:
    """Peak resident memory of this process (and of the GPU, when there is one), in MiB (the keys say mb)."""
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"peak_rss_mb": round(rss_kb / (1024 if sys.platform != "darwin" else 1024 * 1024), 1)}
    if device.type == "cuda":
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out
