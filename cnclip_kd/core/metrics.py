"""Image→image retrieval metrics: Precision@k, mAP@k, Recall@k, with the query itself excluded.

Used by validation during training and by the retrieval evaluation. A gallery
item is relevant to a query when it has the same label (category, or product id).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def top_k(query: torch.Tensor, gallery: torch.Tensor, k: int, *, exclude_self: bool = False,
          chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine nearest neighbours by brute force, in chunks of queries.

    Args:
        query: ``[Q, D]`` features (normalised inside).
        gallery: ``[G, D]`` features (normalised inside).
        k: Neighbours per query (capped at the gallery size).
        exclude_self: Query ``i`` is gallery item ``i`` and must not match itself.
        chunk: Queries per matrix product, to bound memory.

    Returns:
        ``(scores, indices)``, each ``[Q, k]``, best first.
    """
    q = torch.nn.functional.normalize(query.float(), dim=-1)
    g = torch.nn.functional.normalize(gallery.float(), dim=-1)
    k = min(k, g.shape[0] - (1 if exclude_self else 0))
    scores, indices = [], []
    for start in range(0, q.shape[0], chunk):
        sim = q[start:start + chunk] @ g.T
        if exclude_self:
            rows = torch.arange(sim.shape[0], device=sim.device)
            sim[rows, rows + start] = float("-inf")
        s, i = sim.topk(k, dim=1)
        scores.append(s)
        indices.append(i)
    return torch.cat(scores), torch.cat(indices)


