"""``usnet serve`` under load: SLO attainment, latency, goodput and accuracy against fixed widths.

One ``usnet serve`` process (a us_convnet for 28 px Fashion-MNIST images, every distinct width of
its spectrum, one model thread) on loopback; an open-loop load generator in this process sends
requests of ``--images`` images each (binary tensor data) at Poisson arrival times, at offered
loads from 0.25x to 4x the full width's capacity, and on a bursty trace that steps between a
low and a high load. Baselines: the same server with the width pinned (``parameters.width``)
at each fixed width. Every run has a fixed duration and a bounded number of requests.

Accuracy: the weights here are random (no training in a benchmark); each served request is
credited with the test top-1 of the width that ran it *from the spectrum of a real training run
of the same architecture* (``benchmarks/results/paper_claims-E4/us_net-seed0.json``: us_convnet,
Fashion-MNIST, 4 epochs, matched by channel configuration). Latency does not depend on the
weights' values, so the serving numbers are those of the trained model.

Capacity: images per second of the full width at the largest batch, from the server's own
latency table (``GET /v2/models/NAME``), divided by the images per request.

Also measured: the server's memory against a server holding only the full width, and batch-1
latency at low load against the bare runtime call behind the same HTTP stack (a minimal
Starlette app that parses the request and calls the runner inline), interleaved.

Usage::

    python benchmarks/serve_slo.py --out benchmarks/results/serve_slo-DATE/run1   # ~7 minutes
    python benchmarks/serve_slo.py --report benchmarks/results/serve_slo-DATE/run*  # tables and
        # plots again, and the median of the runs (targets are judged on it)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SPECTRUM_RUN = ROOT / "benchmarks/results/paper_claims-E4/us_net-seed0.json"
INPUT = (1, 28, 28)


# --- the model --------------------------------------------------------------------------------
def make_checkpoint(path: Path) -> list[dict]:
    """us_convnet with random weights, BN calibrated on noise at every spectrum width, saved
    with the real run's spectrum and data config (28 px). Returns the spectrum."""
    import torch

    import usnet

    run = json.loads(SPECTRUM_RUN.read_text())
    spectrum = run["spectrum"]
    torch.manual_seed(0)
    model = usnet.models.create_model(run["config"]["model"])
    plan = usnet.channel_plan(model)
    for row in spectrum:  # the same architecture: the same channel configurations
        assert usnet.config_id(plan.config(row["width"])) == row["config_id"], row
    widths = sorted({r["width"] for r in spectrum})
    usnet.calibrate(model, [torch.randn(64, *INPUT)], widths=widths, num_images=64)
    config = {"data": {"name": run["config"]["data"]["name"], "image_size": 224}}
    usnet.save(model, path, extra={"spectrum": spectrum, "config": config,
                                   "note": "random weights; spectrum of " + SPECTRUM_RUN.name})  # fmt: skip
    return spectrum


def start_server(args: list[str]) -> tuple[subprocess.Popen, int]:
    process = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    line = process.stdout.readline()
    if "http://127.0.0.1:" not in line:
        process.kill()
        raise SystemExit(f"server did not start: {line}{process.stderr.read()}")
    return process, int(line.split("http://127.0.0.1:")[1].split("/")[0])


def stop_server(process: subprocess.Popen) -> int:
    process.terminate()
    return process.wait(60)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return math.nan


# --- a small open-loop HTTP/1.1 client -------------------------------------------------------
class Client:
    """Keep-alive connections to one server; a request takes an idle one or opens another
    (open loop: a slow server never slows the arrivals)."""

    def __init__(self, port: int, max_connections: int = 1024):
        self.port = port
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.open = 0
        self.max_connections = max_connections

    async def request(self, method: str, path: str, body: bytes = b"",
                      headers: dict | None = None) -> tuple[int, dict, bytes]:  # fmt: skip
        if self.idle:
            reader, writer = self.idle.pop()
        else:
            if self.open >= self.max_connections:
                return -1, {}, b""  # counted as a failure of the client, never hidden
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            self.open += 1
        lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        try:
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
            status_line = await reader.readline()
            status = int(status_line.split()[1])
            response_headers = {}
            while (line := await reader.readline()) not in (b"\r\n", b""):
                key, _, value = line.decode().partition(":")
                response_headers[key.strip().lower()] = value.strip()
            data = await reader.readexactly(int(response_headers.get("content-length", 0)))
        except (OSError, IndexError, ValueError, asyncio.IncompleteReadError):
            writer.close()
            self.open -= 1
            return -2, {}, b""
        if response_headers.get("connection") == "close":
            writer.close()
            self.open -= 1
        else:
            self.idle.append((reader, writer))
        return status, response_headers, data

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


