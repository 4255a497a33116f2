"""A sequence classifier: a backbone's hidden state at one pooled position, through a linear head."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import LorafitError

POOLINGS = ("last", "first", "mean")


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, how: str) -> torch.Tensor:
    """(B, T, D) -> (B, D). ``last`` reads the last real token of each right-padded row, so a
    prediction never depends on how much padding its batch has (``logits[:, -1]`` would read a pad)."""
    if how == "last":
        last = attention_mask.sum(dim=1) - 1  # (B,)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, D)
    if how == "first":
        return hidden[:, 0]  # (B, D)
    if how == "mean":
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)  # (B, D)
    raise LorafitError(f"pooling must be one of {', '.join(POOLINGS)}, got {how!r}")


def probabilities(logits: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """(..., C) logits -> per-class probabilities: a softmax over the classes, or for a multi-label classifier
    each label's own sigmoid (any number of labels may be true)."""
    return torch.sigmoid(logits) if multi_label else torch.softmax(logits, dim=-1)


class Classifier(nn.Module):
    """``head(pool(backbone.hidden_states(ids)))``: the head runs only at the pooled position."""

    def __init__(self, backbone: nn.Module, hidden_size: int, num_classes: int, pooling: str = "last",
                 head_bias: bool = True, multi_label: bool = False):
        super().__init__()
        if num_classes < 2:
            raise LorafitError(f"a classifier needs at least 2 classes, got {num_classes}")
        if pooling not in POOLINGS:
            raise LorafitError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        if getattr(backbone, "out_head", None) is not None:
            raise LorafitError("the backbone still has its LM head: load it without one (lm_head=False) "
                               "or set backbone.out_head = None; the classification head takes its place")
        self.backbone = backbone
        # transformers' decoder classifiers (GPT-2, Llama: ``score``) have no bias; without one an adapter
        # exports exactly to any of them
        self.head = nn.Linear(hidden_size, num_classes, bias=head_bias)
        self.pooling = pooling
        self.multi_label = multi_label  # one sigmoid per class (any number true), not a softmax over them

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    @torch.no_grad()
    def divide_logits(self, temperature: float) -> None:
        """Every logit divided by ``temperature`` from now on, exactly and at no cost per call: the head's
        weight and bias are divided instead (temperature scaling folded into the model)."""
        if temperature != 1.0:
            self.head.weight.div_(temperature)
            if self.head.bias is not None:
                self.head.bias.div_(temperature)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, C) logits -> this classifier's probabilities (see :func:`probabilities`)."""
        return probabilities(logits, self.multi_label)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "last" and getattr(self.backbone, "can_pool_last_block", False):
            last = attention_mask.sum(dim=1) - 1  # (B,)
            pooled = self.backbone.hidden_states(input_ids, attention_mask, at=last)  # (B, D), last block at `last` only
        else:
            hidden = self.backbone.hidden_states(input_ids, attention_mask)  # (B, T, D)
            pooled = pool(hidden, attention_mask, self.pooling)  # (B, D)
        return self.head(pooled).float()  # (B, C)
