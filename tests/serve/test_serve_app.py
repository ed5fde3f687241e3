"""The Open Inference Protocol app in-process (Starlette's TestClient): answers checked against
the standalone export of the width the response says ran."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from conftest import SPATIAL, reference_logits
from starlette.testclient import TestClient

from usnet.serve.app import ModelServer, create_app
from usnet.serve.controller import Batch
from usnet.serve.runners import open_runner

SHAPE = [3, SPATIAL, SPATIAL]


@pytest.fixture(scope="module")
def runner(tiny_checkpoint):
    return open_runner(tiny_checkpoint[0])


def make_client(runner, **kwargs):
    kwargs.setdefault("slo_ms", 1000.0)
    server = ModelServer(runner, name="tiny", **kwargs)
    return TestClient(create_app(server)), server


@pytest.fixture
def client(runner):
    client, _ = make_client(runner, max_batch=8)
    with client:
        yield client


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *SHAPE), dtype=np.float32)


def json_request(x: np.ndarray, **parameters) -> dict:
    body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                        "data": x.reshape(-1).tolist()}]}  # fmt: skip
    if parameters:
        body["parameters"] = parameters
    return body


def binary_request(x: np.ndarray, binary_output: bool = True, **parameters) -> tuple[bytes, dict]:
    data = x.astype("<f4").tobytes()
    header = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                          "parameters": {"binary_data_size": len(data)}}],
              "outputs": [{"name": "logits", "parameters": {"binary_data": binary_output}}]}  # fmt: skip
    if parameters:
        header["parameters"] = parameters
    head = json.dumps(header).encode()
    return head + data, {"Inference-Header-Content-Length": str(len(head)),
                         "Content-Type": "application/octet-stream"}  # fmt: skip


def test_health_and_metadata(client, tiny_checkpoint):
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").json() == {"ready": True}
    assert client.get("/v2/models/tiny/ready").status_code == 200
    meta = client.get("/v2/models/tiny").json()
    assert meta["name"] == "tiny"
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, *SHAPE]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
    spectrum = tiny_checkpoint[2]
    assert meta["parameters"]["widths"] == [{"width": r["width"], "top1": r["top1"]}
                                            for r in spectrum]  # fmt: skip
    assert client.get("/v2").json()["extensions"] == ["binary_tensor_data"]


def test_json_inference_matches_the_standalone_export(client, tiny_checkpoint):
    model = tiny_checkpoint[1]
    x = images(3)
    response = client.post("/v2/models/tiny/infer", json={**json_request(x), "id": "r1"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"] == "r1" and body["model_name"] == "tiny"
    width = body["parameters"]["width"]
    assert width == 1.0  # an idle server with a loose SLO runs the full width
    (out,) = body["outputs"]
    assert out["name"] == "logits" and out["shape"] == [3, 10] and out["datatype"] == "FP32"
    got = np.asarray(out["data"], np.float32).reshape(3, 10)
    np.testing.assert_allclose(got, reference_logits(model, width, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pinned, ran", [(0.5, 0.5), (0.6, 0.5), (0.25, 0.25), (1.0, 1.0)])
def test_a_pinned_width_runs_the_widest_served_at_most_it(client, tiny_checkpoint, pinned, ran):
    x = images(2, seed=1)
    body = client.post("/v2/models/tiny/infer", json=json_request(x, width=pinned)).json()
    assert body["parameters"]["width"] == ran
    got = np.asarray(body["outputs"][0]["data"], np.float32).reshape(2, 10)
    np.testing.assert_allclose(got, reference_logits(tiny_checkpoint[1], ran, x), atol=1e-5)
    other = reference_logits(tiny_checkpoint[1], 1.0 if ran != 1.0 else 0.5, x)
    assert not np.allclose(got, other, atol=1e-3)  # the widths really differ


def test_binary_tensor_data_both_ways(client, tiny_checkpoint):
    x = images(4, seed=2)
    body, headers = binary_request(x, width=0.75)
    response = client.post("/v2/models/tiny/infer", content=body, headers=headers)
    assert response.status_code == 200, response.text
    length = int(response.headers["inference-header-content-length"])
    header = json.loads(response.content[:length])
    (out,) = header["outputs"]
    assert out["parameters"]["binary_data_size"] == 4 * 10 * 4 and "data" not in out
    got = np.frombuffer(response.content[length:], "<f4").reshape(out["shape"])
    np.testing.assert_allclose(got, reference_logits(tiny_checkpoint[1], 0.75, x), atol=1e-5)
    assert header["parameters"]["width"] == 0.75
    # binary in, JSON out
    body, headers = binary_request(x, binary_output=False)
    response = client.post("/v2/models/tiny/infer", content=body, headers=headers)
    assert response.headers["content-type"] == "application/json"
    assert len(response.json()["outputs"][0]["data"]) == 40


def test_min_width_is_respected(runner):
    # Only the narrowest width is fast enough for the SLO: the controller takes it, unless the
    # request's floor forbids it; then the floor's width decides admission.
    latency = {(w, b): (1e-3 if w == 0.25 else 10.0) for w in runner.widths for b in (1, 8)}
    client, server = make_client(runner, slo_ms=1000.0, max_batch=8, latency=latency)
    with client:
        body = client.post("/v2/models/tiny/infer", json=json_request(images(1))).json()
        assert body["parameters"]["width"] == 0.25
        server.controller.running = Batch([], 0.25, 1, server.clock(), 0.0)  # busy
        response = client.post("/v2/models/tiny/infer", json=json_request(images(1), min_width=0.6))
        server.controller.running = None
        assert response.status_code == 429
        assert "even at width 0.75" in response.json()["error"]
        body = client.post("/v2/models/tiny/infer", json=json_request(images(1), min_width=0.2))
        assert body.json()["parameters"]["width"] == 0.25


BAD = [
    ("malformed JSON", b"{bad", {}, 400, "not valid JSON"),
    ("not an object", b"[1, 2]", {}, 400, "JSON object"),
    (
        "wrong input name",
        {"inputs": [{"name": "x", "shape": [1, *SHAPE], "datatype": "FP32", "data": [0.0] * 192}]},
        {},
        400,
        "unknown input 'x'",
    ),  # fmt: skip
    (
        "wrong shape",
        {
            "inputs": [
                {"name": "input", "shape": [1, 3, 4, 4], "datatype": "FP32", "data": [0.0] * 48}
            ]
        },
        {},
        400,
        "expected [N, 3, 8, 8]",
    ),  # fmt: skip
    (
        "batch too big",
        {
            "inputs": [
                {"name": "input", "shape": [9, *SHAPE], "datatype": "FP32", "data": [0.0] * 9 * 192}
            ]
        },
        {},
        400,
        "1 <= N <= 8",
    ),  # fmt: skip
    (
        "wrong datatype",
        {
            "inputs": [
                {"name": "input", "shape": [1, *SHAPE], "datatype": "FP64", "data": [0.0] * 192}
            ]
        },
        {},
        400,
        "takes FP32",
    ),  # fmt: skip
    (
        "too few numbers",
        {
            "inputs": [
                {"name": "input", "shape": [1, *SHAPE], "datatype": "FP32", "data": [0.0] * 191}
            ]
        },
        {},
        400,
        "needs 192",
    ),  # fmt: skip
    (
        "strings",
        {
            "inputs": [
                {"name": "input", "shape": [1, *SHAPE], "datatype": "FP32", "data": ["1"] * 192}
            ]
        },
        {},
        400,
        "numbers only",
    ),  # fmt: skip
    (
        "unknown output",
        {**json_request(images(1)), "outputs": [{"name": "probs"}]},
        {},
        400,
        "unknown output 'probs'",
    ),
    ("width above 1", json_request(images(1), width=1.5), {}, 400, "must be in (0, 1]"),
    ("width not a number", json_request(images(1), width="wide"), {}, 400, "must be a number"),
    (
        "width below the served",
        json_request(images(1), width=0.1),
        {},
        400,
        "below the narrowest served width 0.25",
    ),
    (
        "bad header length",
        b"{}",
        {"Inference-Header-Content-Length": "99"},
        400,
        "Inference-Header-Content-Length",
    ),
    ("compressed", b"{}", {"Content-Encoding": "gzip"}, 415, "not supported"),
]


@pytest.mark.parametrize("what, body, headers, status, message", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_4xx_with_the_error_body(client, what, body, headers, status, message):
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    response = client.post("/v2/models/tiny/infer", content=body, headers=headers)
    assert response.status_code == status
    assert set(response.json()) == {"error"}
    assert message in response.json()["error"]
    # and the server keeps serving
    ok = client.post("/v2/models/tiny/infer", json=json_request(images(1)))
    assert ok.status_code == 200


def test_binary_payload_errors(client):
    x = images(1)
    body, headers = binary_request(x)
    for tampered, message in ((body + b"\0\0\0\0", "declare 768"), (body[:-4], "holds 764"),
                              (body[:-4] + struct.pack("<f", float("nan")), "NaN")):  # fmt: skip
        response = client.post("/v2/models/tiny/infer", content=tampered, headers=headers)
        assert response.status_code == 400 and message in response.json()["error"], response.text


def test_unknown_model_is_404(client):
    response = client.post("/v2/models/other/infer", json=json_request(images(1)))
    assert response.status_code == 404
    assert response.json() == {"error": "unknown model 'other'; this server has 'tiny'"}
    assert client.get("/v2/models/other").status_code == 404


def test_oversized_payload_is_413(runner):
    client, _ = make_client(runner, max_batch=8, max_body_bytes=1000)
    with client:
        response = client.post("/v2/models/tiny/infer", json=json_request(images(2)))
        assert response.status_code == 413
        assert "limit of 1000 bytes" in response.json()["error"]
        body, headers = binary_request(images(1))  # 768 bytes of data + a header: fits
        assert (
            client.post("/v2/models/tiny/infer", content=body, headers=headers).status_code == 200
        )


def test_overload_is_429_with_retry_after(runner):
    # A latency table in which even the narrowest width takes twice the SLO.
    slow = {(w, b): 0.2 for w in runner.widths for b in (1, 8)}
    client, server = make_client(runner, slo_ms=100.0, max_batch=8, latency=slow)
    with client:
        # the model is busy (an idle one takes any request)
        server.controller.running = Batch([], 0.25, 1, server.clock(), 0.2)
        response = client.post("/v2/models/tiny/infer", json=json_request(images(1)))
        server.controller.running = None
        assert response.status_code == 429
        assert int(response.headers["retry-after"]) >= 1
        assert "even at width 0.25" in response.json()["error"]
        metrics = client.get("/metrics").text
    assert 'usnet_rejections_total{reason="slo"} 1.0' in metrics


def test_metrics(client):
    for n in (1, 2, 3):
        client.post("/v2/models/tiny/infer", json=json_request(images(n), width=0.5))
    client.post("/v2/models/tiny/infer", content=b"{bad")
    text = client.get("/metrics").text
    assert 'usnet_requests_total{code="200"} 3.0' in text
    assert 'usnet_requests_total{code="400"} 1.0' in text
    assert "usnet_batch_width_count 3.0" in text
    assert "usnet_batch_width_sum 1.5" in text
    assert "usnet_batch_size_sum 6.0" in text
    assert "usnet_request_latency_seconds_count 3.0" in text
    assert "usnet_queue_images 0.0" in text
    assert "usnet_slo_misses_total 0.0" in text


def test_accepted_connections_send_without_delay():
    # A response goes out as headers, then body: without TCP_NODELAY the body waits for the
    # client's delayed ACK, ~40 ms per request on a keep-alive connection.
    import asyncio
    import socket

    from usnet.serve.app import bind

    sock = bind("127.0.0.1", 0)
    assert sock.proto == socket.IPPROTO_TCP
    seen = []

    async def main():
        def accepted(reader, writer):
            seen.append(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP,
                                                                   socket.TCP_NODELAY))  # fmt: skip
            writer.close()

        server = await asyncio.start_server(accepted, sock=sock)
        _, writer = await asyncio.open_connection("127.0.0.1", sock.getsockname()[1])
        for _ in range(100):
            if seen:
                break
            await asyncio.sleep(0.01)
        writer.close()
        server.close()

    asyncio.run(main())
    assert seen and seen[0] != 0


def test_the_margin_grows_by_the_servers_own_overhead(runner):
    client, server = make_client(runner, slo_ms=1000.0, max_batch=8, margin_ms=5.0)
    with client:
        for _ in range(16):
            client.post("/v2/models/tiny/infer", json=json_request(images(8)))
        text = client.get("/metrics").text
    added = server.controller.margin_s - 5e-3
    assert 0 < added < 0.5  # parsing 8 images of JSON and answering took some time
    assert f"usnet_margin_seconds {server.controller.margin_s!r}" in text
