"""Running a right-padded batch without its padding.

Everything in a transformer block except attention works token by token, so the decoders here run
their linears, norms and activations on the real tokens only, stacked as (N, D), and give attention
the padded (B, H, T, hd) layout it needs. Even length-bucketed batches keep some padding; with packing
it costs nothing in the matmuls that dominate a step.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import torch
import torch.nn.functional as F


class Packing:
    """Where the N real tokens of a (B, T) batch sit in the (N, ...) stack the blocks run on.

    Built from the attention mask (1 on real tokens; right padding, as lorafit's batches are). Without
    padding the stack is just the batch flattened, and packing and unpacking are views.
    """

    def __init__(self, batch: int, length: int, attention_mask: torch.Tensor | None, device):
        self.b, self.t = batch, length
        positions = torch.arange(length, device=device)  # (T,)
        if attention_mask is None or bool(attention_mask.all()):
            self.keep = None
            self.positions = positions.repeat(batch)  # (N,) position of each token in its sequence
        else:
            real = attention_mask.flatten().bool()  # (B * T,)
            self.keep = real.nonzero().squeeze(1)  # (N,) flat indices of real tokens
            if ROW_MULTIPLE.get() > 1:
                self.keep = _rounded(self.keep, real, ROW_MULTIPLE.get())
            self.positions = positions.repeat(batch)[self.keep]  # (N,)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) -> (N, ...)."""
        flat = x.flatten(0, 1)
        # index_select, not flat[keep]: its backward is an index_add, not a much slower accumulating index_put
        return flat if self.keep is None else flat.index_select(0, self.keep)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(N, ...) -> (B, T, ...) with zeros at padded positions."""
        if self.keep is not None and torch.is_grad_enabled() and x.requires_grad:
            x = x.new_zeros(self.b * self.t, *x.shape[1:]).index_copy(0, self.keep, x)  # backward: an index_select
        elif self.keep is not None:  # a gather from the rows and one zero row: 0.4x index_copy's time (Zen 5)
            x = torch.cat([x, x.new_zeros(1, *x.shape[1:])]).index_select(0, self.gather)
        return x.view(self.b, self.t, *x.shape[1:])

    @functools.cached_property
    def gather(self) -> torch.Tensor:
        """(B * T,) the stack row of each batch position; N (one past the last row) at padded ones."""
        rows = torch.full((self.b * self.t,), len(self.keep), dtype=torch.long, device=self.keep.device)
        return rows.index_copy_(0, self.keep, torch.arange(len(self.keep), device=self.keep.device))

    def heads(self, x: torch.Tensor, n_heads: int) -> torch.Tensor:
        """(N, n_heads * hd) -> (B, n_heads, T, hd): the layout attention runs on (``x`` may hold Q, K and V side
        by side: their 3 x n_heads heads come out, to be split on dim 1)."""
        return self.unpack(x).view(self.b, self.t, n_heads, -1).transpose(1, 2)

    def tokens(self, y: torch.Tensor) -> torch.Tensor:
        """(B, H, T, hd) attention output -> (N, H * hd)."""
        return self.pack(y.transpose(1, 2).reshape(self.b, self.t, -1))

    def rows(self, at: torch.Tensor) -> torch.Tensor:
        """Stack rows of the tokens at position ``at[b]`` of each sequence b, (B,) -> (B,)."""
        starts = (self.positions == 0).nonzero().squeeze(1)  # (B,) each sequence's first row
        return starts + at

    def visible(self, at: torch.Tensor) -> torch.Tensor:
        """(B, 1, 1, T) attention mask for one query per sequence at position ``at[b]``: causal for it."""
        return (torch.arange(self.t, device=at.device)[None, :] <= at[:, None])[:, None, None, :]


# inference stacks take padded positions up to a multiple of this many rows (see rounded_rows); 1: none
ROW_MULTIPLE: contextvars.ContextVar[int] = contextvars.ContextVar("row_multiple", default=1)


@contextlib.contextmanager
def rounded_rows(multiple: int = 16):
    """Inside the block, stacks are rounded up to ``multiple`` rows with padded positions where the batch has
    them, so that a stream of batches meets few distinct shapes (see data.batching.padded_length). For
    predicting and evaluating; not for serving several adapters, whose rows map to adapters by count."""
    token = ROW_MULTIPLE.set(multiple)
    try:
        yield
    finally:
        ROW_MULTIPLE.reset(token)


def _rounded(keep: torch.Tensor, real: torch.Tensor, multiple: int) -> torch.Tensor:
    """``keep`` and the first padded positions, up to a multiple of ``multiple`` rows where the batch has that
    many. A padded position sits after its sequence's real tokens: under causal attention no real token sees
    it, and nothing reads its output."""
    extra = -len(keep) % multiple
    if not extra:
        return keep
    pads = (~real).nonzero().squeeze(1)[:extra]
    return torch.cat([keep, pads]).sort().values


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """``scaled_dot_product_attention``; in a bf16 training step on a CPU it runs in fp32.

    torch's CPU bf16 attention kernels are several times slower than fp32's in the backward pass at
    short lengths (README, "Measured results"), and attention holds no weights:
    casting q, k, v up costs little. Inference keeps bf16, whose forward is not slower.
    """
    if q.dtype == torch.bfloat16 and q.device.type == "cpu" and torch.is_grad_enabled():
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kwargs)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)
