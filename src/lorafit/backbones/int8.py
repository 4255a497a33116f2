"""Int8 inference on the CPU: frozen linears quantised once, activations quantised as they come.

Each weight is stored as int8 with one scale per output channel (symmetric: ``W ~ s_w * Wq``) and packed
once, at load, into the layouts of PyTorch's quantized engines (VNNI dot products on AVX-512/AVX-VNNI
CPUs, AMX on newer Xeons): fbgemm's for a few rows (one text), oneDNN's for batches, each faster where it
is used (single-thread, Zen 5: 0.68x oneDNN's time at 1 row and 0.81x at 20; oneDNN 0.88x fbgemm's at 640
rows of GPT-2 small's four products). Each call quantises its input to
uint8 with one scale for the whole (N, in) input, as ``torch.ao``'s dynamic linear and ONNX Runtime's
dynamic quantisation do, and the engine runs int8 x uint8 -> int32 and the requantisation to fp32 with the
bias in one kernel. A narrowing linear (a feed-forward's down projection) quantises outlier tokens apart
(:meth:`Int8Linear._product_apart`). In a merged model, a linear followed by an activation oneDNN can apply
in its kernel (GPT-2's GELU) becomes one :class:`Int8Activated`. Everything else (norms, attention, the head)
stays fp32.

Linears that a block always calls on the same input (GPT-2's W_query, W_key, W_value; Llama's q/k/v
projections, and its gate and up projections) become one int8 product: one quantisation of the input and
one larger matmul instead of three (:class:`SharedInput`).

A per-token activation scale (``torch._int_mm`` with separate quantise and dequantise passes) was this
module's first kernel: it makes a text's result independent of its batch-mates, but it ran at 0.55x the
prepacked engine's texts/s on a Zen 5 (oneDNN repacks an unpacked weight on every call), slower than bf16.
"""

from __future__ import annotations

import contextlib
import copy
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..errors import LorafitError
from ..runtime import (Compute, cap_onednn_caches, check_precision, cpu_flags, keep_freed_buffers, resolve_compute,
                       resolve_device)

