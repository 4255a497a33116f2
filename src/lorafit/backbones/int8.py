"""Int8 inference on the CPU: frozen linears quantised once, activations quantised as they come.

Each weight is stored as int8 with one scale per output channel (symmetric: ``W ~ s_w * Wq``); each input
row (one token) gets its own scale at run time, and the product runs int8 x int8 -> int32 in
``torch._int_mm`` (oneDNN: VNNI dot products on AVX-512/AVX2-VNNI CPUs, AMX on newer Xeons), then
``y = acc * s_x * s_w + b`` in fp32. Everything else (norms, attention, the head) stays fp32.

Why a scale per token rather than one per batch (what ``torch.ao`` and ONNX Runtime's dynamic quantisation
do): a token with outlier activations (the first token of many pretrained decoders) then costs only its own
precision, and a text's result does not depend on what else is in its batch, packed or padded.
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..errors import LorafitError
from ..runtime import Compute, check_precision, cpu_flags, resolve_compute, resolve_device

INT8_DOT_FLAGS = {"avx512_vnni", "avx_vnni", "amx_int8"}  # int8 dot-product instructions oneDNN uses
INT8_TOLERANCE = 0.05  # the largest change of a class probability ``auto`` accepts on a run's sample texts


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> (int8 (out, in), fp32 scale (out,)): symmetric, one scale per output channel."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127
    return torch.round(w / scale[:, None]).to(torch.int8), scale


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x W^T + b`` for (N, in) fp32 ``x`` and an int8 ``weight`` (out, in) with per-channel ``scale``."""
    sx = torch.linalg.vector_norm(x, ord=float("inf"), dim=1, keepdim=True).clamp_min_(1e-12).div_(127)  # (N, 1)
    xq = torch.round(x / sx).to(torch.int8)  # (N, in), |values| <= 127 by construction
    y = torch.mul(torch._int_mm(xq, weight.t()), scale)  # (N, out) fp32: int32 sums times the weight's scales
    return y.mul_(sx) if bias is None else torch.addcmul(bias, y, sx)


class Int8Linear(nn.Module):
    """A frozen ``nn.Linear`` with its weight in int8 (a quarter of fp32's bytes); inference only."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight, scale = quantize_weight(linear.weight)
        self.register_buffer("qweight", weight)  # (out, in) int8
        self.register_buffer("scale", scale)  # (out,)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())

    def forward(self, x: torch.Tensor, with_bias: bool = True) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).float()  # (N, in)
        y = int8_linear(x2, self.qweight, self.scale, self.bias if with_bias else None)
        return y.view(*x.shape[:-1], self.out_features)

    def dequantized(self) -> torch.Tensor:
        """The (out, in) fp32 weight this layer computes with."""
        return self.qweight.float() * self.scale[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


def quantize_linears(module: nn.Module, skip: tuple[nn.Module, ...] = ()) -> dict[str, nn.Linear]:
    """Replace every ``nn.Linear`` inside ``module`` (except those in ``skip``) by an :class:`Int8Linear`,
    in place; returns the float linears by name (for :func:`restore_linears`). LoRA must be merged (or
    unwrapped) first: only plain linears are taken."""
    found = {n: m for n, m in module.named_modules() if type(m) is nn.Linear and not any(m is s for s in skip)}
    for name, linear in found.items():
        _set(module, name, Int8Linear(linear))
    return found


def restore_linears(module: nn.Module, linears: dict[str, nn.Linear]) -> None:
    for name, linear in linears.items():
        _set(module, name, linear)


def _set(module: nn.Module, name: str, child: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(module.get_submodule(parent_name) if parent_name else module, attr, child)


def quantize_checked(module: nn.Module, logits: Callable[[], torch.Tensor], skip: tuple[nn.Module, ...] = (),
                     tolerance: float | None = None) -> bool:
    """Quantise ``module``'s linears and keep them only if ``logits()`` (the class logits of a few sample texts)
    still gives every text its class and each probability within ``tolerance`` (None: ``INT8_TOLERANCE``);
    otherwise the float linears go back. Returns whether int8 was kept: what ``auto`` asks before it settles on int8."""
    tolerance = INT8_TOLERANCE if tolerance is None else tolerance
    before = torch.softmax(logits().float(), -1)
    linears = quantize_linears(module, skip)
    after = torch.softmax(logits().float(), -1)
    if torch.equal(before.argmax(-1), after.argmax(-1)) and float((before - after).abs().max()) <= tolerance:
        return True
    restore_linears(module, linears)
    return False


def cpu_has_int8_dot() -> bool:
    """Whether the CPU has int8 dot-product instructions (VNNI or AMX), without which int8 does not pay."""
    return bool(cpu_flags() & INT8_DOT_FLAGS)


AUTO_INT8_GAIN = 0.9  # auto takes int8 only where a block runs in at most this fraction of the float time
TIMING_LENGTHS = tuple(range(8, 40))  # the batch a block is timed on: 32 texts of 8-39 tokens (SMS-like)


@dataclass(frozen=True)
class BlockTiming:
    """Seconds for one block of the real model on a representative batch, in int8 and in the float precision
    inference would otherwise use: what ``auto`` decides on (:func:`int8_pays`)."""

    int8: float
    float: float


def int8_pays(timing: BlockTiming) -> bool:
    """Whether int8 is worth taking: a block runs at least ``1 - AUTO_INT8_GAIN`` faster than in float."""
    return timing.int8 < AUTO_INT8_GAIN * timing.float


class _Captured(Exception):
    """Raised by a pre-hook to stop a forward pass once the first block's inputs are known."""

    def __init__(self, args: tuple, kwargs: dict):
        super().__init__()
        self.args, self.kwargs = args, kwargs


