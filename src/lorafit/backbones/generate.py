"""Text generation: the quickest check that pretrained weights loaded right."""

from __future__ import annotations

import torch

from .gpt2 import GPTModel


@torch.inference_mode()
def generate(
    model: GPTModel,
    idx: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Extend ``idx`` (B, T) token by token; greedy when ``temperature`` is 0, else sampled.

    ``top_k`` keeps the k most likely tokens before sampling; generation stops early once every
    row has produced ``eos_id``. The context is cropped to the model's last ``context_length`` tokens.
    """
    model.eval()
    ctx = model.cfg.context_length
    done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    for _ in range(max_new_tokens):
        logits = model(idx[:, -ctx:])[:, -1, :]  # (B, vocab)
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]  # (B, 1)
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
        else:
            nxt = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
        if eos_id is not None:
            nxt = nxt.masked_fill(done[:, None], eos_id)
            done |= nxt[:, 0] == eos_id
        idx = torch.cat([idx, nxt], dim=1)
        if eos_id is not None and bool(done.all()):
            break
    return idx
