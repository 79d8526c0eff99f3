"""Where a built index's gallery is searched from: the FAISS folder, or also a PostgreSQL + pgvector table.

:func:`index_with_backend` is what ``cnclip-kd index --backend`` and notebook 03 call: it runs
:func:`~cnclip_kd.retrieval.evaluate.index_model` (which embeds the gallery, builds, evaluates and
saves the FAISS folder) and, with ``backend="pgvector"``, writes the same embeddings and metadata
into a pgvector table named after the index (:func:`pgvector_table_name`), evaluates image → image
retrieval **through that table** (its HNSW index) and records the result in the folder's
``stats.json``: ``stats["eval"]`` is then the pgvector evaluation, ``stats["faiss_eval"]`` the FAISS
one and ``stats["backend"]`` says where the table is. The server is the embedded one under a folder
(default :func:`default_db_folder`), started for the call and stopped after it, or any server given
by a ``postgresql://`` URL.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..core.files import atomic_write_text
from .evaluate import evaluate_index, index_model
from .gallery import Gallery
from .index import GalleryIndex
from .pgserver import EmbeddedPostgres, is_postgres_url
from .pgvector import PgVectorGallery

logger = logging.getLogger(__name__)

__all__ = ["BACKENDS", "default_db_folder", "describe_db", "index_with_backend", "pgvector_table_name",
           "publish_pgvector"]

#: Where ``cnclip-kd index --backend`` puts the gallery.
BACKENDS = ("faiss", "pgvector")


def pgvector_table_name(name: str) -> str:
    """A pgvector gallery name for an index or model name: lowercase, ``[a-z0-9_]``, starting with a letter, ≤ 40.

    ``"tiny-kd-cosine"`` → ``"tiny_kd_cosine"``; ``"2024 Shop"`` → ``"g_2024_shop"``.
    """
    out = re.sub(r"[^a-z0-9_]+", "_", str(name).lower()).strip("_") or "gallery"
    if not out[0].isalpha():
        out = "g_" + out
    return out[:40].rstrip("_")


def default_db_folder(index_dir: str | os.PathLike) -> Path:
    """The embedded server's folder when none is given: ``pg`` in the output folder.

    For the kit's layout ``<out>/index/<name>`` that is ``<out>/pg`` (where notebook 03 and
    ``cnclip-kd serve --backend pgvector`` look); for an index folder elsewhere, ``pg`` beside it.
    """
    parent = Path(index_dir).resolve().parent
    return (parent.parent if parent.name == "index" else parent) / "pg"


def describe_db(db: str | os.PathLike) -> str:
    """How ``stats["backend"]["db"]`` records a server: the folder (absolute), or the URL without its password."""
    if is_postgres_url(db):
        return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", str(db))
    return str(Path(db).resolve())


class _RowsOf:
    """A pgvector gallery searched the way :func:`evaluate_index` reads an index: answers gallery **rows**."""

    def __init__(self, live: PgVectorGallery, gallery: Gallery, embeddings: np.ndarray, ef_search: int | None):
        self.live, self.gallery, self.embeddings, self.ef_search = live, gallery, embeddings, ef_search
        self._row_of = {int(i): r for r, i in enumerate(gallery.ids)}

    def search(self, queries: np.ndarray, k: int = 10, *, exclude_ids: Sequence[int] | None = None):
        scores, ids = self.live.search(queries, k, exclude_ids=exclude_ids, ef_search=self.ef_search)
        rows = np.array([[self._row_of.get(int(i), -1) for i in row] for row in ids], dtype=np.int64).reshape(ids.shape)
        return scores, rows


def publish_pgvector(index: GalleryIndex, url: str, name: str, *, k: int = 10,
                     by: Sequence[str] = ("label", "product_id"), ef_search: int | None = None) -> dict:
    """Write an index's gallery and embeddings into a pgvector table (replacing one of that name) and evaluate it.

    Args:
        index: A built index with its embeddings and ``stats["model"]["fingerprint"]``.
        url: The server (``postgresql://…``).
        name: The gallery's name (:func:`pgvector_table_name`).
        k: Evaluation depth. by: Evaluation fields (as :func:`evaluate_index`).
        ef_search: HNSW candidate list for the evaluation (default: the gallery's).

    Returns:
        ``{"kind": "pgvector", "name", "n", "dim", "build_s", "ef_search", "eval"}``.

    Raises:
        ValueError: The index has no embeddings or no fingerprint.
    """
    fingerprint = (index.stats.get("model") or {}).get("fingerprint")
    if index.embeddings is None or not fingerprint:
        raise ValueError("publishing to pgvector needs the index's embeddings and its encoder's fingerprint "
                         "(an index built by index_model)")
    emb = np.asarray(index.embeddings, dtype=np.float32)
    try:
        with PgVectorGallery.open(url, name) as old:
            old.drop()
            logger.info("pgvector gallery %s replaced", name)
    except LookupError:
        pass
    with PgVectorGallery.create(url, name, index.dim, fingerprint=fingerprint, model=index.stats.get("model"),
                                index=False) as live:
        live.add_gallery(emb, index.gallery, fingerprint=fingerprint)
        build_s = live.build_index()
        evaluation = evaluate_index(_RowsOf(live, index.gallery, emb, ef_search), emb, k=k, by=by)
        ef = int(ef_search or live.params["ef_search"])
        n = live.count()
    label = evaluation.get("label") or {}
    logger.info("pgvector gallery %s: %d items, image → image P@%d %s", name, n, k, label.get(f"p@{k}"))
    return {"kind": "pgvector", "name": name, "n": n, "dim": index.dim, "build_s": round(build_s, 3),
            "ef_search": ef, "eval": evaluation}


def index_with_backend(spec: str | os.PathLike, gallery: Gallery, index_dir: str | os.PathLike, *,
                       backend: str = "faiss", db: str | os.PathLike | None = None, name: str | None = None,
                       ef_search: int | None = None, **kwargs: Any) -> GalleryIndex | None:
    """:func:`index_model`, then (``backend="pgvector"``) the gallery into pgvector, evaluated there.

    Args:
        spec: The model (:func:`cnclip_kd.retrieval.encoders.load_encoder`).
        gallery: The images.
        index_dir: The FAISS index folder, written in either case (it records where the table is).
        backend: ``"faiss"`` or ``"pgvector"``.
        db: A ``postgresql://`` URL, or a folder for the embedded server (default
            :func:`default_db_folder`: ``<out>/pg`` for ``<out>/index/<name>``), started here and stopped after.
        name: The pgvector gallery's name (default: :func:`pgvector_table_name` of the folder's name).
        ef_search: HNSW candidate list of the pgvector evaluation.
        **kwargs: As :func:`index_model` (``k`` and ``by`` are also the pgvector evaluation's).

    Returns:
        The index (its ``stats`` as saved); ``None`` on ranks other than 0 of a sharded run.

    Raises:
        ValueError: An unknown backend.
        cnclip_kd.retrieval.pgserver.EmbeddedPostgresError: The server cannot start or be reached.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: choose one of {', '.join(BACKENDS)}")
    index_dir = Path(index_dir)
    index = index_model(spec, gallery, index_dir, **kwargs)
    if backend == "faiss" or index is None:
        return index
    name = name or pgvector_table_name(index_dir.name)
    db = db or default_db_folder(index_dir)
    server = EmbeddedPostgres(db)
    url = server.start()
    try:
        record = publish_pgvector(index, url, name, k=kwargs.get("k", 10),
                                  by=kwargs.get("by", ("label", "product_id")), ef_search=ef_search)
    finally:
        server.stop()
    index.stats["faiss_eval"] = index.stats.get("eval")
    index.stats["eval"] = record.pop("eval")
    index.stats["backend"] = {**record, "db": describe_db(db)}
    atomic_write_text(index_dir / "stats.json", json.dumps(index.stats, ensure_ascii=False, indent=1, default=str))
    return index