INT8_DOT_FLAGS = {"avx512_vnni", "avx_vnni", "amx_int8"}  # int8 dot-product instructions oneDNN uses
INT8_TOLERANCE = 0.05  # the largest change of a class probability ``auto`` accepts on a run's sample texts
OUTLIER_RATIO = 8.0  # a token whose input to a narrowing linear exceeds the median token's this many times: quantised apart
SMALL_ROWS = 192  # inputs up to this many rows (tokens) run on fbgemm's kernel, larger ones on oneDNN's
# sibling linears a block calls on one input, by the names lorafit's GPT-2 and Llama decoders give them
SHARED_INPUT_GROUPS = (("W_query", "W_key", "W_value"), ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> (int8 (out, in), fp32 scale (out,)): symmetric, one scale per output channel."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127
    return torch.round(w / scale[:, None]).to(torch.int8), scale


def quantized_engines() -> tuple[str, str]:
    """The engines int8 weights are packed for: (up to ``SMALL_ROWS`` input rows, more rows). fbgemm (``x86``)
    is the faster of PyTorch's two x86 engines for a single text, oneDNN for batches (README, measured on a
    Zen 5); where only one is built in (qnnpack on ARM), it serves both."""
    engines = torch.backends.quantized.supported_engines
    small = next((e for e in ("x86", "fbgemm", "onednn", "qnnpack") if e in engines), "none")
    return small, "onednn" if "onednn" in engines else small


def cpu_has_int8_dot() -> bool:
    """Whether the CPU has int8 dot-product instructions (VNNI or AMX), without which int8 does not pay."""
    return bool(cpu_flags() & INT8_DOT_FLAGS)


def prepack(weight: torch.Tensor, bias: torch.Tensor | None, engine: str):
    """(out, in) float weight -> ``engine``'s packed int8 weight (per-channel scales) with its fp32 bias."""
    wq, scale = quantize_weight(weight)
    before = torch.backends.quantized.engine
    with warnings.catch_warnings():  # quantized tensors are deprecated as a user API; the kernels are not replaced yet
        warnings.simplefilter("ignore", UserWarning)
        q = torch._make_per_channel_quantized_tensor(wq, scale.double(), torch.zeros(len(scale), dtype=torch.long), 0)
        try:
            torch.backends.quantized.engine = engine
            return torch.ops.quantized.linear_prepack(q, None if bias is None else bias.detach().float().contiguous())
        finally:
            torch.backends.quantized.engine = before


class Int8Linear(nn.Module):
    """A frozen ``nn.Linear`` with its weight in int8 (a quarter of fp32's bytes), prepacked; inference only."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        # packed once, in each engine's layout (not re-laid-out per call); one pack where both engines are one
        small, large = quantized_engines()
        self.packed_small = prepack(weight, self.bias, small)
        self.packed = self.packed_small if large == small else prepack(weight, self.bias, large)
        # 8-bit activations need no headroom with VNNI / AMX (int32 sums); without them fbgemm's 16-bit
        # intermediate sums saturate, so activations get 7 bits, as torch.ao does there
        self.reduce_range = not cpu_has_int8_dot()

    def _product(self, x2: torch.Tensor) -> torch.Tensor:
        """(N, in) -> (N, out) fp32 with the bias, the input quantised with one scale."""
        packed = self.packed_small if x2.shape[0] <= SMALL_ROWS else self.packed
        return torch.ops.quantized.linear_dynamic(x2, packed, self.reduce_range)

    def _product_apart(self, x2: torch.Tensor) -> torch.Tensor:
        """:meth:`_product` with outlier rows quantised apart: tokens whose largest input is over ``OUTLIER_RATIO``
        times the median token's, which a feed-forward's down projection meets in pretrained decoders (SmolLM2:
        a few tokens at 3,000 against a median 1.6; one scale for all would leave the rest a few int8 steps)."""
        amax = torch.maximum(x2.amax(1), x2.amin(1).neg_())  # (N,) largest |x| of each row (vector_norm's inf: 29x slower)
        big = amax > OUTLIER_RATIO * amax.median()
        if not bool(big.any()):
            return self._product(x2)
        rows, rest = big.nonzero().squeeze(1), (~big).nonzero().squeeze(1)
        y = x2.new_empty(x2.shape[0], self.out_features)
        y.index_copy_(0, rest, self._product(x2.index_select(0, rest)))
        y.index_copy_(0, rows, self._product(x2.index_select(0, rows)))
        return y

    @classmethod
    def of(cls, linear: nn.Linear) -> "Int8Linear":
        return cls(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor, with_bias: bool = True) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).float()  # (N, in)
        y = self._product(x2) if self.in_features <= self.out_features else self._product_apart(x2)  # (N, out)
        if not with_bias and self.bias is not None:
            y -= self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def dequantized(self) -> torch.Tensor:
        """The (out, in) fp32 weight this layer computes with."""
        return torch.ops.quantized.linear_unpack(self.packed)[0].dequantize()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


def fusable_activation(activation: nn.Module) -> tuple[str, str] | None:
    """The oneDNN post-op (name, algorithm) that computes ``activation`` inside an int8 linear's kernel, where
    the activation names one (``onednn_post_op``, as GPT-2's GELU does) and this CPU and build run it."""
    post_op = getattr(activation, "onednn_post_op", None)
    if post_op is None or "onednn" not in torch.backends.quantized.supported_engines or not cpu_has_int8_dot() \
            or not hasattr(torch.ops.onednn, "qlinear_pointwise"):
        return None  # (without VNNI, oneDNN's u8 x s8 products could saturate; fbgemm's path reduces the range)
    return post_op


class Int8Activated(nn.Module):
    """A frozen linear and the activation after it as one oneDNN int8 kernel (``qlinear_pointwise``), the
    activation applied in the kernel's epilogue while the output is still in registers.

    GPT-2's feed-forward GELU otherwise reads and writes its (N, 4D) input six times: at 1,000 tokens of GPT-2
    small the fused kernel took 0.76x the time of the int8 linear and the GELU (Zen 5, one thread). The input is
    quantised per tensor (asymmetric uint8), as :class:`Int8Linear`'s engines do. For a merged model only: an
    adapter's update to this linear's output would have to come before the activation.
    """

    def __init__(self, linear: nn.Linear, post_op: tuple[str, str]):
        super().__init__()
        self.out_features, self.in_features = linear.weight.shape
        wq, scale = quantize_weight(linear.weight)
        self.packed = torch.ops.onednn.qlinear_prepack(wq, None)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("weight_zero", torch.zeros(len(scale), dtype=torch.long), persistent=False)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())
        self.post_op, self.algorithm = post_op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).float()  # (N, in)
        q = torch.quantize_per_tensor_dynamic(x2, torch.quint8, False)
        y = torch.ops.onednn.qlinear_pointwise(q.int_repr(), q.q_scale(), q.q_zero_point(), self.packed,
                                               self.weight_scale, self.weight_zero, self.bias, 1.0, 0, torch.float32,
                                               self.post_op, [], self.algorithm)  # (N, out) fp32
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8, then {self.post_op}"


