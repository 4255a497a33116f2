"""``lorafit predict --file`` on a big file against the same classifier scoring a list in-process: texts/s of
both, and the command's peak RSS on the big file against 100 lines (it streams: memory must not grow).

The classifier: GPT-2-small-shaped (random weights, LoRA rank 8, a 2-class head; ``--layers`` fewer blocks
for a quicker run, which makes reading and tokenising a larger share of the time: a harder test), GPT-2's
real BPE. The file: SMS messages (the SMS Spam Collection's, cycled, or generated SMS-like texts when
it is absent) as a CSV with an id column. In-process: ``load_for_inference`` once, then tokenising and
``predict_proba`` of a list in batches of 32 (sorted by length over the whole list); ``predict --file`` is
timed by its own summary (model loading excluded, as in-process) and end to end.

    python benchmarks/predict_file_speed.py --tokenizer ../shared/models/gpt2 \\
        --sms ../shared/data/sms_spam_collection/SMSSpamCollection --lines 100000 --layers 2

:func:`measure_predict_file` is what another benchmark (inference_speed.py) calls for the same numbers.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lorafit import BackboneSpec, ClassifierSpec, LoRAConfig, build_classifier, save_adapter
from lorafit.backbones.gpt2 import PRESETS, GPTConfig, GPTModel
from lorafit.data.batching import encode_texts
from lorafit.inference.predict import load_for_inference, predict_proba
from lorafit.runtime import cpu_name

SUMMARY = re.compile(r"(\d+) texts scored in ([\d.]+) s")
WORDS = ("free win cash prize claim txt call now urgent reply stop ok see you at lunch later thanks home running "
         "late tonight dinner love going are we still on for the tomorrow morning pick me up").split()


def make_run(directory: Path, tokenizer: str, layers: int) -> Path:
    """A GPT-2-small-shaped classifier saved as a lorafit run (``layers`` < 12: a .pth base of fewer blocks)."""
    if layers == PRESETS["gpt2-small"].n_layers:
        base = BackboneSpec("gpt2-small", random_init=True, tokenizer=tokenizer)
    else:
        torch.manual_seed(0)
        cfg = GPTConfig(**{**vars(PRESETS["gpt2-small"]), "n_layers": layers})
        torch.save(GPTModel(cfg).state_dict(), directory / "base.pth")
        base = BackboneSpec(str(directory / "base.pth"), n_heads=cfg.n_heads, tokenizer=tokenizer)
    model, _, spec = build_classifier(ClassifierSpec(base, LoRAConfig(rank=8, alpha=16), ["ham", "spam"]))
    save_adapter(directory / "run", model, spec)
    return directory / "run"


def sms_texts(sms: str | None, n: int) -> list[str]:
    """``n`` SMS messages: the collection's cycled, or generated ones of SMS lengths."""
    if sms and Path(sms).is_file():
        base = [line.split("\t", 1)[1] for line in Path(sms).read_text(encoding="utf-8").splitlines() if "\t" in line]
    else:
        rng = random.Random(0)
        base = [" ".join(rng.choices(WORDS, k=rng.randint(3, 30))) for _ in range(5000)]
    return [base[i % len(base)] for i in range(n)]


def write_csv(path: Path, texts: list[str]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "text"])
        w.writerows(enumerate(texts))
    return path


def in_process(run: Path, texts: list[str], precision: str, batch_size: int) -> float:
    """Texts/s of tokenising and scoring ``texts`` as one list with the model already loaded."""
    loaded = load_for_inference(run, "cpu", precision)
    encoder = loaded.backbone.encoder
    warm = encode_texts(encoder, texts[:64], None, loaded.backbone.context_length)
    predict_proba(loaded.model, warm, encoder.pad_id, batch_size=batch_size, compute=loaded.compute)
    start = time.perf_counter()
    enc = encode_texts(encoder, texts, None, loaded.backbone.context_length)
    predict_proba(loaded.model, enc, encoder.pad_id, batch_size=batch_size, compute=loaded.compute)
    return len(texts) / (time.perf_counter() - start)


def predict_file(run: Path, path: Path, out: Path, precision: str, batch_size: int) -> dict:
    """``lorafit predict --file`` in its own process: texts/s (its summary, and end to end) and peak RSS."""
    cmd = [sys.executable, "-m", "lorafit", "predict", "--run", str(run), "--file", str(path), "--out", str(out),
           "--quiet", "--precision", precision, "--device", "cpu", "--batch-size", str(batch_size)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    stdout, stderr = proc.stdout.read(), proc.stderr.read()
    if status != 0 or not SUMMARY.search(stdout):
        raise SystemExit(f"predict --file failed:\n{stderr[-2000:]}")
    rows, seconds = SUMMARY.search(stdout).groups()
    return {"rows": int(rows), "texts_per_s": int(rows) / float(seconds), "end_to_end_texts_per_s": int(rows) / wall,
            "peak_rss_mib": usage.ru_maxrss / 1024, "command": " ".join(cmd)}


def measure_predict_file(run: Path, texts: list[str], workdir: Path, *, precision: str = "auto",
                         batch_size: int = 32, baseline_lines: int = 2000) -> dict:
    """predict --file on all of ``texts`` and on 100 of them, and in-process scoring of ``baseline_lines``."""
    big = predict_file(run, write_csv(workdir / "big.csv", texts), workdir / "big.out.csv", precision, batch_size)
    small = predict_file(run, write_csv(workdir / "small.csv", texts[:100]), workdir / "small.out.csv", precision,
                         batch_size)
    baseline = in_process(run, texts[:baseline_lines], precision, batch_size)
    return {"file": big, "file_100": small, "in_process_texts_per_s": baseline,
            "speed_ratio": big["texts_per_s"] / baseline, "rss_growth_mib": big["peak_rss_mib"] - small["peak_rss_mib"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", required=True, help="folder with GPT-2's encoder.json + vocab.bpe")
    p.add_argument("--sms", help="the SMS Spam Collection file (none: generated SMS-like texts)")
    p.add_argument("--lines", type=int, default=100_000, help="lines of the big file")
    p.add_argument("--baseline-lines", type=int, default=2000, help="texts scored in-process for the baseline")
    p.add_argument("--layers", type=int, default=12, help="transformer blocks of the GPT-2-small-shaped model")
    p.add_argument("--precision", default="auto", help="auto, bf16 or fp32 (both sides)")
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="lorafit-predict-file-") as tmp:
        run = make_run(Path(tmp), args.tokenizer, args.layers)
        r = measure_predict_file(run, sms_texts(args.sms, args.lines), Path(tmp), precision=args.precision,
                                 batch_size=args.batch_size, baseline_lines=args.baseline_lines)
    f, s = r["file"], r["file_100"]
    print(f"CPU: {cpu_name()}, {torch.get_num_threads()} threads; GPT-2-small-shaped, {args.layers} blocks, "
          f"precision {args.precision}, batches of {args.batch_size}")
    print(f"in-process, {args.baseline_lines} texts (tokenise + predict_proba): {r['in_process_texts_per_s']:.1f} texts/s")
    print(f"predict --file, {f['rows']} lines: {f['texts_per_s']:.1f} texts/s ({f['end_to_end_texts_per_s']:.1f} "
          f"end to end, model loading included) = {100 * r['speed_ratio']:.0f} % of in-process (goal >= 80 %)")
    print(f"peak RSS: {f['peak_rss_mib']:.0f} MiB on {f['rows']} lines, {s['peak_rss_mib']:.0f} MiB on 100 lines: "
          f"+{r['rss_growth_mib']:.0f} MiB (goal <= 200)")


if __name__ == "__main__":
    main()
