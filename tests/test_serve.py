"""`lorafit serve` in process: the /predict schema (text-embeddings-inference's), batching that changes
no probability, every refusal and fault followed by a good answer, metrics, the API key and the body cap."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("fastapi", reason="lorafit[serve] is not installed")
pytest.importorskip("prometheus_client", reason="lorafit[serve] is not installed")
from fastapi.testclient import TestClient  # noqa: E402

from lorafit import cli  # noqa: E402
from lorafit.inference.predict import predict_texts  # noqa: E402
from lorafit.serving import security  # noqa: E402
from lorafit.serving.app import create_app  # noqa: E402
from lorafit.serving.config import ServeConfig  # noqa: E402
from lorafit.serving.model import ServedModel  # noqa: E402
from serve_fixtures import TEXTS, held_batches, write_tiny_run  # noqa: E402


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return write_tiny_run(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def reference(run_dir):
    """What `lorafit predict` says for TEXTS: {text: {label: probability}}."""
    return {r["text"]: r["probabilities"] for r in predict_texts(run_dir, TEXTS, device="cpu", precision="fp32")}


def make_client(run_dir, **settings) -> TestClient:
    config = ServeConfig(runs=(str(run_dir),), device="cpu", precision="fp32", **settings)
    return TestClient(create_app(ServedModel.load(config), config))


@pytest.fixture(scope="module")
def client(run_dir):
    with make_client(run_dir, max_wait_ms=20, max_client_batch=8, max_input_tokens=60) as c:
        yield c


def as_dict(predictions: list[dict]) -> dict:
    return {p["label"]: p["score"] for p in predictions}


def assert_matches(predictions: list[dict], expected: dict) -> None:
    assert [p["score"] for p in predictions] == sorted((p["score"] for p in predictions), reverse=True)
    got = as_dict(predictions)
    assert got.keys() == expected.keys()
    for label, p in expected.items():
        assert got[label] == pytest.approx(p, abs=1e-6)


def test_one_string_gives_every_class_highest_first_equal_to_predict(client, reference):
    text = TEXTS[0]
    r = client.post("/predict", json={"inputs": text})
    assert r.status_code == 200
    assert_matches(r.json(), reference[text])


def test_a_list_gives_one_list_per_input_in_order(client, reference):
    r = client.post("/predict", json={"inputs": TEXTS[:5], "truncate": False, "raw_scores": False})
    assert r.status_code == 200 and len(r.json()) == 5
    for text, predictions in zip(TEXTS, r.json()):
        assert_matches(predictions, reference[text])


def test_raw_scores_are_the_logits(client, reference):
    r = client.post("/predict", json={"inputs": [TEXTS[1]], "raw_scores": True, "some_other_client_field": 1})
    logits = as_dict(r.json()[0])
    labels = list(reference[TEXTS[1]])
    probs = torch.softmax(torch.tensor([logits[k] for k in labels]), dim=0).tolist()
    assert probs == pytest.approx([reference[TEXTS[1]][k] for k in labels], abs=1e-6)


def test_concurrent_requests_are_batched_and_no_probability_depends_on_companions(client, reference):
    """200 requests from 16 threads, single texts and lists mixed: each answer equals `lorafit predict`'s
    for its own texts, and the worker ran them in batches of several requests."""
    before = batches_run(client)

    def one(i: int):
        texts = TEXTS[i % 6] if i % 3 else [TEXTS[i % 6], TEXTS[(i + 1) % 6]]
        return texts, client.post("/predict", json={"inputs": texts})

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(200)))
    for texts, r in results:
        assert r.status_code == 200, r.text
        if isinstance(texts, str):
            assert_matches(r.json(), reference[texts])
        else:
            for t, predictions in zip(texts, r.json()):
                assert_matches(predictions, reference[t])
    assert batches_run(client) - before < 200  # some requests shared a batch


def batches_run(client) -> float:
    return metric(client, "lorafit_batch_size_count")


def metric(client, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


@pytest.mark.parametrize("body,status,words", [
    (b"{not json", 422, "not valid JSON"),
    (b"[1, 2]", 422, "JSON object"),
    (b"{}", 422, "missing field \"inputs\""),
    (b'{"inputs": 3}', 422, "string or a list of strings, got int"),
    (b'{"inputs": []}', 422, "empty list"),
    (b'{"inputs": ""}', 422, "inputs is an empty string"),
    (b'{"inputs": ["ok", "  "]}', 422, "inputs[1] is an empty string"),
    (b'{"inputs": ["ok", 7]}', 422, "inputs[1] must be a string"),
    (b'{"inputs": "ok", "truncate": "yes"}', 422, "truncate must be true or false"),
    (b'{"inputs": "ok", "truncation_direction": "up"}', 422, "truncation_direction"),
    (json.dumps({"inputs": ["hi"] * 9}).encode(), 413, "more than the limit of 8 (--max-client-batch)"),
    (json.dumps({"inputs": ["x" * 70]}).encode(), 413, "inputs[0] has 70 tokens, more than the limit of 60"),
])
def test_bad_requests_get_one_line_and_the_server_answers_the_next(client, reference, body, status, words):
    r = client.post("/predict", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status
    error = r.json()
    assert words in error["error"] and "\n" not in error["error"] and error["error_type"] == "Validation"
    assert_matches(client.post("/predict", json={"inputs": TEXTS[2]}).json(), reference[TEXTS[2]])


def test_truncate_keeps_the_first_or_the_last_tokens(client, run_dir):
    long = "hello " * 30
    ids = ServedModel.load(ServeConfig(runs=(str(run_dir),), device="cpu", precision="fp32")).encoder.encode([long])[0]
    assert len(ids) > 60
    for direction, kept in (("right", ids[:60]), ("left", ids[-60:])):
        r = client.post("/predict", json={"inputs": long, "truncate": True, "truncation_direction": direction})
        assert r.status_code == 200
        same = client.post("/predict", json={"inputs": client_decode(run_dir, kept)})
        assert as_dict(r.json()) == pytest.approx(as_dict(same.json()), abs=1e-6)


def client_decode(run_dir, ids: list[int]) -> str:
    served = ServedModel.load(ServeConfig(runs=(str(run_dir),), device="cpu", precision="fp32"))
    text = served.encoder.decode(ids)
    assert served.encoder.encode([text])[0] == ids
    return text


def test_a_full_queue_gets_429_and_the_next_request_is_answered(run_dir, reference):
    with make_client(run_dir, max_concurrent=1, max_wait_ms=0) as c:
        with held_batches(c.app.state.batcher) as (gate, entered), ThreadPoolExecutor(1) as pool:
            first = pool.submit(c.post, "/predict", json={"inputs": TEXTS[0]})
            assert entered.wait(10)
            r = c.post("/predict", json={"inputs": TEXTS[1]})
            assert r.status_code == 429 and r.json()["error_type"] == "Overloaded"
            assert "--max-concurrent 1" in r.json()["error"]
            gate.set()
            assert_matches(first.result(10).json(), reference[TEXTS[0]])
        assert_matches(c.post("/predict", json={"inputs": TEXTS[1]}).json(), reference[TEXTS[1]])


def test_an_internal_failure_is_500_without_traceback_logged_on_the_server(run_dir, reference):
    logged = logging.Handler()
    logged.records = []
    logged.emit = logged.records.append
    log = logging.getLogger("lorafit.serve")
    log.disabled = False  # a logging.config.dictConfig elsewhere in the session may have disabled it
    log.addHandler(logged)
    with make_client(run_dir) as c:
        served_forward = c.app.state.batcher.run_batch

        def broken(ids, adapters):
            raise RuntimeError("secret internal detail")

        c.app.state.batcher.run_batch = broken
        r = c.post("/predict", json={"inputs": TEXTS[0]})
        assert r.status_code == 500 and r.json()["error_type"] == "Backend"
        assert "secret" not in r.text and "Traceback" not in r.text
        log.removeHandler(logged)
        assert any("secret internal detail" in str(rec.exc_info[1]) for rec in logged.records if rec.exc_info)
        c.app.state.batcher.run_batch = served_forward
        assert_matches(c.post("/predict", json={"inputs": TEXTS[0]}).json(), reference[TEXTS[0]])


def test_health_is_503_until_the_worker_runs_and_after_it_stops(run_dir):
    c = make_client(run_dir)
    assert c.get("/health").status_code == 503
    assert c.get("/health").json()["error_type"] == "Unhealthy"
    with c:
        assert c.get("/health").json() == {"status": "ok"}
    assert c.get("/health").status_code == 503


def test_info_and_metrics(client):
    info = client.get("/info").json()
    assert info["labels"] == ["ham", "spam", "unsure"]
    assert info["model_type"]["classifier"]["label2id"] == {"ham": 0, "spam": 1, "unsure": 2}
    assert info["lora"]["rank"] == 4 and info["base_model"]["model"].endswith("base")
    assert (info["max_input_length"], info["max_client_batch_size"], info["max_batch_requests"]) == (60, 8, 32)
    assert info["version"]
    client.post("/predict", json={"inputs": []})
    text = client.get("/metrics").text
    for name in ('lorafit_requests_total{route="/predict",status="200"}',
                 'lorafit_requests_total{route="/predict",status="422"}', "lorafit_request_duration_seconds_bucket",
                 "lorafit_batch_size_bucket", "lorafit_queue_depth 0.0", "lorafit_texts_total"):
        assert name in text, name


def test_the_page_and_its_files_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and 'id="classify"' in page.text and "http" not in page.text.replace(
        "http-equiv", "")
    for name in ("app.js", "style.css"):
        assert client.get(f"/static/{name}").status_code == 200


# --- the server is not open to all (issue 18) ---

def test_api_key_is_required_on_every_route_but_health(run_dir, reference, monkeypatch):
    compared = []
    real = security.hmac.compare_digest
    monkeypatch.setattr(security.hmac, "compare_digest", lambda a, b: compared.append((a, b)) or real(a, b))
    with make_client(run_dir, api_key="s3cret") as c:
        assert c.get("/health").status_code == 200
        for method, path in (("post", "/predict"), ("get", "/info"), ("get", "/metrics")):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"},
                            {"Authorization": "s3cret"}):
                r = getattr(c, method)(path, headers=headers, **({"json": {"inputs": "ok"}} if method == "post" else {}))
                assert r.status_code == 401, (path, headers)
                assert r.json()["error_type"] == "Unauthorized" and r.headers["www-authenticate"] == "Bearer"
        good = {"Authorization": "Bearer s3cret"}
        assert c.get("/info", headers=good).status_code == 200
        assert_matches(c.post("/predict", json={"inputs": TEXTS[0]}, headers=good).json(), reference[TEXTS[0]])
        assert (b"wrong", b"s3cret") in compared  # the decision was compare_digest's (constant time)
        assert c.get("/").status_code == 200  # the page holds no data; it sends the key on its calls


def test_request_bodies_over_the_cap_get_413_before_parsing(run_dir, reference):
    with make_client(run_dir, max_request_bytes=200) as c:
        big = json.dumps({"inputs": ["x" * 300]}).encode()
        r = c.post("/predict", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413 and "--max-request-bytes" in r.json()["error"]
        r = c.post("/predict", content=(big[i:i + 50] for i in range(0, len(big), 50)))  # chunked: no length
        assert r.status_code == 413 and "over 200 bytes" in r.json()["error"]
        assert c.post("/predict", content=b"{" + b" " * 300).status_code == 413  # not parsed: it is not JSON
        assert_matches(c.post("/predict", json={"inputs": TEXTS[3]}).json(), reference[TEXTS[3]])


# --- the command: errors before the port is bound ---

def serve_cli(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    try:
        code = cli.main(["serve", *argv])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def test_missing_corrupt_or_foreign_runs_fail_in_one_line(tmp_path, capsys, run_dir):
    code, err = serve_cli(capsys, "--run", str(tmp_path / "nowhere"), "--port", "0")
    assert code == 1 and err.count("\n") == 1 and "adapter.json: not found" in err
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter.json").write_text("{not json")
    code, err = serve_cli(capsys, "--run", str(corrupt), "--port", "0")
    assert code == 1 and err.count("\n") == 1 and "not a lorafit adapter config" in err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    spec = json.loads((run_dir / "adapter.json").read_text())
    spec["architecture"]["n_layers"] = 3
    (foreign / "adapter.json").write_text(json.dumps(spec))
    (foreign / "adapter.safetensors").write_bytes((run_dir / "adapter.safetensors").read_bytes())
    code, err = serve_cli(capsys, "--run", str(foreign), "--port", "0")
    assert code == 1 and err.count("\n") == 1 and "trained on another base model (n_layers 3 vs 2)" in err


def test_a_port_in_use_fails_in_one_line(capsys, run_dir):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, err = serve_cli(capsys, "--run", str(run_dir), "--port", str(port), "--precision", "fp32")
    assert code == 1 and err == f"lorafit: error: --port {port}: already in use on 127.0.0.1 (stop what uses it or pick another port)\n"


def test_a_public_host_without_a_key_warns_in_one_line(tmp_path, capsys, monkeypatch):
    missing = str(tmp_path / "nowhere")  # the run fails to load: nothing is ever bound here
    code, err = serve_cli(capsys, "--run", missing, "--host", "0.0.0.0")
    warnings = [ln for ln in err.splitlines() if "warning" in ln]
    assert code == 1 and len(warnings) == 1 and "--host 0.0.0.0 is reachable from other machines" in warnings[0]
    for argv in (["--host", "0.0.0.0", "--api-key", "k"], ["--host", "127.0.0.1"], ["--host", "::1"]):
        code, err = serve_cli(capsys, "--run", missing, *argv)
        assert code == 1 and "warning" not in err
    monkeypatch.setenv("LORAFIT_API_KEY", "from-env")
    code, err = serve_cli(capsys, "--run", missing, "--host", "0.0.0.0")
    assert code == 1 and "warning" not in err


def test_the_key_comes_from_the_environment_when_no_flag_gives_it(monkeypatch, run_dir):
    seen = []
    monkeypatch.setattr(cli, "serve", seen.append)
    monkeypatch.setenv("LORAFIT_API_KEY", "from-env")
    assert cli.main(["serve", "--run", str(run_dir)]) == 0
    assert cli.main(["serve", "--run", str(run_dir), "--api-key", "flag"]) == 0
    assert [c.api_key for c in seen] == ["from-env", "flag"]
    assert (seen[0].host, seen[0].port, seen[0].max_batch_size, seen[0].max_wait_ms, seen[0].max_client_batch,
            seen[0].max_request_bytes) == ("127.0.0.1", 8000, 32, 5.0, 64, 1 << 20)


def test_a_merged_model_serves_the_same_probabilities(tmp_path, run_dir, reference, capsys):
    assert cli.main(["merge", "--run", str(run_dir), "--out", str(tmp_path / "merged")]) == 0
    with make_client(tmp_path / "merged") as c:
        r = c.post("/predict", json={"inputs": TEXTS[:3]})
        for text, predictions in zip(TEXTS, r.json()):
            assert_matches(predictions, reference[text])
        assert c.get("/info").json()["labels"] == ["ham", "spam", "unsure"]


def test_a_lone_request_skips_the_wait_and_crowded_ones_are_gathered():
    """With a wait far longer than the test, a lone request still comes back (it runs at once); requests
    that queue up while a batch runs are gathered into the next batch."""
    from lorafit.serving.batcher import Batcher

    release, sizes = threading.Event(), []

    def run(ids, adapters):
        sizes.append(len(ids))
        release.wait(30)
        return torch.zeros(len(ids), 2)

    b = Batcher(run, max_batch_size=2, max_wait_ms=600_000, max_queued=8)
    b.start()
    try:
        release.set()
        assert b.submit([[1]]).result(timeout=30).shape == (1, 2)  # alone: not held for 10 minutes
        release.clear()
        first = b.submit([[1]])
        while not sizes[1:]:  # until the worker is inside that batch
            time.sleep(0.01)
        later = [b.submit([[2]]), b.submit([[3]])]
        release.set()
        for f in [first, *later]:
            f.result(timeout=30)
        assert sizes == [1, 1, 2]
    finally:
        release.set()
        b.stop(timeout=30)


@pytest.mark.parametrize("api_key", [None, "k"])  # served merged (alone), or as an adapter others may join
def test_auto_refusing_int8_keeps_the_base_loaded_once_in_its_float_precision(run_dir, monkeypatch, api_key):
    """auto's int8 check refusing (forced here) leaves the float linears it put back, cast to auto's float
    precision: the base is not read a second time, and the answers are those of that precision."""
    from functools import partial

    from lorafit.adapters import multi
    from lorafit.backbones.int8 import INT8_LINEARS, quantize_checked
    from lorafit.runtime import Compute, choose_autocast_dtype

    loads = []
    for loader in ("load_backbone", "load_classifier"):
        real = getattr(multi, loader)
        monkeypatch.setattr(multi, loader, lambda *a, real=real, **k: loads.append(1) or real(*a, **k))
    monkeypatch.setattr(multi, "resolve_inference_compute", lambda device, *a, **k: Compute(device, None, int8=True))
    monkeypatch.setattr(multi, "quantize_checked", partial(quantize_checked, tolerance=-1.0))  # always refused
    config = ServeConfig(runs=(str(run_dir),), device="cpu", precision="auto", api_key=api_key)
    refused = ServedModel.load(config)
    assert len(loads) == 1 and bool(refused.base.alone) == (api_key is None)
    width = refused.base.backbone.hidden_size
    expected = {None: "fp32", torch.bfloat16: "bf16"}[choose_autocast_dtype("auto", torch.device("cpu"), width)]
    assert refused.compute.precision == expected
    assert not any(isinstance(m, INT8_LINEARS) for m in refused.base.backbone.module.modules())
    monkeypatch.undo()
    direct = ServedModel.load(ServeConfig(runs=(str(run_dir),), device="cpu", precision=expected, api_key=api_key))
    ids = direct.encode(TEXTS, truncate=True)
    got, want = (torch.stack(s.logits(ids, [s.default] * len(ids), 4)) for s in (refused, direct))
    assert torch.equal(got, want)


def test_a_lone_adapter_without_a_key_runs_merged_and_answers_as_unmerged(run_dir, reference):
    """Nothing can join a lone run served without --api-key, so its update is folded into the base (no
    per-batch LoRA work); with a key, adapters may be added, so it stays apart. Both answer as predict does."""
    from lorafit.adapters.multi import GroupedLoRALinear

    for api_key in (None, "k"):
        served = ServedModel.load(ServeConfig(runs=(str(run_dir),), device="cpu", precision="fp32", api_key=api_key))
        wrapped = any(isinstance(m, GroupedLoRALinear) for m in served.base.backbone.module.modules())
        assert bool(served.base.alone) == (api_key is None) and wrapped == (api_key is not None)
        assert served.describe(served.default)["merged"] == (api_key is None)  # /info and /v1/models say so
        ids = served.encode(TEXTS, truncate=True)
        probs = torch.softmax(torch.stack(served.logits(ids, [served.default] * len(ids), 4)), -1)
        labels = served.default.labels
        for text, row in zip(TEXTS, probs.tolist()):
            assert row == pytest.approx([reference[text][k] for k in labels], abs=1e-5)


def test_a_lone_adapter_in_int8_is_quantised_as_predict_quantises_its_merged_model(run_dir):
    """Merged, it takes int8's fused kernels where predict does (an activation inside the linear's kernel)."""
    from collections import Counter

    from lorafit.adapters.loading import load_classifier
    from lorafit.adapters.lora import merge_and_unload
    from lorafit.backbones.int8 import quantize_linears

    served = ServedModel.load(ServeConfig(runs=(str(run_dir),), device="cpu", precision="int8"))
    model, backbone, _ = load_classifier(run_dir)
    merge_and_unload(model)
    quantize_linears(backbone.module, fuse=True)
    kinds = [Counter(type(m).__name__ for m in module.modules()) for module in (served.base.backbone.module, backbone.module)]
    assert kinds[0] == kinds[1]