def infer_body(images: int, width: float | None, seed: int = 0) -> tuple[bytes, dict]:
    x = np.random.default_rng(seed).standard_normal((images, *INPUT), dtype=np.float32)
    data = x.astype("<f4").tobytes()
    header = {"inputs": [{"name": "input", "shape": [images, *INPUT], "datatype": "FP32",
                          "parameters": {"binary_data_size": len(data)}}],
              "parameters": {"binary_data_output": True}}  # fmt: skip
    if width is not None:
        header["parameters"]["width"] = width
    head = json.dumps(header).encode()
    return head + data, {"Inference-Header-Content-Length": str(len(head)),
                         "Content-Type": "application/octet-stream"}  # fmt: skip


async def run_trace(port: int, name: str, arrivals: list[float], body: bytes,
                    headers: dict, timeout_s: float) -> list[tuple]:  # fmt: skip
    """Send one request at each arrival time (seconds from now); per request: (arrival,
    latency s, status, width that ran)."""
    client = Client(port)
    loop = asyncio.get_running_loop()
    start = loop.time()
    path = f"/v2/models/{name}/infer"
    records: list[tuple] = []

    async def one(at: float) -> None:
        await asyncio.sleep(max(0.0, start + at - loop.time()))
        try:
            status, h, data = await asyncio.wait_for(
                client.request("POST", path, body, headers), timeout_s
            )
        except asyncio.TimeoutError:
            status, h, data = -3, {}, b""
        latency = loop.time() - (start + at)  # from the scheduled time: no coordinated omission
        width = None
        if status == 200:
            length = int(h["inference-header-content-length"])
            width = json.loads(data[:length])["parameters"]["width"]
        records.append((round(at, 6), round(latency, 6), status, width))

    await asyncio.gather(*(one(t) for t in arrivals))
    client.close()
    return sorted(records)


def poisson_arrivals(rate: float, duration: float, rng: random.Random, limit: int) -> list[float]:
    t, out = 0.0, []
    while len(out) < limit:
        t += rng.expovariate(rate)
        if t >= duration:
            break
        out.append(t)
    return out


def bursty_arrivals(low: float, high: float, phase_s: float, phases: int, rng: random.Random,
                    limit: int) -> list[float]:  # fmt: skip
    out = []
    for k in range(phases):
        rate = low if k % 2 == 0 else high
        out += [k * phase_s + t for t in poisson_arrivals(rate, phase_s, rng, limit)]
    return sorted(out)[:limit]


async def wait_idle(port: int) -> None:
    client = Client(port)
    for _ in range(2000):
        _, _, data = await client.request("GET", "/metrics")
        text = data.decode()
        line = next(x for x in text.splitlines() if x.startswith("usnet_requests_in_flight "))
        if float(line.split()[-1]) == 0:
            break
        await asyncio.sleep(0.01)
    client.close()


# --- summaries ----------------------------------------------------------------------------------
def summarize(records: list[tuple], slo_s: float, duration: float, top1: dict) -> dict:
    offered = len(records)
    served = [r for r in records if r[2] == 200]
    within = [r for r in served if r[1] <= slo_s]
    rejected = sum(1 for r in records if r[2] in (429, 503))
    failed = offered - len(served) - rejected
    latencies = sorted(r[1] for r in served)

    def pct(q: float) -> float:
        return (
            1e3 * latencies[min(len(latencies) - 1, int(q * len(latencies)))]
            if latencies
            else math.nan
        )

    accuracy = [top1[str(r[3])] for r in served]
    widths = [r[3] for r in served]
    return {"offered": offered, "served": len(served), "rejected": rejected, "failed": failed,
            "attainment": len(within) / offered if offered else math.nan,
            "p50_ms": pct(0.5), "p99_ms": pct(0.99), "goodput_rps": len(within) / duration,
            "mean_top1": statistics.fmean(accuracy) if accuracy else math.nan,
            "mean_width": statistics.fmean(widths) if widths else math.nan}  # fmt: skip


