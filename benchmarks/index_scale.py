"""FAISS index kinds at gallery scale: build time, memory, recall@10 and search latency, measured at 100k / 1M
and extrapolated to 10M / 100M.

The gallery is ``n`` synthetic clustered 512-d unit vectors (``n // 50``
clusters of 50, noise 0.7 per dimension: the generator of
``benchmarks/query_latency.py``, so every true top 10 is a choice among ~49
near-equal cluster mates, which is hard for compressed codes); the queries are
fresh points of the same clusters. Each index kind is built by the package's
own :func:`cnclip_kd.retrieval.index.build_faiss_index` with its default parameters
(:func:`cnclip_kd.retrieval.index._default_params`) in a process of its own, so its
peak RSS is its own. Reported per kind: build time (IVF: train + add), index
bytes (the saved file), process RSS after the gallery array is freed (what a
server holds) and its peak during the build, recall@10 against exact search,
and search p50 at batch 1 and batch 64. The exact ``flat`` index is the
reference (its results are the ground truth).

Then: which kind ``kind="auto"`` (:func:`cnclip_kd.retrieval.index.choose_index_kind`)
picks at each size (and at 10M / 100M, with and without a memory budget),
whether auto's choice at the largest measured size meets recall@10 ≥ 0.95 with
p50 ≤ 5 ms (batch 1), and memory and build time extrapolated to 10M and 100M
with the assumptions written out beside them.

Usage (1M needs ~6 GB of RAM at peak; see README for the wall time on 2 cores)::

    python benchmarks/index_scale.py --sizes 100000,1000000 --threads 2 --out out/bench/index_scale.json

Quick check of the script itself::

    python benchmarks/index_scale.py --sizes 3000 --queries 64 --kinds flat,hnsw,ivfsq
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import emit, exit_on_worker_error, run_in_process

logger = logging.getLogger("index_scale")

DIM = 512
KINDS = ("flat", "hnsw", "ivf", "ivfsq", "ivfpq")
#: The target for auto's choice at the largest measured size.
TARGET_RECALL, TARGET_P50_MS = 0.95, 5.0
EXTRAPOLATE = (10_000_000, 100_000_000)
MACHINE_GIB = 24


def _rss_mb() -> tuple[float, float]:
    """(current, peak) resident memory of this process in MiB (Linux ``/proc``; 0 elsewhere)."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return 0.0, 0.0
    get = lambda key: float(re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE).group(1)) / 1024
    return get("VmRSS"), get("VmHWM")


def _p50_ms(index, queries: np.ndarray, batch: int, repeats: int, max_s: float = 30.0) -> float:
    """Median search time of ``repeats`` batches (fewer, at least 5, once ``max_s`` seconds are spent)."""
    times: list[float] = []
    for r in range(repeats):
        if len(times) >= 5 and sum(times) > max_s:
            break
        s = (r * batch) % max(1, len(queries) - batch + 1)
        q = np.ascontiguousarray(queries[s:s + batch])
        t0 = time.perf_counter()
        index.search(q, 10)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def _worker(job: dict) -> dict:
    """Build and measure one index kind (runs in its own process)."""
    import faiss

    from cnclip_kd.retrieval.index import _default_params, build_faiss_index

    faiss.omp_set_num_threads(job["threads"])
    work = Path(job["work"])
    emb = np.load(work / "base.npy")
    queries = np.load(work / "queries.npy")
    n, dim = emb.shape
    kind = job["kind"]
    params = _default_params(kind, n, dim)
    timings: dict = {}
    rss0, _ = _rss_mb()
    t0 = time.perf_counter()
    index, _gpu = build_faiss_index(emb, kind, params, seed=0, timings=timings)
    build_s = time.perf_counter() - t0
    _, peak = _rss_mb()
    del emb
    gc.collect()
    rss, _ = _rss_mb()
    path = work / f"{kind}.faiss"
    faiss.write_index(index, str(path))
    nbytes = path.stat().st_size
    path.unlink()
    _, found = index.search(queries, 10)
    if kind == "flat":
        np.save(work / "truth.npy", found)
    truth = np.load(work / "truth.npy")
    recall = float(np.mean([len(set(a[a >= 0]) & set(t)) / 10 for a, t in zip(found, truth)]))
    row = {"n": n, "kind": kind, "params": params, "build_s": build_s, "train_s": timings.get("train_s", 0.0),
            "add_s": timings.get("add_s", build_s), "bytes": nbytes, "rss_before_mb": rss0, "rss_mb": rss,
            "peak_rss_mb": peak, "recall@10": recall,
            "p50_b1_ms": _p50_ms(index, queries, 1, job["repeats_b1"]),
            "p50_b64_ms": _p50_ms(index, queries, 64, job["repeats_b64"])}
    sys.stderr.write(f"row {json.dumps(row)}\n")  # each row as it is measured: a stopped run keeps them
    sys.stderr.flush()
    return row


