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

import collections.abc
import hashlib
import json
import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..core.files import atomic_save_npy, load_stamped, save_stamped
from ..core.images import BadImageError, load_image
from ..data.dataset import DataError, LmdbImages, read_labels
from ..data.prepare import read_source

if TYPE_CHECKING:
    from .encoders import ImageEncoder

logger = logging.getLogger(__name__)

__all__ = [
    "Gallery", "MetaRows", "choose_decode", "default_num_workers", "embed_gallery", "gallery_from_source",
    "gallery_from_split", "gallery_texts",
]


def _plain(value: Any) -> Any:
    """JSON for what metadata rows may hold besides JSON types: numpy scalars (their value), paths (text)."""
    return value.item() if isinstance(value, np.generic) else str(value)


class MetaRows(collections.abc.Sequence):
    """Metadata rows held compactly: one UTF-8 JSON blob and row offsets, a fresh dict per row read.

    100k rows of Python dicts take ~50 MB (more while a parse is freed); this
    takes ~10 MB, which matters to a CPU server that only reads the rows of its
    Top-k. Read-only: a row is decoded on access, so editing the returned dict
    changes nothing stored.
    """

    def __init__(self, rows: Iterable[Mapping[str, Any]]):
        self._pack([json.dumps(dict(r), ensure_ascii=False, separators=(",", ":"), default=_plain).encode("utf-8")
                    for r in rows])

    def _pack(self, encoded: list[bytes]) -> None:
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=self._offsets[1:])
        self._blob = b"".join(encoded)

    def take(self, rows: Iterable[int]) -> "MetaRows":
        """These rows, in the order given, as new compact rows (their bytes copied, not decoded)."""
        out, o = MetaRows(()), self._offsets.tolist()
        out._pack([self._blob[o[r]:o[r + 1]] for r in rows])
        return out

    def concat(self, rows: Iterable[Mapping[str, Any]]) -> "MetaRows":
        """These rows followed by ``rows``, kept as bytes: appended to one shared append-only buffer when these
        rows end it (earlier row sets stay valid; an append costs the new rows), else copied first."""
        out, end = MetaRows(rows), int(self._offsets[-1])
        blob = self._blob if isinstance(self._blob, bytearray) and len(self._blob) == end else bytearray(self._blob[:end])
        out._offsets = np.concatenate([self._offsets, out._offsets[1:] + end])
        blob += out._blob
        out._blob = blob
        return out

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"metadata row {i} out of range ({len(self)} rows)")
        return json.loads(self._blob[self._offsets[i]:self._offsets[i + 1]])

    def __eq__(self, other) -> bool:
        if isinstance(other, MetaRows):
            return (np.array_equal(self._offsets, other._offsets)
                    and self._blob[:self._offsets[-1]] == other._blob[:other._offsets[-1]])
        return isinstance(other, Sequence) and len(other) == len(self) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # mutable-looking container semantics: not hashable

    def __repr__(self) -> str:
        return f"MetaRows({len(self)} rows, {int(self._offsets[-1]) / 2 ** 20:.1f} MB)"


