"""A saved tiny run for the server tests: a tiny HF-layout GPT-2 with a LoRA adapter whose B matrices and
head are random, so that the adapter and the merge both change every prediction."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path

import torch

from conftest import write_hf_gpt2
from lorafit.adapters.lora import LoRAConfig, lora_layers
from lorafit.adapters.build import build_classifier
from lorafit.adapters.storage import ClassifierSpec, save_adapter
from lorafit.backbones.base import BackboneSpec

TEXTS = ["WIN cash prize now!!! call 09061701461", "see you at lunch later", "ok", "FREE entry txt WIN to claim",
         "are we still on for dinner tonight, or on friday?", "hello hello"]


def write_tiny_base(root: Path, seed: int = 1) -> Path:
    return write_hf_gpt2(root / "base", seed)


def write_adapter(base: Path, run: Path, labels: list[str], lora: LoRAConfig, seed: int = 3) -> Path:
    """A run on ``base`` whose LoRA B matrices (DoRA magnitudes) and head are random: every prediction moves."""
    model, _, spec = build_classifier(ClassifierSpec(BackboneSpec(model=str(base)), lora, labels=labels))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(0.1 * torch.randn(layer.lora_B.shape, generator=g))
            if layer.use_dora:
                layer.lora_magnitude.mul_(1 + 0.2 * torch.rand(layer.lora_magnitude.shape, generator=g))
        model.head.weight.copy_(0.5 * torch.randn(model.head.weight.shape, generator=g))
    save_adapter(run, model, spec)
    return run


def write_tiny_run(root: Path) -> Path:
    return write_adapter(write_tiny_base(root), root / "run", ["ham", "spam", "unsure"], LoRAConfig(rank=4))


def start_server(run: Path | str, *flags: str, timeout: float = 60.0):
    """`python -m lorafit serve --run RUN FLAGS` on a free loopback port: (process, base URL) once it prints its URL."""
    import queue
    import re
    import subprocess
    import sys
    import threading

    proc = subprocess.Popen([sys.executable, "-m", "lorafit", "serve", "--run", str(run), "--host", "127.0.0.1",
                             "--port", "0", "--device", "cpu", "--precision", "fp32", *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
    try:
        line = lines.get(timeout=timeout)
    except queue.Empty:
        proc.kill()
        raise AssertionError(f"lorafit serve printed no URL within {timeout} s") from None
    found = re.search(r"http://127\.0\.0\.1:\d+", line)
    if not found:
        proc.kill()
        raise AssertionError(f"lorafit serve said {line!r}; stderr: {proc.stderr.read()}")
    return proc, found.group(0)


@contextmanager
def held_batches(batcher):
    """Every batch the server's batcher runs waits at a gate: yields (gate, entered), ``entered`` set once a
    batch reached the gate, ``gate.set()`` lets them through; the batcher is restored on exit."""
    gate, entered = threading.Event(), threading.Event()
    run = batcher.run_batch

    def held(ids, adapters):
        entered.set()
        gate.wait(10)
        return run(ids, adapters)

    batcher.run_batch = held
    try:
        yield gate, entered
    finally:
        gate.set()
        batcher.run_batch = run
