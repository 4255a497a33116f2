"""Many classifiers on one base: each adapter's LoRA, head and labels over a single shared copy of the base.

A batch may mix texts of several adapters. Its rows are put in adapter order, so each adapter's rows
(and, after packing, its tokens) are one contiguous segment. Every adapted linear then runs the base
matmul once for the whole batch and adds each segment's own update in place:
``y[s:e] += scale_k * (x[s:e] A_k^T) B_k^T`` (DoRA's magnitude scales that segment's rows after). The
heads run the same way on the pooled rows. The base never runs twice, and a row computes exactly what
its own classifier would alone (up to the rounding of an unmerged update, ~1e-7 in fp32).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.base import Backbone
from ..data.batching import collate, encode_texts
from ..data.windows import Windows, frame_of
from ..backbones.int8 import INT8_LINEARS, quantize_checked, quantize_linears, resolve_inference_compute
from ..backbones.loader import load_backbone
from ..errors import LorafitError
from ..files import load_safetensors
from ..runtime import Compute, resolve_compute
from .classifier import pool
from .hf_layout import sample_texts
from .loading import load_classifier
from .lora import LoRAConfig, merge_and_unload, store_frozen_linears
from .build import weight_fingerprint
from .storage import ADAPTER_CONFIG, ADAPTER_WEIGHTS, ClassifierSpec, read_spec, with_pair_join

LORA_KEYS = ("lora_A", "lora_B", "lora_magnitude", "pissa_A0", "pissa_B0")


@dataclass
class LayerUpdate:
    """One adapter's update to one linear: ``scale * B A``, then DoRA's per-row factor (None without DoRA)."""

    a: torch.Tensor  # (r, in)
    bt: torch.Tensor  # (r, out): B transposed, as the product reads it
    scaling: float
    row_scale: torch.Tensor | None = None  # (out,) DoRA: m / ||W + s B A||, a constant at inference

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass(eq=False)
class Adapter:
    """One served classifier: its name, where it came from, its updates by layer name, its head."""

    name: str
    source: str  # the run folder
    spec: ClassifierSpec
    layers: dict[str, LayerUpdate]
    head_weight: torch.Tensor  # (C, D)
    head_bias: torch.Tensor | None  # (C,)
    size_bytes: int = 0  # what the adapter's own tensors take in memory
    windows: Windows | None = None  # how it cuts long texts on this base, as in its training (None: it truncates)
    created: int = field(default_factory=lambda: int(time.time()))  # when it was loaded (Unix time)

    def __post_init__(self) -> None:
        """The run's temperature folded into the head (as :meth:`Classifier.divide_logits`): calibrated logits."""
        t = self.spec.temperature
        if t != 1.0:
            self.head_weight = self.head_weight / t
            self.head_bias = None if self.head_bias is None else self.head_bias / t

    @property
    def labels(self) -> list[str]:
        return self.spec.labels


@dataclass
class _Segments:
    """How many sequences (and tokens) of each adapter the running batch holds, in row order."""

    adapters: list[Adapter]
    seqs: list[int]
    tokens: list[int]
    padded_length: int

    def split(self, layer: str, n: int) -> list[tuple[LayerUpdate | None, int, int]]:
        """For an (n, in) input of ``layer``: each adapter's update to it (None: not adapted), first row, row count."""
        out, start = [], 0
        for a, rows in zip(self.adapters, self.rows(n)):
            out.append((a.layers.get(layer), start, rows))
            start += rows
        return out

    def rows(self, n: int) -> list[int]:
        """Rows per adapter for an (n, in) input: the packed tokens, one row per sequence, or the padded grid.
        (Where two of these counts coincide, so do the splits.)"""
        if n == sum(self.tokens):
            return self.tokens
        if n == len(self.seqs) or n == sum(self.seqs):
            return self.seqs
        if n == sum(self.seqs) * self.padded_length:
            return [k * self.padded_length for k in self.seqs]
        raise LorafitError(f"internal: {n} rows do not split into the batch's adapter segments")


