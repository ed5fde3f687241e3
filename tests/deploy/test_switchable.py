"""One artifact, every width (usnet.export_switchable, usnet.Switchable, usnet export --switchable):
each entry computes what the standalone export of its width computes, the width rule holds in
raw onnxruntime and in the loader, weights are stored once, and bad input is refused."""

from __future__ import annotations

import bisect
import functools
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from usnet_testing import liven, max_abs_diff, zoo_model

import usnet
from usnet.cli import main
from usnet.deploy.latency import profile_latency, select_entry
from usnet.deploy.onnx_file import META_KEY, set_metadata
from usnet.deploy.switchable import SwitchableArtifact, load_switchable

SIZE = (1, 1, 28, 28)
WIDTHS = (0.25, 0.5, 0.75, 1.0)
README = Path(__file__).resolve().parents[2] / "README.md"


@functools.lru_cache(maxsize=None)
def calibrated():
    """A US-ConvNet with O(1) logits, calibrated at WIDTHS and at one non-uniform width."""
    torch.manual_seed(0)
    model = liven(zoo_model("us_convnet"))
    roots = usnet.channel_plan(model).root_names
    searched = {name: 0.5 for name in roots} | {roots[0]: 0.25, roots[-1]: 0.75}
    images = torch.randn(16, *SIZE[1:], generator=torch.Generator().manual_seed(1))
    usnet.calibrate(model, [images], widths=[*WIDTHS, searched], num_images=16)
    return model, searched


@functools.lru_cache(maxsize=None)
def artifact(fuse_bn: bool = False, searched: bool = False) -> bytes:
    """The bytes of a switchable file (written once per session into a temporary directory)."""
    import tempfile

    model, nu = calibrated()
    widths = {f"w{w}": w for w in WIDTHS} | ({"searched": nu} if searched else {})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        usnet.export_switchable(model, widths, path, fuse_bn=fuse_bn, input_size=SIZE)
        return path.read_bytes()


def images(n=3, seed=5):
    return torch.randn(n, *SIZE[1:], generator=torch.Generator().manual_seed(seed))


def raw_session(data: bytes):
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def standalone_onnx(width, tmp_path, fuse_bn=False):
    """The single-width export of ``width`` (usnet.export_artifact), run in onnxruntime."""
    path = tmp_path / f"w{width}-{fuse_bn}.onnx"
    if not path.exists():
        usnet.export_artifact(
            calibrated()[0], width, path, "onnx", fuse_bn=fuse_bn, input_size=SIZE
        )
    session = raw_session(path.read_bytes())
    return lambda x: torch.from_numpy(session.run(None, {"input": x.numpy()})[0])


def plain_torch(width, x):
    with torch.no_grad():
        return usnet.export(calibrated()[0], width)(x)


def expected_entry(width: float) -> int:
    """The rule, written independently: the widest entry at most ``width``, else the first."""
    if math.isnan(width):
        return 0
    return max(bisect.bisect_right(WIDTHS, width) - 1, 0)


@pytest.mark.parametrize("fuse_bn", [False, True])
def test_each_entry_equals_its_standalone_export(fuse_bn, tmp_path):
    session = raw_session(artifact(fuse_bn))
    x = images()
    for index, width in enumerate(WIDTHS):
        logits, width_run, entry_run = session.run(
            None, {"input": x.numpy(), "width": np.array(width, np.float32)}
        )
        logits = torch.from_numpy(logits)
        assert (float(width_run), int(entry_run)) == (width, index)
        assert logits.abs().max() > 0.05  # not ~0
        assert max_abs_diff(logits, standalone_onnx(width, tmp_path, fuse_bn)(x)) <= 1e-5
        assert max_abs_diff(logits, plain_torch(width, x)) <= (1e-3 if fuse_bn else 1e-4)


WIDTH_GRID = [-1.0, 0.0, 0.1, 0.25, 0.3, 0.4999, 0.5, 0.74, 0.75, 0.99, 1.0, 1.5, 7.0,
              math.inf, -math.inf, math.nan]  # fmt: skip


