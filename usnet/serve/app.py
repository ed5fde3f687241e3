"""``usnet serve``: one slimmable model behind the Open Inference Protocol, width chosen per batch.

:class:`ModelServer` owns the runner, the width controller and the metrics; :func:`create_app`
puts it behind a Starlette ASGI app (``/v2/...`` and ``/metrics``) and :func:`serve` runs that
app with uvicorn on a socket it binds first (port 0: an ephemeral port, printed).

Requests are parsed on the event loop, queued in the controller, and a single dispatcher task
runs one batch at a time in a worker thread, so the server keeps accepting (and refusing, when
overloaded) while the model works. SIGTERM or Ctrl-C: uvicorn stops accepting, the requests in
flight are answered, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import signal
import socket
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..errors import UsnetValueError
from .controller import LatencyTable, Pending, WidthController
from .protocol import (
    HEADER_LENGTH,
    InferRequest,
    ProtocolError,
    error_body,
    infer_response,
    parse_infer_request,
    tensor_metadata,
)
from .runners import Runner

DEFAULT_MAX_BODY_BYTES = 64 << 20
QUEUE_BYTES = 256 << 20
"""The default bound on the queue: images of at most this many bytes wait."""


@dataclass(eq=False)
class _Job:
    images: np.ndarray
    future: asyncio.Future


def batch_sizes_to_measure(max_batch: int) -> list[int]:
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return [*sizes, max_batch]


def default_max_queue(runner: Runner, max_batch: int) -> int:
    image_bytes = 4 * math.prod(runner.input_shape)
    return max(max_batch, min(64 * max_batch, QUEUE_BYTES // image_bytes))


class ModelServer:
    """The model, its width controller and its metrics (one per app: nothing global).

    Args:
        runner: the model (:mod:`usnet.serve.runners`).
        name: the model name in the URLs.
        slo_ms: every request's latency objective.
        max_batch: images per batch at most (and per request).
        max_queue: images waiting at most (default: 64 batches, or fewer if their images would
            take more than 256 MiB).
        max_body_bytes: larger request bodies get 413.
        latency: seconds per (width, batch size); default: the runner's (measured now).
        clock: seconds, monotonic.
    """

    def __init__(self, runner: Runner, *, name: str, slo_ms: float, max_batch: int = 32,
                 max_queue: int | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 latency: dict | None = None, margin_ms: float | None = None,
                 clock: Callable[[], float] = time.perf_counter):  # fmt: skip
        if not (isinstance(slo_ms, (int, float)) and math.isfinite(slo_ms) and slo_ms > 0):
            raise UsnetValueError(
                f"--slo-ms must be a positive number of milliseconds, got {slo_ms!r}"
            )
        if not isinstance(max_batch, int) or max_batch < 1:
            raise UsnetValueError(f"--max-batch must be a whole number >= 1, got {max_batch!r}")
        self.runner = runner
        self.name = name
        self.slo_s = slo_ms / 1e3
        self.max_batch = max_batch
        self.max_body_bytes = max_body_bytes
        self.clock = clock
        measured = latency or runner.latency(batch_sizes_to_measure(max_batch))
        self.table = LatencyTable(runner.widths, max_batch, measured)
        self.controller = WidthController(
            runner.widths, self.table, self.slo_s, max_batch,
            max_queue if max_queue is not None else default_max_queue(runner, max_batch),
            None if margin_ms is None else margin_ms / 1e3, runner.equivalent,
        )  # fmt: skip
        self.base_margin_s = self.controller.margin_s
        self._overheads: deque[float] = deque(maxlen=256)
        self.ready = False
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._metrics()

    def _metrics(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        slo = self.slo_s
        self.m_requests = Counter("usnet_requests", "Inference requests answered, by HTTP status",
                                  ["code"], registry=r)  # fmt: skip
        self.m_latency = Histogram("usnet_request_latency_seconds",
                                   "Server-side latency of answered inference requests",
                                   buckets=[f * slo for f in (0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 4)],
                                   registry=r)  # fmt: skip
        self.m_width = Histogram("usnet_batch_width", "Width each batch ran at",
                                 buckets=list(self.runner.widths), registry=r)  # fmt: skip
        self.m_batch = Histogram("usnet_batch_size", "Images per batch",
                                 buckets=batch_sizes_to_measure(self.max_batch), registry=r)  # fmt: skip
        self.m_batch_seconds = Histogram("usnet_batch_seconds", "Model time per batch",
                                         buckets=[f * slo for f in (0.05, 0.1, 0.25, 0.5, 1, 2)],
                                         registry=r)  # fmt: skip
        self.m_queue = Gauge("usnet_queue_images", "Images waiting for the model", registry=r)
        self.m_margin = Gauge("usnet_margin_seconds", "Time kept free of model work in each "
                              "deadline (base + recent server overhead, p90)", registry=r)  # fmt: skip
        self.m_margin.set(self.controller.margin_s)
        self.m_in_flight = Gauge("usnet_requests_in_flight", "Inference requests received and "
                                 "not yet answered", registry=r)  # fmt: skip
        self.m_misses = Counter("usnet_slo_misses", "Requests answered later than the SLO",
                                registry=r)  # fmt: skip
        self.m_rejections = Counter("usnet_rejections", "Requests refused as overload, by reason",
                                    ["reason"], registry=r)  # fmt: skip

    # --- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="usnet-model",
                                            initializer=self.runner.init_thread)  # fmt: skip
        self._task = asyncio.create_task(self._dispatch())
        self.ready = True

    async def stop(self) -> None:
        """Answer what is queued, then stop the dispatcher."""
        self.ready = False
        while self.controller.queue or self.controller.running is not None:
            await asyncio.sleep(0.005)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    # --- requests -----------------------------------------------------------------------------
    async def infer(self, request: InferRequest, arrival: float) -> tuple[np.ndarray, dict]:
        """Queue one parsed request and wait for its logits; raises :class:`ProtocolError`
        (with its HTTP status) for a refused one."""
        c = self.controller
        try:
            width = None if request.width is None else c.resolve_width(request.width)
            floor = None if request.min_width is None else c.resolve_min_width(request.min_width)
        except UsnetValueError as err:
            raise ProtocolError(str(err)) from None
        job = _Job(request.images, asyncio.get_running_loop().create_future())
        pending = Pending(len(request.images), arrival, width, floor, job)
        admission = c.admit(pending, self.clock())
        if not admission.accepted:
            reason = "queue_full" if admission.status == 503 else "slo"
            self.m_rejections.labels(reason).inc()
            raise ProtocolError(admission.reason, admission.status, admission.retry_after_s)
        self.m_queue.set(c.queued_images)
        self._wakeup.set()
        return await job.future

    async def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while (batch := self.controller.next_batch(self.clock())) is not None:
                self.m_queue.set(self.controller.queued_images)
                jobs = [r.payload for r in batch.requests]
                images = (
                    jobs[0].images if len(jobs) == 1 else np.concatenate([j.images for j in jobs])
                )
                start = self.clock()
                try:
                    logits, ran = await loop.run_in_executor(
                        self._executor, self.runner.run, images, batch.width
                    )
                except Exception as err:  # noqa: BLE001 (answered as a 500 to its requests)
                    self.controller.finished(batch, math.nan)
                    for j in jobs:
                        if not j.future.done():
                            j.future.set_exception(err)
                    continue
                seconds = self.clock() - start
                self.controller.finished(batch, seconds)
                self.m_width.observe(ran)
                self.m_batch.observe(batch.size)
                self.m_batch_seconds.observe(seconds)
                offset = 0
                for r, j in zip(batch.requests, jobs):
                    info = {"width": ran, "batch_size": batch.size,
                            "queue_ms": round(1e3 * (start - r.arrival), 3),
                            "compute_ms": round(1e3 * seconds, 3)}  # fmt: skip
                    if not j.future.done():
                        j.future.set_result((logits[offset : offset + r.size], info))
                    offset += r.size

    def answered(self, elapsed: float, info: dict) -> None:
        """Learn a request's time in the server outside the queue and the model (reading,
        parsing, answering, waiting for the event loop): the controller keeps the base margin
        plus the 90th percentile of the recent ones free in every deadline."""
        self.m_latency.observe(elapsed)
        if elapsed > self.slo_s:
            self.m_misses.inc()
        self._overheads.append(max(0.0, elapsed - (info["queue_ms"] + info["compute_ms"]) / 1e3))
        if len(self._overheads) % 16 == 0:
            recent = sorted(self._overheads)
            p90 = recent[int(0.9 * (len(recent) - 1))]
            self.controller.margin_s = self.base_margin_s + p90
            self.m_margin.set(self.controller.margin_s)

    def metadata(self) -> dict:
        r = self.runner
        widths = [{"width": w, **({"top1": r.top1[w]} if w in r.top1 else {}),
                   **({"same_network_from": r.equivalent[w]} if r.equivalent[w] < w else {})}
                  for w in r.widths]  # fmt: skip
        return {
            "name": self.name,
            "versions": ["1"],
            "platform": f"usnet_{r.runtime}",
            **tensor_metadata(r.input_shape, r.num_classes),
            "parameters": {"widths": widths, "slo_ms": 1e3 * self.slo_s,
                           "max_batch": self.max_batch, "latency_ms": self.table.to_dict()},
        }  # fmt: skip


# --- the ASGI app ---------------------------------------------------------------------------------
def create_app(server: ModelServer):
    """A Starlette app serving ``server`` (its lifespan starts and stops the dispatcher)."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from ..version import __version__

    def error(message: str, status: int, headers: dict | None = None) -> Response:
        return Response(error_body(message), status, headers, media_type="application/json")

    def unknown(name: str) -> Response:
        return error(f"unknown model {name!r}; this server has {server.name!r}", 404)

    async def live(request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready(request: Request) -> Response:
        return JSONResponse({"ready": server.ready}, 200 if server.ready else 503)

    async def server_metadata(request: Request) -> Response:
        return JSONResponse({"name": "usnet", "version": __version__,
                             "extensions": ["binary_tensor_data"]})  # fmt: skip

    async def model_metadata(request: Request) -> Response:
        name = request.path_params["name"]
        if name != server.name:
            return unknown(name)
        return JSONResponse(server.metadata())

    async def model_ready(request: Request) -> Response:
        name = request.path_params["name"]
        if name != server.name:
            return unknown(name)
        return JSONResponse({"name": name, "ready": server.ready}, 200 if server.ready else 503)

    async def infer(request: Request) -> Response:
        arrival = server.clock()
        name = request.path_params["name"]
        if name != server.name:
            return unknown(name)
        server.m_in_flight.inc()
        try:
            return await answer(request, arrival)
        finally:
            server.m_in_flight.dec()

    async def answer(request: Request, arrival: float) -> Response:
        try:
            body = await _read_body(request, server.max_body_bytes)
            parsed = parse_infer_request(body, request.headers.get(HEADER_LENGTH),
                                         server.runner.input_shape, server.max_batch)  # fmt: skip
            logits, info = await server.infer(parsed, arrival)
        except ProtocolError as err:
            server.m_requests.labels(str(err.status)).inc()
            retry = err.retry_after_s
            return error(str(err), err.status, {"retry-after": str(retry)} if retry else None)
        except Exception as err:  # noqa: BLE001 (the model failed: a 500 naming it)
            server.m_requests.labels("500").inc()
            return error(f"inference failed: {type(err).__name__}: {err}", 500)
        response = infer_response(server.name, logits, parsed, info)
        server.answered(server.clock() - arrival, info)
        server.m_requests.labels("200").inc()
        return Response(response.body, 200, response.headers)

    async def metrics(request: Request) -> Response:
        return Response(
            generate_latest(server.registry), headers={"content-type": CONTENT_TYPE_LATEST}
        )

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await server.start()
        try:
            yield
        finally:
            await server.stop()

    routes = [
        Route("/v2/health/live", live),
        Route("/v2/health/ready", ready),
        Route("/v2", server_metadata),
        Route("/v2/models/{name}", model_metadata),
        Route("/v2/models/{name}/versions/{version}", model_metadata),
        Route("/v2/models/{name}/ready", model_ready),
        Route("/v2/models/{name}/versions/{version}/ready", model_ready),
        Route("/v2/models/{name}/infer", infer, methods=["POST"]),
        Route("/v2/models/{name}/versions/{version}/infer", infer, methods=["POST"]),
        Route("/metrics", metrics),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


async def _read_body(request, limit: int) -> bytes:
    encoding = request.headers.get("content-encoding", "identity").lower()
    if encoding != "identity":
        raise ProtocolError(f"Content-Encoding {encoding!r} is not supported; send the request "
                            "uncompressed", 415)  # fmt: skip
    declared = request.headers.get("content-length")
    too_big = f"the request body exceeds the server's limit of {limit} bytes (--max-body-mb)"
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ProtocolError(too_big, 413)
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise ProtocolError(too_big, 413)
        chunks.append(chunk)
    return b"".join(chunks)


# --- running it ---------------------------------------------------------------------------------
def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: an ephemeral one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP: asyncio then sets TCP_NODELAY on every accepted connection (it checks
    # the proto); without it, a response written as headers then body waits for the client's
    # delayed ACK (~40 ms per request on a keep-alive connection).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(2048)
    return sock


def serve(server: ModelServer, host: str = "127.0.0.1", port: int = 8000, *,
          announce: Callable[[str], None] | None = None, log_level: str = "warning",
          graceful_timeout_s: float = 30.0, max_connections: int = 256) -> int:  # fmt: skip
    """Serve until SIGTERM or Ctrl-C; returns the exit status (0 after a graceful stop).

    Beyond ``max_connections`` open connections uvicorn answers 503: with the body limit and
    the bounded queue, that bounds the memory requests can take."""
    import uvicorn

    sock = bind(host, port)
    bound = sock.getsockname()[1]

    class Server(uvicorn.Server):
        # uvicorn re-raises a captured SIGTERM once it has shut down, and the process then dies
        # of it (status -15); a server that finished its requests should exit 0.
        @contextlib.contextmanager
        def capture_signals(self):
            previous = {
                s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)
            }
            try:
                yield
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)

    config = uvicorn.Config(create_app(server), log_level=log_level, access_log=False,
                            lifespan="on", timeout_graceful_shutdown=graceful_timeout_s,
                            limit_concurrency=max_connections)  # fmt: skip
    url_host = f"[{host}]" if ":" in host else host
    (announce or (lambda text: print(text, flush=True)))(f"http://{url_host}:{bound}")
    Server(config).run(sockets=[sock])
    return 0


def describe(server: ModelServer, url: str) -> str:
    r = server.runner
    widths = ", ".join(f"{w:g}" + (f" ({100 * r.top1[w]:.2f}%)" if w in r.top1 else "")
                       for w in r.widths)  # fmt: skip
    return (f"serving {server.name} ({r.runtime}, {r.source}) at {url}/v2/models/{server.name} "
            f"with SLO {1e3 * server.slo_s:g} ms, max batch {server.max_batch}; widths (top-1): "
            f"{widths}")  # fmt: skip
