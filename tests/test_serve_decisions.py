"""The server answers with the run's calibration and operating threshold (overridable per request), and
POST /explain gives the token attributions that ``lorafit predict --explain`` gives."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi", reason="lorafit[serve] is not installed")
pytest.importorskip("captum", reason="captum (lorafit[explain]) is in the test extra")

from fastapi.testclient import TestClient  # noqa: E402

from lorafit.inference.explain import explain_texts  # noqa: E402
from lorafit.inference.predict import predict_texts  # noqa: E402
from lorafit.serving.app import create_app  # noqa: E402
from lorafit.serving.config import ServeConfig  # noqa: E402
from lorafit.serving.model import ServedModel  # noqa: E402
from serve_fixtures import TEXTS, write_tiny_run  # noqa: E402


@pytest.fixture(scope="module")
def decided_run(tmp_path_factory):
    """The tiny run as calibration would leave it: a temperature and a threshold for "spam" in adapter.json."""
    run = write_tiny_run(tmp_path_factory.mktemp("serve-decisions"))
    spec = json.loads((run / "adapter.json").read_text())
    spec.update(temperature=1.7, thresholds={"spam": 0.25})
    (run / "adapter.json").write_text(json.dumps(spec))
    return run


@pytest.fixture(scope="module")
def client(decided_run):
    config = ServeConfig(runs=(str(decided_run),), device="cpu", precision="fp32")
    with TestClient(create_app(ServedModel.load(config), config)) as c:
        yield c


def test_predict_applies_the_temperature_and_the_threshold(client, decided_run):
    reference = predict_texts(decided_run, TEXTS, device="cpu", precision="fp32")
    assert any(r["label"] == "spam" and r["probability"] < max(r["probabilities"].values()) for r in reference), \
        "the threshold should decide at least one text against the most probable class"
    answers = client.post("/predict", json={"inputs": TEXTS}).json()
    for answer, r in zip(answers, reference):
        assert answer[0]["label"] == r["label"]  # the decided class first
        assert {a["label"]: a["score"] for a in answer} == pytest.approx(r["probabilities"], abs=1e-5)
    info = client.get("/info").json()
    assert info["temperature"] == 1.7 and info["thresholds"] == {"spam": 0.25}


def test_a_request_overrides_the_threshold(client, decided_run):
    everything = client.post("/predict", json={"inputs": TEXTS, "threshold": 0.0}).json()
    assert {a[0]["label"] for a in everything} == {"spam"}
    plain = predict_texts(decided_run, TEXTS, device="cpu", precision="fp32", threshold={"spam": 1.0})
    answers = client.post("/predict", json={"inputs": TEXTS, "threshold": {"spam": 1.0}}).json()
    assert [a[0]["label"] for a in answers] == [r["label"] for r in plain]
    for body, words in (({"threshold": 1.5}, "in [0, 1]"), ({"threshold": "high"}, "must be a number"),
                        ({"threshold": {"eggs": 0.5}}, "'eggs': not one of the labels")):
        r = client.post("/predict", json={"inputs": "hello", **body})
        assert r.status_code == 422 and words in r.json()["error"]


def test_explain_gives_the_attributions_predict_explain_gives(client, decided_run):
    for method in ("occlusion", "ig"):
        ours = explain_texts(decided_run, TEXTS[:2], method=method, device="cpu", precision="fp32")
        served = client.post("/explain", json={"inputs": TEXTS[:2], "method": method}).json()
        for e, s in zip(ours, served):
            assert s["label"] == s["predicted"] == e.label and s["method"].split(";")[0] == e.method.split(";")[0]
            assert [t["token"] for t in s["tokens"]] == e.tokens
            assert [t["attribution"] for t in s["tokens"]] == pytest.approx(e.attributions, abs=1e-4)
    one = client.post("/explain", json={"inputs": TEXTS[0], "target": "unsure"}).json()
    assert one["label"] == "unsure" and one["method"].startswith("occlusion")  # auto: cheaper on a short text
    r = client.post("/explain", json={"inputs": TEXTS[0], "method": "magic"})
    assert r.status_code == 422 and "method must be one of auto, ig, occlusion" in r.json()["error"]