class GroupedLoRALinear(nn.Module):
    """A shared frozen ``nn.Linear`` plus, per segment of rows, the update of that segment's adapter.

    The updates of all the batch's adapters run as two matmuls, not two per adapter: ``h = x [A_1; ...; A_K]^T``
    (N, sum of ranks), each row's columns of other adapters zeroed (and its own scaled) by a mask, then
    ``y += h [B_1, ..., B_K]^T``. Per-adapter products would be smaller, but each new row count is a new
    oneDNN kernel in bf16, and with several adapters a batch asks for more kernels than the cache keeps.
    """

    def __init__(self, base: nn.Linear, name: str, owner: "SharedBase"):
        super().__init__()
        self.base, self.name = base, name
        self._owner = [owner]  # in a list: not registered as a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base, bias = self.base, self.base.bias
        int8 = isinstance(base, INT8_LINEARS)  # int8 weights take fp32 inputs; the updates stay in fp32
        x2 = x.reshape(-1, x.shape[-1]).to(torch.float32 if int8 else base.weight.dtype)  # (N, in), cast once
        segments = self._owner[0].segments
        spans = [(u, start, n) for u, start, n in segments.split(self.name, x2.shape[0]) if u is not None and n]
        dora = any(u.row_scale is not None for u, _, _ in spans)
        # (N, out): the base, once for every row
        y = base(x2, with_bias=not dora) if int8 else F.linear(x2, base.weight, None if dora else bias)
        if spans:
            a = torch.cat([u.a for u, _, _ in spans]) if len(spans) > 1 else spans[0][0].a  # (R, in)
            bt = torch.cat([u.bt for u, _, _ in spans]) if len(spans) > 1 else spans[0][0].bt  # (R, out)
            h = F.linear(x2, a)  # (N, R)
            mask = h.new_zeros(h.shape)
            col = 0
            for u, start, n in spans:
                mask[start:start + n, col:col + u.rank] = u.scaling
                col += u.rank
            y.addmm_(h.mul_(mask), bt)  # y += s (x A^T) B^T, each row with its own adapter's factors
            for u, start, n in spans:
                if u.row_scale is not None:
                    y[start:start + n].mul_(u.row_scale)
        if dora and bias is not None:
            y += bias.to(y.dtype)
        return y.view(*x.shape[:-1], y.shape[-1])