def repeated_blocks(module: nn.Module) -> nn.Module | None:
    """The model's stack of blocks (the first ModuleList / Sequential of two or more children of one type)."""
    for m in module.modules():
        if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) > 1 and len({type(c) for c in m}) == 1:
            return m
    return None


def _block_inputs(module: nn.Module, block: nn.Module) -> tuple[tuple, dict]:
    """The arguments the first block gets on a representative batch (right-padded, ``TIMING_LENGTHS``)."""
    vocab = next(m for m in module.modules() if isinstance(m, nn.Embedding)).num_embeddings
    lengths = torch.tensor(TIMING_LENGTHS)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, min(vocab, 1000), (len(lengths), int(lengths.max())), generator=gen)
    mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()  # (B, T)

    def capture(_, args, kwargs):
        raise _Captured(args, kwargs)

    handle = block.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        module.hidden_states(ids * mask, mask)
    except _Captured as got:
        return got.args, got.kwargs
    finally:
        handle.remove()
    raise LorafitError("internal: the model's first block never ran")


_TIMINGS: dict[tuple, BlockTiming] = {}  # per process: one timing per block shape, float dtype and thread count


@torch.inference_mode()
def time_block(module: nn.Module, float_dtype: torch.dtype | None) -> BlockTiming:
    """:class:`BlockTiming` of ``module``'s first block (LoRA merged), cached per process. Two copies of the
    block are timed as inference runs them, interleaved, best of three after a first call that builds
    kernels: one quantised by :func:`quantize_linears`, one with its linears stored in ``float_dtype`` (None:
    fp32) under autocast. About a tenth of a second for GPT-2 small."""
    blocks = repeated_blocks(module)
    if blocks is None:
        raise LorafitError(f"internal: {type(module).__name__} has no stack of blocks to time")
    block = blocks[0]
    shapes = tuple((type(m).__name__, tuple(p.shape)) for m in block.modules() for p in m.parameters(recurse=False))
    key = (type(block).__name__, shapes, float_dtype, torch.get_num_threads())
    if key not in _TIMINGS:
        args, kwargs = _block_inputs(module, block)
        q, f = copy.deepcopy(block).eval(), copy.deepcopy(block).eval()
        quantize_linears(q)
        if float_dtype is not None:
            for m in f.modules():
                if type(m) is nn.Linear:
                    m.to(float_dtype)
        autocast = contextlib.nullcontext() if float_dtype is None else torch.autocast("cpu", dtype=float_dtype)
        runs = {"int8": lambda: q(*args, **kwargs), "float": lambda: _autocast_call(f, autocast, args, kwargs)}
        best = dict.fromkeys(runs, float("inf"))
        for i in range(8):  # interleaved: a burst of other load slows both, not one
            name = ("int8", "float")[i % 2]
            t0 = time.perf_counter()
            runs[name]()
            if i >= 2:  # the first calls build kernels
                best[name] = min(best[name], time.perf_counter() - t0)
        _TIMINGS[key] = BlockTiming(best["int8"], best["float"])
    return _TIMINGS[key]


def _autocast_call(block: nn.Module, autocast, args: tuple, kwargs: dict):
    with autocast:
        return block(*args, **kwargs)


def resolve_inference_compute(device: str | torch.device = "auto", precision: str = "auto",
                              module: nn.Module | None = None, width: int = 768) -> Compute:
    """:func:`~lorafit.runtime.resolve_compute` for predicting, evaluating and serving, where ``int8`` is one
    more choice. ``auto`` takes it on a CPU with int8 dot products where one block of ``module`` (the backbone,
    LoRA merged) runs on a representative batch clearly faster in int8 than in the float precision ``auto``
    would otherwise pick (:func:`time_block`, :func:`int8_pays`); whether the model stays accurate in int8 is
    checked once it is loaded (:func:`quantize_checked`). ``module`` None: no timing, no int8 for ``auto``."""
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    check_precision(precision, dev, inference=True)
    if precision == "int8":
        return Compute(dev, None, int8=True)
    compute = resolve_compute(dev, precision, width)
    if precision == "auto" and dev.type == "cpu" and module is not None and cpu_has_int8_dot() \
            and repeated_blocks(module) is not None and int8_pays(time_block(module, compute.autocast_dtype)):
        return Compute(dev, None, int8=True)
    return compute