def ranking_metrics(relevant: np.ndarray, n_relevant: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Metrics from a ``[Q, K]`` boolean hit matrix (rank order) and each query's number of relevant items.

    Queries with no relevant item in the gallery are left out (they cannot be
    answered right); ``n_queries`` counts the ones kept.

    Returns:
        ``{"p@K": …, "map@K": …, "r@k": … for k in ks, "n_queries": …}`` where
        K = the hit matrix width; ``p@K`` = mean fraction of the top K that is
        relevant; ``map@K`` = mean of AP@K = Σ_i P@i·rel_i / min(R, K);
        ``r@k`` = fraction of queries with at least one relevant item in the top k.
    """
    relevant = np.asarray(relevant, dtype=bool)
    n_relevant = np.asarray(n_relevant)
    keep = n_relevant > 0
    rel, nrel = relevant[keep], n_relevant[keep]
    big_k = relevant.shape[1]
    out: dict = {"n_queries": int(keep.sum())}
    if not len(rel):
        out.update({f"p@{big_k}": 0.0, f"map@{big_k}": 0.0, **{f"r@{k}": 0.0 for k in ks}})
        return out
    cum = np.cumsum(rel, axis=1)
    precision_at_i = cum / np.arange(1, big_k + 1)
    ap = (precision_at_i * rel).sum(axis=1) / np.minimum(nrel, big_k)
    out[f"p@{big_k}"] = float(rel.mean())
    out[f"map@{big_k}"] = float(ap.mean())
    for k in ks:
        out[f"r@{k}"] = float(rel[:, :k].any(axis=1).mean())
    return out


def image_to_image_metrics(features: torch.Tensor, labels: Sequence, *, k: int = 10,
                           ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Leave-one-out image→image retrieval within one set.

    Every image queries all the others (itself excluded); a hit is a neighbour
    with the same label.

    Args:
        features: ``[N, D]`` image features.
        labels: ``N`` labels (category names or product ids).
        k: Depth of P@k and mAP@k.
        ks: Depths of Recall@k.

    Returns:
        See :func:`ranking_metrics`, e.g. ``{"p@10": 0.61, "map@10": …, "r@1": …}``.
    """
    labels = np.asarray(labels)
    if len(labels) != features.shape[0]:
        raise ValueError(f"{features.shape[0]} features but {len(labels)} labels")
    depth = max(k, *ks)
    _, idx = top_k(features, features, depth, exclude_self=True)
    idx = idx.cpu().numpy()
    hits = labels[idx] == labels[:, None]
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    n_relevant = counts[inverse] - 1
    out = ranking_metrics(hits[:, :k], n_relevant, ks=[x for x in ks if x <= k])
    for x in ks:
        if x > k:
            out[f"r@{x}"] = float(hits[n_relevant > 0, :x].any(axis=1).mean()) if (n_relevant > 0).any() else 0.0
    return out


def neighbour_hits(labels: Sequence, neighbours: np.ndarray,
                   query_rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Hit matrix and relevant counts for leave-one-out retrieval in a labelled gallery.

    Args:
        labels: ``N`` gallery labels (category or product id); ``""``/``None`` = unknown.
        neighbours: ``[Q, K]`` gallery row indices per query, best first, the query
            itself already left out; ``-1`` = no result.
        query_rows: Gallery row of each query (default ``0 … Q-1``).

    Returns:
        ``(hits, n_relevant)``: ``[Q, K]`` booleans (the neighbour has the query's
        label) and ``[Q]`` counts of other gallery items with the query's label —
        0 for a query of unknown label, so :func:`ranking_metrics` leaves it out.
    """
    labels = np.array(["" if x is None else str(x) for x in labels], dtype=object)
    neighbours = np.asarray(neighbours, dtype=np.int64)
    rows = np.arange(len(neighbours)) if query_rows is None else np.asarray(query_rows, dtype=np.int64)
    query_labels = labels[rows]
    found = np.where(neighbours >= 0, labels[np.clip(neighbours, 0, None)], None)
    known = query_labels != ""
    hits = (found == query_labels[:, None]) & (neighbours >= 0) & known[:, None]
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    n_relevant = np.where(known, counts[inverse][rows] - 1, 0)
    return hits.astype(bool), n_relevant.astype(np.int64)


def label_hits(query_labels: Sequence, gallery_labels: Sequence,
               neighbours: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hit matrix and relevant counts for queries from another set (e.g. texts searching images).

    Args:
        query_labels: ``Q`` labels of the queries (``""``/``None`` = unknown).
        gallery_labels: ``N`` gallery labels.
        neighbours: ``[Q, K]`` gallery row indices per query, best first; ``-1`` = no result.

    Returns:
        ``(hits, n_relevant)`` for :func:`ranking_metrics`: ``[Q, K]`` booleans (the neighbour has the
        query's label) and ``[Q]`` counts of gallery items with that label (0 for an unknown label).
    """
    gallery = np.array(["" if x is None else str(x) for x in gallery_labels], dtype=object)
    queries = np.array(["" if x is None else str(x) for x in query_labels], dtype=object)
    neighbours = np.asarray(neighbours, dtype=np.int64)
    found = np.where(neighbours >= 0, gallery[np.clip(neighbours, 0, None)], None)
    known = queries != ""
    hits = (found == queries[:, None]) & (neighbours >= 0) & known[:, None]
    names, counts = np.unique(gallery, return_counts=True)
    count_of = dict(zip(names.tolist(), counts.tolist()))
    n_relevant = np.array([count_of.get(q, 0) if q else 0 for q in queries], dtype=np.int64)
    return hits.astype(bool), n_relevant


def grouped_ranking_metrics(relevant: np.ndarray, n_relevant: np.ndarray, groups: Sequence,
                            ks: Sequence[int] = (1, 5, 10)) -> dict:
    """:func:`ranking_metrics` separately for each group of queries (e.g. per category).

    Args:
        relevant: ``[Q, K]`` hit matrix.
        n_relevant: ``[Q]`` relevant counts.
        groups: ``Q`` group names; queries of group ``""`` are skipped.

    Returns:
        ``{group: metrics}`` in sorted group order.
    """
    groups = np.array(["" if g is None else str(g) for g in groups], dtype=object)
    relevant, n_relevant = np.asarray(relevant, dtype=bool), np.asarray(n_relevant)
    return {str(g): ranking_metrics(relevant[groups == g], n_relevant[groups == g], ks=ks)
            for g in sorted(set(groups.tolist())) if g != ""}


def neighbour_agreement(features: torch.Tensor, reference: torch.Tensor, *, k: int = 10) -> float:
    """How much of another model's notion of similarity a model shares: mean overlap of the two top-k lists.

    Every image queries the others (itself excluded) once with ``features`` and once with
    ``reference`` (e.g. the teacher's features of the same images, same order); the score is the
    mean of ``|top-k(features) ∩ top-k(reference)| / k``. 1.0 means the same neighbours, and picking
    at random gives about ``k / (N - 1)``. Needs no labels.
    """
    if features.shape[0] != reference.shape[0]:
        raise ValueError(f"{features.shape[0]} features but {reference.shape[0]} reference rows")
    k = min(k, features.shape[0] - 1)
    _, a = top_k(features, features, k, exclude_self=True)
    _, b = top_k(reference, reference, k, exclude_self=True)
    a, b = a.cpu().numpy(), b.cpu().numpy()
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(a, b)]))


def recall_metrics(ranked: Sequence[Sequence], relevant: Sequence[set], ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Recall@k as cn_clip's MUGE evaluation computes it: the share of queries with a relevant item in their top k.

    Args:
        ranked: One ranked list of item ids per query, best first (``-1`` / ``None`` = no result).
        relevant: The relevant ids of each query (e.g. a text's images in ``*_texts.jsonl``).
        ks: Depths.

    Returns:
        ``{"r@1": …, "r@5": …, "r@10": …, "mean_recall": mean of those, "n_queries": Q}`` as fractions
        (cn_clip prints the same numbers × 100). Queries with no relevant item are left out.
    """
    if len(ranked) != len(relevant):
        raise ValueError(f"{len(ranked)} ranked lists but {len(relevant)} relevant sets")
    keep = [i for i, rel in enumerate(relevant) if rel]
    out: dict = {"n_queries": len(keep)}
    for k in ks:
        out[f"r@{k}"] = (float(np.mean([any(x in relevant[i] for x in list(ranked[i])[:k]) for i in keep]))
                         if keep else 0.0)
    out["mean_recall"] = float(np.mean([out[f"r@{k}"] for k in ks])) if ks else 0.0
    return out
