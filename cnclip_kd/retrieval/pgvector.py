"""A live gallery in PostgreSQL + pgvector: add and remove items while queries run, search with filters.

:class:`PgVectorGallery` answers the calls :class:`~cnclip_kd.retrieval.index.GalleryIndex` answers
(``search``, ``results``, ``dim``, ``len``, ``stats``, ``gallery``), so the serving code can use either,
and adds what a gallery that changes every hour needs: ``add`` (binary COPY, idempotent on id),
``remove``, ``count`` and ``where=`` filters (:mod:`cnclip_kd.retrieval.filters`).

One table per gallery (``gallery_<name>``)::

    id bigint PRIMARY KEY, vector halfvec(d) (or vector(d)), label text, title text, image text,
    attributes jsonb, added_at timestamptz

with an HNSW index (inner product on L2-normalised vectors, or cosine), a B-tree on ``label`` and a
GIN index on ``attributes``. A small table, ``cnclip_galleries``, records each gallery's HNSW
parameters (``m``, ``ef_construction``), default ``ef_search``, dimension, vector type, metric and the
encoder's fingerprint; a write or a query that states another fingerprint is refused.

**Rows are ids.** A live table has no fixed row numbers, so where ``GalleryIndex.search`` answers
gallery rows this answers gallery **ids**, and :attr:`PgVectorGallery.gallery` is a view whose
``ids[rows]`` gives them back unchanged and whose ``meta[id]`` is that item's metadata row
(``id``, ``caption`` (the title), ``label``, ``image``, ``added_at`` and the attributes).

**Filtered search.** An unfiltered query walks the HNSW graph (``ef_search`` candidates). A filter
runs next to the vector order: when a sample of the table says it keeps at least ``exact_below``
of the rows, the index is scanned with pgvector 0.8's iterative scans (``relaxed_order``, results
re-sorted); a narrower filter, a small table, or an index scan that returns fewer than ``k`` rows
takes the exact path: every row the filter keeps, ordered by distance. The exact path reads the whole
table unless an index finds the kept rows: ``label`` and attribute equality have one from the start;
:meth:`PgVectorGallery.index_attribute` adds one for number ranges on an attribute (at 100k, a 1 %
filter: ~30 ms → ~1.3 ms).

**Transactions.** Each ``add`` / ``remove`` is one transaction: once it returns, the next query
(from any connection) sees it; a query that runs meanwhile sees the table before or after, never
half of it and never an error.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
from collections import OrderedDict
from typing import Any, Mapping, Sequence

import numpy as np

from .filters import FILTER_COLUMNS, Condition, canonical, parse_where
from .pgserver import ConnectionPool, HalfvecParam, VectorParam, connect
from .pgsql import (
    FingerprintMismatchError,
    build_hnsw,
    count_rows,
    create_attribute_index,
    create_gallery_tables,
    delete_ids,
    drop_gallery,
    fetch_rows,
    filter_share,
    gallery_table,
    nearest,
    read_gallery_info,
    upsert_rows,
)

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_EF_CONSTRUCTION", "DEFAULT_EF_SEARCH", "DEFAULT_M", "FingerprintMismatchError",
           "LiveGalleryView", "PgVectorGallery"]

#: HNSW defaults: graph degree and build-time candidate list (pgvector's own defaults).
DEFAULT_M, DEFAULT_EF_CONSTRUCTION = 16, 64
#: Query-time candidate list. 100k clustered 512-d vectors, 2 cores: recall@10 ≥ 0.99 at p50 ≈ 1.5 ms
#: (docs/gallery_backends.md); a query may raise it (``ef_search=``), up to pgvector's 1000.
DEFAULT_EF_SEARCH = 64
#: A filter that keeps less than this share of the rows is searched exactly (see the module docstring).
DEFAULT_EXACT_BELOW = 0.25
#: Tables up to this many rows are searched exactly whenever a filter is given (a scan takes a few ms).
DEFAULT_EXACT_ROWS = 20_000
_SAMPLE_ROWS = 2000  # rows a selectivity estimate reads (TABLESAMPLE SYSTEM: whole pages, ~1 ms)
_PLAN_TTL_S = 60.0  # a filter's estimate is reused this long (the gallery changes by the hour)
_META_CACHE = 4096  # metadata rows of recent hits kept for gallery.meta[id]
_NAME = re.compile(r"[a-z][a-z0-9_]{0,39}")


def _unit_rows(x: np.ndarray, dim: int, what: str) -> np.ndarray:
    q = np.atleast_2d(np.asarray(x, dtype=np.float32))
    if q.ndim != 2 or q.shape[1] != dim:
        raise ValueError(f"{what} have shape {tuple(np.shape(x))}; the gallery holds {dim}-d vectors: same model?")
    if not np.isfinite(q).all():
        raise ValueError(f"{what} contain NaN or infinite values")
    return np.ascontiguousarray(q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12))


def _texts(values: Sequence[Any] | None, n: int, what: str, *, nullable: bool = False) -> list:
    if values is None:
        return [None if nullable else ""] * n
    if isinstance(values, str) or len(values) != n:
        raise ValueError(f"{what}: give one value per item ({n}), got {values!r:.80}")
    out = []
    for v in values:
        if v is None:
            out.append(None if nullable else "")
            continue
        v = str(v)
        if "\x00" in v:
            raise ValueError(f"{what}: {v!r:.60} contains a NUL character, which PostgreSQL cannot store")
        out.append(v)
    return out


def _attributes(values: Sequence[Mapping[str, Any]] | None, n: int) -> list[str]:
    if values is None:
        return ["{}"] * n
    if len(values) != n:
        raise ValueError(f"attributes: give one dict per item ({n}), got {len(values)}")
    out = []
    for i, a in enumerate(values):
        if not isinstance(a, Mapping):
            raise ValueError(f"attributes[{i}] is a {type(a).__name__}; give a dict such as {{'price': 99}}")
        try:
            text = json.dumps(dict(a), ensure_ascii=False, allow_nan=False, default=_json_scalar)
        except (TypeError, ValueError) as err:
            raise ValueError(f"attributes[{i}] is not JSON ({err}); use strings, numbers, booleans, lists, dicts") \
                from None
        if "\\u0000" in text:
            raise ValueError(f"attributes[{i}] contains a NUL character, which PostgreSQL cannot store")
        out.append(text)
    return out


def _json_scalar(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON")


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"gallery name {name!r}: use lowercase letters, digits and '_' (starting with a letter, "
                         "at most 40 characters), e.g. 'products'")
    return name


def _settings(dim: int, fingerprint: str, model: Mapping[str, Any] | None, vector_type: str, metric: str, m: int,
              ef_construction: int, ef_search: int) -> dict:
    """A new gallery's metadata row, checked."""
    if vector_type not in ("halfvec", "vector"):
        raise ValueError(f"vector_type={vector_type!r}: choose 'halfvec' or 'vector'")
    if metric not in ("ip", "cosine"):
        raise ValueError(f"metric={metric!r}: choose 'ip' (inner product) or 'cosine'")
    limit = 4000 if vector_type == "halfvec" else 2000
    if not 1 <= int(dim) <= limit:
        raise ValueError(f"dim={dim}: pgvector's HNSW index takes 1 … {limit} dimensions for {vector_type}")
    if not fingerprint or not isinstance(fingerprint, str):
        raise ValueError("fingerprint: give the encoder's fingerprint (encoder.fingerprint()), so that "
                         "embeddings of another model are refused")
    for what, v, lo, hi in (("m", m, 2, 100), ("ef_construction", ef_construction, 4, 1000),
                            ("ef_search", ef_search, 1, 1000)):
        if not lo <= int(v) <= hi:
            raise ValueError(f"{what}={v}: pgvector takes {lo} … {hi}")
    return {"dim": int(dim), "vector_type": vector_type, "metric": metric, "m": int(m),
            "ef_construction": int(ef_construction), "ef_search": int(ef_search), "fingerprint": fingerprint,
            "model": dict(model or {})}


