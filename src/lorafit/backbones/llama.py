"""A Llama-architecture decoder (Llama 2/3 style, SmolLM2) that runs faster than transformers' on a CPU.

Same module and parameter names as transformers' ``LlamaModel`` (embed_tokens, layers[i].self_attn.q_proj,
mlp.gate_proj, input_layernorm, norm, ...), so its state dict copies over unchanged and LoRA targets keep
their usual names. What makes it faster for classification: RMSNorm and RoPE with hand-written backwards,
grouped-query attention without copying K/V, no attention mask (right-padded batches and causal
attention), padding skipped outside attention, and the last layer run only at the pooled token. Used by
``hf:`` backbones whose config it covers exactly (see :func:`supports`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .int8 import stacked_output
from .packing import Packing, attention


def supports(config) -> bool:
    """Only configs this module reproduces exactly: plain RoPE, no biases, SiLU, one attention kind."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return (config.model_type == "llama" and rope.get("rope_type", rope.get("type", "default")) == "default"
            and not getattr(config, "attention_bias", False) and not getattr(config, "mlp_bias", False)
            and getattr(config, "hidden_act", "silu") == "silu" and getattr(config, "pretraining_tp", 1) == 1
            and (getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
            * config.num_attention_heads == config.hidden_size)


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


class RMSNormFunction(torch.autograd.Function):
    """``x / rms(x) * weight`` with its backward written out.

    On a CPU, torch composes rms_norm from six elementwise passes and its backward from about eight;
    written out it is three and four, and the frozen weight's gradient is only formed when asked for.
    """

    @staticmethod
    def forward(ctx, x, weight, eps):
        d = x.shape[-1]
        rstd = torch.rsqrt(torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(d).add_(eps))  # (..., 1)
        ctx.save_for_backward(x, weight, rstd)
        return (x * rstd).mul_(weight)

    @staticmethod
    def backward(ctx, g):
        x, weight, rstd = ctx.saved_tensors
        gn = g * weight  # gradient at the normalised x
        # d/dx of x * rstd: rstd * gn - x * rstd^3 * <gn, x> / d
        coef = torch.linalg.vecdot(gn, x, dim=-1).unsqueeze(-1).mul_(rstd.pow(3) / x.shape[-1])
        gx = gn.mul_(rstd).addcmul_(x, coef, value=-1)
        gw = (g * x * rstd).reshape(-1, x.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        return gx, gw, None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return RMSNormFunction.apply(x, self.weight, self.eps)


class RoPEFunction(torch.autograd.Function):
    """RoPE in the rotate-half convention that Hugging Face's Llama checkpoints use:
    ``x * cos + cat(-x2, x1) * sin`` for x = (x1, x2), written as one pass plus two half passes each
    way (autograd makes five and six of the formula) and keeping only cos and sin for the backward."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        h = x.shape[-1] // 2
        out = x * cos
        out[..., :h].addcmul_(x[..., h:], sin[..., :h], value=-1)
        out[..., h:].addcmul_(x[..., :h], sin[..., h:])
        ctx.save_for_backward(cos, sin)
        return out

    @staticmethod
    def backward(ctx, g):
        cos, sin = ctx.saved_tensors
        h = g.shape[-1] // 2
        gx = g * cos  # the transpose of the rotation: (g1, g2) -> (g2 * sin2, -g1 * sin1)
        gx[..., :h].addcmul_(g[..., h:], sin[..., h:])
        gx[..., h:].addcmul_(g[..., :h], sin[..., :h], value=-1)
        return gx, None, None


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE for x (..., hd) at positions whose cos and sin (broadcastable to x) are given."""
    return RoPEFunction.apply(x, cos, sin)


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads or self.n_heads
        self.head_dim = config.hidden_size // self.n_heads
        d = config.hidden_size
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)

    def _rotated(self, proj: nn.Linear, x: torch.Tensor, n: int, cos, sin) -> torch.Tensor:
        """(N, D) -> (N, n * hd), each head rotated by its token's position."""
        y = proj(x)
        return rotate(y.view(y.shape[0], n, self.head_dim), cos[:, None], sin[:, None]).flatten(1)

    def forward(self, x, packing: Packing, cos, sin, at: torch.Tensor | None = None) -> torch.Tensor:
        """(N, D) tokens -> (N, D); with ``at`` (B,) stack rows, only those rows' queries -> (B, D)."""
        qkv = stacked_output((self.q_proj, self.k_proj, self.v_proj), x)  # int8's one product, else None
        if qkv is not None:
            q, k, v = self._heads_of_stacked(qkv, packing, cos, sin)
        else:
            k = packing.heads(self._rotated(self.k_proj, x, self.n_kv, cos, sin), self.n_kv)  # (B, KV, T, hd)
            v = packing.heads(self.v_proj(x), self.n_kv)  # (B, KV, T, hd)
        if at is None:
            if qkv is None:
                q = packing.heads(self._rotated(self.q_proj, x, self.n_heads, cos, sin), self.n_heads)  # (B, H, T, hd)
            y = attention(q, k, v, is_causal=True, enable_gqa=True)  # (B, H, T, hd)
            return self.o_proj(packing.tokens(y))  # (N, D)
        b = at.shape[0]
        if qkv is None:
            q = self._rotated(self.q_proj, x.index_select(0, at), self.n_heads, cos[at], sin[at])  # (B, H * hd)
        else:
            q = qkv[at, :self.n_heads * self.head_dim]  # (B, H * hd), rotated in place above
        y = attention(q.view(b, self.n_heads, 1, -1), k, v, attn_mask=packing.visible(packing.positions[at]),
                      enable_gqa=True)  # (B, H, 1, hd)
        return self.o_proj(y.reshape(b, -1))  # (B, D)

    def _heads_of_stacked(self, qkv: torch.Tensor, packing: Packing, cos, sin) -> tuple[torch.Tensor, ...]:
        """(N, (H + 2 KV) hd) stacked Q, K, V -> their heads, Q and K rotated (in ``qkv``, in place), unpacked once."""
        heads = qkv.view(qkv.shape[0], -1, self.head_dim)  # (N, H + 2 KV, hd)
        rotating = heads[:, :self.n_heads + self.n_kv]
        rotating.copy_(rotate(rotating, cos[:, None], sin[:, None]))
        return packing.heads(qkv, heads.shape[1]).split([self.n_heads, self.n_kv, self.n_kv], dim=1)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        d, h = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, h, bias=False)
        self.up_proj = nn.Linear(d, h, bias=False)
        self.down_proj = nn.Linear(h, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, packing: Packing, cos, sin, at: torch.Tensor | None = None) -> torch.Tensor:
        attended = self.self_attn(self.input_layernorm(x), packing, cos, sin, at)  # (N, D) or (B, D)
        if at is not None:
            x = x.index_select(0, at)  # (B, D)
        x = x + attended
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaDecoder(nn.Module):
    """``hidden_states(ids, mask, at=None)`` like lorafit's GPT-2: (B, T, D), or (B, D) at ``at``."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        head_dim = config.hidden_size // config.num_attention_heads
        inv_freq = 1.0 / (_rope_theta(config) ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = torch.outer(positions.to(torch.float32), self.inv_freq.to(positions.device))
        emb = torch.cat((freqs, freqs), dim=-1)  # (N, hd)
        return emb.cos(), emb.sin()

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      at: torch.Tensor | None = None) -> torch.Tensor:
        """Right-padded batches run on their real tokens only (see :mod:`lorafit.backbones.packing`)."""
        packing = Packing(*input_ids.shape, attention_mask, input_ids.device)
        cos, sin = self._rope(packing.positions)  # (N, hd) each
        x = self.embed_tokens(packing.pack(input_ids))  # (N, D)
        rows = None if at is None else packing.rows(at)
        for i, layer in enumerate(self.layers):
            x = layer(x, packing, cos, sin, rows if i == len(self.layers) - 1 else None)
        x = self.norm(x)
        return x if at is not None else packing.unpack(x)  # (B, D) or (B, T, D)
