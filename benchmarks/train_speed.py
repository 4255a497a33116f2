"""Training and evaluation speed: lorafit vs transformers + PEFT vs the book's fixed padding, side by side.

Same work for every system: GPT-2 small architecture with random weights (timing only), LoRA rank 8
alpha 16 on every linear of the blocks plus a 2-class head, batch 8, one epoch over the balanced SMS
split's training messages (seed 42), AdamW lr 5e-4; then evaluation of the 300 test messages. Each
system runs in its own process so that peak RSS is its own. The ``-dora`` systems are the same with
DoRA (lorafit ``use_dora=True``, PEFT ``LoraConfig(use_dora=True)``): DoRA's cost over plain LoRA. Needs the bench extra:
``pip install -e '.[bench]'``.

    python benchmarks/train_speed.py --data ../shared/data/sms_spam_collection/SMSSpamCollection \\
        --tokenizer ../shared/models/gpt2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

from lorafit.runtime import cpu_name, peak_memory_mb

SYSTEMS = ("lorafit", "lorafit-fp32", "lorafit-bf16", "peft", "peft-bf16", "book", "lorafit-dora", "lorafit-dora-fp32",
           "peft-dora")
FLOPS_PER_TOKEN = 4 * 85e6  # forward 2x + backward (input gradients only: the base is frozen) 2x, 85 M matmul weights


def peak_memory(device: str) -> dict:
    return peak_memory_mb(torch.device(device))


def load_data(args):
    from lorafit import DataConfig, load_splits, load_tokenizer

    splits = load_splits(DataConfig(args.data), seed=42)
    enc = load_tokenizer(args.tokenizer)
    train = enc.encode_ordinary_batch(splits.train.text.tolist())
    test = enc.encode_ordinary_batch(splits.test.text.tolist())
    ytrain = splits.encode_labels(splits.train, "train")
    ytest = splits.encode_labels(splits.test, "test")
    args.longest = max(len(s) for s in train)  # the book pads to the longest message of the whole training set
    if args.limit_batches:
        n = args.limit_batches * args.batch_size
        train, ytrain = train[:n], ytrain[:n]
    return train, ytrain, test, ytest, enc.eot_token


def run_lorafit(args, precision: str, dora: bool = False) -> dict:
    from lorafit import BackboneSpec, ClassifierSpec, LoRAConfig, TrainConfig, build_classifier, fit
    from lorafit.adapters.lora import store_frozen_linears
    from lorafit.data.batching import Encoded
    from lorafit.inference.evaluate import evaluate_model
    from lorafit.runtime import resolve_compute

    train, ytrain, test, ytest, pad = load_data(args)
    spec = ClassifierSpec(backbone=BackboneSpec("gpt2-small", random_init=True, tokenizer=args.tokenizer),
                          lora=LoRAConfig(rank=8, alpha=16, use_dora=dora))
    model, backbone, spec = build_classifier(spec)
    compute = resolve_compute(args.device, precision, backbone.hidden_size)
    if compute.autocast_dtype is not None:
        store_frozen_linears(model, compute.autocast_dtype)  # as lorafit train does
    tr = Encoded(train, ytrain, 0)
    empty = Encoded([], np.zeros(0, dtype=np.int64), 0)
    history = fit(model, tr, empty, TrainConfig(epochs=1, batch_size=args.batch_size, eval_every=0),
                  pad_id=pad, labels=["ham", "spam"], compute=compute, progress=False)
    metrics, eval_rate = evaluate_model(model, pad, {"test": Encoded(test, ytest, 0)}, ["ham", "spam"], compute,
                                        batch_size=32)
    return {"seconds": history.train_seconds, "examples": history.train_examples, "tokens": history.train_tokens,
            "linear_rows": history.train_tokens,  # the blocks skip padding outside attention (lorafit.backbones.packing)
            "eval_examples_per_s": eval_rate, "precision": "bf16 autocast" if compute.autocast_dtype else "fp32"}


def _pad(seqs, pad, length=None):
    t = length or max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


def run_peft(args, dtype: torch.dtype | None = None, dora: bool = False) -> dict:
    """transformers' GPT2ForSequenceClassification + PEFT LoRA, trained the way their docs show:
    shuffled batches padded to their longest message, a plain PyTorch loop; fp32, or bf16 autocast
    (``dtype``) as a PEFT user on bf16 hardware would turn on."""
    import peft
    from transformers import GPT2Config, GPT2ForSequenceClassification

    train, ytrain, test, ytest, pad = load_data(args)
    torch.manual_seed(42)
    model = GPT2ForSequenceClassification(GPT2Config(num_labels=2, pad_token_id=pad))
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, task_type="SEQ_CLS", fan_in_fan_out=True,
                                                       target_modules=["c_attn", "c_proj", "c_fc"], use_dora=dora))
    loss = lambda ids, mask, y: model(input_ids=ids, attention_mask=mask, labels=y).loss  # noqa: E731
    logits = lambda ids, mask: model(input_ids=ids, attention_mask=mask).logits  # noqa: E731
    return plain_loop(model.to(args.device), (train, ytrain, test), pad, args.batch_size, loss, logits, clip=1.0,
                      dtype=dtype)


def plain_loop(model, data, pad: int, batch_size: int, loss_of, logits_of, *, length: int | None = None,
               clip: float | None = None, dtype: torch.dtype | None = None) -> dict:
    """One epoch the way the peers' docs write it: shuffled batches (padded to their longest, or to
    ``length``), AdamW lr 5e-4; then evaluation in batches of 32 in the data's order."""
    train, ytrain, test = data
    device = next(model.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4, weight_decay=0.1)
    order = np.random.default_rng(42).permutation(len(train))
    model.train()
    tokens = padded = 0
    t0 = time.perf_counter()
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        ids, mask = _pad([train[j][:length] for j in idx], pad, length)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = loss_of(ids.to(device), mask.to(device), torch.as_tensor(ytrain[idx]).to(device))
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip)
        opt.step()
        opt.zero_grad()
        tokens += int(mask.sum())
        padded += ids.numel()
    sync()
    seconds = time.perf_counter() - t0
    model.eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(test), 32):
            ids, mask = _pad([s[:length] for s in test[i:i + 32]], pad, length)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                logits_of(ids.to(device), mask.to(device)).cpu()
    sync()
    eval_rate = len(test) / (time.perf_counter() - t0)
    return {"seconds": seconds, "examples": len(train), "tokens": tokens, "linear_rows": padded,
            "eval_examples_per_s": eval_rate, "precision": "bf16 autocast" if dtype else "fp32"}


