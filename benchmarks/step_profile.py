"""Where a lorafit training step's time goes: torch.profiler over the first batches of the speed benchmark.

The same work as ``train_speed.py``'s lorafit system (GPT-2 small architecture, random weights, LoRA rank 8
on every block linear + a 2-class head, batch 8, the balanced SMS split's training messages in lorafit's
length-bucketed order), the first ``--batches`` batches under ``torch.profiler``. Prints the operators by
self time, then how far the step is from the matmul limit: the share of time in matrix products and the
rate they ran at against this CPU's 2048-cubed matmul.

    python benchmarks/step_profile.py --data ../shared/data/sms_spam_collection/SMSSpamCollection \\
        --tokenizer ../shared/models/gpt2 --precision auto --batches 40
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_speed import FLOPS_PER_TOKEN, cpu_name, load_data, matmul_peak  # noqa: E402

MATMULS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::linear")


def profile(args) -> tuple[object, object, torch.dtype | None]:
    from lorafit import BackboneSpec, ClassifierSpec, LoRAConfig, TrainConfig, build_classifier, fit
    from lorafit.adapters.lora import store_frozen_linears
    from lorafit.data.batching import Encoded
    from lorafit.runtime import resolve_compute

    train, ytrain, _, _, pad = load_data(args)
    spec = ClassifierSpec(backbone=BackboneSpec("gpt2-small", random_init=True, tokenizer=args.tokenizer),
                          lora=LoRAConfig(rank=8, alpha=16))
    model, _, spec = build_classifier(spec)
    compute = resolve_compute("cpu", args.precision)
    if compute.autocast_dtype is not None:
        store_frozen_linears(model, compute.autocast_dtype)
    empty = Encoded([], np.zeros(0, dtype=np.int64), 0)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        history = fit(model, Encoded(train, ytrain, 0), empty, TrainConfig(epochs=1, batch_size=args.batch_size,
                      eval_every=0), pad_id=pad, labels=["ham", "spam"], compute=compute,
                      progress=False)
    return prof, history, compute.autocast_dtype


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="the SMSSpamCollection file")
    p.add_argument("--tokenizer", help="folder with GPT-2's encoder.json + vocab.bpe (else tiktoken's download)")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    p.add_argument("--batches", type=int, default=40, help="batches profiled")
    p.add_argument("--rows", type=int, default=20, help="operators listed")
    args = p.parse_args()
    args.limit_batches, args.batch_size = args.batches, 8
    prof, history, dtype = profile(args)
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMULS) / 1e6
    peak = matmul_peak(torch.bfloat16 if dtype else torch.float32)
    rate = FLOPS_PER_TOKEN * history.train_tokens / matmul / 1e9
    print(f"CPU: {cpu_name()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}; precision {'bf16 autocast' if dtype else 'fp32'}; {args.batches} batches, "
          f"{history.train_tokens:,} real tokens, {history.train_seconds:.1f} s under the profiler")
    print(f"matrix products: {100 * matmul / total:.0f} % of the profiled CPU time, at {rate:.0f} GFLOP/s "
          f"against a 2048-cubed matmul's {peak:.0f} GFLOP/s ({100 * rate / peak:.0f} %); everything else: "
          f"{total - matmul:.1f} of {total:.1f} s")


if __name__ == "__main__":
    main()
