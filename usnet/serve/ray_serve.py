"""Scale-out on Ray Serve: the same runner, width controller and Open Inference Protocol app in
every replica, replicas autoscaled on their queue length.

Each replica builds its own runner and :class:`~usnet.serve.app.ModelServer` (the controller sees
the queue of its replica; Ray's proxy spreads requests over replicas), and serves the Starlette
app of :func:`~usnet.serve.app.create_app` as the deployment's ASGI ingress, so clients see the
same ``/v2/...`` endpoints as from ``usnet serve``. Ray Serve's autoscaler adds replicas when the
requests in flight per replica exceed ``target_ongoing_requests`` (default: two batches' worth of
requests) and removes them when load falls.

Needs ``ray[serve]`` (not installed by the ``serve`` extra: it is large). Start it with::

    python -m usnet.serve.ray_serve ARTIFACT --slo-ms 50 [--min-replicas 1] [--max-replicas 4]
        [--max-batch 32] [--host 127.0.0.1] [--port 8000] [--name NAME] [--threads 1]

or from Python: ``serve.run(usnet.serve.ray_serve.application(path, slo_ms=50), route_prefix="/")``.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from ..errors import UsnetValueError


def application(artifact: str, *, slo_ms: float = 50.0, max_batch: int = 32,
                name: str | None = None, runtime: str | None = None, device: str = "cpu",
                threads: int | None = 1, widths: Sequence[float] | None = None,
                min_replicas: int = 1, max_replicas: int = 4,
                target_ongoing_requests: float | None = None, num_cpus: float = 1.0):  # fmt: skip
    """A Ray Serve application serving ``artifact`` (as ``usnet serve`` does) on autoscaled
    replicas."""
    from ray import serve

    if not 1 <= min_replicas <= max_replicas:
        raise UsnetValueError(f"replicas: need 1 <= min ({min_replicas}) <= max ({max_replicas})")
    path = str(Path(artifact).resolve())
    model_name = name or Path(artifact.rstrip("/")).name.split(".")[0]

    def build_app():  # runs in each replica
        import torch

        from .app import ModelServer, create_app
        from .runners import open_runner

        if threads is not None:
            torch.set_num_threads(threads)
        runner = open_runner(path, runtime, device, threads, widths)
        return create_app(ModelServer(runner, name=model_name, slo_ms=slo_ms, max_batch=max_batch))

    target = target_ongoing_requests or 2 * max_batch
    replica = type("UsnetReplica", (), {"__doc__": f"usnet serve replica of {model_name}"})
    deployment = serve.deployment(
        serve.ingress(build_app)(replica),
        name=f"usnet-{model_name}",
        ray_actor_options={"num_cpus": num_cpus},
        max_ongoing_requests=max(4 * int(target), 8),
        autoscaling_config={
            "min_replicas": min_replicas,
            "max_replicas": max_replicas,
            "target_ongoing_requests": target,
        },  # fmt: skip
    )
    return deployment.bind()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m usnet.serve.ray_serve",
                                     description=__doc__.splitlines()[0])  # fmt: skip
    parser.add_argument("artifact")
    parser.add_argument("--slo-ms", type=float, default=50.0)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--name", default=None)
    parser.add_argument("--runtime", choices=["onnx", "torch"], default=None)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="model threads per replica")
    parser.add_argument("--min-replicas", type=int, default=1)
    parser.add_argument("--max-replicas", type=int, default=4)
    args = parser.parse_args(argv)
    try:
        import ray
        from ray import serve
    except ImportError:
        print("usnet: error: the Ray Serve deployment needs ray: pip install 'ray[serve]'",
              file=sys.stderr)  # fmt: skip
        return 2
    app = application(args.artifact, slo_ms=args.slo_ms, max_batch=args.max_batch,
                      name=args.name, runtime=args.runtime, device=args.device,
                      threads=args.threads, min_replicas=args.min_replicas,
                      max_replicas=args.max_replicas)  # fmt: skip
    ray.init(include_dashboard=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(app, route_prefix="/", name="usnet")
    print(f"serving on Ray Serve at http://{args.host}:{args.port}/v2 "
          f"({args.min_replicas}..{args.max_replicas} replicas)", flush=True)  # fmt: skip
    stop = threading.Event()
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