def report(results: dict) -> str:
    lines = [f"# usnet serve under load ({results['when']}, commit {results['commit']})",
             f"command: {results['command']}", f"machine: {results['machine']}", "",
             f"model: {results['model']}", f"SLO {results['slo_ms']} ms; {results['images']} "
             f"images per request; full-width capacity {results['capacity_rps']:.1f} requests/s "
             f"({results['capacity_ips']:.0f} images/s at batch {results['max_batch']}); "
             f"{results['duration_s']} s per run", ""]  # fmt: skip
    head = ["load", "server", "offered", "SLO attainment", "p50 ms", "p99 ms", "goodput req/s",
            "rejected", "failed", "mean width", "mean top-1 (spectrum)"]  # fmt: skip
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in results["runs"]:
        s = run["summary"]
        lines.append(
            f"| {run['load']} | {run['server']} | {s['offered']} | {100 * s['attainment']:.1f}% | "
            f"{s['p50_ms']:.1f} | {s['p99_ms']:.1f} | {s['goodput_rps']:.1f} | {s['rejected']} | "
            f"{s['failed']} | {s['mean_width']:.3f} | {100 * s['mean_top1']:.2f}% |"
        )
    lines += ["", *targets(results)]
    return "\n".join(lines)


def median_of_runs(runs: list[dict]) -> dict:
    """One results dict whose every number is the median over ``runs`` (same settings)."""
    first = runs[0]
    out = {**first, "when": ", ".join(r["when"] for r in runs),
           "commit": ", ".join(sorted({r["commit"] for r in runs})),
           "command": f"median of {len(runs)} runs of: {first['command']}",
           "capacity_rps": statistics.median(r["capacity_rps"] for r in runs),
           "capacity_ips": statistics.median(r["capacity_ips"] for r in runs)}  # fmt: skip
    cells = []
    for k, run in enumerate(first["runs"]):
        same = [r["runs"][k] for r in runs]
        assert all((c["load"], c["server"]) == (run["load"], run["server"]) for c in same)
        summary = {key: statistics.median(c["summary"][key] for c in same)
                   for key in run["summary"]}  # fmt: skip
        cells.append({"load": run["load"], "server": run["server"], "summary": summary})
    out["runs"] = cells
    # ratios are taken within each run (side by side), then their median
    out["memory"] = {k: statistics.median(r["memory"][k] for r in runs) for k in first["memory"]}
    out["memory"]["ratio"] = statistics.median(memory_ratio(r["memory"]) for r in runs)
    out["batch1"] = {k: statistics.median(r["batch1"][k] for r in runs) for k in first["batch1"]}
    out["batch1"]["ratio"] = statistics.median(batch1_ratio(r["batch1"]) for r in runs)
    return out


def memory_ratio(memory: dict) -> float:
    return memory.get("ratio") or memory["usnet_rss_mb"] / memory["full_only_rss_mb"]


def batch1_ratio(batch1: dict) -> float:
    return batch1.get("ratio") or batch1["usnet_p50_ms"] / batch1["bare_p50_ms"]