@dataclass(eq=False)
class Gallery:
    """The searchable images: ids, metadata rows, and the images themselves.

    Attributes:
        ids: ``[N]`` int64 image ids (unique).
        meta: One dict per image, in the same order: ``id``, ``image`` (file path, or ``None``
            when the image lives in an LMDB), ``caption``, ``label`` (category, ``""`` when
            unknown), ``product_id`` (``""`` when unknown), ``split`` (or ``None``), ``source``.
            Given as a list, held as :class:`MetaRows` (compact, read-only rows).
        lmdb_dir: The prepared ``lmdb/{split}`` folder images are read from, or ``None``
            when they are read from the ``image`` paths.
        image_roots: The folders a file gallery's images come from (absolute): the service
            serves image files from under these only. Empty for an LMDB gallery.
    """

    ids: np.ndarray
    meta: Sequence[dict]
    lmdb_dir: str | None = None
    image_roots: tuple[str, ...] = ()
    _reader: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        self.ids = np.asarray(self.ids, dtype=np.int64).reshape(-1)
        if not isinstance(self.meta, MetaRows):
            self.meta = MetaRows(self.meta)
        if len(self.ids) != len(self.meta):
            raise ValueError(f"{len(self.ids)} ids but {len(self.meta)} metadata rows")
        if len(np.unique(self.ids)) != len(self.ids):
            raise ValueError("gallery ids must be unique")

    def __len__(self) -> int:
        return len(self.ids)

    def image_bytes(self, i: int) -> bytes:
        """The encoded image of row ``i`` (file contents, or the JPEG stored in the LMDB)."""
        if self.lmdb_dir is not None and not self.meta[i].get("image"):  # rows added later are files
            if self._reader is None:
                self._reader = LmdbImages(self.lmdb_dir)
            return self._reader.get(int(self.ids[i]))
        return Path(self.meta[i]["image"]).read_bytes()

    def image(self, i: int) -> Image.Image:
        """Row ``i`` decoded as an RGB PIL image (EXIF orientation applied).

        Raises:
            cnclip_kd.core.images.BadImageError: The file is missing or not a readable image.
        """
        if self.lmdb_dir is not None and not self.meta[i].get("image"):
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
            span = f"{int(self.ids.min())}…{int(self.ids.max())}" if len(self) else "-…-"
            raise KeyError(f"image id {image_id} is not in the gallery ({len(self)} images, ids {span})")
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
             "meta": list(self.meta)}
        if self.lmdb_dir and relative_to is not None:
            d["lmdb_dir_rel"] = os.path.relpath(Path(self.lmdb_dir).resolve(), Path(relative_to).resolve())
        if self.image_roots:
            d["image_roots"] = list(self.image_roots)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any], ids: np.ndarray, base: str | os.PathLike | None = None) -> "Gallery":
        """Inverse of :meth:`to_json`; a moved output folder is found through the relative LMDB path."""
        lmdb_dir = d.get("lmdb_dir")
        if d.get("lmdb_dir_rel") and base is not None:
            rel = (Path(base) / d["lmdb_dir_rel"]).resolve()
            if (rel / "imgs").is_dir():
                lmdb_dir = str(rel)
        return cls(ids=np.asarray(ids, dtype=np.int64), meta=MetaRows(d["meta"]), lmdb_dir=lmdb_dir,
                   image_roots=tuple(d.get("image_roots") or ()))


def gallery_from_split(data_dir: str | os.PathLike, split: str) -> Gallery:
    """The images of one split of a prepared dataset (images from its LMDB, metadata from ``labels.csv``).

    Args:
        data_dir: A folder written by ``prepare_dataset`` / notebook 01.
        split: ``train``, ``valid`` or ``test``.

    Raises:
        cnclip_kd.data.dataset.DataError: No prepared dataset there, or the split is empty.
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
                        check_images: bool = True, num_workers: int | None = None, dist: Any = None) -> Gallery:
    """A gallery of photo files: a category folder, or a CSV/JSONL manifest
    (see :func:`cnclip_kd.data.prepare.read_source`).

    Args:
        path: The folder or manifest.
        caption_template: Caption for folder input, ``{label}`` = sub-folder name.
        check_images: Decode every image once and leave out (with a warning) the ones
            that cannot be read, so embedding never stops half-way on a bad file.
        num_workers: Threads for the check (default: CPU count).
        dist: A :class:`cnclip_kd.core.distributed.Dist` of a ``torchrun`` run: each rank checks a
            contiguous slice of the images and the ranks share what they found, so every rank gets
            the same gallery (same ids as one process would) for 1/world of the decoding.

    Raises:
        cnclip_kd.data.dataset.DataError: Unreadable input, MUGE data (prepare it and use
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

        rank, world = (int(dist.rank), int(dist.world_size)) if dist is not None else (0, 1)
        with ThreadPoolExecutor(num_workers or os.cpu_count() or 1) as pool:
            reasons = list(pool.map(ok, _split_even(records, world, rank)))
        if world > 1:
            import torch.distributed as tdist

            parts: list = [None] * world
            tdist.all_gather_object(parts, reasons)
            reasons = [r for part in parts for r in part]
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
    return Gallery(ids=np.array(ids, dtype=np.int64), meta=meta, image_roots=image_roots_of(path, meta))


def image_roots_of(source: str | os.PathLike, meta: Sequence[dict], known: Sequence[str] = ()) -> tuple[str, ...]:
    """The folders a file gallery's images come from: ``known`` ones, the source folder (a manifest's own
    folder), and the folder of any image a manifest names outside them (outermost folders only)."""
    root = Path(source).resolve()
    root = root if root.is_dir() else root.parent
    roots = {root, *(Path(r) for r in known)}
    for m in meta:
        folder = Path(m["image"]).parent
        if not any(folder.is_relative_to(r) for r in roots):
            roots.add(folder)
    outer = [r for r in roots if not any(r != o and r.is_relative_to(o) for o in roots)]
    return tuple(sorted(str(r) for r in outer))


class _GalleryImages:
    """Rows of a gallery as transformed tensors (a map-style dataset for a DataLoader; no torch import here).

    Indexed by gallery **row**; the DataLoader's batch sampler says which rows (:func:`_chunk_batches`).
    """

    def __init__(self, gallery: Gallery, rows: Sequence[int] | None = None, transform: Callable | None = None):
        self.gallery = gallery
        self.rows = list(range(len(gallery))) if rows is None else list(rows)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, row: int):
        return self.transform(self.gallery.image(int(row)))


