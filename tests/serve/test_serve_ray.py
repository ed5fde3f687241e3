"""The Ray Serve deployment on a local Ray instance (``-m ray``; needs ``pip install
'ray[serve]'``, which the dev extra does not install: too large for CI's time)."""

from __future__ import annotations

import json
import urllib.request

import numpy as np
import pytest
from conftest import SPATIAL, reference_logits

from usnet.serve.app import bind

pytestmark = pytest.mark.ray
ray = pytest.importorskip("ray", reason="needs ray[serve]: pip install 'ray[serve]'")


def test_replicas_serve_the_open_inference_protocol(tiny_checkpoint):
    from ray import serve

    from usnet.serve.ray_serve import application

    path, model, spectrum = tiny_checkpoint
    probe = bind("127.0.0.1", 0)
    port = probe.getsockname()[1]
    probe.close()
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(application(str(path), slo_ms=1000, max_batch=8, name="tiny", min_replicas=1,
                              max_replicas=2, num_cpus=0.5), route_prefix="/", name="usnet")  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        meta = json.load(urllib.request.urlopen(f"{base}/v2/models/tiny", timeout=60))
        assert [w["width"] for w in meta["parameters"]["widths"]] == [r["width"] for r in spectrum]
        x = np.random.default_rng(0).standard_normal((2, 3, SPATIAL, SPATIAL), dtype=np.float32)
        body = {"inputs": [{"name": "input", "shape": [2, 3, SPATIAL, SPATIAL],
                            "datatype": "FP32", "data": x.ravel().tolist()}],
                "parameters": {"width": 0.5}}  # fmt: skip
        request = urllib.request.Request(f"{base}/v2/models/tiny/infer",
                                         json.dumps(body).encode(), method="POST")  # fmt: skip
        answer = json.load(urllib.request.urlopen(request, timeout=60))
        assert answer["parameters"]["width"] == 0.5
        logits = np.asarray(answer["outputs"][0]["data"], np.float32).reshape(2, 10)
        np.testing.assert_allclose(logits, reference_logits(model, 0.5, x), atol=1e-5)
        config = serve.status().applications["usnet"].deployments["usnet-tiny"]
        assert config.status == "HEALTHY"
    finally:
        serve.shutdown()
        ray.shutdown()
