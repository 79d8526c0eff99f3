"""HTTP search service over the CPU deployment: ``cnclip-kd serve`` (FastAPI + uvicorn).

:func:`create_app` wraps a :class:`cnclip_kd.deploy.service.SearchService` (a saved index folder
plus the exported ONNX encoders of notebook 06) in a FastAPI application:

* ``POST /search``: an image (raw body, or the ``image`` / ``file`` part of a
  multipart form) or a text query (``q=``, as a query parameter, form field or
  JSON ``{"q": ..., "k": ...}``), and ``k`` (1 … ``max_k``). Answers the ids,
  scores and metadata of the Top-k (each with its ``image_url``; the gallery's
  file paths are left out), the timing split (decode, encode, search, total)
  and the index version that answered.
* ``GET /healthz``: 200 once the index and encoders are loaded, 503 before; says
  whether the admin endpoints are enabled (never a key).
* ``GET /metrics``: Prometheus text format (request counts by endpoint and
  outcome, latency histogram, queue depth, index size and version).
* ``GET /images/{id}``: a gallery image by its integer id (read through the
  index's gallery, never from a path in the request): from the gallery's LMDB,
  or a file that resolves under the gallery's image roots and sniffs as an
  image; anything else is 404.
* ``POST /admin/reload``: load an index folder (default: the one being served)
  beside the current one and swap it in atomically; requests in flight finish
  on the old one, and a folder that does not load is refused while the old one
  keeps serving. Only the served folder or a folder under the index root
  (``--index-root``, default the served folder's parent) is loaded (403
  ``forbidden_path``). The CLI maps ``SIGHUP`` to a reload of the served folder.
* ``POST /items`` / ``DELETE /items/{id}`` (admin key): add an uploaded photo (embedded with the
  ONNX image encoder) or remove an item (:mod:`cnclip_kd.deploy.items`, :mod:`cnclip_kd.deploy.web`).
* ``GET /``: the search page (``static/search.html``).

**Filters.** ``/search`` takes ``where``, a JSON object (:mod:`cnclip_kd.retrieval.filters`);
a bad one is 400 ``bad_filter``. **Back-ends.** An index folder (FAISS), or a pgvector gallery
(``db_url`` + ``gallery``): a database that does not answer gives 503 ``db_unavailable`` with
``Retry-After`` and the service recovers once it is back.

**Keys.** The query key (``api_key``) guards ``/search`` and ``/images``; the admin
key (``admin_key``) guards ``/admin/reload`` and every other endpoint that changes
the service (each added with :func:`add_admin_route`; :func:`unguarded_write_routes`
must stay empty) and may also query. Without an admin key those answer 403
``admin_disabled``. Both are compared in constant time and never logged.

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
import json
import logging
import os
import threading
import time
from contextlib import asynccontextmanager
from typing import Any, Sequence

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .service import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_K,
    DEFAULT_MAX_PIXELS,
    DEFAULT_TIMEOUT_S,
    ERROR_CODES,
    MEDIA_TYPES,
    RETRY_AFTER_S,
    AccessKeys,
    ApiError,
    LoadedIndex,
    SearchService,
    db_unavailable,
    is_db_error,
    read_key_file,
    sniff_image_type,
    warn_exposure,
)
from .web import add_item, parse_where_field, remove_item, search_page

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_MAX_PIXELS", "ERROR_CODES", "SERVE_ENV", "AccessKeys", "ApiError", "BackgroundServer",
           "SearchService", "add_admin_route", "app_from_env", "create_app", "parse_where_field", "reload_from_signal",
           "require_admin_key", "require_query_key", "sniff_image_type", "unguarded_write_routes"]


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
        self.index_size.set_function(lambda: _index_size(service))
        self.index_info = Gauge("cnclip_index_info", "The index being served (value 1)", ["version", "index_dir"],
                                registry=self.registry)
        self.reloads = Counter("cnclip_index_reloads", "Index reloads by outcome (ok; refused: did not load; "
                               "forbidden: outside the served folder and the index root)", ["outcome"],
                               registry=self.registry)

    def set_index(self, loaded: LoadedIndex) -> None:
        self.index_info.clear()
        self.index_info.labels(version=loaded.version, index_dir=str(loaded.index_dir)).set(1)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _index_size(service: SearchService) -> float:
    """Items served now (NaN when a live gallery's database does not answer)."""
    try:
        return len(service.current.retriever.index) if service.current else 0
    except Exception as err:
        if is_db_error(err):
            return float("nan")
        raise


def _endpoint(path: str) -> str:
    if path in ("/search", "/healthz", "/metrics", "/admin/reload", "/items", "/"):
        return path
    if path.startswith("/items/"):
        return "/items"
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


# --------------------------------------------------------------------------- request parsing


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


# --------------------------------------------------------------------------- errors and access


async def _api_error(request: Request, err: ApiError) -> JSONResponse:
    request.state.error_code = err.code
    return JSONResponse({"error": {"code": err.code, "message": err.message}}, status_code=err.status,
                        headers=err.headers)


async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "bad_request")
    return await _api_error(request, ApiError(code, str(err.detail), status=err.status_code))