def targets(results: dict) -> list[str]:
    out = ["## Targets"]
    runs = results["runs"]
    poisson = [r for r in runs if r["load"] != "bursty"]
    over = [
        r["load"] for r in poisson if r["server"] == "fixed 1" and r["summary"]["attainment"] < 0.5
    ]
    if over:
        worst = min(r["summary"]["attainment"] for r in poisson
                    if r["server"] == "usnet" and r["load"] in over)  # fmt: skip
        out.append(f"1. loads where fixed full width keeps < 50% within the SLO: {over}; usnet's "
                   f"lowest attainment there {100 * worst:.1f}% (target >= 99%): "
                   f"{'met' if worst >= 0.99 else 'missed'}")  # fmt: skip
    else:
        out.append("1. no load here made the fixed full width fall below 50% attainment")
    bursty = {r["server"]: r["summary"] for r in runs if r["load"] == "bursty"}
    if bursty:
        ok = {k: v for k, v in bursty.items() if k != "usnet" and v["attainment"] >= 0.99}
        mine = bursty["usnet"]
        if ok:
            best_name, best = max(ok.items(), key=lambda kv: kv[1]["mean_top1"])
            gain = 100 * (mine["mean_top1"] - best["mean_top1"])
            out.append(f"2. bursty trace: usnet {100 * mine['mean_top1']:.2f}% top-1 at "
                       f"{100 * mine['attainment']:.1f}% attainment; best fixed width keeping "
                       f">= 99%: {best_name} at {100 * best['mean_top1']:.2f}%; gain {gain:+.2f} "
                       f"points (target >= +1): {'met' if gain >= 1 else 'missed'}")  # fmt: skip
        else:
            out.append("2. bursty trace: no fixed width kept >= 99% within the SLO; usnet "
                       f"{100 * mine['attainment']:.1f}% at {100 * mine['mean_top1']:.2f}% top-1")  # fmt: skip
    low = [
        r
        for r in poisson
        if r["server"] == "usnet" and r["load"] == min(r2["load"] for r2 in poisson)
    ]
    if low:
        out.append(
            f"   at the lowest load usnet's mean width is {low[0]['summary']['mean_width']:.3f}"
        )
    mem = results.get("memory")
    if mem:
        ratio = memory_ratio(mem)
        out.append(f"3. memory: server RSS {mem['usnet_rss_mb']:.0f} MB with every width against "
                   f"{mem['full_only_rss_mb']:.0f} MB holding only the full width: {ratio:.3f}x "
                   f"(target <= 1.2x: {'met' if ratio <= 1.2 else 'missed'}); parameters and "
                   f"buffers resident {mem['usnet_tensor_kb']:.0f} KB against "
                   f"{mem['full_only_tensor_kb']:.0f} KB "
                   f"({mem['usnet_tensor_kb'] / mem['full_only_tensor_kb']:.2f}x)")  # fmt: skip
    b1 = results.get("batch1")
    if b1:
        ratio = batch1_ratio(b1)
        out.append(f"4. batch-1 latency at low load: usnet p50 {b1['usnet_p50_ms']:.3f} ms, bare "
                   f"runtime call behind the same HTTP stack {b1['bare_p50_ms']:.3f} ms: "
                   f"{ratio:.3f}x (target <= 1.10x: {'met' if ratio <= 1.10 else 'missed'}); the "
                   f"runtime call alone {b1['runtime_ms']:.3f} ms")  # fmt: skip
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    poisson = [r for r in results["runs"] if r["load"] != "bursty"]
    servers = list(dict.fromkeys(r["server"] for r in poisson))
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for server in servers:
        rows = [r for r in poisson if r["server"] == server]
        loads = [r["load"] for r in rows]
        style = dict(lw=2.5, color="k") if server == "usnet" else dict(lw=1, ls="--")
        a.plot(loads, [100 * r["summary"]["attainment"] for r in rows], marker="o", label=server,
               **style)  # fmt: skip
        b.plot(loads, [100 * r["summary"]["mean_top1"] for r in rows], marker="o", label=server,
               **style)  # fmt: skip
    a.set(xscale="log", xlabel="offered load (x full-width capacity)", ylabel="SLO attainment (%)",
          title=f"SLO {results['slo_ms']} ms")  # fmt: skip
    b.set(xscale="log", xlabel="offered load (x full-width capacity)",
          ylabel="mean top-1 of served requests (%)", title="accuracy (from the spectrum)")  # fmt: skip
    ticks = sorted({r["load"] for r in poisson})
    for axis in (a, b):
        axis.minorticks_off()
        axis.set_xticks(ticks, [f"{t:g}x" for t in ticks])
    a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# --- the bare baseline for batch-1 latency -------------------------------------------------------
def bare_server(checkpoint: str, threads: int) -> None:
    """A minimal Starlette app on an ephemeral port: parse, run the full width inline, answer."""
    import torch
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from usnet.serve.app import bind
    from usnet.serve.protocol import HEADER_LENGTH, infer_response, parse_infer_request
    from usnet.serve.runners import open_runner

    torch.set_num_threads(threads)
    runner = open_runner(checkpoint, widths=[1.0])

    async def infer(request: Request) -> Response:
        body = await request.body()
        parsed = parse_infer_request(body, request.headers.get(HEADER_LENGTH), runner.input_shape,
                                     64)  # fmt: skip
        logits, ran = runner.run(parsed.images, 1.0)
        answer = infer_response("bare", logits, parsed, {"width": ran})
        return Response(answer.body, 200, answer.headers)

    app = Starlette(routes=[Route("/v2/models/bare/infer", infer, methods=["POST"])])
    sock = bind("127.0.0.1", 0)
    print(f"bare http://127.0.0.1:{sock.getsockname()[1]}/", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False)).run(sockets=[sock])


