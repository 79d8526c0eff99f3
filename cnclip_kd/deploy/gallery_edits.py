"""Add photos to, and remove ids from, a built gallery with the deployed encoder: ``cnclip-kd gallery add|remove``.

The gallery is a FAISS index folder (``cnclip-kd index``; written back atomically after the edit)
or a PostgreSQL + pgvector gallery (``cnclip-kd index --backend pgvector``; each edit is one
transaction). New photos are encoded by the exported ONNX image encoder (no torch), which must be
the model the gallery was built with: an encoder whose fingerprint differs is refused before any
photo is read. Photos come as a category folder or a manifest, read as ``cnclip-kd prepare`` reads
them; a file that cannot be read is skipped and reported, the others are added.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..core.images import BadImageError, load_image
from ..data.dataset import DataError
from ..data.prepare import Skipped, read_source
from ..retrieval.gallery import image_roots_of
from ..retrieval.index import GalleryIndex
from ..retrieval.pgserver import EmbeddedPostgres, connect
from ..retrieval.pgsql import FingerprintMismatchError, gallery_table
from ..retrieval.pgvector import PgVectorGallery
from .backends import make_encoder, to_pixels

logger = logging.getLogger(__name__)

__all__ = ["GalleryEdit", "add_photos", "check_encoder", "encode_photos", "remove_items"]

_INDEX_FILES = {"index.faiss", "ids.npy", "gallery.json", "stats.json", "embeddings.npy"}


@dataclass
class GalleryEdit:
    """What an add or a remove did.

    Attributes:
        target: The index folder, or ``pgvector:<name>``.
        ids: The ids added (add) or asked to be removed (remove).
        changed: Items written or removed.
        skipped: ``(source, reason)`` of each photo left out.
        total: Items in the gallery afterwards.
    """

    target: str
    ids: list[int] = field(default_factory=list)
    changed: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    total: int = 0

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return {"target": self.target, "ids": self.ids, "changed": self.changed,
                "skipped": [{"source": s, "reason": r} for s, r in self.skipped], "total": self.total}


def check_encoder(encoder_fp: str | None, gallery_fp: str | None, where: str) -> None:
    """Refuse an encoder whose fingerprint is not the gallery's.

    Raises:
        FingerprintMismatchError: One line naming both fingerprints (a ``ValueError``).
    """
    if not encoder_fp or encoder_fp != gallery_fp:
        raise FingerprintMismatchError(
            f"{where} holds embeddings of encoder {gallery_fp or 'unrecorded'}, but the given encoder is "
            f"{encoder_fp or 'unrecorded (export it again with cnclip-kd export)'}; export the model the gallery "
            "was built with, or build a new gallery")


def encode_photos(encoder, source: str | os.PathLike, *, next_id: int, batch_size: int = 32,
                  caption_template: str = "{label}") -> tuple[np.ndarray, np.ndarray, list[dict], list[Skipped]]:
    """Read and encode a photo folder or manifest.

    Args:
        encoder: An image encoder with ``encode(pixels)`` and ``resolution`` (:class:`OnnxEncoder`).
        source: A category folder, a manifest ``.csv`` / ``.jsonl``, or a folder holding one.
        next_id: The first id given to a photo the manifest gives none.
        batch_size: Photos per encoder call.
        caption_template: Caption of folder input (``{label}`` = sub-folder).

    Returns:
        ``(embeddings [n, D], ids [n], metadata rows, skipped)``.

    Raises:
        cnclip_kd.data.dataset.DataError: Unreadable input, MUGE data, or no usable photo.
    """
    skipped: list[Skipped] = []
    records = read_source(source, caption_template=caption_template, skipped=skipped)
    if any(r.data is not None for r in records):
        raise DataError(f"{source}: MUGE data holds images inside its TSV files; give photo files instead")
    pixels, ids, meta = [], [], []
    for rec in records:
        try:
            image = load_image(rec.source)
        except BadImageError as err:
            skipped.append(Skipped(str(rec.source), err.reason))
            continue
        pixels.append(to_pixels(image, encoder.resolution))
        if rec.image_id is None:
            image_id, next_id = next_id, next_id + 1
        else:
            image_id = int(rec.image_id)
        ids.append(image_id)
        meta.append({"id": image_id, "image": str(Path(rec.source).resolve()), "caption": rec.texts[0],
                     "label": rec.label, "product_id": rec.product_id, "split": None, "source": str(rec.source)})
    for s in skipped:
        logger.warning("gallery add: skipped %s: %s", s.source, s.reason)
    if not pixels:
        raise DataError(f"{source}: no usable photo to add ({len(skipped)} skipped)")
    emb = np.concatenate([encoder.encode(np.stack(pixels[i:i + batch_size]))
                          for i in range(0, len(pixels), batch_size)])
    return emb, np.asarray(ids, dtype=np.int64), meta, skipped


def save_edited_index(index: GalleryIndex, index_dir: Path, *, rebuild: bool = True) -> None:
    """Write an edited index back over its folder atomically, keeping the folder's other files.

    Args:
        index: The edited index.
        index_dir: Its folder.
        rebuild: Rebuild an HNSW index with marked removals first (FAISS's HNSW cannot delete in
            place). Without, the marks are saved and stay out of results after a load; the service
            saves so and rebuilds in the background.
    """
    if rebuild and index.removed_count:
        index.rebuild()
    extra = {}
    for path in index_dir.iterdir():
        if path.is_file() and path.name not in _INDEX_FILES and not path.name.startswith("."):
            try:
                extra[path.name] = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                logger.warning("gallery edit: %s is not text; not carried over", path)
    index.stats["eval_stale"] = True  # the stored evaluation describes the gallery before the edit
    index.save(index_dir, extra_files=extra)


def _next_pg_id(url: str, name: str) -> int:
    with connect(url) as conn:
        top = conn.execute(f"SELECT max(id) FROM {gallery_table(name)}").fetchone()[0]
    return 0 if top is None else int(top) + 1


def add_photos(source: str | os.PathLike, encoder_path: str | os.PathLike, *,
               index_dir: str | os.PathLike | None = None, db: str | os.PathLike | None = None,
               name: str | None = None, threads: int | None = None) -> GalleryEdit:
    """Encode photos with the deployed encoder and add them to a FAISS index folder or a pgvector gallery.

    Args:
        source: Photo folder or manifest (:func:`encode_photos`).
        encoder_path: The exported image encoder (``.onnx``).
        index_dir: A FAISS index folder (written back atomically); or else
        db: a ``postgresql://`` URL or the embedded server's folder (started here and stopped after), and
        name: the pgvector gallery's name.
        threads: ONNX Runtime intra-op threads.

    Returns:
        The new ids, the photos skipped (with the reason) and the gallery's size afterwards.

    Raises:
        FingerprintMismatchError: The encoder is not the gallery's model.
        ValueError: Neither or both targets; LookupError: no such pgvector gallery.
    """
    if (index_dir is None) == (db is None) or (db is not None and not name):
        raise ValueError("give an index folder, or a database (URL or embedded folder) and a gallery name")
    encoder = make_encoder(encoder_path, "onnx", threads=threads)
    if index_dir is not None:
        index_dir = Path(index_dir)
        index = GalleryIndex.load(index_dir)
        check_encoder(encoder.fingerprint, (index.stats.get("model") or {}).get("fingerprint"), str(index_dir))
        next_id = int(np.max(index.gallery.ids)) + 1 if len(index.gallery) else 0
        emb, ids, meta, skipped = encode_photos(encoder, source, next_id=next_id)
        index.add(emb, ids, meta)
        # The service serves image files from under the roots a gallery records only: record the new photos'.
        index.gallery.image_roots = image_roots_of(source, meta, known=index.gallery.image_roots)
        save_edited_index(index, index_dir)
        return GalleryEdit(str(index_dir), ids.tolist(), len(ids), [(s.source, s.reason) for s in skipped],
                           len(index))
    server = EmbeddedPostgres(db)
    url = server.start()
    try:
        with PgVectorGallery.open(url, name) as live:
            check_encoder(encoder.fingerprint, live.fingerprint, f"pgvector gallery {name!r}")
            emb, ids, meta, skipped = encode_photos(encoder, source, next_id=_next_pg_id(url, name))
            live.add(emb, ids, fingerprint=encoder.fingerprint, labels=[m["label"] for m in meta],
                     titles=[m["caption"] for m in meta], images=[m["image"] for m in meta],
                     attributes=[{"product_id": m["product_id"], "source": m["source"]} for m in meta])
            total = live.count()
    finally:
        server.stop()
    return GalleryEdit(f"pgvector:{name}", ids.tolist(), len(ids), [(s.source, s.reason) for s in skipped], total)


def remove_items(ids: Sequence[int], *, index_dir: str | os.PathLike | None = None,
                 db: str | os.PathLike | None = None, name: str | None = None) -> GalleryEdit:
    """Remove items by id from a FAISS index folder (written back atomically) or a pgvector gallery.

    Ids not in the gallery are ignored (``changed`` counts the ones removed).

    Args:
        ids: The items' ids.
        index_dir: A FAISS index folder; or else db (URL or embedded folder) and name, as :func:`add_photos`.
        db: See ``index_dir``. name: See ``index_dir``.

    Raises:
        ValueError: Neither or both targets; removing every item of a FAISS index.
        LookupError: No such pgvector gallery.
    """
    if (index_dir is None) == (db is None) or (db is not None and not name):
        raise ValueError("give an index folder, or a database (URL or embedded folder) and a gallery name")
    wanted = [int(i) for i in ids]
    if index_dir is not None:
        index_dir = Path(index_dir)
        index = GalleryIndex.load(index_dir)
        removed = index.remove(wanted)
        if removed:
            save_edited_index(index, index_dir)
        return GalleryEdit(str(index_dir), wanted, removed, [], len(index) - index.removed_count)
    server = EmbeddedPostgres(db)
    url = server.start()
    try:
        with PgVectorGallery.open(url, name) as live:
            removed = live.remove(wanted)
            total = live.count()
    finally:
        server.stop()
    return GalleryEdit(f"pgvector:{name}", wanted, removed, [], total)
