"""Many adapters on one base in one server (issue 23): each answers what its own `lorafit predict` says
whatever it is batched with, the base runs once a batch, adapters come and go without losing a request,
and the clients people already have work unchanged: huggingface_hub's InferenceClient (POST /) and a
vLLM-style POST /classify."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("fastapi", reason="lorafit[serve] is not installed")
pytest.importorskip("prometheus_client", reason="lorafit[serve] is not installed")
from fastapi.testclient import TestClient  # noqa: E402

from lorafit import cli  # noqa: E402
from lorafit.adapters.lora import LoRAConfig  # noqa: E402
from lorafit.adapters.multi import GroupedLoRALinear  # noqa: E402
from lorafit.inference.predict import predict_texts  # noqa: E402
from lorafit.serving.app import create_app  # noqa: E402
from lorafit.serving.config import ServeConfig  # noqa: E402
from lorafit.serving.model import ServedModel  # noqa: E402
from serve_fixtures import TEXTS, held_batches, start_server, write_adapter, write_tiny_base  # noqa: E402

# different class counts, ranks, targets and variants (plain, rsLoRA, DoRA, PiSSA) on one base
ADAPTERS = {
    "spam": (["ham", "spam"], LoRAConfig(rank=4)),
    "topic": (["sport", "news", "tech", "food"], LoRAConfig(rank=2, alpha=8, targets=("attention",), use_rslora=True)),
    "mood": (["sad", "calm", "glad"], LoRAConfig(rank=3, use_dora=True)),
    "pissa": (["no", "yes"], LoRAConfig(rank=2, init="pissa", targets=("feedforward",))),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    base = write_tiny_base(root)
    return {name: write_adapter(base, root / "runs" / name, labels, lora, seed=3 + k)
            for k, (name, (labels, lora)) in enumerate(ADAPTERS.items())}


@pytest.fixture(scope="module")
def reference(runs):
    """Each adapter's own `lorafit predict` for TEXTS: {name: {text: {label: probability}}}."""
    return {name: {r["text"]: r["probabilities"] for r in predict_texts(run, TEXTS, device="cpu", precision="fp32")}
            for name, run in runs.items()}


def config_for(runs, **settings) -> ServeConfig:
    return ServeConfig(runs=tuple(f"{n}={d}" for n, d in runs.items()), device="cpu", precision="fp32", **settings)


@pytest.fixture(scope="module")
def client(runs):
    config = config_for(runs, max_wait_ms=30)
    with TestClient(create_app(ServedModel.load(config), config)) as c:
        yield c


def close(predictions: list[dict], expected: dict, tol: float = 1e-5) -> None:
    got = {p["label"]: p["score"] for p in predictions}
    assert list(got) == sorted(expected, key=lambda k: -expected[k])  # every class, highest first
    assert got == pytest.approx(expected, abs=tol)


def test_every_adapter_equals_its_own_predict_whatever_it_is_batched_with(client, reference):
    """300 requests from 16 threads, adapters and texts interleaved: batches mix adapters, and every answer
    equals that adapter's `lorafit predict` within 1e-5."""
    served = client.app.state.served
    mixes = []
    forward = served.base.forward

    def spy(input_ids, mask, adapters, counts):
        mixes.append(len(adapters))
        return forward(input_ids, mask, adapters, counts)

    served.base.forward = spy
    names = list(ADAPTERS)

    def one(i: int):
        name, texts = names[i % 4], TEXTS[i % 6] if i % 5 else [TEXTS[i % 6], TEXTS[(i + 1) % 6]]
        return name, texts, client.post("/predict", json={"inputs": texts, "model": name})

    try:
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(one, range(300)))
    finally:
        served.base.forward = forward
    for name, texts, r in results:
        assert r.status_code == 200, r.text
        for text, predictions in ([(texts, r.json())] if isinstance(texts, str) else zip(texts, r.json())):
            close(predictions, reference[name][text])
    assert max(mixes) > 1  # some batches held several adapters' texts


def test_the_base_runs_once_a_batch_and_each_segment_gets_its_own_update(runs, reference):
    """One forward of texts of three adapters: every adapted linear multiplies by the base weight once (all
    rows) and by each adapter's A once (its rows only)."""
    served = ServedModel.load(config_for(runs))
    calls = []
    real = torch.nn.functional.linear

    def counting(x, w, b=None):
        calls.append((x.shape[0], w.data_ptr()))
        return real(x, w, b)

    adapters = [served.adapters[n] for n in ("spam", "topic", "mood", "spam", "topic")]
    texts = [TEXTS[0], TEXTS[1], TEXTS[2], TEXTS[3], TEXTS[4]]
    torch.nn.functional.linear = counting
    try:
        rows = served.logits(served.encode(texts, False), adapters, batch_size=32)
    finally:
        torch.nn.functional.linear = real
    q = served.base.backbone.module.trf_blocks[0].att.W_query
    assert isinstance(q, GroupedLoRALinear)
    assert sum(ptr == q.base.weight.data_ptr() for _, ptr in calls) == 1
    for a, text, row in zip(adapters, texts, rows):
        assert torch.softmax(row, -1).tolist() == pytest.approx(list(reference[a.name][text].values()), abs=1e-5)


