"""Many adapters, one server: `lorafit serve` with N adapters on one base vs what a user has without it.

Run as `serve_load.py --adapters N` (or this file directly). GPT-2 small architecture with random weights
(timing only), written once by transformers; N rank-8 adapters on it (random B and heads, so every update
is real work), two classes each. Side by side, each in its own process(es), 32 clients on loopback, one
text per request (the balanced SMS split's test messages, seed 42), the adapters' traffic even:

- lorafit serve, 1 merged adapter (a `lorafit merge` output): the single-classifier server, the yardstick;
- lorafit serve, 1 adapter unmerged: what serving an adapter without merging costs (a lone run is merged at
  load, so a second adapter, sent nothing, keeps the base shared);
- lorafit serve, N adapters: one base, mixed batches;
- N `lorafit serve` processes, one merged adapter each: what a user runs today;
- PEFT's set_adapter in one FastAPI process: transformers + PEFT with the N adapters loaded, switched per
  request under a lock (one request at a time: a batch cannot mix adapters).

Printed: texts/s, p50/p99 latency, errors, peak RSS (summed over processes), and the issue's goals.
"""

import argparse
import copy
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lorafit.runtime import cpu_name
from serve_load import Client, free_port, rss_mb, run_clients, wait_healthy

CLIENTS = 32


def write_adapters(root: Path, tokenizer: Path, n: int) -> dict:
    """The base (transformers layout), n adapter runs on it, each also merged and exported for PEFT."""
    from transformers import GPT2Config, GPT2Model

    from lorafit import BackboneSpec, ClassifierSpec, LoRAConfig, build_classifier, save_adapter
    from lorafit.adapters.lora import lora_layers
    from lorafit.adapters.peft_format import export_peft
    from lorafit.adapters.storage import save_merged

    torch.manual_seed(0)
    base = root / "base"
    GPT2Model(GPT2Config()).eval().save_pretrained(base)
    for src, dst in (("encoder.json", "vocab.json"), ("vocab.bpe", "merges.txt")):
        shutil.copyfile(tokenizer / src, base / dst)
    model, backbone, spec = build_classifier(ClassifierSpec(BackboneSpec(model=str(base)), LoRAConfig(rank=8, alpha=16),
                                                            labels=["ham", "spam"], head_bias=False))
    out = {"base": base, "runs": [], "merged": [], "peft": []}
    for k in range(n):
        g = torch.Generator().manual_seed(k)
        with torch.no_grad():
            for layer in lora_layers(model).values():
                layer.lora_B.copy_(0.02 * torch.randn(layer.lora_B.shape, generator=g))
            model.head.weight.copy_(0.05 * torch.randn(model.head.weight.shape, generator=g))
        run = root / f"a{k}"
        save_adapter(run, model, spec)
        save_merged(root / f"merged{k}", copy.deepcopy(model), spec, backbone)
        export_peft(run, root / f"peft{k}", verify=False)
        out["runs"].append(run)
        out["merged"].append(root / f"merged{k}")
        out["peft"].append(root / f"peft{k}")
    return out