def _check_ids(ids: Sequence[int] | np.ndarray, n: int) -> np.ndarray:
    id_arr = np.asarray(ids).reshape(-1)
    if id_arr.size and not np.issubdtype(id_arr.dtype, np.integer):
        raise ValueError(f"ids must be integers, got {id_arr.dtype}")
    id_arr = id_arr.astype(np.int64)
    if len(id_arr) != n:
        raise ValueError(f"{len(id_arr)} ids for {n} embeddings")
    if n and id_arr.min() < 0:
        raise ValueError(f"id {int(id_arr.min())} is negative; ids are ≥ 0 (-1 marks 'no result')")
    uniq, counts = np.unique(id_arr, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"ids repeat within the batch ({uniq[counts > 1][:5].tolist()} …); give each id once")
    return id_arr


def _own_ids(exclude_ids: Sequence[int | None] | np.ndarray | None, n: int) -> list[int | None]:
    """One id to leave out per query (``None`` for none), from GalleryIndex's ``exclude_ids`` convention."""
    if exclude_ids is None:
        return [None] * n
    if len(exclude_ids) != n:
        raise ValueError(f"{len(exclude_ids)} exclude_ids for {n} queries")
    return [None if e is None or int(e) == -1 else int(e) for e in exclude_ids]


def _meta_row(row: tuple) -> dict:
    """A table row ``(id, distance, label, title, image, attributes, added_at)`` as a gallery metadata row."""
    image_id, _, label, title, image, attributes, added_at = row
    return {**(attributes or {}), "id": int(image_id), "image": image, "caption": title or "", "label": label or "",
            "added_at": added_at.isoformat() if added_at is not None else None}


