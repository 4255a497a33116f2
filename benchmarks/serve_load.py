"""Serving under load: `lorafit serve` vs the FastAPI servers a user would otherwise write.

Same model for both: GPT-2 small architecture with random weights (timing only), written once by
transformers; lorafit serves it as its base with a rank-8 LoRA adapter (B = 0, so merging changes
nothing) and a 2-class head, the baseline as GPT2ForSequenceClassification whose `score` is that head.
Both answer the same texts (the balanced SMS split's 300 test messages, seed 42) to 1, 8 and 32
concurrent clients on loopback, a bounded number of requests each, one text per request. Each server runs
in its own process, all started before the first is driven; at each level they are driven in turn,
``--rounds`` times, the order reversed every other round, so that on a shared machine they meet the same
neighbours (the median round's texts/s; p50/p99 over every round's latencies). Errors and each server's
peak RSS are printed, then the latency of single 20-token requests. Needs the serve and bench extras.

The second baseline is what a user deploys for speed: the same transformers folder exported by optimum to
ONNX and quantised to dynamic int8 (`AutoQuantizationConfig.avx512_vnni`, as in inference_speed.py), served
by FastAPI over `ORTModelForSequenceClassification` in transformers' pipeline. optimum-onnx pins transformers
4.x: ``--ort-python`` names an interpreter that has it (``--ort-python none`` leaves this server out).

    python benchmarks/serve_load.py --data ../shared/data/sms_spam_collection/SMSSpamCollection \\
        --tokenizer ../shared/models/gpt2 --ort-python /tmp/ortenv/bin/python
"""


import argparse
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from lorafit.runtime import cpu_name

CLIENTS = (1, 8, 32)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_models(root: Path, tokenizer: Path) -> tuple[Path, Path]:
    """The base (transformers layout), lorafit's run on it, and the equivalent transformers classifier."""
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2Model

    from lorafit import BackboneSpec, ClassifierSpec, LoRAConfig, build_classifier, save_adapter

    torch.manual_seed(0)
    config = GPT2Config(num_labels=2, id2label={0: "ham", 1: "spam"}, label2id={"ham": 0, "spam": 1},
                        pad_token_id=50256)
    base = root / "base"
    GPT2Model(config).eval().save_pretrained(base)
    for src, dst in (("encoder.json", "vocab.json"), ("vocab.bpe", "merges.txt")):
        shutil.copyfile(tokenizer / src, base / dst)
    model, _, spec = build_classifier(ClassifierSpec(BackboneSpec(model=str(base)), LoRAConfig(rank=8, alpha=16),
                                                     labels=["ham", "spam"]))
    with torch.no_grad():
        model.head.bias.zero_()  # transformers' score layer has no bias
    run = root / "run"
    save_adapter(run, model, spec)
    hf = GPT2ForSequenceClassification(config).eval()
    hf.transformer.load_state_dict(GPT2Model.from_pretrained(base).state_dict())
    with torch.no_grad():
        hf.score.weight.copy_(model.head.weight)
    baseline = root / "baseline"
    hf.save_pretrained(baseline)
    for f in ("vocab.json", "merges.txt"):
        shutil.copyfile(base / f, baseline / f)
    return run, baseline


def baseline_server(directory: str, port: int, onnx: bool = False) -> None:
    """What a user writes: FastAPI calling transformers' pipeline per request; ``onnx``: over optimum's
    ONNX Runtime model of ``directory`` (an optimum export, here quantised to int8)."""
    import uvicorn
    from fastapi import FastAPI
    from pydantic import BaseModel
    from transformers import pipeline

    if onnx:
        from optimum.onnxruntime import ORTModelForSequenceClassification
        from transformers import AutoTokenizer

        model = ORTModelForSequenceClassification.from_pretrained(directory)
        clf = pipeline("text-classification", model=model, tokenizer=AutoTokenizer.from_pretrained(directory),
                       top_k=None)
    else:
        clf = pipeline("text-classification", model=directory, top_k=None, device="cpu")
    app = FastAPI()

    class Request(BaseModel):
        inputs: str

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.post("/predict")
    def predict(req: Request):
        return clf(req.inputs)

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


