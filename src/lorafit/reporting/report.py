"""report.json (everything, machine-readable) and report.md (the same, for people)."""

from __future__ import annotations

import functools
import platform
import sys
from importlib import metadata

from ..runtime import Compute, peak_memory_mb


@functools.cache
def library_versions() -> dict:
    """Python, platform and package versions; read once a process (GET /info asks on every request)."""
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in ("lorafit", "torch", "tiktoken", "safetensors", "numpy", "pandas", "transformers"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def build_report(*, name: str, command: str, spec: dict, train: dict, data: dict, parameters: dict, metrics: dict,
                 history, compute: Compute, eval_examples_per_s: float, wall_seconds: float,
                 resumed: bool = False, distributed: dict | None = None, extra: dict | None = None) -> dict:
    """report.json's content: what was trained, on what, how well, how fast, and how to repeat it.
    ``extra``: further top-level entries (calibration, operating_point, most_wrong)."""
    report = {
        "name": name,
        "command": command,
        "model": spec,
        "train": train,
        "data": data,
        "parameters": parameters,
        "metrics": metrics,
        "best_epoch": history.best["epoch"],
        "epochs": history.epochs,
        "speed": {
            "device": str(compute.device), "precision": "bf16 autocast" if compute.autocast_dtype else "fp32",
            "train_seconds": history.train_seconds,
            "train_examples_per_s": history.train_examples / history.train_seconds,
            "train_tokens_per_s": history.train_tokens / history.train_seconds,
            "eval_examples_per_s": eval_examples_per_s,
            "wall_seconds": wall_seconds,
            **peak_memory_mb(compute.device),
        },
        "versions": library_versions(),
        **(extra or {}),
    }
    if resumed:
        report["resumed"] = True
    if distributed:  # torchrun: world size, backend, batch per process
        report["distributed"] = {**distributed, "per_rank_batch": train["batch_size"], "global_batch":
                                 train["batch_size"] * distributed["world_size"] * train["grad_accum"]}
    return report


def percent(x: float | None) -> str:
    """0.9833 -> "98.33 %"; None (a split the run did not have) -> "n/a"."""
    return "n/a" if x is None else f"{100 * x:.2f} %"


def _variant(lora: dict, train: dict) -> str:
    """"LoRA", or what was changed: "DoRA", "LoRA (rsLoRA scaling, pissa init, LoRA+ ratio 16)"..."""
    extra = (["rsLoRA scaling"] if lora.get("use_rslora") else []) + (
        [f"{lora['init']} init"] if lora.get("init", "default") != "default" else []) + (
        [f"LoRA+ ratio {train['lora_plus_ratio']:g}"] if train.get("lora_plus_ratio") else [])
    name = "DoRA" if lora.get("use_dora") else "LoRA"
    return f"{name} ({', '.join(extra)})" if extra else name


def render_markdown(r: dict) -> str:
    """report.md: the same facts as report.json, as tables a person reads."""
    return "\n".join([*_summary(r), *_parameters(r["parameters"]), *_accuracy(r["metrics"]),
                      *_test_details(r["metrics"].get("test")), *_calibration(r.get("calibration")),
                      *_operating_point(r.get("operating_point")), *_most_wrong(r.get("most_wrong")), *_speed(r["speed"]), *_distributed(r.get("distributed")),
                      *_reproduce(r), ""])


def _summary(r: dict) -> list[str]:
    lora, backbone = r["model"]["lora"], r["model"]["backbone"]
    return [
        f"# lorafit run: {r['name']}",
        "",
        f"Base model `{backbone['model']}`" + (" (random init)" if backbone["random_init"] else "")
        + f", {_variant(lora, r['train'])} rank {lora['rank']}, alpha {lora['alpha']:g}, "
        f"targets {', '.join(lora['targets'])}, "
        f"{len(r['model']['labels'])} classes ({', '.join(r['model']['labels'])}).",
        *_balancing(r["data"].get("balancing")),
        *_long_texts(r["data"]),
        *_pairs(r["model"].get("text_pair")),
    ]


def _pairs(pair: dict | None) -> list[str]:
    """One line for a classifier of text pairs: its columns and how the base joins them."""
    if not pair:
        return []
    join = f"first, {pair['sep']}, second" if pair.get("join") == "sep" else "the tokenizer's own pair template"
    return ["", f"Pairs of texts: columns {' and '.join(pair['columns'])}, read as one sequence ({join})."]


def _long_texts(data: dict) -> list[str]:
    """One line on texts longer than the window: how many were chunked into how many windows, or truncated."""
    long, truncated = data.get("long") or {}, sum((data.get("truncated_texts") or {}).values())
    if long.get("long") == "chunk":
        texts, chunked, windows = (sum(long[k].values()) for k in ("texts", "chunked_texts", "windows"))
        return ["", f"Long texts: {chunked:,} of {texts:,} texts longer than the {long['window']}-token window were "
                    f"chunked (stride {long['stride']}); {texts:,} texts ran as {windows:,} windows, each text's "
                    f"window logits {long['pool']}-pooled."]
    if truncated:
        return ["", f"Long texts: {truncated:,} longer than the window were truncated to its length; `--long chunk` "
                    "would keep them whole, as pooled windows."]
    return []


def _balancing(b: dict | None) -> list[str]:
    """One line saying what balancing did to the data."""
    if not b:
        return []
    if b["method"] == "undersample":
        how = (f"every class under-sampled to the rarest one's count: {b['kept']:,} of {b['texts']:,} texts kept "
               f"({100 * (b['texts'] - b['kept']) / b['texts']:.0f} % dropped)")
    elif b["method"] == "weights":
        how = f"all {b['texts']:,} texts kept, the loss weighted by inverse class frequency"
    else:
        how = f"none: all {b['texts']:,} texts kept" + (f" ({b['note']})" if b.get("note") else "")
    counts = b.get("class_counts")
    return ["", f"Balancing: {how}" + (f"; classes read: {', '.join(f'{k} {v:,}' for k, v in counts.items())}."
                                        if counts else ".")]


def _parameters(p: dict) -> list[str]:
    return [
        "", "## Parameters", "", "| group | parameters |", "|---|---:|",
        f"| LoRA A | {p['lora_A']:,} |",
        f"| LoRA B | {p['lora_B']:,} |",
        *([f"| DoRA magnitude | {p['dora_magnitude']:,} |"] if p.get("dora_magnitude") else []),
        f"| head | {p['head_and_other_trainable']:,} |",
        f"| frozen base | {p['frozen']:,} |",
        f"| **total** | **{p['total']:,}** |",
        f"| **trainable** | **{p['trainable']:,} ({p['percent_trainable']:.2f} %)** |",
    ]


def _accuracy(metrics: dict) -> list[str]:
    multi = any(m.get("multi_label") for m in metrics.values())
    lines = ["", "## Accuracy", ""]
    if multi:
        lines += ["Multi-label: accuracy is subset accuracy (every label of a text right), each label decided at "
                  "its threshold (chosen on validation: best F1); loss is the mean binary cross-entropy.", ""]
    lines += ["| split | examples | accuracy | loss | macro F1 |" + (" micro F1 | Hamming loss |" if multi else "")
              + " ROC-AUC |", "|---|---:|---:|---:|---:|" + ("---:|---:|" if multi else "") + "---:|"]
    for split, m in metrics.items():
        auc = "n/a" if m["roc_auc"] is None else f"{m['roc_auc']:.4f}"
        extra = f" {m['micro_f1']:.4f} | {m['hamming_loss']:.4f} |" if multi else ""
        lines.append(f"| {split} | {m['n']} | {percent(m['accuracy'])} | {m['loss']:.4f} | {m['macro_f1']:.4f} |"
                     f"{extra} {auc} |")
    return lines


def _test_details(test: dict | None) -> list[str]:
    if not test:
        return []
    if test.get("multi_label"):
        lines = ["", "## Test set, per label", "",
                 "| label | threshold | precision | recall | F1 | support | predicted |", "|---|---:|---:|---:|---:|---:|---:|"]
        return lines + [f"| {name} | {c['threshold']:.3f} | {c['precision']:.4f} | {c['recall']:.4f} | {c['f1']:.4f} "
                        f"| {c['support']} | {c['predicted']} |" for name, c in test["per_class"].items()]
    labels = list(test["per_class"])
    lines = ["", "## Test set, per class", "", "| class | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
    for name, c in test["per_class"].items():
        lines.append(f"| {name} | {c['precision']:.4f} | {c['recall']:.4f} | {c['f1']:.4f} | {c['support']} |")
    lines += ["", "Confusion matrix (rows: true, columns: predicted)", "",
              "| | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for name, row in zip(labels, test["confusion_matrix"]):
        lines.append(f"| **{name}** | " + " | ".join(str(v) for v in row) + " |")
    return lines


def _calibration(c: dict | None) -> list[str]:
    if not c:
        return []
    how = (f"Temperature scaling: logits divided by T = {c['temperature']:.4g}, fitted on the validation split "
           "(predict, eval and serve apply it)." if c["method"] == "temperature scaling" else
           "Not calibrated (--no-calibrate)." if c["method"] == "none" else f"Not calibrated ({c['method']}).")
    lines = ["", "## Calibration", "", how, "",
             f"| split | NLL before | NLL after | ECE before | ECE after ({c['bins']} bins) |", "|---|---:|---:|---:|---:|"]
    for split, m in c["splits"].items():
        lines.append(f"| {split} | {m['nll_before']:.4f} | {m['nll_after']:.4f} | {percent(m['ece_before'])} | "
                     f"{percent(m['ece_after'])} |")
    return lines + ["", "![reliability diagram](reliability.png)"]


def _operating_point(p: dict | None) -> list[str]:
    if not p:
        return ["", "![precision-recall curve](pr_curve.png) ![ROC curve](roc_curve.png)"]
    reached = "reached" if p["reached_on_val"] else "NOT reached: the threshold of best precision instead"
    lines = ["", "## Operating threshold", "",
             f"`{p['class']}` when P({p['class']}) >= {p['threshold']:.4g}, picked on the validation split for "
             f"{p['target']} >= {p['value']:g} ({reached}); predict and serve apply it.", "",
             "| split | precision | recall | false positives | false negatives |", "|---|---:|---:|---:|---:|"]
    for split in ("train", "val", "test"):
        if split in p:
            m = p[split]
            lines.append(f"| {split} | {percent(m['precision'])} | {percent(m['recall'])} | {m['false_positives']} | "
                         f"{m['false_negatives']} |")
    return lines + ["", "![precision-recall curve](pr_curve.png) ![ROC curve](roc_curve.png)"]


def _most_wrong(rows: list[dict] | None) -> list[str]:
    if rows is None:
        return []
    if not rows:
        return ["", "## The test messages the model got most wrong", "", "None: every test message was decided right."]
    methods = sorted({r["method"] for r in rows})
    lines = ["", "## The test messages the model got most wrong", "",
             f"Top tokens: attribution to the predicted class ({'; '.join(methods)}).", "",
             "| true | predicted | P(true) | top tokens | text |", "|---|---|---:|---|---|"]
    for r in rows:
        tokens = ", ".join(f"`{t['token'].strip() or repr(t['token'])}` {t['attribution']:+.2f}" for t in r["top_tokens"])
        text = r["text"].replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {r['label']} | {r['predicted']} | {r['p_true']:.3f} | {tokens} | "
                     f"{text[:120] + ('…' if len(text) > 120 else '')} |")
    return lines


def _speed(s: dict) -> list[str]:
    return [
        "", "## Speed and memory", "",
        f"- training: {s['train_seconds']:.1f} s, {s['train_examples_per_s']:.2f} examples/s, "
        f"{s['train_tokens_per_s']:.0f} tokens/s ({s['device']}, {s['precision']})",
        f"- evaluation (merged weights): {s['eval_examples_per_s']:.2f} examples/s",
        f"- wall time: {s['wall_seconds']:.1f} s; peak memory: {s['peak_rss_mb']:.0f} MiB RSS"
        + (f", {s['peak_gpu_mb']:.0f} MiB GPU" if "peak_gpu_mb" in s else ""),
    ]


def _distributed(d: dict | None) -> list[str]:
    if not d:
        return []
    return [f"- torchrun: {d['world_size']} processes ({d['backend']}), {d['per_rank_batch']} texts per process "
            f"per batch, global batch {d['global_batch']}; memory is rank 0's"]


def _reproduce(r: dict) -> list[str]:
    return [
        "", "## Reproduce", "", f"```\n{r['command']}\n```", "",
        f"Seed {r['train']['seed']}; best adapter from epoch {r['best_epoch']}; "
        + ", ".join(f"{k} {v}" for k, v in r["versions"].items()),
        "", "![loss](loss.png) ![accuracy](accuracy.png)"
        + ("" if r["model"].get("problem_type") == "multi_label_classification"
           else " ![confusion matrix](confusion_matrix.png)"),
    ]