class SharedInput(nn.Module):
    """Sibling linears that always see the same input, as one :class:`Int8Linear` (their weights stacked).

    Each sibling's place in the model holds a :class:`Int8Slice` of it; the first slice called on an input
    computes every sibling's output and keeps it until each slice has taken its columns (a slice called again,
    or on another input, such as the last block's queries at the pooled rows only, computes afresh).
    """

    def __init__(self, linears: list[nn.Linear]):
        super().__init__()
        weight = torch.cat([m.weight.detach().float() for m in linears])  # (sum of outs, in)
        bias = None if linears[0].bias is None else torch.cat([m.bias.detach().float() for m in linears])
        self.linear = Int8Linear(weight, bias)
        self._input: torch.Tensor | None = None
        self._output: torch.Tensor | None = None
        self._waiting: set[int] = set()  # slices that have not taken their part of the kept output

    def output_for(self, x: torch.Tensor, part: int, parts: int) -> torch.Tensor:
        """The stacked output (N, sum of outs) for input ``x``, as slice ``part`` of ``parts`` asks for it."""
        kept = self._input
        same = kept is not None and (x is kept or (x.data_ptr() == kept.data_ptr() and x.shape == kept.shape
                                                   and x.stride() == kept.stride() and x.dtype == kept.dtype))
        if not (same and part in self._waiting):
            self._input, self._output, self._waiting = x, self.linear(x), set(range(parts))
        out = self._output
        self._waiting.discard(part)
        if not self._waiting:  # every sibling has its part: let go of the input and output
            self._input = self._output = None
        return out


class Int8Slice(nn.Module):
    """One sibling of a :class:`SharedInput`: its columns of the stacked int8 product."""

    def __init__(self, shared: SharedInput, start: int, stop: int, part: int, parts: int):
        super().__init__()
        self.shared = shared
        self.start, self.stop, self.part, self.parts = start, stop, part, parts
        self.in_features, self.out_features = shared.linear.in_features, stop - start
        bias = shared.linear.bias
        self.register_buffer("bias", None if bias is None else bias[start:stop].clone(), persistent=False)

    def forward(self, x: torch.Tensor, with_bias: bool = True) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).float()  # (N, in)
        y = self.shared.output_for(x2, self.part, self.parts)[:, self.start:self.stop]  # (N, out), a view
        if not with_bias and self.bias is not None:
            y = y - self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def dequantized(self) -> torch.Tensor:
        return self.shared.linear.dequantized()[self.start:self.stop]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, columns {self.start}:{self.stop}"


def stacked_output(linears: tuple[nn.Module, ...], x: torch.Tensor) -> torch.Tensor | None:
    """``linears``' outputs on ``x`` side by side, (N, sum of outs), as the one product they are where they are,
    in order, all the slices of one :class:`SharedInput`; otherwise None (compute them one by one)."""
    shared = getattr(linears[0], "shared", None)
    if shared is None or any(type(m) is not Int8Slice or m.shared is not shared or m.part != i
                             for i, m in enumerate(linears)) or len(linears) != linears[0].parts:
        return None
    return shared.linear(x)


INT8_LINEARS = (Int8Linear, Int8Slice)  # the frozen linears an adapter can be added to (not Int8Activated)


def quantize_linears(module: nn.Module, skip: tuple[nn.Module, ...] = (), share: bool = True,
                     fuse: bool = False) -> dict[str, nn.Module]:
    """Replace every ``nn.Linear`` inside ``module`` (except those in ``skip``) by an :class:`Int8Linear`, or
    (``share``) siblings of one input (``SHARED_INPUT_GROUPS``) by slices of one :class:`SharedInput`, or
    (``fuse``, a merged model) a linear followed by an activation oneDNN can apply (:func:`fusable_activation`)
    by an :class:`Int8Activated` and an identity, in place; returns the float modules replaced, by name (for
    :func:`restore_linears`). LoRA must be merged (or unwrapped) first: only plain linears are taken."""
    found = {n: m for n, m in module.named_modules() if type(m) is nn.Linear and not any(m is s for s in skip)}
    replaced: dict[str, nn.Module] = {}
    for name, seq in list(module.named_modules()) if fuse else ():
        if isinstance(seq, nn.Sequential):
            prefix = f"{name}." if name else ""
            for i in range(len(seq) - 1):
                linear, post_op = f"{prefix}{i}", fusable_activation(seq[i + 1])
                if linear in found and post_op is not None:
                    replaced[linear], replaced[f"{prefix}{i + 1}"] = found.pop(linear), seq[i + 1]
                    seq[i], seq[i + 1] = Int8Activated(replaced[linear], post_op), nn.Identity()
    grouped: set[str] = set()
    for parent_name, _ in list(module.named_modules()) if share else ():
        prefix = f"{parent_name}." if parent_name else ""
        for names in SHARED_INPUT_GROUPS:
            full = [prefix + n for n in names]
            if all(f in found for f in full) and len({(found[f].in_features, found[f].bias is None) for f in full}) == 1:
                _share(module, full, [found[f] for f in full])
                grouped.update(full)
    for name, linear in found.items():
        if name not in grouped:
            _set(module, name, Int8Linear.of(linear))
    return {**replaced, **found}