class _MetaCache:
    """Metadata rows of recent hits by id (bounded), so ``gallery.meta[id]`` after a search needs no query."""

    def __init__(self, size: int = _META_CACHE):
        self._rows: OrderedDict[int, dict] = OrderedDict()
        self._lock = threading.Lock()
        self._size = size

    def put(self, rows: Sequence[tuple]) -> None:
        with self._lock:
            for row in rows:
                self._rows[int(row[0])] = _meta_row(row)
                self._rows.move_to_end(int(row[0]))
            while len(self._rows) > self._size:
                self._rows.popitem(last=False)

    def get(self, image_id: int) -> dict | None:
        with self._lock:
            hit = self._rows.get(int(image_id))
        return dict(hit) if hit is not None else None

    def forget(self, ids) -> None:
        with self._lock:
            for i in ids:
                self._rows.pop(int(i), None)


class _IdentityIds:
    """``ids[rows]`` for a live gallery: its search already answers ids, so they come back unchanged."""

    def __getitem__(self, rows):
        return np.asarray(rows, dtype=np.int64) if not isinstance(rows, (int, np.integer)) else int(rows)


class _MetaById:
    """``meta[id]``: an item's metadata row, from the rows recent searches fetched or from the table."""

    def __init__(self, view: LiveGalleryView):
        self._view = view

    def __getitem__(self, image_id) -> dict:
        return self._view.row(int(image_id))

    def __len__(self) -> int:
        return len(self._view)


class LiveGalleryView:
    """What code written for :class:`~cnclip_kd.retrieval.gallery.Gallery` reads, over a live table.

    ``ids[rows]`` is the identity (search answers ids), ``meta[id]`` the item's metadata row,
    ``row_of(id)`` the id itself when it is in the table, ``image(id)`` the decoded image its
    ``image`` reference names. ``lmdb_dir`` is ``None`` and ``image_roots`` empty: images are
    files (or URLs) the caller resolves.
    """

    lmdb_dir = None
    image_roots: tuple[str, ...] = ()

    def __init__(self, owner: PgVectorGallery, cache: _MetaCache):
        self._owner, self._cache = owner, cache
        self.ids = _IdentityIds()
        self.meta = _MetaById(self)

    def __len__(self) -> int:
        return len(self._owner)

    def row(self, image_id: int) -> dict:
        """One item's metadata row (from a recent search, else from the table).

        Raises:
            KeyError: No item with that id.
        """
        hit = self._cache.get(image_id)
        if hit is not None:
            return hit
        rows = self._owner.get([image_id])
        if not rows:
            raise KeyError(f"no item with id {image_id} in gallery {self._owner.name!r}")
        return rows[0]

    def row_of(self, image_id: int) -> int:
        """The id itself, once checked to be in the table.

        Raises:
            KeyError: No item with that id.
        """
        self.row(int(image_id))
        return int(image_id)

    def image(self, image_id: int):
        """The item's image, decoded (its ``image`` reference is a file path).

        Raises:
            KeyError: No such id. cnclip_kd.core.images.BadImageError: no readable image there.
        """
        from ..core.images import load_image

        ref = self.row(int(image_id)).get("image")
        if not ref:
            raise KeyError(f"gallery item {image_id} records no image")
        return load_image(ref)