def run_book(args) -> dict:
    """The book's appendix-E recipe: every message padded to the longest training message, logits read
    at the last position, LoRA on every block linear, fp32."""
    from lorafit import GPTModel, LoRAConfig, PRESETS, freeze_for_lora, inject_lora

    train, ytrain, test, ytest, pad = load_data(args)
    torch.manual_seed(42)
    model = GPTModel(PRESETS["gpt2-small"])
    inject_lora(model, LoRAConfig(rank=8, alpha=16))
    model.out_head = torch.nn.Linear(768, 2)
    freeze_for_lora(model, trainable=(model.out_head,))
    model.to(args.device)
    last = lambda ids, mask: model(ids)[:, -1, :]  # noqa: E731  (the book reads the last position)
    loss = lambda ids, mask, y: torch.nn.functional.cross_entropy(last(ids, mask), y)  # noqa: E731
    return plain_loop(model, (train, ytrain, test), pad, args.batch_size, loss, last, length=args.longest)


def matmul_peak(dtype) -> float:
    """GFLOP/s of a large matmul on all threads: the machine's practical ceiling for this work."""
    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    for _ in range(3):
        a @ b
    best = min(_timed(lambda: a @ b) for _ in range(10))
    return 2 * 2048**3 / best / 1e9


def _timed(f) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def run_worker(name: str, cmd: list[str]) -> dict | None:
    """Run one system in a fresh process (so its peak RSS is its own) and read back its RESULT line."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not line:
        print(f"{name}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
        return None
    return json.loads(line[0][7:])


def worker(args) -> None:
    runner = {"lorafit": lambda: run_lorafit(args, "auto"), "lorafit-fp32": lambda: run_lorafit(args, "fp32"),
              "lorafit-bf16": lambda: run_lorafit(args, "bf16"),
              "peft": lambda: run_peft(args), "peft-bf16": lambda: run_peft(args, torch.bfloat16),
              "book": lambda: run_book(args),
              "lorafit-dora": lambda: run_lorafit(args, "auto", dora=True),
              "lorafit-dora-fp32": lambda: run_lorafit(args, "fp32", dora=True),
              "peft-dora": lambda: run_peft(args, dora=True)}[args.worker]
    result = runner()
    result.update(peak_memory(args.device))
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="the SMSSpamCollection file")
    p.add_argument("--tokenizer", help="folder with GPT-2's encoder.json + vocab.bpe (else tiktoken's download)")
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, from {', '.join(SYSTEMS)}")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu", help="cpu or cuda (every system runs there)")
    p.add_argument("--limit-batches", type=int, default=0, help="time only the first N batches (s/epoch extrapolated)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        p.error(f"--systems: unknown {', '.join(sorted(unknown))}")
    peak32, peak16 = matmul_peak(torch.float32), matmul_peak(torch.bfloat16)
    print(f"machine: {cpu_name()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}; 2048^3 matmul: fp32 {peak32:.0f} GFLOP/s, bf16 {peak16:.0f} GFLOP/s", flush=True)
    results = {}
    for name in systems:
        cmd = [sys.executable, __file__, "--worker", name, "--data", args.data, "--batch-size", str(args.batch_size),
               "--device", args.device,
               "--limit-batches", str(args.limit_batches)] + (["--tokenizer", args.tokenizer] if args.tokenizer else [])
        t0 = time.perf_counter()
        r = run_worker(name, cmd)
        if r is None:
            continue
        results[name] = r
        print(f"  {name}: {r['seconds']:.1f} s training, {r['examples'] / r['seconds']:.2f} examples/s "
              f"({time.perf_counter() - t0:.0f} s with start-up and evaluation)", flush=True)

    full = 1045
    rate = {name: r["examples"] / r["seconds"] for name, r in results.items()}
    peft = [n for n in ("peft", "peft-bf16") if n in results]
    best = max(peft, key=rate.get) if peft else None
    best_eval = max(peft, key=lambda n: results[n]["eval_examples_per_s"]) if peft else None
    ratio = lambda a, b: f"{a / b:.2f}" if b else "n/a"  # noqa: E731
    print()
    if best:
        print(f"PEFT at its best precision on this machine: {best} for training, {best_eval} for evaluation")
    print("| system | precision | s / epoch | examples/s | real tokens/s | rows through the linears | peak RSS "
          "| x PEFT fp32 (train) | x PEFT best (train) | eval examples/s | x PEFT best (eval) | % of matmul peak |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        tok_rate = r["tokens"] / r["seconds"]
        peak = peak16 if r["precision"].startswith("bf16") else peak32
        util = 100 * tok_rate * FLOPS_PER_TOKEN / 1e9 / peak
        x_fp32 = ratio(rate[name], rate.get("peft"))
        x_best = ratio(rate[name], rate.get(best))
        x_eval = ratio(r["eval_examples_per_s"], results[best_eval]["eval_examples_per_s"] if best_eval else None)
        print(f"| {name} | {r['precision']} | {full / rate[name]:.0f} | {rate[name]:.2f} | {tok_rate:.0f} "
              f"| {r['linear_rows']:,} | {r['peak_rss_mb'] / 1024:.2f} GiB"
              + (f" (GPU {r['peak_gpu_mb'] / 1024:.2f} GiB)" if "peak_gpu_mb" in r else "") + f" | {x_fp32} | {x_best} "
              f"| {r['eval_examples_per_s']:.1f} | {x_eval} | {util:.0f} % |")
    if args.limit_batches:
        print(f"(first {args.limit_batches} batches timed; s / epoch extrapolated to {full} messages)")
    step = {name: r["seconds"] / r["examples"] for name, r in results.items()}
    for dora, plain in (("lorafit-dora", "lorafit"), ("lorafit-dora-fp32", "lorafit-fp32"), ("peft-dora", "peft"),
                        ("lorafit-dora-fp32", "peft-dora"), ("lorafit-dora", "peft-dora")):
        if dora in step and plain in step:
            print(f"step time {dora} / {plain}: {step[dora] / step[plain]:.2f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"fp32_peak": peak32, "bf16_peak": peak16, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