def _run_kind(job: dict) -> dict:
    """:func:`_worker` in a process of its own; if it fails or dies (e.g. killed for memory), WorkerError says so."""
    return run_in_process(f"index {job['kind']} at N = {job['n']}", _worker, job)


def _extrapolate(row: dict, big: int) -> dict:
    """Memory and build time of ``row``'s kind at ``big`` vectors (assumptions in :data:`ASSUMPTIONS`)."""
    from cnclip_kd.retrieval.index import _default_params, _estimate_bytes

    n, kind = row["n"], row["kind"]
    ratio = big / n
    est_bytes = row["bytes"] * _estimate_bytes(kind, big, DIM, _default_params(kind, big, DIM)) / max(
        1, _estimate_bytes(kind, n, DIM, row["params"]))
    if kind == "flat":
        build = row["build_s"] * ratio
    elif kind == "hnsw":
        build = row["build_s"] * ratio * math.log(big) / math.log(n)
    else:
        nlist_ratio = _default_params(kind, big, DIM)["nlist"] / row["params"]["nlist"]
        build = row["train_s"] * nlist_ratio ** 2 + row["add_s"] * ratio * nlist_ratio
    return {"n": big, "kind": kind, "bytes": est_bytes, "build_s": build,
            "fits": est_bytes < MACHINE_GIB * 2 ** 30 * 0.8}


ASSUMPTIONS = (
    ("Memory: the measured index bytes scaled by the package's own size model (`_estimate_bytes`: flat and HNSW "
    "grow with N; IVF with N × code size plus nlist centroids, nlist = 4·√N)."),
    "Build, flat: linear in N. HNSW: N·log N (each insertion searches a graph of growing depth).",
    ("Build, IVF: training uses 64 points per list and k-means costs (points × lists), so it grows with nlist² "
    "(∝ N); adding assigns every vector to one of nlist lists, so it grows with N × nlist (∝ N^1.5). "
    "Same 2 cores, same thread count; no GPU."),
    "'Fits' = the index alone under 80 % of this 24 GiB machine (the gallery array is not held by a server).",
)


def _cpu_info() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    model = re.search(r"^model name\s*:\s*(.*)$", text, re.MULTILINE)
    flags = sorted({f for f in ("avx2", "avx512f", "avx512_vnni", "amx_int8") if re.search(rf"\b{f}\b", text)})
    return f"{model.group(1) if model else '?'} ({', '.join(flags) or 'no AVX2'})"


