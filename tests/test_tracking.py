"""Experiment tracking and run comparison: what each --logger wrote, read back with the tracker's own
reader, equals metrics.jsonl; lorafit compare tabulates and draws real runs."""

from __future__ import annotations

import csv
import importlib.util
import json
import math

import pytest
import torch

from conftest import TINY, train_args, write_bpe, write_sms_like
from lorafit.backbones.gpt2 import GPTConfig, GPTModel
from lorafit.cli import main


def tiny_train(tmp, out, *extra):
    """A tiny GPT-2 as a book-style .pth with its BPE, trained through the CLI (4 epochs of 7 steps)."""
    if not (tmp / "tiny.pth").exists():
        torch.manual_seed(3)
        torch.save(GPTModel(GPTConfig(**TINY)).state_dict(), tmp / "tiny.pth")
        write_bpe(tmp / "bpe")
        write_sms_like(tmp / "sms.txt", n=80)
    assert main(train_args(tmp / "tiny.pth", tmp / "sms.txt", out, "--n-heads", "4", "--tokenizer", str(tmp / "bpe"),
                           "--eval-batches", "1", *extra)) == 0
    return out


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """One run feeding every tracker (module-wide: MLflow's import alone takes seconds)."""
    tmp = tmp_path_factory.mktemp("tracked")
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    run = tiny_train(tmp, tmp / "run", "--logger", "csv,tensorboard", "--logger", "mlflow",
                     "--mlflow-uri", str(tmp / "mlruns"))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return tmp, run, records


def expected(records, event, key):
    return [(r["step"], r[key]) for r in records if r["event"] == event and r.get(key) is not None]


def examples_per_s(records):
    return [(r["step"], r["examples_seen"] / r["seconds"]) for r in records if r["event"] == "epoch"]


def test_csv_logger_has_every_record_of_metrics_jsonl(tracked):
    _, run, records = tracked
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(records) and {r["event"] for r in rows} == {"train", "eval", "epoch"}
    for row, rec in zip(rows, records):
        for key, value in rec.items():
            if isinstance(value, str):
                assert row[key] == value
            elif value is None:
                assert row[key] == ""
            else:
                assert float(row[key]) == value  # repr round trip: exact


def test_tensorboard_events_equal_metrics_jsonl(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    _, run, records = tracked
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    for tag, want in [("train/loss", expected(records, "train", "loss")),
                      ("train/lr", expected(records, "train", "lr")),
                      ("eval/val_accuracy", expected(records, "eval", "val_accuracy")),
                      ("epoch/val_accuracy", expected(records, "epoch", "val_accuracy")),
                      ("epoch/val_loss", expected(records, "epoch", "val_loss")),
                      ("epoch/examples_per_s", examples_per_s(records))]:
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in want], tag
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6), tag  # stored as float32
    content = acc.PluginTagToContent("hparams")
    start = HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info.hparams
    assert start["lora.rank"].number_value == 8 and start["train.lr"].number_value == pytest.approx(3e-3)
    assert start["precision"].string_value == "fp32" and start["lora.targets"].string_value == "all"


def test_mlflow_run_equals_metrics_jsonl(tracked, monkeypatch):
    from mlflow.tracking import MlflowClient

    tmp, run, records = tracked
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(tmp / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("lorafit")
    (mlrun,) = client.search_runs([experiment.experiment_id])
    assert mlrun.info.status == "FINISHED" and mlrun.info.run_name == "run"
    assert mlrun.data.params["lora.rank"] == "8" and mlrun.data.params["train.epochs"] == "4"
    for key, want in [("train/loss", expected(records, "train", "loss")),
                      ("eval/val_loss", expected(records, "eval", "val_loss")),
                      ("epoch/val_accuracy", expected(records, "epoch", "val_accuracy")),
                      ("epoch/examples_per_s", examples_per_s(records))]:
        got = sorted((m.step, m.value) for m in client.get_metric_history(mlrun.info.run_id, key))
        assert got == want, key


def test_compare_prints_the_table_and_draws_the_curves(tracked, capsys):
    tmp, run, _ = tracked
    other = tiny_train(tmp, tmp / "rank-2", "--rank", "2", "--alpha", "4")
    png = tmp / "cmp" / "curves.png"
    capsys.readouterr()
    assert main(["compare", str(run), str(other), "--out-png", str(png)]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:8] == ["run", "rank", "alpha", "lr", "epochs", "precision", "val acc", "test acc"]
    rows = {cells[0]: cells for cells in ([c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:4])}
    for path, rank, alpha in ((run, "8", "16"), (other, "2", "4")):
        report = json.loads((path / "report.json").read_text())
        row = rows[str(path)]
        assert row[1:6] == [rank, alpha, "0.003", "4", "fp32"]
        assert row[7] == f"{100 * report['metrics']['test']['accuracy']:.2f} %"
        assert row[8] == f"{report['metrics']['test']['macro_f1']:.4f}"
        assert math.isclose(float(row[9]), report["speed"]["train_seconds"] / 4, abs_tol=0.05)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("make, message", [
    (lambda d: None, "not found"),
    (lambda d: d.mkdir(), "not a finished lorafit run (no report.json"),
    (lambda d: (d.mkdir(), (d / "report.json").write_text('{"name": "x"}')), "not a lorafit run report"),
])
def test_compare_refuses_what_is_not_a_run_in_one_line(tmp_path, capsys, make, message):
    make(tmp_path / "r")
    assert main(["compare", str(tmp_path / "r"), "--out-png", str(tmp_path / "c.png")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"lorafit: error: {tmp_path / 'r'}") and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "c.png").exists()


def test_unknown_logger_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--logger", "csv,wandb", "--out", str(tmp_path / "x"), "--data", str(tmp_path / "none")])
    assert e.value.code == 2
    assert "--logger must be csv, tensorboard, mlflow (or a comma list), got wandb" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_trackers_after_a_resume_hold_the_checkpoints_records_then_the_replayed_ones(tmp_path):
    """The steps after a checkpoint run again on resume: each tracker must show them once, with the new values."""
    from lorafit.reporting.loggers import LoggerConfig, open_loggers

    def rec(step, loss):
        return {"event": "train", "step": step, "epoch": step / 10, "examples_seen": 8 * step, "loss": loss, "lr": 1e-3}

    first = [rec(s, 1.0 + s) for s in range(1, 6)]  # the interrupted run logged steps 1-5
    kept, replayed = first[:3], [rec(4, 0.25), rec(5, 0.5)]  # its checkpoint was at step 3
    names = ("csv", "tensorboard") if importlib.util.find_spec("tensorboard") else ("csv",)
    for kept_records, records in ((None, first), (kept, replayed)):
        with open_loggers(LoggerConfig(names), tmp_path, {}, kept=kept_records) as log:
            for r in records:
                log(r)
    want = [(r["step"], r["loss"]) for r in kept + replayed]
    with open(tmp_path / "metrics.csv", newline="") as f:
        assert [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)] == want
    if "tensorboard" in names:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(tmp_path / "tensorboard"))
        acc.Reload()
        got = acc.Scalars("train/loss")
        assert [e.step for e in got] == [s for s, _ in want]
        assert [e.value for e in got] == pytest.approx([v for _, v in want])  # stored as float32
    with open_loggers(LoggerConfig(("csv",)), tmp_path, {}) as log:  # a new run (--overwrite) starts afresh
        log(rec(1, 3.0))
    assert (tmp_path / "metrics.csv").read_text().splitlines()[1:] == ["train,1,0.1,8,3.0,0.001,,,,"]