async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
    return await _api_error(request, ApiError("bad_request", "invalid request parameters"))


async def _internal_error(request: Request, err: Exception) -> JSONResponse:
    logger.exception("unexpected error on %s", request.url.path)  # the traceback goes to the log only
    return await _api_error(request, ApiError("internal", "internal error; see the server log"))


async def require_query_key(request: Request) -> None:
    """Dependency of the query endpoints: the query key or the admin key, when a query key is set.

    Raises:
        ApiError: ``unauthorized``.
    """
    request.app.state.keys.check_query(request.headers)


async def require_admin_key(request: Request) -> None:
    """Dependency of every endpoint that changes the service: the admin key.

    Raises:
        ApiError: ``admin_disabled`` (no admin key configured) or ``unauthorized``.
    """
    request.app.state.keys.check_admin(request.headers)


#: Paths whose POST only reads (a query): every other non-GET route needs :func:`require_admin_key`.
QUERY_ROUTES = frozenset({"/search"})


def add_admin_route(app: FastAPI, path: str, endpoint: Any, *, methods: Sequence[str] = ("POST",),
                    summary: str | None = None) -> None:
    """Add an endpoint that changes the service: guarded by :func:`require_admin_key` (403 without an admin key).

    Every write endpoint goes through here; :func:`create_app` checks with :func:`unguarded_write_routes`.
    """
    app.add_api_route(path, endpoint, methods=list(methods), summary=summary,
                      dependencies=[Depends(require_admin_key)])


def unguarded_write_routes(app: FastAPI) -> list[str]:
    """``"METHOD /path"`` of each route that may change the service without :func:`require_admin_key`.

    A route this cannot inspect (a mounted app, an included router) counts as unguarded.
    :func:`create_app` refuses to build an app where the list is not empty, so a write endpoint
    added later without :func:`add_admin_route` cannot open without the admin key.
    """
    found = []
    for route in app.routes:
        methods = getattr(route, "methods", None)
        path = getattr(route, "path", None)
        if methods is None or path is None:
            found.append(f"? {type(route).__name__} {path or ''}".rstrip())
            continue
        methods = set(methods) - {"GET", "HEAD", "OPTIONS"}
        if not methods or path in QUERY_ROUTES:
            continue
        if require_admin_key not in [d.dependency for d in getattr(route, "dependencies", ())]:
            found += [f"{m} {path}" for m in sorted(methods)]
    return found


def _current(request: Request) -> LoadedIndex:
    loaded = request.app.state.service.current
    if loaded is None:
        raise ApiError("not_ready", "the index is not loaded yet", headers={"Retry-After": str(RETRY_AFTER_S)})
    return loaded


# --------------------------------------------------------------------------- route handlers


async def _query_fields(request: Request) -> tuple[Any, Any, bytes, str, Any]:
    """``(q, k, image bytes, content type, where)`` of a search request, from its query string and body."""
    params = request.query_params
    q, k_raw, data, where = params.get("q"), params.get("k"), b"", params.get("where")
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/x-www-form-urlencoded":
        # curl --data-binary @photo.jpg declares this type: the bytes decide whether it is a form.
        data = await request.body()
        if sniff_image_type(data) is None:
            fields = _parse_urlencoded(data)
            data = b""
            q, k_raw, where = fields.get("q", q), fields.get("k", k_raw), fields.get("where", where)
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
            where = form.get("where") if isinstance(form.get("where"), str) else where
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
        where = body.get("where", where)
        if q is not None and not isinstance(q, str):
            raise ApiError("bad_query", "q must be a string")
    else:
        data = await request.body()
    return q, k_raw, data, ctype, parse_where_field(where)