def test_models_are_listed_and_chosen_by_name(client, reference):
    listed = client.get("/v1/models").json()
    assert listed["object"] == "list"
    assert [m["id"] for m in listed["data"]] == list(ADAPTERS)
    topic = listed["data"][1]
    assert topic["object"] == "model" and topic["owned_by"] == "lorafit" and topic["num_classes"] == 4
    assert topic["labels"] == ["sport", "news", "tech", "food"] and topic["lora"]["rank"] == 2
    close(client.post("/predict", json={"inputs": TEXTS[1]}).json(), reference["spam"][TEXTS[1]])  # the first
    close(client.post("/models/mood", json={"inputs": TEXTS[2]}).json(), reference["mood"][TEXTS[2]])
    r = client.post("/predict", json={"inputs": "hi", "model": "nope"})
    assert r.status_code == 404 and "model 'nope' is not served here; served: spam, topic, mood, pissa" == r.json()["error"]
    for bad in (3, ["spam"]):
        r = client.post("/predict", json={"inputs": "hi", "model": bad})
        assert r.status_code == 422 and "model must be a string" in r.json()["error"]
    info = client.get("/info", params={"model": "topic"}).json()
    assert info["model_id"] == "topic" and info["labels"] == ["sport", "news", "tech", "food"]
    assert [a["name"] for a in info["adapters"]] == list(ADAPTERS) and client.get("/info").json()["model_id"] == "spam"
    assert client.get("/info", params={"model": "nope"}).status_code == 404