class _GalleryBytes(_GalleryImages):
    """Rows of a gallery as their encoded bytes (uint8 tensors), for decoding on the GPU."""

    def __getitem__(self, row: int):
        import torch

        return torch.frombuffer(bytearray(self.gallery.image_bytes(int(row))), dtype=torch.uint8)


def _collate_list(batch: list) -> list:
    return batch


def _chunk_batches(chunks: Sequence[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Batches of gallery rows that never straddle a chunk, in chunk order (a DataLoader batch sampler)."""
    return [list(range(b, min(e, b + batch_size))) for s, e in chunks for b in range(s, e, batch_size)]


# --------------------------------------------------------------------------- decoding on the GPU


def _tensor_transform(transform: Callable) -> Callable | None:
    """The uint8-tensor version of a PIL transform built from torchvision's Resize / CenterCrop / ToTensor /
    Normalize (and an RGB conversion), for images decoded on the GPU; ``None`` for anything else.

    Resizing a uint8 tensor with antialias matches PIL's resize to within a grey level, so GPU-decoded
    embeddings are close to (not bit-equal with) CPU-decoded ones.
    """
    import torchvision.transforms as T
    import torchvision.transforms.functional as F

    inner = getattr(transform, "_compose", transform)
    steps = inner.transforms if isinstance(inner, T.Compose) else [inner]
    out: list[Callable] = []
    for t in steps:
        if isinstance(t, T.Resize):
            out.append(lambda x, t=t: F.resize(x, t.size, t.interpolation, t.max_size, antialias=True))
        elif isinstance(t, T.CenterCrop):
            out.append(lambda x, t=t: F.center_crop(x, t.size))
        elif isinstance(t, T.ToTensor):
            out.append(lambda x: x.float().div_(255))
        elif isinstance(t, T.Normalize):
            out.append(lambda x, t=t: F.normalize(x, t.mean, t.std))
        elif getattr(t, "__name__", "") in ("_convert_to_rgb", "_convert_image_to_rgb"):
            continue  # decode_jpeg(mode=RGB) already gives RGB
        else:
            return None

    def apply(x):
        for f in out:
            x = f(x)
        return x

    return apply


def _is_jpeg(data) -> bool:
    return len(data) > 3 and int(data[0]) == 0xFF and int(data[1]) == 0xD8


class _GpuDecoder:
    """Encoded images → the encoder's input batch on its GPU: JPEGs through nvJPEG
    (``torchvision.io.decode_jpeg(device="cuda")``, EXIF orientation applied), anything else (or a JPEG
    nvJPEG refuses) through the CPU path (:func:`cnclip_kd.core.images.load_image` + the encoder's transform)."""

    def __init__(self, encoder: ImageEncoder, gallery: Gallery, tensor_transform: Callable):
        self.encoder = encoder
        self.gallery = gallery
        self.tensor_transform = tensor_transform

    def __call__(self, rows: Sequence[int], data: list):
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        dev = self.encoder.device
        out: list = [None] * len(rows)
        jpeg = [i for i, d in enumerate(data) if _is_jpeg(d)]
        decoded: list = []
        if jpeg:
            try:
                decoded = decode_jpeg([data[i] for i in jpeg], mode=ImageReadMode.RGB, device=dev,
                                      apply_exif_orientation=True)
            except RuntimeError:  # one bad file fails the batch: decode one by one
                decoded = []
                for i in jpeg:
                    try:
                        decoded.append(decode_jpeg(data[i], mode=ImageReadMode.RGB, device=dev,
                                                   apply_exif_orientation=True))
                    except RuntimeError:
                        decoded.append(None)
        for i, img in zip(jpeg, decoded):
            if img is not None:
                out[i] = self.tensor_transform(img)
        for i, x in enumerate(out):
            if x is None:  # not a JPEG, or nvJPEG could not read it: the CPU path (raises BadImageError)
                out[i] = self.encoder.transform(self.gallery.image(int(rows[i]))).to(dev, non_blocking=True)
        return torch.stack(out)


def _rate_after_first(batches: Any, sync: Callable[[], None]) -> float:
    """Images per second over an iterable of batches, timed from the first batch on (worker start-up and
    warm-up left out)."""
    import time

    n, t0 = 0, None
    for size in batches:
        if t0 is None:
            sync()
            t0 = time.perf_counter()
            continue
        n += size
    sync()
    return n / max(time.perf_counter() - t0, 1e-9) if t0 is not None else 0.0


def choose_decode(encoder: ImageEncoder, gallery: Gallery, *, decode: str = "auto", batch_size: int = 64,
                  num_workers: int = 0, sample: int | None = None) -> tuple[str, dict]:
    """Where :func:`embed_gallery` decodes images: ``"cpu"`` (PIL in DataLoader workers) or ``"gpu"``
    (nvJPEG through ``torchvision.io.decode_jpeg(device="cuda")``).

    ``"auto"`` measures both on a sample of the gallery (decode + preprocess to the encoder's input,
    not the encoder) and takes the faster one when the encoder runs on a CUDA device and its transform
    has a tensor version; otherwise (a CPU encoder, no CUDA, an unknown transform) it is ``"cpu"``
    without measuring.

    Args:
        encoder: The encoder (its device and transform decide).
        gallery: The images (the sample is its first ``sample`` rows).
        decode: ``"auto"``, ``"cpu"`` or ``"gpu"`` (``"gpu"`` without CUDA raises).
        batch_size: Images per batch in the measurement.
        num_workers: CPU decode workers in the measurement.
        sample: Images measured per path (default: 4 batches, at least 512; the first batch is not
            timed, so worker start-up and warm-up do not count).

    Returns:
        ``(choice, facts)``: facts hold the reason and, when measured, both rates (img/s).

    Raises:
        ValueError: Unknown ``decode``, or ``"gpu"`` where it cannot run.
    """
    if decode not in ("auto", "cpu", "gpu"):
        raise ValueError(f"decode must be 'auto', 'cpu' or 'gpu', not {decode!r}")
    if decode == "cpu":
        return "cpu", {"reason": "asked for"}
    import torch

    on_cuda = encoder.device.type == "cuda" and torch.cuda.is_available()
    tensor_tf = _tensor_transform(encoder.transform) if on_cuda else None
    if decode == "gpu":
        if not on_cuda or tensor_tf is None:
            raise ValueError("decode='gpu' needs an encoder on a CUDA device with a torchvision Resize/ToTensor/"
                             f"Normalize transform (device {encoder.device}, transform {encoder.transform!r})")
        return "gpu", {"reason": "asked for"}
    if not on_cuda:
        return "cpu", {"reason": f"encoder on {encoder.device.type}"}
    if tensor_tf is None:
        return "cpu", {"reason": "the encoder's transform has no tensor version"}
    from torch.utils.data import DataLoader

    rows = list(range(min(len(gallery), sample or max(512, 4 * batch_size))))
    batches = _chunk_batches([(0, len(rows))], batch_size)
    gpu = _GpuDecoder(encoder, gallery, tensor_tf)

    def sync() -> None:
        torch.cuda.synchronize(encoder.device)

    def run_cpu():
        loader = DataLoader(_GalleryImages(gallery, transform=encoder.transform), batch_sampler=batches,
                            num_workers=num_workers, pin_memory=True)
        for images in loader:
            images.to(encoder.device, non_blocking=True)
            yield len(images)

    def run_gpu():
        loader = DataLoader(_GalleryBytes(gallery), batch_sampler=batches, num_workers=num_workers,
                            collate_fn=_collate_list)
        for rows_b, data in zip(batches, loader):
            yield len(gpu(rows_b, data))

    try:
        rates = {"cpu_img_s": _rate_after_first(run_cpu(), sync), "gpu_img_s": _rate_after_first(run_gpu(), sync)}
    except (RuntimeError, OSError) as err:
        logger.warning("GPU decoding failed on the sample (%s); decoding on the CPU", err)
        return "cpu", {"reason": f"GPU decode failed: {err}"}
    choice = "gpu" if rates["gpu_img_s"] > rates["cpu_img_s"] else "cpu"
    logger.info("decode: CPU (%d workers) %.0f img/s, GPU %.0f img/s on %d images; decoding on the %s",
                num_workers, rates["cpu_img_s"], rates["gpu_img_s"], len(rows), choice.upper())
    return choice, {"reason": "measured", **{k: round(v, 1) for k, v in rates.items()}}


def default_num_workers(device_type: str, local_world_size: int = 1) -> int:
    """DataLoader workers when none are given: 0 on a CPU (the encoder wants the cores), else the CPUs this
    process may use split over the processes on the node, at most 8."""
    if device_type != "cuda":
        return 0
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus // max(1, local_world_size) - 1))


# --------------------------------------------------------------------------- embedding


def _chunk_ok(path: Path, shape: tuple[int, int]) -> bool:
    if not path.is_file():
        return False
    try:
        return np.load(path, mmap_mode="r").shape == shape
    except (OSError, ValueError) as err:
        logger.warning("embedding chunk %s is unreadable (%s); computing it again", path, err)
        return False


def _split_even(items: Sequence, parts: int, part: int) -> list:
    """The ``part``-th of ``parts`` contiguous, near-equal slices of ``items``."""
    n = len(items)
    return list(items[part * n // parts:(part + 1) * n // parts])


def embed_gallery(encoder: ImageEncoder, gallery: Gallery, out_dir: str | os.PathLike, *, batch_size: int = 64,
                  num_workers: int | None = None, chunk_size: int = 2048, decode: str = "auto",
                  dist: Any = None) -> np.ndarray | None:
    """Encode every gallery image, resumably, in one process or sharded over ``torchrun`` ranks.

    The gallery is cut into chunks of ``chunk_size`` rows (boundaries depend on
    ``chunk_size`` only, never on the number of processes), saved atomically
    under ``out_dir/chunks-<key>-<chunk_size>/`` as they finish. The key hashes
    the encoder's fingerprint and the gallery's, so a different model or
    gallery never reuses them. A rerun, with the same or any other number of
    processes, encodes only the chunks that are missing.

    Under ``torchrun`` (``dist`` with ``world_size > 1``, or an initialised
    ``torch.distributed`` group) the missing chunks are split into contiguous,
    near-equal shards, one per rank (on a fresh run: rank ``r`` takes the
    ``r``-th contiguous slice of the gallery); every rank writes its own chunks;
    after a barrier rank 0 merges them. Every rank must see the same
    ``out_dir`` (across nodes: a shared filesystem).

    When all chunks are there the full matrix is written to
    ``out_dir/embeddings.npy`` (with ``embeddings.json`` naming its key and how
    it was decoded) and the chunks are removed; a later call with the same
    encoder and gallery just loads it.

    Args:
        encoder: From :func:`load_encoder`.
        gallery: The images.
        out_dir: Folder for this (model, gallery)'s embeddings.
        batch_size: Images per forward pass.
        num_workers: DataLoader worker processes decoding (or, with GPU decoding, reading) images;
            default :func:`default_num_workers` (0 on a CPU, up to 8 per GPU).
        chunk_size: Images per saved chunk.
        decode: ``"auto"`` (measured choice on a GPU, the CPU otherwise; :func:`choose_decode`),
            ``"cpu"`` or ``"gpu"``. GPU-decoded embeddings are close to, not bit-equal with, CPU-decoded
            ones (another JPEG decoder and resize); chunks of both may share a cache.
        dist: A :class:`cnclip_kd.core.distributed.Dist` (rank, world size) to shard over; default: the
            initialised ``torch.distributed`` group, if any, else one process.

    Returns:
        ``[N, D]`` float32, L2-normalised rows, in gallery order; ``None`` on ranks other than 0 of a
        sharded run (their work is in the chunks rank 0 merged).

    Raises:
        ValueError: An empty gallery, or ranks that see different galleries or models.
        RuntimeError: A chunk is missing after every rank finished (e.g. ``out_dir`` not shared).
    """
    import torch.distributed as tdist

    if len(gallery) == 0:
        raise ValueError("the gallery is empty")
    rank, world = _rank_and_world(dist)
    sharded = world > 1
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n, dim = len(gallery), encoder.dim
    key = _agreed_key(encoder, gallery, world)
    final = out_dir / "embeddings.npy"
    emb = load_stamped(final, key, (n, dim))
    if emb is not None:
        logger.info("embeddings of %s: reusing %s", encoder.name, final)
        return emb if rank == 0 else None
    chunk_dir = out_dir / f"chunks-{key}-{chunk_size}"
    bounds, paths, todo = _plan_chunks(out_dir, chunk_dir, n, dim, chunk_size, rank)
    if sharded:  # every rank scanned before anyone writes: all see the same missing list
        tdist.barrier()
    n_done = n - sum(bounds[c][1] - bounds[c][0] for c in todo)
    if n_done and rank == 0:
        logger.info("embeddings of %s: resuming, %d of %d images already encoded", encoder.name, n_done, n)
    how = _encode_share(encoder, gallery, bounds, paths, todo, rank=rank, world=world, batch_size=batch_size,
                        num_workers=num_workers, decode=decode)
    if sharded:
        tdist.barrier()  # every shard complete
        if rank != 0:
            return None
    return _merge_chunks(encoder, gallery, final, chunk_dir, bounds, paths, key=key, world=world, how=how)


def _rank_and_world(dist: Any) -> tuple[int, int]:
    """``(rank, world size)`` from ``dist``, else from the initialised ``torch.distributed`` group, else one
    process."""
    import torch.distributed as tdist

    if dist is not None:
        return int(dist.rank), int(dist.world_size)
    if tdist.is_available() and tdist.is_initialized():
        return tdist.get_rank(), tdist.get_world_size()
    return 0, 1


def _agreed_key(encoder: ImageEncoder, gallery: Gallery, world: int) -> str:
    """The cache key of this (model, gallery); in a sharded run, checked to be the same on every rank (the
    exchange is also the first barrier: every rank has started).

    Raises:
        ValueError: The ranks see different models or galleries.
    """
    key = hashlib.sha256(f"{encoder.fingerprint()}|{gallery.fingerprint()}".encode()).hexdigest()[:16]
    if world > 1:
        import torch.distributed as tdist

        keys: list = [None] * world
        tdist.all_gather_object(keys, key)
        if len(set(keys)) != 1:
            raise ValueError(f"the ranks see different models or galleries (cache keys {keys}); every rank must "
                             "load the same model and gallery (same files, same modification times)")
    return key


def _plan_chunks(out_dir: Path, chunk_dir: Path, n: int, dim: int, chunk_size: int,
                 rank: int) -> tuple[list[tuple[int, int]], list[Path], list[int]]:
    """The chunks of ``n`` rows: ``(bounds, paths, missing chunk numbers)``. Rank 0 first removes other
    models' or galleries' partial work (it can never resume here)."""
    if rank == 0:
        for stale in out_dir.glob("chunks-*"):
            if stale != chunk_dir:
                shutil.rmtree(stale, ignore_errors=True)
    bounds = [(s, min(n, s + chunk_size)) for s in range(0, n, chunk_size)]
    paths = [chunk_dir / f"chunk-{c:05d}.npy" for c in range(len(bounds))]
    todo = [c for c, (p, (s, e)) in enumerate(zip(paths, bounds)) if not _chunk_ok(p, (e - s, dim))]
    return bounds, paths, todo


def _encode_share(encoder: ImageEncoder, gallery: Gallery, bounds: Sequence[tuple[int, int]],
                  paths: Sequence[Path], todo: Sequence[int], *, rank: int, world: int, batch_size: int,
                  num_workers: int | None, decode: str) -> str | None:
    """Encode this rank's contiguous share of the missing chunks ``todo`` (numbers into ``bounds``/``paths``).

    Returns:
        Where the images were decoded (``"cpu"``/``"gpu"``), or ``None`` when this rank had nothing to do.
    """
    sharded = world > 1
    mine = _split_even(todo, world, rank)
    if sharded:
        logger.info("rank %d of %d: %d of %d missing chunks (%s)", rank, world, len(mine), len(todo),
                    f"chunks {mine[0]}…{mine[-1]}" if mine else "none")
    if not mine:
        return None
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world if sharded else 1))
    workers = default_num_workers(encoder.device.type, local_world) if num_workers is None else num_workers
    how, facts = choose_decode(encoder, gallery, decode=decode, batch_size=batch_size, num_workers=workers)
    _encode_chunks(encoder, gallery, [bounds[c] for c in mine], [paths[c] for c in mine],
                   batch_size=batch_size, num_workers=workers, decode=how,
                   desc=f"embedding ({Path(encoder.name).name or encoder.name})"
                        + (f" rank {rank}/{world}" if sharded else ""),
                   show=rank == 0)
    logger.debug("decode choice: %s %s", how, facts)
    return how


def _merge_chunks(encoder: ImageEncoder, gallery: Gallery, final: Path, chunk_dir: Path,
                  bounds: Sequence[tuple[int, int]], paths: Sequence[Path], *, key: str, world: int,
                  how: str | None) -> np.ndarray:
    """Join every chunk into ``final`` (stamped with ``key`` and how it was made) and remove the chunks.

    Raises:
        RuntimeError: A chunk is missing (e.g. a rank crashed, or ``out_dir`` is not shared).
    """
    n, dim = len(gallery), encoder.dim
    missing = [str(p) for p, (s, e) in zip(paths, bounds) if not _chunk_ok(p, (e - s, dim))]
    if missing:
        raise RuntimeError(f"{len(missing)} embedding chunks are missing after every rank finished (e.g. "
                           f"{missing[0]}); do all ranks write to the same folder (a shared filesystem across "
                           "nodes)? Rerun to compute them.")
    emb = np.empty((n, dim), np.float32)  # filled chunk by chunk: one copy in memory, not two
    for p, (s, e) in zip(paths, bounds):
        emb[s:e] = np.load(p)
    save_stamped(final, emb, key, n=n, dim=dim, encoder=encoder.name, encoder_fingerprint=encoder.fingerprint(),
                 gallery_fingerprint=gallery.fingerprint(), world_size=world, decode=how)
    shutil.rmtree(chunk_dir, ignore_errors=True)
    return emb


def _encode_chunks(encoder: ImageEncoder, gallery: Gallery, bounds: Sequence[tuple[int, int]],
                   paths: Sequence[Path], *, batch_size: int, num_workers: int, decode: str, desc: str,
                   show: bool = True) -> None:
    """Encode the given chunks (one DataLoader for all of them, batches never straddling a chunk) and save
    each one atomically as soon as its last batch is done."""
    import torch
    from torch.utils.data import DataLoader

    batches = _chunk_batches(bounds, batch_size)
    on_gpu = encoder.device.type == "cuda"
    common = {"batch_sampler": batches, "num_workers": num_workers,
              "persistent_workers": False, "prefetch_factor": 4 if num_workers else None}
    if decode == "gpu":
        gpu = _GpuDecoder(encoder, gallery, _tensor_transform(encoder.transform))
        loader = DataLoader(_GalleryBytes(gallery), collate_fn=_collate_list, **common)
        inputs = (gpu(rows, data) for rows, data in zip(batches, loader))
    else:
        inputs = iter(DataLoader(_GalleryImages(gallery, transform=encoder.transform), pin_memory=on_gpu, **common))
    chunk_of = {s: (s, e, p) for (s, e), p in zip(bounds, paths)}
    feats: list[np.ndarray] = []
    current = None
    total = sum(e - s for s, e in bounds)
    with tqdm(total=total, desc=desc, unit="img", disable=not show) as bar:
        for rows, images in zip(batches, inputs):
            if rows[0] in chunk_of:
                current, feats = chunk_of[rows[0]], []
            with torch.inference_mode():
                feats.append(encoder.encode(images).cpu().numpy().astype(np.float32, copy=False))
            bar.update(len(rows))
            if rows[-1] + 1 == current[1]:
                atomic_save_npy(current[2], np.concatenate(feats))
                feats = []


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