def test_width_rule_in_raw_onnxruntime(tmp_path):
    session = raw_session(artifact())
    x = images(n=2)
    by_entry = {i: standalone_onnx(w, tmp_path)(x) for i, w in enumerate(WIDTHS)}
    for width in WIDTH_GRID:
        logits, width_run, entry_run = session.run(
            None, {"input": x.numpy(), "width": np.array(width, np.float32)}
        )
        index = expected_entry(width)
        assert (int(entry_run), float(width_run)) == (index, WIDTHS[index]), width
        assert max_abs_diff(torch.from_numpy(logits), by_entry[index]) <= 1e-5, width


def test_width_rule_through_load_artifact(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(artifact())
    art = usnet.load_artifact(path)
    assert isinstance(art, SwitchableArtifact)
    assert art.widths == list(WIDTHS) and art.names == [f"w{w}" for w in WIDTHS]
    graph = load_switchable(path, dispatch="graph")
    x = images(n=4, seed=8)
    for width in [w for w in WIDTH_GRID if 0 <= w <= 1]:
        index = expected_entry(width)
        logits, width_run, entry_run = art.run(x, width)
        assert (entry_run, width_run) == (index, WIDTHS[index])
        assert max_abs_diff(logits, plain_torch(WIDTHS[index], x)) <= 1e-4
        # the file's own If graph and the per-entry sessions compute the same numbers
        assert torch.equal(graph.run(x, width)[0], logits)
    assert art(x).shape == (4, 10) and art.run(x)[2] == 3  # default: the widest
    for bad in (math.nan, -0.1, 1.01, math.inf):
        with pytest.raises(usnet.UsnetError, match=r"valid widths are 0 to 1 .*entries: w0.25 "):
            art(x, bad)
    with pytest.raises(usnet.UsnetError, match=r"no entry named 'w9'; entries: w0.25, w0.5"):
        art(x, entry="w9")


def test_non_uniform_entry_by_index_and_name(tmp_path):
    model, nu = calibrated()
    data = artifact(searched=True)
    meta = json.loads(next(p.value for p in onnx.load_from_string(data).metadata_props
                           if p.key == META_KEY))  # fmt: skip
    assert [e["name"] for e in meta["entries"]] == [*(f"w{w}" for w in WIDTHS), "searched"]
    assert meta["entries"][4]["width"] == nu
    assert meta["entries"][4]["macs"] == usnet.profile(model, nu, SIZE).macs
    session = raw_session(data)
    x = images()
    expected = plain_torch(nu, x)
    logits, width_run, entry_run = session.run(
        None,
        {"input": x.numpy(), "width": np.array(0.6, np.float32), "entry": np.array(4, np.int64)},
    )
    assert int(entry_run) == 4 and math.isnan(float(width_run))
    assert max_abs_diff(torch.from_numpy(logits), expected) <= 1e-4
    # without entry (its default -1) the width decides; an index past the end clamps
    assert int(session.run(None, {"input": x.numpy(), "width": np.array(0.6, np.float32)})[2]) == 1
    big = {"input": x.numpy(), "width": np.array(0.6, np.float32), "entry": np.array(99, np.int64)}
    assert int(session.run(None, big)[2]) == 4
    path = tmp_path / "nu.onnx"
    path.write_bytes(data)
    art = usnet.load_artifact(path)
    assert torch.equal(art(x, entry="searched"), art(x, entry=4))
    assert max_abs_diff(art(x, entry="searched"), expected) <= 1e-4


def test_weights_are_stored_once(tmp_path):
    model, _ = calibrated()
    sizes = {}
    for w in WIDTHS:
        usnet.export_artifact(model, w, tmp_path / f"{w}.onnx", "onnx", input_size=SIZE)
        sizes[w] = (tmp_path / f"{w}.onnx").stat().st_size
    switchable = len(artifact())
    # 4 entries cost the full-width file plus their BN statistics (2 floats per channel each)
    assert switchable <= 1.05 * sizes[1.0]
    assert switchable < 0.75 * sum(sizes.values())
    proto = onnx.load_from_string(artifact())
    shared = [t for t in proto.graph.initializer if t.name.startswith("shared/")]
    weight = next(t for t in shared if t.name == "shared/features.3.0.weight")
    assert tuple(weight.dims) == (128, 64, 3, 3)  # the full tensor, once; entries slice it


def test_bad_inputs_and_files(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(artifact())
    art = usnet.load_artifact(path)
    expected = r"takes images of shape \(N, 1, 28, 28\) and dtype float32"
    with pytest.raises(
        usnet.UsnetError, match=expected + r", got Tensor of shape \(2, 3, 28, 28\)"
    ):
        art(torch.randn(2, 3, 28, 28), 0.5)
    with pytest.raises(usnet.UsnetError, match=expected + r".*dtype torch.float64"):
        art(torch.randn(2, 1, 28, 28, dtype=torch.float64), 0.5)
    with pytest.raises(usnet.UsnetError, match=expected):
        art(torch.randn(1, 28, 28), 0.5)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(artifact()[:5000])
    foreign = tmp_path / "foreign.onnx"
    foreign.write_text("not a model\n")
    for bad in (truncated, foreign):
        with pytest.raises(usnet.UsnetError, match=rf"'{re.escape(str(bad))}' is not a valid ONNX"):
            usnet.load_artifact(bad)
    single = tmp_path / "single.onnx"
    usnet.export_artifact(calibrated()[0], 0.5, single, "onnx", input_size=SIZE)
    with pytest.raises(usnet.UsnetError, match="is not a switchable usnet artifact"):
        load_switchable(single)
    assert usnet.load_artifact(single)(images()).shape == (3, 10)  # single-width files still load


def test_refusals_write_nothing(tmp_path, monkeypatch):
    model, nu = calibrated()
    out = tmp_path / "m.onnx"
    with pytest.raises(usnet.UsnetError, match="at least two distinct channel configurations"):
        usnet.export_switchable(model, [0.25, 0.26], out, input_size=SIZE)
    with pytest.raises(usnet.UsnetError, match="writes onnx, got 'pt'"):
        usnet.export_switchable(model, WIDTHS, out, "pt", input_size=SIZE)
    with pytest.raises(usnet.UncalibratedWidthError):
        usnet.export_switchable(model, [0.25, 0.45], out, input_size=SIZE)
    with pytest.raises(usnet.UsnetError, match="'a' and 'b' are the same network"):
        usnet.export_switchable(model, {"a": 0.25, "b": 0.26, "c": 1.0}, out, input_size=SIZE)
    # an entry that differs from its standalone export is refused: nothing is written
    import usnet.deploy.switchable_onnx as graph

    folded = graph.fold_scale_bias

    def off(*args, **kwargs):
        scale, bias = folded(*args, **kwargs)
        return scale * 1.001, bias

    monkeypatch.setattr(graph, "fold_scale_bias", off)
    with pytest.raises(usnet.VerificationError, match="differs from the standalone export"):
        usnet.export_switchable(model, WIDTHS, out, input_size=SIZE)
    assert not list(tmp_path.iterdir())


def test_latency_table_round_trip(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(artifact())
    before = onnx.load(str(path))
    tables = profile_latency(path, threads=[1], batch_sizes=[1, 2], warmup=1, repeats=3)
    after = onnx.load(str(path))
    assert after.graph.SerializeToString() == before.graph.SerializeToString()  # only metadata
    meta = json.loads(next(p.value for p in after.metadata_props if p.key == META_KEY))
    assert meta["latency"] == tables and [t["batch_size"] for t in tables] == [1, 2]
    table = tables[0]
    assert table["runtime"] == "onnxruntime" and table["runtime_version"] == onnxruntime.__version__
    assert table["threads"] == 1 and table["device"].startswith("cpu:")
    assert table["entries"] == [f"w{w}" for w in WIDTHS] and all(m > 0 for m in table["median_ms"])
    assert usnet.load_artifact(path).latency == tables
    # select reads the stored table: with medians 1, 2, 3, 4 ms stored for this machine, a
    # 2.5 ms budget picks the second entry (measuring would give ~0.05-0.5 ms: all fit)
    proto = onnx.load(str(path))
    meta["latency"][0]["median_ms"] = [1.0, 2.0, 3.0, 4.0]
    set_metadata(proto, meta)
    path.write_bytes(proto.SerializeToString())
    chosen = select_entry(path, max_latency_ms=2.5)
    assert chosen["latency"]["source"] == "stored" and chosen["chosen"]["name"] == "w0.5"
    assert [e["latency_ms"] for e in chosen["entries"]] == [1.0, 2.0, 3.0, 4.0]
    # measuring again replaces the table of the same key and keeps the others
    again = profile_latency(path, threads=[1], batch_sizes=[2], warmup=0, repeats=1)
    latency = usnet.load_artifact(path).latency
    assert [t["batch_size"] for t in latency] == [1, 2] and latency[1] == again[0]
    assert latency[0]["median_ms"] == [1.0, 2.0, 3.0, 4.0]  # the other table is kept as it was
    # another thread count: measured now, the file is not changed
    data = path.read_bytes()
    other = select_entry(path, max_latency_ms=1e6, threads=2, warmup=0, repeats=1)
    assert other["latency"]["source"] == "measured" and other["chosen"]["name"] == "w1.0"
    assert path.read_bytes() == data


def test_pytorch_runtime_shares_weights_and_equals_exports():
    model, nu = calibrated()
    sw = usnet.Switchable(model, {**{f"w{w}": w for w in WIDTHS}, "searched": nu})
    x = images()
    for width in [w for w in WIDTH_GRID if 0 <= w <= 1]:
        index = expected_entry(width)
        assert sw.entry_index(width) == index
        assert torch.equal(sw(x, width=width), plain_torch(WIDTHS[index], x))
    assert torch.equal(sw(x, entry="searched"), plain_torch(nu, x))
    # the first conv takes every input channel: each entry's weight is a view of the widest's
    widest = sw.modules[3].features[0][0].weight
    for module in sw.modules[:3]:
        weight = module.features[0][0].weight
        assert weight.untyped_storage().data_ptr() == widest.untyped_storage().data_ptr()
    memory = sw.memory()
    separate = sum(t.numel() * t.element_size() for m in sw.modules
                   for t in [*m.parameters(), *m.buffers()])  # fmt: skip
    assert memory["shared_tensors"] > 0 and memory["total_bytes"] < separate
    with pytest.raises(usnet.UsnetError, match="valid widths are 0 to 1"):
        sw(x, width=math.nan)


# --- command line -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model, _ = calibrated()
    rows = [{"width": w, "config_id": usnet.profile(model, w, SIZE).config_id, "top1": 0.8 + 0.1 * w}
            for w in WIDTHS]  # fmt: skip
    return usnet.save(model, tmp_path_factory.mktemp("ckpt") / "m.pt", extra={"spectrum": rows})


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_round_trip_and_force(checkpoint, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    argv = ["export", checkpoint, "--widths", "0.25,0.5,1.0", "--switchable", "--format", "onnx",
            "--out", out, "--input-size", "1,1,28,28"]  # fmt: skip
    code, stdout, err = run(argv, capsys)
    assert code == 0, err
    assert "wrote" in stdout and "3 entries in one onnx file" in stdout
    art = usnet.load_artifact(out)
    assert [e["top1"] for e in art.entries] == pytest.approx([0.825, 0.85, 0.9])
    x = images()
    assert max_abs_diff(art(x, width=0.6), plain_torch(0.5, x)) <= 1e-4
    data = out.read_bytes()
    code, _, err = run(argv, capsys)  # an existing --out: refused, untouched
    assert code == 2 and "already exists" in err and "--force" in err
    assert out.read_bytes() == data
    code, _, err = run([*argv, "--force", "--fuse-bn"], capsys)
    assert code == 0, err
    assert (
        out.read_bytes() != data
        and json.loads(
            next(p.value for p in onnx.load(str(out)).metadata_props if p.key == META_KEY)
        )["fused_bn"]
    )
    code, stdout, err = run(["profile", "--latency", out, "--repeats", 2, "--warmup", 0], capsys)
    assert code == 0 and "wrote the latency table" in stdout, err
    code, stdout, err = run(["select", out, "--max-macs", "6M", "--json"], capsys)
    assert code == 0 and json.loads(stdout)["chosen"]["name"] == "w0.500", err
    code, _, err = run(["select", out, "--max-macs", "1K"], capsys)
    assert code == 2 and "no entry of" in err and "the cheapest, 'w0.250'" in err


def test_cli_named_non_uniform_entry(checkpoint, tmp_path, capsys):
    model, nu = calibrated()
    spec = tmp_path / "searched.json"  # what usnet search --out writes: {"width": {...}, ...}
    spec.write_text(json.dumps({"width": nu, "test_top1": {}}))
    out = tmp_path / "m.onnx"
    code, stdout, err = run(["export", checkpoint, "--widths", "0.25,1.0", "--entry",
                             f"searched={spec}", "--switchable", "--format", "onnx", "--out", out,
                             "--input-size", "1,1,28,28"], capsys)  # fmt: skip
    assert code == 0, err
    art = usnet.load_artifact(out)
    assert art.names == ["w0.250", "w1.000", "searched"] and art.entries[2]["width"] == nu
    x = images()
    assert max_abs_diff(art(x, entry="searched"), plain_torch(nu, x)) <= 1e-4
    code, _, err = run(["export", checkpoint, "--entry", "bad", "--switchable", "--format", "onnx",
                        "--out", tmp_path / "n.onnx"], capsys)  # fmt: skip
    assert code == 2 and "--entry takes NAME=WIDTH, got 'bad'" in err


def test_readme_snippet_runs_without_usnet(tmp_path):
    text = README.read_text()
    section = text[text.index("**One file, any width at run time**") :]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    snippet = re.sub(r"^  ", "", snippet, flags=re.M)
    assert len([line for line in snippet.splitlines() if line.strip()]) <= 5
    (tmp_path / "m.onnx").write_bytes(artifact())
    check = (
        "\nimport sys\n"
        "assert not any(n.split('.')[0] in ('usnet', 'torch') for n in sys.modules), 'imported'\n"
        "print(logits.shape, float(width_run), int(entry_run))\n"
    )
    done = subprocess.run([sys.executable, "-c", snippet + check], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["(8,", "10)", "0.5", "1"]


def test_every_batchnorm_is_folded_even_where_the_exporter_deduplicates(tmp_path):
    """A fresh model's BatchNorms all hold weight 1 and bias 0: torch.onnx.export writes such
    equal tensors once and the others as Identity of it. Each entry still folds its own
    statistics (no BatchNormalization left for onnxruntime to fold with another formula), so
    it equals the standalone export to the last bit."""
    torch.manual_seed(0)
    model = zoo_model("us_convnet")
    usnet.calibrate(model, [images(16, seed=3)], widths=[0.25, 1.0], num_images=16)
    result = usnet.export_switchable(model, [0.25, 1.0], tmp_path / "m.onnx", input_size=SIZE)
    proto = onnx.load(str(tmp_path / "m.onnx"))
    ops = []

    def walk(graph):
        for node in graph.node:
            ops.append(node.op_type)
            for attr in node.attribute:
                if attr.type == attr.GRAPH:
                    walk(attr.g)

    walk(proto.graph)
    assert ops.count("Conv") == 10 and "BatchNormalization" not in ops
    assert [e["max_abs_diff"] for e in result.entries] == [0.0, 0.0]


def test_cli_refuses_an_uncalibrated_width_without_data(checkpoint, tmp_path, capsys):
    """A width the checkpoint has no BN statistics for: one line naming it and the fix; no file."""
    out = tmp_path / "m.onnx"
    code, _, err = run(["export", checkpoint, "--widths", "0.25,0.6", "--switchable", "--format",
                        "onnx", "--out", out, "--input-size", "1,1,28,28"], capsys)  # fmt: skip
    assert code == 2 and "width 0.6 is not calibrated in" in err and "--data ROOT" in err
    assert not out.exists()
