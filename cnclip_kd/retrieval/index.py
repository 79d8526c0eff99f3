"""The FAISS index over a gallery's embeddings: exact or approximate, saved and loaded as one folder.

:class:`GalleryIndex` is the FAISS index with the gallery: exact inner
product for small galleries, HNSW / IVF (+SQ/PQ when memory asks) for large
ones with recall@10 against exact search measured at build time; saved and
loaded as one folder, written atomically. It needs numpy and faiss only (no
torch), so the CPU serving path stays small.

Search results are gallery **row indices** (0 … N-1, ``-1`` where there is no
result); ``gallery.ids[row]`` is the image id, ``gallery.meta[row]`` its row of
metadata. Scores are cosine similarities (queries are normalised inside).

The calls a live gallery needs (``where=`` filters, ``ef_search=``, ``add``, ``remove``,
``rebuild``, ``count``) come from :class:`~cnclip_kd.retrieval.index_edits.IndexEdits`, the same
calls :class:`~cnclip_kd.retrieval.pgvector.PgVectorGallery` answers; an index that never uses
them behaves, and is saved, exactly as before.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..core.files import atomic_folder
from .filters import parse_where
from .gallery import Gallery
from .index_edits import IndexEdits

logger = logging.getLogger(__name__)

__all__ = ["EXACT_MAX", "INDEX_KINDS", "GalleryIndex", "build_faiss_index", "choose_index_kind"]

#: Galleries up to this size get the exact index under ``kind="auto"``.
EXACT_MAX = 50_000
#: Index kinds :meth:`GalleryIndex.build` knows.
INDEX_KINDS = ("flat", "hnsw", "ivf", "ivfsq", "ivfpq")
# Above this size HNSW takes too long to build on a CPU; auto picks IVF instead.
_HNSW_MAX = 1_000_000
_HNSW_M = 32


def _estimate_bytes(kind: str, n: int, dim: int, params: Mapping[str, Any] | None = None) -> int:
    """Rough memory of an index (vectors + ids + graph/lists), for choosing a kind."""
    params = dict(params or {})
    if kind == "flat":
        return n * dim * 4
    if kind == "hnsw":
        vector = dim * (2 if params.get("storage", "fp16") == "fp16" else 4)
        return int(n * (vector + int(params.get("M", _HNSW_M)) * 2 * 4 * 1.2))
    nlist = int(params.get("nlist", _default_nlist(n)))
    code = {"ivf": dim * 4, "ivfsq": dim, "ivfpq": int(params.get("m", _pq_m(dim)))}[kind]
    return int(n * (code + 8) + nlist * dim * 4)


def _default_nlist(n: int) -> int:
    # ~4·sqrt(N) lists, but k-means wants ≥ 39 training points per list.
    return int(max(1, min(int(4 * math.sqrt(n)), n // 39)))


def _pq_m(dim: int) -> int:
    """PQ sub-quantizers: the largest divisor of D with at least 4 dimensions each, at most 64 (64 B/vector)."""
    return max(m for m in range(1, min(64, max(1, dim // 4)) + 1) if dim % m == 0)


def choose_index_kind(n: int, dim: int, memory_budget_mb: float | None = None) -> str:
    """The index ``kind="auto"`` builds for a gallery of ``n`` vectors of size ``dim``.

    Exact (``flat``) up to :data:`EXACT_MAX` vectors when it fits the budget;
    above that ``hnsw`` (fast, most memory) up to a million vectors, then
    ``ivf``, ``ivfsq`` (8-bit scalar codes), ``ivfpq`` (64-byte codes): the first
    one that fits ``memory_budget_mb``.
    """
    budget = None if not memory_budget_mb else float(memory_budget_mb) * 2 ** 20
    fits = lambda kind: budget is None or _estimate_bytes(kind, n, dim) <= budget  # noqa: E731
    if n <= EXACT_MAX and fits("flat"):
        return "flat"
    order = ("hnsw", "ivf", "ivfsq", "ivfpq") if n <= _HNSW_MAX else ("ivf", "ivfsq", "ivfpq")
    for kind in order:
        if fits(kind):
            return kind
    logger.warning("no index kind fits %.0f MB for %d × %d; using ivfpq (~%.0f MB)", memory_budget_mb, n, dim,
                   _estimate_bytes("ivfpq", n, dim) / 2 ** 20)
    return "ivfpq"


def _default_params(kind: str, n: int, dim: int) -> dict:
    if kind == "flat":
        return {}
    if kind == "hnsw":
        # fp16 vectors: half the memory of float32 for a recall@10 loss of ~0.001 (100k × 512 clustered: 0.9994
        # vs 1.0 against exact search), so a CPU server holds 100k images in ~125 MB instead of ~225 MB.
        return {"M": _HNSW_M, "efConstruction": 80, "efSearch": 128, "storage": "fp16"}
    nlist = _default_nlist(n)
    params = {"nlist": nlist, "nprobe": int(min(nlist, max(8, nlist // 16)))}
    if kind == "ivfpq":
        # 8-bit codes need ≥ 256 training points per sub-quantizer; small galleries use fewer bits.
        params.update({"m": _pq_m(dim), "nbits": 8 if n >= 256 * 39 else max(1, min(8, int(math.log2(max(2, n // 39)))))})
    return params


def _gpu_count() -> int:
    """GPUs faiss can use: 0 with the ``faiss-cpu`` wheel, or when ``CNCLIP_KD_FAISS_GPU=0`` is set."""
    import faiss

    if os.environ.get("CNCLIP_KD_FAISS_GPU", "").strip().lower() in ("0", "false", "no", "off"):
        return 0
    try:
        return int(getattr(faiss, "get_num_gpus", lambda: 0)())
    except RuntimeError:  # a GPU build without a usable driver
        return 0


def _gpu_kind_ok(index) -> bool:
    """Whether faiss has a GPU version of this index type (flat and IVF do; HNSW does not)."""
    import faiss

    return not isinstance(index, faiss.IndexHNSW)


def _to_gpu(index):
    """A copy of a CPU index on every GPU faiss sees (replicated), or the index itself when there is no GPU,
    the type has no GPU version (HNSW), or the copy fails (logged)."""
    import faiss

    if _gpu_count() <= 0 or not _gpu_kind_ok(index):
        return index
    try:
        options = faiss.GpuMultipleClonerOptions() if hasattr(faiss, "GpuMultipleClonerOptions") else None
        if options is not None:
            # GPU IVF-PQ keeps its distance tables in shared memory; 64-byte codes need fp16 tables to fit.
            # (For IVF-Flat this flag would store fp16 vectors, so it is set for PQ only.)
            ivf = faiss.try_extract_index_ivf(index) if hasattr(faiss, "try_extract_index_ivf") else None
            options.useFloat16 = bool(ivf is not None and isinstance(faiss.downcast_index(ivf), faiss.IndexIVFPQ))
            return faiss.index_cpu_to_all_gpus(index, co=options)
        return faiss.index_cpu_to_all_gpus(index)
    except (RuntimeError, AttributeError, TypeError) as err:
        logger.warning("faiss: cannot move the index to the GPU (%s); using the CPU", err)
        return index


def _to_cpu(index):
    """The CPU version of an index that may live on GPUs (what :func:`faiss.write_index` can save)."""
    import faiss

    if index.__class__.__name__.startswith(("Gpu", "IndexReplicas", "IndexShards")) and hasattr(
            faiss, "index_gpu_to_cpu"):
        return faiss.index_gpu_to_cpu(index)
    return index


def _for_search(index):
    """The index to search with: a GPU copy when faiss sees GPUs (faiss-gpu), else the CPU index itself."""
    return _to_gpu(index)


def build_faiss_index(emb: np.ndarray, kind: str, params: Mapping[str, Any], *, seed: int = 0,
                      use_gpu: bool | None = None, timings: dict | None = None):
    """Build a faiss inner-product index of one kind (what :meth:`GalleryIndex.build` does, without the gallery).

    IVF kinds are trained on a sample (64 points per list, at least 16,384). With
    GPUs (``faiss-gpu``; ``use_gpu=None`` means "when there are any"), ``flat``
    and the IVF kinds are trained and filled on the GPU and copied back: the
    result is always a CPU index, so what a GPU machine saves a CPU server loads.
    HNSW has no GPU version and is always built on the CPU.

    Args:
        emb: ``[N, D]`` float32, C-contiguous.
        kind: One of :data:`INDEX_KINDS`.
        params: The kind's parameters (:func:`_default_params` plus overrides).
        seed: Seeds k-means and the training sample.
        use_gpu: Force (``True``; still CPU when faiss sees no GPU) or forbid (``False``) the GPU.
        timings: When given, filled with ``train_s`` and ``add_s`` (seconds).

    Returns:
        ``(cpu_index, gpu_index_or_None)``: the GPU copy when it was built there, for searching.

    Raises:
        ValueError: Unknown kind.
    """
    import faiss

    if kind not in INDEX_KINDS:
        raise ValueError(f"unknown index kind {kind!r}; choose one of {('auto',) + INDEX_KINDS}")
    n, dim = emb.shape
    p = dict(params)
    on_gpu = kind != "hnsw" and (use_gpu is None or use_gpu) and _gpu_count() > 0
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        if p.get("storage", "float32") == "fp16":
            index = faiss.IndexHNSWSQ(dim, faiss.ScalarQuantizer.QT_fp16, int(p["M"]), faiss.METRIC_INNER_PRODUCT)
        else:
            index = faiss.IndexHNSWFlat(dim, int(p["M"]), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(p["efConstruction"])
    else:
        factory = {"ivf": f"IVF{p['nlist']},Flat", "ivfsq": f"IVF{p['nlist']},SQ8",
                   "ivfpq": f"IVF{p['nlist']},PQ{p.get('m')}x{p.get('nbits')}"}[kind]
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.seed = seed
        if kind == "ivfpq":
            ivfpq = faiss.downcast_index(ivf)
            ivfpq.pq.cp.seed = seed
            ivfpq.do_polysemous_training = False  # only for Hamming pre-filtering, which we do not use; slow
    gpu_index = None
    if on_gpu:
        gpu_index = _to_gpu(index)
        if gpu_index is index:  # the copy failed (logged): build on the CPU
            gpu_index = None
    work = gpu_index if gpu_index is not None else index
    t0 = time.perf_counter()
    if kind not in ("flat", "hnsw"):
        # Train on a sample: k-means needs far fewer points than a large gallery has.
        n_train = min(n, max(int(p["nlist"]) * 64, 256 * 64))
        train_rows = np.sort(np.random.default_rng(seed).choice(n, n_train, replace=False))
        work.train(emb[train_rows])
    t1 = time.perf_counter()
    # Add in slices so a GPU never needs the whole gallery in flight at once (and a CPU sees no difference).
    step = 1 << 18 if gpu_index is not None else max(n, 1)
    for s in range(0, n, step):
        work.add(emb[s:s + step])
    if timings is not None:
        timings.update(train_s=t1 - t0, add_s=time.perf_counter() - t1)
    if gpu_index is not None:
        index = _to_cpu(gpu_index)
    if kind == "hnsw":
        index.hnsw.efSearch = int(p["efSearch"])
    elif kind != "flat":
        nprobe = int(p["nprobe"])
        faiss.extract_index_ivf(index).nprobe = nprobe
        if gpu_index is not None:
            try:
                faiss.GpuParameterSpace().set_index_parameter(gpu_index, "nprobe", nprobe)
            except (AttributeError, RuntimeError) as err:  # copy the finished CPU index (it has nprobe) again
                logger.debug("nprobe on the GPU index: %s", err)
                gpu_index = _to_gpu(index)
    return index, gpu_index


def exact_topk(emb: np.ndarray, queries: np.ndarray, k: int, chunk: int = 256) -> np.ndarray:
    """Row indices of the exact inner-product top k (numpy, in chunks of queries; no copy of ``emb``)."""
    k = min(k, len(emb))
    out = []
    for s in range(0, len(queries), chunk):
        sim = queries[s:s + chunk] @ emb.T
        part = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sim, part, axis=1), axis=1, kind="stable")
        out.append(np.take_along_axis(part, order, axis=1))
    return np.concatenate(out) if out else np.zeros((0, k), np.int64)


class GalleryIndex(IndexEdits):
    """A FAISS inner-product index over a gallery's L2-normalised embeddings (edits: :class:`IndexEdits`).

    Attributes:
        index: The CPU faiss index (what :meth:`save` writes).
        gallery: The gallery; row ``r`` of a search result is ``gallery.meta[r]``.
        embeddings: ``[N, D]`` float32 gallery embeddings (for queries by gallery item and
            evaluation), or ``None`` when loaded from a folder saved without them.
        stats: ``kind``, ``n``, ``dim``, ``bytes``, ``build_s``, ``recall@10`` (against exact
            search on a sample of gallery queries, themselves excluded; 1.0 for ``flat``),
            ``search_ms`` (median time of one single-query search), ``params``, ``faiss_gpu``,
            and what :func:`index_model` adds (``model``, ``eval``).
    """

    def __init__(self, index, gallery: Gallery, stats: dict, embeddings: np.ndarray | None = None, *,
                 search_index=None):
        index = _to_cpu(index)
        if index.ntotal != len(gallery):
            raise ValueError(f"the index holds {index.ntotal} vectors but the gallery has {len(gallery)} images")
        self.index = index
        self.gallery = gallery
        self.stats = dict(stats)
        self.embeddings = embeddings
        self._search_index = search_index if search_index is not None else _for_search(index)
        self._row_of = {int(i): r for r, i in enumerate(gallery.ids) if i >= 0}  # < 0: marked removed (HNSW)
        self._init_edits()

    _gpu_copy = staticmethod(_for_search)  # what an edit re-copies to the GPU(s), when faiss sees any

    def __len__(self) -> int:
        return self._live()

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @classmethod
    def build(cls, embeddings: np.ndarray, gallery: Gallery, *, kind: str = "auto",
              memory_budget_mb: float | None = None, recall_sample: int = 1000, seed: int = 0,
              params: Mapping[str, Any] | None = None, use_gpu: bool | None = None) -> "GalleryIndex":
        """Build an index over the gallery's embeddings.

        Args:
            embeddings: ``[N, D]`` gallery embeddings (L2-normalised; :func:`embed_gallery`).
            gallery: The gallery, same order.
            kind: ``flat`` (exact), ``hnsw``, ``ivf``, ``ivfsq``, ``ivfpq``, or ``auto``
                (:func:`choose_index_kind`).
            memory_budget_mb: Memory the index may take, for ``auto`` (``None``/0: no limit).
            recall_sample: Gallery items used as queries to measure recall@10 of an
                approximate index against exact search.
            seed: Seeds k-means training and the recall sample.
            params: Override the kind's parameters (``M``, ``efConstruction``, ``efSearch``;
                ``nlist``, ``nprobe``, ``m``, ``nbits``).
            use_gpu: Build flat / IVF indexes on the GPU(s) when faiss sees any (``None``, the
                default) or never (``False``); see :func:`build_faiss_index`. The saved index is a
                CPU index either way, and searches go to the GPU whenever faiss sees one.

        Returns:
            The index; its :attr:`stats` describe it.

        Raises:
            ValueError: Unknown kind, or embeddings that do not match the gallery.
        """
        import faiss

        emb = np.ascontiguousarray(embeddings, dtype=np.float32)
        if emb.ndim != 2 or emb.shape[0] != len(gallery):
            raise ValueError(f"embeddings of shape {emb.shape} do not fit a gallery of {len(gallery)} images")
        n, dim = emb.shape
        if kind == "auto":
            kind = choose_index_kind(n, dim, memory_budget_mb)
        if kind not in INDEX_KINDS:
            raise ValueError(f"unknown index kind {kind!r}; choose one of {('auto',) + INDEX_KINDS}")
        p = {**_default_params(kind, n, dim), **dict(params or {})}
        t0 = time.perf_counter()
        index, gpu_index = build_faiss_index(emb, kind, p, seed=seed, use_gpu=use_gpu)
        build_s = time.perf_counter() - t0
        est = _estimate_bytes(kind, n, dim, p)
        size = int(faiss.serialize_index(index).nbytes) if est < 512 * 2 ** 20 else int(est)
        stats = {"kind": kind, "n": int(n), "dim": int(dim), "bytes": size, "build_s": round(build_s, 4),
                 "params": p, "faiss_gpu": _gpu_count() > 0 and kind != "hnsw",
                 "built_on": "gpu" if gpu_index is not None else "cpu",
                 "memory_budget_mb": memory_budget_mb or None}
        obj = cls(index, gallery, stats, emb, search_index=gpu_index)
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(n, min(n, max(1, recall_sample)), replace=False))
        if kind == "flat":
            obj.stats["recall@10"] = 1.0
        else:
            obj.stats["recall@10"] = obj._recall_at(emb[sample], gallery.ids[sample], 10)
        obj.stats["search_ms"] = obj._search_latency(emb[sample[:50]])
        logger.info("index %s: %d × %d, %.1f MB, built in %.2f s, recall@10 %.4f, %.3f ms/query", kind, n, dim,
                    size / 2 ** 20, build_s, obj.stats["recall@10"], obj.stats["search_ms"])
        return obj

    def _recall_at(self, queries: np.ndarray, query_ids: np.ndarray, k: int) -> float:
        """Mean |approximate top k ∩ exact top k| / k, each query's own item excluded from both."""
        if self.embeddings is None:
            raise ValueError("recall needs the gallery embeddings")
        _, approx = self.search(queries, k, exclude_ids=query_ids)
        exact = exact_topk(self.embeddings, queries, k + 1)
        own = np.array([self._row_of[int(i)] for i in query_ids])
        found = []
        for a, e, o in zip(approx, exact, own):
            truth = [r for r in e if r != o][:k]
            if truth:
                found.append(len(set(truth) & set(a[a >= 0].tolist())) / len(truth))
        return float(np.mean(found)) if found else 1.0

    def _search_latency(self, queries: np.ndarray) -> float:
        times = []
        for q in queries[:50]:
            t0 = time.perf_counter()
            self._search_index.search(q[None], 10)
            times.append(time.perf_counter() - t0)
        return round(float(np.median(times)) * 1000, 4) if times else 0.0

    def search(self, queries: np.ndarray, k: int = 10, *, exclude_ids: Sequence[int | None] | np.ndarray | None = None,
               where: Mapping[str, Any] | None = None, ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest gallery items of each query.

        Args:
            queries: ``[Q, D]`` (or ``[D]``) query embeddings; normalised here.
            k: Results per query.
            exclude_ids: One gallery **id** per query to leave out of its results (the
                query itself in leave-one-out evaluation), or ``None`` / ``-1`` entries.
            where: Only items whose metadata pass this filter (:mod:`cnclip_kd.retrieval.filters`),
                e.g. ``{"label": "dress", "price": {"lt": 100}}``.
            ef_search: HNSW candidate list for these queries (default: the index's ``efSearch``).

        Returns:
            ``(scores, rows)``, each ``[Q, k]``, best first: cosine similarities (float32)
            and gallery **row indices** (int64; ``-1`` with score ``-inf`` where the
            gallery has fewer than ``k`` other items).
        """
        q = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        if q.shape[1] != self.dim:
            raise ValueError(f"queries have dimension {q.shape[1]}, the index {self.dim}; same model?")
        q = np.ascontiguousarray(q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12))
        conds = parse_where(where)
        extra = 0 if exclude_ids is None else 1
        with self._rw.read():
            kk = max(1, min(k + extra, len(self)))
            if conds or ef_search or self._removed is not None:
                scores, rows = self._search_filtered(q, kk, conds, ef_search)
            else:
                scores, rows = self._search_index.search(q, kk)
            return self._finish(scores, rows, k, exclude_ids)

    def _finish(self, scores: np.ndarray, rows: np.ndarray, k: int,
                exclude_ids: Sequence[int | None] | np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Leave each query's own item out, cut to ``k``, pad with ``-1`` / ``-inf``."""
        if exclude_ids is not None:
            if len(exclude_ids) != len(rows):
                raise ValueError(f"{len(exclude_ids)} exclude_ids for {len(rows)} queries")
            own = np.array([self._row_of.get(int(i), -2) if i is not None and int(i) != -1 else -2
                            for i in exclude_ids], dtype=np.int64)
            # Stable sort moves each query's own row to the end, keeping the rest in rank order.
            order = np.argsort(rows == own[:, None], axis=1, kind="stable")
            rows = np.take_along_axis(rows, order, axis=1)
            scores = np.take_along_axis(scores, order, axis=1)
            rows = np.where(rows == own[:, None], -1, rows)
        rows, scores = rows[:, :k].astype(np.int64), scores[:, :k].astype(np.float32)
        if rows.shape[1] < k:
            pad = k - rows.shape[1]
            rows = np.pad(rows, ((0, 0), (0, pad)), constant_values=-1)
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        scores[rows < 0] = -np.inf
        return scores, rows

    def results(self, scores: np.ndarray, rows: np.ndarray, *, images: bool = True) -> list[dict]:
        """One query's hits as dicts for display: ``rank``, ``row``, ``score``, the metadata row
        (``id``, ``caption``, ``label``, ``product_id`` …, its ``image`` path as ``path``) and
        ``image`` (the decoded PIL image, when ``images``)."""
        out = []
        for rank, (score, row) in enumerate(zip(np.asarray(scores).reshape(-1), np.asarray(rows).reshape(-1)), 1):
            if row < 0:
                continue
            meta = dict(self.gallery.meta[int(row)])
            hit = {**meta, "rank": rank, "row": int(row), "score": float(score), "path": meta.get("image")}
            hit["image"] = self.gallery.image(int(row)) if images else meta.get("image")
            out.append(hit)
        return out

    def save(self, directory: str | os.PathLike, *, with_embeddings: bool = True,
             extra_files: Mapping[str, str] | None = None) -> Path:
        """Write the index as one folder, atomically (built beside it, then renamed into place).

        Files: ``index.faiss``, ``ids.npy``, ``gallery.json`` (the id → path, caption,
        label, product id table and where the images are), ``stats.json`` and
        ``embeddings.npy``, plus ``extra_files`` (name → text, e.g. the text-retrieval
        predictions of :func:`cnclip_kd.retrieval.evaluate.index_model`), all in the same atomic swap.
        An HNSW index with removals not yet rebuilt keeps them marked (their ids are ``-2 - row``
        in ``ids.npy``), and :meth:`load` leaves them out of every result as before.

        Raises:
            FileExistsError: ``directory`` exists, is not empty and is not a saved index.
        """
        import faiss

        directory = Path(directory)
        if directory.exists() and any(directory.iterdir()) and not (directory / "stats.json").is_file():
            raise FileExistsError(f"{directory} exists and is not a saved index; not replacing it")
        with atomic_folder(directory) as tmp:
            faiss.write_index(self.index, str(tmp / "index.faiss"))
            np.save(tmp / "ids.npy", self.gallery.ids)
            (tmp / "gallery.json").write_text(json.dumps(self.gallery.to_json(relative_to=directory),
                                                         ensure_ascii=False), encoding="utf-8")
            if with_embeddings and self.embeddings is not None:
                np.save(tmp / "embeddings.npy", np.asarray(self.embeddings, dtype=np.float32))
            for fname, text in (extra_files or {}).items():
                (tmp / Path(fname).name).write_text(text, encoding="utf-8")
            (tmp / "stats.json").write_text(json.dumps(self.stats, ensure_ascii=False, indent=1, default=str),
                                            encoding="utf-8")
        logger.info("index saved to %s", directory)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "GalleryIndex":
        """Read a folder written by :meth:`save`.

        Raises:
            FileNotFoundError: Not a saved index (the message names notebook 03).
        """
        import faiss

        directory = Path(directory)
        missing = [f for f in ("index.faiss", "ids.npy", "gallery.json", "stats.json") if not (directory / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{directory}: not a saved index (missing {', '.join(missing)}); build it with "
                                    "notebook 03_build_index.ipynb or `cnclip-kd index`")
        index = faiss.read_index(str(directory / "index.faiss"))
        ids = np.load(directory / "ids.npy")
        gallery = Gallery.from_json(json.loads((directory / "gallery.json").read_text(encoding="utf-8")), ids,
                                    base=directory)
        stats = json.loads((directory / "stats.json").read_text(encoding="utf-8"))
        emb_path = directory / "embeddings.npy"
        # Memory-mapped: a server answering queries by photo never touches it (at 100k × 512 it would be
        # 200 MB of resident memory); queries by gallery item and recall checks page in what they read.
        embeddings = np.load(emb_path, mmap_mode="r") if emb_path.is_file() else None
        return cls(index, gallery, stats, embeddings)
