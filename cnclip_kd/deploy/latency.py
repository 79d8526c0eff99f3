"""Query latency on the CPU: per-stage timings, their summary, and a Markdown table."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from .backends import QuerySource
from .runtime import Retriever


__all__ = ["latency_markdown", "measure_latency", "summarize_timings"]


# --------------------------------------------------------------------------- latency


STAGES = ("decode", "encode", "search", "total")


def summarize_timings(runs: Sequence[Mapping[str, float]]) -> dict:
    """p50 / p95 (ms) of each stage over ``runs`` of :attr:`SearchResult.timings_ms`."""
    out: dict = {"n": len(runs)}
    for stage in STAGES:
        values = np.asarray([r[stage] for r in runs], dtype=np.float64)
        out[stage] = {"p50": round(float(np.percentile(values, 50)), 2),
                      "p95": round(float(np.percentile(values, 95)), 2)} if len(values) else None
    return out


def measure_latency(retriever: Retriever, queries: Sequence[QuerySource] | Sequence[str], *, repeats: int = 5,
                    warmup: int = 1, k: int = 10, text: bool = False) -> dict:
    """Time end-to-end queries: every query ``warmup`` times untimed, then ``repeats`` times.

    Args:
        retriever: The Retriever.
        queries: Images (:meth:`Retriever.search`) or, with ``text=True``, text queries
            (:meth:`Retriever.search_text`).
        repeats: Timed passes over the queries.
        warmup: Untimed passes first.
        k: Results per query.
        text: Time text queries.

    Returns:
        :func:`summarize_timings` of the timed runs, plus ``backend`` (the text encoder's for text).
    """
    search = retriever.search_text if text else retriever.search
    for _ in range(warmup):
        for q in queries:
            search(q, k)
    runs = [search(q, k).timings_ms for _ in range(repeats) for q in queries]
    return {"backend": retriever.text_backend if text else retriever.backend, **summarize_timings(runs)}


def _ms(value: float) -> str:
    return f"{value:.2f}" if value < 1 else f"{value:.1f}"  # a tokenised text query takes well under 1 ms


def latency_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """Latency rows as a Markdown table (image or text queries: the same stages).

    Each row: ``backend``, optional ``query`` (e.g. ``"800×800"``, ``"text"``), the stages of
    :func:`summarize_timings`, and optional ``speedup`` (× baseline p50 total) and ``rss_mb``.
    """
    has_query = any("query" in r for r in rows)
    has_speed = any(r.get("speedup") is not None for r in rows)
    has_rss = any(r.get("rss_mb") is not None for r in rows)
    head = (["查询 query"] if has_query else []) + ["后端 backend", "总计 total p50", "p95",
                                                   "解码预处理/分词 decode p50", "编码 encode p50", "p95",
                                                   "检索 search p50"]
    head += (["加速 speed-up"] if has_speed else []) + (["峰值内存 peak RSS"] if has_rss else [])
    align = ["---"] * (2 if has_query else 1) + ["---:"] * (len(head) - (2 if has_query else 1))
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    for r in rows:
        cells = ([str(r.get("query", ""))] if has_query else []) + [str(r["backend"])]
        cells += [f"{r['total']['p50']:.1f} ms", f"{r['total']['p95']:.1f}", _ms(r['decode']['p50']),
                  f"{r['encode']['p50']:.1f}", f"{r['encode']['p95']:.1f}", f"{r['search']['p50']:.2f}"]
        if has_speed:
            cells.append("-" if r.get("speedup") is None else f"{r['speedup']:.2f}×")
        if has_rss:
            cells.append("-" if r.get("rss_mb") is None else f"{r['rss_mb']:.0f} MB")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