async def batch1(usnet_port: int, bare_port: int, name: str, requests: int) -> dict:
    body, headers = infer_body(1, None, seed=7)
    clients = {"usnet": (Client(usnet_port), f"/v2/models/{name}/infer"),
               "bare": (Client(bare_port), "/v2/models/bare/infer")}  # fmt: skip
    times: dict[str, list[float]] = {k: [] for k in clients}
    for k in range(requests):  # interleaved, one at a time: low load
        for key, (client, path) in clients.items():
            start = time.perf_counter()
            status, _, _ = await client.request("POST", path, body, headers)
            assert status == 200, (key, status)
            if k >= 20:  # warm-up
                times[key].append(time.perf_counter() - start)
    for client, _ in clients.values():
        client.close()
    return {f"{k}_p50_ms": 1e3 * statistics.median(v) for k, v in times.items()}


def runtime_ms(checkpoint: str, threads: int) -> float:
    import torch

    from usnet.serve.runners import open_runner

    torch.set_num_threads(threads)
    runner = open_runner(checkpoint, widths=[1.0])
    x = np.random.default_rng(7).standard_normal((1, *INPUT), dtype=np.float32)
    samples = []
    for k in range(300):
        start = time.perf_counter()
        runner.run(x, 1.0)
        if k >= 50:
            samples.append(time.perf_counter() - start)
    return 1e3 * statistics.median(samples)


