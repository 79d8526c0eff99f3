"""Evaluation and model comparison: image→image and text↔image retrieval metrics of saved indexes.

* :func:`evaluate_index` gives leave-one-out image→image P@10, mAP@10 and
  R@1/5/10 by category and by product id.
* :func:`evaluate_text` gives text→image and image→text R@1/5/10 (and their
  mean) the way cn_clip's MUGE evaluation computes them, plus category-level
  text→image P@10.
* :func:`index_model` embeds, indexes, evaluates and saves one model;
  :func:`compare_models` runs the same gallery and queries through several
  models and writes the table; :func:`discover_models` finds the models the
  kit wrote.
"""

from __future__ import annotations

import csv
import gc
import hashlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..core.files import atomic_write_text, load_stamped, save_stamped
from ..core.metrics import grouped_ranking_metrics, label_hits, neighbour_hits, ranking_metrics, recall_metrics
from ..core.tokenizer import NoTextTowerError
from .encoders import ImageEncoder, TextEncoder, load_encoder, text_encoder_for
from .gallery import Gallery, embed_gallery, gallery_texts
from .index import GalleryIndex, exact_topk

logger = logging.getLogger(__name__)

__all__ = [
    "chance_p_at_k", "compare_models", "embed_texts", "evaluate_index", "evaluate_text", "index_model", "margin_share",
    "metrics_row", "text_columns", "write_comparison", "write_muge_predictions",
]

#: Comparison columns of the text ↔ image evaluation (:func:`metrics_row`), in table order.
TEXT_COLUMNS = ("t2i/r@1", "t2i/r@5", "t2i/r@10", "t2i/mean", "i2t/r@1", "i2t/r@5", "i2t/r@10", "i2t/mean",
                "t2i/cat-p@10")


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