def test_vllm_classify_schema(client, reference):
    r = client.post("/classify", json={"model": "topic", "input": [TEXTS[0], TEXTS[4]]})
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"id", "object", "created", "model", "data", "usage"}
    assert body["id"].startswith("classify-") and body["object"] == "list" and body["model"] == "topic"
    assert isinstance(body["created"], int)
    labels = ["sport", "news", "tech", "food"]
    for i, (text, row) in enumerate(zip((TEXTS[0], TEXTS[4]), body["data"])):
        assert set(row) == {"index", "label", "probs", "num_classes"} and row["index"] == i and row["num_classes"] == 4
        assert row["probs"] == pytest.approx([reference["topic"][text][k] for k in labels], abs=1e-5)
        assert row["label"] == max(labels, key=lambda k: reference["topic"][text][k])
    n_tokens = sum(len(x) for x in client.app.state.served.encode([TEXTS[0], TEXTS[4]], False))
    assert body["usage"] == {"prompt_tokens": n_tokens, "total_tokens": n_tokens, "completion_tokens": 0,
                             "prompt_tokens_details": None}
    one = client.post("/v1/classify", json={"input": TEXTS[4], "truncate_prompt_tokens": 3}).json()
    assert one["model"] == "spam" and one["usage"]["prompt_tokens"] == 3 and len(one["data"]) == 1
    for body, words in (({"model": "spam"}, 'missing field "input"'), ({"input": []}, "input is an empty list"),
                        ({"input": "hi", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens must be")):
        r = client.post("/classify", json=body)
        assert r.status_code == 422 and words in r.json()["error"] and "\n" not in r.json()["error"]


def test_metrics_are_kept_per_adapter(client):
    client.post("/predict", json={"inputs": ["a b", "c d"], "model": "pissa"})
    text = client.get("/metrics").text
    for name in ('lorafit_model_texts_total{model="pissa"}', 'lorafit_model_loaded{model="topic"} 1.0',
                 'lorafit_model_request_duration_seconds_count{model="pissa"}', 'route="/predict"'):
        assert name in text, name


def test_adapters_are_added_and_removed_without_a_restart_and_no_request_is_lost(runs, reference, tmp_path):
    config = config_for({"spam": runs["spam"]}, api_key="k", max_wait_ms=0)
    key = {"Authorization": "Bearer k"}
    with TestClient(create_app(ServedModel.load(config), config)) as c:
        r = c.post("/admin/models", json={"name": "mood", "path": str(runs["mood"])}, headers=key)
        assert r.status_code == 201 and r.json()["id"] == "mood" and r.json()["num_classes"] == 3
        close(c.post("/predict", json={"inputs": TEXTS[0], "model": "mood"}, headers=key).json(),
              reference["mood"][TEXTS[0]])
        assert c.post("/admin/models", json={"name": "mood", "path": str(runs["topic"])}, headers=key).status_code == 409
        # a request for "mood" held in the queue while "mood" is removed is still answered, by "mood"
        batcher = c.app.state.batcher
        with held_batches(batcher) as (gate, entered), ThreadPoolExecutor(2) as pool:
            first = pool.submit(c.post, "/predict", json={"inputs": TEXTS[1], "model": "spam"}, headers=key)
            assert entered.wait(10)
            queued = pool.submit(c.post, "/predict", json={"inputs": TEXTS[3], "model": "mood"}, headers=key)
            while not batcher.pending >= 2:
                threading.Event().wait(0.01)
            assert c.delete("/admin/models/mood", headers=key).json() == {"id": "mood", "object": "model", "deleted": True}
            gate.set()
            close(first.result(10).json(), reference["spam"][TEXTS[1]])
            close(queued.result(10).json(), reference["mood"][TEXTS[3]])
        assert c.post("/predict", json={"inputs": "hi", "model": "mood"}, headers=key).status_code == 404
        assert [m["id"] for m in c.get("/v1/models", headers=key).json()["data"]] == ["spam"]
        assert 'lorafit_model_loaded{model="mood"}' not in c.get("/metrics", headers=key).text
        r = c.delete("/admin/models/spam", headers=key)
        assert r.status_code == 409 and "the only adapter" in r.json()["error"]
        other = write_adapter(write_tiny_base(tmp_path, seed=9), tmp_path / "other", ["a", "b"], LoRAConfig(rank=4))
        for body, words in (({"name": "x", "path": str(other)}, "trained on other base weights"),
                            ({"name": "x", "path": str(tmp_path / "nowhere")}, "not a lorafit adapter folder"),
                            ({"name": "bad name", "path": str(runs["topic"])}, "adapter name 'bad name'"),
                            ({"name": "x"}, 'send {"name"')):
            r = c.post("/admin/models", json=body, headers=key)
            assert r.status_code == 422 and words in r.json()["error"] and "\n" not in r.json()["error"], r.text
        assert c.post("/admin/models", json={"name": "x", "path": str(runs["topic"])}).status_code == 401
        assert c.post("/", json={"inputs": "hi"}).status_code == 401  # POST / classifies: behind the key too
        assert c.get("/").status_code == 200  # the page is open


def test_admin_routes_need_an_api_key(client, runs):
    r = client.post("/admin/models", json={"name": "again", "path": str(runs["spam"])})
    assert r.status_code == 403 and "--api-key" in r.json()["error"]
    assert client.delete("/admin/models/spam").status_code == 403


def serve_cli(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    try:
        code = cli.main(["serve", "--port", "0", "--precision", "fp32", *argv])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return code, err


def test_adapters_of_different_bases_or_names_are_refused_in_one_line(runs, tmp_path, capsys):
    other = write_adapter(write_tiny_base(tmp_path, seed=9), tmp_path / "other", ["a", "b"], LoRAConfig(rank=4))
    code, err = serve_cli(capsys, "--run", f"spam={runs['spam']}", "--run", str(other))
    assert code == 1 and f"{other}: adapter was trained on other base weights" in err
    code, err = serve_cli(capsys, "--run", str(runs["spam"]), "--run", f"spam={runs['topic']}")
    assert code == 2 and "two runs are named 'spam'" in err
    code, err = serve_cli(capsys, "--run", f"b@d={runs['spam']}")
    assert code == 2 and "adapter name 'b@d'" in err
    code, err = serve_cli(capsys, "--runs-dir", str(tmp_path / "empty"))
    assert code == 2 and "not a folder" in err
    assert cli.main(["merge", "--run", str(runs["spam"]), "--out", str(tmp_path / "merged")]) == 0
    code, err = serve_cli(capsys, "--run", str(tmp_path / "merged"), "--run", str(runs["topic"]))
    assert code == 1 and "a merged model (its update folded into the base) is served alone" in err


def test_a_folder_of_runs_is_served_by_folder_name(runs, reference):
    config = ServeConfig(runs_dir=str(next(iter(runs.values())).parent), device="cpu", precision="fp32")
    served = ServedModel.load(config)
    assert list(served.adapters) == sorted(ADAPTERS)
    assert served.adapters["mood"].size_bytes > 0


def test_huggingface_hub_inference_client_works_unchanged(runs, reference, monkeypatch):
    """The real client against a real server process: POST / as text-embeddings-inference answers it,
    and a URL per adapter (/models/NAME) picks another adapter. (The suite keeps the Hub offline; this
    client only talks to the loopback server.)"""
    from huggingface_hub import InferenceClient, constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    proc, url = start_server(f"spam={runs['spam']}", "--run", f"topic={runs['topic']}")
    try:
        out = InferenceClient(base_url=url).text_classification(TEXTS[0])
        elements = out if isinstance(out, list) else [out]
        best = max(reference["spam"][TEXTS[0]].items(), key=lambda kv: kv[1])
        assert (elements[0].label, elements[0].score) == (best[0], pytest.approx(best[1], abs=1e-5))
        out = InferenceClient(base_url=f"{url}/models/topic").text_classification(TEXTS[4])
        elements = out if isinstance(out, list) else [out]
        best = max(reference["topic"][TEXTS[4]].items(), key=lambda kv: kv[1])
        assert (elements[0].label, elements[0].score) == (best[0], pytest.approx(best[1], abs=1e-5))
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0