def _share(module: nn.Module, names: list[str], linears: list[nn.Linear]) -> None:
    shared = SharedInput(linears)
    start = 0
    for part, (name, linear) in enumerate(zip(names, linears)):
        _set(module, name, Int8Slice(shared, start, start + linear.out_features, part, len(names)))
        start += linear.out_features


def restore_linears(module: nn.Module, replaced: dict[str, nn.Module]) -> None:
    for name, original in replaced.items():
        _set(module, name, original)


def _set(module: nn.Module, name: str, child: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(module.get_submodule(parent_name) if parent_name else module, attr, child)


def quantize_checked(module: nn.Module, logits: Callable[[], torch.Tensor], skip: tuple[nn.Module, ...] = (),
                     tolerance: float | None = None, multi_label: bool = False, fuse: bool = False) -> bool:
    """Quantise ``module``'s linears and keep them only if ``logits()`` (the class logits of a few sample texts)
    still gives every text its class (``multi_label``: each label's sigmoid on the same side of 0.5) and each
    probability within ``tolerance`` (None: ``INT8_TOLERANCE``); otherwise the float linears go back. Returns
    whether int8 was kept: what ``auto`` asks before it settles on int8. ``fuse``: as :func:`quantize_linears`."""
    tolerance = INT8_TOLERANCE if tolerance is None else tolerance

    def decided(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = z.float()
        return (torch.sigmoid(z), z >= 0) if multi_label else (torch.softmax(z, -1), z.argmax(-1))

    (before, classes) = decided(logits())
    linears = quantize_linears(module, skip, fuse=fuse)
    (after, classes_after) = decided(logits())
    if torch.equal(classes, classes_after) and float((before - after).abs().max()) <= tolerance:
        return True
    restore_linears(module, linears)
    return False


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
    kernels: one quantised by :func:`quantize_linears` as a merged model is (``fuse``), one with its linears
    stored in ``float_dtype`` (None: fp32) under autocast. About a tenth of a second for GPT-2 small."""
    blocks = repeated_blocks(module)
    if blocks is None:
        raise LorafitError(f"internal: {type(module).__name__} has no stack of blocks to time")
    block = blocks[0]
    shapes = tuple((type(m).__name__, tuple(p.shape)) for m in block.modules() for p in m.parameters(recurse=False))
    key = (type(block).__name__, shapes, float_dtype, torch.get_num_threads())
    if key not in _TIMINGS:
        args, kwargs = _block_inputs(module, block)
        q, f = copy.deepcopy(block).eval(), copy.deepcopy(block).eval()
        quantize_linears(q, fuse=True)
        if float_dtype is not None:
            for m in f.modules():
                if type(m) is nn.Linear:
                    m.to(float_dtype)
        autocast = contextlib.nullcontext() if float_dtype is None else torch.autocast("cpu", dtype=float_dtype)
        runs = {"int8": lambda: q(*args, **kwargs), "float": lambda: _autocast_call(f, autocast, args, kwargs)}
        best = dict.fromkeys(runs, float("inf"))
        for i in range(8):  # interleaved: a burst of other load slows both, not one
            name = ("int8", "float")[i % 2]
            t0 = time.process_time()  # CPU time: other load on the machine inflates it far less than wall time
            runs[name]()
            if i >= 2:  # the first calls build kernels
                best[name] = min(best[name], time.process_time() - t0)
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
    if dev.type == "cpu":
        keep_freed_buffers()
    if precision == "int8":
        cap_onednn_caches()  # as resolve_compute does: oneDNN's quantised kernels fill the same caches
        return Compute(dev, None, int8=True)
    compute = resolve_compute(dev, precision, width)
    if precision == "auto" and dev.type == "cpu" and module is not None and cpu_has_int8_dot() \
            and repeated_blocks(module) is not None and int8_pays(time_block(module, compute.autocast_dtype)):
        return Compute(dev, None, int8=True)
    return compute