def _reuse(name: str, existing: Mapping[str, Any], info: Mapping[str, Any], exist_ok: bool) -> Mapping[str, Any]:
    """The metadata row of a gallery that ``create`` found there, when it may be opened instead."""
    if not exist_ok:
        raise ValueError(f"gallery {name!r} exists in this database; open it with PgVectorGallery.open, pass "
                         "exist_ok=True, or drop() it first")
    if existing["fingerprint"] != info["fingerprint"]:
        raise FingerprintMismatchError(f"gallery {name!r} holds embeddings of encoder {existing['fingerprint']}, "
                                       f"not {info['fingerprint']}; use another name or drop() it first")
    differ = [f"{k} {existing[k]!r} ≠ {info[k]!r}" for k in ("dim", "vector_type", "metric")
              if existing[k] != info[k]]
    if differ:
        raise ValueError(f"gallery {name!r} exists with other settings ({', '.join(differ)})")
    return existing


def _hits(gallery: LiveGalleryView, scores: np.ndarray, rows: np.ndarray, images: bool) -> list[dict]:
    """What ``results`` returns (see :meth:`PgVectorGallery.results`)."""
    out = []
    for rank, (score, row) in enumerate(zip(np.asarray(scores).reshape(-1), np.asarray(rows).reshape(-1)), 1):
        if row < 0 or not math.isfinite(float(score)):
            continue
        try:
            meta = gallery.meta[int(row)]
        except KeyError:  # removed since the search
            continue
        hit = {**meta, "rank": rank, "row": int(row), "score": float(score), "path": meta.get("image")}
        hit["image"] = gallery.image(int(row)) if images else meta.get("image")
        out.append(hit)
    return out


class _Recorded:
    """What the metadata table records about a gallery, and the checks and stats that follow from it."""

    def __init__(self, url: str, name: str, info: Mapping[str, Any]):
        self.url, self.name, self.table = url, name, gallery_table(name)
        self.info = dict(info)
        self.dim, self.fingerprint = int(info["dim"]), str(info["fingerprint"])
        self.vector_type, self.metric = str(info["vector_type"]), str(info["metric"])
        self.params = {k: int(info[k]) for k in ("m", "ef_construction", "ef_search")}
        self.model = {**dict(info.get("model") or {}), "fingerprint": self.fingerprint}

    def check_fingerprint(self, fingerprint: str | None, what: str = "query") -> None:
        """Refuse an encoder other than the gallery's (``None``: nothing to check).

        Raises:
            FingerprintMismatchError: Names both fingerprints and the way out.
        """
        if fingerprint is not None and fingerprint != self.fingerprint:
            raise FingerprintMismatchError(
                f"{what} refused: the embeddings come from encoder {fingerprint}, but gallery {self.name!r} holds "
                f"encoder {self.fingerprint}'s ({self.model.get('spec') or 'model unrecorded'}); their vectors are "
                "not comparable. Use that model, or create another gallery for this one")

    @property
    def stats(self) -> dict:
        """``kind``, ``backend``, ``dim``, ``params`` (with vector type and metric), ``model``, ``table``."""
        return {"kind": "pgvector-hnsw", "backend": "pgvector", "dim": self.dim, "table": self.table,
                "params": {**self.params, "vector_type": self.vector_type, "metric": self.metric},
                "model": dict(self.model)}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.name!r}, {self.dim}-d {self.vector_type}, {self.metric}, "
                f"m={self.params['m']}, ef_search={self.params['ef_search']})")