def _markdown(rows: list[dict], autos: dict, extra: list[dict], verdict: dict, info: dict) -> str:
    lines = [(f"Index kinds over synthetic clustered 512-d unit vectors; {info['queries']} queries; "
             f"{info['threads']} threads; {info['cpu']}; wall {info['wall_s']:.0f} s."), "",
             ("| N | kind | auto | params | build s (train + add) | index MB | RSS MB (peak) | recall@10 "
             "| p50 ms b=1 | p50 ms b=64 |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items()) or "-"
        lines.append(
            f"| {r['n']:,} | {r['kind']} | {'✓' if autos[r['n']] == r['kind'] else ''} | {params} "
            f"| {r['build_s']:.1f} ({r['train_s']:.1f} + {r['add_s']:.1f}) | {r['bytes'] / 2 ** 20:.0f} "
            f"| {r['rss_mb']:.0f} ({r['peak_rss_mb']:.0f}) | {r['recall@10']:.3f} | {r['p50_b1_ms']:.2f} "
            f"| {r['p50_b64_ms']:.1f} |")
    lines += ["", (f"auto at {verdict['n']:,}: **{verdict['kind']}**: recall@10 {verdict['recall@10']:.3f} "
                  f"(target ≥ {TARGET_RECALL}), p50 {verdict['p50_b1_ms']:.2f} ms (target ≤ {TARGET_P50_MS}): "
                  f"{'meets the target' if verdict['ok'] else 'MISSES the target'}."), ""]
    lines += ["Extrapolated (from the largest measured size):", "",
              "| N | kind | auto picks (no budget / 16 GiB budget) | index GB | build s (est.) | fits 24 GiB |",
              "|---|---|---|---|---|---|"]
    for e in extra:
        lines.append(f"| {e['n']:,} | {e['kind']} | {e['auto']} / {e['auto_16g']} | {e['bytes'] / 2 ** 30:.1f} "
                     f"| {e['build_s']:,.0f} | {'yes' if e['fits'] else 'no'} |")
    lines += ["", "Assumptions:"] + [f"- {a}" for a in ASSUMPTIONS]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="100000,1000000", help="gallery sizes, comma-separated")
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"index kinds (flat is always run first; of {KINDS})")
    ap.add_argument("--queries", type=int, default=1000, help="queries for recall and latency")
    ap.add_argument("--repeats", type=int, default=200, help="batch-1 searches timed (batch 64: a tenth)")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="faiss OpenMP threads")
    ap.add_argument("--work-dir", default=None, help="where the vectors go (default: a temp folder)")
    ap.add_argument("--out", default=None, help="also write the report here as JSON")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    from cnclip_kd.retrieval.index import choose_index_kind
    from cnclip_kd.deploy.planner import clustered_vectors

    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    kinds = ["flat"] + [k for k in args.kinds.split(",") if k and k != "flat"]
    unknown = set(kinds) - set(KINDS)
    if unknown:
        ap.error(f"unknown kinds {sorted(unknown)}; choose from {KINDS}")
    t_start = time.perf_counter()
    rows: list[dict] = []
    autos: dict[int, str] = {}
    with tempfile.TemporaryDirectory(prefix="index_scale-", dir=args.work_dir) as tmp:
        work = Path(tmp)
        for n in sizes:
            clusters = max(1, n // 50)
            logger.info("N = %d: generating %d clustered vectors", n, n)
            np.save(work / "base.npy", clustered_vectors(n, DIM, n_clusters=clusters, seed=1, centre_seed=0))
            np.save(work / "queries.npy", clustered_vectors(args.queries, DIM, n_clusters=clusters, seed=2,
                                                            centre_seed=0))
            gc.collect()
            autos[n] = choose_index_kind(n, DIM)
            for kind in kinds:
                t0 = time.perf_counter()
                row = _run_kind({"work": str(work), "n": n, "kind": kind, "threads": args.threads,
                                 "repeats_b1": args.repeats, "repeats_b64": max(3, args.repeats // 10)})
                logger.info("N = %d %s: %.0f s, recall@10 %.3f, p50 %.2f ms (%.0f s with setup)", n, kind,
                            row["build_s"], row["recall@10"], row["p50_b1_ms"], time.perf_counter() - t0)
                rows.append(row)
    largest = max(sizes)
    chosen = next(r for r in rows if r["n"] == largest and r["kind"] == autos[largest]) if autos[largest] in kinds \
        else None
    verdict = {"n": largest, "kind": autos[largest], "recall@10": chosen["recall@10"] if chosen else float("nan"),
               "p50_b1_ms": chosen["p50_b1_ms"] if chosen else float("nan")}
    verdict["ok"] = bool(chosen and verdict["recall@10"] >= TARGET_RECALL and verdict["p50_b1_ms"] <= TARGET_P50_MS)
    extra = []
    for big in EXTRAPOLATE:
        for r in rows:
            if r["n"] == largest:
                extra.append({**_extrapolate(r, big), "auto": choose_index_kind(big, DIM),
                              "auto_16g": choose_index_kind(big, DIM, memory_budget_mb=16 * 1024)})
    info = {"cpu": _cpu_info(), "threads": args.threads, "queries": args.queries,
            "wall_s": time.perf_counter() - t_start, "python": platform.python_version()}
    text = _markdown(rows, autos, extra, verdict, info)
    emit(text, args.out, {"rows": rows, "auto": {str(k): v for k, v in autos.items()}, "verdict": verdict,
                          "extrapolated": extra, "assumptions": list(ASSUMPTIONS), "info": info})
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_worker_error(main))