class Client:
    """One keep-alive HTTP connection."""

    def __init__(self, port: int):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def post(self, text: str) -> tuple[bool, float, object]:
        return self.post_json({"inputs": text})

    def post_json(self, body: dict) -> tuple[bool, float, object]:
        t0 = time.perf_counter()
        try:
            self.conn.request("POST", "/predict", body=json.dumps(body),
                              headers={"content-type": "application/json"})
            r = self.conn.getresponse()
            body = r.read()
            return r.status == 200, time.perf_counter() - t0, json.loads(body)
        except (OSError, http.client.HTTPException, ValueError) as e:
            self.conn.close()
            return False, time.perf_counter() - t0, str(e)


def wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit("server did not become healthy")


def run_clients(clients: int, send) -> tuple[list[float], list, float]:
    """``clients`` threads at once, thread k running ``send(k, record)``, which calls ``record(ok, seconds,
    answer)`` per request: (latencies of the answered, errors, wall seconds); the first error is printed."""
    latencies, errors = [], []
    lock = threading.Lock()

    def record(ok: bool, dt: float, answer) -> None:
        with lock:
            latencies.append(dt) if ok else errors.append(answer)

    threads = [threading.Thread(target=send, args=(k, record)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        print(f"{len(errors)} errors, the first: {errors[0]}", file=sys.stderr)
    return latencies, errors, wall


def load(port: int, texts: list[str], clients: int, per_client: int) -> dict:
    def send(k: int, record) -> None:
        c = Client(port)
        for i in range(per_client):
            record(*c.post(texts[(k * per_client + i) % len(texts)]))

    latencies, errors, wall = run_clients(clients, send)
    return {"clients": clients, "requests": clients * per_client, "texts_per_s": len(latencies) / wall,
            "latencies": latencies, "errors": len(errors)}


def merged(rounds: list[dict]) -> dict:
    """One level's rounds: the median round's texts/s, p50/p99 of all rounds' latencies."""
    lat = np.array([x for r in rounds for x in r["latencies"]] or [float("nan")]) * 1000
    return {"clients": rounds[0]["clients"], "requests": sum(r["requests"] for r in rounds),
            "texts_per_s": float(np.median([r["texts_per_s"] for r in rounds])),
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "errors": sum(r["errors"] for r in rounds)}


def rss_mb(pid: int, field: str = "VmHWM") -> float:
    """The server's peak (VmHWM) or current (VmRSS) resident memory."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def served_dtype(port: int) -> str | None:
    """What a lorafit server computes in (its /info's model_dtype: what auto chose); None for the baselines."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/info")
    r = conn.getresponse()
    body = r.read()
    return json.loads(body).get("model_dtype") if r.status == 200 else None


def measure(servers: list[tuple[str, list[str], int]], texts: list[str], short: str, args) -> list[dict]:
    """Start every (name, command, port) server one after another (loading peaks do not overlap) and warm it, then
    drive them in turn at each level, ``args.rounds`` times (the order reversed every other round): on a shared
    machine they meet the same neighbours. Then each one's single 20-token requests, its memory and a probe."""
    procs, names = [], []
    try:
        for name, cmd, port in servers:
            procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
            wait_healthy(port, procs[-1])
            dtype = served_dtype(port)
            names.append(name if dtype is None else f"{name} ({dtype})")
            warm = Client(port)
            for t in texts[:8]:
                warm.post(t)
        rows = [{n: [] for n in CLIENTS} for _ in servers]
        for r in range(args.rounds):
            for n in CLIENTS:
                for k in range(len(servers)) if r % 2 == 0 else reversed(range(len(servers))):
                    rows[k][n].append(load(servers[k][2], texts, n, max(1, args.requests // n)))
        results = []
        for k, (_, _, port) in enumerate(servers):
            single = Client(port)
            times = [single.post(short)[1] * 1000 for _ in range(args.single)]
            results.append({"name": names[k], "rows": [merged(rows[k][n]) for n in CLIENTS],
                            "single_p50_ms": float(np.median(times)), "peak_rss_mb": rss_mb(procs[k].pid),
                            "rss_mb": rss_mb(procs[k].pid, "VmRSS"), "probe": Client(port).post(texts[0])[2]})
        return results
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=60)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="the SMS Spam Collection file")
    p.add_argument("--tokenizer", required=True, help="folder with GPT-2's encoder.json + vocab.bpe")
    p.add_argument("--requests", type=int, default=192, help="requests per level, split among its clients")
    p.add_argument("--single", type=int, default=50, help="single 20-token requests timed one after another")
    p.add_argument("--precision", default="auto", help="lorafit serve --precision")
    p.add_argument("--adapters", type=int, metavar="N", help="instead: N adapters on one base vs N servers and PEFT's "
                                                             "set_adapter (benchmarks/serve_adapters.py)")
    import serve_adapters

    serve_adapters.add_options(p.add_argument_group("with --adapters"))
    p.add_argument("--no-pipeline", action="store_true", help="leave the FastAPI + pipeline server out (the slowest: "
                                                                   "most of the run's time)")
    p.add_argument("--ort-python", default=sys.executable,
                   help="an interpreter with optimum-onnx and onnxruntime for the ONNX Runtime int8 server (none: skip it)")
    p.add_argument("--baseline-server", metavar="DIR", help=argparse.SUPPRESS)
    p.add_argument("--ort-server", metavar="DIR", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.baseline_server or args.ort_server:
        return baseline_server(args.baseline_server or args.ort_server, args.port, onnx=bool(args.ort_server))
    if args.adapters:
        return serve_adapters.run(args)

    from lorafit import DataConfig, load_splits, load_tokenizer

    args.load_before = os.getloadavg()[0]  # the machine's 1-minute load: wall times mean little on a busy one
    texts = load_splits(DataConfig(args.data), seed=42).test["text"].tolist()
    enc = load_tokenizer(args.tokenizer)
    short = next(t for t in texts if len(enc.encode_ordinary(t)) == 20)
    with tempfile.TemporaryDirectory() as tmp:
        run, baseline = write_models(Path(tmp), Path(args.tokenizer))
        servers = []
        port = free_port()
        servers.append((f"lorafit serve --precision {args.precision}",
                        [sys.executable, "-m", "lorafit", "serve", "--run", str(run), "--port", str(port),
                         "--device", "cpu", "--precision", args.precision], port))
        if not args.no_pipeline:
            port = free_port()
            servers.append(("FastAPI + pipeline", [sys.executable, __file__, "--data", args.data, "--tokenizer",
                                                   args.tokenizer, "--baseline-server", str(baseline),
                                                   "--port", str(port)], port))
        if args.ort_python != "none":
            (Path(tmp) / "hf").symlink_to(baseline)
            subprocess.run([args.ort_python, str(Path(__file__).with_name("inference_speed.py")), "--prepare-onnx",
                            "--work", tmp], check=True)
            port = free_port()
            servers.append(("FastAPI + ONNX Runtime int8", [
                args.ort_python, __file__, "--data", args.data, "--tokenizer", args.tokenizer,
                "--ort-server", str(Path(tmp) / "onnx-int8"), "--port", str(port)], port))
        results = measure(servers, texts, short, args)
    report(results, args)


def report(results: list[dict], args) -> None:
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}; {args.requests} requests per level and round, "
          f"{args.rounds} rounds (median texts/s; p50/p99 over all rounds); "
          f"load average {args.load_before:.2f} before the run (1 minute; the run's own processes raise it)\n")
    print("| server | clients | requests | texts/s | p50 ms | p99 ms | errors | peak RSS MiB | RSS at end MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        for row in r["rows"]:
            print(f"| {r['name']} | {row['clients']} | {row['requests']} | {row['texts_per_s']:.1f} | "
                  f"{row['p50_ms']:.0f} | {row['p99_ms']:.0f} | {row['errors']} | {r['peak_rss_mb']:.0f} | "
                  f"{r['rss_mb']:.0f} |")
    print()
    for r in results:
        print(f"{r['name']}: single 20-token request p50 {r['single_p50_ms']:.1f} ms ({args.single} requests)")
    ours = results[0]["rows"][-1]
    for r in results[1:]:
        base = r["rows"][-1]
        print(f"\nat {ours['clients']} clients vs {r['name']}: throughput x{ours['texts_per_s'] / base['texts_per_s']:.2f}, "
              f"p99 {ours['p99_ms']:.0f} vs {base['p99_ms']:.0f} ms")
    spam = [{p["label"]: p["score"] for p in (r["probe"][0] if isinstance(r["probe"][0], list) else r["probe"])}["spam"]
            for r in results]  # the pipeline nests one string's answer in a list
    print("same model: P(spam) of the first test text " + ", ".join(f"{x:.6f} ({r['name']})" for x, r in zip(spam, results)))


if __name__ == "__main__":
    main()
