"""The search service behind ``cnclip-kd serve``, without the HTTP layer: its errors, keys and folders.

* :data:`ERROR_CODES` and :class:`ApiError`: the stable error codes every answer uses.
* :class:`AccessKeys`: the query key (``/search``, ``/images``) and the admin key (``/admin/reload`` and
  every other endpoint that changes the service), compared in constant time; without an admin key
  the admin endpoints answer 403 ``admin_disabled``.
* :func:`confine_reload_target`: a reload loads only the served folder or a folder under the
  index root (403 ``forbidden_path`` otherwise, symlinks and ``..`` resolved first).
* :func:`gallery_image_roots`: the folders a file gallery's images may be served from;
  :meth:`SearchService.image_bytes` serves a file only under them (or from the gallery's LMDB),
  and only when its bytes are an image type the service accepts (:func:`sniff_image_type`).
* :class:`SearchService`: encoders, the current index (hot-swapped by :meth:`SearchService.reload`),
  the bounded query pool.

No torch: this module and its imports load none (the ONNX encoders and the index only).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from ..core.images import BadImageError, TooManyPixelsError
from ..core.tokenizer import NoTextTowerError, QueryError
from ..retrieval.filters import FilterError
from .backends import make_encoder, make_text_encoder
from .runtime import Retriever

logger = logging.getLogger(__name__)

__all__ = [
    "ERROR_CODES", "MEDIA_TYPES", "AccessKeys", "ApiError", "LoadedIndex", "SearchService", "confine_reload_target",
    "db_unavailable", "gallery_image_roots", "is_db_error", "is_loopback", "read_key_file", "sniff_image_type",
    "warn_exposure",
]

#: Stable error codes → HTTP status.
ERROR_CODES = {
    "bad_request": 400,
    "empty_query": 400,
    "bad_query": 400,
    "ambiguous_query": 400,
    "bad_k": 400,
    "bad_image": 400,
    "bad_filter": 400,  # a where= filter that cannot run (the message names the key, operator or value)
    "no_text_tower": 400,
    "no_image_model": 400,
    "unauthorized": 401,
    "admin_disabled": 403,  # the server was started without an admin key: admin endpoints are off
    "forbidden_path": 403,  # a reload target outside the served folder and the index root
    "not_found": 404,
    "method_not_allowed": 405,
    "timeout": 408,  # the body did not arrive in time; a slow query answers 504 with the same code
    "too_large": 413,
    "too_many_pixels": 413,
    "unsupported_type": 415,
    "encoder_mismatch": 409,  # a write whose encoder is not the one the gallery holds embeddings of
    "bad_index": 422,
    "internal": 500,
    "busy": 503,
    "not_ready": 503,
    "db_unavailable": 503,  # the gallery's database does not answer; retry after Retry-After
}

DEFAULT_MAX_BODY_BYTES = 20 * 1024 * 1024
#: A 50 Mpx RGB image decodes to 150 MB: enough for any phone photo, small enough for a server.
DEFAULT_MAX_PIXELS = 50_000_000
DEFAULT_MAX_K = 100
DEFAULT_TIMEOUT_S = 30.0
RETRY_AFTER_S = 1

# Magic bytes of the formats served (PIL decodes them all); anything else is refused unread.
_MAGIC = ((b"\xff\xd8\xff", "jpeg"), (b"\x89PNG\r\n\x1a\n", "png"), (b"GIF87a", "gif"), (b"GIF89a", "gif"),
          (b"BM", "bmp"))
#: Media type of each image kind :func:`sniff_image_type` recognises.
MEDIA_TYPES = {"jpeg": "image/jpeg", "png": "image/png", "gif": "image/gif", "bmp": "image/bmp",
               "webp": "image/webp"}
_SNIFF_BYTES = 16


class ApiError(Exception):
    """An error answered as ``{"error": {"code", "message"}}`` with the code's status (:data:`ERROR_CODES`)."""

    def __init__(self, code: str, message: str, *, status: int | None = None, headers: dict | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status or ERROR_CODES.get(code, 400)
        self.headers = headers or {}


def sniff_image_type(data: bytes) -> str | None:
    """The image format of ``data`` from its first bytes (``jpeg``, ``png``, ``gif``, ``bmp``, ``webp``) or ``None``.

    The declared content type and file name are never trusted: only these bytes decide.
    """
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    for magic, kind in _MAGIC:
        if data.startswith(magic):
            return kind
    return None


# --------------------------------------------------------------------------- keys and exposure


def _presented_key(headers: Mapping[str, str]) -> bytes:
    given = headers.get("x-api-key")
    if given is None:
        auth = headers.get("authorization", "")
        given = auth[7:] if auth.lower().startswith("bearer ") else ""
    return given.encode("utf-8")


@dataclass(frozen=True)
class AccessKeys:
    """The service's two keys, sent in ``X-API-Key`` (or ``Authorization: Bearer``), compared in constant time.

    Attributes:
        query: Needed by ``/search`` and ``/images`` (``None``: queries are open).
        admin: Needed by ``/admin/reload`` and every endpoint that changes the service (``None``:
            those answer 403 ``admin_disabled`` whatever is sent). It may also query; the query
            key never opens an admin endpoint.
    """

    query: bytes | None = field(default=None, repr=False)
    admin: bytes | None = field(default=None, repr=False)

    @classmethod
    def of(cls, api_key: str | None = None, admin_key: str | None = None) -> "AccessKeys":
        """The keys from their text (empty or ``None``: not set).

        Raises:
            ValueError: Both keys are the same (a query key would then open the admin endpoints).
        """
        query = api_key.encode("utf-8") if api_key else None
        admin = admin_key.encode("utf-8") if admin_key else None
        if query is not None and admin is not None and hmac.compare_digest(query, admin):
            raise ValueError("the admin key must differ from the API (query) key")
        return cls(query, admin)

    @property
    def admin_enabled(self) -> bool:
        """Whether the admin endpoints answer at all (an admin key is set)."""
        return self.admin is not None

    def check_query(self, headers: Mapping[str, str]) -> None:
        """Let a query through with the query key or the admin key (or when no query key is set).

        Raises:
            ApiError: ``unauthorized``.
        """
        if self.query is None:
            return
        given = _presented_key(headers)
        ok_query = hmac.compare_digest(given, self.query)
        ok_admin = self.admin is not None and hmac.compare_digest(given, self.admin)
        if not (ok_query or ok_admin):
            raise ApiError("unauthorized", "missing or wrong API key (header X-API-Key)")

    def check_admin(self, headers: Mapping[str, str]) -> None:
        """Let an admin request through with the admin key only.

        Raises:
            ApiError: ``admin_disabled`` (no admin key configured) or ``unauthorized``.
        """
        if self.admin is None:
            raise ApiError("admin_disabled", "admin endpoints are off: start the server with --admin-key-file "
                                             "to enable them (SIGHUP still reloads the served folder)")
        if not hmac.compare_digest(_presented_key(headers), self.admin):
            raise ApiError("unauthorized", "missing or wrong admin key (header X-API-Key)")


def read_key_file(path: str | os.PathLike, role: str = "API", *, check_mode: bool = True) -> str:
    """The key held in a file (surrounding whitespace stripped); warns when other users may read the file.

    Args:
        path: The key file.
        role: ``API`` or ``admin``, for the messages.
        check_mode: Warn when the file is readable by group or others (the key itself is never logged).

    Raises:
        ValueError: The file holds no key.
        OSError: The file cannot be read.
    """
    with open(path, encoding="utf-8") as fh:
        key = fh.read().strip()
        mode = os.fstat(fh.fileno()).st_mode
    if not key:
        raise ValueError(f"{path}: empty {role} key file")
    if check_mode and os.name == "posix" and mode & (stat.S_IRGRP | stat.S_IROTH):
        logger.warning("%s: the %s key file is readable by other users (mode %s); chmod 600 it",
                       path, role, oct(stat.S_IMODE(mode)))
    return key


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the service on this machine (127.0.0.0/8, ``::1``, ``localhost``)."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any address


def warn_exposure(host: str, keys: AccessKeys) -> list[str]:
    """Log what binding ``host`` with ``keys`` exposes; returns the warnings logged.

    A non-loopback address without a query key lets anyone who reaches it search the gallery and
    download its images: a warning says so. Without an admin key the admin endpoints stay off
    whatever the address (logged at INFO).
    """
    warnings = []
    if not is_loopback(host) and keys.query is None:
        warnings.append(f"binding {host}, which is not a loopback address, without a query key (--api-key-file): "
                        "anyone who can reach it can search the gallery and download its images")
    for message in warnings:
        logger.warning("%s", message)
    if keys.admin_enabled:
        logger.info("admin endpoints on (admin key set)%s", "" if is_loopback(host) else f", reachable on {host}")
    else:
        logger.info("admin endpoints off (no --admin-key-file): /admin/reload answers 403 admin_disabled; "
                    "SIGHUP still reloads the served folder")
    return warnings


# --------------------------------------------------------------------------- folders


def confine_reload_target(target: Any, *, served: Path, index_root: Path) -> Path:
    """``target`` resolved (symlinks and ``..`` included), if it is ``served`` or a folder under ``index_root``.

    A relative target is relative to the server's working directory, as given on the command line.

    Raises:
        ApiError: ``bad_request`` (not a path) or ``forbidden_path`` (anywhere else).
    """
    if not isinstance(target, str) or not target.strip():
        raise ApiError("bad_request", "index_dir must be a non-empty string (a folder path)")
    try:
        resolved = Path(target).resolve()  # a missing folder resolves as far as it exists
    except (OSError, ValueError, RuntimeError):  # a NUL byte, a symlink loop
        raise ApiError("bad_request", "index_dir is not a usable path") from None
    if resolved == served or resolved.is_relative_to(index_root):
        return resolved
    logger.warning("reload of %r refused: it resolves to %s, outside %s (the index root) and not %s (served)",
                   target, resolved, index_root, served)
    raise ApiError("forbidden_path", "index_dir must be the served folder or a folder under the index root "
                                     "(--index-root); nothing was loaded")


def _recorded_roots(index_dir: Path) -> list | None:
    """The ``image_roots`` a file gallery's ``gallery.json`` records, or ``None``."""
    try:
        recorded = json.loads((index_dir / "gallery.json").read_text(encoding="utf-8")).get("image_roots")
    except (OSError, ValueError, AttributeError):
        return None
    return recorded if isinstance(recorded, list) else None


def gallery_image_roots(gallery: Any, recorded: Sequence[str] | None = None,
                        base: str | os.PathLike | None = None) -> tuple[Path, ...]:
    """The folders a gallery's image files may be served from (resolved; empty: no file is served).

    The roots the gallery records (a ``Gallery.image_roots`` attribute, else ``recorded``, relative
    ones relative to ``base``, the index folder). A gallery that records none falls back to the
    common folder of its image paths, with a warning; when that is the filesystem root, no file is
    served. A gallery read from an LMDB serves from the LMDB, and files only from the roots it records
    (rows added later by ``cnclip-kd gallery add``).
    """
    if gallery.lmdb_dir is not None:
        return tuple(Path(base or ".", r).resolve() for r in getattr(gallery, "image_roots", ()))
    recorded = getattr(gallery, "image_roots", None) or recorded
    if recorded:
        return tuple(Path(base or ".", r).resolve() for r in recorded)
    parents = {os.path.dirname(os.path.abspath(m["image"])) for m in gallery.meta if m.get("image")}
    if not parents:
        return ()
    common = Path(os.path.commonpath(sorted({str(Path(p).resolve()) for p in parents})))
    if common == Path(common.anchor):
        logger.warning("the gallery records no image roots and its images share no folder but %s: no image file "
                       "is served (record image_roots in gallery.json)", common)
        return ()
    logger.warning("the gallery records no image roots: serving image files under their common folder %s", common)
    return (common,)


def _within(path: Path, roots: Iterable[Path]) -> bool:
    return any(path.is_relative_to(root) for root in roots)


# --------------------------------------------------------------------------- the database


def is_db_error(err: BaseException) -> bool:
    """Whether ``err`` says the gallery's database cannot be reached (connection refused, lost, pool timed out)."""
    import sys

    psycopg = sys.modules.get("psycopg")  # loaded only by a pgvector-backed service
    if psycopg is not None and isinstance(err, (psycopg.OperationalError, psycopg.InterfaceError)):
        return True
    pgserver = sys.modules.get("cnclip_kd.retrieval.pgserver")  # its connect() wraps a refused connection
    if pgserver is not None and isinstance(err, pgserver.EmbeddedPostgresError):
        return True
    return isinstance(err, TimeoutError) and "database connection" in str(err)


def db_unavailable(err: BaseException) -> ApiError:
    """The 503 ``db_unavailable`` answer (with ``Retry-After``) for a database error; the error is logged."""
    logger.warning("the gallery's database does not answer: %s: %s", type(err).__name__, str(err).strip()[:300])
    return ApiError("db_unavailable", "the gallery's database is not answering; retry shortly",
                    headers={"Retry-After": str(RETRY_AFTER_S)})


# --------------------------------------------------------------------------- the service


def index_version(index_dir: Path) -> str:
    """A short content hash of the index folder's small files (changes whenever notebook 03 rewrites it)."""
    h = hashlib.sha256()
    for name in ("stats.json", "ids.npy", "gallery.json"):
        h.update((index_dir / name).read_bytes())
    h.update(str((index_dir / "index.faiss").stat().st_size).encode())
    return h.hexdigest()[:12]


@dataclass
class LoadedIndex:
    """One loaded index with its retriever; replaced as a whole by a reload (requests keep their own).

    Attributes:
        image_roots: Folders its image files may be served from (:func:`gallery_image_roots`).
        refused: Image ids already refused (each refusal is logged once).
    """

    retriever: Retriever
    index_dir: Path
    version: str
    loaded_at: float
    image_roots: tuple = ()
    # The gallery's LMDB reader keeps one transaction: reads from several threads go one at a time.
    image_lock: threading.Lock = field(default_factory=threading.Lock)
    refused: set = field(default_factory=set)
    refused_lock: threading.Lock = field(default_factory=threading.Lock)

    def info(self) -> dict:
        """The fields ``/healthz`` and a reload answer report."""
        return {"index_dir": str(self.index_dir), "index_version": self.version,
                "index_size": len(self.retriever.index), "loaded_at": self.loaded_at}

    def refuse_image(self, image_id: int, reason: str) -> ApiError:
        """The 404 for an image that is not served, its reason logged the first time only."""
        with self.refused_lock:
            first = image_id not in self.refused
            self.refused.add(image_id)
        if first:
            logger.warning("image id %d not served: %s", image_id, reason)
        return ApiError("not_found", f"image id {image_id} cannot be served")


class SearchService:
    """The state behind the HTTP app: encoders, the current index, the thread pool and the queue bound.

    Args:
        index_dir: Saved index folder (:meth:`cnclip_kd.retrieval.index.GalleryIndex.save`).
        encoder: Image encoder: an ``.onnx`` file, an already loaded encoder, or ``None`` (no image queries).
        text_encoder: Text encoder: an ``.onnx`` text model, a loaded encoder, or ``None`` (text
            queries answer ``no_text_tower``; the index's PyTorch model is never loaded behind the scenes).
        threads: Intra-op threads of each ONNX session.
        pool_size: Queries computed at once (default: CPU cores / ``threads``).
        max_queue: Queries admitted at once (running + waiting); more get 503 ``busy`` (default 4 × pool).
        max_pixels: Larger query images are refused (413 ``too_many_pixels``).
        request_timeout_s: A query that has not finished by then gets 504 ``timeout``.
        fast_decode: Decode JPEG queries at reduced size (:func:`cnclip_kd.deploy.backends.load_query_image`).
        index_root: Reloads may load ``index_dir`` or a folder under this one (default: ``index_dir``'s parent).
        db_url: Serve a live pgvector gallery instead of an index folder: the ``postgresql://`` URL
            (``index_dir`` is then ``None``); ``gallery`` names it.
        gallery: The pgvector gallery's name (with ``db_url``).
        image_roots: Folders the images of a pgvector gallery may be served from (besides ``upload_dir``).
        upload_dir: Where ``POST /items`` keeps the uploaded photos (default: ``<index_dir>-uploads``; a
            pgvector gallery without one keeps no photo, so ``/images`` answers 404 for its new items).
    """

    def __init__(self, index_dir: str | os.PathLike | None, encoder: Any = None, text_encoder: Any = None, *,
                 threads: int | None = None, pool_size: int | None = None, max_queue: int | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS, request_timeout_s: float = DEFAULT_TIMEOUT_S,
                 fast_decode: bool = True, index_root: str | os.PathLike | None = None,
                 db_url: str | None = None, gallery: str | None = None,
                 image_roots: Sequence[str | os.PathLike] = (), upload_dir: str | os.PathLike | None = None):
        cores = os.cpu_count() or 1
        self.threads = int(threads) if threads else None
        self.pool_size = int(pool_size) if pool_size else max(1, cores // (self.threads or cores))
        self.max_queue = int(max_queue) if max_queue else 4 * self.pool_size
        if self.max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {self.max_queue}")
        self.max_pixels = int(max_pixels)
        self.request_timeout_s = float(request_timeout_s)
        self.fast_decode = bool(fast_decode)
        if (index_dir is None) == (db_url is None):
            raise ValueError("give an index folder or a database URL with a gallery name, not both")
        if db_url is not None and not gallery:
            raise ValueError("a pgvector gallery needs its name (--gallery)")
        self.live = (str(db_url), str(gallery)) if db_url is not None else None
        # The configured folder: a reload may always load it again (a pgvector gallery: the database URL).
        self.index_dir = Path(index_dir).resolve() if index_dir is not None else None
        root = index_root or (self.index_dir.parent if self.index_dir is not None else None)
        self.index_root = Path(root).resolve() if root else None
        # Beside the index folder, not in it: a FAISS write rewrites that folder as a whole (atomically).
        served = Path(self.index_dir).resolve() if self.index_dir is not None else None
        default_uploads = served.with_name(served.name + "-uploads") if served is not None else None
        self.upload_dir = Path(upload_dir).resolve() if upload_dir else default_uploads
        self.extra_roots = tuple(Path(r).resolve() for r in image_roots)
        # Paths are opened once; a reload pairs the same sessions with the new index.
        self.encoder = make_encoder(encoder, threads=threads) if isinstance(encoder, (str, os.PathLike)) else encoder
        self.text_encoder = (make_text_encoder(text_encoder, threads=threads)
                             if isinstance(text_encoder, (str, os.PathLike)) else text_encoder)
        if self.encoder is None and self.text_encoder is None:
            raise ValueError("give an image encoder (.onnx) and/or a text encoder (.onnx text model)")
        self._pool = ThreadPoolExecutor(self.pool_size, thread_name_prefix="cnclip-query")
        self._reload_pool = ThreadPoolExecutor(1, thread_name_prefix="cnclip-reload")
        self._slots = threading.BoundedSemaphore(self.max_queue)
        self._in_flight = 0
        self._count_lock = threading.Lock()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.current: LoadedIndex | None = None
        self.current = self.load(self.index_dir)
        from .items import ItemWriter  # items.py builds on this module

        self.writer = ItemWriter(self)

    # ------------------------------------------------------------------ loading

    def load(self, index_dir: str | os.PathLike) -> LoadedIndex:
        """Load an index folder with the service's encoders and check that it answers (blocking).

        Raises:
            FileNotFoundError: Not a saved index.
            ValueError: The index was built with another model (dimension or fingerprint).
        """
        from ..retrieval.index import GalleryIndex

        if self.live is not None:
            from .items import load_live_gallery  # items.py builds on this module

            return load_live_gallery(self)
        index_dir = Path(index_dir).resolve()
        t0 = time.perf_counter()
        index = GalleryIndex.load(index_dir)
        if len(index) == 0:
            raise ValueError(f"{index_dir}: the index is empty")
        retriever = self.retriever(index)
        # A folder whose files load but do not search (wrong dimension, corrupt FAISS data) fails here, not later.
        scores, rows = index.search(np.ones((1, index.dim), np.float32), 1)
        if rows.shape != (1, 1) or rows[0, 0] < 0:
            raise ValueError(f"{index_dir}: a test search found nothing")
        gallery = index.gallery
        recorded = _recorded_roots(index_dir) if gallery.lmdb_dir is None else None
        roots = gallery_image_roots(gallery, recorded, base=index_dir) + self.extra_roots
        loaded = LoadedIndex(retriever, index_dir, index_version(index_dir), time.time(), image_roots=roots)
        logger.info("index %s loaded: %d images, version %s (%.2f s)", index_dir, len(index), loaded.version,
                    time.perf_counter() - t0)
        return loaded

    def retriever(self, index: Any) -> Retriever:
        """A :class:`Retriever` pairing ``index`` with the service's encoders (checks that they fit it).

        Raises:
            ValueError: The index was built with another model (dimension or fingerprint).
        """
        return Retriever(index, self.encoder, text_encoder=self.text_encoder, fast_decode=self.fast_decode,
                         max_pixels=self.max_pixels, threads=self.threads)

    async def reload(self, index_dir: str | os.PathLike | None = None) -> dict:
        """Load ``index_dir`` (default: the folder being served) beside the current index, then swap.

        Requests that already hold the old index finish on it. Reloads run one at a time, in
        order (on a one-thread pool), so two of them never race to swap. A folder given must be
        the configured one or lie under :attr:`index_root` (after symlinks and ``..``).

        Raises:
            ApiError: ``forbidden_path`` (outside the allowed folders: nothing is read) or
                ``bad_index`` (the folder does not load); the old index keeps serving either way.
        """
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._reload_pool, self._reload, index_dir)

    def _reload(self, index_dir: str | os.PathLike | None) -> dict:
        old = self.current
        if self.live is not None and index_dir is not None:
            raise ApiError("bad_request", "this service serves a pgvector gallery: a reload reopens it and takes "
                                          "no index_dir")
        if index_dir is None:
            target = old.index_dir
        else:
            target = confine_reload_target(os.fspath(index_dir) if isinstance(index_dir, os.PathLike) else index_dir,
                                           served=self.index_dir, index_root=self.index_root)
        try:
            new = self.load(target)
        except Exception as err:  # FileNotFoundError, ValueError (JSONDecodeError), OSError, KeyError, a DB error
            logger.error("reload of %s refused, still serving %s: %s", target, old.index_dir, err)
            raise ApiError("bad_index", f"{target}: not loaded, still serving version {old.version} "
                                        f"({type(err).__name__}: {err})") from None
        self.current = new  # one reference assignment: atomic for every reader
        logger.info("index swapped: %s (%s) -> %s (%s)", old.index_dir, old.version, new.index_dir, new.version)
        return {"previous": old.info(), **new.info()}

    # ------------------------------------------------------------------ queries

    @property
    def in_flight(self) -> int:
        """Queries admitted to the pool now (running + waiting)."""
        return self._in_flight

    def _release(self, _future: Any) -> None:
        with self._count_lock:
            self._in_flight -= 1
        self._slots.release()

    async def run(self, fn: Callable, *args: Any) -> Any:
        """Run ``fn(*args)`` in the query pool, within the queue bound and the time limit.

        Raises:
            ApiError: ``busy`` (queue full, with ``Retry-After``) or ``timeout``.
        """
        if not self._slots.acquire(blocking=False):
            raise ApiError("busy", f"{self.max_queue} queries in flight; retry shortly",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        with self._count_lock:
            self._in_flight += 1
        try:
            future = self._pool.submit(fn, *args)
        except BaseException:
            self._release(None)
            raise
        # The slot is freed when the work ends, not when the client stops waiting: the bound stays true.
        future.add_done_callback(self._release)
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), self.request_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError("timeout", f"the query took longer than {self.request_timeout_s:g} s",
                           status=504) from None

    def search_image(self, loaded: LoadedIndex, data: bytes, k: int, where: Mapping | None = None) -> dict:
        """Decode, check and search one image query, among the items ``where`` keeps (blocking; runs in the pool)."""
        if self.encoder is None:
            raise ApiError("no_image_model", "this server was started without an image model (--model)")
        try:
            # The pixel limit is read from the header, before decoding.
            result = _searched(lambda: loaded.retriever.search(data, k, where=where))
        except TooManyPixelsError as err:
            raise ApiError("too_many_pixels", f"{err.reason}") from None
        except BadImageError as err:
            raise ApiError("bad_image", str(err)) from None
        return result.to_dict()

    def search_text(self, loaded: LoadedIndex, text: str, k: int, where: Mapping | None = None) -> dict:
        """Check, tokenise and search one text query, among the items ``where`` keeps (blocking; runs in the pool)."""
        if self.text_encoder is None:
            raise ApiError("no_text_tower", "this server has no text model: start it with --text-model "
                                            "TEXT.onnx (cnclip-kd export --text-out), or query with an image")
        try:
            return _searched(lambda: loaded.retriever.search_text(text, k, where=where)).to_dict()
        except NoTextTowerError as err:
            raise ApiError("no_text_tower", str(err)) from None
        except QueryError as err:
            raise ApiError("bad_query", str(err)) from None

    def image_bytes(self, loaded: LoadedIndex, image_id: int) -> tuple[bytes, str]:
        """The stored image of a gallery id and its kind (blocking).

        Served only from the gallery's LMDB or from a file that resolves under the gallery's
        image roots, and only when the bytes sniff as an image type the service accepts.

        Raises:
            ApiError: ``not_found`` for anything else (the reason logged once per id).
        """
        gallery = loaded.retriever.index.gallery
        try:
            row = gallery.row_of(image_id)
            recorded_image = gallery.meta[row].get("image")
        except KeyError:
            raise ApiError("not_found", f"no image with id {image_id} in the index") from None
        except Exception as err:
            if is_db_error(err):
                raise db_unavailable(err) from None
            raise
        uploaded = (self.upload_dir is not None and isinstance(recorded_image, str)
                    and Path(recorded_image).parent == self.upload_dir)  # POST /items keeps its photo there
        if gallery.lmdb_dir is not None and not recorded_image:
            try:
                with loaded.image_lock:
                    data = gallery.image_bytes(row)
            except (KeyError, FileNotFoundError, OSError) as err:
                raise loaded.refuse_image(image_id, f"not in the gallery's LMDB: {err}") from None
        else:
            roots = (self.upload_dir,) if uploaded else loaded.image_roots
            data = self._gallery_file(loaded, image_id, recorded_image, roots)
        kind = sniff_image_type(data[:_SNIFF_BYTES])
        if kind is None:
            raise loaded.refuse_image(image_id, "its bytes are not a JPEG, PNG, GIF, BMP or WebP image")
        return data, kind

    @staticmethod
    def _gallery_file(loaded: LoadedIndex, image_id: int, recorded: str | None, roots: tuple) -> bytes:
        if not recorded:
            raise loaded.refuse_image(image_id, "the gallery records no file for it")
        try:
            path = Path(recorded).resolve(strict=True)  # symlinks and '..' resolved before the check
        except (OSError, RuntimeError, ValueError) as err:
            raise loaded.refuse_image(image_id, f"{recorded}: {type(err).__name__}") from None
        if not _within(path, roots):
            names = ", ".join(map(str, roots)) or "none"
            raise loaded.refuse_image(image_id, f"{recorded} resolves to {path}, outside the gallery's image "
                                                f"roots ({names})")
        try:
            with open(path, "rb") as fh:
                if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                    raise loaded.refuse_image(image_id, f"{path} is not a regular file")
                head = fh.read(_SNIFF_BYTES)
                if sniff_image_type(head) is None:  # refused before the rest is read
                    raise loaded.refuse_image(image_id, f"{path}: its bytes are not a JPEG, PNG, GIF, BMP or "
                                                        "WebP image")
                return head + fh.read()
        except OSError as err:
            raise loaded.refuse_image(image_id, f"{path}: {type(err).__name__}") from None

    def close(self) -> None:
        """Stop the thread pools (waiting for running queries) and close a live gallery's connections."""
        self._pool.shutdown(wait=True)
        self._reload_pool.shutdown(wait=True)
        index = self.current.retriever.index if self.current is not None else None
        if self.live is not None and index is not None:
            index.close()


def _searched(search: Callable[[], Any]) -> Any:
    """Run one search: a bad filter is 400 ``bad_filter``, a database that does not answer 503 ``db_unavailable``.

    An item removed between the search and the read of its metadata (``KeyError``) makes the search run
    once more, so the answer holds the state before or after the removal.
    """
    for attempt in (0, 1):
        try:
            return search()
        except FilterError as err:
            raise ApiError("bad_filter", str(err)) from None
        except KeyError:
            if attempt:
                raise
        except Exception as err:
            if is_db_error(err):
                raise db_unavailable(err) from None
            raise
