"""Live gallery writes behind ``POST /items`` and ``DELETE /items/{id}``, and the pgvector-backed service.

* :func:`load_live_gallery`: open a :class:`~cnclip_kd.retrieval.pgvector.PgVectorGallery` for a
  :class:`~cnclip_kd.deploy.service.SearchService` with the service's encoders; a gallery that holds
  another encoder's embeddings is refused (the service does not start).
* :class:`ItemWriter`: embed an uploaded photo with the deployed ONNX image encoder (no torch) and
  write it, or remove an item. On a pgvector gallery each write is one transaction: once the
  answer is sent the next query sees it (a removed item never comes back), and a write that
  carries its own ``id`` may be retried without duplicating anything. On a FAISS index the
  write goes to the index in memory (flat / IVF in place, HNSW marks removals) and is then
  written through: the index folder is rewritten atomically (built beside it, renamed into
  place; an HNSW index keeps its removals marked) before the answer is sent, so a restart or a
  reload keeps it. An HNSW removal then starts a rebuild of the graph in a background thread:
  queries and writes go on meanwhile, and the rebuilt index is swapped in and saved. That costs
  a whole-folder write per item: for a gallery that changes often, use pgvector.

The uploaded photo is kept as ``<upload_dir>/<id>.<ext>`` (written to a temporary file, flushed and
renamed before the item is written), so ``/images/{id}`` serves it from an image root like any
gallery image.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..core.images import BadImageError, TooManyPixelsError
from .backends import encoder_fingerprint
from .gallery_edits import save_edited_index
from .service import (
    ApiError,
    LoadedIndex,
    db_unavailable,
    is_db_error,
    sniff_image_type,
)

logger = logging.getLogger(__name__)

__all__ = ["MAX_ID", "ItemWriter", "load_live_gallery", "parse_item_fields", "service_is_live"]

#: Largest item id accepted (ids stay exact as JSON numbers in a browser: below 2**53).
MAX_ID = 2 ** 53 - 1
_EXT = {"jpeg": "jpg", "png": "png", "gif": "gif", "bmp": "bmp", "webp": "webp"}


def load_live_gallery(service: Any) -> LoadedIndex:
    """Open the service's pgvector gallery and pair it with the service's encoders.

    Args:
        service: A :class:`~cnclip_kd.deploy.service.SearchService` with ``live = (url, name)``.

    Raises:
        LookupError: No such gallery.
        ValueError: The gallery holds another encoder's embeddings
            (:class:`~cnclip_kd.retrieval.pgsql.FingerprintMismatchError`), or another dimension.
    """
    from ..retrieval.pgvector import PgVectorGallery

    url, name = service.live
    t0 = time.perf_counter()
    image_fp = encoder_fingerprint(service.encoder) if service.encoder is not None else None
    gallery = PgVectorGallery.open(url, name, fingerprint=image_fp)
    try:
        retriever = service.retriever(gallery)
    except ValueError:
        gallery.close()
        raise
    recorded = gallery.model.get("image_roots") or gallery.info.get("image_roots") or ()
    roots = tuple(Path(r).resolve() for r in recorded if isinstance(r, str))
    roots += service.extra_roots
    loaded = LoadedIndex(retriever, f"pgvector:{name}", f"pgvector-{name}-{gallery.fingerprint[:12]}", time.time(),
                         image_roots=roots)
    logger.info("pgvector gallery %s opened: %d items, %d-d (%.2f s)", name, len(gallery), gallery.dim,
                time.perf_counter() - t0)
    return loaded


def parse_item_fields(fields: Mapping[str, Any]) -> dict:
    """``title``, ``label``, ``attributes`` (a JSON object) and the optional ``id`` of a ``POST /items`` form.

    Raises:
        ApiError: ``bad_request`` naming the field.
    """
    out = {"title": str(fields.get("title") or ""), "label": str(fields.get("label") or ""), "id": None,
           "attributes": {}}
    raw = fields.get("attributes")
    if raw not in (None, ""):
        try:
            attributes = json.loads(raw) if isinstance(raw, str) else raw
        except ValueError:
            raise ApiError("bad_request", "attributes must be a JSON object, e.g. {\"price\": 99}") from None
        if not isinstance(attributes, dict):
            raise ApiError("bad_request", "attributes must be a JSON object, e.g. {\"price\": 99}")
        out["attributes"] = attributes
    raw_id = fields.get("id")
    if raw_id not in (None, ""):
        text = str(raw_id).strip()
        if not (text.isascii() and text.isdigit()) or not 0 <= int(text) <= MAX_ID:
            raise ApiError("bad_request", f"id must be an integer from 0 to {MAX_ID}")
        out["id"] = int(text)
    return out


class ItemWriter:
    """Adds and removes gallery items for a :class:`~cnclip_kd.deploy.service.SearchService` (blocking calls).

    Writes run one at a time; queries keep running meanwhile and see the gallery before or after a write.
    """

    def __init__(self, service: Any):
        """Write through ``service``'s current index with its image encoder."""
        self.service = service
        self._lock = threading.Lock()
        self._last_id = 0

    def _new_id(self) -> int:
        # Microseconds since 1970: unique within this process and increasing, exact in JSON (< 2**53).
        self._last_id = max(self._last_id + 1, time.time_ns() // 1000)
        return self._last_id

    def _keep_photo(self, data: bytes, item_id: int) -> str | None:
        """Write the photo as ``<upload_dir>/<id>.<ext>`` (temp file, fsync, rename); its path, or ``None``."""
        folder = self.service.upload_dir
        if folder is None:
            return None
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{item_id}.{_EXT[sniff_image_type(data)]}"
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".upload-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return str(path)

    def add(self, loaded: LoadedIndex, data: bytes, fields: Mapping[str, Any]) -> dict:
        """Embed one photo and write it with its fields (:func:`parse_item_fields`); returns ``{"id", "ids"}``.

        Raises:
            ApiError: ``no_image_model``, ``bad_image``, ``too_many_pixels``, ``bad_request`` (fields),
                ``encoder_mismatch`` (409), ``db_unavailable`` (503).
        """
        service = self.service
        if service.encoder is None:
            raise ApiError("no_image_model", "this server was started without an image model (--model): "
                                             "it cannot embed new items")
        item = parse_item_fields(fields)
        try:
            embedding = loaded.retriever.embed(data)[None]
        except TooManyPixelsError as err:
            raise ApiError("too_many_pixels", f"{err.reason}") from None
        except BadImageError as err:
            raise ApiError("bad_image", str(err)) from None
        with self._lock:
            item_id = item["id"] if item["id"] is not None else self._new_id()
            folder = self.service.upload_dir
            fresh = folder is None or not (folder / f"{item_id}.{_EXT[sniff_image_type(data)]}").exists()
            image = self._keep_photo(data, item_id)
            try:
                self._write(loaded, embedding, item_id, item, image)
            except ApiError as err:
                if image is not None and fresh and err.code != "db_unavailable":  # refused: nothing points at it
                    Path(image).unlink(missing_ok=True)
                raise
        logger.info("item %d added (label %r)", item_id, item["label"])
        return {"id": item_id, "ids": [item_id], "index_version": loaded.version}

    def _write(self, loaded: LoadedIndex, embedding: np.ndarray, item_id: int, item: dict, image: str | None) -> None:
        index = loaded.retriever.index
        try:
            if service_is_live(self.service):
                from ..retrieval.pgsql import FingerprintMismatchError

                try:
                    index.add(embedding, [item_id], fingerprint=encoder_fingerprint(self.service.encoder),
                              labels=[item["label"]], titles=[item["title"]], images=[image],
                              attributes=[item["attributes"]])
                except FingerprintMismatchError as err:
                    raise ApiError("encoder_mismatch", str(err)) from None
            else:
                meta = {**item["attributes"], "caption": item["title"], "label": item["label"], "image": image}
                index.add(embedding, [item_id], meta=[meta])
                save_edited_index(index, loaded.index_dir, rebuild=False)  # acknowledged only once it is on disk
        except ApiError:
            raise
        except ValueError as err:
            raise ApiError("bad_request", str(err)) from None
        except Exception as err:
            if is_db_error(err):
                raise db_unavailable(err) from None
            raise

    def remove(self, loaded: LoadedIndex, item_id: int) -> dict:
        """Remove one item by id; returns ``{"removed": [id]}``.

        Raises:
            ApiError: ``not_found`` (no such item), ``db_unavailable`` (503).
        """
        index = loaded.retriever.index
        with self._lock:
            try:
                removed = index.remove([item_id])
                if removed and not service_is_live(self.service):
                    # On disk at once (HNSW: marked), so it stays removed after a restart; the graph is
                    # rebuilt without it in the background and saved again.
                    save_edited_index(index, loaded.index_dir, rebuild=False)
                    if index.removed_count:
                        index.rebuild_in_background(on_done=lambda rebuilt: self._save_rebuilt(rebuilt, loaded))
            except Exception as err:
                if is_db_error(err):
                    raise db_unavailable(err) from None
                raise
        if not removed:
            raise ApiError("not_found", f"no item with id {item_id} in the gallery")
        logger.info("item %d removed", item_id)
        return {"removed": [item_id], "index_version": loaded.version}


    def _save_rebuilt(self, index: Any, loaded: LoadedIndex) -> None:
        """After a background rebuild: write the rebuilt index over its folder (between writes)."""
        with self._lock:
            save_edited_index(index, loaded.index_dir, rebuild=False)
        logger.info("index %s rebuilt in the background and saved (%d live items)", loaded.index_dir, len(index))


def service_is_live(service: Any) -> bool:
    """Whether ``service`` serves a pgvector gallery (rather than a FAISS index folder)."""
    return getattr(service, "live", None) is not None