@dataclass
class SharedBase:
    """A backbone whose linears can carry any number of adapters, and the adapters' heads.

    ``forward`` takes rows already in adapter order; :meth:`logits` does the ordering for any texts.
    ``lock`` is held while a batch runs and while layers are wrapped for a new adapter.
    """

    backbone: Backbone
    pooling: str
    fingerprint: str
    compute: Compute = Compute()  # the device, and the autocast dtype weights are stored in (None: fp32)
    alone: str | None = None  # a merged model's folder: its base has the update folded in, nothing can join
    segments: _Segments | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def prepare(self) -> None:
        """Frozen, in eval mode, linears stored in the compute dtype (cast once, not per batch), on the device."""
        module = self.backbone.module
        module.requires_grad_(False).eval()
        if self.compute.autocast_dtype is not None:
            store_frozen_linears(module, self.compute.autocast_dtype)
        module.to(self.compute.device)

    def settle(self, compute: Compute, adapter: Adapter) -> None:
        """Compute in ``compute`` from now on (auto's float choice after int8 was refused): the base's linears and
        ``adapter``'s tensors, loaded for the other precision, are cast to it in place, not loaded again."""
        self.compute = compute
        self.prepare()
        for u in adapter.layers.values():
            u.a, u.bt = self._stored(u.a), self._stored(u.bt)
            u.row_scale = None if u.row_scale is None else self._stored(u.row_scale)
        adapter.head_weight = self._stored(adapter.head_weight)
        adapter.head_bias = None if adapter.head_bias is None else self._stored(adapter.head_bias)

    def linear_names(self) -> dict[str, nn.Module]:
        return {n: m for n, m in self.backbone.module.named_modules()
                if isinstance(m, (nn.Linear, *INT8_LINEARS, GroupedLoRALinear))}

    def wrap(self, names: list[str]) -> None:
        """Give these linears a per-segment update path (the first adapter that targets them does it)."""
        for name in names:
            m = self.backbone.module.get_submodule(name)
            if isinstance(m, GroupedLoRALinear):
                continue
            parent_name, _, child = name.rpartition(".")
            parent = self.backbone.module.get_submodule(parent_name) if parent_name else self.backbone.module
            setattr(parent, child, GroupedLoRALinear(m, name, self))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, adapters: list[Adapter],
                counts: list[int]) -> list[torch.Tensor]:
        """Rows grouped by adapter (``counts[k]`` rows of ``adapters[k]``, in that order) -> fp32 logits per row."""
        lengths = attention_mask.sum(dim=1)  # (B,)
        ends = np.cumsum([0, *counts])
        tokens = [int(lengths[s:e].sum()) for s, e in zip(ends[:-1], ends[1:])]
        self.segments = _Segments(adapters, counts, tokens, input_ids.shape[1])
        module = self.backbone.module
        try:
            if self.pooling == "last" and getattr(module, "can_pool_last_block", False):
                pooled = module.hidden_states(input_ids, attention_mask, at=lengths - 1)  # (B, D)
            else:
                pooled = pool(module.hidden_states(input_ids, attention_mask), attention_mask, self.pooling)
        finally:
            self.segments = None
        out = []
        for a, s, e in zip(adapters, ends[:-1], ends[1:]):
            w = a.head_weight
            out.extend(F.linear(pooled[s:e].to(w.dtype), w, a.head_bias).float())  # (C_k,) each
        return out

    def quantize(self, adapter: Adapter, texts: list, checked: bool) -> bool:
        """The base's linears in int8; ``checked``: only if ``adapter``'s classes and probabilities of ``texts``
        stay put (:func:`~lorafit.backbones.int8.quantize_checked`). Returns whether int8 was kept. A base served
        alone (merged, no update added to any output) also takes activations into the int8 kernels (``fuse``)."""
        module, fuse = self.backbone.module, bool(self.alone)
        if not checked:
            quantize_linears(module, fuse=fuse)
            return True
        self.wrap(list(adapter.layers))
        data = encode_texts(self.backbone.encoder, texts, None, self.backbone.context_length, warn=False)
        batch = collate(data, np.arange(len(data.ids)), self.backbone.encoder.pad_id)

        @torch.inference_mode()
        def logits() -> torch.Tensor:
            return torch.stack(self.forward(batch.input_ids, batch.attention_mask, [adapter], [len(data.ids)]))

        return quantize_checked(module, logits, multi_label=adapter.spec.multi_label, fuse=fuse)

    def load_adapter(self, name: str, directory: str | Path) -> Adapter:
        """A lorafit adapter folder as an :class:`Adapter` of this base, or a one-line error naming what differs."""
        directory = Path(directory)
        if not (directory / ADAPTER_CONFIG).is_file():
            raise LorafitError(f"{directory}: not a lorafit adapter folder (no {ADAPTER_CONFIG}); several "
                               f"classifiers share a base only as adapters (a merged or PEFT folder is served alone)")
        spec = read_spec(directory)
        self.check(spec, str(directory))
        spec = with_pair_join(spec, self.backbone, str(directory))  # a pair adapter beside single-text ones
        tensors = load_safetensors(directory / ADAPTER_WEIGHTS)
        layers = self._layer_updates(tensors, spec.lora, directory / ADAPTER_WEIGHTS)
        head_w, head_b = tensors.get("head.weight"), tensors.get("head.bias")
        hidden = self.backbone.hidden_size
        if head_w is None or tuple(head_w.shape) != (spec.num_classes, hidden):
            raise LorafitError(f"{directory / ADAPTER_WEIGHTS}: head.weight should be ({spec.num_classes}, {hidden}) "
                               f"for {spec.num_classes} labels, got {None if head_w is None else tuple(head_w.shape)}")
        head_w, head_b = (None if t is None else self._stored(t) for t in (head_w, head_b))
        own = [head_w, head_b, *(t for u in layers.values() for t in (u.a, u.bt, u.row_scale))]
        size = sum(t.numel() * t.element_size() for t in own if t is not None)
        return Adapter(name, str(directory), spec, layers, head_w, head_b, size, self.windows(spec))

    def windows(self, spec: ClassifierSpec) -> Windows | None:
        """How a run cuts long texts on this base (settings that do not fit it fail here, before it is served)."""
        return spec.long.windows(self.backbone.context_length, frame_of(self.backbone.encoder))

    def check(self, spec: ClassifierSpec, where: str) -> None:
        """Refuse an adapter trained on another base (architecture or weights) or pooling differently."""
        if self.alone:
            raise LorafitError(f"{where}: cannot share a base with {self.alone}: a merged model (its update folded "
                               f"into the base) is served alone; serve the adapter run it came from instead")
        ours = self.backbone.architecture
        if spec.architecture != ours:
            diff = [f"{k} {spec.architecture.get(k)} vs {ours.get(k)}" for k in dict.fromkeys([*spec.architecture, *ours])
                    if spec.architecture.get(k) != ours.get(k)]
            raise LorafitError(f"{where}: adapter was trained on another base model ({', '.join(diff)}); "
                               f"adapters of different bases need separate servers")
        if spec.fingerprint and spec.fingerprint != self.fingerprint:
            raise LorafitError(f"{where}: adapter was trained on other base weights (fingerprint {spec.fingerprint} "
                               f"vs {self.fingerprint} of the served base); adapters of different bases need separate servers")
        if (spec.pooling or self.pooling) != self.pooling:
            raise LorafitError(f"{where}: pools the {spec.pooling} token, the served adapters the {self.pooling}")

    def _layer_updates(self, tensors: dict[str, torch.Tensor], lora: LoRAConfig, path: Path) -> dict[str, LayerUpdate]:
        by_layer: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            layer, _, kind = key.rpartition(".")
            if kind in LORA_KEYS:
                by_layer.setdefault(layer.removeprefix("backbone."), {})[kind] = t
        linears = self.linear_names()
        updates = {}
        for name, parts in by_layer.items():
            m = linears.get(name)
            if m is None:
                raise LorafitError(f"{path}: LoRA layer {name} is not a linear of the served base")
            updates[name] = self._update(m.base if isinstance(m, GroupedLoRALinear) else m, parts, lora, f"{path}: {name}")
        return updates

    def _update(self, linear: nn.Module, parts: dict[str, torch.Tensor], lora: LoRAConfig, where: str) -> LayerUpdate:
        a, b = parts.get("lora_A"), parts.get("lora_B")
        if a is None or b is None or a.shape[1] != linear.in_features or b.shape[0] != linear.out_features \
                or a.shape[0] != b.shape[1]:
            raise LorafitError(f"{where}: LoRA A/B missing or not shaped for a {linear.in_features} -> "
                               f"{linear.out_features} linear")
        if "pissa_A0" in parts:  # the update is s (B A - B0 A0): one factor pair of twice the rank
            a, b = torch.cat([a, parts["pissa_A0"]]), torch.cat([b, -parts["pissa_B0"]], dim=1)
        row_scale = None
        if "lora_magnitude" in parts:
            w = (linear.dequantized() if isinstance(linear, INT8_LINEARS) else linear.weight.detach()).float()
            norm = torch.linalg.vector_norm(w + lora.scaling * (b.float() @ a.float()), dim=1)
            row_scale = (parts["lora_magnitude"].float() / norm)
        return LayerUpdate(self._stored(a), self._stored(b.t()), lora.scaling,
                           None if row_scale is None else self._stored(row_scale))

    def _stored(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.compute.device, self.compute.autocast_dtype or torch.float32).contiguous()


