"""Markdown tables of evaluation results (comparison, index, text evaluation)."""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

from .evaluate import TEXT_COLUMNS
from .index import GalleryIndex

__all__ = ["comparison_markdown", "index_markdown", "text_eval_markdown"]


def fmt_metric(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "-" if value is None else str(value)


def comparison_markdown(rows: Sequence[Mapping[str, Any]], *, part: str = "all") -> str:
    """Comparison rows (:func:`compare_models`) as a Markdown table: one line per model, metrics to 3 decimals.

    Args:
        rows: The rows.
        part: ``"image"`` (image → image columns), ``"text"`` (text ↔ image, :data:`TEXT_COLUMNS`;
            ``-`` for a model without a text tower) or ``"all"``.
    """
    if part not in ("all", "image", "text"):
        raise ValueError(f"part must be 'all', 'image' or 'text', got {part!r}")
    found = list(dict.fromkeys(k for r in rows for k in r))
    image_keys = [k for k in found if "@" in k and k != "recall@10" and k not in TEXT_COLUMNS]
    text_keys = [k for k in TEXT_COLUMNS if any(r.get(k) is not None for r in rows)] or list(TEXT_COLUMNS)
    keys = {"image": image_keys, "text": text_keys, "all": image_keys + text_keys}[part]
    head = "| 模型 model | 角色 role | 索引 index | N | " + " | ".join(keys) + " |"
    lines = [head, "|---|---|---|---:|" + "---:|" * len(keys)]
    lines += [f"| {r['model']} | {r.get('role', '')} | {r.get('index', '')} | {r.get('n', '')} | "
              + " | ".join(fmt_metric(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def index_markdown(index: GalleryIndex) -> str:
    """An index's facts and, when evaluated, its metrics (overall and per category) as Markdown."""
    st = index.stats
    lines = ["| 索引 index | N | D | 大小 size | 构建 build | recall@10 | 单次查询 query | 参数 params |",
             "|---|---:|---:|---:|---:|---:|---:|---|",
             f"| {st.get('kind')} | {st.get('n')} | {st.get('dim')} | {st.get('bytes', 0) / 2 ** 20:.2f} MB | "
             f"{st.get('build_s', 0):.2f} s | {fmt_metric(st.get('recall@10'))} | {st.get('search_ms', 0):.3f} ms | "
             f"{json.dumps(st.get('params') or {})} |"]
    ev = st.get("eval") or {}
    groups = [("类目 category", ev.get("label")), ("商品 product id", ev.get("product_id"))]
    groups += [(f"· {label}", m) for label, m in (ev.get("per_label") or {}).items()]
    groups = [(g, m) for g, m in groups if m]
    if groups:
        keys = [k for k in groups[0][1] if k != "n_queries"]
        lines += ["", "| 相关性 relevant = same … | 查询数 queries | " + " | ".join(keys) + " |",
                  "|---|---:|" + "---:|" * len(keys)]
        lines += [f"| {g} | {m.get('n_queries')} | " + " | ".join(fmt_metric(m.get(k)) for k in keys) + " |"
                  for g, m in groups]
    return "\n".join(lines)


def text_eval_markdown(text_eval: Mapping[str, Any] | None) -> str:
    """A :func:`evaluate_text` result as a Markdown table: text → image, image → text, category text → image."""
    if not text_eval:
        return "_没有文本评估 no text evaluation (the model has no text tower, or the gallery no texts)_"
    rows = [("文搜图 text → image", text_eval.get("t2i")), ("图搜文 image → text", text_eval.get("i2t")),
            ("文搜图·类目 text → image, same category", text_eval.get("t2i_category"))]
    lines = ["| 方向 direction | 查询数 queries | R@1 | R@5 | R@10 | mean R | P@10 |", "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {name} | {m.get('n_queries')} | {fmt_metric(m.get('r@1'))} | {fmt_metric(m.get('r@5'))} | {fmt_metric(m.get('r@10'))} "
              f"| {fmt_metric(m.get('mean_recall'))} | {fmt_metric(m.get('p@10'))} |" for name, m in rows if m]
    lines.append("")
    lines.append(f"{text_eval.get('n_texts')} texts, {text_eval.get('n_images')} images, context length "
                 f"{text_eval.get('context_length')}, {text_eval.get('truncated', 0)} texts cut at it.")
    return "\n".join(lines)