async def search(request: Request):
    """``POST /search``: the Top-k gallery images of an image or a text query."""
    service: SearchService = request.app.state.service
    loaded = _current(request)  # this request finishes on this index, whatever a reload does meanwhile
    q, k_raw, data, ctype, where = await _query_fields(request)
    k = _parse_k(k_raw, request.app.state.max_k, request.app.state.default_k)
    if data and q is not None:
        raise ApiError("ambiguous_query", "send an image or a text query (q), not both")
    if q is not None:
        if not q.strip():
            raise ApiError("empty_query", "empty text query: type a few words, e.g. 白色连衣裙")
        out = await service.run(service.search_text, loaded, q, k, where)
    else:
        if not data:
            raise ApiError("empty_query", "no query: send image bytes (raw body or multipart 'image') or q=text")
        if sniff_image_type(data) is None:
            raise ApiError("unsupported_type", "the body is not a JPEG, PNG, GIF, BMP or WebP image "
                                               f"(declared {ctype or 'no type'}; the bytes decide)")
        out = await service.run(service.search_image, loaded, data, k, where)
    for hit in out["results"]:
        # The server's own file path is not the client's business: the image is served by id.
        hit.pop("image", None)
        hit["image_url"] = f"/images/{hit['id']}"
    return {"k": k, "n": len(out["results"]), "index_version": loaded.version, **({"where": where} if where else {}),
            **out}


async def healthz(request: Request):
    """``GET /healthz``: 200 once the index and encoders are loaded (no key needed)."""
    service: SearchService = request.app.state.service
    loaded = service.current
    if loaded is None:
        raise ApiError("not_ready", "loading", headers={"Retry-After": str(RETRY_AFTER_S)})
    try:
        info = await asyncio.get_running_loop().run_in_executor(None, loaded.info)  # a live gallery counts rows
    except Exception as err:
        if is_db_error(err):
            raise db_unavailable(err) from None
        raise
    return {"status": "ok", **info, "image_model": getattr(service.encoder, "name", None),
            "text_model": getattr(service.text_encoder, "name", None) if service.text_encoder else None,
            "in_flight": service.in_flight, "max_queue": service.max_queue, "pid": os.getpid(),
            "admin_enabled": request.app.state.keys.admin_enabled}


async def prometheus_metrics(request: Request) -> Response:
    """``GET /metrics``: Prometheus text format (no key needed)."""
    body, ctype = request.app.state.metrics.render()
    return Response(body, media_type=ctype)


async def image(image_id: str, request: Request) -> Response:
    """``GET /images/{image_id}``: a gallery image by its integer id."""
    # Only a plain integer is an id: nothing in the request ever becomes a path.
    if not (image_id.isascii() and image_id.isdigit()) or len(image_id) > 19:
        raise ApiError("not_found", "image ids are non-negative integers")
    service: SearchService = request.app.state.service
    loaded = _current(request)
    data, kind = await asyncio.get_running_loop().run_in_executor(None, service.image_bytes, loaded, int(image_id))
    return Response(data, media_type=MEDIA_TYPES[kind],
                    headers={"Cache-Control": "public, max-age=3600", "X-Content-Type-Options": "nosniff"})


async def reload(request: Request):
    """``POST /admin/reload``: load an index folder beside the current one and swap it in."""
    target = request.query_params.get("index_dir")
    if target is None and request.headers.get("content-type", "").startswith("application/json"):
        try:
            body = json.loads(await request.body() or b"{}")
        except (ValueError, UnicodeDecodeError):
            raise ApiError("bad_request", "the body is not valid JSON") from None
        target = body.get("index_dir") if isinstance(body, dict) else None
    service: SearchService = request.app.state.service
    metrics: _Metrics = request.app.state.metrics
    try:
        out = await service.reload(target)
    except ApiError as err:
        metrics.reloads.labels(outcome="forbidden" if err.code == "forbidden_path" else "refused").inc()
        raise
    metrics.reloads.labels(outcome="ok").inc()
    metrics.set_index(service.current)
    return out


