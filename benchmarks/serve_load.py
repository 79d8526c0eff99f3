"""Load on the HTTP search service: `cnclip-kd serve` driven by N concurrent clients on 127.0.0.1.

The service runs in its own process (``cnclip-kd serve``, ONNX image encoder, a
saved index of ``--gallery`` synthetic vectors: the same set-up as
``benchmarks/query_latency.py``, whose helpers this script reuses). Queries are
800×800 JPEG product photos from the sample data, sent as raw bodies.

1. **Encode time, alone**: the same ONNX file, in this process before the server
   starts, one query at a time with ``--threads`` threads: p50 of
   ``decode + encode`` (what one query costs the server's CPU).
2. **Closed loop**: for each of ``--clients`` (1, 2, 4, 8, 16), that many
   ``httpx`` async clients each send a query, wait for the answer and send the
   next, for ``--duration`` seconds (and at most ``--max-requests``): throughput,
   p50/p95/p99 latency, and the count of each non-200 status.
3. **Open loop at 80 % of saturation**: queries arrive at fixed intervals at
   0.8 × the best closed-loop throughput (at most ``--max-in-flight`` waiting
   on the client side) for ``--duration`` seconds: p50/p95/p99.

Targets (issue 11, 2 cores): saturated throughput ≥ 0.9 × (cores / single-query
time); p99 ≤ 3 × p50 at 80 % of saturation; no 5xx except deliberate 503s.
The client runs on the same cores as the server (it takes a share of the CPU;
the report gives the client process's CPU time too).

Usage (about 4 minutes on 2 cores, ViT-B-16 random weights)::

    python benchmarks/serve_load.py --threads 1 --pool 2 --out out/deploy/serve_load.json

Quick check of the script itself (tiny model, small gallery, ~40 s)::

    python benchmarks/serve_load.py --preset tiny --gallery 500 --duration 2 --clients 1,2
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import emit  # noqa: E402 - benchmarks/ is on sys.path when run as a script
from query_latency import export_models, machine, make_checkpoint, make_queries  # noqa: E402

logger = logging.getLogger("serve_load")


def encode_alone(onnx_path: str, queries: list[bytes], threads: int, repeats: int) -> dict:
    """p50 of decode + preprocess + encode of one query at a time, in this process (the server's CPU cost)."""
    from cnclip_kd.deploy.backends import OnnxEncoder, load_query_image, to_pixels

    enc = OnnxEncoder(onnx_path, threads=threads)
    decode, encode = [], []
    for i in range(repeats + 2):
        for q in queries:
            t0 = time.perf_counter()
            x = to_pixels(load_query_image(q, draft_size=enc.resolution), enc.resolution)[None]
            t1 = time.perf_counter()
            enc.encode(x)
            t2 = time.perf_counter()
            if i >= 2:  # two untimed warm-up passes
                decode.append((t1 - t0) * 1e3)
                encode.append((t2 - t1) * 1e3)
    return {"decode_ms": round(statistics.median(decode), 2), "encode_ms": round(statistics.median(encode), 2),
            "query_ms": round(float(statistics.median(np.add(decode, encode))), 2), "n": len(encode)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(index_dir: Path, onnx_path: str, args, log_path: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "cnclip_kd.cli", "serve", "--index", str(index_dir), "--model", onnx_path,
           "--port", str(port), "--threads", str(args.threads), "--workers", str(args.workers),
           "--timeout", "60"]
    if args.pool:
        cmd += ["--pool", str(args.pool)]
    if args.max_queue:
        cmd += ["--max-queue", str(args.max_queue)]
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}); see {log_path}")
        try:
            if httpx.get(base + "/healthz", timeout=5).status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise RuntimeError(f"the server did not become ready in 180 s; see {log_path}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(30)


def _summary(latencies: list[float], statuses: dict, elapsed: float) -> dict:
    ok = len(latencies)
    lat = np.asarray(latencies) if ok else np.zeros(1)
    return {"requests": ok + sum(v for k, v in statuses.items() if k != 200), "ok": ok,
            "throughput": round(ok / elapsed, 2) if elapsed else 0.0,
            "p50": round(float(np.percentile(lat, 50)), 1), "p95": round(float(np.percentile(lat, 95)), 1),
            "p99": round(float(np.percentile(lat, 99)), 1), "errors": {str(k): v for k, v in statuses.items()
                                                                       if k != 200},
            "elapsed_s": round(elapsed, 2)}


async def _post(client, queries: list[bytes], i: int, k: int, latencies: list, statuses: dict) -> None:
    import httpx

    t0 = time.perf_counter()
    try:
        r = await client.post(f"/search?k={k}", content=queries[i % len(queries)],
                              headers={"Content-Type": "image/jpeg"})
        status = r.status_code
    except httpx.HTTPError as err:
        status = type(err).__name__
    if status == 200:
        latencies.append((time.perf_counter() - t0) * 1e3)
    else:
        statuses[status] = statuses.get(status, 0) + 1


async def closed_loop(base: str, queries: list[bytes], clients: int, duration: float, max_requests: int,
                      k: int) -> dict:
    """``clients`` clients, each sending its next query when the last one is answered."""
    import httpx

    latencies: list[float] = []
    statuses: dict = {}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60) as client:
        for i in range(2 * clients):  # warm the connections (not counted)
            await _post(client, queries, i, k, [], {})
        sent = 0
        start = time.perf_counter()
        stop = start + duration

        async def one_client(c: int) -> None:
            nonlocal sent
            while time.perf_counter() < stop and sent < max_requests:
                sent += 1
                await _post(client, queries, sent + c, k, latencies, statuses)

        await asyncio.gather(*(one_client(c) for c in range(clients)))
        elapsed = time.perf_counter() - start
    return {"clients": clients, **_summary(latencies, statuses, elapsed)}


