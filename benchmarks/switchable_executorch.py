"""ExecuTorch probe for issue 27: can one ``.pte`` hold every width with its weights stored once?

executorch is not a usnet dependency (it pulls torchao, coremltools, scikit-learn, pandas and
more); this script runs where it is importable, e.g. installed out of the venv::

    python -m pip install --no-deps --target /tmp/et/site executorch==1.5.1 torchao==0.18.0 \\
        flatbuffers ruamel.yaml tabulate kgb expecttest parameterized py-cpuinfo
    PYTHONPATH=$PWD:/tmp/et/site .venv/bin/python benchmarks/switchable_executorch.py \\
        --out benchmarks/results/switchable-DATE/executorch.json

For 8 widths of the main job's US-ConvNet (28 px, random weights, BN calibrated on random images),
all lowered with the XNNPACK partitioner, it writes and times (ExecuTorch's Python runtime, batch
1, median of interleaved rounds):

* ``standalone``: one ``.pte`` per width (``torch.export`` of ``usnet.export(model, w)``);
* ``methods``: one ``.pte`` with one method per width, each method that width's plain model;
* ``sliced``: one ``.pte`` with one method per width, each method slicing the shared full-width
  weights in its forward (the ONNX design: weights stored once, sliced per entry).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import usnet

WIDTHS = [0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.875, 1.0]


class Sliced(nn.Module):
    """A width's plain model whose weights are prefix slices of ``shared`` (full width), taken
    in the forward: the exported program holds the full tensors once and slices them."""

    def __init__(self, plain: nn.Module, shared: nn.Module, full: dict):
        super().__init__()
        self.plain, self.shared, self.slices = plain, shared, {}
        for name, tensor in plain.state_dict().items():
            source = full[name]
            index = tuple(slice(0, s) for s in tensor.shape)
            if source.shape != tensor.shape and torch.equal(source[index], tensor):
                self.slices[name] = index

    def forward(self, x):
        params = {n: getattr(self.shared, n.replace(".", "_"))[i] for n, i in self.slices.items()}
        return torch.func.functional_call(self.plain, params, (x,))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    import executorch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.runtime import Runtime

    version = getattr(executorch, "__version__", None)
    if version is None:
        from executorch import version as v

        version = v.__version__
    torch.manual_seed(0)
    model = usnet.models.create_model("us_convnet", num_classes=10, in_channels=1)
    gen = torch.Generator().manual_seed(0)
    usnet.calibrate(model, [torch.randn(32, 1, 28, 28, generator=gen)], widths=WIDTHS)
    example = torch.randn(2, 1, 28, 28)  # batch 2 at export: batch 1 would specialize the dim
    dynamic = ({0: torch.export.Dim("batch", min=1, max=64)},)
    full = usnet.export(model, 1.0).state_dict()
    holder = nn.Module()
    for name, tensor in full.items():
        holder.register_buffer(name.replace(".", "_"), tensor.clone())

    def lower(programs) -> bytes:
        edge = to_edge_transform_and_lower(programs, partitioner=[XnnpackPartitioner()])
        return edge.to_executorch().buffer

    def program(module):
        return torch.export.export(module, (example,), dynamic_shapes=dynamic)

    result = {"executorch": version, "torch": torch.__version__, "widths": WIDTHS}
    with tempfile.TemporaryDirectory() as tmp:
        files, seconds = {}, {}
        start = time.perf_counter()
        for w in WIDTHS:
            files[f"standalone-{w}"] = lower(program(usnet.export(model, w, trace=True)))
        seconds["standalone"] = time.perf_counter() - start
        start = time.perf_counter()
        files["methods"] = lower(
            {f"w{w}": program(usnet.export(model, w, trace=True)) for w in WIDTHS}
        )
        seconds["methods"] = time.perf_counter() - start
        start = time.perf_counter()
        files["sliced"] = lower(
            {f"w{w}": program(Sliced(usnet.export(model, w, trace=True), holder, full))
             for w in WIDTHS}
        )  # fmt: skip
        seconds["sliced"] = time.perf_counter() - start
        for name, data in files.items():
            (Path(tmp) / f"{name}.pte").write_bytes(data)
        sizes = {k: len(v) for k, v in files.items()}
        result["bytes"] = {
            "standalone_full_width": sizes["standalone-1.0"],
            "standalone_sum": sum(v for k, v in sizes.items() if k.startswith("standalone")),
            "methods": sizes["methods"],
            "sliced": sizes["sliced"],
        }
        result["lower_s"] = seconds
        runtime = Runtime.get()
        methods = runtime.load_program(str(Path(tmp) / "methods.pte"))
        sliced = runtime.load_program(str(Path(tmp) / "sliced.pte"))
        x = torch.randn(1, 1, 28, 28)
        rows = []
        for w in WIDTHS:
            variants = {
                "standalone": runtime.load_program(str(Path(tmp) / f"standalone-{w}.pte"))
                .load_method("forward"),
                "methods": methods.load_method(f"w{w}"),
                "sliced": sliced.load_method(f"w{w}"),
            }  # fmt: skip
            with torch.no_grad():
                reference = usnet.export(model, w)(x)
            row = {"width": w, "max_abs_diff": {}, "ms": {}}
            times = {k: [] for k in variants}
            for k, method in variants.items():
                row["max_abs_diff"][k] = float((method.execute([x])[0] - reference).abs().max())
            for _ in range(args.rounds):
                for k, method in variants.items():
                    calls = 20 if k != "sliced" else 2
                    start = time.perf_counter()
                    for _ in range(calls):
                        method.execute([x])
                    times[k].append((time.perf_counter() - start) / calls * 1e3)
            row["ms"] = {k: statistics.median(v) for k, v in times.items()}
            rows.append(row)
            print(f"w{w}: " + ", ".join(f"{k} {v:.4f} ms" for k, v in row["ms"].items()),
                  flush=True)  # fmt: skip
        result["latency_batch1"] = rows
    print(json.dumps(result["bytes"]), json.dumps(result["lower_s"]))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
