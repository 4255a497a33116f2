"""LoRA (Hu et al., 2021, arXiv:2106.09685): a frozen ``nn.Linear`` plus a trainable low-rank update.

``y = W x + b + (alpha / r) * B A dropout(x)`` with A (r x in) Kaiming-uniform and B (out x r) zero, so
the wrapped layer computes exactly what the base did until B learns something. rsLoRA (Kalajdzievski,
2023, arXiv:2312.03732) scales by alpha / sqrt(r) instead, which keeps updates stable at large ranks.

DoRA (Liu et al., 2024, arXiv:2402.09353) splits the adapted weight into a learned magnitude per output
row and a direction: ``W' = m * (W + s B A) / ||W + s B A||``, the norm taken row-wise and, as the paper
(section 4.3) and PEFT do, treated as a constant in backward. PiSSA (Meng et al., 2024, arXiv:2404.02948)
starts A and B from W's top-r singular vectors instead of noise and zero; the principal part they start
from is subtracted again (``W + s (B A - B0 A0)``), so the model computes what the base did until training.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FieldError, LorafitError, SettingError
from ..files import from_known_fields

# Short names for common target sets; anything else is a module-name pattern (see `matches`).
TARGET_ALIASES: dict[str, tuple[str, ...]] = {
    "attention": ("W_query", "W_key", "W_value", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj"),
    "qv": ("W_query", "W_value", "q_proj", "v_proj"),
    "feedforward": ("ff.layers.0", "ff.layers.2", "gate_proj", "up_proj", "down_proj"),
}
INITS = ("default", "pissa")  # default: A Kaiming-uniform, B zero; pissa: A, B from W's principal singular vectors
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
    use_dora: bool = False  # weight-decomposed LoRA: a trainable magnitude per output row over the direction
    init: str = "default"  # one of INITS

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        problems = []
        if self.rank < 1:
            problems.append(SettingError("{rank} must be >= 1, got {}", self.rank))
        if self.alpha <= 0:
            problems.append(SettingError("{alpha} must be > 0, got {}", self.alpha))
        if not 0.0 <= self.dropout < 1.0:
            problems.append(SettingError("{dropout} must be in [0, 1), got {}", self.dropout))
        if not self.targets:
            problems.append(SettingError("{targets} must name at least one module pattern"))
        if self.init not in INITS:
            problems.append(SettingError("{init} must be one of {}, got {!r}", ", ".join(INITS), self.init))
        if problems:
            raise SettingError.joined(problems)

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
        return from_known_fields(cls, d)


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

    def __init__(self, base: nn.Linear, cfg: LoRAConfig | None = None, initialise: bool = True):
        """``initialise=False`` skips the costly part of an initialisation (PiSSA's SVD) for a layer whose
        values are about to be loaded from an adapter file."""
        super().__init__()
        cfg = cfg or LoRAConfig()
        self.base = base
        self.base.requires_grad_(False)
        self.rank = cfg.rank
        self.scaling = cfg.scaling
        factory = {"device": base.weight.device, "dtype": torch.float32}
        self.lora_A = nn.Parameter(torch.empty(cfg.rank, base.in_features, **factory))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, cfg.rank, **factory))  # (out, r)
        if cfg.init == "pissa":
            self._pissa_init(initialise)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear (and PEFT) initialise A
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        # DoRA's magnitude starts as the adapted weight's row norms, so the layer starts as the base
        self.lora_magnitude = nn.Parameter(self.weight_norm()) if cfg.use_dora else None  # (out,)
        self.merged = False
        self._unmerged_weight: torch.Tensor | None = None  # the exact low-precision base while merged
        self._merge_scale: torch.Tensor | None = None  # DoRA's m / ||W + s B A|| at merge time, to unmerge

    @torch.no_grad()
    def _pissa_init(self, initialise: bool) -> None:
        """A, B from the top-r singular triplets of W (``s B A`` is W's best rank-r part), as PEFT's
        ``init_lora_weights="pissa"``; their starting values stay as frozen buffers B0, A0 so that
        ``W + s (B A - B0 A0)`` is the base at step 0 and the base weight itself is never rewritten."""
        w = self.base.weight.detach().float()  # (out, in)
        if self.rank > min(w.shape):
            raise FieldError("{init} pissa: {rank} {} exceeds the layer's size {}", self.rank, tuple(w.shape))
        if initialise:
            u, sv, vh = torch.linalg.svd(w, full_matrices=False)
            root = (sv[: self.rank] / self.scaling).sqrt()  # (r,)
            self.lora_A.copy_(root[:, None] * vh[: self.rank])  # (r, in)
            self.lora_B.copy_(u[:, : self.rank] * root)  # (out, r)
        else:
            self.lora_A.zero_()  # placeholders: the adapter file brings A, B, A0 and B0
        self.register_buffer("pissa_A0", self.lora_A.detach().clone())
        self.register_buffer("pissa_B0", self.lora_B.detach().clone())

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def use_dora(self) -> bool:
        return self.lora_magnitude is not None

    @property
    def use_pissa(self) -> bool:
        return hasattr(self, "pissa_A0")

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of the update ``s B A``; with PiSSA the starting point is taken out: [A; A0], [B, -B0]."""
        if not self.use_pissa:
            return self.lora_A, self.lora_B
        return torch.cat([self.lora_A, self.pissa_A0]), torch.cat([self.lora_B, -self.pissa_B0], dim=1)

    def delta_weight(self) -> torch.Tensor:
        a, b = self.factors()
        return (b @ a) * self.scaling  # (out, in)

    @torch.no_grad()
    def weight_norm(self, factors: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Row norms of ``W + s B A`` in fp32, detached, without forming the (out, in) sum:
        ``||W_i||^2 + 2 s <W_i, (B A)_i> + s^2 ||(B A)_i||^2`` needs only W A^T (out, r) and A A^T (r, r).
        ``factors``: :meth:`factors` when the caller has them already."""
        a, b = factors or self.factors()
        w = self.base.weight  # (out, in): fp32, or bf16 where bf16 training stores the frozen base so (no fp32 copy)
        dev = w.device.type
        in_autocast = torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev)
        with torch.autocast(dev, enabled=False) if in_autocast else contextlib.nullcontext():  # fp32 under autocast too
            cross = ((w @ a.t().to(w.dtype)).float() * b).sum(1)  # (out,)
            own = ((b @ (a @ a.t())) * b).sum(1)  # (out,)
            sq = (torch.linalg.vector_norm(w, dim=1, dtype=torch.float32).square() + (2 * self.scaling) * cross
                  + self.scaling ** 2 * own)
        return sq.clamp_min(0).sqrt()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])  # (N, in); lorafit's decoders pass 2-D already
        xd = None if isinstance(self.dropout, nn.Identity) else self.dropout(x2)
        a, b = self.factors()
        if self.use_dora:
            y = self._dora_forward(x2, xd, a, b)
        else:
            y = LoRAFunction.apply(x2, xd, self.base.weight, self.base.bias, a, b, self.scaling)
        return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])

    def _dora_forward(self, x: torch.Tensor, xd: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """PEFT's ``W x + b + (g - 1) W xd + g s B A xd`` with ``g = m / ||W + s B A||`` (norm detached).
        Without dropout (or in eval, where dropout is the identity) that is ``g (W x + s B A x) + b``:
        the LoRA node plus one scaling of its output."""
        w, bias = self.base.weight, self.base.bias
        g = self.lora_magnitude / self.weight_norm((a, b))  # (out,)
        if xd is None or not self.training:
            z = LoRAFunction.apply(x, None, w, None, a, b, self.scaling)  # (N, out): W x + s B A x
            g = g.to(z.dtype)
            return z * g if bias is None else torch.addcmul(bias.to(z.dtype), z, g)
        y = F.linear(x, w, bias)  # (N, out)
        wxd = F.linear(xd, w)  # (N, out): the base's share of the dropped-out input
        lora = F.linear(F.linear(xd, a.to(xd.dtype)), b.to(xd.dtype)) * self.scaling  # (N, out)
        g = g.to(y.dtype)
        return y + (g - 1) * wxd.to(y.dtype) + g * lora.to(y.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight: same outputs, no LoRA cost at inference.
        DoRA: ``W <- g (W + s B A)``, the scale g kept so that ``unmerge`` can divide it out again.

        A base stored in low precision (bf16 training) would not get its exact values back by
        subtracting the update again, so its values are kept for :meth:`unmerge`.
        """
        if self.merged:
            return
        w = self.base.weight
        self._unmerged_weight = w.detach().clone() if w.dtype != torch.float32 else None
        if self.use_dora:
            self._merge_scale = (self.lora_magnitude / self.weight_norm())[:, None]  # (out, 1)
            w.copy_(((w.float() + self.delta_weight()) * self._merge_scale).to(w.dtype))
        else:
            w += self.delta_weight().to(w.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update back out of the base weight, so training can continue."""
        if not self.merged:
            return
        w = self.base.weight
        if self._unmerged_weight is not None:
            w.copy_(self._unmerged_weight)
        elif self.use_dora:
            w.copy_(w / self._merge_scale - self.delta_weight())
        else:
            w -= self.delta_weight()
        self._unmerged_weight = self._merge_scale = None
        self.merged = False

    def extra_repr(self) -> str:
        extra = (", dora=True" if self.use_dora else "") + (", init=pissa" if self.use_pissa else "")
        return f"rank={self.rank}, scaling={self.scaling:g}{extra}, merged={self.merged}"


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


def inject_lora(model: nn.Module, cfg: LoRAConfig, initialise: bool = True) -> list[str]:
    """Replace every targeted ``nn.Linear`` by a ``LoRALinear``; returns the replaced module names.
    ``initialise=False``: the LoRA values will be loaded, so skip what only a fresh start needs."""
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
        setattr(parent, child, LoRALinear(getattr(parent, child), cfg, initialise))
    return names


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def freeze_for_lora(model: nn.Module, trainable: tuple[nn.Module, ...] = ()) -> None:
    """Freeze everything, then unfreeze LoRA A/B and the given modules (the head): by type, not by name."""
    model.requires_grad_(False)
    for m in lora_layers(model).values():
        m.lora_A.requires_grad_(True)
        m.lora_B.requires_grad_(True)
        if m.use_dora:
            m.lora_magnitude.requires_grad_(True)
    for m in trainable:
        m.requires_grad_(True)


def store_frozen_linears(model: nn.Module, dtype: torch.dtype) -> None:
    """Keep every frozen linear's weight and bias in ``dtype`` (the autocast dtype): cast once, not every step."""
    for m in model.modules():
        if isinstance(m, nn.Linear) and not any(p.requires_grad for p in m.parameters()):
            m.to(dtype)


def merge_lora(model: nn.Module) -> None:
    """Fold every LoRA update into its base weight (:meth:`LoRALinear.merge`), to predict at the base's cost."""
    for m in lora_layers(model).values():
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Take every LoRA update back out of its base weight (:meth:`LoRALinear.unmerge`), to train on."""
    for m in lora_layers(model).values():
        m.unmerge()


@contextlib.contextmanager
def lora_merged(model: nn.Module):
    """LoRA folded into the base inside the block (inference at the base's cost); unmerged again after."""
    layers = [m for m in lora_layers(model).values() if not m.merged]
    for m in layers:
        m.merge()
    try:
        yield model
    finally:
        for m in layers:
            m.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by its base layer with the update folded in: a plain model for deployment."""
    for name, m in lora_layers(model).items():
        m.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, m.base)
    return model
