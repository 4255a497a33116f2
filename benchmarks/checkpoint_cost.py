"""The cost of one checkpoint: lorafit's save_checkpoint vs nanoGPT's torch.save of the same state, side by side.

Same state for both: GPT-2 small architecture (random weights), LoRA rank 8 alpha 16 on every linear of the
blocks plus a 2-class head, AdamW after a few steps (moments filled), the RNG state, and the history of a
3-epoch run on the balanced SMS split (131 steps per epoch, an evaluation every 50). lorafit writes one
safetensors file under a temporary name, fsyncs it, renames it and fsyncs the folder; nanoGPT's train.py
does ``torch.save(checkpoint, 'ckpt.pt')`` in place (no fsync, not atomic: a kill mid-write corrupts it).

    python benchmarks/checkpoint_cost.py --tokenizer ../shared/models/gpt2 --out /tmp/ckpt-bench
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lorafit import BackboneSpec, ClassifierSpec, LoRAConfig, TrainConfig, build_classifier
from lorafit.adapters.storage import adapter_state
from lorafit.data.datasets import DataConfig
from lorafit.runtime import cpu_name
from lorafit.training.checkpoint import CHECKPOINT, RunPlan, load_checkpoint, save_checkpoint
from lorafit.training.loop import History, TrainState, make_optimizer, rng_state


def trained_state(args):
    spec = ClassifierSpec(backbone=BackboneSpec("gpt2-small", random_init=True, tokenizer=args.tokenizer),
                          lora=LoRAConfig(rank=8, alpha=16), labels=["ham", "spam"])
    model, _, spec = build_classifier(spec)
    cfg = TrainConfig(epochs=3)
    opt = make_optimizer(model, cfg, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):  # a few real AdamW steps, so that the moments hold values
        ids = torch.randint(0, 50257, (8, 32), generator=gen)
        loss = F.cross_entropy(model(ids, torch.ones_like(ids)), torch.randint(0, 2, (8,), generator=gen))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    steps = 3 * 131
    history = History(train=[{"event": "train", "step": s, "epoch": s / 131, "examples_seen": 8 * s, "loss": 0.5,
                              "lr": 5e-4} for s in range(1, steps + 1)],
                      val=[{"event": "eval", "step": s, "epoch": s / 131, "examples_seen": 8 * s, "val_loss": 0.5,
                            "val_accuracy": 0.9, "val_examples": 40} for s in range(50, steps + 1, 50)])
    state = TrainState(epoch=2, batch=60, step=steps - 71, best_accuracy=0.9, history=history,
                       optimizer=opt.state_dict(), rng=rng_state(torch.device("cpu")))
    return model, spec, cfg, state


def timed(fn, repeats: int) -> float:
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - t0)
    return statistics.median(seconds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", required=True, help="folder with GPT-2's encoder.json + vocab.bpe")
    p.add_argument("--out", help="folder to write into, on the disk to measure (default: a temporary folder)")
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    model, spec, cfg, state = trained_state(args)
    out = Path(args.out or tempfile.mkdtemp(prefix="lorafit-ckpt-bench-"))
    out.mkdir(parents=True, exist_ok=True)

    def lorafit_save():
        save_checkpoint(out, model, RunPlan(spec, DataConfig(), cfg), state)

    def nanogpt_save():  # nanoGPT train.py: checkpoint = {'model': ..., 'optimizer': ..., ...}; torch.save(...)
        torch.save({"model": adapter_state(model), "optimizer": state.optimizer, "rng": state.rng,
                    "iter_num": state.step, "history": state.history.to_dict()}, out / "ckpt.pt")

    rows = [("lorafit save_checkpoint (atomic, fsynced)", timed(lorafit_save, args.repeats), out / CHECKPOINT),
            ("nanoGPT-style torch.save (in place)", timed(nanogpt_save, args.repeats), out / "ckpt.pt")]
    load = timed(lambda: load_checkpoint(out), args.repeats)
    print(f"CPU: {cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads; folder {out}; median of {args.repeats}")
    for name, seconds, path in rows:
        print(f"{name:<44} {1000 * seconds:7.1f} ms  {path.stat().st_size / 1e6:5.1f} MB")
    print(f"{'lorafit load_checkpoint':<44} {1000 * load:7.1f} ms")
    print(f"ratio lorafit / nanoGPT save: {rows[0][1] / rows[1][1]:.2f}")


if __name__ == "__main__":
    main()