def _add_routes(app: FastAPI) -> None:
    query = [Depends(require_query_key)]
    app.add_api_route("/search", search, methods=["POST"], dependencies=query,
                      summary="Top-k gallery images of an image or a text query")
    app.add_api_route("/healthz", healthz, methods=["GET"], summary="200 when the index and encoders are loaded")
    app.add_api_route("/metrics", prometheus_metrics, methods=["GET"], summary="Prometheus metrics")
    app.add_api_route("/images/{image_id}", image, methods=["GET"], dependencies=query,
                      summary="A gallery image by its integer id")
    app.add_api_route("/", search_page, methods=["GET"], summary="The search page (HTML)", include_in_schema=False)
    # Every endpoint that changes the service goes through add_admin_route: the admin key guards it.
    add_admin_route(app, "/admin/reload", reload, summary="Load an index folder beside the current one and swap it in")
    add_admin_route(app, "/items", add_item, summary="Embed an uploaded photo and add it to the gallery")
    add_admin_route(app, "/items/{item_id}", remove_item, methods=("DELETE",), summary="Remove one gallery item")
    unguarded = unguarded_write_routes(app)
    if unguarded:
        raise RuntimeError(f"write endpoints without the admin key: {unguarded}")


# --------------------------------------------------------------------------- the app


@asynccontextmanager
async def _lifespan(app: FastAPI):
    app.state.service.loop = asyncio.get_running_loop()
    yield  # the pools stay: a test client may enter the lifespan again; process exit ends them


def create_app(index_dir: str | os.PathLike | None = None, encoder: Any = None, text_encoder: Any = None, *,
               api_key: str | None = None, admin_key: str | None = None,
               index_root: str | os.PathLike | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               max_pixels: int = DEFAULT_MAX_PIXELS, request_timeout_s: float = DEFAULT_TIMEOUT_S,
               body_timeout_s: float | None = None, max_queue: int | None = None, max_k: int = DEFAULT_MAX_K,
               default_k: int = 10, threads: int | None = None, pool_size: int | None = None,
               fast_decode: bool = True, service: SearchService | None = None, db_url: str | None = None,
               gallery: str | None = None, image_roots: Sequence[str] = (), upload_dir: str | None = None) -> FastAPI:
    """The FastAPI app of the search service (see the module docstring for the endpoints).

    The index and encoders load here (the app is ready when this returns); pass ``service``
    to reuse an already loaded :class:`SearchService` instead.

    Args:
        index_dir: Saved index folder (notebook 03, ``cnclip-kd index``).
        encoder: Image encoder ``.onnx`` (``cnclip-kd export``) or a loaded encoder.
        text_encoder: Text encoder ``.onnx`` (``cnclip-kd export --text-out``), or ``None``.
        api_key: When set, ``/search`` and ``/images`` need it (or the admin key) in ``X-API-Key``
            (or ``Authorization: Bearer``); compared in constant time.
        admin_key: When set, ``/admin/reload`` and every other endpoint that changes the service
            need it; without it they answer 403 ``admin_disabled``. Must differ from ``api_key``.
        index_root: Reloads load the served folder or a folder under this one (default: the
            served folder's parent); anything else is 403 ``forbidden_path``.
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
        service: A loaded service (its own limits and index root apply; of the arguments above only
            the keys, ``max_body_bytes``, ``body_timeout_s``, ``max_k`` and ``default_k`` are used).
        db_url: Serve the pgvector gallery ``gallery`` of this ``postgresql://`` server instead of
            ``index_dir`` (leave that ``None``).
        gallery: The pgvector gallery's name.
        image_roots: Folders a pgvector gallery's images may be served from.
        upload_dir: Where ``POST /items`` keeps uploaded photos (default ``<index_dir>-uploads``).

    Returns:
        A FastAPI application; ``app.state.service`` is its :class:`SearchService`.

    Raises:
        ValueError: Bad limits, the same key for queries and admin, or an index that does not load.
    """
    keys = AccessKeys.of(api_key, admin_key)
    if not 1 <= int(default_k) <= int(max_k):
        raise ValueError(f"default_k must be from 1 to max_k={max_k}")
    if service is None:
        if index_dir is None and db_url is None:
            raise ValueError("give index_dir, or db_url and gallery (or a loaded service)")
        service = SearchService(index_dir, encoder, text_encoder, threads=threads, pool_size=pool_size,
                                max_queue=max_queue, max_pixels=max_pixels, request_timeout_s=request_timeout_s,
                                fast_decode=fast_decode, index_root=index_root, db_url=db_url, gallery=gallery,
                                image_roots=image_roots, upload_dir=upload_dir)
    metrics = _Metrics(service)
    metrics.set_index(service.current)
    app = FastAPI(title="cnclip-kd search", version="1", lifespan=_lifespan,
                  description="Image and text → image search over a saved cnclip-kd index (ONNX on the CPU).")
    app.state.service, app.state.metrics, app.state.keys = service, metrics, keys
    app.state.max_k, app.state.default_k = int(max_k), int(default_k)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _internal_error)
    _add_routes(app)
    app.add_middleware(_LimitsMiddleware, max_body_bytes=max_body_bytes,
                       timeout_s=service.request_timeout_s if body_timeout_s is None else body_timeout_s,
                       metrics=metrics)
    return app


