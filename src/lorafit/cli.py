"""``lorafit``: a thin command-line shell over the Python API (every command is a few calls into it)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NoReturn

import torch

from . import __version__
from .adapters.accounting import count_parameters, format_counts
from .adapters.hf_format import export_hf
from .adapters.onnx_format import QUANTIZE, export_onnx
from .adapters.loading import merge_run
from .adapters.lora import INITS, LoRAConfig
from .adapters.peft_format import export_peft
from .adapters.build import add_head, add_lora
from .adapters.storage import MERGED_CONFIG, ClassifierSpec, saved_text_pair
from .backbones.base import BackboneSpec
from .backbones.generate import generate
from .backbones.loader import load_backbone
from .data.datasets import BALANCING, DataConfig
from .data.rows import RowReader
from .data.windows import LONG_MODES, POOLS, LongTexts
from .errors import FieldError, LorafitError, UsageError
from .inference.evaluate import evaluate_run
from .inference.explain import IG_STEPS, METHODS as EXPLAIN_METHODS, explain_texts
from .inference.predict import labelled, predict_texts
from .inference.score_file import FileScorer, score_file
from .reporting.calibration import DecisionConfig
from .reporting.compare import compare_runs
from .reporting.loggers import LOGGERS, LoggerConfig
from .runtime import INFERENCE_PRECISIONS, PRECISIONS, seeded
from .serving.config import ServeConfig
from .serving.server import serve
from .training.checkpoint import CheckpointPolicy, RunSettings
from .training.loop import SCHEDULES, TrainConfig
from .training.distributed import Launch, launched_by_torchrun
from .training.run import default_run_dir, model_name, resume_run, run_to_resume, train_run
from .training.tune import SPACE, TuneConfig, render_table, tune


EXPORT_FORMATS = ("peft", "hf", "onnx")
# The library names settings by their fields; a message the CLI prints names the flag that sets each one.
FLAGS = {
    "dropout": "--lora-dropout", "use_rslora": "--rslora", "use_dora": "--dora", "head_bias=False": "--no-head-bias",
    "header": "--no-header", "balance": "--no-balance", "names": "--logger", "backend": "--dist-backend",
    "timeout_s": "--dist-timeout", "png": "--out-png", "runs": "--run", "export_hf": "--format hf",
    "export_peft": "--format peft", "positive": "--positive-class",
}


def flag(field: str) -> str:
    """The flag that sets ``field``: the table's, else the field's own name as a flag (``save_every`` ->
    ``--save-every``)."""
    return FLAGS.get(field) or "--" + field.replace("_", "-")


def _model_args(p: argparse.ArgumentParser, default: str = "gpt2-small") -> None:
    g = p.add_argument_group("base model")
    g.add_argument("--model", default=default,
                   help="gpt2-small|medium|large|xl (OpenAI's weights via the Hugging Face cache), a Hugging Face "
                        "or OpenAI-layout folder, a book .pth state dict, or hf:<hub id or folder>")
    g.add_argument("--random-init", action="store_true", help="fresh weights of the preset's shape; no download")
    g.add_argument("--tokenizer", metavar="DIR", help="folder with encoder.json + vocab.bpe (or vocab.json + merges.txt)")
    g.add_argument("--gguf-file", metavar="NAME", help="GGUF file inside an hf: model folder or repo")
    g.add_argument("--n-heads", type=int, help="attention heads, for .pth files whose width is not a GPT-2 size")


def _lora_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("LoRA")
    g.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    g.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha; the update is scaled by alpha/r")
    g.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA path")
    g.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(r) (rank-stabilised LoRA)")
    g.add_argument("--dora", action="store_true",
                   help="DoRA: a trainable magnitude per output row over the normalised adapted weight")
    g.add_argument("--init", default="default", choices=INITS,
                   help="default: A random, B zero; pissa: A, B from the base weight's top-r singular vectors "
                        "(default: %(default)s)")
    g.add_argument("--targets", default="all",
                   help="comma-separated: all (every linear in the blocks), attention, qv, feedforward, "
                        "or module names / regexes such as W_query,W_value")
    g.add_argument("--num-classes", type=int, default=2, help="classes of the head, for inspect")
    g.add_argument("--head-bias", action=argparse.BooleanOptionalAction, default=True,
                   help="a bias on the classification head; --no-head-bias matches transformers' decoder classifiers "
                        "(GPT-2, Llama), so that any adapter exports exactly")


def _table_args(g) -> None:
    g.add_argument("--text-col", help="text column: a name, or a number from 0 with --no-header (none: text, or 1); "
                   "two, comma-separated (question,answer), for pairs of texts")
    g.add_argument("--label-col", help="label column: a name, or a number from 0 with --no-header (none: label, or 0)")
    g.add_argument("--no-header", action="store_true", help="CSV/TSV files without a header row")
    g.add_argument("--encoding", default="utf-8", help="text encoding of the data files (e.g. cp1252, latin-1); "
                   "a byte-order mark overrides it")
    g.add_argument("--sep", help="separator of delimited data files: one character, or comma, semicolon, "
                   "tab, pipe (none: sniffed from the first lines among those four)")
    g.add_argument("--split", default="train", help="hf: datasets: the split --data reads")


def _runtime_args(p: argparse.ArgumentParser, inference: bool = True) -> None:
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    if inference:
        p.add_argument("--precision", default="auto", choices=INFERENCE_PRECISIONS,
                       help="int8: frozen linears in int8 (cpu); auto: int8 where the CPU has int8 dot products, one "
                            "block of the model runs a batch clearly faster in int8 than in the float choice and "
                            "the run's sample texts keep their classes, else bf16 where bf16 matmuls time faster "
                            "than fp32, else fp32")
        return
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="auto: bf16 autocast where the hardware has native bf16, else fp32")


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", action="append", default=[], metavar="[NAME=]DIR",
                   help="a training run or a `lorafit merge` output; repeat to serve several adapters on one base "
                        "(requests pick one by name, default: the first; NAME: the folder's name when not given)")
    p.add_argument("--runs-dir", metavar="DIR", help="serve every run in this folder (each under its folder's name)")
    d = ServeConfig(runs=("x",))
    p.add_argument("--host", default=d.host, help="address to listen on (anything but loopback: set --api-key)")
    p.add_argument("--port", type=int, default=d.port, help="TCP port (0: any free port)")
    p.add_argument("--max-batch-size", type=int, default=d.max_batch_size, help="texts run together by the worker")
    p.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms, help="how long a request waits for companions")
    p.add_argument("--max-client-batch", type=int, default=d.max_client_batch, help="texts in one request (more: 413)")
    p.add_argument("--max-input-tokens", type=int, help="tokens a text may have, more: 413 unless truncate; "
                                                       "none: the model's context")
    p.add_argument("--max-concurrent", type=int, default=d.max_concurrent, help="requests queued before 429")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every API route but /health; "
                                      "none given: $LORAFIT_API_KEY if set (safer: not in the process list)")
    p.add_argument("--max-request-bytes", type=int, default=d.max_request_bytes, help="larger request bodies get 413")
    _runtime_args(p)


def _data_args(g) -> None:
    g.add_argument("--data", metavar="FILE", help="labelled texts (CSV, TSV, JSONL, Parquet or the SMS file) or "
                                                 "hf:<dataset id or save_to_disk folder>; none: download the SMS Spam Collection")
    g.add_argument("--val", metavar="FILE", help="validation file (with --test; otherwise --data is split 70/10/20)")
    g.add_argument("--test", metavar="FILE", help="test file")
    g.add_argument("--val-split", metavar="NAME", help="hf: datasets: validation split (with --test-split; "
                                                       "otherwise --split is split 70/10/20)")
    g.add_argument("--test-split", metavar="NAME", help="hf: datasets: test split")
    _table_args(g)
    g.add_argument("--balance", default="auto", choices=BALANCING,
                   help="undersample: every class to the rarest one's count (the book's way); weights: keep every "
                        "text, weight the loss by inverse class frequency; none; auto: undersample two classes, or "
                        "more when that keeps at least half the texts, else weights")
    g.add_argument("--no-balance", action="store_true", help="the same as --balance none: every text, stratified split")
    g.add_argument("--multi-label", action="store_true",
                   help="any number of labels per text: 'a|b' in the label column, or several 0/1 columns "
                        "(--label-col a,b,c); sigmoid + binary cross-entropy, per-label thresholds chosen on validation")


def _long_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("long texts (kept in the adapter: eval, predict and serve read texts the same way)")
    d = LongTexts()
    g.add_argument("--long", default=d.long, choices=LONG_MODES,
                   help="texts longer than the window: truncate (keep the first tokens), or chunk into overlapping "
                        "windows whose logits are pooled into the text's (the loss is on the pooled logits)")
    g.add_argument("--stride", type=int, metavar="N", help="--long chunk: tokens between window starts, less than "
                                                           "the window (none: half the window)")
    g.add_argument("--pool", default=d.pool, choices=POOLS, help="--long chunk: a text's logits are the max or the "
                                                                 "mean of its windows'")
    g.add_argument("--max-length", type=int, metavar="N", help="tokens in a window, where truncation cuts "
                                                               "(none: the model's context)")


def _train_args(p: argparse.ArgumentParser) -> None:
    _model_args(p)
    _lora_args(p)
    _data_args(p.add_argument_group("data"))
    _long_args(p)
    g = p.add_argument_group("training")
    d = TrainConfig()
    g.add_argument("--epochs", type=int, default=d.epochs, help="passes over the training split")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="texts per batch")
    g.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay (matrices only)")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum, help="batches per optimiser step")
    g.add_argument("--schedule", default=d.schedule, choices=SCHEDULES, help="learning-rate schedule after warmup")
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="linear warmup, in optimiser steps")
    g.add_argument("--clip-grad", type=float, default=d.clip_grad, help="max gradient norm (0: off)")
    g.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between evaluations on a validation slice")
    g.add_argument("--eval-batches", type=int, default=d.eval_batches, help="batches in that validation slice")
    g.add_argument("--class-weights", choices=["auto"], help="auto: weight the loss by inverse class frequency")
    g.add_argument("--lora-plus-ratio", type=float, metavar="R",
                   help="LoRA+: LoRA B learns at R x --lr (the paper suggests 16); none: plain AdamW groups")
    g.add_argument("--seed", type=int, default=d.seed, help="fixes split, initialisation and order")
    g.add_argument("--out", metavar="DIR", help="run directory (none: runs/<model>-r<rank>-s<seed>)")
    g.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    g.add_argument("--resume", metavar="DIR",
                   help="continue an interrupted or killed run from its last checkpoint (its own settings are used); "
                        "auto: --out's run if it holds a checkpoint of this same command, else start (the default "
                        "under torchrun)")
    r = CheckpointPolicy()
    g.add_argument("--save-every", type=int, default=r.save_every, metavar="STEPS",
                   help="optimiser steps between checkpoints (0: off); one is also written at each epoch end")
    g.add_argument("--save-every-minutes", type=float, default=r.save_every_minutes, metavar="M",
                   help="minutes between checkpoints (0: off)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    _decision_args(p)
    g = p.add_argument_group("experiment tracking (metrics.jsonl is always written)")
    g.add_argument("--logger", action="append", metavar="NAME",
                   help=f"also log to {', '.join(LOGGERS)} (repeat, or a comma list): metrics.csv, "
                        "<run>/tensorboard event files, an MLflow run; --resume keeps the run's own unless given")
    g.add_argument("--mlflow-uri", default=LoggerConfig.mlflow_uri,
                   help="MLflow tracking URI or folder, for --logger mlflow")
    _runtime_args(p, inference=False)
    g = p.add_argument_group("torchrun (ignored in a plain process)")
    launch = Launch()
    g.add_argument("--dist-backend", default=launch.backend, choices=("auto", "gloo", "nccl"),
                   help="auto: nccl on cuda, gloo on cpu")
    g.add_argument("--dist-timeout", type=float, default=launch.timeout_s, metavar="SECONDS",
                   help="a rank waiting this long on the others (dead or hung) stops with an error")


def _decision_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("decisions (fitted on the validation split after training, kept in the adapter)")
    g.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=DecisionConfig.calibrate,
                   help="temperature scaling: probabilities that match how often the model is right")
    g.add_argument("--target-precision", type=float, metavar="P",
                   help="operating threshold: the lowest giving precision >= P for --positive-class on validation")
    g.add_argument("--target-recall", type=float, metavar="R",
                   help="operating threshold: the highest giving recall >= R for --positive-class on validation")
    g.add_argument("--positive-class", metavar="LABEL",
                   help="the class a threshold is for (one-vs-rest); default: the second of two labels")


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, metavar="DIR", help="a training run, a merged model or a PEFT adapter")
    p.add_argument("--data", metavar="FILE", help="a labelled file or hf:<dataset> to evaluate on (none: the run's own splits)")
    _table_args(p)
    p.add_argument("--batch-size", type=int, default=32, help="texts per batch")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    _runtime_args(p)


def _predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, metavar="DIR", help="a training run, a merged model or a PEFT adapter")
    p.add_argument("texts", nargs="*", help="messages to classify")
    p.add_argument("--pair", nargs=2, action="append", metavar=("FIRST", "SECOND"),
                   help="a pair of texts, for a run trained on pairs (--text-col a,b); repeat for more")
    p.add_argument("--file", metavar="FILE", help="texts to score, read as a stream (any length): .csv / .tsv "
                                                 "(separator sniffed), .jsonl, else one text a line")
    p.add_argument("--out", metavar="FILE", help="with --file: write every row with its prediction to FILE (.csv or "
                                               ".jsonl), whole at the end; none: print the predictions")
    p.add_argument("--text-col", help="--file's text column: a name, or a number from 0 with --no-header "
                                      "(none: text, or the last column); two (a,b) for pairs of texts (none: the "
                                      "two the run was trained on)")
    p.add_argument("--no-header", action="store_true", help="a CSV/TSV --file without a header row")
    p.add_argument("--sep", help="--file is delimited text with this separator (one character, or comma, semicolon, "
                                 "tab, pipe); none: .csv / .tsv files' sniffed, other names are plain text")
    p.add_argument("--encoding", default="utf-8", help="text encoding of --file")
    p.add_argument("--json", action="store_true", help="print JSON lines")
    p.add_argument("--batch-size", type=int, default=32, help="texts per batch")
    p.add_argument("--threshold", type=_threshold, metavar="P|LABEL=P",
                   help="decide LABEL (a bare P: the run's thresholded class, or the second of two) when its "
                        "probability >= P; none: the run's own threshold, if it has one, else the most probable")
    p.add_argument("--quiet", action="store_true", help="no progress bar for --out")
    g = p.add_argument_group("explanations")
    g.add_argument("--explain", action="store_true",
                   help="each token's attribution to the predicted class's log-odds: coloured text (green: towards "
                        "it, red: away), or with --json the tokens and their attributions")
    g.add_argument("--explain-method", default="auto", choices=EXPLAIN_METHODS,
                   help="ig: integrated gradients (Captum: lorafit[explain]); occlusion: exact, each token replaced "
                        "by the pad token; auto: ig when Captum is installed")
    g.add_argument("--explain-steps", type=int, default=IG_STEPS, help="integration steps of ig")
    g.add_argument("--target", metavar="LABEL", help="explain this class instead of the predicted one")
    _runtime_args(p)


def _threshold(value: str) -> float | dict:
    """``0.9`` or ``spam=0.9`` (argparse turns a ValueError into a usage error naming the flag)."""
    label, _, number = value.rpartition("=")
    return {label: float(number)} if label else float(number)


def _inspect_args(p: argparse.ArgumentParser) -> None:
    _model_args(p)
    _lora_args(p)
    p.add_argument("--seed", type=int, default=42, help="seeds --random-init and LoRA's initialisation")


def _compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories written by lorafit train")
    p.add_argument("--out-png", default="compare.png", help="where to write the overlaid validation curves")


def _merge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, metavar="DIR", help="a training run")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the merged classifier")
    p.add_argument("--overwrite", action="store_true", help="replace a merged model already in --out")


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, metavar="DIR",
                   help="a training run (for --format hf also a merged model or a PEFT adapter)")
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS,
                   help="peft: a PEFT SEQ_CLS LoRA adapter folder; hf: a merged transformers model folder; onnx: "
                        "an ONNX Runtime model folder (optimum's ORTModelForSequenceClassification loads it)")
    p.add_argument("--quantize", choices=QUANTIZE,
                   help="--format onnx: int8 weights per output channel, activations quantised dynamically")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace what --out holds")


def _generate_args(p: argparse.ArgumentParser) -> None:
    _model_args(p)
    p.add_argument("prompt", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=30, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, help="sample from the k most likely tokens only")
    p.add_argument("--seed", type=int, default=42, help="seeds --random-init and sampling")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorafit", description="LoRA fine-tuning of GPT-2 and friends into text classifiers")
    parser.add_argument("--version", action="version", version=f"lorafit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks")
    common = argparse.ArgumentParser(add_help=False)  # so that `lorafit train ... --debug` works too
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show Python tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        command.add_arguments(sub.add_parser(name, help=command.help, parents=[common],
                                             formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    return parser


def _backbone_spec(args):
    return BackboneSpec(model=args.model, random_init=args.random_init, tokenizer=args.tokenizer,
                        gguf_file=args.gguf_file, n_heads=args.n_heads, seed=args.seed)


def _lora_config(args):
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    return LoRAConfig(rank=args.rank, alpha=args.alpha, dropout=args.lora_dropout, use_rslora=args.rslora,
                      targets=targets, use_dora=args.dora, init=args.init)


def _command(args) -> str:
    """The command line as typed, for report.md's "Reproduce" and the checkpoint's check on resume."""
    return "lorafit " + " ".join(shlex.quote(a) for a in args.argv)


def cmd_train(args) -> None:
    launch = Launch(args.dist_backend, args.dist_timeout)
    out = Path(args.out) if args.out else default_run_dir(args.model, args.rank, args.seed)
    command = _command(args)
    resume = run_to_resume(args.resume, out, command, args.overwrite)
    if resume:
        loggers = LoggerConfig(tuple(args.logger), args.mlflow_uri) if args.logger else None
        _print_summary(resume_run(resume, progress=not args.quiet, loggers=loggers, launch=launch))
        return
    spec, data_cfg, train_cfg, settings = train_configs(args, command)
    _print_summary(train_run(spec, data_cfg, train_cfg, out, settings, overwrite=args.overwrite,
                             progress=not args.quiet, launch=launch))


def train_configs(args, command: str = "") -> tuple[ClassifierSpec, DataConfig, TrainConfig, RunSettings]:
    """``lorafit train``'s flags as the library's configs (what :func:`train_run` takes)."""
    spec = ClassifierSpec(backbone=_backbone_spec(args), lora=_lora_config(args), head_bias=args.head_bias,
                          long=LongTexts(args.long, args.stride, args.pool, args.max_length))
    loggers = LoggerConfig(tuple(args.logger or ()), args.mlflow_uri)
    settings = RunSettings(command, args.device, args.precision,
                           CheckpointPolicy(args.save_every, args.save_every_minutes), loggers, _decision_config(args))
    train_cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                            grad_accum=args.grad_accum, schedule=args.schedule, warmup_steps=args.warmup_steps,
                            clip_grad=args.clip_grad or None, eval_every=args.eval_every,
                            eval_batches=args.eval_batches, class_weights=args.class_weights, seed=args.seed,
                            lora_plus_ratio=args.lora_plus_ratio)
    return spec, _data_config(args), train_cfg, settings


def _data_config(args) -> DataConfig:
    """--data and the flags that say how to read it (train's also name val/test files or splits)."""
    splits = {k: getattr(args, k, None) for k in ("val", "test", "val_split", "test_split")}
    return DataConfig(data=args.data, text_col=args.text_col, label_col=args.label_col,
                      balance="none" if getattr(args, "no_balance", False) else getattr(args, "balance", "auto"),
                      encoding=args.encoding,
                      header=not args.no_header, sep=args.sep, split=args.split,
                      multi_label=getattr(args, "multi_label", False), **splits)


def _decision_config(args) -> DecisionConfig:
    return DecisionConfig(calibrate=args.calibrate, target_precision=args.target_precision,
                          target_recall=args.target_recall, positive=args.positive_class)


def _print_summary(result) -> None:
    if not result.is_main:
        return  # torchrun's other ranks print nothing but errors
    r, out = result.report, result.directory
    acc = ", ".join(f"{k} {100 * v['accuracy']:.2f} %" for k, v in r["metrics"].items())
    print(f"accuracy: {acc}")
    print(f"training: {r['speed']['train_seconds']:.1f} s, {r['speed']['train_examples_per_s']:.2f} examples/s; "
          f"peak RSS {r['speed']['peak_rss_mb']:.0f} MiB")
    print(f"run written to {out}/ (report.md, adapter.safetensors, plots)")


def cmd_tune(args) -> None:
    if args.resume:
        raise UsageError("tune: run the same command again to continue a search (its study is in --out)")
    spec, dcfg, tcfg, settings = train_configs(args, _command(args))
    out = Path(args.out or f"tunes/{model_name(args.model)}-s{args.seed}")
    space = tuple(s.strip() for s in args.space.split(",") if s.strip())
    cfg = TuneConfig(trials=args.trials, jobs=args.jobs, space=space, prune=not args.no_prune,
                     max_epochs=args.max_epochs)
    summary = tune(spec, dcfg, tcfg, out, cfg, settings, progress=not args.quiet)
    print(render_table(summary))
    print(f"trials in {out}/trial-NNN (lorafit compare {out}), the best copied to {out}/best, table in {out}/tune.md")


def _tune_args(p: argparse.ArgumentParser) -> None:
    _train_args(p)
    g = p.add_argument_group("search (the flags above are the base settings: the first trial)")
    d = TuneConfig()
    g.add_argument("--trials", type=int, default=d.trials, help="finished trials (complete or pruned) to reach")
    g.add_argument("--jobs", type=int, default=d.jobs, help="trials at once; the cores are shared out between them")
    g.add_argument("--space", default=",".join(d.space), help=f"settings searched, from {', '.join(SPACE)}")
    g.add_argument("--max-epochs", type=int, default=d.max_epochs, help="epochs are searched in 1..this")
    g.add_argument("--no-prune", action="store_true", help="let every trial finish (no median pruning by validation)")


def cmd_eval(args) -> None:
    result = evaluate_run(args.run, _data_config(args) if args.data else None, device=args.device,
                          precision=args.precision, batch_size=args.batch_size)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for split, m in result["metrics"].items():
        auc = "n/a" if m["roc_auc"] is None else f"{m['roc_auc']:.4f}"
        print(f"{split:>5}: accuracy {100 * m['accuracy']:.2f} % ({m['n']} examples), loss {m['loss']:.4f}, "
              f"macro F1 {m['macro_f1']:.4f}" + (f", micro F1 {m['micro_f1']:.4f}" if m.get("multi_label") else "")
              + f", ROC-AUC {auc}")


def cmd_predict(args) -> None:
    if args.file and (args.texts or args.pair):
        raise UsageError("predict takes texts as arguments (or --pair) or with --file, not both")
    if args.out and not args.file:
        raise UsageError("--out writes the rows of --file; give --file")
    texts = _predict_inputs(args)
    reader = args.file and RowReader(args.file, args.text_col or _run_text_cols(args.run), header=not args.no_header,
                                     sep=args.sep, encoding=args.encoding)
    if args.explain:
        _print_explanations(args, texts or [t for chunk in reader.chunks() for t in chunk.texts])
        return
    if not args.file:
        _print_predictions(predict_texts(args.run, texts, device=args.device, precision=args.precision,
                                         batch_size=args.batch_size, threshold=args.threshold), args.json)
        return
    scorer = FileScorer(args.run, device=args.device, precision=args.precision, batch_size=args.batch_size,
                        threshold=args.threshold)
    if args.out:
        done = score_file(scorer, reader, args.out, progress=not args.quiet)
        print(f"{done.rows} texts scored in {done.seconds:.1f} s ({done.texts_per_s:.1f} texts/s), written to {args.out}")
        return
    for chunk, probs in scorer.chunks(reader):
        _print_predictions(labelled(scorer.loaded, chunk.texts, probs, scorer.thresholds), args.json)


def _predict_inputs(args) -> list:
    """predict's texts (arguments) or pairs of texts (--pair), checked against what the run classifies."""
    pair = saved_text_pair(args.run)
    if pair is not None and args.texts:
        raise UsageError(f"--run {args.run} classifies pairs of texts: give each as --pair FIRST SECOND, or --file "
                         f"with two text columns (its own: {','.join(pair.columns)})")
    if args.pair and args.texts:
        raise UsageError("predict takes single texts or --pair, not both")
    if not args.file and not args.texts and not args.pair:
        raise UsageError("predict needs texts: give them as arguments (pairs: --pair FIRST SECOND) or with --file")
    return [tuple(p) for p in args.pair] if args.pair else args.texts


def _run_text_cols(run: str) -> str | None:
    """A pair run's two training columns: --file's default --text-col."""
    pair = saved_text_pair(run)
    return ",".join(pair.columns) if pair is not None else None


def _print_predictions(rows: list[dict], as_json: bool) -> None:
    for row in rows:
        text = row["text"] + (f"\t{row['text_pair']}" if "text_pair" in row else "")
        if as_json:
            print(json.dumps(row))
        elif "labels" in row:  # multi-label: every label's probability
            scores = " ".join(f"{k}={v:.4f}" for k, v in row["probabilities"].items())
            print(f"{row['label'] or '(none)'}\t{scores}\t{text}")
        else:
            print(f"{row['label']}\t{row['probability']:.4f}\t{text}")


def _print_explanations(args, texts: list[str]) -> None:
    color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    for e in explain_texts(args.run, texts, target=args.target, method=args.explain_method, steps=args.explain_steps,
                           device=args.device, precision=args.precision, threshold=args.threshold):
        if args.json:
            print(json.dumps(e.to_dict()))
            continue
        print(f"{e.extra['predicted']}\t{e.extra['probability']:.4f}\t{e.text}")
        print(f"  attributions to {e.label}'s log-odds ({e.log_odds:+.3f}) by {e.method}")
        print(e.terminal(color))


def cmd_serve(args) -> None:
    serve(ServeConfig(runs=tuple(args.run), runs_dir=args.runs_dir, host=args.host, port=args.port,
                      max_batch_size=args.max_batch_size,
                      max_wait_ms=args.max_wait_ms, max_client_batch=args.max_client_batch,
                      max_input_tokens=args.max_input_tokens, max_concurrent=args.max_concurrent,
                      device=args.device, precision=args.precision,
                      api_key=args.api_key,
                      max_request_bytes=args.max_request_bytes))


def cmd_inspect(args) -> None:
    backbone = load_backbone(_backbone_spec(args), need_tokenizer=False)  # parameters only: no texts to encode
    model = backbone.module
    with seeded(args.seed):
        replaced = add_lora(backbone, _lora_config(args))
        print(model)
        print(f"\nLoRA injected into {len(replaced)} layers; every other parameter is frozen.\n")
        print(format_counts(count_parameters(model), "Parameters after LoRA injection and freezing"))
        old_head = getattr(model, "out_head", None)
        model.out_head = None  # the classification head takes the LM head's place
        clf = add_head(backbone, args.num_classes, head_bias=args.head_bias)
    before = old_head if old_head is not None else "none (the backbone was loaded without its LM head)"
    print(f"\nhead before: {before}\nhead after:  {clf.head}  (trainable)\n")
    print(format_counts(count_parameters(clf), f"Parameters with the {args.num_classes}-class head"))


def cmd_compare(args) -> None:
    print(compare_runs(args.runs, args.out_png))
    print(f"validation curves written to {args.out_png}")


def cmd_merge(args) -> None:
    out = Path(args.out)
    merge_run(args.run, out, overwrite=args.overwrite)
    print(f"merged classifier written to {out}/ (model.safetensors, {MERGED_CONFIG}); "
          f"use it like a run: lorafit predict --run {out} ...")


def cmd_export(args) -> None:
    if args.quantize and args.format != "onnx":
        raise UsageError(f"--quantize applies to --format onnx, not --format {args.format}")
    if args.format == "onnx":
        c = export_onnx(args.run, args.out, quantize=args.quantize, overwrite=args.overwrite)
        check = (f"ONNX Runtime {args.quantize or 'fp32'} gives lorafit's class on {100 * c.agreement:.1f} % of "
                 f"{c.n_texts} texts, logits within {c.max_diff:.1e}")
    elif args.format == "peft":
        diff = export_peft(args.run, args.out, overwrite=args.overwrite)
        check = ("transformers + PEFT not installed: not checked" if diff is None
                 else f"transformers + PEFT give lorafit's probabilities within {diff:.1e}")
    else:
        diff = export_hf(args.run, args.out, overwrite=args.overwrite)
        check = f"transformers gives lorafit's probabilities within {diff:.1e}"
    print(f"{args.format} export written to {args.out}/ ({check}); {args.out}/README.md shows how to load it")


def cmd_generate(args) -> None:
    if args.model.startswith("hf:"):
        raise UsageError("generate works with GPT-2 models (presets, folders, .pth), not hf: backbones")
    backbone = load_backbone(_backbone_spec(args))
    enc = backbone.encoder
    idx = torch.tensor([enc.encode([args.prompt])[0] or [enc.pad_id]])
    gen = torch.Generator().manual_seed(args.seed)
    out = generate(backbone.module, idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   eos_id=enc.pad_id, generator=gen)
    print(enc.decode(out[0].tolist()))


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], None]


