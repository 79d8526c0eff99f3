"""Edits and filters for :class:`~cnclip_kd.retrieval.index.GalleryIndex`: the calls a live gallery needs, in FAISS.

:class:`IndexEdits` is mixed into ``GalleryIndex`` and gives it what
:class:`~cnclip_kd.retrieval.pgvector.PgVectorGallery` offers, where FAISS can:

* ``search(..., where=…, ef_search=…)``: a filter (:mod:`cnclip_kd.retrieval.filters`, the same
  syntax and meaning) becomes a faiss ``IDSelectorBitmap`` over the rows whose metadata match.
  A filter that keeps few rows (under ``exact_below`` of them, or ``exact_rows`` at most) is
  searched exactly over those rows, as is any query the index answers with fewer than ``k``.
* ``add`` / ``remove`` in place: flat and IVF indexes add and delete vectors (IVF keeps row
  numbers as its ids and renumbers them after a delete); the gallery and the embeddings follow,
  so rows stay gallery rows. An id added again replaces its old row (nothing is duplicated).
* HNSW cannot delete: removed rows are marked and filtered out of every result until
  ``rebuild()``, which builds a fresh index of the live rows and swaps it in. A marked row's id is
  freed at once (the gallery holds ``-2 - row`` there), so the id may be added again; a saved
  index keeps its marks. ``rebuild_in_background()`` runs the rebuild in a thread (the service
  does so after each removal), and edits made during it are carried over before the swap.

Searches and edits may come from different threads: searches share a read lock, an edit takes
the write lock for the moment it changes the index, and ``rebuild`` builds beside the old index.
None of this changes an index that is only built, saved, loaded and searched.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import OrderedDict
from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from .filters import Condition, canonical, match_mask, parse_where
from .index_rebuild import IndexRebuild, rows_of

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_EXACT_BELOW", "DEFAULT_EXACT_ROWS", "IndexEdits", "RWLock", "renumber_ivf_ids"]

#: A filter keeping less than this share of the live rows is searched exactly (as pgvector does).
DEFAULT_EXACT_BELOW = 0.25
#: A filter keeping at most this many rows is searched exactly (a few ms of numpy).
DEFAULT_EXACT_ROWS = 20_000
_MASKS = 16  # filters whose row masks are kept
_CHUNK = 16_384  # rows scored at a time in an exact search


class RWLock:
    """Many readers or one writer; a waiting writer goes before new readers."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


def renumber_ivf_ids(index, removed_rows: np.ndarray) -> None:
    """After ``remove_ids`` on an IVF index whose ids are row numbers, shift the rest down to close the gaps.

    Row ``r`` becomes ``r - (rows removed below r)``, as the gallery's rows do when the same rows are
    deleted from it. The ids are rewritten in place in the inverted lists.
    """
    import faiss

    removed = np.sort(np.asarray(removed_rows, dtype=np.int64))
    ivf = faiss.extract_index_ivf(index)
    lists = ivf.invlists
    for list_no in range(ivf.nlist):
        size = lists.list_size(list_no)
        if size:
            ids = faiss.rev_swig_ptr(lists.get_ids(list_no), size)
            ids[:] = ids - np.searchsorted(removed, ids)


def _kind_of(index) -> str:
    import faiss

    if isinstance(index, faiss.IndexHNSW):
        return "hnsw"
    try:
        return "ivf" if faiss.try_extract_index_ivf(index) is not None else "flat"
    except AttributeError:  # an older faiss without try_extract_index_ivf
        return "flat" if isinstance(index, faiss.IndexFlat) else "ivf"


def _search_params(index, sel, ef_search: int | None):
    """faiss search parameters for this index type with a selector and/or an HNSW candidate list."""
    import faiss

    kind = _kind_of(index)
    if kind == "hnsw":
        params = faiss.SearchParametersHNSW()
        params.efSearch = int(ef_search or index.hnsw.efSearch)
    elif kind == "ivf":
        params = faiss.SearchParametersIVF()
        params.nprobe = int(faiss.extract_index_ivf(index).nprobe)  # its own default would be 1
    else:
        params = faiss.SearchParameters()
    if sel is not None:
        params.sel = sel
    return params


