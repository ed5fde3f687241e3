"""``usnet serve``: one US-Net over HTTP (Open Inference Protocol) under a latency objective."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UsnetValueError
from .args import whole_number, widths_arg


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model over HTTP (Open Inference Protocol) under a "
                       "latency SLO, choosing the width per batch from the load")  # fmt: skip
    p.add_argument("artifact", help="checkpoint, usnet export --widths directory, or switchable "
                   "ONNX file")  # fmt: skip
    p.add_argument("--slo-ms", type=float, default=50.0, help="latency objective (default 50)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=whole_number(0), default=8000, help="0: any free port")
    p.add_argument("--max-batch", type=whole_number(1), default=32, help="images per batch")
    p.add_argument("--max-queue", type=whole_number(1), default=None,
                   help="images waiting at most (default 64 batches, <= 256 MiB); beyond: 503")  # fmt: skip
    p.add_argument("--runtime", choices=["onnx", "torch"], default=None,
                   help="default: torch for checkpoints, the artifact's own otherwise")  # fmt: skip
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--name", default=None, help="model name in the URLs (default: file stem)")
    p.add_argument("--widths", type=widths_arg, default=None,
                   help="serve only these widths (default: every width of the spectrum/artifact)")  # fmt: skip
    p.add_argument("--threads", type=whole_number(1), default=None, help="CPU threads of the model")
    p.add_argument("--max-body-mb", type=float, default=64.0, help="request size limit (413)")
    p.add_argument("--max-connections", type=whole_number(1), default=256,
                   help="open connections at most; beyond: 503 (bounds memory)")  # fmt: skip
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import prometheus_client  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        raise UsnetValueError(f"usnet serve needs the serve extra ({err.name} is missing): "
                              "pip install 'usnet[serve]'") from None  # fmt: skip
    import torch

    from ..serve.app import ModelServer, bind, describe, serve
    from ..serve.runners import open_runner

    if args.max_body_mb <= 0:
        raise UsnetValueError(f"--max-body-mb must be positive, got {args.max_body_mb:g}")
    bind(args.host, args.port).close()  # a taken port or a bad host fails before the model loads
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    runner = open_runner(args.artifact, args.runtime, args.device, args.threads, args.widths)
    name = args.name or Path(args.artifact.rstrip("/")).name.split(".")[0]
    server = ModelServer(runner, name=name, slo_ms=args.slo_ms, max_batch=args.max_batch,
                         max_queue=args.max_queue, max_body_bytes=int(args.max_body_mb * 2**20))  # fmt: skip
    return serve(server, args.host, args.port, max_connections=args.max_connections,
                 announce=lambda url: print(describe(server, url), flush=True))  # fmt: skip
