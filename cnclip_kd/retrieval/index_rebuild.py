"""Rebuilding a :class:`~cnclip_kd.retrieval.index.GalleryIndex` beside itself, in the caller's thread or in the background.

:class:`IndexRebuild` is mixed into ``GalleryIndex`` (through
:class:`~cnclip_kd.retrieval.index_edits.IndexEdits`). ``rebuild()`` builds a fresh index of the live
rows with the same kind and parameters and swaps it in; on HNSW (which marks removals rather than
deleting) edits made while the graph builds are carried over just before the swap, so neither
searches nor edits wait for the build. ``rebuild_in_background()`` runs it in a thread, one at a
time, and repeats while rows are marked removed: what the service does after each removal.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Any, Callable

import numpy as np

from .gallery import MetaRows

logger = logging.getLogger(__name__)

__all__ = ["IndexRebuild", "rows_of"]


def rows_of(meta) -> MetaRows:
    """A gallery's metadata as :class:`MetaRows` (taken and appended without decoding every row)."""
    return meta if isinstance(meta, MetaRows) else MetaRows(meta)


class IndexRebuild:
    """``rebuild``, ``rebuild_in_background`` and ``rebuilding`` for :class:`GalleryIndex` (a mixin).

    Uses what :class:`~cnclip_kd.retrieval.index_edits.IndexEdits` keeps: the edit and read/write
    locks, the removal marks, ``_vectors``, ``_remove_rows`` and ``add``.
    """

    def _init_rebuild(self) -> None:
        self._rebuild_lock = threading.Lock()  # one rebuild at a time
        self._bg_lock = threading.Lock()
        self._bg: threading.Thread | None = None
        self._bg_again = False

    def rebuild(self, *, recall_sample: int = 1000, seed: int = 0):
        """Build a fresh index of the live rows (same kind and parameters) beside this one, then swap it in.

        For HNSW this drops the rows marked removed; for IVF it also retrains the lists on the
        gallery as it is now. Searches go on against the old index while the new one builds. On
        HNSW, edits go on too: rows added and removed meanwhile are carried over to the new index
        just before the swap (HNSW only appends rows and marks removals, so the old row numbers
        still name the same items). Flat and IVF renumber rows on removal: their edits wait.

        Returns:
            ``self``, now holding the new index (its stats re-measured).

        Raises:
            ValueError: Nothing is left to index.
        """
        with self._rebuild_lock:
            t0 = time.perf_counter()
            with self._edit_lock:
                snap = self._snapshot()
                if snap["kind"] != "hnsw":
                    fresh = type(self).build(snap["emb"], snap["gallery"], kind=snap["kind"], params=snap["params"],
                                             recall_sample=recall_sample, seed=seed)
                    self._swap(fresh, snap["stats"])
            if snap["kind"] == "hnsw":
                fresh = type(self).build(snap["emb"], snap["gallery"], kind="hnsw", params=snap["params"],
                                         recall_sample=recall_sample, seed=seed)
                with self._edit_lock:
                    self._catch_up(fresh, snap)
                    self._swap(fresh, snap["stats"])
        logger.info("index rebuilt: %s over %d items in %.1f s (%d marked removed since)", snap["kind"],
                    len(snap["rows"]), time.perf_counter() - t0, self.removed_count)
        return self

    def _snapshot(self) -> dict:
        """The live rows as they are now, for :meth:`rebuild` (call holding the edit lock)."""
        with self._rw.read():
            rows = np.flatnonzero(~self._removed) if self._removed is not None else np.arange(len(self.gallery))
            if not len(rows):
                raise ValueError("every item was removed: nothing left to index; add items first")
            gallery = dataclasses.replace(self.gallery, ids=self.gallery.ids[rows],
                                          meta=rows_of(self.gallery.meta).take(rows), _reader=None)
            stats = dict(self.stats)
            stats.pop("edits", None)
            return {"rows": rows, "n0": int(self.index.ntotal), "emb": self._vectors(rows), "gallery": gallery,
                    "kind": stats["kind"], "params": dict(stats.get("params") or {}), "stats": stats}

    def _catch_up(self, fresh: "IndexRebuild", snap: dict) -> None:
        """Carry the edits made during an HNSW rebuild over to ``fresh`` (call holding the edit lock)."""
        if self._removed is not None:
            gone = np.flatnonzero(self._removed[snap["rows"]])  # removed meanwhile: their rows in ``fresh``
            if len(gone):
                fresh._remove_rows(gone)
        new = np.arange(snap["n0"], int(self.index.ntotal))
        if self._removed is not None:
            new = new[~self._removed[new]]
        if len(new):
            fresh.add(self._vectors(new), self.gallery.ids[new], [dict(self.gallery.meta[int(r)]) for r in new])

    def _swap(self, fresh: "IndexRebuild", old_stats: dict) -> None:
        with self._rw.write():
            self.index, self._search_index = fresh.index, fresh._search_index
            self.gallery, self.embeddings, self._row_of = fresh.gallery, fresh.embeddings, fresh._row_of
            self._removed = fresh._removed
            self._emb_buf = self._emb_view = None  # let the old embeddings' spare-room buffer go
            self._columns.clear()
            self._masks.clear()
            self.stats = {**old_stats, **fresh.stats}

    @property
    def rebuilding(self) -> bool:
        """Whether a background rebuild (:meth:`rebuild_in_background`) is running."""
        return self._bg is not None

    def rebuild_in_background(self, *, on_done: Callable[[Any], None] | None = None,
                              recall_sample: int = 1000) -> threading.Thread:
        """Rebuild in a thread while searches and edits go on; repeat while rows are marked removed.

        One thread at a time: a call while one runs only asks it to look again when it finishes.
        A failed rebuild is logged and leaves the marks in place (marked rows stay out of results).

        Args:
            on_done: Called with this index after each swap, in the thread (e.g. to save it).
            recall_sample: Queries of the recall check after each build.

        Returns:
            The rebuilding thread (``join()`` it to wait).
        """
        with self._bg_lock:
            if self.rebuilding:
                self._bg_again = True
                return self._bg
            self._bg_again = False
            self._bg = threading.Thread(target=self._rebuild_loop, args=(on_done, recall_sample), daemon=True,
                                        name="cnclip-kd-index-rebuild")
            self._bg.start()
            return self._bg

    def _rebuild_loop(self, on_done: Callable[[Any], None] | None, recall_sample: int) -> None:
        again = True
        while again:
            try:
                if self.removed_count:
                    self.rebuild(recall_sample=recall_sample)
                    if on_done is not None:
                        on_done(self)
            except Exception:  # a thread has no caller to raise to: say so, keep the marks
                logger.exception("background index rebuild failed; removed items stay marked and out of results")
                again = False
            with self._bg_lock:
                again = again and (self._bg_again or self.removed_count > 0)
                self._bg_again = False
                if not again:
                    self._bg = None  # under the lock: a caller now starts a new thread rather than asking this one
