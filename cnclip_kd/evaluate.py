"""Evaluation and model comparison: image→image and text↔image retrieval metrics of saved indexes.

* :func:`evaluate_index` gives leave-one-out image→image P@10, mAP@10 and
  R@1/5/10 by category and by product id.
* :func:`evaluate_text` gives text→image and image→text R@1/5/10 (and their
  mean) the way cn_clip's MUGE evaluation computes them, plus category-level
  text→image P@10 (:mod:`cnclip_kd.text_metrics`).
* :func:`index_model` embeds, indexes, evaluates and saves one model;
  :func:`compare_models` runs the same gallery and queries through several
  models and writes the table; :func:`discover_models` finds the models the
  kit wrote.
"""

from __future__ import annotations

import csv
import gc
import io
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .encoders import ImageEncoder, _checkpoint_facts, load_encoder
from .files import atomic_write_text
from .gallery import Gallery, embed_gallery
from .index import GalleryIndex
from .metrics import grouped_ranking_metrics, neighbour_hits, ranking_metrics

logger = logging.getLogger(__name__)

__all__ = [
    "compare_models",
    "comparison_markdown",
    "discover_models",
    "evaluate_index",
    "index_markdown",
    "index_model",
    "latest_checkpoint",
    "metrics_row",
    "saved_indexes",
    "spec_name",
    "write_comparison",
]


