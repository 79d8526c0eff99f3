"""Route handlers of the live gallery and the search page, added by :func:`cnclip_kd.deploy.serve.create_app`.

* ``POST /items`` (admin key): multipart ``image`` + ``title``, ``label``, ``attributes`` (a JSON
  object) and an optional ``id``; the photo is embedded with the deployed ONNX encoder and written
  (:class:`cnclip_kd.deploy.items.ItemWriter`). Answers ``{"id", "ids"}`` once the write is done.
* ``DELETE /items/{id}`` (admin key): remove one item.
* ``GET /``: the search page (``static/search.html``, one self-contained file: no build step, no CDN),
  which calls ``POST /search`` with the key typed into it.

:func:`parse_where_field` reads the ``where=`` filter of ``/search`` (a JSON object, in the query
string, a form field or the JSON body).
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse

from .service import (
    RETRY_AFTER_S,
    ApiError,
    LoadedIndex,
    SearchService,
    sniff_image_type,
)

__all__ = ["add_item", "parse_where_field", "remove_item", "search_page"]

_MAX_WHERE_CHARS = 4096


def parse_where_field(raw: Any) -> dict | None:
    """The ``where`` filter of a search: a JSON object (given as text, or already parsed), or ``None``.

    Only the JSON is read here; what the filter says is checked by
    :func:`cnclip_kd.retrieval.filters.parse_where` when the search runs.

    Raises:
        ApiError: ``bad_filter`` (not JSON, not an object, too long).
    """
    if raw is None or raw == "":
        return None
    if isinstance(raw, str):
        if len(raw) > _MAX_WHERE_CHARS:
            raise ApiError("bad_filter", f"where is over {_MAX_WHERE_CHARS} characters")
        try:
            raw = json.loads(raw)
        except ValueError:
            raise ApiError("bad_filter", "where must be a JSON object, e.g. {\"label\": \"dress\"}") from None
    if not isinstance(raw, dict):
        raise ApiError("bad_filter", "where must be a JSON object, e.g. {\"label\": \"dress\", "
                                     "\"price\": {\"lt\": 100}}")
    return raw or None


def _current(request: Request) -> LoadedIndex:
    loaded = request.app.state.service.current
    if loaded is None:
        raise ApiError("not_ready", "the index is not loaded yet", headers={"Retry-After": str(RETRY_AFTER_S)})
    return loaded


async def add_item(request: Request):
    """``POST /items``: embed an uploaded photo and add it to the gallery (admin key)."""
    service: SearchService = request.app.state.service
    loaded = _current(request)
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise ApiError("bad_request", "send a multipart form: image (the photo), title, label, attributes (JSON), "
                                      "optionally id")
    form = await request.form(max_files=1, max_fields=10)
    try:
        part = form.get("image")
        if part is None or isinstance(part, str):
            raise ApiError("empty_query", "no photo: send it as the multipart part 'image'")
        data = await part.read()
        fields = {name: form.get(name) for name in ("title", "label", "attributes", "id")
                  if isinstance(form.get(name), str)}
    finally:
        await form.close()
    if not data:
        raise ApiError("empty_query", "the 'image' part is empty")
    if sniff_image_type(data) is None:
        raise ApiError("unsupported_type", "the photo is not a JPEG, PNG, GIF, BMP or WebP image (the bytes decide)")
    return await service.run(service.writer.add, loaded, data, fields)


async def remove_item(item_id: str, request: Request):
    """``DELETE /items/{item_id}``: remove one item (admin key)."""
    if not (item_id.isascii() and item_id.isdigit()) or len(item_id) > 18:
        raise ApiError("not_found", "item ids are non-negative integers")
    service: SearchService = request.app.state.service
    return await service.run(service.writer.remove, _current(request), int(item_id))


@lru_cache(maxsize=1)
def _page() -> str:
    return resources.files("cnclip_kd.deploy").joinpath("static/search.html").read_text(encoding="utf-8")


async def search_page(request: Request) -> HTMLResponse:
    """``GET /``: the search page (no key needed to load it; its queries send the key typed into it)."""
    return HTMLResponse(_page(), headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
                                          "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; "
                                                                     "style-src 'self' 'unsafe-inline'; "
                                                                     "script-src 'self' 'unsafe-inline'"})