class PgVectorGallery(_Recorded):
    """One gallery in PostgreSQL + pgvector; make one with :meth:`create` or :meth:`open`.

    Thread-safe: each call borrows its own connection from a small pool.

    Attributes:
        name: The gallery's name (its table is ``gallery_<name>``).
        url: The server.
        dim: Embedding size.
        fingerprint: The encoder whose embeddings the gallery holds.
        vector_type: ``halfvec`` (2 bytes a value, the default) or ``vector`` (4).
        metric: ``ip`` (inner product; vectors are L2-normalised, so it is the cosine) or ``cosine``.
        params: ``m``, ``ef_construction`` (the HNSW index as built) and ``ef_search`` (the default).
        exact_below: Filters keeping less than this share of rows are searched exactly.
        exact_rows: Filtered searches of a table up to this size are exact.
        gallery: A :class:`LiveGalleryView` (``ids[rows]``, ``meta[id]``, ``row_of``, ``image``).
        embeddings: ``None`` (the vectors live in the table), as for an index saved without them.
    """

    embeddings = None

    def __init__(self, url: str, name: str, info: Mapping[str, Any], *, pool_size: int = 4,
                 exact_below: float = DEFAULT_EXACT_BELOW, exact_rows: int = DEFAULT_EXACT_ROWS):
        """Wrap a gallery whose metadata row is ``info``; use :meth:`create` or :meth:`open` instead."""
        super().__init__(url, name, info)
        self.exact_below, self.exact_rows = float(exact_below), int(exact_rows)
        self._param = HalfvecParam if self.vector_type == "halfvec" else VectorParam
        self._op = "<#>" if self.metric == "ip" else "<=>"
        # Plan each query with its own values (a filter an index covers can use it); iterative index scans.
        self._pool = ConnectionPool(url, pool_size, settings={"hnsw.iterative_scan": "relaxed_order",
                                                              "plan_cache_mode": "force_custom_plan"})
        self._plans: dict[str, tuple[str, float]] = {}
        self._meta = _MetaCache()
        self.gallery = LiveGalleryView(self, self._meta)

    @classmethod
    def create(cls, url: str, name: str, dim: int, *, fingerprint: str, model: Mapping[str, Any] | None = None,
               vector_type: str = "halfvec", metric: str = "ip", m: int = DEFAULT_M,
               ef_construction: int = DEFAULT_EF_CONSTRUCTION, ef_search: int = DEFAULT_EF_SEARCH,
               index: bool = True, exist_ok: bool = False, **options: Any) -> PgVectorGallery:
        """Create a gallery (its table, indexes and metadata row) in one transaction.

        Args:
            url: ``postgresql://…`` (e.g. :meth:`EmbeddedPostgres.start
                <cnclip_kd.retrieval.pgserver.EmbeddedPostgres.start>`).
            name: Lowercase letters, digits, ``_`` (at most 40).
            dim: Embedding size (HNSW takes ≤ 4000 for halfvec, ≤ 2000 for vector).
            fingerprint: The encoder's fingerprint (``encoder.fingerprint()``, an index's
                ``stats["model"]["fingerprint"]``); writes and queries that state another are refused.
            model: What else to record about the model (``spec``, ``text_fingerprint`` …), as an
                index's ``stats["model"]``.
            vector_type: ``halfvec`` (default: half the memory, recall unchanged) or ``vector``.
            metric: ``ip`` (default) or ``cosine``.
            m: HNSW graph degree. ef_construction: HNSW build-time candidate list.
            ef_search: The default query-time candidate list.
            index: Build the (empty) HNSW index now, so every add updates it. For a large first
                load pass ``False``, :meth:`add` everything, then :meth:`build_index` (much faster).
            exist_ok: Open the gallery when it exists with the same settings, instead of failing.
            **options: ``pool_size``, ``exact_below``, ``exact_rows``.

        Raises:
            ValueError: A bad name or setting; the gallery exists (and ``exist_ok`` is false, or its
                settings differ).
            FingerprintMismatchError: It exists with another encoder's fingerprint.
        """
        _check_name(name)
        info = _settings(dim, fingerprint, model, vector_type, metric, m, ef_construction, ef_search)
        with connect(url) as conn:
            existing = read_gallery_info(conn, name)
            if existing is None:
                create_gallery_tables(conn, name, info, index=index)
                logger.info("gallery %s created: %d-d %s, %s, HNSW m=%d ef_construction=%d", name, dim, vector_type,
                            metric, m, ef_construction)
                return cls(url, name, info, **options)
        return cls(url, name, _reuse(name, existing, info, exist_ok), **options)

    @classmethod
    def open(cls, url: str, name: str, *, fingerprint: str | None = None, **options: Any) -> PgVectorGallery:
        """Open an existing gallery.

        Args:
            url: The server.
            name: The gallery.
            fingerprint: When given, the encoder the caller will query or write with: refused if the
                gallery holds another's embeddings.
            **options: ``pool_size``, ``exact_below``, ``exact_rows``.

        Raises:
            LookupError: No such gallery (the message lists the ones there are).
            FingerprintMismatchError: ``fingerprint`` is not the gallery's.
        """
        _check_name(name)
        with connect(url) as conn:
            info = read_gallery_info(conn, name)
            if info is None:
                have = read_gallery_info(conn, None) or []
                raise LookupError(f"no gallery {name!r} in this database (galleries: {', '.join(have) or 'none'}); "
                                  "create it with PgVectorGallery.create")
        gallery = cls(url, name, info, **options)
        gallery.check_fingerprint(fingerprint, "open")
        return gallery

    def __len__(self) -> int:
        return self.count()

    def count(self, where: Mapping[str, Any] | None = None) -> int:
        """Items in the gallery, or those a filter keeps (:class:`~cnclip_kd.retrieval.filters.FilterError` if bad)."""
        conds = parse_where(where)
        return self._pool.run(lambda conn: count_rows(conn, self.table, conds))

    def add(self, embeddings: np.ndarray, ids: Sequence[int] | np.ndarray, *, fingerprint: str,
            labels: Sequence[str] | None = None, titles: Sequence[str] | None = None,
            images: Sequence[str | None] | None = None,
            attributes: Sequence[Mapping[str, Any]] | None = None) -> np.ndarray:
        """Add or update items in one transaction (binary COPY into a staging table, then an upsert).

        Idempotent on id: an id already there is updated in place (its ``added_at`` kept), and a
        row that would not change is not written at all, so a retried batch duplicates nothing.
        Once this returns, the next query sees the items.

        Args:
            embeddings: ``[n, D]`` (normalised here).
            ids: ``n`` distinct non-negative item ids.
            fingerprint: The encoder that made ``embeddings``; refused unless it is the gallery's.
            labels: Categories (``""`` when ``None``). titles: Titles / captions (``""`` when ``None``).
            images: Image references, e.g. file paths (``NULL`` when ``None``).
            attributes: One JSON dict per item (``price``, ``in_stock`` …): what filters test.

        Returns:
            The ids written, as given (int64); how many were new, updated, unchanged is logged.

        Raises:
            FingerprintMismatchError: Another encoder's embeddings.
            ValueError: Shapes, repeated or negative ids, non-JSON attributes, NUL characters.
        """
        self.check_fingerprint(fingerprint, "add")
        emb = _unit_rows(embeddings, self.dim, "embeddings")
        n = len(emb)
        id_arr = _check_ids(ids, n)
        columns = (_texts(labels, n, "labels"), _texts(titles, n, "titles"), _texts(images, n, "images", nullable=True),
                   _attributes(attributes, n))
        if n == 0:
            return id_arr
        t0 = time.perf_counter()
        inserted, updated = self._pool.run(lambda conn: upsert_rows(conn, self.table, emb, id_arr, columns,
                                                                    halfvec=self.vector_type == "halfvec"))
        self._plans.clear()
        self._meta.forget(id_arr)
        logger.info("gallery %s: %d items in %.2f s (%d new, %d updated, %d unchanged)", self.name, n,
                    time.perf_counter() - t0, inserted, updated, n - inserted - updated)
        return id_arr

    def add_gallery(self, embeddings: np.ndarray, gallery, *, fingerprint: str) -> np.ndarray:
        """Add a :class:`~cnclip_kd.retrieval.gallery.Gallery` (e.g. a saved index's) with its embeddings.

        ``caption`` becomes the title, ``label`` the label, ``image`` the image reference and every
        other metadata field (``product_id``, ``split``, ``source`` …) an attribute.
        """
        meta = list(gallery.meta)
        return self.add(embeddings, gallery.ids, fingerprint=fingerprint,
                        labels=[m.get("label") or "" for m in meta], titles=[m.get("caption") or "" for m in meta],
                        images=[m.get("image") for m in meta],
                        attributes=[{k: v for k, v in m.items() if k not in ("id", "image", "caption", "label")
                                     and v is not None} for m in meta])

    def remove(self, ids: Sequence[int] | np.ndarray, *, fingerprint: str | None = None) -> int:
        """Delete items by id in one transaction (ids not there are ignored); returns how many went."""
        self.check_fingerprint(fingerprint, "remove")
        id_list = [int(i) for i in np.asarray(ids, dtype=np.int64).reshape(-1)]
        deleted = self._pool.run(lambda conn: delete_ids(conn, self.table, id_list)) if id_list else 0
        self._plans.clear()
        self._meta.forget(id_list)
        logger.info("gallery %s: %d of %d ids removed", self.name, deleted, len(id_list))
        return deleted

    def build_index(self, *, rebuild: bool = False, maintenance_work_mem: str = "1GB") -> float:
        """Build the HNSW index (after a bulk load into a gallery created with ``index=False``).

        Args:
            rebuild: Drop and build it again when it exists (e.g. after many deletions).
            maintenance_work_mem: Memory the build may use; a graph that fits builds several times faster.

        Returns:
            Seconds the build took (0 when it was there and ``rebuild`` is false).
        """
        t0 = time.perf_counter()
        built = self._pool.run(lambda conn: build_hnsw(conn, self.table, self.info, rebuild=rebuild,
                                                       maintenance_work_mem=maintenance_work_mem))
        seconds = time.perf_counter() - t0 if built else 0.0
        logger.info("gallery %s: HNSW index %s (%.1f s)", self.name, "built" if built else "already there", seconds)
        return seconds

    def index_attribute(self, key: str) -> str:
        """Index one attribute (a B-tree on ``attributes -> key``), so a narrow filter on it reads only the rows it
        keeps instead of the whole table: a number range (``lt`` … ``ge``) or ``eq``. Returns the index's name.

        Raises:
            FilterError: ``key`` is not a name a filter can use (``label`` has its own index already).
        """
        parse_where({key: ""})
        if key in FILTER_COLUMNS:
            raise ValueError(f"{key!r} is a column with its own index; index attributes only")
        name = self._pool.run(lambda conn: create_attribute_index(conn, self.table, key))
        logger.info("gallery %s: attribute %r indexed (%s)", self.name, key, name)
        return name

    def drop(self) -> None:
        """Delete the gallery (its table and metadata row) and close the connections."""
        self._pool.run(lambda conn: drop_gallery(conn, self.name))
        self.close()

    def search(self, queries: np.ndarray, k: int = 10, *, where: Mapping[str, Any] | None = None,
               ef_search: int | None = None, exclude_ids: Sequence[int | None] | np.ndarray | None = None,
               fingerprint: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest items of each query, optionally among those a filter keeps.

        Args:
            queries: ``[Q, D]`` (or ``[D]``) query embeddings; normalised here.
            k: Results per query.
            where: A filter (:mod:`cnclip_kd.retrieval.filters`), e.g. ``{"label": "dress", "price": {"lt": 100}}``.
            ef_search: HNSW candidate list for these queries (default: the gallery's; at least ``k``).
            exclude_ids: One id per query to leave out (``None`` / ``-1``: none), as GalleryIndex takes.
            fingerprint: The query encoder's fingerprint, checked when given.

        Returns:
            ``(scores, ids)``, each ``[Q, k]``, best first: cosine similarities (float32) and item
            **ids** (int64; ``-1`` with score ``-inf`` where fewer than ``k`` items qualify).

        Raises:
            FilterError: A bad filter. FingerprintMismatchError: another encoder's queries.
            ValueError: Queries of the wrong size, ``k`` < 1, ``ef_search`` outside 1 … 1000.
        """
        self.check_fingerprint(fingerprint)
        q = _unit_rows(queries, self.dim, "queries")
        conds, k = parse_where(where), int(k)
        ef = int(ef_search or self.params["ef_search"])
        if k < 1 or not 1 <= ef <= 1000:
            raise ValueError(f"k={k}, ef_search={ef}: ask for k ≥ 1 results with ef_search in 1 … 1000")
        own = _own_ids(exclude_ids, len(q))
        scores = np.full((len(q), k), -np.inf, dtype=np.float32)
        ids = np.full((len(q), k), -1, dtype=np.int64)

        def run(conn) -> None:
            self._set_ef(conn, max(ef, k))
            exact = bool(conds) and self._path(conn, conds) == "exact"
            for i, vec in enumerate(q):
                rows = nearest(conn, self.table, self._op, self._param(vec), k, conds, own[i], exact=exact)
                if not exact and len(rows) < k and (conds or own[i] is not None):
                    rows = nearest(conn, self.table, self._op, self._param(vec), k, conds, own[i], exact=True)
                for j, row in enumerate(rows):
                    ids[i, j] = row[0]
                    scores[i, j] = -float(row[1]) if self.metric == "ip" else 1.0 - float(row[1])
                self._meta.put(rows)

        self._pool.run(run)
        return scores, ids

    def _path(self, conn, conds: Sequence[Condition]) -> str:
        """``exact`` or ``index`` for a filter: exact for small tables and filters that keep few rows."""
        key = canonical(conds)
        hit = self._plans.get(key)
        if hit is None or hit[1] <= time.monotonic():
            n, share = filter_share(conn, self.table, conds, _SAMPLE_ROWS)
            mode = "index" if n > self.exact_rows and share >= self.exact_below else "exact"
            logger.debug("gallery %s: filter %s keeps ~%.1f%% of %d rows: %s", self.name, key, 100 * share, n, mode)
            hit = self._plans[key] = (mode, time.monotonic() + _PLAN_TTL_S)
        return hit[0]

    def _set_ef(self, conn, ef: int) -> None:
        state = self._pool.state.setdefault(id(conn), {})
        if state.get("ef_search") != ef:
            conn.execute("SELECT set_config('hnsw.ef_search', %s, false)", (str(ef),))
            state["ef_search"] = ef

    def get(self, ids: Sequence[int] | np.ndarray) -> list[dict]:
        """Metadata rows of the ids that are in the gallery, in the order given (missing ids left out)."""
        id_list = [int(i) for i in np.asarray(ids, dtype=np.int64).reshape(-1)]
        rows = self._pool.run(lambda conn: fetch_rows(conn, self.table, id_list)) if id_list else []
        by_id = {int(r[0]): _meta_row(r) for r in rows}
        return [dict(by_id[i]) for i in id_list if i in by_id]

    def results(self, scores: np.ndarray, rows: np.ndarray, *, images: bool = True) -> list[dict]:
        """One query's hits as dicts, as :meth:`GalleryIndex.results <cnclip_kd.retrieval.index.GalleryIndex.results>`
        gives them: ``rank``, ``row`` (here the id), ``score``, the metadata row, ``path`` and ``image``
        (decoded when ``images``, else the reference); ids removed since the search are left out."""
        return _hits(self.gallery, scores, rows, images)

    def close(self) -> None:
        """Close the connections (the gallery stays in the database)."""
        self._pool.close()

    def __enter__(self) -> PgVectorGallery:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