def evaluate_index(index: GalleryIndex, embeddings: np.ndarray | None = None, *, k: int = 10,
                   by: Sequence[str] = ("label", "product_id"), ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Leave-one-out image→image retrieval over the whole gallery, through the index.

    Every gallery image queries the index (itself excluded); a hit is a result
    with the same value of the ``by`` field. Queries whose value is empty, or
    that no other gallery image shares, are left out (``n_queries`` counts the
    rest); a field no query can be answered on (e.g. one image per product) is
    left out of the result.

    Args:
        index: The index.
        embeddings: Query embeddings, one per gallery row (default: ``index.embeddings``).
        k: Depth of P@k and mAP@k (results fetched per query).
        by: Metadata fields that define relevance: ``"label"`` (category), ``"product_id"``.
        ks: Depths of Recall@k (each ≤ ``k``).

    Returns:
        ``{"k", "n_gallery", "<field>": {"p@k", "map@k", "r@1", "r@5", "r@10", "n_queries"},
        "per_label": {category: {...}}}`` — ``per_label`` splits the category metrics by the
        query's category.
    """
    emb = index.embeddings if embeddings is None else embeddings
    if emb is None:
        raise ValueError("evaluate_index needs the gallery embeddings (the index was saved without them)")
    emb = np.asarray(emb, dtype=np.float32)
    if emb.shape[0] != len(index.gallery):
        raise ValueError(f"{emb.shape[0]} query embeddings for a gallery of {len(index.gallery)}")
    ks = [x for x in ks if x <= k]
    _, rows = index.search(emb, k, exclude_ids=index.gallery.ids)
    out: dict = {"k": int(k), "n_gallery": len(index.gallery)}
    for key in by:
        labels = index.gallery.column(key)
        hits, n_relevant = neighbour_hits(labels, rows)
        if not (n_relevant > 0).any():
            logger.info("evaluation by %s: no gallery image shares its %s with another; left out", key, key)
            continue
        out[key] = ranking_metrics(hits, n_relevant, ks=ks)
        if key == "label":
            out["per_label"] = grouped_ranking_metrics(hits, n_relevant, labels, ks=ks)
    return out


def metrics_row(name: str, index: GalleryIndex, evaluation: Mapping[str, Any] | None = None) -> dict:
    """One comparison-table row: model, role, index facts, category metrics, product-id metrics (``product/…``)."""
    ev = dict(evaluation if evaluation is not None else index.stats.get("eval") or {})
    model = index.stats.get("model") or {}
    row = {"model": name, "role": model.get("role", ""), "spec": model.get("spec", ""),
           "dim": index.dim, "n": len(index), "index": index.stats.get("kind"),
           "recall@10": index.stats.get("recall@10")}
    for key, prefix in (("label", ""), ("product_id", "product/")):
        for metric, value in (ev.get(key) or {}).items():
            row[f"{prefix}{metric}"] = value
    return row


def write_comparison(rows: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike, *,
                     extra: Mapping[str, Any] | None = None) -> tuple[Path, Path]:
    """Write the comparison rows as ``comparison.csv`` (UTF-8 with BOM, opens in Excel) and
    ``comparison.json`` (with ``extra``) in ``out_dir``, each atomically.

    Returns:
        ``(csv_path, json_path)``.
    """
    out_dir = Path(out_dir)
    columns = list(dict.fromkeys(key for r in rows for key in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    csv_path, json_path = out_dir / "comparison.csv", out_dir / "comparison.json"
    atomic_write_text(csv_path, "\ufeff" + buf.getvalue())
    atomic_write_text(json_path, json.dumps({**dict(extra or {}), "rows": list(rows)}, ensure_ascii=False,
                                             indent=1, default=str))
    return csv_path, json_path


def index_model(spec: str | os.PathLike, gallery: Gallery, index_dir: str | os.PathLike, *,
                cache_dir: str | os.PathLike | None = None, kind: str = "auto",
                memory_budget_mb: float | None = None, k: int = 10, by: Sequence[str] = ("label", "product_id"),
                batch_size: int = 64, num_workers: int = 0, device: str | None = None,
                encoder: ImageEncoder | None = None) -> GalleryIndex:
    """Embed a gallery with one model, build and evaluate the index, save it to ``index_dir``.

    What ``cnclip-kd index`` and notebook 03 do for one model. The index's
    ``stats["model"]`` holds the spec (``load_encoder(stats["model"]["spec"])``
    encodes new queries), ``stats["eval"]`` the evaluation.

    Args:
        spec: See :func:`load_encoder`.
        gallery: The images.
        index_dir: Where the index folder goes (replaced as a whole).
        cache_dir: Embedding chunks / cache (default ``<index_dir>/../_embeddings/<name>``).
        kind: Index kind (:meth:`GalleryIndex.build`).
        memory_budget_mb: For ``kind="auto"``.
        k: Evaluation depth.
        by: Evaluation fields.
        batch_size: Images per forward pass.
        num_workers: DataLoader workers.
        device: Where the model runs.
        encoder: An already loaded encoder for ``spec`` (skips loading).

    Returns:
        The saved index.
    """
    index_dir = Path(index_dir)
    encoder = encoder or load_encoder(spec, device=device)
    cache = Path(cache_dir) if cache_dir else index_dir.parent / "_embeddings" / index_dir.name
    emb = embed_gallery(encoder, gallery, cache, batch_size=batch_size, num_workers=num_workers)
    index = GalleryIndex.build(emb, gallery, kind=kind, memory_budget_mb=memory_budget_mb)
    index.stats["model"] = {"name": index_dir.name, "spec": encoder.info.get("spec", str(spec)),
                            "role": encoder.info.get("role", ""), "fingerprint": encoder.fingerprint(),
                            **{key: encoder.info[key] for key in ("kd_loss", "teacher") if encoder.info.get(key)}}
    index.stats["eval"] = evaluate_index(index, emb, k=k, by=by)
    index.save(index_dir)
    return index


def compare_models(specs: Mapping[str, str], gallery: Gallery, out_dir: str | os.PathLike, *,
                   cache_dir: str | os.PathLike | None = None, kind: str = "auto",
                   memory_budget_mb: float | None = None, k: int = 10,
                   by: Sequence[str] = ("label", "product_id"), batch_size: int = 64, num_workers: int = 0,
                   device: str | None = None) -> list[dict]:
    """Index and evaluate several models on the same gallery and queries.

    Each model's index is saved to ``out_dir/<name>/`` (so notebook 04 and the
    widget can load it); the table goes to ``out_dir/comparison.csv`` and
    ``comparison.json``.

    Args:
        specs: Display name → spec (see :func:`load_encoder`), in table order, e.g.
            ``{"pretrained": "ViT-B-16", "fine-tuned": "out/runs/base-finetune/checkpoints/epoch_latest.pt",
            "distilled": "...", "teacher": "teacher:damo/multi-modal_clip-vit-huge-patch14_zh"}``.
        gallery: The common gallery (every image also a query, itself excluded).
        out_dir: Folder for the indexes and the table.
        cache_dir: Embedding caches go to ``cache_dir/<name>`` (default ``out_dir/_embeddings/<name>``).
        kind, memory_budget_mb, k, by, batch_size, num_workers, device: As in :func:`index_model`.

    Returns:
        One row per model (:func:`metrics_row`): ``model``, ``role``, ``spec``, ``dim``, ``n``,
        ``index``, ``recall@10``, ``p@10``, ``map@10``, ``r@1``, ``r@5``, ``r@10``, ``n_queries``,
        and ``product/…`` when product ids allow.
    """
    out_dir = Path(out_dir)
    cache_root = Path(cache_dir) if cache_dir else out_dir / "_embeddings"
    rows = []
    for name, spec in specs.items():
        logger.info("comparing: %s (%s)", name, spec)
        index = index_model(spec, gallery, out_dir / name, cache_dir=cache_root / name, kind=kind,
                            memory_budget_mb=memory_budget_mb, k=k, by=by, batch_size=batch_size,
                            num_workers=num_workers, device=device)
        rows.append(metrics_row(name, index))
        del index
        gc.collect()  # one model at a time in memory
    write_comparison(rows, out_dir, extra={"gallery": {"n": len(gallery), "lmdb_dir": gallery.lmdb_dir,
                                                       "fingerprint": gallery.fingerprint()},
                                           "k": k, "specs": dict(specs)})
    return rows


# --------------------------------------------------------------------------- finding models


def _teacher_sources(output_dir: Path) -> set[Path]:
    """Checkpoints that were exported as teacher folders (the demo teacher's own run)."""
    sources = set()
    for stamp in (output_dir / "teachers").glob("*/exported_from.json"):
        try:
            sources.add(Path(json.loads(stamp.read_text(encoding="utf-8"))["checkpoint"]).resolve())
        except (ValueError, KeyError, TypeError):
            continue
    return sources


def _student_checkpoints(output_dir: Path) -> list[Path]:
    exported = _teacher_sources(output_dir)
    found = [p for p in (output_dir / "runs").glob("*/checkpoints/epoch_latest.pt") if p.resolve() not in exported]
    return sorted(found, key=lambda p: p.parent.parent.name)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path:
    """The most recently written student checkpoint under ``output_dir/runs`` (runs exported as teachers skipped).

    Raises:
        FileNotFoundError: None there (the message says to run notebook 02).
    """
    found = _student_checkpoints(Path(output_dir))
    if not found:
        raise FileNotFoundError(f"no student checkpoint under {Path(output_dir) / 'runs'} "
                                "(runs/<name>/checkpoints/epoch_latest.pt); run notebook 02_distill.ipynb "
                                "(or `cnclip-kd train`) first, or pass CHECKPOINT")
    return max(found, key=lambda p: p.stat().st_mtime_ns)


def discover_models(output_dir: str | os.PathLike) -> dict[str, str]:
    """Every model the kit wrote under ``output_dir``: teacher folders, student runs by name, then the teachers
    those students were distilled from (e.g. ``efficientnet-lite2``), each once.

    Returns:
        Name → spec: ``{"demo-finetune": "/…/runs/demo-finetune/checkpoints/epoch_latest.pt", …,
        "efficientnet-lite2": "teacher:efficientnet-lite2"}``.
    """
    output_dir = Path(output_dir)
    specs: dict[str, str] = {}
    for cfg in sorted((output_dir / "teachers").glob("*/configuration.json")):
        specs[cfg.parent.name] = f"teacher:{cfg.parent.resolve()}"
    students = _student_checkpoints(output_dir)
    for ckpt in students:
        name = ckpt.parent.parent.name
        specs[name if name not in specs else f"{name}-student"] = str(ckpt.resolve())
    for ckpt in students:
        teacher = _checkpoint_facts(ckpt).get("teacher")
        if not teacher:
            continue
        path = Path(str(teacher)).expanduser()
        spec = f"teacher:{path.resolve() if path.exists() else teacher}"
        if spec not in specs.values():
            name = spec_name(spec)
            specs[name if name not in specs else f"{name}-teacher"] = spec
    return specs


def spec_name(spec: str | os.PathLike) -> str:
    """A short name for a model spec: the run name of ``runs/<name>/checkpoints/*.pt``, a file's stem,
    a teacher folder's name, or the pretrained name (``teacher:timm:convnext_tiny=/m/w.safetensors`` →
    ``timm-convnext_tiny``, ``teacher:random:preset:tiny`` → ``random-preset-tiny``)."""
    text = str(spec)
    if text.startswith("teacher:"):
        text = text[len("teacher:"):]
    if ":" in text or "=" in text:  # a spelled name, not a path: keep it a plain folder name
        return text.split("=", 1)[0].replace(":", "-").replace("/", "-")
    path = Path(text)
    if path.suffix == ".pt" and path.parent.name == "checkpoints":
        return path.parent.parent.name
    if path.suffix == ".pt":
        return path.stem
    return path.name or text.replace(":", "-")


def saved_indexes(root: str | os.PathLike) -> dict[str, Path]:
    """Index folders under ``root`` (notebook 03's ``OUTPUT_DIR/index``): name → folder.

    In the order of ``root/comparison.json`` when there is one, then by name.
    """
    root = Path(root)
    found = {stats.parent.name: stats.parent for stats in sorted(root.glob("*/stats.json"))}
    order: list[str] = []
    table = root / "comparison.json"
    if table.is_file():
        try:
            order = [r["model"] for r in json.loads(table.read_text(encoding="utf-8")).get("rows", [])]
        except (ValueError, KeyError, TypeError):
            order = []
    names = [n for n in order if n in found] + [n for n in sorted(found) if n not in order]
    return {n: found[n] for n in names}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "-" if value is None else str(value)


def comparison_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """Comparison rows (:func:`compare_models`) as a Markdown table: one line per model, metrics to 3 decimals."""
    keys = list(dict.fromkeys(k for r in rows for k in r if "@" in k and k != "recall@10"))
    head = "| 模型 model | 角色 role | 索引 index | N | " + " | ".join(keys) + " |"
    lines = [head, "|---|---|---|---:|" + "---:|" * len(keys)]
    lines += [f"| {r['model']} | {r.get('role', '')} | {r.get('index', '')} | {r.get('n', '')} | "
              + " | ".join(_fmt(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def index_markdown(index: GalleryIndex) -> str:
    """An index's facts and, when evaluated, its metrics (overall and per category) as Markdown."""
    st = index.stats
    lines = ["| 索引 index | N | D | 大小 size | 构建 build | recall@10 | 单次查询 query | 参数 params |",
             "|---|---:|---:|---:|---:|---:|---:|---|",
             f"| {st.get('kind')} | {st.get('n')} | {st.get('dim')} | {st.get('bytes', 0) / 2 ** 20:.2f} MB | "
             f"{st.get('build_s', 0):.2f} s | {_fmt(st.get('recall@10'))} | {st.get('search_ms', 0):.3f} ms | "
             f"{json.dumps(st.get('params') or {})} |"]
    ev = st.get("eval") or {}
    groups = [("类目 category", ev.get("label")), ("商品 product id", ev.get("product_id"))]
    groups += [(f"· {label}", m) for label, m in (ev.get("per_label") or {}).items()]
    groups = [(g, m) for g, m in groups if m]
    if groups:
        keys = [k for k in groups[0][1] if k != "n_queries"]
        lines += ["", "| 相关性 relevant = same … | 查询数 queries | " + " | ".join(keys) + " |",
                  "|---|---:|" + "---:|" * len(keys)]
        lines += [f"| {g} | {m.get('n_queries')} | " + " | ".join(_fmt(m.get(k)) for k in keys) + " |"
                  for g, m in groups]
    return "\n".join(lines)
