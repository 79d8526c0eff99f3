"""HTTP search service over the CPU deployment: ``cnclip-kd serve`` (FastAPI + uvicorn).

:func:`create_app` wraps a :class:`cnclip_kd.deploy.runtime.Retriever` (a saved index folder
plus the exported ONNX encoders of notebook 06) in a FastAPI application:

* ``POST /search``: an image (raw body, or the ``image`` / ``file`` part of a
  multipart form) or a text query (``q=``, as a query parameter, form field or
  JSON ``{"q": ..., "k": ...}``), and ``k`` (1 … ``max_k``). Answers the ids,
  scores and metadata of the Top-k (each with its ``image_url``; the gallery's
  file paths are left out), the timing split (decode, encode, search, total)
  and the index version that answered.
* ``GET /healthz``: 200 once the index and encoders are loaded, 503 before.
* ``GET /metrics``: Prometheus text format (request counts by endpoint and
  outcome, latency histogram, queue depth, index size and version).
* ``GET /images/{id}``: a gallery image by its integer id (read through the
  index's gallery, never from a path in the request).
* ``POST /admin/reload``: load an index folder (default: the one being served)
  beside the current one and swap it in atomically; requests in flight finish
  on the old one, and a folder that does not load is refused while the old one
  keeps serving. The CLI maps ``SIGHUP`` to the same reload.

**Limits.** The request body is capped (``Content-Length`` checked before any
byte is read, and bytes counted while they stream in: 413 ``too_large``); the
body must arrive within ``request_timeout_s`` (a slow client gets 408); image
type is sniffed from the bytes, never the declared type (415
``unsupported_type``); the pixel count is read from the header before decoding
(413 ``too_many_pixels``); decoding and encoding run in a bounded thread pool
(never on the event loop) behind a bounded queue: when ``max_queue`` queries
are in flight the answer is 503 ``busy`` with ``Retry-After``, and a query
slower than ``request_timeout_s`` gets 504 ``timeout``.

**Errors** are JSON ``{"error": {"code": "<stable code>", "message": "..."}}``
(:data:`ERROR_CODES`), never a traceback.

**No torch.** With ONNX encoders this module and its imports never load torch:
a worker holds the ONNX sessions and the index. A text query on a server
started without a text model answers ``no_text_tower`` rather than loading the
index's PyTorch model.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..core.images import BadImageError, TooManyPixelsError
from ..core.tokenizer import NoTextTowerError, QueryError
from .backends import make_encoder, make_text_encoder
from .runtime import Retriever

logger = logging.getLogger(__name__)

__all__ = ["ERROR_CODES", "ApiError", "BackgroundServer", "SearchService", "create_app", "sniff_image_type"]

#: Stable error codes → HTTP status.
ERROR_CODES = {
    "bad_request": 400,
    "empty_query": 400,
    "bad_query": 400,
    "ambiguous_query": 400,
    "bad_k": 400,
    "bad_image": 400,
    "no_text_tower": 400,
    "no_image_model": 400,
    "unauthorized": 401,
    "not_found": 404,
    "method_not_allowed": 405,
    "timeout": 408,  # the body did not arrive in time; a slow query answers 504 with the same code
    "too_large": 413,
    "too_many_pixels": 413,
    "unsupported_type": 415,
    "bad_index": 422,
    "internal": 500,
    "busy": 503,
    "not_ready": 503,
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
_MEDIA_TYPES = {"jpeg": "image/jpeg", "png": "image/png", "gif": "image/gif", "bmp": "image/bmp",
                "webp": "image/webp"}


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


def _index_version(index_dir: Path) -> str:
    """A short content hash of the index folder's small files (changes whenever notebook 03 rewrites it)."""
    h = hashlib.sha256()
    for name in ("stats.json", "ids.npy", "gallery.json"):
        h.update((index_dir / name).read_bytes())
    h.update(str((index_dir / "index.faiss").stat().st_size).encode())
    return h.hexdigest()[:12]


