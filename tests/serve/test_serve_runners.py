"""Runners of ``usnet serve``: each width's logits against the standalone export of that width
(or, for the switchable adapter, a hand-built ONNX graph computed in numpy)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from conftest import SPATIAL, WIDTHS, reference_logits
from onnx import TensorProto, helper

import usnet
from usnet.serve.runners import TorchRunner, open_runner, share_storage

X = np.random.default_rng(0).standard_normal((5, 3, SPATIAL, SPATIAL), dtype=np.float32)


def test_torch_runner_from_a_checkpoint(tiny_checkpoint):
    path, model, spectrum = tiny_checkpoint
    runner = open_runner(path)
    assert isinstance(runner, TorchRunner)
    assert runner.widths == tuple(WIDTHS)
    assert runner.top1 == {r["width"]: r["top1"] for r in spectrum}
    assert runner.input_shape == (3, SPATIAL, SPATIAL) and runner.num_classes == 10
    for w in WIDTHS:
        logits, ran = runner.run(X, w)
        assert ran == w
        np.testing.assert_allclose(logits, reference_logits(model, w, X), rtol=1e-5, atol=1e-6)


def two_conv_model():
    """conv-BN-ReLU twice: the second BN's statistics differ by width (its inputs do)."""
    from torch import nn

    plain = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))  # fmt: skip
    model = usnet.slimmable(plain, (0.25, 1.0), input_size=(1, 3, SPATIAL, SPATIAL))
    gen = torch.Generator().manual_seed(2)
    usnet.calibrate(model, [torch.randn(32, 3, SPATIAL, SPATIAL, generator=gen)], widths=WIDTHS,
                    num_images=32)  # fmt: skip
    return model


def test_narrower_widths_share_the_full_widths_storage():
    model = two_conv_model()
    modules = {w: usnet.export(model, w) for w in WIDTHS}
    separate = sum(t.numel() * t.element_size() for m in modules.values()
                   for t in [*m.parameters(), *m.buffers()])  # fmt: skip
    saved = share_storage(modules, modules[1.0])
    runner = TorchRunner(modules, (3, SPATIAL, SPATIAL))
    assert saved > 0
    assert runner.resident_bytes() == separate - saved

    def same(a, b):
        return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()

    narrow, full = modules[0.25], modules[1.0]
    assert same(narrow[0].weight, full[0].weight)  # (4, 3, 3, 3): the full width's first 4
    assert not same(narrow[4].running_mean, full[4].running_mean)  # calibrated per width
    for w in WIDTHS:  # sharing changed no value
        np.testing.assert_allclose(runner.run(X, w)[0], reference_logits(model, w, X), atol=1e-6)


def test_checkpoint_in_onnxruntime(tiny_checkpoint):
    path, model, _ = tiny_checkpoint
    runner = open_runner(path, runtime="onnx", threads=1, widths=[0.5, 1.0])
    assert runner.runtime == "onnxruntime" and runner.widths == (0.5, 1.0)
    for w in (0.5, 1.0):
        np.testing.assert_allclose(runner.run(X, w)[0], reference_logits(model, w, X), atol=1e-5)


def test_onnx_export_directory(tiny_checkpoint, tmp_path):
    _, model, spectrum = tiny_checkpoint
    # 0.6 and 0.75 give the same channels (24): one file; the widest of them stands for it
    usnet.export_widths(model, [0.25, 0.6, 0.75, 1.0], tmp_path / "m", "onnx", spectrum=spectrum,
                        input_size=(1, 3, SPATIAL, SPATIAL))  # fmt: skip
    runner = open_runner(tmp_path / "m")
    assert runner.runtime == "onnxruntime"
    assert runner.widths == (0.25, 0.75, 1.0)
    assert runner.top1 == {0.25: 0.6, 0.75: 0.8, 1.0: 0.9}
    assert runner.equivalent == {0.25: 0.25, 0.75: 0.6, 1.0: 1.0}
    for w in runner.widths:
        np.testing.assert_allclose(runner.run(X, w)[0], reference_logits(model, w, X), atol=1e-5)
    with pytest.raises(ValueError, match="--runtime onnx"):
        open_runner(tmp_path / "m", runtime="torch")


ENTRIES = [0.25, 0.5, 1.0]


def switchable_onnx(path, latency=None, width_output: str = "width_run", classes: int = 4):
    """A hand-built artifact of issue 27's contract: inputs ``input`` and ``width``, logits =
    (mean of each image channel) @ W * width_run, where width_run is the widest entry at most
    the requested width (the narrowest below them), output as ``width_output`` (ONNX names each
    value once, so an output cannot also be called ``width``, the input's name)."""
    rng = np.random.default_rng(3)
    weight = rng.standard_normal((3, classes)).astype(np.float32)
    steps = [ENTRIES[0]] + [b - a for a, b in zip(ENTRIES, ENTRIES[1:])]
    nodes = [helper.make_node("ReduceMean", ["input"], ["pooled"], axes=[2, 3], keepdims=0),
             helper.make_node("MatMul", ["pooled", "W"], ["raw"])]  # fmt: skip
    inits = [helper.make_tensor("W", TensorProto.FLOAT, weight.shape, weight.ravel())]
    terms = ["step0"]
    for k, (entry, step) in enumerate(zip(ENTRIES, steps)):
        inits += [helper.make_tensor(f"e{k}", TensorProto.FLOAT, [], [entry]),
                  helper.make_tensor(f"step{k}", TensorProto.FLOAT, [], [step])]  # fmt: skip
        if k:
            nodes += [helper.make_node("GreaterOrEqual", ["width", f"e{k}"], [f"ge{k}"]),
                      helper.make_node("Cast", [f"ge{k}"], [f"f{k}"], to=TensorProto.FLOAT),
                      helper.make_node("Mul", [f"f{k}", f"step{k}"], [f"t{k}"])]  # fmt: skip
            terms.append(f"t{k}")
    nodes += [helper.make_node("Sum", terms, [width_output]),
              helper.make_node("Mul", ["raw", width_output], ["logits"])]  # fmt: skip
    graph = helper.make_graph(
        nodes, "switchable",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, SPATIAL, SPATIAL]),
         helper.make_tensor_value_info("width", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes]),
         helper.make_tensor_value_info(width_output, TensorProto.FLOAT, [])],
        inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    meta = {
        "entries": [{"name": f"w{e}", "width": e, "top1": 0.5 + e / 10} for e in ENTRIES]
        + [{"name": "searched", "width": {"stage1": 0.5}}]
    }  # non-uniform: not served
    if latency is not None:
        meta["latency"] = latency
    helper.set_model_props(model, {"usnet.switchable": json.dumps(meta)})
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return weight