async def reload_from_signal(app: FastAPI) -> None:
    """The SIGHUP action: reload the served folder, logging (not raising) a refusal."""
    try:
        await app.state.service.reload(None)
        app.state.metrics.reloads.labels(outcome="ok").inc()
        app.state.metrics.set_index(app.state.service.current)
    except ApiError as err:
        app.state.metrics.reloads.labels(outcome="refused").inc()
        logger.error("SIGHUP reload refused: %s", err.message)


# Settings of `cnclip-kd serve --workers N`: each uvicorn worker process builds its app from them
# (the keys travel as their files' paths, never as the keys themselves).
SERVE_ENV = "CNCLIP_KD_SERVE_CONFIG"


def app_from_env() -> FastAPI:
    """App factory for uvicorn worker processes (``--workers > 1``): settings from :data:`SERVE_ENV` JSON.

    Besides :func:`create_app`'s arguments the JSON may hold ``api_key_file`` and ``admin_key_file``.
    """
    config = json.loads(os.environ[SERVE_ENV])
    for file_key, key, role in (("api_key_file", "api_key", "API"), ("admin_key_file", "admin_key", "admin")):
        path = config.pop(file_key, None)
        if path:
            config[key] = read_key_file(path, role, check_mode=False)  # the CLI warned about its mode already
    return create_app(**config)


# --------------------------------------------------------------------------- in a notebook


class BackgroundServer:
    """The service on 127.0.0.1 in a background thread of this process: for a notebook, where
    ``cnclip-kd serve`` would block the kernel.

    Example::

        with BackgroundServer("out/index/demo", "out/deploy/image_encoder.onnx",
                              api_key=query_key, admin_key=admin_key) as server:
            status, reply = server.request("/search", body=jpeg_bytes, params={"k": 10}, key=query_key)
            status, reply = server.request("/admin/reload", key=admin_key)

    Attributes:
        app: The FastAPI application (:func:`create_app`).
        url: ``http://127.0.0.1:<port>`` once started.
    """

    def __init__(self, index_dir: str | os.PathLike | None, encoder: Any, text_encoder: Any = None, *,
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

        warn_exposure(self._host, self.app.state.keys)
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
                key: str | None = None, timeout_s: float = 60.0) -> tuple[int, Any]:
        """One HTTP request to the running service: POST with ``body``, or on ``/search`` and ``/admin/``; else GET.

        Args:
            path: ``/search``, ``/healthz``, ``/admin/reload`` …
            body: Raw request body (an image).
            params: Query parameters (``k``, ``q``, ``index_dir`` …).
            key: Sent as ``X-API-Key``: the query key for ``/search`` and ``/images``, the admin key
                for ``/admin/…``.
            timeout_s: Client-side limit.

        Returns:
            ``(status, parsed JSON body)`` — error answers too (their ``error.code``), never an exception.
        """
        import urllib.error
        import urllib.parse
        import urllib.request

        if self.url is None:
            raise RuntimeError("start() the server first")
        url = self.url + path + ("?" + urllib.parse.urlencode(params) if params else "")
        method = "POST" if body is not None or path.startswith(("/search", "/admin/")) else "GET"
        headers = {"Content-Type": "application/octet-stream", **({"X-API-Key": key} if key else {})}
        req = urllib.request.Request(url, data=body if body is not None else (b"" if method == "POST" else None),
                                     method=method, headers=headers)
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