@dataclass
class _Loaded:
    """One loaded index with its retriever; replaced as a whole by a reload (requests keep their own)."""

    retriever: Retriever
    index_dir: Path
    version: str
    loaded_at: float
    # The gallery's LMDB reader keeps one transaction: reads from several threads go one at a time.
    image_lock: threading.Lock = field(default_factory=threading.Lock)

    def info(self) -> dict:
        return {"index_dir": str(self.index_dir), "index_version": self.version,
                "index_size": len(self.retriever.index), "loaded_at": self.loaded_at}


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
    """

    def __init__(self, index_dir: str | os.PathLike, encoder: Any = None, text_encoder: Any = None, *,
                 threads: int | None = None, pool_size: int | None = None, max_queue: int | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS, request_timeout_s: float = DEFAULT_TIMEOUT_S,
                 fast_decode: bool = True):
        cores = os.cpu_count() or 1
        self.threads = int(threads) if threads else None
        self.pool_size = int(pool_size) if pool_size else max(1, cores // (self.threads or cores))
        self.max_queue = int(max_queue) if max_queue else 4 * self.pool_size
        if self.max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {self.max_queue}")
        self.max_pixels = int(max_pixels)
        self.request_timeout_s = float(request_timeout_s)
        self.fast_decode = bool(fast_decode)
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
        self.current: _Loaded | None = None
        self.current = self.load(index_dir)

    # ------------------------------------------------------------------ loading

    def load(self, index_dir: str | os.PathLike) -> _Loaded:
        """Load an index folder with the service's encoders and check that it answers (blocking).

        Raises:
            FileNotFoundError: Not a saved index.
            ValueError: The index was built with another model (dimension or fingerprint).
        """
        from ..retrieval.index import GalleryIndex

        index_dir = Path(index_dir).resolve()
        t0 = time.perf_counter()
        index = GalleryIndex.load(index_dir)
        if len(index) == 0:
            raise ValueError(f"{index_dir}: the index is empty")
        retriever = Retriever(index, self.encoder, text_encoder=self.text_encoder, fast_decode=self.fast_decode,
                              max_pixels=self.max_pixels, threads=self.threads)
        # A folder whose files load but do not search (wrong dimension, corrupt FAISS data) fails here, not later.
        scores, rows = index.search(np.ones((1, index.dim), np.float32), 1)
        if rows.shape != (1, 1) or rows[0, 0] < 0:
            raise ValueError(f"{index_dir}: a test search found nothing")
        loaded = _Loaded(retriever, index_dir, _index_version(index_dir), time.time())
        logger.info("index %s loaded: %d images, version %s (%.2f s)", index_dir, len(index), loaded.version,
                    time.perf_counter() - t0)
        return loaded

    async def reload(self, index_dir: str | os.PathLike | None = None) -> dict:
        """Load ``index_dir`` (default: the folder being served) beside the current index, then swap.

        Requests that already hold the old index finish on it. Reloads run one at a time, in
        order (on a one-thread pool), so two of them never race to swap.

        Raises:
            ApiError: ``bad_index`` when the folder does not load; the old index keeps serving.
        """
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._reload_pool, self._reload, index_dir)

    def _reload(self, index_dir: str | os.PathLike | None) -> dict:
        old = self.current
        target = Path(index_dir) if index_dir else old.index_dir
        try:
            new = self.load(target)
        except (FileNotFoundError, ValueError, OSError, RuntimeError, KeyError) as err:  # JSONDecodeError: a ValueError
            logger.error("reload of %s refused, still serving %s: %s", target, old.index_dir, err)
            raise ApiError("bad_index", f"{target}: not loaded, still serving version {old.version} "
                                        f"({type(err).__name__}: {err})") from None
        self.current = new  # one reference assignment: atomic for every reader
        logger.info("index swapped: %s (%s) -> %s (%s)", old.index_dir, old.version, new.index_dir, new.version)
        return {"previous": old.info(), **new.info()}

    # ------------------------------------------------------------------ queries

    @property
    def in_flight(self) -> int:
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

    def search_image(self, loaded: _Loaded, data: bytes, k: int) -> dict:
        """Decode, check and search one image query (blocking; runs in the pool)."""
        if self.encoder is None:
            raise ApiError("no_image_model", "this server was started without an image model (--model)")
        try:
            result = loaded.retriever.search(data, k)  # the pixel limit is read from the header, before decoding
        except TooManyPixelsError as err:
            raise ApiError("too_many_pixels", f"{err.reason}") from None
        except BadImageError as err:
            raise ApiError("bad_image", str(err)) from None
        return result.to_dict()

    def search_text(self, loaded: _Loaded, text: str, k: int) -> dict:
        """Check, tokenise and search one text query (blocking; runs in the pool)."""
        if self.text_encoder is None:
            raise ApiError("no_text_tower", "this server has no text model: start it with --text-model "
                                            "TEXT.onnx (cnclip-kd export --text-out), or query with an image")
        try:
            return loaded.retriever.search_text(text, k).to_dict()
        except NoTextTowerError as err:
            raise ApiError("no_text_tower", str(err)) from None
        except QueryError as err:
            raise ApiError("bad_query", str(err)) from None

    def image_bytes(self, loaded: _Loaded, image_id: int) -> bytes:
        """The stored image of a gallery id (blocking)."""
        gallery = loaded.retriever.index.gallery
        try:
            row = gallery.row_of(image_id)
        except KeyError:
            raise ApiError("not_found", f"no image with id {image_id} in the index") from None
        with loaded.image_lock:
            try:
                return gallery.image_bytes(row)
            except (KeyError, FileNotFoundError, OSError) as err:
                logger.warning("image id %d: %s", image_id, err)
                raise ApiError("not_found", f"image id {image_id} is indexed but its file is missing") from None

    def close(self) -> None:
        """Stop the thread pools (waiting for running queries)."""
        self._pool.shutdown(wait=True)
        self._reload_pool.shutdown(wait=True)


# --------------------------------------------------------------------------- metrics


class _Metrics:
    """Prometheus metrics of one app, in their own registry (several apps in one process do not collide)."""

    def __init__(self, service: SearchService):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("cnclip_requests", "HTTP requests by endpoint and outcome (ok or the error code)",
                                ["endpoint", "outcome"], registry=self.registry)
        self.latency = Histogram("cnclip_request_seconds", "Request latency, body read to response, by endpoint",
                                 ["endpoint"], registry=self.registry,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.in_flight = Gauge("cnclip_queries_in_flight", "Queries admitted to the pool (running + waiting)",
                               registry=self.registry)
        self.in_flight.set_function(lambda: service.in_flight)
        self.queue_limit = Gauge("cnclip_queue_limit", "Queries admitted at once before 503 busy",
                                 registry=self.registry)
        self.queue_limit.set(service.max_queue)
        self.index_size = Gauge("cnclip_index_size", "Images in the index being served", registry=self.registry)
        self.index_size.set_function(lambda: len(service.current.retriever.index) if service.current else 0)
        self.index_info = Gauge("cnclip_index_info", "The index being served (value 1)", ["version", "index_dir"],
                                registry=self.registry)
        self.reloads = Counter("cnclip_index_reloads", "Index reloads by outcome", ["outcome"],
                               registry=self.registry)

    def set_index(self, loaded: _Loaded) -> None:
        self.index_info.clear()
        self.index_info.labels(version=loaded.version, index_dir=str(loaded.index_dir)).set(1)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _endpoint(path: str) -> str:
    if path in ("/search", "/healthz", "/metrics", "/admin/reload"):
        return path
    return "/images" if path.startswith("/images/") else "other"


# --------------------------------------------------------------------------- ASGI middleware


def _error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}, ensure_ascii=False).encode("utf-8")


class _LimitsMiddleware:
    """Body size and time limits on the raw ASGI stream, plus the request metrics.

    ``Content-Length`` over the limit is answered 413 before any body byte is read; a body
    without one (chunked) is counted as it arrives and refused as soon as it passes the
    limit; a body still arriving after ``timeout_s`` is refused with 408.
    """

    def __init__(self, app, *, max_body_bytes: int, timeout_s: float, metrics: _Metrics):
        self.app = app
        self.max_body_bytes = int(max_body_bytes)
        self.timeout_s = float(timeout_s)
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        endpoint = _endpoint(scope.get("path", ""))
        state = scope.setdefault("state", {})
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            length = self._content_length(scope)
            if length is not None and length > self.max_body_bytes:
                state["error_code"] = "too_large"
                await self._refuse(send_wrapper, 413, "too_large",
                                   f"body of {length:,} bytes; the limit is {self.max_body_bytes:,}")
                return
            await self.app(scope, self._limited(receive), send_wrapper)
        finally:
            outcome = state.get("error_code") or ("ok" if status["code"] < 400 else f"http_{status['code']}")
            self.metrics.requests.labels(endpoint=endpoint, outcome=outcome).inc()
            self.metrics.latency.labels(endpoint=endpoint).observe(time.perf_counter() - start)

    @staticmethod
    def _content_length(scope) -> int | None:
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    return int(value)
                except ValueError:
                    return None
        return None

    def _limited(self, receive):
        deadline = time.monotonic() + self.timeout_s
        seen = 0
        done = False

        async def limited_receive():
            nonlocal seen, done
            if done:  # after the body only a disconnect can come: no limit on waiting for it
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise ApiError("timeout", f"the request body did not arrive within {self.timeout_s:g} s") from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    raise ApiError("too_large", f"body over the limit of {self.max_body_bytes:,} bytes")
                done = not message.get("more_body", False)
            return message

        return limited_receive

    @staticmethod
    async def _refuse(send, status: int, code: str, message: str) -> None:
        body = _error_body(code, message)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


# --------------------------------------------------------------------------- the app


def _parse_k(raw: Any, max_k: int, default: int) -> int:
    if raw is None or raw == "":
        return default
    try:
        k = int(str(raw).strip())
    except ValueError:
        raise ApiError("bad_k", f"k must be an integer from 1 to {max_k}, got {str(raw)[:40]!r}") from None
    if not 1 <= k <= max_k:
        raise ApiError("bad_k", f"k must be from 1 to {max_k}, got {k}")
    return k


def _parse_urlencoded(data: bytes) -> dict:
    from urllib.parse import parse_qsl

    try:
        return dict(parse_qsl(data.decode("utf-8"), keep_blank_values=True, max_num_fields=10))
    except (UnicodeDecodeError, ValueError):
        raise ApiError("unsupported_type", "the body is neither an image nor a form with q= and k=") from None


def create_app(index_dir: str | os.PathLike | None = None, encoder: Any = None, text_encoder: Any = None, *,
               api_key: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               max_pixels: int = DEFAULT_MAX_PIXELS, request_timeout_s: float = DEFAULT_TIMEOUT_S,
               body_timeout_s: float | None = None, max_queue: int | None = None, max_k: int = DEFAULT_MAX_K,
               default_k: int = 10,
               threads: int | None = None, pool_size: int | None = None, fast_decode: bool = True,
               service: SearchService | None = None):
    """The FastAPI app of the search service (see the module docstring for the endpoints).

    The index and encoders load here (the app is ready when this returns); pass ``service``
    to reuse an already loaded :class:`SearchService` instead.

    Args:
        index_dir: Saved index folder (notebook 03, ``cnclip-kd index``).
        encoder: Image encoder ``.onnx`` (``cnclip-kd export``) or a loaded encoder.
        text_encoder: Text encoder ``.onnx`` (``cnclip-kd export --text-out``), or ``None``.
        api_key: When set, ``/search``, ``/images`` and ``/admin`` need it in ``X-API-Key`` (or
            ``Authorization: Bearer``); compared in constant time.
        max_body_bytes: Larger request bodies get 413 ``too_large``.
        max_pixels: Larger query images get 413 ``too_many_pixels``.
        request_timeout_s: Limit on computing a query (504 ``timeout``).
        body_timeout_s: Limit on receiving the request body (408 ``timeout``; a slow or stalled
            client); default ``request_timeout_s``.
        max_queue: Queries admitted at once; more get 503 ``busy`` with ``Retry-After``.
        max_k: Largest ``k``.
        default_k: ``k`` when a request gives none.
        threads: Intra-op threads per ONNX session.
        pool_size: Queries computed at once.
        fast_decode: DCT-scaled JPEG decoding.
        service: A loaded service (its own limits apply; the arguments above except
            ``api_key``, ``max_body_bytes`` and ``max_k`` are ignored).

    Returns:
        A FastAPI application; ``app.state.service`` is its :class:`SearchService`.
    """
    if not 1 <= int(default_k) <= int(max_k):
        raise ValueError(f"default_k must be from 1 to max_k={max_k}")
    if service is None:
        if index_dir is None:
            raise ValueError("give index_dir (or a loaded service)")
        service = SearchService(index_dir, encoder, text_encoder, threads=threads, pool_size=pool_size,
                                max_queue=max_queue, max_pixels=max_pixels, request_timeout_s=request_timeout_s,
                                fast_decode=fast_decode)
    metrics = _Metrics(service)
    metrics.set_index(service.current)
    key = api_key.encode("utf-8") if api_key else None

    @asynccontextmanager
    async def lifespan(app):
        service.loop = asyncio.get_running_loop()
        yield  # the pools stay: a test client may enter the lifespan again; process exit ends them

    app = FastAPI(title="cnclip-kd search", version="1", lifespan=lifespan,
                  description="Image and text → image search over a saved cnclip-kd index (ONNX on the CPU).")
    app.state.service = service
    app.state.metrics = metrics

    def error_response(request: Request, err: ApiError) -> JSONResponse:
        request.state.error_code = err.code
        return JSONResponse({"error": {"code": err.code, "message": err.message}}, status_code=err.status,
                            headers=err.headers)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError):
        return error_response(request, err)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "bad_request")
        return error_response(request, ApiError(code, str(err.detail), status=err.status_code))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError):
        return error_response(request, ApiError("bad_request", "invalid request parameters"))

    @app.exception_handler(Exception)
    async def _internal(request: Request, err: Exception):
        logger.exception("unexpected error on %s", request.url.path)  # the traceback goes to the log only
        return error_response(request, ApiError("internal", "internal error; see the server log"))

    def check_key(request: Request) -> None:
        if key is None:
            return
        given = request.headers.get("x-api-key")
        if given is None:
            auth = request.headers.get("authorization", "")
            given = auth[7:] if auth.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode("utf-8"), key):
            raise ApiError("unauthorized", "missing or wrong API key (header X-API-Key)")

    @app.post("/search", summary="Top-k gallery images of an image or a text query")
    async def search(request: Request):
        check_key(request)
        loaded = service.current  # this request finishes on this index, whatever a reload does meanwhile
        if loaded is None:
            raise ApiError("not_ready", "the index is not loaded yet", headers={"Retry-After": str(RETRY_AFTER_S)})
        params = request.query_params
        q, k_raw, data = params.get("q"), params.get("k"), b""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "application/x-www-form-urlencoded":
            # curl --data-binary @photo.jpg declares this type: the bytes decide whether it is a form.
            data = await request.body()
            if sniff_image_type(data) is None:
                fields = _parse_urlencoded(data)
                data = b""
                q, k_raw = fields.get("q", q), fields.get("k", k_raw)
        elif ctype == "multipart/form-data":
            form = await request.form(max_files=2, max_fields=10)
            try:
                for name in ("image", "file"):
                    part = form.get(name)
                    if part is not None and not isinstance(part, str):
                        data = await part.read()
                        break
                q = form.get("q") if isinstance(form.get("q"), str) else q
                k_raw = form.get("k") if isinstance(form.get("k"), str) else k_raw
            finally:
                await form.close()
        elif ctype == "application/json":
            try:
                body = json.loads(await request.body() or b"{}")
            except (ValueError, UnicodeDecodeError):
                raise ApiError("bad_request", "the body is not valid JSON (send an image as a raw body or "
                                              "multipart file, or JSON {\"q\": \"...\", \"k\": 10})") from None
            if not isinstance(body, dict):
                raise ApiError("bad_request", "the JSON body must be an object like "
                                              "{\"q\": \"白色连衣裙\", \"k\": 10}")
            q = body.get("q", q)
            k_raw = body.get("k", k_raw)
            if q is not None and not isinstance(q, str):
                raise ApiError("bad_query", "q must be a string")
        else:
            data = await request.body()
        k = _parse_k(k_raw, max_k, default_k)
        if data and q is not None:
            raise ApiError("ambiguous_query", "send an image or a text query (q), not both")
        if q is not None:
            if not q.strip():
                raise ApiError("empty_query", "empty text query: type a few words, e.g. 白色连衣裙")
            out = await service.run(service.search_text, loaded, q, k)
        else:
            if not data:
                raise ApiError("empty_query", "no query: send image bytes (raw body or multipart 'image') or q=text")
            kind = sniff_image_type(data)
            if kind is None:
                raise ApiError("unsupported_type", "the body is not a JPEG, PNG, GIF, BMP or WebP image "
                                                   f"(declared {ctype or 'no type'}; the bytes decide)")
            out = await service.run(service.search_image, loaded, data, k)
        for hit in out["results"]:
            # The server's own file path is not the client's business: the image is served by id.
            hit.pop("image", None)
            hit["image_url"] = f"/images/{hit['id']}"
        return {"k": k, "n": len(out["results"]), "index_version": loaded.version, **out}

    @app.get("/healthz", summary="200 when the index and encoders are loaded")
    async def healthz():
        loaded = service.current
        if loaded is None:
            raise ApiError("not_ready", "loading", headers={"Retry-After": str(RETRY_AFTER_S)})
        return {"status": "ok", **loaded.info(), "image_model": getattr(service.encoder, "name", None),
                "text_model": getattr(service.text_encoder, "name", None) if service.text_encoder else None,
                "in_flight": service.in_flight, "max_queue": service.max_queue, "pid": os.getpid()}

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus_metrics():
        body, ctype = metrics.render()
        return Response(body, media_type=ctype)

    @app.get("/images/{image_id}", summary="A gallery image by its integer id")
    async def image(image_id: str, request: Request):
        check_key(request)
        # Only a plain integer is an id: nothing in the request ever becomes a path.
        if not (image_id.isascii() and image_id.isdigit()) or len(image_id) > 19:
            raise ApiError("not_found", "image ids are non-negative integers")
        loaded = service.current
        if loaded is None:
            raise ApiError("not_ready", "the index is not loaded yet", headers={"Retry-After": str(RETRY_AFTER_S)})
        data = await asyncio.get_running_loop().run_in_executor(None, service.image_bytes, loaded, int(image_id))
        kind = sniff_image_type(data)
        return Response(data, media_type=_MEDIA_TYPES.get(kind, "application/octet-stream"),
                        headers={"Cache-Control": "public, max-age=3600", "X-Content-Type-Options": "nosniff"})

    @app.post("/admin/reload", summary="Load an index folder beside the current one and swap it in")
    async def reload(request: Request):
        check_key(request)
        target = request.query_params.get("index_dir")
        if target is None and request.headers.get("content-type", "").startswith("application/json"):
            try:
                body = json.loads(await request.body() or b"{}")
            except (ValueError, UnicodeDecodeError):
                raise ApiError("bad_request", "the body is not valid JSON") from None
            target = body.get("index_dir") if isinstance(body, dict) else None
        try:
            out = await service.reload(target)
        except ApiError:
            metrics.reloads.labels(outcome="refused").inc()
            raise
        metrics.reloads.labels(outcome="ok").inc()
        metrics.set_index(service.current)
        return out

    app.add_middleware(_LimitsMiddleware, max_body_bytes=max_body_bytes,
                       timeout_s=service.request_timeout_s if body_timeout_s is None else body_timeout_s,
                       metrics=metrics)
    return app


async def reload_from_signal(app) -> None:
    """The SIGHUP action: reload the served folder, logging (not raising) a refusal."""
    try:
        await app.state.service.reload(None)
        app.state.metrics.reloads.labels(outcome="ok").inc()
        app.state.metrics.set_index(app.state.service.current)
    except ApiError as err:
        app.state.metrics.reloads.labels(outcome="refused").inc()
        logger.error("SIGHUP reload refused: %s", err.message)


# Settings of `cnclip-kd serve --workers N`: each uvicorn worker process builds its app from them.
SERVE_ENV = "CNCLIP_KD_SERVE_CONFIG"


class BackgroundServer:
    """The service on 127.0.0.1 in a background thread of this process: for a notebook, where
    ``cnclip-kd serve`` would block the kernel.

    Example::

        with BackgroundServer("out/index/demo", "out/deploy/image_encoder.onnx") as server:
            status, reply = server.request("/search", body=jpeg_bytes, params={"k": 10})

    Attributes:
        app: The FastAPI application (:func:`create_app`).
        url: ``http://127.0.0.1:<port>`` once started.
    """

    def __init__(self, index_dir: str | os.PathLike, encoder: Any, text_encoder: Any = None, *,
                 host: str = "127.0.0.1", port: int = 0, **settings: Any):
        """Load the service (as :func:`create_app` with ``settings``); ``port=0`` takes a free port."""
        self.app = create_app(index_dir, encoder, text_encoder, **settings)
        self._host, self._port = host, int(port)
        self._server = None
        self._thread: threading.Thread | None = None
        self.url: str | None = None

    def start(self, timeout_s: float = 60.0) -> "BackgroundServer":
        """Start serving; returns once the port is open.

        Raises:
            RuntimeError: The server did not start within ``timeout_s``.
        """
        import uvicorn

        config = uvicorn.Config(self.app, host=self._host, port=self._port, log_level="warning",
                                timeout_graceful_shutdown=5)
        self._server = uvicorn.Server(config)
        # uvicorn installs signal handlers only in the main thread, so the kernel's stay as they are.
        self._thread = threading.Thread(target=self._server.run, name="cnclip-kd-serve", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the search service did not start on {self._host}:{self._port}")
            time.sleep(0.05)
        port = self._server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{self._host}:{port}"
        logger.info("search service at %s (docs at %s/docs)", self.url, self.url)
        return self

    def request(self, path: str, *, body: bytes | None = None, params: dict | None = None,
                timeout_s: float = 60.0) -> tuple[int, Any]:
        """One HTTP request to the running service (POST with ``body`` or ``params`` on ``/search``, else GET).

        Returns:
            ``(status, parsed JSON body)`` — error answers too (their ``error.code``), never an exception.
        """
        import urllib.error
        import urllib.parse
        import urllib.request

        if self.url is None:
            raise RuntimeError("start() the server first")
        url = self.url + path + ("?" + urllib.parse.urlencode(params) if params else "")
        method = "POST" if body is not None or path.startswith("/search") else "GET"
        req = urllib.request.Request(url, data=body if body is not None else (b"" if method == "POST" else None),
                                     method=method, headers={"Content-Type": "application/octet-stream"})
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"null")

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop serving (requests in flight finish first) and wait for the thread."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout_s)
        self.url = None

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def app_from_env():
    """App factory for uvicorn worker processes (``--workers > 1``): settings from :data:`SERVE_ENV` JSON."""
    config = json.loads(os.environ[SERVE_ENV])
    return create_app(**config)
