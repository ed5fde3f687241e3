"""Converter coverage over torchvision's classification and segmentation zoos.

For every model (random weights, at most ``--max-params`` parameters, a small input) the row says:

* ``converted``: ``usnet.slimmable`` converts it, the converted model at full width equals the
  original bit for bit in eval mode (its own BatchNorm statistics), and at a random width, after
  calibration on random images, the exported plain model equals the slimmable one;
* ``refused``: ``usnet.slimmable`` raised a ``ConversionError`` (its message is the reason);
* ``wrong``: anything else (another exception, a mismatch at full width, a mismatch of the
  export at the random width). The target is none.

Run: ``.venv/bin/python benchmarks/zoo_coverage.py [--markdown] [--only NAME ...]``.
It is a benchmark (minutes on 2 CPU cores), not a test.
"""

from __future__ import annotations

import argparse
import copy
import random
import sys
import time
import traceback
import warnings

import torch
import torchvision
from torch import nn

import usnet

FIXED_SIZE = ("vit_", "swin", "maxvit")  # need 224 px (position embeddings, window sizes)
TRANSFORMERS = FIXED_SIZE


def families() -> list[tuple[str, str]]:
    models = [
        (n, "classification") for n in torchvision.models.list_models(module=torchvision.models)
    ]
    models += [
        (n, "segmentation")
        for n in torchvision.models.list_models(module=torchvision.models.segmentation)
    ]
    return models


def builder(name: str):
    return torchvision.models.get_model_builder(name)


def build(name: str) -> nn.Module:
    kwargs = {"weights": None}
    if name in ("googlenet", "inception_v3"):
        kwargs["init_weights"] = False  # scipy-based init is slow and irrelevant here
    if builder(name).__module__.startswith("torchvision.models.segmentation"):
        kwargs["weights_backbone"] = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return builder(name)(**kwargs)


def num_params(name: str) -> int:
    """From the published weights' metadata: counting needs no model built."""
    return list(torchvision.models.get_model_weights(name))[0].meta["num_params"]


def input_size(name: str) -> int:
    if name.startswith(FIXED_SIZE):
        return 224
    if name == "inception_v3":
        return 299  # its auxiliary head needs 17x17 feature maps
    return 64


def outputs(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in outputs(out[k])]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in outputs(o)]
    return []


@torch.no_grad()
def randomize_statistics(model: nn.Module) -> nn.Module:
    """Random BatchNorm statistics, marked as trained (a fresh model's are the initial ones,
    which usnet rightly treats as never calibrated)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.num_batches_tracked.fill_(1)
    return model


def check(name: str, seed: int = 0) -> tuple[str, str]:
    torch.manual_seed(seed)
    model = randomize_statistics(build(name)).eval()
    size = input_size(name)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        reference = outputs(model(x))
    converted = copy.deepcopy(model)
    try:
        usnet.slimmable(converted, (0.25, 1.0), input_size=(1, 3, size, size))
    except usnet.ConversionError as err:
        return "refused", str(err).splitlines()[0]
    converted.eval()
    with torch.no_grad():
        got = outputs(converted(x))
    if len(got) != len(reference) or not all(torch.equal(a, b) for a, b in zip(got, reference)):
        diff = (
            max((a - b).abs().max().item() for a, b in zip(got, reference))
            if len(got) == len(reference)
            else None
        )
        return "wrong", f"full width differs from the original (max abs diff {diff})"
    width = random.Random(name).uniform(0.25, 0.9)  # a different random width per model
    images = torch.randn(16, 3, size, size)
    usnet.calibrate(converted, [images[:8], images[8:]], widths=[width], num_images=16)
    usnet.set_width(converted, width)
    plain = usnet.export(converted, width)
    with torch.no_grad():
        slim = outputs(converted(x))
        exported = outputs(plain(x))
    if not all(torch.allclose(a, b, rtol=1e-4, atol=1e-4) for a, b in zip(slim, exported)):
        diff = max((a - b).abs().max().item() for a, b in zip(slim, exported))
        return "wrong", f"export at width {width:.3f} differs (max abs diff {diff:.3g})"
    macs = usnet.profile(converted, width, input_size=(1, 3, size, size)).macs
    full_macs = usnet.profile(converted, 1.0, input_size=(1, 3, size, size)).macs
    return "converted", f"width {width:.3f}: {macs / full_macs:.2f} of full MACs"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-params", type=float, default=100e6)
    parser.add_argument("--only", nargs="*", default=None, help="model names (default: all)")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of wrong results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name, family in families():
        if args.only and name not in args.only:
            continue
        params = num_params(name)
        if params > args.max_params:
            continue
        start = time.perf_counter()
        try:
            verdict, detail = check(name)
        except Exception as err:  # every other failure is a wrong result
            verdict, detail = "wrong", f"{type(err).__name__}: {err}".splitlines()[0]
            if args.verbose:
                traceback.print_exc(file=sys.stderr)
        seconds = time.perf_counter() - start
        kind = "transformer" if name.startswith(TRANSFORMERS) else "cnn"
        rows.append((name, family, kind, params, verdict, detail, seconds))
        print(
            f"{name:32s} {verdict:9s} {seconds:6.1f}s  {detail[:150]}", file=sys.stderr, flush=True
        )
    if args.markdown:
        print("| model | task | params | result | detail |")
        print("|---|---|---|---|---|")
        for name, family, kind, params, verdict, detail, _ in rows:
            detail = detail.replace("|", "\\|")[:160]
            print(f"| {name} | {family} | {params / 1e6:.1f}M | {verdict} | {detail} |")
    counts = {}
    for _, _, kind, _, verdict, _, _ in rows:
        counts[(kind, verdict)] = counts.get((kind, verdict), 0) + 1
    for kind in ("cnn", "transformer"):
        total = sum(v for (k, _), v in counts.items() if k == kind)
        if total:
            parts = ", ".join(
                f"{counts.get((kind, v), 0)} {v}" for v in ("converted", "refused", "wrong")
            )
            print(f"\n{kind}s: {total} models: {parts}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
