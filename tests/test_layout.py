"""The package's shape, checked: layers point down only, functions stay short, optional extras are the only
imports inside functions, and README's Python API example runs as written."""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

import pytest

import lorafit
from lorafit.backbones.weights import HUB_FILES, HUB_REPOS

from conftest import write_sms_like

ROOT = Path(__file__).resolve().parents[1]
SRC = Path(lorafit.__file__).parent
# Imported inside functions on purpose: optional extras, loaded only by the command that needs them.
OPTIONAL = {"transformers", "peft", "tensorflow", "fastapi", "uvicorn", "prometheus_client", "datasets", "pyarrow",
            "mlflow", "torch.utils.tensorboard", "tensorboard", "selenium", "onnx", "onnxruntime", "captum", "optuna",
            "tokenizers"}  # tokenizers: transformers' own dependency


def test_layers_point_down_only():
    importlinter = pytest.importorskip("importlinter.cli", reason="import-linter is in the test extra")
    assert importlinter.lint_imports(config_filename=str(ROOT / "pyproject.toml")) == 0


def _functions():
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path.relative_to(SRC), node


def test_functions_are_short():
    long = [f"{path}:{fn.name} ({fn.end_lineno - fn.lineno + 1} lines)" for path, fn in _functions()
            if fn.end_lineno - fn.lineno + 1 > 60]
    assert not long, long


def test_only_optional_extras_are_imported_inside_functions():
    inner = []
    for path, fn in _functions():
        for node in ast.walk(fn):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            else:
                continue
            inner += [f"{path}:{fn.name} imports {n}" for n in names
                      if not any(n == m or n.startswith(m + ".") for m in OPTIONAL)]
    assert not inner, inner


def test_readme_api_example_runs_as_written(tmp_path, monkeypatch, hf_gpt2_dir):
    """The example downloads gpt2-small and reads SMSSpamCollection: a tiny GPT-2 sits in the (offline) hub
    cache under OpenAI's repo name, and a tiny SMS-format file in the working directory."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## The Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    repo = tmp_path / "hf-home" / "hub" / f"models--{HUB_REPOS['gpt2-small'].replace('/', '--')}"
    commit = "0" * 40
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for name in HUB_FILES:
        shutil.copyfile(hf_gpt2_dir / name, repo / "snapshots" / commit / name)
    write_sms_like(tmp_path / "SMSSpamCollection")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert {p.name for p in (tmp_path / "runs" / "notebook").iterdir()} == {"adapter.safetensors", "adapter.json"}


def test_importing_lorafit_has_no_side_effects():
    """``import lorafit`` loads neither pandas nor matplotlib and sets no environment variable; every name
    of its API then resolves."""
    import subprocess
    import sys

    code = ("import os, sys; before = dict(os.environ); import lorafit; "
            "print(sorted(m for m in ('pandas', 'matplotlib') if m in sys.modules), dict(os.environ) == before); "
            "print(all(getattr(lorafit, n) is not None for n in lorafit.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:2] == ["[] True", "True"]


def test_building_a_classifier_leaves_the_global_generator_alone(hf_gpt2_dir):
    """LoRA and the head start from the seed's values, drawn without reseeding what the caller draws next."""
    import torch

    from lorafit import BackboneSpec, ClassifierSpec, LoRAConfig, build_classifier

    spec = ClassifierSpec(BackboneSpec(str(hf_gpt2_dir)), LoRAConfig(rank=2))
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    a, _, _ = build_classifier(spec, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(999)
    b, _, _ = build_classifier(spec, seed=7)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_no_undefined_or_unused_names():
    """pyflakes' checks (ruff's F rules) over the package, benchmarks, examples and tests: a name used and
    never imported breaks a benchmark nobody runs in CI (smollm2_export.py lost RunSettings that way)."""
    import subprocess
    import sys

    pytest.importorskip("ruff", reason="ruff is in the test extra")
    found = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--select", "F", "--output-format",
                            "concise", "src", "benchmarks", "examples", "tests"], cwd=ROOT, capture_output=True,
                           text=True)
    assert found.returncode == 0, found.stdout + found.stderr
