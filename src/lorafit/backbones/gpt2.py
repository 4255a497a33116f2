"""GPT-2 with the module names of *Build a Large Language Model (From Scratch)*.

Names follow the book's ``GPTModel`` (tok_emb, trf_blocks[i].att.W_query, ff.layers[0], norm1.scale,
out_head, ...) so that the book's saved state dicts load as they are; the arithmetic is GPT-2's
(tanh-approximated GELU, pre-norm blocks, learned positions), so OpenAI's weights give OpenAI's logits.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LorafitError
from ..files import from_known_fields
from .int8 import stacked_output
from .packing import Packing, attention


@dataclass
class GPTConfig:
    """Shape of a GPT-2 model; the four presets are OpenAI's released sizes."""

    vocab_size: int = 50257  # BPE tokens, <|endoftext|> included
    context_length: int = 1024  # learned positions
    emb_dim: int = 768  # width of the residual stream
    n_heads: int = 12  # attention heads (emb_dim must divide evenly)
    n_layers: int = 12  # transformer blocks
    drop_rate: float = 0.0  # dropout after embeddings, attention and feed-forward
    qkv_bias: bool = True  # OpenAI's checkpoints have biases on the query/key/value projections
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        problems = [f"{f.name} must be positive" for f in fields(self)
                    if f.type in ("int", int) and getattr(self, f.name) <= 0]
        if self.emb_dim % max(self.n_heads, 1):
            problems.append(f"emb_dim {self.emb_dim} is not divisible by n_heads {self.n_heads}")
        if not 0.0 <= self.drop_rate < 1.0:
            problems.append(f"drop_rate must be in [0, 1), got {self.drop_rate}")
        if problems:
            raise LorafitError("invalid GPT config: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        return from_known_fields(cls, d)


PRESETS: dict[str, GPTConfig] = {
    "gpt2-small": GPTConfig(emb_dim=768, n_layers=12, n_heads=12),
    "gpt2-medium": GPTConfig(emb_dim=1024, n_layers=24, n_heads=16),
    "gpt2-large": GPTConfig(emb_dim=1280, n_layers=36, n_heads=20),
    "gpt2-xl": GPTConfig(emb_dim=1600, n_layers=48, n_heads=25),
}


GELU_2C = 2 * math.sqrt(2 / math.pi)


class LayerNorm(nn.Module):
    """LayerNorm with the book's parameter names (scale, shift) so its state dicts load unchanged."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))
        self.shift = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.scale.shape, self.scale, self.shift, self.eps)


class GELU(nn.Module):
    """GPT-2's GELU: the tanh approximation ("gelu_new"), not the exact erf form.

    Outside autograd it is computed as ``x * sigmoid(2u)``, ``u = sqrt(2/pi) (x + 0.044715 x^3)``: the same
    function (``0.5 (1 + tanh u) = sigmoid(2u)``), within 5e-7 of torch's, in 0.62x its time on a Zen 5 at
    640 x 3072 (torch's CPU tanh is slow; the feed-forward's GELU was 16 % of int8 inference). Int8 inference
    computes it inside the linear's kernel instead (``onednn_post_op``, see backbones.int8.Int8Activated).
    """

    onednn_post_op = ("gelu", "tanh")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return F.gelu(x, approximate="tanh")
        u = x * x  # (N, 4D)
        u.mul_(0.044715 * GELU_2C).add_(GELU_2C).mul_(x)  # 2 sqrt(2/pi) (x + 0.044715 x^3)
        return u.sigmoid_().mul_(x)


class FeedForward(nn.Module):
    """Linear -> GELU -> Linear, 4x wide.

    During training the GELU output (N, 4D), which the second linear's backward needs (for its LoRA
    A gradient), is not kept: it is recomputed from the GELU input, which is kept anyway. That is the
    largest activation of the block, and recomputing it costs one elementwise pass; the values are the
    same bits, so results do not change.
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim), GELU(), nn.Linear(4 * cfg.emb_dim, cfg.emb_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fc, act, proj = self.layers
        h = fc(x)  # (N, 4D)
        g = act(h)  # (N, 4D)
        if not torch.is_grad_enabled() or not h.requires_grad:
            return proj(g)  # (N, D)

        def pack(t: torch.Tensor):
            if t.data_ptr() == g.data_ptr() and t.numel() == g.numel() and t.dtype == g.dtype:
                return (t.shape, t.stride(), t.storage_offset())  # a view of g: rebuilt from h on demand
            return t

        def unpack(packed):
            if isinstance(packed, torch.Tensor):
                return packed
            shape, stride, offset = packed
            return act(h).as_strided(shape, stride, offset)

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            return proj(g)  # (N, D)


class MultiHeadAttention(nn.Module):
    """Causal self-attention through ``scaled_dot_product_attention``.

    Right-padded batches need no mask here: with a causal mask a real token only sees earlier
    positions, which are real too, so padding (zeros, see :class:`Packing`) never changes a real
    token's output.
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        d = cfg.emb_dim
        self.n_heads = cfg.n_heads
        self.head_dim = d // cfg.n_heads
        self.drop_rate = cfg.drop_rate
        self.W_query = nn.Linear(d, d, bias=cfg.qkv_bias)
        self.W_key = nn.Linear(d, d, bias=cfg.qkv_bias)
        self.W_value = nn.Linear(d, d, bias=cfg.qkv_bias)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, packing: Packing, at: torch.Tensor | None = None) -> torch.Tensor:
        """(N, D) tokens -> (N, D); with ``at`` (B,) stack rows, only those rows' queries -> (B, D)."""
        dropout = self.drop_rate if self.training else 0.0
        qkv = stacked_output((self.W_query, self.W_key, self.W_value), x)  # (N, 3D) as int8's one product, else None
        if qkv is not None:
            q, k, v = packing.heads(qkv, 3 * self.n_heads).split(self.n_heads, dim=1)  # (B, H, T, hd) each
        else:
            k = packing.heads(self.W_key(x), self.n_heads)  # (B, H, T, hd)
            v = packing.heads(self.W_value(x), self.n_heads)  # (B, H, T, hd)
        if at is not None:
            b = at.shape[0]
            q = self.W_query(x.index_select(0, at)) if qkv is None else qkv[at, :self.n_heads * self.head_dim]
            y = attention(q.view(b, self.n_heads, 1, self.head_dim), k, v,  # (B, H, 1, hd)
                          attn_mask=packing.visible(packing.positions[at]), dropout_p=dropout)
            return self.out_proj(y.reshape(b, -1))  # (B, D)
        if qkv is None:
            q = packing.heads(self.W_query(x), self.n_heads)  # (B, H, T, hd)
        y = attention(q, k, v, is_causal=True, dropout_p=dropout)  # (B, H, T, hd)
        return self.out_proj(packing.tokens(y))  # (N, D)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.att = MultiHeadAttention(cfg)
        self.ff = FeedForward(cfg)
        self.norm1 = LayerNorm(cfg.emb_dim, cfg.layer_norm_eps)
        self.norm2 = LayerNorm(cfg.emb_dim, cfg.layer_norm_eps)
        self.drop_shortcut = nn.Dropout(cfg.drop_rate)

    def forward(self, x: torch.Tensor, packing: Packing, at: torch.Tensor | None = None) -> torch.Tensor:
        """(N, D) tokens -> (N, D); with ``at`` (B,) stack rows, only those rows -> (B, D)."""
        attended = self.drop_shortcut(self.att(self.norm1(x), packing, at))  # (N, D) or (B, D)
        if at is not None:
            x = x.index_select(0, at)  # (B, D)
        x = x + attended
        return x + self.drop_shortcut(self.ff(self.norm2(x)))  # (N, D) or (B, D)


class GPTModel(nn.Module):
    """GPT-2: token + position embeddings, ``n_layers`` pre-norm blocks, final norm, untied out_head."""

    can_pool_last_block = True  # hidden_states(..., at=) runs the last block at the pooled rows only

    def __init__(self, cfg: GPTConfig, lm_head: bool = True):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg.n_layers)])
        self.final_norm = LayerNorm(cfg.emb_dim, cfg.layer_norm_eps)
        # a classifier backbone has none: the classification head takes its place
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False) if lm_head else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2's initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layers)."""
        std = 0.02
        for name, p in self.named_parameters():
            if name.endswith((".scale",)):
                nn.init.ones_(p)
            elif name.endswith((".shift", ".bias")):
                nn.init.zeros_(p)
            elif name.endswith(("out_proj.weight", "ff.layers.2.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.cfg.n_layers))
            else:
                nn.init.normal_(p, 0.0, std)

    def hidden_states(self, in_idx: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      at: torch.Tensor | None = None) -> torch.Tensor:
        """Final-normed hidden states (B, T, D): what both the LM head and a classifier read.

        Batches are right-padded (``attention_mask`` 1 on real tokens, or None for no padding); the
        blocks run on the real tokens only (see :mod:`lorafit.backbones.packing`), and attention is causal, so
        padding changes nothing a real token computes. With ``at`` (B,), only the state at position
        ``at[b]`` of each row is returned (B, D), and the last block runs its feed-forward and output
        projection for those rows alone: a classifier reading one position per sequence skips most
        of the last block's work.
        """
        b, t = in_idx.shape
        if t > self.cfg.context_length:
            raise LorafitError(f"sequence of {t} tokens exceeds the context length {self.cfg.context_length}")
        packing = Packing(b, t, attention_mask, in_idx.device)
        x = self.drop_emb(self.tok_emb(packing.pack(in_idx)) + self.pos_emb(packing.positions))  # (N, D)
        rows = None if at is None else packing.rows(at)
        for i, block in enumerate(self.trf_blocks):
            x = block(x, packing, rows if i == len(self.trf_blocks) - 1 else None)  # (N, D); last: (B, D) with at
        x = self.final_norm(x)
        return x if at is not None else packing.unpack(x)  # (B, D) or (B, T, D)

    def forward(self, in_idx: torch.Tensor) -> torch.Tensor:
        if self.out_head is None:
            raise LorafitError("this GPTModel is a classifier backbone: its out_head was replaced")
        return self.out_head(self.hidden_states(in_idx))  # (B, T, vocab)
