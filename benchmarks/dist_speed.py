"""One process vs torchrun: seconds per epoch, the all-reduce's share of a step, bytes synchronised.

The same job both ways, through the CLI: GPT-2 small architecture with random weights, LoRA rank 8 on
every block linear + a 2-class head, one epoch of the SMS split. One process trains with
``--grad-accum 2``, once with all the cores' threads and once with one process's share of them; torchrun
trains with 2 processes and batch 8 each, a thread per core each: the same global batch of 16, the same
math. Kernels split their sums differently with another number of threads, so the run with as many threads
per process is the one that must match torchrun's to rounding (bf16 rounding amplifies the rest). Then, inside a 2-process group
like the one training used, the all-reduce of a gradient of the trainable size is timed alone and
set against a step's time. Test accuracies of both runs are printed: they must be equal.

    python benchmarks/dist_speed.py --data ../shared/data/sms_spam_collection/SMSSpamCollection \\
        --tokenizer ../shared/models/gpt2

``--device cuda --nproc N``: the same on N GPUs with NCCL (N = 1 shows the path works on one GPU).
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

from lorafit.runtime import cpu_name

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import free_port  # noqa: E402


def torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
            "127.0.0.1", "--master-port", str(free_port()), *args]


def train(cmd: list[str], threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    return time.perf_counter() - t0


def adapter_difference(a: Path, b: Path) -> float:
    """Largest absolute difference between two runs' adapter tensors."""
    from safetensors.torch import load_file

    x, y = load_file(str(a / "adapter.safetensors")), load_file(str(b / "adapter.safetensors"))
    return max(float((x[k].float() - y[k].float()).abs().max()) for k in x)


def allreduce_worker(numel: int, repeats: int, device: str) -> None:
    """Run by torchrun: time all_reduce of ``numel`` fp32 values, as DDP does once per step."""
    import torch
    import torch.distributed as dist

    backend = "nccl" if device == "cuda" else "gloo"
    dev = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if device == "cuda" else torch.device("cpu")
    torch.set_num_threads(1)
    dist.init_process_group(backend)
    grad = torch.randn(numel, device=dev)
    times = []
    for _ in range(repeats + 3):
        dist.barrier()
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        dist.all_reduce(grad)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if dist.get_rank() == 0:
        times = sorted(times[3:])
        print(json.dumps({"median_ms": 1e3 * times[len(times) // 2], "min_ms": 1e3 * times[0]}))
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--nproc", type=int, default=2, help="processes of the torchrun run")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="cores to share out")
    p.add_argument("--out", help="keep the run directories here (default: a temporary folder)")
    p.add_argument("--worker", nargs=3, metavar=("NUMEL", "REPEATS", "DEVICE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        allreduce_worker(int(args.worker[0]), int(args.worker[1]), args.worker[2])
        return
    out = Path(args.out or tempfile.mkdtemp(prefix="dist-speed-"))
    base = ["train", "--model", "gpt2-small", "--random-init", "--tokenizer", args.tokenizer, "--data", args.data,
            "--epochs", "1", "--batch-size", "8", "--quiet", "--device", args.device, "--overwrite"]
    runs = {}
    per_proc = max(1, args.threads // args.nproc)
    if args.device == "cpu":  # on a GPU there is no one-process equivalent sharing the same device
        for threads in dict.fromkeys((args.threads, per_proc)):  # all the cores; a process's share of them
            one = out / f"one-process-{threads}-threads"
            train([sys.executable, "-m", "lorafit", *base, "--grad-accum", str(args.nproc), "--out", str(one)],
                  threads)
            runs[f"1 process x {threads} thread(s), --grad-accum {args.nproc}"] = one
    many = out / f"{args.nproc}-processes"
    train(torchrun(args.nproc, "-m", "lorafit", *base, "--out", str(many)), per_proc)
    runs[f"{args.nproc} processes x {per_proc} thread(s), torchrun"] = many

    reports = {name: json.loads((d / "report.json").read_text()) for name, d in runs.items()}
    trainable = next(iter(reports.values()))["parameters"]["trainable"]
    last = reports[list(runs)[-1]]
    steps = sum(1 for ln in (many / "metrics.jsonl").read_text().splitlines() if '"train"' in ln)
    step_ms = 1e3 * last["speed"]["train_seconds"] / steps
    ar = subprocess.run(torchrun(args.nproc, __file__, "--data", args.data, "--tokenizer", args.tokenizer,
                                 "--worker", str(trainable), "30", args.device),
                        check=True, capture_output=True, text=True,
                        env={**os.environ, "OMP_NUM_THREADS": "1"})
    allreduce = json.loads(ar.stdout.strip().splitlines()[-1])

    print(f"\nCPU: {cpu_name()}, {os.cpu_count()} cores; device {args.device}")
    print(f"{'run':<48} {'precision':>14} {'s/epoch':>8} {'examples/s':>11} {'test acc':>9} {'val acc':>8}")
    for name, r in reports.items():
        print(f"{name:<48} {r['speed']['precision']:>14} {r['speed']['train_seconds']:>8.1f} "
              f"{r['speed']['train_examples_per_s']:>11.2f} "
              f"{100 * r['metrics']['test']['accuracy']:>8.2f}% {100 * r['metrics']['val']['accuracy']:>7.2f}%")
    names = list(reports)
    if len(names) > 1:
        print(f"speed-up of {args.nproc} processes over one process with all the threads: "
              f"{reports[names[0]]['speed']['train_seconds'] / last['speed']['train_seconds']:.2f}x")
        for name in names[:-1]:
            same = reports[name]["metrics"]["test"]["accuracy"] == last["metrics"]["test"]["accuracy"]
            print(f"torchrun vs {name}: test accuracies equal: {same}; largest adapter difference: "
                  f"{adapter_difference(runs[name], many):.2e}")
    ring = 2 * (args.nproc - 1) / args.nproc
    print(f"synchronised per step: {trainable:,} trainable fp32 gradients = {4 * trainable / 2**20:.2f} MiB "
          f"(a ring all-reduce sends {ring:.2f}x that per process)")
    print(f"all-reduce of that gradient alone: {allreduce['median_ms']:.1f} ms (median of 30, min "
          f"{allreduce['min_ms']:.1f}); a step of the torchrun run: {step_ms:.0f} ms; "
          f"all-reduce share {100 * allreduce['median_ms'] / step_ms:.1f} %")
    print(f"runs in {out}")


if __name__ == "__main__":
    main()
