"""Parameter accounting: what is trained and what stays frozen, as numbers and as a printed table."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .lora import LoRALinear


@dataclass
class ParamCounts:
    lora_A: int
    lora_B: int
    other_trainable: int  # the classification head, or anything else left trainable
    frozen: int
    magnitude: int = 0  # DoRA's magnitude vectors (one value per output row of each adapted layer)

    @property
    def trainable(self) -> int:
        return self.lora_A + self.lora_B + self.magnitude + self.other_trainable

    @property
    def total(self) -> int:
        return self.trainable + self.frozen

    @property
    def percent_trainable(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def to_dict(self) -> dict:
        return {"total": self.total, "trainable": self.trainable, "percent_trainable": round(self.percent_trainable, 4),
                "lora_A": self.lora_A, "lora_B": self.lora_B, "dora_magnitude": self.magnitude,
                "head_and_other_trainable": self.other_trainable, "frozen": self.frozen}


def count_parameters(model: nn.Module) -> ParamCounts:
    """Group every parameter once (shared ones count once, as in ``model.parameters()``)."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    lora_a = {id(m.lora_A) for m in layers}
    lora_b = {id(m.lora_B) for m in layers}
    magnitude = {id(m.lora_magnitude) for m in layers if m.use_dora}
    counts = ParamCounts(0, 0, 0, 0)
    for p in model.parameters():
        if id(p) in lora_a:
            counts.lora_A += p.numel()
        elif id(p) in lora_b:
            counts.lora_B += p.numel()
        elif id(p) in magnitude:
            counts.magnitude += p.numel()
        elif p.requires_grad:
            counts.other_trainable += p.numel()
        else:
            counts.frozen += p.numel()
    return counts


def format_counts(counts: ParamCounts, title: str = "Parameters") -> str:
    rows = [
        ("LoRA A", counts.lora_A, True),
        ("LoRA B", counts.lora_B, True),
        *([("DoRA magnitude", counts.magnitude, True)] if counts.magnitude else []),  # plain LoRA: no such row
        ("head / other trainable", counts.other_trainable, True),
        ("frozen base", counts.frozen, False),
    ]
    lines = [title, f"  {'group':<24}{'parameters':>15}{'trainable':>11}{'share':>9}"]
    for name, n, trainable in rows:
        share = 100.0 * n / counts.total if counts.total else 0.0
        lines.append(f"  {name:<24}{n:>15,}{'yes' if trainable else 'no':>11}{share:>8.2f}%")
    lines.append(f"  {'total':<24}{counts.total:>15,}")
    lines.append(f"  {'trainable':<24}{counts.trainable:>15,}{'':>11}{counts.percent_trainable:>8.2f}%")
    return "\n".join(lines)
