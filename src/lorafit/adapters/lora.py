"""LoRA (Hu et al., 2021, arXiv:2106.09685): a frozen ``nn.Linear`` plus a trainable low-rank update.

``y = W x + b + (alpha / r) * B A dropout(x)`` with A (r x in) Kaiming-uniform and B (out x r) zero, so
the wrapped layer computes exactly what the base did until B learns something. rsLoRA (Kalajdzievski,
2023, arXiv:2312.03732) scales by alpha / sqrt(r) instead, which keeps updates stable at large ranks.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LorafitError, UsageError

# Short names for common target sets; anything else is a module-name pattern (see `matches`).
TARGET_ALIASES: dict[str, tuple[str, ...]] = {
    "attention": ("W_query", "W_key", "W_value", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj"),
    "qv": ("W_query", "W_value", "q_proj", "v_proj"),
    "feedforward": ("ff.layers.0", "ff.layers.2", "gate_proj", "up_proj", "down_proj"),
}
ALL_BLOCK_LINEARS = "all"  # every nn.Linear inside a numbered block (trf_blocks.3..., layers.3...)
_IN_BLOCK = re.compile(r"(^|.*\.)\d+\..+")


@dataclass
class LoRAConfig:
    """What to inject and how; stored in adapter.json so an adapter can be rebuilt exactly."""

    rank: int = 8  # r: the update is rank r
    alpha: float = 16.0  # scaling numerator: the update is multiplied by alpha / r
    dropout: float = 0.0  # dropout on the LoRA path's input only
    use_rslora: bool = False  # scale by alpha / sqrt(r) (rank-stabilised LoRA)
    targets: tuple[str, ...] = field(default=(ALL_BLOCK_LINEARS,))  # aliases or module-name patterns

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        problems = []
        if self.rank < 1:
            problems.append(f"--rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            problems.append(f"--alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"--lora-dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            problems.append("--targets must name at least one module pattern")
        if problems:
            raise UsageError("; ".join(problems))

    @property
    def scaling(self) -> float:
        """What B A is multiplied by: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LoRAConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class LoRAFunction(torch.autograd.Function):
    """``x W^T + b + s * (xd A^T) B^T`` as one autograd node (xd: the LoRA path's input, x when None).

    Written out rather than left to autograd because the work per layer is one big matmul and a few
    tiny rank-r ones: one node instead of several saves their bookkeeping, and the update and the
    input gradients are accumulated in place (no separate add passes). W's gradient is formed only if
    W is trainable. Under autocast everything runs in the autocast dtype, as ``nn.Linear`` would.
    """

    @staticmethod
    def forward(ctx, x, xd, weight, bias, lora_A, lora_B, scaling):
        dev = x.device.type
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        w, a_w, b_w = weight.to(dt), lora_A.to(dt), lora_B.to(dt)  # no-ops in fp32
        xc = x.to(dt)
        xdc = xc if xd is None else xd.to(dt)
        y = F.linear(xc, w, None if bias is None else bias.to(dt))  # (N, out)
        a = xdc @ a_w.t()  # (N, r)
        y.addmm_(a, b_w.t(), alpha=scaling)  # y += s * a B^T
        ctx.save_for_backward(xc if weight.requires_grad else None, xdc, a, w, a_w, b_w)
        ctx.scaling = scaling
        return y

    @staticmethod
    def backward(ctx, g):
        xc, xdc, a, w, a_w, b_w = ctx.saved_tensors
        need_x, need_xd, need_w, need_b, need_a, need_bw, _ = ctx.needs_input_grad
        ga = g @ (b_w * ctx.scaling)  # (N, r): gradient at the LoRA path's bottleneck
        grad_a = (ga.t() @ xdc) if need_a else None  # (r, in)
        grad_bw = (g.t() @ a).mul_(ctx.scaling) if need_bw else None  # (out, r)
        gx = g @ w if need_x else None  # (N, in)
        gxd = None
        if need_xd:
            gxd = ga @ a_w
        elif need_x:
            gx.addmm_(ga, a_w)  # the LoRA path read x itself: its gradient joins the base's in place
        grad_w = g.t() @ xc if need_w else None
        grad_b = g.sum(0) if need_b else None
        return gx, gxd, grad_w, grad_b, grad_a, grad_bw, None