def expected_switchable(weight, images, width):
    return images.mean(axis=(2, 3)) @ weight * width


@pytest.mark.parametrize("width_output", ["width_run", "width_out"])
def test_switchable_onnx_adapter(tmp_path, width_output):
    path = tmp_path / "m.onnx"
    weight = switchable_onnx(path, width_output=width_output)
    runner = open_runner(path)
    assert runner.runtime == "onnxruntime"
    assert runner.widths == tuple(ENTRIES)
    assert runner.top1 == {e: pytest.approx(0.5 + e / 10) for e in ENTRIES}
    assert runner.input_shape == (3, SPATIAL, SPATIAL) and runner.num_classes == 4
    for w in ENTRIES:
        logits, ran = runner.run(X, w)
        assert ran == w  # read back from the graph's width output
        np.testing.assert_allclose(logits, expected_switchable(weight, X, w), rtol=1e-5)
    # the width that ran is read from the graph, not echoed: 0.7 runs the 0.5 entry
    import onnxruntime

    from usnet.serve.runners import _switchable_width

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits, ran = _switchable_width(session, 0.7, width_output)(X)
    assert ran == 0.5
    np.testing.assert_allclose(logits, expected_switchable(weight, X, 0.5), rtol=1e-5)


def test_switchable_latency_from_the_artifact(tmp_path):
    from usnet.deploy.latency import this_machine

    tables = [{**this_machine(1, b), "entries": [f"w{e}" for e in ENTRIES],
               "median_ms": [1 + 10 * e * b for e in ENTRIES]} for b in (1, 8)]  # fmt: skip
    switchable_onnx(tmp_path / "m.onnx", latency=tables)
    runner = open_runner(tmp_path / "m.onnx", threads=1)
    table = runner.latency([1, 8])
    assert table[(0.5, 8)] == pytest.approx((1 + 40) / 1e3)
    # measured at another thread count: not this server's numbers, so measured afresh
    other = open_runner(tmp_path / "m.onnx", threads=2).latency([1, 8], warmup=0, repeats=1)
    assert other[(0.5, 8)] < 0.02


def test_what_cannot_be_served(tmp_path, tiny_checkpoint):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_runner(tmp_path / "missing.pt")
    plain = tmp_path / "plain.onnx"
    usnet.export_artifact(
        tiny_checkpoint[1], 0.5, plain, "onnx", input_size=(1, 3, SPATIAL, SPATIAL)
    )
    with pytest.raises(ValueError, match="not a switchable usnet artifact"):
        open_runner(plain)
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    with pytest.raises(ValueError, match="is not a valid ONNX model"):
        open_runner(tmp_path / "junk.onnx")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="is not servable"):
        open_runner(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="unknown runtime 'tvm'; valid: onnx, torch"):
        open_runner(tiny_checkpoint[0], runtime="tvm")
    with pytest.raises(ValueError, match="0.1"):
        open_runner(tiny_checkpoint[0], widths=[0.1])  # outside the model's width range


def test_widths_giving_one_network_are_served_once(tiny_checkpoint):
    runner = open_runner(tiny_checkpoint[0], widths=[0.25, 0.6, 0.75, 1.0])
    assert runner.widths == (0.25, 0.75, 1.0)  # 0.6 and 0.75 both give 24 channels
    assert runner.equivalent == {0.25: 0.25, 0.75: 0.6, 1.0: 1.0}


def test_a_real_switchable_artifact_is_served_at_each_width(tmp_path, tiny_checkpoint):
    """``usnet export --switchable``'s file, end to end: each width equals its standalone
    export, the spectrum's top-1 comes through the metadata."""
    path, model, spectrum = tiny_checkpoint
    usnet.export_switchable(model, WIDTHS, tmp_path / "s.onnx", input_size=(1, 3, SPATIAL, SPATIAL),
                            spectrum=spectrum)  # fmt: skip
    runner = open_runner(tmp_path / "s.onnx")
    assert runner.widths == tuple(WIDTHS)
    assert runner.top1 == {r["width"]: pytest.approx(r["top1"]) for r in spectrum}
    for w in WIDTHS:
        logits, ran = runner.run(X, w)
        assert ran == w
        np.testing.assert_allclose(logits, reference_logits(model, w, X), atol=1e-5)
