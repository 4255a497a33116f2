"""A newcomer's first commands: --version, defaults in --help, inspect without a tokenizer, data files in
another encoding or without a header row."""

from __future__ import annotations

import json

import pytest

import lorafit
from lorafit.cli import build_parser, main, train_configs

from conftest import train_args


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"lorafit {lorafit.__version__}"


def test_train_without_flags_asks_for_the_python_apis_defaults():
    """The CLI's defaults (shown by --help) are the configs' own: a default changed in one place changes both."""
    from lorafit import BackboneSpec, ClassifierSpec, DataConfig, LoRAConfig, RunSettings, TrainConfig

    spec, data_cfg, train_cfg, settings = train_configs(build_parser().parse_args(["train"]))
    assert (spec, data_cfg, train_cfg, settings) == (ClassifierSpec(BackboneSpec(), LoRAConfig()), DataConfig(),
                                                     TrainConfig(), RunSettings())
    text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert f"(default: {TrainConfig().batch_size})" in text


def test_inspect_needs_no_tokenizer(capsys):
    """gpt2-small's shape with fresh weights: the parameter table needs no BPE files and no download."""
    assert main(["inspect", "--model", "gpt2-small", "--random-init"]) == 0
    out = capsys.readouterr().out
    assert "1,327,104" in out and "1,328,642" in out


def test_cp1252_data_with_encoding_flag(tmp_path, capsys, hf_gpt2_dir, sms_file):
    latin = tmp_path / "latin.tsv"
    latin.write_bytes(sms_file.read_text().replace("lunch", "caf\u00e9").encode("cp1252"))
    out = tmp_path / "run"
    assert main(train_args(hf_gpt2_dir, latin, out, "--epochs", "1")) == 1
    assert "--encoding cp1252" in capsys.readouterr().err
    assert main(train_args(hf_gpt2_dir, latin, out, "--epochs", "1", "--encoding", "cp1252")) == 0
    assert "caf\u00e9" in (out / "train.csv").read_text(encoding="utf-8") + (out / "test.csv").read_text(encoding="utf-8")


def test_headerless_csv_with_column_numbers(tmp_path, capsys, hf_gpt2_dir, sms_file):
    rows = [line.split("\t") for line in sms_file.read_text().splitlines()]
    csv = tmp_path / "spam.csv"
    csv.write_text("".join(f'"{text}",{label}\n' for label, text in rows))  # text first, label second, no header
    out = tmp_path / "run"
    assert main(train_args(hf_gpt2_dir, csv, out, "--epochs", "1", "--no-header", "--text-col", "0",
                           "--label-col", "1")) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["labels"] == ["ham", "spam"] and sum(report["data"]["sizes"].values()) == len(rows)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # a usage error: argparse's exit code
        main(train_args(hf_gpt2_dir, csv, tmp_path / "bad", "--no-header", "--text-col", "message"))
    assert e.value.code == 2 and "take column numbers (from 0), got 'message'" in capsys.readouterr().err