COMMANDS = {
    "train": Command("fine-tune a classifier and write a run directory", _train_args, cmd_train),
    "tune": Command("search learning rate, rank, alpha, epochs, dropout and variant with Optuna; every trial a run",
                    _tune_args, cmd_tune),
    "eval": Command("re-evaluate a saved run (its own splits, or --data)", _eval_args, cmd_eval),
    "predict": Command("label texts with a saved run", _predict_args, cmd_predict),
    "serve": Command("serve runs over HTTP, many adapters on one base: text-embeddings-inference's /predict, "
                     "vLLM's /classify, metrics, a web page", _serve_args,
                     cmd_serve),
    "inspect": Command("print the model with LoRA injected and the parameter accounting", _inspect_args, cmd_inspect),
    "compare": Command("compare runs: a table of settings and results, their validation curves in one PNG",
                       _compare_args, cmd_compare),
    "merge": Command("fold a run's adapter into its base and save a plain classifier", _merge_args, cmd_merge),
    "export": Command("write a run for PEFT (an adapter), transformers' pipeline (a merged model) or ONNX Runtime",
                      _export_args, cmd_export),
    "generate": Command("continue a prompt with the language model (checks the weights)", _generate_args, cmd_generate),
}


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """lorafit's own warnings as one line each; other libraries' deprecation chatter stays out."""
    if "lorafit" in Path(filename).parts:
        print(f"lorafit: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv  # recorded in report.json, so a run can be repeated exactly
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = _show_warning
            COMMANDS[args.command].run(args)
    except LorafitError as e:
        if args.debug:
            raise
        message = e.render(flag) if isinstance(e, FieldError) else str(e)
        if isinstance(e, UsageError):
            parser.exit(2, f"lorafit {args.command}: error: {message}\n")
        print(f"lorafit: error: {message}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("lorafit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # whoever read the output stopped (`| head`): stop as other Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as e:  # a bug, not a user mistake: one line, and the way to see more
        if args.debug:
            raise
        print(f"lorafit: internal error: {type(e).__name__}: {e} (run with --debug for the traceback)", file=sys.stderr)
        return 1
    return 0


def entry() -> NoReturn:
    """The ``lorafit`` command and ``python -m lorafit``: :func:`main`'s code as the process's exit status.

    A torchrun worker ends with ``os._exit`` once its output is flushed, skipping interpreter shutdown. DDP
    keeps gloo's worker threads alive after ``destroy_process_group``; one that releases its last
    collective while the interpreter shuts down cannot take the GIL and aborts the process ("terminate
    called without an active exception", pytorch/pytorch#179291), and torchrun then reports a finished run
    as failed. Every file lorafit writes is closed (and renamed into place) before this point.
    """
    try:
        code = main()
    except SystemExit as e:  # argparse's usage errors (already printed)
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    if launched_by_torchrun():
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