def open_base(name: str, directory: str | Path, device: str, precision: str,
              merged: bool = False) -> tuple[SharedBase, Adapter]:
    """The base a run was trained on, ready to share (frozen, on ``--device`` in ``--precision``), and that run on it.

    A lorafit adapter folder loads its base once, plain; other adapters then join it. A merged or PEFT
    folder becomes its own base (the update folded in) and serves alone: no adapter matches its weights;
    so does an adapter folder with ``merged`` (nothing will join it: its update then costs nothing per batch,
    and int8 quantises the merged weights, as predict does).
    In int8 the base's linears are quantised (the adapters' updates stay fp32); ``auto`` keeps int8 only
    where the first run's sample texts keep their classes, and otherwise keeps the float linears the check put
    back, in the precision ``auto`` picks without int8.
    """
    base, adapter = _open(name, Path(directory), device, precision, merged)
    if base.compute.int8 and not base.quantize(adapter, sample_texts(directory, pair=adapter.spec.pair),
                                               checked=precision == "auto"):
        base.settle(resolve_compute(base.compute.device, "auto", base.backbone.hidden_size), adapter)
    return base, adapter


def _open(name: str, directory: Path, device: str, precision: str, merged: bool) -> tuple[SharedBase, Adapter]:
    if (directory / ADAPTER_CONFIG).is_file() and not merged:
        spec = read_spec(directory)
        backbone = load_backbone(spec.backbone, lm_head=False)
        base = SharedBase(backbone, spec.pooling or backbone.default_pooling, weight_fingerprint(backbone.module),
                          resolve_inference_compute(device, precision, backbone.module, backbone.hidden_size))
        base.prepare()
        return base, base.load_adapter(name, directory)
    model, backbone, spec = load_classifier(directory)
    merge_and_unload(model)
    base = SharedBase(backbone, model.pooling, spec.fingerprint,
                      resolve_inference_compute(device, precision, backbone.module, backbone.hidden_size),
                      alone=str(directory))
    base.prepare()
    head = model.head
    return base, Adapter(name, str(directory), spec, {}, base._stored(head.weight.detach()),
                         None if head.bias is None else base._stored(head.bias.detach()),
                         sum(p.numel() * p.element_size() for p in head.parameters()), base.windows(spec))