class LoRALinear(nn.Module):
    """Wraps (never subclasses) a frozen ``nn.Linear``; ``merge``/``unmerge`` are explicit and idempotent."""

    def __init__(self, base: nn.Linear, cfg: LoRAConfig | None = None):
        super().__init__()
        cfg = cfg or LoRAConfig()
        self.base = base
        self.base.requires_grad_(False)
        self.rank = cfg.rank
        self.scaling = cfg.scaling
        factory = {"device": base.weight.device, "dtype": torch.float32}
        self.lora_A = nn.Parameter(torch.empty(cfg.rank, base.in_features, **factory))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, cfg.rank, **factory))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear (and PEFT) initialise A
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.merged = False
        self._unmerged_weight: torch.Tensor | None = None  # the exact low-precision base while merged

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])  # (N, in); lorafit's decoders pass 2-D already
        xd = None if isinstance(self.dropout, nn.Identity) else self.dropout(x2)
        y = LoRAFunction.apply(x2, xd, self.base.weight, self.base.bias, self.lora_A, self.lora_B, self.scaling)
        return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])

    @torch.no_grad()
    def merge(self) -> None:
        """Fold B A * scale into the base weight: same outputs, no LoRA cost at inference.

        A base stored in low precision (bf16 training) would not get its exact values back by
        subtracting the update again, so its values are kept for :meth:`unmerge`.
        """
        if not self.merged:
            w = self.base.weight
            self._unmerged_weight = w.detach().clone() if w.dtype != torch.float32 else None
            w += self.delta_weight().to(w.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update back out of the base weight, so training can continue."""
        if self.merged:
            if self._unmerged_weight is not None:
                self.base.weight.copy_(self._unmerged_weight)
                self._unmerged_weight = None
            else:
                self.base.weight -= self.delta_weight()
            self.merged = False

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}, merged={self.merged}"


def expand_targets(targets: tuple[str, ...] | list[str]) -> list[str]:
    out: list[str] = []
    for t in targets:
        out.extend(TARGET_ALIASES.get(t, (t,)))
    return out


def matches(name: str, pattern: str) -> bool:
    """A module matches a pattern by exact name, by dotted suffix, or by full regex match.

    The special pattern ``all`` matches every module inside a numbered block (``trf_blocks.3.att.W_query``,
    ``model.layers.0.mlp.up_proj``), i.e. the transformer layers and not the embeddings or heads.
    """
    if pattern == ALL_BLOCK_LINEARS:
        return bool(_IN_BLOCK.fullmatch(name))
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def inject_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Replace every targeted ``nn.Linear`` by a ``LoRALinear``; returns the replaced module names."""
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise LorafitError("the model already has LoRA layers; inject once (load an adapter to replace them)")
    patterns = expand_targets(cfg.targets)
    names = [n for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and any(matches(n, p) for p in patterns)]
    if not names:
        raise LorafitError(f"LoRA targets {', '.join(cfg.targets)} match no nn.Linear in the model")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(getattr(parent, child), cfg))
    return names


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def freeze_for_lora(model: nn.Module, trainable: tuple[nn.Module, ...] = ()) -> None:
    """Freeze everything, then unfreeze LoRA A/B and the given modules (the head): by type, not by name."""
    model.requires_grad_(False)
    for m in lora_layers(model).values():
        m.lora_A.requires_grad_(True)
        m.lora_B.requires_grad_(True)
    for m in trainable:
        m.requires_grad_(True)


def store_frozen_linears(model: nn.Module, dtype: torch.dtype) -> None:
    """Keep every frozen linear's weight and bias in ``dtype`` (the autocast dtype): cast once, not every step."""
    for m in model.modules():
        if isinstance(m, nn.Linear) and not any(p.requires_grad for p in m.parameters()):
            m.to(dtype)


def set_merged(model: nn.Module, merged: bool) -> None:
    for m in lora_layers(model).values():
        m.merge() if merged else m.unmerge()


@contextlib.contextmanager
def merged(model: nn.Module):
    """LoRA folded into the base inside the block (inference at the base's cost); unmerged again after."""
    layers = [m for m in lora_layers(model).values() if not m.merged]
    for m in layers:
        m.merge()
    try:
        yield model
    finally:
        for m in layers:
            m.unmerge()


def unwrap_merged(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by its base layer with the update folded in: a plain model for deployment."""
    for name, m in lora_layers(model).items():
        m.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, m.base)
    return model