def peft_server(base: str, adapters: list[str], port: int, precision: str) -> None:
    """What a user writes with PEFT: the adapters loaded in one model, set_adapter per request."""
    import uvicorn
    from fastapi import FastAPI
    from peft import PeftModel
    from pydantic import BaseModel
    from transformers import AutoTokenizer, GPT2ForSequenceClassification

    tok = AutoTokenizer.from_pretrained(base)
    model = GPT2ForSequenceClassification.from_pretrained(base, num_labels=2, pad_token_id=50256).eval()
    model = PeftModel.from_pretrained(model, adapters[0], adapter_name="a0")
    for k, path in enumerate(adapters[1:], 1):
        model.load_adapter(path, adapter_name=f"a{k}")
    dtype = torch.bfloat16 if precision in ("bf16", "auto") and _has_bf16() else None
    lock = threading.Lock()
    app = FastAPI()

    class Request(BaseModel):
        inputs: str
        model: str

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.post("/predict")
    def predict(req: Request):
        enc = tok(req.inputs, return_tensors="pt")
        with lock, torch.inference_mode(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            model.set_adapter(req.model)
            probs = torch.softmax(model(**enc).logits.float()[0], -1).tolist()
        return [{"label": k, "score": p} for k, p in sorted(zip(("ham", "spam"), probs), key=lambda kv: -kv[1])]

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def _has_bf16() -> bool:
    from lorafit.runtime import resolve_compute

    return resolve_compute("cpu", "auto", 768).autocast_dtype == torch.bfloat16


def drive(ports: list[int], names: list[str | None], texts: list[str], requests: int) -> dict:
    """32 clients; request i of client c goes to adapter (c + i) mod N (its own port when each has one)."""
    per = max(1, requests // CLIENTS)

    def send(c: int, record) -> None:
        clients = {p: Client(p) for p in set(ports)}
        for i in range(per):
            k = (c + i) % len(names)
            body = {"inputs": texts[(c * per + i) % len(texts)]} | ({"model": names[k]} if names[k] else {})
            client = clients[ports[k % len(ports)]]
            ok, dt, answer = client.post_json(body)
            if not ok and isinstance(answer, str):  # a keep-alive connection the server closed while idle (its
                ok, dt, answer = client.post_json(body)  # 5 s timeout, with N ports): sent again, fresh connection
            record(ok, dt, answer)

    latencies, errors, wall = run_clients(CLIENTS, send)
    return {"texts_per_s": len(latencies) / wall, "latencies": np.array(latencies or [float("nan")]),
            "errors": len(errors), "requests": CLIENTS * per}


@dataclass
class Setup:
    name: str
    commands: list[list[str]]  # one server process each
    ports: list[int]
    names: list[str | None]  # the adapters, as requests name them (None: the server's only one)
    rows: list[dict] = field(default_factory=list)  # one per round
    procs: list[subprocess.Popen] = field(default_factory=list)


def measure(setups: list[Setup], texts: list[str], requests: int, rounds: int) -> list[dict]:
    """Start every setup's servers one after another (loading peaks do not overlap), warm each adapter, then
    drive the setups in turn, ``rounds`` times (the order reversed every other round): on a shared machine
    they meet the same neighbours. Per setup: the median round's texts/s, p50/p99 of all rounds' latencies."""
    try:
        for s in setups:
            for cmd, port in zip(s.commands, s.ports):
                s.procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
                wait_healthy(port, s.procs[-1])
            drive(s.ports, s.names, texts[:2 * len(s.names)], 2 * len(s.names))  # every adapter answers once
        for r in range(rounds):
            for s in setups if r % 2 == 0 else setups[::-1]:
                s.rows.append(drive(s.ports, s.names, texts, requests))
                print(f"  round {r + 1}, {s.name}: {s.rows[-1]['texts_per_s']:.1f} texts/s", file=sys.stderr)
        return [summary(s) for s in setups]
    finally:
        for s in setups:
            for p in s.procs:
                p.terminate()
            for p in s.procs:
                p.wait(timeout=60)


def summary(s: Setup) -> dict:
    lat = np.concatenate([r["latencies"] for r in s.rows]) * 1000
    return {"name": s.name, "texts_per_s": float(np.median([r["texts_per_s"] for r in s.rows])),
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "errors": sum(r["errors"] for r in s.rows), "requests": sum(r["requests"] for r in s.rows),
            "peak_rss_mb": sum(rss_mb(p.pid) for p in s.procs)}


def lorafit_cmd(runs: list[str], port: int, precision: str) -> list[str]:
    return [sys.executable, "-m", "lorafit", "serve", *(x for r in runs for x in ("--run", r)), "--port", str(port),
            "--device", "cpu", "--precision", precision]


def run(args) -> None:
    """The comparison, printed as a table with the goals of issue 23."""
    from lorafit import DataConfig, load_splits

    n = args.adapters
    texts = load_splits(DataConfig(args.data), seed=42).test["text"].tolist()
    with tempfile.TemporaryDirectory() as tmp:
        m = write_adapters(Path(tmp), Path(args.tokenizer), n)
        named = [f"a{k}={m['runs'][k]}" for k in range(n)]
        ports = [free_port() for _ in range(n + 3)]
        ours = [Setup("lorafit serve, 1 merged adapter", [lorafit_cmd([str(m["merged"][0])], ports[0], args.precision)],
                      ports[:1], [None]),
                Setup("lorafit serve, 1 adapter (unmerged)", [lorafit_cmd(named[:2], ports[1], args.precision)],
                      ports[1:2], ["a0"]),
                Setup(f"lorafit serve, {n} adapters", [lorafit_cmd(named, ports[2], args.precision)], ports[2:3],
                      [f"a{k}" for k in range(n)])]
        results = measure(ours, texts, args.requests, args.rounds)
        results += measure([Setup(f"{n} lorafit serve processes (merged)",
                                  [lorafit_cmd([str(m["merged"][k])], ports[3 + k], args.precision) for k in range(n)],
                                  ports[3:], [None] * n)], texts, args.requests, 1)
        port = free_port()
        results += measure([Setup(f"PEFT set_adapter, 1 process ({n} adapters)",
                                  [[sys.executable, __file__, "--peft-server", str(m["base"]), *map(str, m["peft"]),
                                    "--port", str(port), "--precision", args.precision]],
                                  [port], [f"a{k}" for k in range(n)])], texts, args.peft_requests, 1)
        adapter_mb = (m["runs"][0] / "adapter.safetensors").stat().st_size / 2**20
    report(results, n, adapter_mb, args)


def report(results: list[dict], n: int, adapter_mb: float, args) -> None:
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}; {CLIENTS} clients, one text per "
          f"request, --precision {args.precision}; the first three servers side by side, {args.rounds} rounds\n")
    print("| server | requests | texts/s | p50 ms | p99 ms | errors | peak RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['name']} | {r['requests']} | {r['texts_per_s']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | "
              f"{r['errors']} | {r['peak_rss_mb']:.0f} |")
    single, unmerged, multi = results[:3]
    budget = (single["peak_rss_mb"] + n * adapter_mb) * 1.1
    print(f"\nunmerged single adapter: {unmerged['texts_per_s'] / single['texts_per_s']:.0%} of the merged one's texts/s")
    print(f"{n} adapters vs 1 merged: texts/s {multi['texts_per_s'] / single['texts_per_s']:.0%} (goal >= 80%), "
          f"p99 x{multi['p99_ms'] / single['p99_ms']:.2f} (goal <= 1.5), peak RSS {multi['peak_rss_mb']:.0f} MiB "
          f"(goal <= ({single['peak_rss_mb']:.0f} + {n} x {adapter_mb:.1f}) x 1.1 = {budget:.0f})")
    for r in results[3:]:
        print(f"vs {r['name']}: texts/s x{multi['texts_per_s'] / r['texts_per_s']:.2f}, "
              f"peak RSS {multi['peak_rss_mb']:.0f} vs {r['peak_rss_mb']:.0f} MiB")


def add_options(p: argparse.ArgumentParser) -> None:
    """What serve_load.py --adapters takes too."""
    p.add_argument("--rounds", type=int, default=3, help="rounds over the servers, driven in turn (serve_load: at "
                                                         "each level; --adapters: the single and multi-adapter ones)")
    p.add_argument("--peft-requests", type=int, default=128, help="requests to the PEFT server (one at a time)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="the SMS Spam Collection file")
    p.add_argument("--tokenizer", help="folder with GPT-2's encoder.json + vocab.bpe")
    p.add_argument("--adapters", type=int, default=8, help="adapters on the shared base")
    p.add_argument("--requests", type=int, default=384, help="requests per server and round, split among the 32 clients")
    p.add_argument("--precision", default="auto", help="lorafit serve --precision (PEFT: bf16 autocast for auto/bf16)")
    add_options(p)
    p.add_argument("--peft-server", nargs="+", metavar="DIR", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.peft_server:
        return peft_server(args.peft_server[0], args.peft_server[1:], args.port, args.precision)
    if not (args.data and args.tokenizer):
        p.error("--data and --tokenizer are required")
    run(args)


if __name__ == "__main__":
    main()
