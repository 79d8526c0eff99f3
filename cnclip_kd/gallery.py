"""Galleries: the searchable images, their metadata, and their embeddings (computed resumably).

* :class:`Gallery` is the searchable set: ids, a metadata row per image (path,
  caption, category, product id) and a way to get each image back for display.
  :func:`gallery_from_split` reads a prepared split (images from its LMDB),
  :func:`gallery_from_source` a photo folder or a manifest.
* :func:`embed_gallery` encodes a gallery in chunks saved as they finish, so an
  interrupted run resumes at the first missing chunk.

Nothing here imports torch until :func:`embed_gallery` runs, so a CPU server
can load a saved gallery without it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .data import DataError, LmdbImages, read_labels, read_source
from .files import atomic_save_npy, load_stamped, save_stamped
from .images import BadImageError, load_image

if TYPE_CHECKING:
    from .encoders import ImageEncoder

logger = logging.getLogger(__name__)

__all__ = ["Gallery", "embed_gallery", "gallery_from_source", "gallery_from_split", "gallery_texts"]


@dataclass(eq=False)
class Gallery:
    """The searchable images: ids, metadata rows, and the images themselves.

    Attributes:
        ids: ``[N]`` int64 image ids (unique).
        meta: One dict per image, in the same order: ``id``, ``image`` (file path, or ``None``
            when the image lives in an LMDB), ``caption``, ``label`` (category, ``""`` when
            unknown), ``product_id`` (``""`` when unknown), ``split`` (or ``None``), ``source``.
        lmdb_dir: The prepared ``lmdb/{split}`` folder images are read from, or ``None``
            when they are read from the ``image`` paths.
    """

    ids: np.ndarray
    meta: list[dict]
    lmdb_dir: str | None = None
    _reader: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        self.ids = np.asarray(self.ids, dtype=np.int64).reshape(-1)
        if len(self.ids) != len(self.meta):
            raise ValueError(f"{len(self.ids)} ids but {len(self.meta)} metadata rows")
        if len(np.unique(self.ids)) != len(self.ids):
            raise ValueError("gallery ids must be unique")

    def __len__(self) -> int:
        return len(self.ids)

    def image_bytes(self, i: int) -> bytes:
        """The encoded image of row ``i`` (file contents, or the JPEG stored in the LMDB)."""
        if self.lmdb_dir is not None:
            if self._reader is None:
                self._reader = LmdbImages(self.lmdb_dir)
            return self._reader.get(int(self.ids[i]))
        return Path(self.meta[i]["image"]).read_bytes()

    def image(self, i: int) -> Image.Image:
        """Row ``i`` decoded as an RGB PIL image (EXIF orientation applied).

        Raises:
            cnclip_kd.images.BadImageError: The file is missing or not a readable image.
        """
        if self.lmdb_dir is not None:
            return load_image(self.image_bytes(i), name=f"{self.lmdb_dir}:{int(self.ids[i])}")
        return load_image(self.meta[i]["image"])

    def column(self, key: str) -> np.ndarray:
        """One metadata field of every row as a string array (missing → ``""``)."""
        return np.array([str(m.get(key) or "") for m in self.meta], dtype=object)

    def row_of(self, image_id: int) -> int:
        """The row of an image id.

        Raises:
            KeyError: The id is not in the gallery.
        """
        rows = np.flatnonzero(self.ids == int(image_id))
        if not len(rows):
            raise KeyError(f"image id {image_id} is not in the gallery ({len(self)} images, "
                           f"ids {int(self.ids.min()) if len(self) else '-'}…{int(self.ids.max()) if len(self) else '-'})")
        return int(rows[0])

    def fingerprint(self) -> str:
        """Identifies the ids and image contents (by file/LMDB size and modification time)."""
        h = hashlib.sha256(self.ids.tobytes())
        if self.lmdb_dir is not None:
            st = (Path(self.lmdb_dir) / "imgs" / "data.mdb").stat()
            h.update(f"lmdb:{Path(self.lmdb_dir).resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
        else:
            for m in self.meta:
                st = os.stat(m["image"])
                h.update(f"{m['image']}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]

    def to_json(self, relative_to: str | os.PathLike | None = None) -> dict:
        """A JSON-ready description (the LMDB folder also stored relative to ``relative_to``)."""
        d = {"version": 1, "lmdb_dir": str(Path(self.lmdb_dir).resolve()) if self.lmdb_dir else None,
             "meta": self.meta}
        if self.lmdb_dir and relative_to is not None:
            d["lmdb_dir_rel"] = os.path.relpath(Path(self.lmdb_dir).resolve(), Path(relative_to).resolve())
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any], ids: np.ndarray, base: str | os.PathLike | None = None) -> "Gallery":
        """Inverse of :meth:`to_json`; a moved output folder is found through the relative LMDB path."""
        lmdb_dir = d.get("lmdb_dir")
        if d.get("lmdb_dir_rel") and base is not None:
            rel = (Path(base) / d["lmdb_dir_rel"]).resolve()
            if (rel / "imgs").is_dir():
                lmdb_dir = str(rel)
        return cls(ids=np.asarray(ids, dtype=np.int64), meta=[dict(m) for m in d["meta"]], lmdb_dir=lmdb_dir)


def gallery_from_split(data_dir: str | os.PathLike, split: str) -> Gallery:
    """The images of one split of a prepared dataset (images from its LMDB, metadata from ``labels.csv``).

    Args:
        data_dir: A folder written by ``prepare_dataset`` / notebook 01.
        split: ``train``, ``valid`` or ``test``.

    Raises:
        cnclip_kd.data.DataError: No prepared dataset there, or the split is empty.
    """
    import lmdb

    data_dir = Path(data_dir)
    lmdb_dir = data_dir / "lmdb" / split
    if not (lmdb_dir / "imgs").is_dir():
        raise DataError(f"{lmdb_dir / 'imgs'}: missing; is {data_dir} a dataset prepared by `cnclip-kd prepare` "
                        f"(notebook 01), and is {split!r} one of its splits?")
    rows = read_labels(data_dir, split)
    env = lmdb.open(str(lmdb_dir / "imgs"), readonly=True, lock=False, readahead=False)
    try:
        with env.begin() as txn:
            stored = {int(k) for k in txn.cursor().iternext(values=False) if k != b"num_images"}
    finally:
        env.close()
    missing = [r["image_id"] for r in rows if r["image_id"] not in stored]
    if missing:
        logger.warning("%d images of labels.csv are not in %s (e.g. %s); left out", len(missing), lmdb_dir, missing[:3])
    rows = [r for r in rows if r["image_id"] in stored]
    if not rows:
        raise DataError(f"{data_dir}: split {split!r} has no images")
    meta = [{"id": r["image_id"], "image": None, "caption": r.get("text", ""), "label": r.get("label", ""),
             "product_id": r.get("product_id", ""), "split": split, "source": r.get("source", "")} for r in rows]
    return Gallery(ids=np.array([r["image_id"] for r in rows], dtype=np.int64), meta=meta,
                   lmdb_dir=str(lmdb_dir.resolve()))


def gallery_from_source(path: str | os.PathLike, *, caption_template: str = "{label}",
                        check_images: bool = True, num_workers: int | None = None) -> Gallery:
    """A gallery of photo files: a category folder, or a CSV/JSONL manifest (see :func:`cnclip_kd.data.read_source`).

    Args:
        path: The folder or manifest.
        caption_template: Caption for folder input, ``{label}`` = sub-folder name.
        check_images: Decode every image once and leave out (with a warning) the ones
            that cannot be read, so embedding never stops half-way on a bad file.
        num_workers: Threads for the check (default: CPU count).

    Raises:
        cnclip_kd.data.DataError: Unreadable input, MUGE data (prepare it and use
            :func:`gallery_from_split`), or no usable image.
    """
    skipped = []
    records = read_source(path, caption_template=caption_template, skipped=skipped)
    if any(r.data is not None for r in records):
        raise DataError(f"{path}: MUGE data holds images inside its TSV files; prepare it first "
                        "(`cnclip-kd prepare`, notebook 01) and use gallery_from_split(data_dir, split)")
    for s in skipped:
        logger.warning("gallery: skipped %s: %s", s.source, s.reason)
    if check_images and records:
        def ok(rec) -> str | None:
            try:
                load_image(rec.source)
            except BadImageError as err:
                return err.reason
            return None

        with ThreadPoolExecutor(num_workers or os.cpu_count() or 1) as pool:
            reasons = list(pool.map(ok, records))
        for rec, reason in zip(records, reasons):
            if reason:
                logger.warning("gallery: skipped %s: %s", rec.source, reason)
        records = [rec for rec, reason in zip(records, reasons) if not reason]
    if not records:
        raise DataError(f"{path}: no usable image for a gallery")
    next_id = max([r.image_id for r in records if r.image_id is not None], default=0) + 1
    ids, meta = [], []
    for rec in records:
        if rec.image_id is None:
            image_id, next_id = next_id, next_id + 1
        else:
            image_id = rec.image_id
        ids.append(image_id)
        meta.append({"id": image_id, "image": str(Path(rec.source).resolve()), "caption": rec.texts[0],
                     "label": rec.label, "product_id": rec.product_id, "split": None, "source": rec.source})
    return Gallery(ids=np.array(ids, dtype=np.int64), meta=meta)


class _GalleryImages:
    """Rows of a gallery as transformed tensors (a map-style dataset for a DataLoader; no torch import here)."""

    def __init__(self, gallery: Gallery, rows: Sequence[int], transform: Callable):
        self.gallery = gallery
        self.rows = list(rows)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        return self.transform(self.gallery.image(self.rows[i]))


# --------------------------------------------------------------------------- embedding


def _chunk_ok(path: Path, shape: tuple[int, int]) -> bool:
    if not path.is_file():
        return False
    try:
        return np.load(path, mmap_mode="r").shape == shape
    except (OSError, ValueError) as err:
        logger.warning("embedding chunk %s is unreadable (%s); computing it again", path, err)
        return False


def embed_gallery(encoder: ImageEncoder, gallery: Gallery, out_dir: str | os.PathLike, *, batch_size: int = 64,
                  num_workers: int = 0, chunk_size: int = 2048) -> np.ndarray:
    """Encode every gallery image, resumably.

    Chunks of ``chunk_size`` images are saved (atomically) under
    ``out_dir/chunks-<key>-<chunk_size>/`` as they finish; a run that was
    interrupted resumes at the first missing chunk. The key hashes the
    encoder's fingerprint and the gallery's, so a different model or gallery
    never reuses them. When all are done the full matrix is written to
    ``out_dir/embeddings.npy`` (with ``embeddings.json`` naming its key) and
    the chunks are removed; a later call with the same encoder and gallery
    just loads it.

    Args:
        encoder: From :func:`load_encoder`.
        gallery: The images.
        out_dir: Folder for this (model, gallery)'s embeddings.
        batch_size: Images per forward pass.
        num_workers: DataLoader worker processes decoding images.
        chunk_size: Images per saved chunk.

    Returns:
        ``[N, D]`` float32, L2-normalised rows, in gallery order.
    """
    from torch.utils.data import DataLoader

    if len(gallery) == 0:
        raise ValueError("the gallery is empty")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n, dim = len(gallery), encoder.dim
    key = hashlib.sha256(f"{encoder.fingerprint()}|{gallery.fingerprint()}".encode()).hexdigest()[:16]
    final = out_dir / "embeddings.npy"
    emb = load_stamped(final, key, (n, dim))
    if emb is not None:
        logger.info("embeddings of %s: reusing %s", encoder.name, final)
        return emb
    chunk_dir = out_dir / f"chunks-{key}-{chunk_size}"
    for stale in out_dir.glob("chunks-*"):
        if stale != chunk_dir:  # another model's or gallery's partial work; it can never resume here
            shutil.rmtree(stale, ignore_errors=True)
    bounds = [(s, min(n, s + chunk_size)) for s in range(0, n, chunk_size)]
    paths = [chunk_dir / f"chunk-{c:05d}.npy" for c in range(len(bounds))]
    done = [_chunk_ok(p, (e - s, dim)) for p, (s, e) in zip(paths, bounds)]
    n_done = sum(e - s for ok, (s, e) in zip(done, bounds) if ok)
    if n_done:
        logger.info("embeddings of %s: resuming, %d of %d images already encoded", encoder.name, n_done, n)
    pin = encoder.device.type == "cuda"
    with tqdm(total=n, initial=n_done, desc=f"embedding ({Path(encoder.name).name or encoder.name})",
              unit="img") as bar:
        for (start, end), path, ok in zip(bounds, paths, done):
            if ok:
                continue
            loader = DataLoader(_GalleryImages(gallery, range(start, end), encoder.transform), batch_size=batch_size,
                                num_workers=num_workers, pin_memory=pin)
            feats = []
            for images in loader:
                feats.append(encoder.encode(images).cpu().numpy().astype(np.float32, copy=False))
                bar.update(len(images))
            atomic_save_npy(path, np.concatenate(feats))
    emb = np.concatenate([np.load(p) for p in paths]).astype(np.float32, copy=False)
    save_stamped(final, emb, key, n=n, dim=dim, encoder=encoder.name, encoder_fingerprint=encoder.fingerprint(),
                 gallery_fingerprint=gallery.fingerprint())
    shutil.rmtree(chunk_dir, ignore_errors=True)
    return emb




def gallery_texts(gallery: Gallery) -> list[dict]:
    """The texts paired with a gallery's images, in cn_clip's MUGE form: ``{"text_id", "text", "image_ids"}``.

    A gallery read from a prepared split (:func:`gallery_from_split`) uses that split's
    ``{split}_texts.jsonl`` (``image_ids`` cut to the gallery's images; texts with none left out);
    any other gallery gets one text per image, its caption, with ``text_id`` = the image id.
    """
    ids = {int(i) for i in gallery.ids}
    split = gallery.meta[0].get("split") if len(gallery) else None
    if gallery.lmdb_dir is not None and split:
        path = Path(gallery.lmdb_dir).parent.parent / f"{split}_texts.jsonl"
        if path.is_file():
            texts = []
            with open(path, encoding="utf-8") as fh:
                for n, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                        image_ids = [int(i) for i in obj["image_ids"] if int(i) in ids]
                        text_id, text = int(obj["text_id"]), str(obj["text"])
                    except (ValueError, KeyError, TypeError) as err:
                        raise DataError(f"{path}:{n}: not a MUGE text line ({err}); expected "
                                        '{"text_id": int, "text": str, "image_ids": [int, …]}') from None
                    if image_ids:
                        texts.append({"text_id": text_id, "text": text, "image_ids": image_ids})
            return texts
        logger.warning("%s is missing; using the gallery's captions as its texts", path)
    return [{"text_id": int(i), "text": str(m.get("caption") or ""), "image_ids": [int(i)]}
            for i, m in zip(gallery.ids, gallery.meta) if str(m.get("caption") or "").strip()]