def _top_k(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best columns of each row of ``scores`` (and the matching ``rows``), best first."""
    k = min(k, scores.shape[1])
    if k < scores.shape[1]:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        scores, rows = np.take_along_axis(scores, part, axis=1), np.take_along_axis(rows, part, axis=1)
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(rows, order, axis=1)


class IndexEdits(IndexRebuild):
    """``add``, ``remove``, ``rebuild``, ``count`` and filtered search for :class:`GalleryIndex` (a mixin).

    Attributes:
        exact_below: Filters keeping less than this share of the live rows are searched exactly.
        exact_rows: Filters keeping at most this many rows are searched exactly.
    """

    # Set by GalleryIndex: the index, its search copy, the gallery, the embeddings, rows by id, stats.
    index: Any
    gallery: Any
    embeddings: np.ndarray | None
    stats: dict

    def _init_edits(self) -> None:
        self._rw = RWLock()
        self._edit_lock = threading.Lock()
        self._removed: np.ndarray | None = None  # HNSW rows marked removed, until rebuild()
        self._columns: dict[str, list] = {}
        self._masks: OrderedDict[str, np.ndarray] = OrderedDict()
        self.exact_below, self.exact_rows = DEFAULT_EXACT_BELOW, DEFAULT_EXACT_ROWS
        self._init_rebuild()
        self._emb_buf: np.ndarray | None = None  # room for added embeddings (see _appended_embeddings)
        self._emb_view: np.ndarray | None = None
        marked = np.asarray(self.gallery.ids) < 0  # a saved HNSW index keeps its marks (ids -2 - row)
        if marked.any():
            self._removed = marked

    @property
    def removed_count(self) -> int:
        """Rows marked removed and still in an HNSW graph (0 after :meth:`rebuild`)."""
        return 0 if self._removed is None else int(self._removed.sum())

    def _live(self) -> int:
        return int(self.index.ntotal) - self.removed_count

    # ------------------------------------------------------------------ filters

    def _column(self, keys: Sequence[str]) -> dict[str, list]:
        missing = [k for k in keys if k not in self._columns]
        if missing:
            cols: dict[str, list] = {k: [] for k in missing}
            for row in self.gallery.meta:  # one pass over the rows for every field not yet read
                for k in missing:
                    cols[k].append(row.get(k))
            self._columns.update(cols)
        return {k: self._columns[k] for k in keys}

    def _mask(self, conds: Sequence[Condition]) -> np.ndarray:
        """``[ntotal]`` bool: live rows that pass the filter (cached per filter until the next edit)."""
        key = canonical(conds)
        mask = self._masks.get(key)
        if mask is None:
            n = int(self.index.ntotal)
            mask = match_mask(conds, self._column(sorted({c.key for c in conds})), n) if conds else np.ones(n, bool)
            if self._removed is not None:
                mask &= ~self._removed
            self._masks[key] = mask
            while len(self._masks) > _MASKS:
                self._masks.popitem(last=False)
        return mask

    def count(self, where: Mapping[str, Any] | None = None) -> int:
        """Live items, or those a filter keeps.

        Raises:
            FilterError: A bad filter.
        """
        conds = parse_where(where)
        with self._rw.read():
            return int(self._mask(conds).sum()) if conds or self._removed is not None else int(self.index.ntotal)

    def _vectors(self, rows: np.ndarray) -> np.ndarray:
        """float32 vectors of some rows: the embeddings, else decoded from the index."""
        if self.embeddings is not None:
            return np.asarray(self.embeddings[rows], dtype=np.float32)
        import faiss

        if _kind_of(self.index) == "ivf":  # IVF reconstructs through a direct map, made for the moment
            ivf = faiss.extract_index_ivf(self.index)
            ivf.make_direct_map(True)
            try:
                return self.index.reconstruct_batch(np.asarray(rows, dtype=np.int64))
            finally:
                ivf.make_direct_map(False)  # remove_ids refuses an array direct map
        return self.index.reconstruct_batch(np.asarray(rows, dtype=np.int64))

    def _exact(self, q: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top ``k`` of each query among ``rows``, scored in chunks."""
        best_s = np.full((len(q), 0), -np.inf, np.float32)
        best_r = np.zeros((len(q), 0), np.int64)
        for s in range(0, len(rows), _CHUNK):
            part = rows[s:s + _CHUNK]
            sims = q @ self._vectors(part).T
            best_s, best_r = _top_k(np.concatenate([best_s, sims], axis=1),
                                    np.concatenate([best_r, np.broadcast_to(part, sims.shape)], axis=1), k)
        return best_s, best_r

    def _search_filtered(self, q: np.ndarray, kk: int, conds: Sequence[Condition],
                         ef_search: int | None) -> tuple[np.ndarray, np.ndarray]:
        """Top ``kk`` rows among the live rows a filter keeps (call under the read lock)."""
        import faiss

        if not conds and self._removed is None:  # only ef_search: the plain search with that candidate list
            return self.index.search(q, kk, params=_search_params(self.index, None, ef_search))
        mask = self._mask(conds)
        rows = np.flatnonzero(mask)
        scores = np.full((len(q), kk), -np.inf, np.float32)
        found = np.full((len(q), kk), -1, np.int64)
        if not len(rows):
            return scores, found
        want = min(kk, len(rows))
        if conds and (len(rows) <= max(want, self.exact_rows) or len(rows) < self.exact_below * self._live()):
            s, r = self._exact(q, rows, want)
        else:
            packed = np.packbits(mask, bitorder="little")  # kept alive for the selector during the search
            sel = faiss.IDSelectorBitmap(len(mask), faiss.swig_ptr(packed))
            s, r = self.index.search(q, want, params=_search_params(self.index, sel, ef_search))
            short = (r >= 0).sum(axis=1) < want
            if short.any():  # the index ran dry inside the filter: rank the rows it keeps exactly
                logger.debug("filtered search: %d of %d queries fell back to the exact search", short.sum(), len(q))
                s[short], r[short] = self._exact(q[short], rows, want)
        scores[:, :want], found[:, :want] = s, r
        return scores, found

    # ------------------------------------------------------------------ edits

    def _check_new(self, embeddings: np.ndarray, ids: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        emb = np.atleast_2d(np.asarray(embeddings, dtype=np.float32))
        if emb.ndim != 2 or emb.shape[1] != self.index.d:
            raise ValueError(f"embeddings of shape {np.shape(embeddings)}; the index holds {self.index.d}-d vectors")
        if not np.isfinite(emb).all():
            raise ValueError("embeddings contain NaN or infinite values")
        emb = np.ascontiguousarray(emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12))
        id_arr = np.asarray(ids).reshape(-1)
        if id_arr.size and not np.issubdtype(id_arr.dtype, np.integer):
            raise ValueError(f"ids must be integers, got {id_arr.dtype}")
        id_arr = id_arr.astype(np.int64)
        if len(id_arr) != len(emb):
            raise ValueError(f"{len(id_arr)} ids for {len(emb)} embeddings")
        if len(np.unique(id_arr)) != len(id_arr):
            raise ValueError("ids repeat within the batch; give each id once")
        if len(id_arr) and id_arr.min() < 0:
            raise ValueError(f"id {int(id_arr.min())} is negative; ids are ≥ 0 (-1 marks 'no result')")
        return emb, id_arr

    def add(self, embeddings: np.ndarray, ids: Sequence[int] | np.ndarray,
            meta: Sequence[Mapping[str, Any]] | None = None) -> np.ndarray:
        """Add items in place (flat, IVF and HNSW); an id already there is replaced, never duplicated.

        Args:
            embeddings: ``[n, D]`` (normalised here), from the model the index was built with.
            ids: ``n`` distinct non-negative ids.
            meta: One metadata dict per item (``caption``, ``label``, ``image``, ``product_id`` and any
                attribute filters test); ``id`` is set from ``ids``.

        Returns:
            The ids added (int64).

        Raises:
            ValueError: Shapes, repeated or negative ids.
        """
        emb, id_arr = self._check_new(embeddings, ids)
        if meta is not None and len(meta) != len(id_arr):
            raise ValueError(f"{len(meta)} metadata rows for {len(id_arr)} items")
        rows_meta = [{"image": None, "caption": "", "label": "", "product_id": "",
                      **dict(meta[i] if meta is not None else {}), "id": int(i_)} for i, i_ in enumerate(id_arr)]
        with self._edit_lock:
            again = [i for i in id_arr.tolist() if i in self._row_of]
            if again:
                self._remove_rows(np.array([self._row_of[i] for i in again], np.int64))
            with self._rw.write():
                n0 = int(self.index.ntotal)
                if _kind_of(self.index) == "ivf":
                    self.index.add_with_ids(emb, np.arange(n0, n0 + len(emb), dtype=np.int64))
                else:
                    self.index.add(emb)
                gallery = self.gallery
                self.gallery = dataclasses.replace(gallery, ids=np.concatenate([gallery.ids, id_arr]),
                                                   meta=rows_of(gallery.meta).concat(rows_meta), _reader=None)
                if self.embeddings is not None:
                    self.embeddings = self._appended_embeddings(emb)
                if self._removed is not None:
                    self._removed = np.concatenate([self._removed, np.zeros(len(emb), bool)])
                self._row_of.update({int(i): n0 + j for j, i in enumerate(id_arr)})
                self._edited(added=len(emb))
        logger.info("index: %d items added (%d replaced), %d live", len(id_arr), len(again), self._live())
        return id_arr

    def _appended_embeddings(self, emb: np.ndarray) -> np.ndarray:
        """The embeddings with ``emb`` appended, in a buffer with room to spare (call under the write lock).

        Copying a million rows (2 GB) on every add made adds cost the gallery's size; the buffer grows
        by a quarter when full, so an add costs its own rows. Readers holding the old view see it unchanged.
        """
        cur, n, k = self.embeddings, len(self.embeddings), len(emb)
        buf = self._emb_buf
        if buf is None or cur is not self._emb_view or n + k > len(buf):
            buf = np.empty((max(n + k, n + n // 4 + 1024), emb.shape[1]), dtype=np.float32)
            buf[:n] = cur
            self._emb_buf = buf
        buf[n:n + k] = emb
        self._emb_view = buf[:n + k]
        return self._emb_view

    def remove(self, ids: Sequence[int] | np.ndarray) -> int:
        """Remove items by id; ids not in the index are ignored.

        Flat and IVF delete the vectors at once (later rows move up; the gallery follows); HNSW
        marks them, and they are left out of every result until :meth:`rebuild`.

        Returns:
            How many items were removed.
        """
        wanted = [int(i) for i in np.asarray(ids, dtype=np.int64).reshape(-1)]
        with self._edit_lock:
            rows = np.array(sorted({self._row_of[i] for i in wanted if i in self._row_of}), np.int64)
            if self._removed is not None and len(rows):
                rows = rows[~self._removed[rows]]
            self._remove_rows(rows)
        logger.info("index: %d of %d ids removed, %d live", len(rows), len(wanted), self._live())
        return len(rows)

    def _remove_rows(self, rows: np.ndarray) -> None:
        """Delete (flat / IVF) or mark (HNSW) these rows; call holding the edit lock."""
        import faiss

        if not len(rows):
            return
        kind = _kind_of(self.index)
        with self._rw.write():
            if kind == "hnsw":
                if self._removed is None:
                    self._removed = np.zeros(int(self.index.ntotal), bool)
                self._removed[rows] = True
                for r in rows:
                    self._row_of.pop(int(self.gallery.ids[r]), None)
                # The marked rows stay until rebuild(); their ids are freed (-2 - row: unique, never a real id),
                # so the gallery no longer knows them and an id can be added again.
                ids = self.gallery.ids.copy()
                ids[rows] = -2 - rows
                self.gallery = dataclasses.replace(self.gallery, ids=ids, _reader=None)
                self._edited(removed=len(rows))
                return
            self.index.remove_ids(faiss.IDSelectorBatch(rows))
            if kind == "ivf":
                renumber_ivf_ids(self.index, rows)
            keep = np.setdiff1d(np.arange(len(self.gallery)), rows)
            self._compact(keep)
            self._edited(removed=len(rows))

    def _compact(self, keep: np.ndarray) -> None:
        gallery = self.gallery
        self.gallery = dataclasses.replace(gallery, ids=gallery.ids[keep], meta=rows_of(gallery.meta).take(keep),
                                           _reader=None)
        if self.embeddings is not None:
            self.embeddings = np.asarray(self.embeddings[keep], dtype=np.float32)
        self._emb_buf = self._emb_view = None  # the old buffer (with its spare room) is no longer the embeddings
        self._row_of = {int(i): r for r, i in enumerate(self.gallery.ids)}

    def _edited(self, added: int = 0, removed: int = 0) -> None:
        """After an edit: the search copy, the caches and the stats follow the index."""
        self._search_index = self._gpu_copy(self.index)
        self._columns.clear()
        self._masks.clear()
        edits = self.stats.setdefault("edits", {"added": 0, "removed": 0})
        edits["added"] += int(added)
        edits["removed"] += int(removed)
        self.stats["n"] = self._live()
