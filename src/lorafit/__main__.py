"""``python -m lorafit``: the CLI (what ``torchrun -m lorafit`` starts in every process)."""

from .cli import entry

entry()
