"""Resident memory of a torch-free ONNX serving process: an index of N images plus an int8 image encoder.

What a CPU server holds once it has answered a few queries, measured in a
fresh process per configuration (``VmRSS`` after the queries and ``VmHWM``,
the peak, from ``/proc/self/status``), split into its parts as they load:
Python with numpy / faiss / onnxruntime / PIL imported, the FAISS index, the
gallery's metadata, the ONNX Runtime session, and the queries' working memory.
Each process also says whether ``torch`` was imported (it must not be).

Configurations: every ``--models`` candidate (cn_clip architectures, random
weights: memory does not depend on the values; ViT-B-16 gives 512-d
embeddings, RN50 1024-d) × every int8 method × every ``--index-kinds`` over
``--gallery`` synthetic clustered vectors (``auto``: HNSW with fp16 vectors at
100k; ``ivfsq``: IVF with 8-bit codes, what ``--memory-budget-mb`` picks when
HNSW does not fit). The index's recall@10 against exact search is shown beside
its memory. Target: ≤ 400 MB at 100k.

Usage (about 10 minutes on 2 cores the first time; models and indexes are kept in --work-dir)::

    python benchmarks/serving_memory.py --work-dir out/plan --out out/deploy/serving_memory.json

Quick check of the script itself::

    python benchmarks/serving_memory.py --models tiny --gallery 2000 --index-kinds flat
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _report import emit  # noqa: E402 - benchmarks/ is on sys.path when run as a script

logger = logging.getLogger("serving_memory")

TARGET_MB = 400.0

#: Runs in a fresh interpreter: loads what a server loads, step by step, and prints the resident memory after each.
_PROBE = r"""
import json, sys
def mb(key="VmRSS"):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
steps = {"python": mb()}
import numpy, faiss, onnxruntime, PIL.Image  # noqa: F401
from cnclip_kd.deploy import OnnxEncoder, Retriever
from cnclip_kd.retrieval.index import GalleryIndex
from cnclip_kd.deploy.planner import sample_queries
steps["imports"] = mb()
index_dir, encoder, n_queries = sys.argv[1], sys.argv[2], int(sys.argv[3])
faiss_alone = faiss.read_index(index_dir + "/index.faiss")
steps["faiss index"] = mb()
del faiss_alone
base = mb()
index = GalleryIndex.load(index_dir)
steps["index + gallery"] = mb() - base + steps["imports"]
enc = OnnxEncoder(encoder, threads=2)
steps["encoder session"] = mb() - base + steps["imports"]
retriever = Retriever(index, enc)
queries = sample_queries(n_queries)
for q in queries * 3:
    retriever.search(q, 10)
steps["after queries"] = mb() - base + steps["imports"]
print(json.dumps({"steps": steps, "rss_mb": mb(), "peak_mb": mb("VmHWM"), "torch_imported": "torch" in sys.modules,
                  "kind": index.stats.get("kind"), "params": index.stats.get("params"),
                  "recall@10": index.stats.get("recall@10"), "index_bytes": index.stats.get("bytes"),
                  "int8_method": enc.int8_method}))
"""


def probe(index_dir: Path, encoder: Path, queries: int) -> dict:
    """The probe in a fresh process (nothing of this one's memory counts)."""
    proc = subprocess.run([sys.executable, "-c", _PROBE, str(index_dir), str(encoder), str(queries)],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"probe failed for {encoder} over {index_dir}:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="ViT-B-16@224,RN50@224", help="candidates ARCH@SIDE (random weights)")
    p.add_argument("--methods", default="dynamic,static", help="int8 methods")
    p.add_argument("--index-kinds", default="auto,ivfsq", help="index kinds")
    p.add_argument("--gallery", type=int, default=100_000, help="gallery size (synthetic vectors)")
    p.add_argument("--queries", type=int, default=3, help="different query photos (each asked 3 times)")
    p.add_argument("--work-dir", default=None, help="models and indexes live here (reused; e.g. cnclip-kd plan's)")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    t_start = time.perf_counter()

    from cnclip_kd.deploy.planner import Candidate, candidate_encoders, cpu_features, synthetic_index

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="serving-memory-"))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    kinds = [k.strip() for k in args.index_kinds.split(",") if k.strip()]
    rows = []
    for spec in [m.strip() for m in args.models.split(",") if m.strip()]:
        cand = Candidate.parse(spec)
        dim = int(cand.info()["embed_dim"])
        files = candidate_encoders(cand, work, [f"onnx-int8-{m}" for m in methods])
        for kind in kinds:
            index_dir, _ = synthetic_index(work, args.gallery, dim, kind)
            for method in methods:
                r = probe(index_dir, files[f"onnx-int8-{method}"], args.queries)
                rows.append({"model": cand.name, "dim": dim, "method": method, **r})
                logger.info("%s %s over %s: %.0f MB", cand.name, method, r["kind"], r["rss_mb"])

    head = ("| model | int8 | index (recall@10) | imports | + index + gallery | + encoder session | after queries "
            "| peak | torch imported | ≤ 400 MB |")
    lines = [head, "|---|---|---|---:|---:|---:|---:|---:|:---:|:---:|"]
    for r in rows:
        s = r["steps"]
        kind = r["kind"] + (f" {r['params'].get('storage')}" if r["kind"] == "hnsw" and r.get("params") else "")
        recall = "-" if r["recall@10"] is None else f"{r['recall@10']:.4f}"
        lines.append(f"| {r['model']} ({r['dim']}-d) | {r['method']} | {kind} ({recall}) | {s['imports']:.0f} "
                     f"| {s['index + gallery']:.0f} | {s['encoder session']:.0f} | **{r['rss_mb']:.0f}** "
                     f"| {r['peak_mb']:.0f} | {'yes' if r['torch_imported'] else 'no'} "
                     f"| {'yes' if r['rss_mb'] <= TARGET_MB else 'no'} |")
    cpu = cpu_features()
    text = "\n".join([
        f"## Serving memory: ONNX Runtime + FAISS, no torch, gallery {args.gallery:,} (MB resident, cumulative)",
        "",
        f"Machine: {cpu['summary']}. One fresh process per row; 2 threads; {args.queries} query photos × 3.",
        "",
        *lines,
        "",
        f"Whole run {time.perf_counter() - t_start:.0f} s.",
    ])
    emit(text, args.out, {"args": vars(args), "cpu": cpu, "rows": rows, "target_mb": TARGET_MB})
    return 0


if __name__ == "__main__":
    sys.exit(main())
