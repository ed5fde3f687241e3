"""``usnet serve`` as a real process: uvicorn on an ephemeral loopback port, an unchanged
Triton client, plain HTTP with JSON, and SIGTERM while requests are in flight."""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

import usnet
from usnet.serve.app import bind

SHAPE = (1, 32, 32)  # us_convnet without a run config: its 32 px default


@pytest.fixture(scope="module")
def convnet_checkpoint(tmp_path_factory):
    """A small us_convnet (32 px): batches of 32 take tens of milliseconds on one thread."""
    torch.manual_seed(0)
    model = usnet.models.create_model("us_convnet")
    usnet.calibrate(model, [torch.randn(32, *SHAPE)], widths=[0.25, 0.5, 1.0], num_images=32)
    path = tmp_path_factory.mktemp("serve-process") / "convnet.pt"
    usnet.save(model, path)
    return path, model


def reference(model, width, x):
    with torch.no_grad():
        return usnet.export(model, width)(torch.from_numpy(x)).numpy()


@pytest.fixture(scope="module")
def server(convnet_checkpoint):
    path, _ = convnet_checkpoint
    process = subprocess.Popen(
        [sys.executable, "-m", "usnet", "serve", str(path), "--port", "0", "--slo-ms", "60000",
         "--threads", "1", "--widths", "0.25,0.5,1.0", "--name", "convnet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    line = process.stdout.readline()  # printed once the model is loaded and the port bound
    if "serving convnet" not in line:
        process.kill()
        pytest.fail(f"usnet serve did not start: {line}{process.stderr.read()}")
    port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
    yield process, port
    if process.poll() is None:
        process.kill()
        process.wait(10)


def post(port: int, body: bytes, headers: dict | None = None, path="/v2/models/convnet/infer"):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", path, body, headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def test_tritonclient_works_unchanged(server, convnet_checkpoint):
    import tritonclient.http as triton

    _, port = server
    client = triton.InferenceServerClient(url=f"127.0.0.1:{port}")
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("convnet")
    meta = client.get_model_metadata("convnet")
    assert [w["width"] for w in meta["parameters"]["widths"]] == [0.25, 0.5, 1.0]
    x = np.random.default_rng(0).standard_normal((3, *SHAPE), dtype=np.float32)
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=True)
    for width in (None, 0.5):
        result = client.infer("convnet", [tensor], outputs=[triton.InferRequestedOutput("logits")],
                              parameters=None if width is None else {"width": width})  # fmt: skip
        ran = result.get_response()["parameters"]["width"]
        assert ran == (width or 1.0)
        np.testing.assert_allclose(result.as_numpy("logits"),
                                   reference(convnet_checkpoint[1], ran, x), atol=1e-4)  # fmt: skip
    with pytest.raises(triton.InferenceServerException, match="unknown input 'images'"):
        bad = triton.InferInput("images", list(x.shape), "FP32")
        bad.set_data_from_numpy(x)
        client.infer("convnet", [bad])
    client.close()


def test_plain_json_over_http(server, convnet_checkpoint):
    _, port = server
    x = np.random.default_rng(1).standard_normal((2, *SHAPE), dtype=np.float32)
    body = {"inputs": [{"name": "input", "shape": [2, *SHAPE], "datatype": "FP32",
                        "data": x.ravel().tolist()}], "parameters": {"width": 0.25}}  # fmt: skip
    status, headers, data = post(port, json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})  # fmt: skip
    assert status == 200
    answer = json.loads(data)
    assert answer["parameters"]["width"] == 0.25
    logits = np.asarray(answer["outputs"][0]["data"], np.float32).reshape(2, 10)
    np.testing.assert_allclose(logits, reference(convnet_checkpoint[1], 0.25, x), atol=1e-4)
    status, _, data = post(port, b"{oops")
    assert status == 400 and "not valid JSON" in json.loads(data)["error"]


def metric(port: int, name: str) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    lines = [x for x in text.splitlines() if x.startswith(name + " ")]
    return float(lines[0].split()[-1]) if lines else 0.0  # a labelled counter not yet counted


def test_sigterm_finishes_in_flight_requests_and_exits_0(server):
    process, port = server
    x = np.zeros((32, *SHAPE), np.float32).tobytes()
    header = json.dumps({"inputs": [{"name": "input", "shape": [32, *SHAPE], "datatype": "FP32",
                                     "parameters": {"binary_data_size": len(x)}}],
                         "parameters": {"width": 1.0}}).encode()  # fmt: skip
    headers = {"Inference-Header-Content-Length": str(len(header))}
    results = []

    def one():
        try:
            results.append(post(port, header + x, headers)[0])
        except OSError as err:
            results.append(err)

    answered = metric(port, 'usnet_requests_total{code="200"}')
    threads = [threading.Thread(target=one) for _ in range(24)]  # ~0.5 s of model work queued
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # until the server holds all 24 (queued or answered)
        held = metric(port, "usnet_requests_in_flight")
        if held + metric(port, 'usnet_requests_total{code="200"}') - answered >= 24:
            break
        time.sleep(0.01)
    assert held >= 4  # SIGTERM does come while requests are in flight
    process.send_signal(signal.SIGTERM)
    time.sleep(0.1)
    with pytest.raises(ConnectionRefusedError):  # no longer accepting
        post(port, header + x, headers)
    for t in threads:
        t.join(60)
    assert process.wait(60) == 0
    assert results == [200] * 24  # every request in flight was answered


def test_cli_refuses_bad_input_in_one_line(tmp_path, convnet_checkpoint):
    def run(*args):
        done = subprocess.run([sys.executable, "-m", "usnet", "serve", *args],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        return done.returncode, done.stderr.strip()

    code, err = run(str(tmp_path / "missing.pt"))
    assert code == 2 and err.startswith("usnet: error:") and "missing.pt" in err
    assert len(err.splitlines()) == 1
    code, err = run(str(convnet_checkpoint[0]), "--slo-ms", "-5", "--port", "0")
    assert code == 2 and "--slo-ms must be a positive number" in err
    taken = bind("127.0.0.1", 0)
    try:
        code, err = run(str(convnet_checkpoint[0]), "--port", str(taken.getsockname()[1]))
        assert code == 2 and "address already in use" in err
    finally:
        taken.close()


def test_connections_beyond_the_limit_get_503(convnet_checkpoint):
    # uvicorn answers 503 once the open connections reach --max-connections
    process = subprocess.Popen(
        [sys.executable, "-m", "usnet", "serve", str(convnet_checkpoint[0]), "--port", "0",
         "--threads", "1", "--widths", "1.0", "--max-connections", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = process.stdout.readline()
        port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
        first = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        first.request("GET", "/v2/health/live")
        assert first.getresponse().status == 200  # one connection, kept open
        assert post(port, b"{}", path="/v2/health/live")[0] == 503  # the second reaches 2
        first.close()
        time.sleep(0.2)
        again = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        again.request("GET", "/v2/health/live")
        assert again.getresponse().status == 200  # room again
        again.close()
    finally:
        process.terminate()
        assert process.wait(60) == 0
