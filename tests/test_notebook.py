"""The course notebook runs top to bottom (on a tiny model and a few batches) and shows the seed's numbers."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "lora_spam_classifier.ipynb"


def outputs_text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", "") + out.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def test_notebook_runs_end_to_end_and_answers_q1_to_q5(tmp_path, hf_gpt2_dir, sms_file, monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), "store the notebook without outputs"
    assert "parameters" in nb.cells[2].metadata.get("tags", [])
    out = tmp_path / "nb-run"
    for name, value in {"MODEL": hf_gpt2_dir, "DATA": sms_file, "MAX_BATCHES": 3, "OUT": out}.items():
        monkeypatch.setenv(f"LORAFIT_NB_{name}", str(value))
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")
    NotebookClient(nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    text = outputs_text(nb)
    assert "LoRALinear" in text and "12 layers became LoRALinear" in text  # 6 linears x 2 blocks of the tiny model
    assert "out_head, untouched: Linear(in_features=32, out_features=300, bias=False)" in text
    for number in ("164,364,288", "1,327,104", "0.81%", "125,768,450", "1,328,642", "1.06%"):
        assert number in text, number
    assert "3 steps, 24 examples" in text and "training accuracy after 1 epoch(s)" in text
    assert "head before: Linear(in_features=32, out_features=300, bias=False)" in text
    assert "head after:  Linear(in_features=32, out_features=2, bias=True) (trainable)" in text
    assert "misclassified" in text
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 2  # the loss curve and the confusion matrix, inline
    written = {p.name for p in out.iterdir()}
    assert {"adapter.safetensors", "adapter.json", "loss.png", "confusion_matrix.png"} <= written
