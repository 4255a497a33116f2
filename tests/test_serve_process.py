"""A real `lorafit serve` process: SIGTERM while requests are in flight answers every one of them, exit 0."""

from __future__ import annotations

import http.client
import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pytest

pytest.importorskip("fastapi", reason="lorafit[serve] is not installed")
pytest.importorskip("uvicorn", reason="lorafit[serve] is not installed")
from lorafit.inference.predict import predict_texts  # noqa: E402
from serve_fixtures import TEXTS, start_server, write_tiny_run  # noqa: E402


def request(url: str, method: str, path: str, body: dict | None = None) -> tuple[int, object]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        conn.request(method, path, body=None if body is None else json.dumps(body),
                     headers={"content-type": "application/json"})
        r = conn.getresponse()
        data = r.read()
        return r.status, json.loads(data) if r.headers.get("content-type") == "application/json" else data.decode()
    finally:
        conn.close()


def pending_and_done(url: str) -> tuple[float, float]:
    """Requests admitted and not yet answered; texts classified (one text a request here)."""
    _, text = request(url, "GET", "/metrics")
    value = lambda name: float(next(ln for ln in text.splitlines() if ln.startswith(name + " ")).split()[1])  # noqa: E731
    return value("lorafit_queue_depth"), value("lorafit_texts_total")


def test_sigterm_mid_load_answers_every_request_in_flight_and_exits_0(tmp_path):
    run = write_tiny_run(tmp_path)
    reference = {r["text"]: r["probabilities"] for r in predict_texts(run, TEXTS, device="cpu", precision="fp32")}
    # Once requests crowd in, the worker waits up to 3 s for companions: after the first batch (run at once),
    # the rest are surely in flight when SIGTERM lands.
    proc, url = start_server(run, "--max-wait-ms", "3000", "--max-batch-size", "1000")
    try:
        n = 12
        with ThreadPoolExecutor(n) as pool:
            futures = [pool.submit(request, url, "POST", "/predict", {"inputs": TEXTS[i % 6]}) for i in range(n)]
            deadline = time.monotonic() + 20
            while True:
                pending, done = pending_and_done(url)
                if pending >= n // 2 and pending + done >= n:
                    break
                assert time.monotonic() < deadline, "the requests never reached the server"
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            answers = [f.result(timeout=60) for f in futures]
        for i, (status, predictions) in enumerate(answers):
            assert status == 200, predictions
            got = {p["label"]: p["score"] for p in predictions}
            assert got == pytest.approx(reference[TEXTS[i % 6]], abs=1e-6)
        assert proc.wait(timeout=60) == 0
        out, err = proc.communicate()
        assert "every request in flight was answered" in out
        assert "Traceback" not in err and "error" not in err.lower()
    finally:
        if proc.poll() is None:
            proc.kill()