def chance_p_at_k(labels: Sequence[str], k: int = 10) -> float:
    """Expected leave-one-out image→image P@k of a random ranking: the floor the category metric starts from.

    Each query's neighbours are the other ``N − 1`` items in random order; every one of its top ``k`` is
    of the query's label with probability ``(n_same − 1) / (N − 1)``, so the expected P@k is the mean over
    queries of that share, whatever ``k`` is (``k`` is kept for clarity; it assumes ``N − 1 ≥ k``, as the
    metric does). The queries are the ones :func:`evaluate_index` keeps: a known label (not ``""``/``None``)
    that another item shares; every item, unknown labels too, is in the gallery (``N``). E.g. labels
    ``a, a, b, b, b``: (2 × 1/4 + 3 × 2/4) / 5 = 0.4.

    Args:
        labels: The label of each item of the split (e.g. ``read_labels(data_dir, "test")``'s ``"label"``).
        k: Depth of the P@k it is the chance level of (does not change the expectation).

    Returns:
        The expected P@k, in [0, 1].

    Raises:
        ValueError: Fewer than two items, ``k < 1``, or no query with a label that another item shares.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    names = ["" if x is None else str(x) for x in labels]
    n = len(names)
    if n < 2:
        raise ValueError(f"chance P@{k} needs at least two items, got {n}")
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    shares = [(counts[name] - 1) / (n - 1) for name in names if name and counts[name] > 1]
    if not shares:
        raise ValueError(f"chance P@{k}: no item shares its label with another; there is no query to score")
    return float(sum(shares) / len(shares))


def margin_share(p_at_10: float, teacher: float, chance: float) -> float:
    """The share of the teacher's margin over chance that a student closes.

    Args:
        p_at_10: The student's P@10.
        teacher: The teacher's P@10 on the same split.
        chance: The P@10 of a random ranking of that split (:func:`chance_p_at_k`).

    Returns:
        ``(p_at_10 − chance) / (teacher − chance)``: 0 at chance, 1 at the teacher; NaN when the teacher is
        no better than chance (there is no margin to share).
    """
    margin = teacher - chance
    return (p_at_10 - chance) / margin if margin > 0 else float("nan")


def embed_texts(encoder: TextEncoder, texts: Sequence[str], out_dir: str | os.PathLike | None = None, *,
                batch_size: int = 256) -> np.ndarray:
    """Encode texts with a model's text tower, cached like gallery embeddings.

    With ``out_dir`` the matrix is saved (atomically) as ``out_dir/text_embeddings.npy`` with a
    stamp naming the encoder's fingerprint and a hash of the texts; a later call with the same
    encoder and texts loads it instead of encoding again.

    Returns:
        ``[len(texts), D]`` float32, L2-normalised rows.
    """
    key = hashlib.sha256(("\x1f".join([encoder.fingerprint(), *texts])).encode()).hexdigest()[:16]
    final = Path(out_dir) / "text_embeddings.npy" if out_dir is not None else None
    if final is not None:
        emb = load_stamped(final, key, (len(texts), encoder.dim))
        if emb is not None:
            logger.info("text embeddings of %s: reusing %s", encoder.name, final)
            return emb
    emb = encoder.encode(list(texts), batch_size=batch_size).astype(np.float32, copy=False)
    if final is not None:
        save_stamped(final, emb, key, n=len(texts), dim=encoder.dim, encoder=encoder.name,
                     fingerprint=encoder.fingerprint())
    return emb


def _muge_lines(rows: Sequence[Mapping[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_muge_predictions(out_dir: str | os.PathLike, evaluation: Mapping[str, Any]) -> dict[str, Path]:
    """Write a text evaluation's ground truth and Top-10 predictions in cn_clip's file formats.

    Files (each atomically): ``texts.jsonl`` (``{"text_id", "text", "image_ids"}``, the ground truth
    cn_clip's ``eval/evaluation.py`` reads), ``t2i_predictions.jsonl`` (``{"text_id", "image_ids"}``,
    what its ``make_topk_predictions.py`` writes), ``texts.tr.jsonl`` (``{"image_id", "text_ids"}``, its
    ``transform_ir_annotation_to_tr.py`` form) and ``i2t_predictions.jsonl`` (``{"image_id", "text_ids"}``,
    for ``eval/evaluation_tr.py``). cn_clip's scripts then give the numbers of :func:`evaluate_text` × 100.

    Args:
        out_dir: The folder.
        evaluation: :func:`evaluate_text`'s result (its ``"files"`` entry).

    Returns:
        File name → path.
    """
    out_dir = Path(out_dir)
    paths = {}
    for name, text in (evaluation.get("files") or {}).items():
        paths[name] = out_dir / name
        atomic_write_text(paths[name], text)
    return paths


def evaluate_text(index: GalleryIndex, encoder: TextEncoder, texts: Sequence[Mapping[str, Any]] | None = None, *,
                  k: int = 10, image_embeddings: np.ndarray | None = None,
                  cache_dir: str | os.PathLike | None = None) -> dict:
    """Text → image and image → text retrieval over a gallery, as cn_clip's MUGE evaluation computes it.

    Every text queries the index; its relevant images are the ones paired with it
    (``image_ids`` of ``*_texts.jsonl``). Every gallery image queries all the texts; its
    relevant texts are the ones paired with it. Recall@1/5/10 is the share of queries
    with a relevant result in the top k, and their mean is cn_clip's "mean recall"
    (:func:`cnclip_kd.core.metrics.recall_metrics`; cn_clip prints them × 100).

    Where many images share a title (product titles made from a category name, as in the
    sample data), the exact-pair recall is mostly a coin toss between look-alikes, so
    **category-level** text → image P@10 is reported too: a retrieved image is relevant
    when its category is the category of the text's image.

    Args:
        index: The index of the gallery (its embeddings come from the same model as ``encoder``).
        encoder: The model's text tower (:func:`cnclip_kd.retrieval.encoders.text_encoder_for`).
        texts: ``{"text_id", "text", "image_ids"}`` rows; default :func:`cnclip_kd.retrieval.gallery.gallery_texts`.
        k: Results per query (10 gives R@1/5/10 and P@10).
        image_embeddings: Gallery embeddings for image → text (default ``index.embeddings``).
        cache_dir: Where the text embeddings are cached (:func:`embed_texts`).

    Returns:
        ``{"k", "n_texts", "n_images", "context_length", "truncated", "t2i": {r@1, r@5, r@10, mean_recall,
        n_queries}, "i2t": {…}, "t2i_category": {p@10, map@10, r@1, r@5, r@10, n_queries} or None,
        "files": {name: text}}`` — ``files`` holds the ground truth and predictions in cn_clip's
        formats (:func:`write_muge_predictions`); empty when the gallery or the texts are fewer than
        ``k`` (cn_clip's checker wants exactly ``k`` distinct predictions per query).

    Raises:
        ValueError: No texts, or no embeddings for image → text.
    """
    gallery = index.gallery
    texts = list(gallery_texts(gallery) if texts is None else texts)
    if not texts:
        raise ValueError("no texts are paired with this gallery's images: nothing to evaluate text retrieval on")
    emb = index.embeddings if image_embeddings is None else image_embeddings
    if emb is None:
        raise ValueError("evaluate_text needs the gallery embeddings (the index was saved without them)")
    emb = np.asarray(emb, dtype=np.float32)
    text_emb = embed_texts(encoder, [t["text"] for t in texts], cache_dir)
    ids = gallery.ids
    # text → image through the index (what a user's query does)
    _, rows = index.search(text_emb, k)
    t2i_ranked = [[int(ids[r]) for r in row if r >= 0] for row in rows]
    t2i_relevant = [{int(i) for i in t["image_ids"]} for t in texts]
    out: dict = {"k": int(k), "n_texts": len(texts), "n_images": len(gallery), "context_length": encoder.context_length,
                 "truncated": int(sum(encoder.truncated(t["text"]) for t in texts)),
                 "t2i": recall_metrics(t2i_ranked, t2i_relevant)}
    # image → text: every gallery image against every text (exact; texts are few)
    text_ids = np.array([int(t["text_id"]) for t in texts], dtype=np.int64)
    i2t_rows = exact_topk(text_emb, emb, k)
    i2t_ranked = [[int(text_ids[r]) for r in row] for row in i2t_rows]
    texts_of: dict[int, set] = {}
    for t in texts:
        for i in t["image_ids"]:
            texts_of.setdefault(int(i), set()).add(int(t["text_id"]))
    out["i2t"] = recall_metrics(i2t_ranked, [texts_of.get(int(i), set()) for i in ids])
    # category level: a hit is an image of the text's image's category
    labels = gallery.column("label")
    label_of = {int(i): str(lab) for i, lab in zip(ids, labels)}
    text_labels = [label_of.get(int(t["image_ids"][0]), "") for t in texts]
    hits, n_relevant = label_hits(text_labels, labels, rows)
    out["t2i_category"] = (ranking_metrics(hits, n_relevant, ks=[x for x in (1, 5, 10) if x <= k])
                           if any(text_labels) else None)
    files: dict[str, str] = {}
    if len(gallery) >= k and len(texts) >= k:
        files["texts.jsonl"] = _muge_lines([{"text_id": int(t["text_id"]), "text": t["text"],
                                             "image_ids": [int(i) for i in t["image_ids"]]} for t in texts])
        files["t2i_predictions.jsonl"] = _muge_lines([{"text_id": int(t["text_id"]), "image_ids": r}
                                                      for t, r in zip(texts, t2i_ranked)])
        files["texts.tr.jsonl"] = _muge_lines([{"image_id": i, "text_ids": sorted(v)} for i, v in texts_of.items()])
        files["i2t_predictions.jsonl"] = _muge_lines([{"image_id": int(i), "text_ids": r}
                                                      for i, r in zip(ids, i2t_ranked) if int(i) in texts_of])
    out["files"] = files
    logger.info("text retrieval of %s: t2i R@1/5/10 %.3f/%.3f/%.3f, i2t %.3f/%.3f/%.3f over %d texts, %d images",
                encoder.name, out["t2i"]["r@1"], out["t2i"]["r@5"], out["t2i"]["r@10"], out["i2t"]["r@1"],
                out["i2t"]["r@5"], out["i2t"]["r@10"], len(texts), len(gallery))
    return out


def text_columns(text_eval: Mapping[str, Any] | None) -> dict:
    """The :data:`TEXT_COLUMNS` of a :func:`evaluate_text` result (``None`` each when the model has no text tower)."""
    te = text_eval or {}
    cols = {}
    for side in ("t2i", "i2t"):
        m = te.get(side) or {}
        cols.update({f"{side}/r@{k}": m.get(f"r@{k}") for k in (1, 5, 10)})
        cols[f"{side}/mean"] = m.get("mean_recall")
    cols["t2i/cat-p@10"] = (te.get("t2i_category") or {}).get(f"p@{te.get('k', 10)}")
    return cols


def metrics_row(name: str, index: GalleryIndex, evaluation: Mapping[str, Any] | None = None) -> dict:
    """One comparison-table row: model, role, index facts, category metrics, product-id metrics (``product/…``),
    and the text ↔ image metrics recorded when the index was built (:data:`TEXT_COLUMNS`; ``None`` for a model
    without a text tower)."""
    ev = dict(evaluation if evaluation is not None else index.stats.get("eval") or {})
    model = index.stats.get("model") or {}
    row = {"model": name, "role": model.get("role", ""), "spec": model.get("spec", ""),
           "dim": index.dim, "n": len(index), "index": index.stats.get("kind"),
           "recall@10": index.stats.get("recall@10")}
    for key, prefix in (("label", ""), ("product_id", "product/")):
        for metric, value in (ev.get(key) or {}).items():
            row[f"{prefix}{metric}"] = value
    row.update(text_columns(index.stats.get("text_eval")))
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
                batch_size: int = 64, num_workers: int | None = None, device: str | None = None,
                encoder: ImageEncoder | None = None, text: bool = True, dist: Any = None, decode: str = "auto",
                chunk_size: int = 2048) -> GalleryIndex | None:
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
        num_workers: DataLoader workers (``None``: :func:`cnclip_kd.retrieval.gallery.default_num_workers`).
        device: Where the model runs.
        encoder: An already loaded encoder for ``spec`` (skips loading).
        text: Also evaluate text → image and image → text retrieval (:func:`evaluate_text`) when the
            model has a text tower, into ``stats["text_eval"]``, and save the texts and Top-10
            predictions in cn_clip's formats in the index folder (:func:`write_muge_predictions`).
        dist: A :class:`cnclip_kd.core.distributed.Dist` to shard the embedding over ``torchrun`` ranks
            (:func:`embed_gallery`); rank 0 alone builds, evaluates and saves the index.
        decode: Where images are decoded (:func:`cnclip_kd.retrieval.gallery.choose_decode`).
        chunk_size: Images per saved embedding chunk.

    Returns:
        The saved index; ``None`` on ranks other than 0 of a sharded run.
    """
    index_dir = Path(index_dir)
    encoder = encoder or load_encoder(spec, device=device)
    cache = Path(cache_dir) if cache_dir else index_dir.parent / "_embeddings" / index_dir.name
    emb = embed_gallery(encoder, gallery, cache, batch_size=batch_size, num_workers=num_workers,
                        chunk_size=chunk_size, decode=decode, dist=dist)
    if emb is None:  # another rank's process: rank 0 builds the index from every rank's chunks
        return None
    index = GalleryIndex.build(emb, gallery, kind=kind, memory_budget_mb=memory_budget_mb)
    index.stats["model"] = {"name": index_dir.name, "spec": encoder.info.get("spec", str(spec)),
                            "role": encoder.info.get("role", ""), "fingerprint": encoder.fingerprint(),
                            **{key: encoder.info[key] for key in ("kd_loss", "teacher") if encoder.info.get(key)}}
    index.stats["eval"] = evaluate_index(index, emb, k=k, by=by)
    files: dict[str, str] = {}
    if text:
        files = _text_evaluation(index, encoder, k=k, cache_dir=cache)
    index.save(index_dir, extra_files=files)
    return index


def _text_evaluation(index: GalleryIndex, encoder: ImageEncoder, *, k: int, cache_dir: Path) -> dict[str, str]:
    """Evaluate text ↔ image retrieval into ``index.stats`` (``text_eval``, the text tower's fingerprint);
    returns the cn_clip-format files to save with the index. A model without a text tower, or a gallery
    without texts, is logged and skipped."""
    try:
        text_encoder = text_encoder_for(encoder)
    except NoTextTowerError as err:
        logger.info("text retrieval not evaluated: %s", err)
        index.stats["model"]["text_tower"] = False
        return {}
    index.stats["model"].update(text_tower=True, text_fingerprint=text_encoder.fingerprint(),
                                context_length=text_encoder.context_length)
    try:
        text_eval = evaluate_text(index, text_encoder, k=k, cache_dir=cache_dir)
    except ValueError as err:
        logger.warning("text retrieval not evaluated for %s: %s", encoder.name, err)
        return {}
    files = text_eval.pop("files")
    index.stats["text_eval"] = text_eval
    return files


def compare_models(specs: Mapping[str, str], gallery: Gallery, out_dir: str | os.PathLike, *,
                   cache_dir: str | os.PathLike | None = None, kind: str = "auto",
                   memory_budget_mb: float | None = None, k: int = 10,
                   by: Sequence[str] = ("label", "product_id"), batch_size: int = 64, num_workers: int = 0,
                   device: str | None = None, text: bool = True) -> list[dict]:
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
        kind, memory_budget_mb, k, by, batch_size, num_workers, device, text: As in :func:`index_model`.

    Returns:
        One row per model (:func:`metrics_row`): ``model``, ``role``, ``spec``, ``dim``, ``n``,
        ``index``, ``recall@10``, ``p@10``, ``map@10``, ``r@1``, ``r@5``, ``r@10``, ``n_queries``,
        ``product/…`` when product ids allow, and the text ↔ image columns (:data:`TEXT_COLUMNS`).
    """
    out_dir = Path(out_dir)
    cache_root = Path(cache_dir) if cache_dir else out_dir / "_embeddings"
    rows = []
    for name, spec in specs.items():
        logger.info("comparing: %s (%s)", name, spec)
        index = index_model(spec, gallery, out_dir / name, cache_dir=cache_root / name, kind=kind,
                            memory_budget_mb=memory_budget_mb, k=k, by=by, batch_size=batch_size,
                            num_workers=num_workers, device=device, text=text)
        rows.append(metrics_row(name, index))
        del index
        gc.collect()  # one model at a time in memory
    write_comparison(rows, out_dir, extra={"gallery": {"n": len(gallery), "lmdb_dir": gallery.lmdb_dir,
                                                       "fingerprint": gallery.fingerprint()},
                                           "k": k, "specs": dict(specs)})
    return rows