# --- main ---------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="results directory (raw JSON, table, plot)")
    parser.add_argument("--report", type=Path, nargs="+",
                        help="rebuild tables and plots from results dirs; with several, also "
                        "the median of the runs (written beside them)")  # fmt: skip
    parser.add_argument("--slo-ms", type=float, default=50.0)
    parser.add_argument("--images", type=int, default=16, help="images per request")
    parser.add_argument("--max-batch", type=int, default=64, help="images per batch")
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per Poisson run")
    parser.add_argument("--loads", default="0.25,0.5,1,2,3,4", help="x full-width capacity")
    parser.add_argument("--fixed", default="0.25,0.35,0.5,0.7,1.0", help="pinned baselines")
    parser.add_argument("--burst", default="0.5,3", help="low,high load of the bursty trace")
    parser.add_argument("--phase-s", type=float, default=2.0, help="seconds per bursty phase")
    parser.add_argument("--phases", type=int, default=8, help="bursty phases (low, high, ...)")
    parser.add_argument("--max-requests", type=int, default=5000, help="per run, at most")
    parser.add_argument("--threads", type=int, default=1, help="the server's model threads")
    parser.add_argument("--bare-server", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_server:
        return bare_server(args.bare_server, args.threads)
    if args.report:
        runs = []
        for directory in args.report:
            results = json.loads((directory / "results.json").read_text())
            (directory / "table.md").write_text(report(results) + "\n")
            plot(results, directory / "serve_slo.png")
            runs.append(results)
        results = median_of_runs(runs) if len(runs) > 1 else runs[0]
        text = report(results)
        if len(runs) > 1:
            parent = args.report[0].parent
            (parent / "median.md").write_text(text + "\n")
            plot(results, parent / "serve_slo-median.png")
        print(text)
        return None
    if args.out is None:
        parser.error("give --out DIR (or --report DIR)")
    args.out.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()  # fmt: skip
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = str(Path(tmp) / "fmnist_convnet.pt")
        make_checkpoint(Path(checkpoint))
        results = asyncio.run(measure(args, checkpoint))
    results.update(
        when=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        commit=commit + ("+dirty" if dirty else ""),
        command="python " + " ".join([os.path.relpath(__file__, ROOT), *sys.argv[1:]]),
        machine=f"{platform.machine()}, {os.cpu_count()} CPUs, load average at the end "
        f"{os.getloadavg()[0]:.2f}",
    )
    (args.out / "results.json").write_text(json.dumps(results) + "\n")
    text = report(results)
    (args.out / "table.md").write_text(text + "\n")
    plot(results, args.out / "serve_slo.png")
    print(text)


async def measure(args, checkpoint: str) -> dict:
    name = "fmnist"
    server, port = start_server(["-m", "usnet", "serve", checkpoint, "--slo-ms", str(args.slo_ms),
                                 "--port", "0", "--threads", str(args.threads), "--max-batch",
                                 str(args.max_batch), "--name", name])  # fmt: skip
    client = Client(port)
    _, _, data = await client.request("GET", f"/v2/models/{name}")
    client.close()
    meta = json.loads(data)
    params = meta["parameters"]
    top1 = {str(w["width"]): w["top1"] for w in params["widths"]}
    full = params["widths"][-1]["width"]
    full_batch_ms = params["latency_ms"][f"{full:g}"][str(args.max_batch)]
    capacity_ips = args.max_batch / (full_batch_ms / 1e3)
    capacity = capacity_ips / args.images
    slo_s = args.slo_ms / 1e3
    rng = random.Random(0)
    servers = [("usnet", None)] + [(f"fixed {w:g}", w) for w in map(float, args.fixed.split(","))]
    runs = []
    for load in map(float, args.loads.split(",")):
        arrivals = poisson_arrivals(load * capacity, args.duration, rng, args.max_requests)
        for label, width in servers:  # the same arrival times for every server
            body, headers = infer_body(args.images, width)
            records = await run_trace(port, name, arrivals, body, headers, 10 * slo_s + 5)
            await wait_idle(port)
            summary = summarize(records, slo_s, args.duration, top1)
            runs.append({"load": load, "server": label, "summary": summary, "records": records})
            print(f"load {load:g}x {label}: {summary}", file=sys.stderr, flush=True)
    low, high = map(float, args.burst.split(","))
    arrivals = bursty_arrivals(low * capacity, high * capacity, args.phase_s, args.phases, rng,
                               args.max_requests)  # fmt: skip
    for label, width in servers:
        body, headers = infer_body(args.images, width)
        records = await run_trace(port, name, arrivals, body, headers, 10 * slo_s + 5)
        await wait_idle(port)
        summary = summarize(records, slo_s, args.phase_s * args.phases, top1)
        runs.append({"load": "bursty", "server": label, "summary": summary, "records": records})
        print(f"bursty {label}: {summary}", file=sys.stderr, flush=True)
    usnet_rss = rss_mb(server.pid)
    exit_code = stop_server(server)
    # memory: the same server holding only the full width, after the same warm-up
    only, only_port = start_server(["-m", "usnet", "serve", checkpoint, "--slo-ms",
                                    str(args.slo_ms), "--port", "0", "--threads",
                                    str(args.threads), "--max-batch", str(args.max_batch),
                                    "--name", name, "--widths", f"{full:g}"])  # fmt: skip
    body, headers = infer_body(args.images, None)
    await run_trace(only_port, name, [0.01 * k for k in range(200)], body, headers, 30)
    full_rss = rss_mb(only.pid)
    from usnet.serve.runners import open_runner

    memory = {"usnet_rss_mb": usnet_rss, "full_only_rss_mb": full_rss,
              "usnet_tensor_kb": open_runner(checkpoint).resident_bytes() / 1024,
              "full_only_tensor_kb": open_runner(checkpoint, widths=[full]).resident_bytes() / 1024}  # fmt: skip
    # batch-1 latency at low load: the full-width-only server (the controller runs full width
    # at low load either way) against the bare runtime call behind the same HTTP stack
    bare, bare_port = start_server([__file__, "--bare-server", checkpoint, "--threads",
                                    str(args.threads)])  # fmt: skip
    usnet_server, usnet_port = start_server(["-m", "usnet", "serve", checkpoint, "--slo-ms",
                                             str(args.slo_ms), "--port", "0", "--threads",
                                             str(args.threads), "--max-batch", str(args.max_batch),
                                             "--name", name])  # fmt: skip
    b1 = await batch1(usnet_port, bare_port, name, 520)
    b1["runtime_ms"] = runtime_ms(checkpoint, args.threads)
    for p in (only, bare, usnet_server):
        stop_server(p)
    return {"model": f"us_convnet (Fashion-MNIST 28 px), {len(params['widths'])} widths served; "
                     f"random weights, top-1 from {SPECTRUM_RUN.relative_to(ROOT)}",
            "slo_ms": args.slo_ms, "images": args.images, "max_batch": args.max_batch,
            "duration_s": args.duration, "capacity_rps": capacity, "capacity_ips": capacity_ips,
            "latency_table_ms": params["latency_ms"], "widths": params["widths"],
            "burst": {"low": low, "high": high, "phase_s": args.phase_s, "phases": args.phases},
            "server_exit_code_after_sigterm": exit_code, "memory": memory, "batch1": b1,
            "runs": runs}  # fmt: skip


if __name__ == "__main__":
    main()