async def open_loop(base: str, queries: list[bytes], rate: float, duration: float, max_in_flight: int,
                    k: int) -> dict:
    """Queries arriving every ``1 / rate`` s for ``duration`` s, whatever the answers do (at most
    ``max_in_flight`` waiting; a query that finds that many is counted as ``client_full``)."""
    import httpx

    latencies: list[float] = []
    statuses: dict = {}
    limits = httpx.Limits(max_connections=max_in_flight, max_keepalive_connections=max_in_flight)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60) as client:
        for i in range(4):
            await _post(client, queries, i, k, [], {})
        tasks: set = set()
        start = time.perf_counter()
        n = int(rate * duration)
        for i in range(n):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if len(tasks) >= max_in_flight:
                statuses["client_full"] = statuses.get("client_full", 0) + 1
                continue
            task = asyncio.ensure_future(_post(client, queries, i, k, latencies, statuses))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks, timeout=120)
        elapsed = time.perf_counter() - start
    return {"rate": round(rate, 2), **_summary(latencies, statuses, elapsed)}


def markdown(report: dict) -> str:
    alone = report["alone"]
    lines = [f"Server: `cnclip-kd serve` ({report['arch']} ONNX {report['precision']}, {report['gallery']:,} "
             f"images, --threads {report['args']['threads']} --pool {report['args']['pool'] or 'auto'} "
             f"--workers {report['args']['workers']}); {report['machine']['cores']} cores "
             f"({report['machine']['cpu']}; {', '.join(report['machine']['isa'])}).",
             "",
             f"One query alone in-process: decode {alone['decode_ms']} ms + encode {alone['encode_ms']} ms = "
             f"**{alone['query_ms']} ms** → ideal {report['ideal_qps']:.1f} queries/s on "
             f"{report['machine']['cores']} cores.",
             "",
             "| 客户端 clients | 请求 requests | 吞吐 throughput (q/s) | p50 ms | p95 ms | p99 ms | 错误 errors |",
             "|---:|---:|---:|---:|---:|---:|---|"]
    for r in report["closed_loop"]:
        errors = ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "0"
        lines.append(f"| {r['clients']} | {r['requests']} | {r['throughput']:.1f} | {r['p50']:.1f} | {r['p95']:.1f} "
                     f"| {r['p99']:.1f} | {errors} |")
    o = report.get("open_loop")
    if o:
        errors = ", ".join(f"{k}: {v}" for k, v in o["errors"].items()) or "0"
        lines.append(f"| open loop {o['rate']:.1f} q/s (80 %) | {o['requests']} | {o['throughput']:.1f} | "
                     f"{o['p50']:.1f} | {o['p95']:.1f} | {o['p99']:.1f} | {errors} |")
    v = report["verdicts"]
    lines += ["", f"- saturated throughput {v['saturated_qps']:.1f} q/s vs target ≥ {v['target_qps']:.1f} "
                  f"(0.9 × ideal): **{'met' if v['throughput_met'] else 'not met'}**"]
    if o:
        lines.append(f"- p99 / p50 at 80 % of saturation: {v['p99_over_p50']:.2f} (target ≤ 3): "
                     f"**{'met' if v['tail_met'] else 'not met'}**")
    met = "met" if v["other_5xx"] == 0 else "not met"
    lines.append(f"- 5xx other than 503: {v['other_5xx']} (target 0): **{met}**")
    lines.append(f"- client process CPU: {report['client_cpu_s']:.1f} s over {report['wall_s']:.0f} s of load "
                 "(the client shares the cores with the server)")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vision-model", default="ViT-B-16", help="student architecture (random weights)")
    p.add_argument("--preset", default=None, help="a small preset instead (tiny/demo), to test the script")
    p.add_argument("--precision", default="fp32", choices=["fp32", "int8"], help="ONNX file to serve")
    p.add_argument("--gallery", type=int, default=10_000, help="gallery size (synthetic vectors)")
    p.add_argument("--index-kind", default="auto", help="index kind (auto: flat ≤ 50k, else HNSW)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per ONNX session")
    p.add_argument("--pool", type=int, default=None, help="server's --pool (default: cores / threads)")
    p.add_argument("--workers", type=int, default=1, help="server's --workers")
    p.add_argument("--max-queue", type=int, default=64, help="server's --max-queue (default 64: no 503 expected)")
    p.add_argument("--clients", default="1,2,4,8,16", help="closed-loop concurrency levels")
    p.add_argument("--duration", type=float, default=15.0, help="seconds per level")
    p.add_argument("--max-requests", type=int, default=5000, help="at most this many requests per level")
    p.add_argument("--max-in-flight", type=int, default=64, help="open loop: client-side bound")
    p.add_argument("--queries", type=int, default=4, help="different photos")
    p.add_argument("-k", type=int, default=10, help="results per query")
    p.add_argument("--work-dir", default=None, help="keep the checkpoint, ONNX files and index here (reused)")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    from cnclip_kd.deploy.quantize import int8_path
    from cnclip_kd.models.students import model_info
    from cnclip_kd.deploy.planner import synthetic_index

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="serve-load-"))
    work.mkdir(parents=True, exist_ok=True)
    info = model_info(args.vision_model, preset=args.preset)
    host = machine()
    logger.info("machine: %s", host)
    arch = args.preset or args.vision_model
    ckpt = make_checkpoint(work, arch)
    export = export_models(work, ckpt, f"image-{arch}", args.threads)
    onnx_path = str(export["onnx"]) if args.precision == "fp32" else str(int8_path(export["onnx"]))
    if not Path(onnx_path).is_file():
        p.error(f"{onnx_path}: no such export (int8 was not kept?)")
    index_dir, _ = synthetic_index(work, args.gallery, int(info["embed_dim"]), args.index_kind)
    queries = make_queries(args.queries)["800×800"]

    alone = encode_alone(onnx_path, queries, args.threads, repeats=5)
    cores = os.cpu_count() or 1
    ideal = cores / (alone["query_ms"] / 1e3)
    logger.info("one query alone: %s -> ideal %.1f q/s", alone, ideal)

    proc, base = start_server(index_dir, onnx_path, args, work / "server.log")
    t_load = time.perf_counter()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    try:
        closed = []
        for c in [int(x) for x in args.clients.split(",") if x.strip()]:
            row = asyncio.run(closed_loop(base, queries, c, args.duration, args.max_requests, args.k))
            logger.info("closed loop: %s", row)
            closed.append(row)
        best = max(r["throughput"] for r in closed)
        opened = asyncio.run(open_loop(base, queries, 0.8 * best, args.duration, args.max_in_flight, args.k)) \
            if best > 0 else None
        logger.info("open loop: %s", opened)
    finally:
        stop_server(proc)
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    client_cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    rows = closed + ([opened] if opened else [])
    other_5xx = sum(v for r in rows for k, v in r["errors"].items() if k.isdigit() and int(k) >= 500 and k != "503")
    verdicts = {"saturated_qps": best, "target_qps": 0.9 * ideal, "throughput_met": best >= 0.9 * ideal,
                "other_5xx": other_5xx}
    if opened:
        ratio = opened["p99"] / opened["p50"] if opened["p50"] else float("inf")
        verdicts.update(p99_over_p50=round(ratio, 2), tail_met=ratio <= 3)
    host["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    report = {"arch": arch, "precision": args.precision, "gallery": args.gallery, "machine": host,
              "args": vars(args), "alone": alone, "ideal_qps": round(ideal, 2), "closed_loop": closed,
              "open_loop": opened, "verdicts": verdicts, "client_cpu_s": round(client_cpu, 2),
              "wall_s": round(time.perf_counter() - t_load, 1)}
    emit(markdown(report), args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
