"""Retrieval: gallery embedding, FAISS index, image→image evaluation and model comparison.

The pieces, in the order notebook 03 uses them:

* :func:`load_encoder` turns a student checkpoint, a cn_clip pretrained name or
  a teacher into one :class:`ImageEncoder` (its own preprocessing, batched,
  L2-normalised float32 features, fp16/bf16 autocast on a GPU).
* :class:`Gallery` is the searchable set: ids, a metadata row per image (path,
  caption, category, product id) and a way to get each image back for display.
  :func:`gallery_from_split` reads a prepared split (images from its LMDB),
  :func:`gallery_from_source` a photo folder or a manifest.
* :func:`embed_gallery` encodes a gallery in chunks saved as they finish, so an
  interrupted run resumes at the first missing chunk.
* :class:`GalleryIndex` is the FAISS index with the gallery: exact inner
  product for small galleries, HNSW / IVF (+SQ/PQ when memory asks) for large
  ones with recall@10 against exact search measured at build time; saved and
  loaded as one folder, written atomically.
* :func:`evaluate_index` gives leave-one-out image→image P@10, mAP@10 and
  R@1/5/10 by category and by product id; :func:`compare_models` runs the same
  gallery and queries through several models and writes the table.

Search results are gallery **row indices** (0 … N-1, ``-1`` where there is no
result); ``gallery.ids[row]`` is the image id, ``gallery.meta[row]`` its row of
metadata. Scores are cosine similarities (queries are normalised inside).
"""

from __future__ import annotations

import contextlib
import csv
import gc
import hashlib
import io
import json
import logging
import math
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .data import DataError, LmdbImages, _swap_into_place, read_labels, read_source
from .images import BadImageError, load_image
from .metrics import grouped_ranking_metrics, neighbour_hits, ranking_metrics

logger = logging.getLogger(__name__)

__all__ = [
    "EXACT_MAX",
    "INDEX_KINDS",
    "Gallery",
    "GalleryIndex",
    "ImageEncoder",
    "choose_index_kind",
    "compare_models",
    "comparison_markdown",
    "discover_models",
    "embed_gallery",
    "evaluate_index",
    "gallery_from_source",
    "gallery_from_split",
    "index_markdown",
    "index_model",
    "latest_checkpoint",
    "load_encoder",
    "metrics_row",
    "saved_indexes",
    "spec_name",
    "write_comparison",
]

#: Galleries up to this size get the exact index under ``kind="auto"``.
EXACT_MAX = 50_000
#: Index kinds :meth:`GalleryIndex.build` knows.
INDEX_KINDS = ("flat", "hnsw", "ivf", "ivfsq", "ivfpq")
# Above this size HNSW takes too long to build on a CPU; auto picks IVF instead.
_HNSW_MAX = 1_000_000
_HNSW_M = 32
_METRIC_KEYS = ("p@10", "map@10", "r@1", "r@5", "r@10")


# --------------------------------------------------------------------------- encoders


def _weights_fingerprint(module: torch.nn.Module, extra: Mapping[str, Any]) -> str:
    """Short hash of strided samples of every weight tensor (rounded to fp16) and ``extra``.

    Cheap even for a ViT-H, stable across CPU fp32 and GPU fp16 copies of the
    same weights, and different after any fine-tune.
    """
    h = hashlib.sha256(json.dumps(dict(extra), sort_keys=True, default=str).encode())
    for key, tensor in sorted(module.state_dict().items()):
        if not torch.is_tensor(tensor):
            continue
        h.update(f"{key}:{tuple(tensor.shape)}".encode())
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 1024)].to("cpu")
        if sample.is_floating_point():
            sample = sample.to(torch.float16)
        h.update(sample.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class ImageEncoder:
    """A loaded model's image tower behind one interface.

    Attributes:
        name: What it was loaded from (the spec given to :func:`load_encoder`).
        dim: Feature size D.
        transform: The model's own preprocessing, PIL image → ``[3, R, R]`` tensor.
        device: Where the model runs.
        info: ``{"role": …, "spec": …}`` plus what the checkpoint says (``kd_loss``, ``teacher``).
        model: The underlying module (kept so it stays alive).
    """

    def __init__(self, encode_fn: Callable[[torch.Tensor], torch.Tensor], *, name: str, dim: int,
                 transform: Callable[[Image.Image], torch.Tensor], device: str | torch.device = "cpu",
                 fingerprint: str, autocast_dtype: torch.dtype | None = None, info: dict | None = None,
                 model: torch.nn.Module | None = None):
        """Wrap a feature function.

        Args:
            encode_fn: Batch of transformed images (on ``device``) → ``[B, D]`` features, any scale.
            name: Display name / spec.
            dim: Feature size D.
            transform: PIL image → tensor, the model's own preprocessing.
            device: Where ``encode_fn`` runs.
            fingerprint: Identifies weights + preprocessing; keys the embedding cache.
            autocast_dtype: ``torch.float16`` / ``torch.bfloat16`` to run under autocast, or ``None``.
            info: Extra description (role, checkpoint facts).
            model: The module behind ``encode_fn``.
        """
        self._fn = encode_fn
        self.name = name
        self.dim = int(dim)
        self.transform = transform
        self.device = torch.device(device)
        self._fingerprint = fingerprint
        self.autocast_dtype = autocast_dtype
        self.info = dict(info or {})
        self.model = model

    def fingerprint(self) -> str:
        """Identifies the weights and preprocessing (a different model never shares embeddings)."""
        return self._fingerprint

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Features of a batch made with :attr:`transform`.

        Args:
            images: ``[B, 3, R, R]`` tensor on any device.

        Returns:
            ``[B, D]`` L2-normalised float32 features on :attr:`device`.
        """
        images = images.to(self.device, non_blocking=True)
        ctx = (torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype is not None
               else contextlib.nullcontext())
        with ctx:
            feats = self._fn(images)
        if isinstance(feats, (tuple, list)):
            feats = feats[0]
        return torch.nn.functional.normalize(feats.float(), dim=-1)

    def encode_pil(self, images: Sequence[Image.Image], *, batch_size: int = 64) -> np.ndarray:
        """Features of PIL images (converted to RGB), in batches.

        Returns:
            ``[len(images), D]`` float32, L2-normalised rows.
        """
        out = [np.zeros((0, self.dim), np.float32)]
        for start in range(0, len(images), batch_size):
            batch = torch.stack([self.transform(im.convert("RGB")) for im in images[start:start + batch_size]])
            out.append(self.encode(batch).cpu().numpy())
        return np.concatenate(out)

    def __repr__(self) -> str:
        return f"ImageEncoder(name={self.name!r}, dim={self.dim}, device={self.device}, role={self.info.get('role')!r})"


def _checkpoint_facts(path: Path) -> dict:
    """``kd_loss`` / ``teacher`` / ``name`` of a kit checkpoint, read without loading its tensors."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, OSError, ValueError) as err:  # an old (non-zip) file cannot be mmapped
        logger.debug("cannot mmap %s (%s); loading it", path, err)
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict):
        return {}
    return {k: ckpt.get(k) for k in ("kd_loss", "teacher", "name", "step")}


def _role(facts: Mapping[str, Any]) -> str:
    if facts.get("kd_loss"):
        return f"distilled 蒸馏 ({facts['kd_loss']})"
    return "fine-tuned 微调"


def load_encoder(spec: str | os.PathLike, *, device: str | torch.device | None = None,
                 vision_model: str | None = None, text_model: str | None = None,
                 precision: str = "auto") -> ImageEncoder:
    """Load an image encoder by spec.

    Args:
        spec: A student checkpoint (``*.pt``, through :func:`cnclip_kd.models.load_student`);
            a cn_clip pretrained name (``"ViT-B-16"`` …); ``"teacher:<name>"`` with anything
            :func:`cnclip_kd.teachers.load_teacher` takes (hub id, ModelScope folder,
            ``cnclip:ARCH``, ``random:...``, cn_clip checkpoint); or a ModelScope teacher folder.
        device: Default: ``cuda`` when available, else ``cpu``.
        vision_model: Architecture of a checkpoint that does not record it.
        text_model: Likewise.
        precision: ``auto`` (bf16/fp16 autocast on a GPU, fp32 on a CPU), ``fp32``, ``bf16`` or ``fp16``.

    Returns:
        The encoder, in eval mode.

    Raises:
        cnclip_kd.models.ModelLoadError: Unknown spec or unreadable checkpoint.
        cnclip_kd.teachers.TeacherLoadError: The teacher could not be loaded.
    """
    from .models import PRETRAINED, ModelLoadError, image_transform, load_student
    from .train import resolve_precision

    spec = str(spec)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    autocast = resolve_precision(precision, dev)
    path = Path(spec).expanduser()
    teacher_name = spec[len("teacher:"):] if spec.startswith("teacher:") else None
    if teacher_name is None and path.is_dir() and (path / "configuration.json").is_file():
        teacher_name = str(path)
    if teacher_name is not None:
        from .teachers import load_teacher

        teacher = load_teacher(teacher_name, device=dev, vision_model=vision_model, text_model=text_model)
        return ImageEncoder(teacher.encode_image, name=spec, dim=teacher.embed_dim, transform=teacher.transform,
                            device=dev, fingerprint=f"teacher-{teacher.fingerprint()}", autocast_dtype=autocast,
                            info={"role": "teacher 教师", "spec": spec, "kind": teacher.kind,
                                  "teacher": teacher.name},
                            model=teacher)
    if not path.is_file() and spec not in PRETRAINED:
        raise ModelLoadError(
            f"{spec}: not a model. Give a student checkpoint (*.pt), a cn_clip pretrained name "
            f"{sorted(PRETRAINED)}, 'teacher:<hub id | ModelScope folder | cnclip:ARCH | random:ARCH>' "
            "or a ModelScope teacher folder")
    kwargs = {k: v for k, v in (("vision_model", vision_model), ("text_model", text_model)) if v}
    model, info = load_student(spec, **kwargs)  # first: its errors name the file and the fix
    if path.is_file():
        facts = _checkpoint_facts(path)
        info_extra = {"role": _role(facts), "spec": str(path.resolve()), **facts}
    else:
        info_extra = {"role": "pretrained 预训练", "spec": spec}
    model = model.to(dev).eval()
    resolution = int(info["image_resolution"])
    fingerprint = _weights_fingerprint(model.visual, {"kind": "cnclip-student", "resolution": resolution,
                                                     "proj": tuple(model.visual.proj.shape)
                                                     if getattr(model.visual, "proj", None) is not None else None})
    return ImageEncoder(model.encode_image, name=spec, dim=int(info["embed_dim"]), transform=image_transform(resolution),
                        device=dev, fingerprint=f"student-{fingerprint}", autocast_dtype=autocast,
                        info=info_extra, model=model)


# --------------------------------------------------------------------------- galleries


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


class _GalleryImages(Dataset):
    """Rows of a gallery as transformed tensors (for a DataLoader)."""

    def __init__(self, gallery: Gallery, rows: Sequence[int], transform: Callable):
        self.gallery = gallery
        self.rows = list(rows)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(self.gallery.image(self.rows[i]))


# --------------------------------------------------------------------------- embedding


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            np.save(fh, array)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
    if len(gallery) == 0:
        raise ValueError("the gallery is empty")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n, dim = len(gallery), encoder.dim
    key = hashlib.sha256(f"{encoder.fingerprint()}|{gallery.fingerprint()}".encode()).hexdigest()[:16]
    final, stamp = out_dir / "embeddings.npy", out_dir / "embeddings.json"
    if stamp.is_file() and final.is_file():
        try:
            same = json.loads(stamp.read_text(encoding="utf-8")).get("key") == key
        except ValueError:
            same = False
        if same:
            emb = np.load(final)
            if emb.shape == (n, dim):
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
            _atomic_save_npy(path, np.concatenate(feats))
    emb = np.concatenate([np.load(p) for p in paths]).astype(np.float32, copy=False)
    _atomic_save_npy(final, emb)
    _atomic_write_text(stamp, json.dumps({"key": key, "n": n, "dim": dim, "encoder": encoder.name,
                                          "encoder_fingerprint": encoder.fingerprint(),
                                          "gallery_fingerprint": gallery.fingerprint()}, indent=1))
    shutil.rmtree(chunk_dir, ignore_errors=True)
    return emb


# --------------------------------------------------------------------------- the index


def _estimate_bytes(kind: str, n: int, dim: int, params: Mapping[str, Any] | None = None) -> int:
    """Rough memory of an index (vectors + ids + graph/lists), for choosing a kind."""
    params = dict(params or {})
    if kind == "flat":
        return n * dim * 4
    if kind == "hnsw":
        return n * (dim * 4 + int(params.get("M", _HNSW_M)) * 2 * 4 * 1.2)
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
        return {"M": _HNSW_M, "efConstruction": 80, "efSearch": 128}
    nlist = _default_nlist(n)
    params = {"nlist": nlist, "nprobe": int(min(nlist, max(8, nlist // 16)))}
    if kind == "ivfpq":
        # 8-bit codes need ≥ 256 training points per sub-quantizer; small galleries use fewer bits.
        params.update({"m": _pq_m(dim), "nbits": 8 if n >= 256 * 39 else max(1, min(8, int(math.log2(max(2, n // 39)))))})
    return params


def _gpu_count() -> int:
    import faiss

    return int(getattr(faiss, "get_num_gpus", lambda: 0)())


def _for_search(index):
    """The index to search with: a GPU copy when faiss sees GPUs (faiss-gpu), else the CPU index itself."""
    import faiss

    if _gpu_count() <= 0 or isinstance(index, faiss.IndexHNSW):  # faiss has no GPU HNSW
        return index
    try:
        return faiss.index_cpu_to_all_gpus(index)
    except (RuntimeError, AttributeError) as err:
        logger.warning("faiss: cannot move the index to the GPU (%s); searching on the CPU", err)
        return index


def _exact_topk(emb: np.ndarray, queries: np.ndarray, k: int, chunk: int = 256) -> np.ndarray:
    """Row indices of the exact inner-product top k (numpy, in chunks of queries; no copy of ``emb``)."""
    k = min(k, len(emb))
    out = []
    for s in range(0, len(queries), chunk):
        sim = queries[s:s + chunk] @ emb.T
        part = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sim, part, axis=1), axis=1, kind="stable")
        out.append(np.take_along_axis(part, order, axis=1))
    return np.concatenate(out) if out else np.zeros((0, k), np.int64)


class GalleryIndex:
    """A FAISS inner-product index over a gallery's L2-normalised embeddings.

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

    def __init__(self, index, gallery: Gallery, stats: dict, embeddings: np.ndarray | None = None):
        if index.ntotal != len(gallery):
            raise ValueError(f"the index holds {index.ntotal} vectors but the gallery has {len(gallery)} images")
        self.index = index
        self.gallery = gallery
        self.stats = dict(stats)
        self.embeddings = embeddings
        self._search_index = _for_search(index)
        self._row_of = {int(i): r for r, i in enumerate(gallery.ids)}

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @classmethod
    def build(cls, embeddings: np.ndarray, gallery: Gallery, *, kind: str = "auto",
              memory_budget_mb: float | None = None, recall_sample: int = 1000, seed: int = 0,
              params: Mapping[str, Any] | None = None) -> "GalleryIndex":
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
        if kind == "flat":
            index = faiss.IndexFlatIP(dim)
        elif kind == "hnsw":
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
            # Train on a sample: k-means needs far fewer points than a large gallery has.
            n_train = min(n, max(p["nlist"] * 64, 256 * 64))
            train_rows = np.sort(np.random.default_rng(seed).choice(n, n_train, replace=False))
            index.train(emb[train_rows])
            ivf.nprobe = int(p["nprobe"])
        index.add(emb)
        if kind == "hnsw":
            index.hnsw.efSearch = int(p["efSearch"])
        build_s = time.perf_counter() - t0
        est = _estimate_bytes(kind, n, dim, p)
        size = int(faiss.serialize_index(index).nbytes) if est < 512 * 2 ** 20 else int(est)
        stats = {"kind": kind, "n": int(n), "dim": int(dim), "bytes": size, "build_s": round(build_s, 4),
                 "params": p, "faiss_gpu": _gpu_count() > 0 and kind != "hnsw",
                 "memory_budget_mb": memory_budget_mb or None}
        obj = cls(index, gallery, stats, emb)
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
        exact = _exact_topk(self.embeddings, queries, k + 1)
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

    def search(self, queries: np.ndarray, k: int = 10, *,
               exclude_ids: Sequence[int | None] | np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest gallery items of each query.

        Args:
            queries: ``[Q, D]`` (or ``[D]``) query embeddings; normalised here.
            k: Results per query.
            exclude_ids: One gallery **id** per query to leave out of its results (the
                query itself in leave-one-out evaluation), or ``None`` / ``-1`` entries.

        Returns:
            ``(scores, rows)``, each ``[Q, k]``, best first: cosine similarities (float32)
            and gallery **row indices** (int64; ``-1`` with score ``-inf`` where the
            gallery has fewer than ``k`` other items).
        """
        q = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        if q.shape[1] != self.dim:
            raise ValueError(f"queries have dimension {q.shape[1]}, the index {self.dim}; same model?")
        q = np.ascontiguousarray(q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12))
        extra = 0 if exclude_ids is None else 1
        kk = max(1, min(k + extra, len(self)))
        scores, rows = self._search_index.search(q, kk)
        if exclude_ids is not None:
            if len(exclude_ids) != len(q):
                raise ValueError(f"{len(exclude_ids)} exclude_ids for {len(q)} queries")
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

    def save(self, directory: str | os.PathLike, *, with_embeddings: bool = True) -> Path:
        """Write the index as one folder, atomically (built beside it, then renamed into place).

        Files: ``index.faiss``, ``ids.npy``, ``gallery.json`` (the id → path, caption,
        label, product id table and where the images are), ``stats.json`` and
        ``embeddings.npy``.

        Raises:
            FileExistsError: ``directory`` exists, is not empty and is not a saved index.
        """
        import faiss

        directory = Path(directory)
        if directory.exists() and any(directory.iterdir()) and not (directory / "stats.json").is_file():
            raise FileExistsError(f"{directory} exists and is not a saved index; not replacing it")
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
        try:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700
            faiss.write_index(self.index, str(tmp / "index.faiss"))
            np.save(tmp / "ids.npy", self.gallery.ids)
            (tmp / "gallery.json").write_text(json.dumps(self.gallery.to_json(relative_to=directory),
                                                         ensure_ascii=False), encoding="utf-8")
            if with_embeddings and self.embeddings is not None:
                np.save(tmp / "embeddings.npy", np.asarray(self.embeddings, dtype=np.float32))
            (tmp / "stats.json").write_text(json.dumps(self.stats, ensure_ascii=False, indent=1, default=str),
                                            encoding="utf-8")
            _swap_into_place(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
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
        embeddings = np.load(emb_path) if emb_path.is_file() else None
        return cls(index, gallery, stats, embeddings)


# --------------------------------------------------------------------------- evaluation


def evaluate_index(index: GalleryIndex, embeddings: np.ndarray | None = None, *, k: int = 10,
                   by: Sequence[str] = ("label", "product_id"), ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Leave-one-out image→image retrieval over the whole gallery, through the index.

    Every gallery image queries the index (itself excluded); a hit is a result
    with the same value of the ``by`` field. Queries whose value is empty, or
    that no other gallery image shares, are left out (``n_queries`` counts the
    rest); a field no query can be answered on (e.g. one image per product) is
    left out of the result.

    Args:
        index: The index.
        embeddings: Query embeddings, one per gallery row (default: ``index.embeddings``).
        k: Depth of P@k and mAP@k (results fetched per query).
        by: Metadata fields that define relevance: ``"label"`` (category), ``"product_id"``.
        ks: Depths of Recall@k (each ≤ ``k``).

    Returns:
        ``{"k", "n_gallery", "<field>": {"p@k", "map@k", "r@1", "r@5", "r@10", "n_queries"},
        "per_label": {category: {...}}}`` — ``per_label`` splits the category metrics by the
        query's category.
    """
    emb = index.embeddings if embeddings is None else embeddings
    if emb is None:
        raise ValueError("evaluate_index needs the gallery embeddings (the index was saved without them)")
    emb = np.asarray(emb, dtype=np.float32)
    if emb.shape[0] != len(index.gallery):
        raise ValueError(f"{emb.shape[0]} query embeddings for a gallery of {len(index.gallery)}")
    ks = [x for x in ks if x <= k]
    _, rows = index.search(emb, k, exclude_ids=index.gallery.ids)
    out: dict = {"k": int(k), "n_gallery": len(index.gallery)}
    for key in by:
        labels = index.gallery.column(key)
        hits, n_relevant = neighbour_hits(labels, rows)
        if not (n_relevant > 0).any():
            logger.info("evaluation by %s: no gallery image shares its %s with another; left out", key, key)
            continue
        out[key] = ranking_metrics(hits, n_relevant, ks=ks)
        if key == "label":
            out["per_label"] = grouped_ranking_metrics(hits, n_relevant, labels, ks=ks)
    return out


def metrics_row(name: str, index: GalleryIndex, evaluation: Mapping[str, Any] | None = None) -> dict:
    """One comparison-table row: model, role, index facts, category metrics, product-id metrics (``product/…``)."""
    ev = dict(evaluation if evaluation is not None else index.stats.get("eval") or {})
    model = index.stats.get("model") or {}
    row = {"model": name, "role": model.get("role", ""), "spec": model.get("spec", ""),
           "dim": index.dim, "n": len(index), "index": index.stats.get("kind"),
           "recall@10": index.stats.get("recall@10")}
    for key, prefix in (("label", ""), ("product_id", "product/")):
        for metric, value in (ev.get(key) or {}).items():
            row[f"{prefix}{metric}"] = value
    return row


def write_comparison(rows: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike, *,
                     extra: Mapping[str, Any] | None = None) -> tuple[Path, Path]:
    """Write the comparison rows as ``comparison.csv`` (UTF-8 with BOM, opens in Excel) and
    ``comparison.json`` (with ``extra``) in ``out_dir``, each atomically.

    Returns:
        ``(csv_path, json_path)``.
    """
    out_dir = Path(out_dir)
    columns = list(dict.fromkeys(key for r in rows for key in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    csv_path, json_path = out_dir / "comparison.csv", out_dir / "comparison.json"
    _atomic_write_text(csv_path, "\ufeff" + buf.getvalue())
    _atomic_write_text(json_path, json.dumps({**dict(extra or {}), "rows": list(rows)}, ensure_ascii=False,
                                             indent=1, default=str))
    return csv_path, json_path


def index_model(spec: str | os.PathLike, gallery: Gallery, index_dir: str | os.PathLike, *,
                cache_dir: str | os.PathLike | None = None, kind: str = "auto",
                memory_budget_mb: float | None = None, k: int = 10, by: Sequence[str] = ("label", "product_id"),
                batch_size: int = 64, num_workers: int = 0, device: str | None = None,
                encoder: ImageEncoder | None = None) -> GalleryIndex:
    """Embed a gallery with one model, build and evaluate the index, save it to ``index_dir``.

    What ``cnclip-kd index`` and notebook 03 do for one model. The index's
    ``stats["model"]`` holds the spec (``load_encoder(stats["model"]["spec"])``
    encodes new queries), ``stats["eval"]`` the evaluation.

    Args:
        spec: See :func:`load_encoder`.
        gallery: The images.
        index_dir: Where the index folder goes (replaced as a whole).
        cache_dir: Embedding chunks / cache (default ``<index_dir>/../_embeddings/<name>``).
        kind: Index kind (:meth:`GalleryIndex.build`).
        memory_budget_mb: For ``kind="auto"``.
        k: Evaluation depth.
        by: Evaluation fields.
        batch_size: Images per forward pass.
        num_workers: DataLoader workers.
        device: Where the model runs.
        encoder: An already loaded encoder for ``spec`` (skips loading).

    Returns:
        The saved index.
    """
    index_dir = Path(index_dir)
    encoder = encoder or load_encoder(spec, device=device)
    cache = Path(cache_dir) if cache_dir else index_dir.parent / "_embeddings" / index_dir.name
    emb = embed_gallery(encoder, gallery, cache, batch_size=batch_size, num_workers=num_workers)
    index = GalleryIndex.build(emb, gallery, kind=kind, memory_budget_mb=memory_budget_mb)
    index.stats["model"] = {"name": index_dir.name, "spec": encoder.info.get("spec", str(spec)),
                            "role": encoder.info.get("role", ""), "fingerprint": encoder.fingerprint(),
                            **{key: encoder.info[key] for key in ("kd_loss", "teacher") if encoder.info.get(key)}}
    index.stats["eval"] = evaluate_index(index, emb, k=k, by=by)
    index.save(index_dir)
    return index


def compare_models(specs: Mapping[str, str], gallery: Gallery, out_dir: str | os.PathLike, *,
                   cache_dir: str | os.PathLike | None = None, kind: str = "auto",
                   memory_budget_mb: float | None = None, k: int = 10,
                   by: Sequence[str] = ("label", "product_id"), batch_size: int = 64, num_workers: int = 0,
                   device: str | None = None) -> list[dict]:
    """Index and evaluate several models on the same gallery and queries.

    Each model's index is saved to ``out_dir/<name>/`` (so notebook 04 and the
    widget can load it); the table goes to ``out_dir/comparison.csv`` and
    ``comparison.json``.

    Args:
        specs: Display name → spec (see :func:`load_encoder`), in table order, e.g.
            ``{"pretrained": "ViT-B-16", "fine-tuned": "out/runs/base-finetune/checkpoints/epoch_latest.pt",
            "distilled": "...", "teacher": "teacher:damo/multi-modal_clip-vit-huge-patch14_zh"}``.
        gallery: The common gallery (every image also a query, itself excluded).
        out_dir: Folder for the indexes and the table.
        cache_dir: Embedding caches go to ``cache_dir/<name>`` (default ``out_dir/_embeddings/<name>``).
        kind, memory_budget_mb, k, by, batch_size, num_workers, device: As in :func:`index_model`.

    Returns:
        One row per model (:func:`metrics_row`): ``model``, ``role``, ``spec``, ``dim``, ``n``,
        ``index``, ``recall@10``, ``p@10``, ``map@10``, ``r@1``, ``r@5``, ``r@10``, ``n_queries``,
        and ``product/…`` when product ids allow.
    """
    out_dir = Path(out_dir)
    cache_root = Path(cache_dir) if cache_dir else out_dir / "_embeddings"
    rows = []
    for name, spec in specs.items():
        logger.info("comparing: %s (%s)", name, spec)
        index = index_model(spec, gallery, out_dir / name, cache_dir=cache_root / name, kind=kind,
                            memory_budget_mb=memory_budget_mb, k=k, by=by, batch_size=batch_size,
                            num_workers=num_workers, device=device)
        rows.append(metrics_row(name, index))
        del index
        gc.collect()  # one model at a time in memory
    write_comparison(rows, out_dir, extra={"gallery": {"n": len(gallery), "lmdb_dir": gallery.lmdb_dir,
                                                       "fingerprint": gallery.fingerprint()},
                                           "k": k, "specs": dict(specs)})
    return rows


# --------------------------------------------------------------------------- finding models


def _teacher_sources(output_dir: Path) -> set[Path]:
    """Checkpoints that were exported as teacher folders (the demo teacher's own run)."""
    sources = set()
    for stamp in (output_dir / "teachers").glob("*/exported_from.json"):
        try:
            sources.add(Path(json.loads(stamp.read_text(encoding="utf-8"))["checkpoint"]).resolve())
        except (ValueError, KeyError, TypeError):
            continue
    return sources


def _student_checkpoints(output_dir: Path) -> list[Path]:
    exported = _teacher_sources(output_dir)
    found = [p for p in (output_dir / "runs").glob("*/checkpoints/epoch_latest.pt") if p.resolve() not in exported]
    return sorted(found, key=lambda p: p.parent.parent.name)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path:
    """The most recently written student checkpoint under ``output_dir/runs`` (runs exported as teachers skipped).

    Raises:
        FileNotFoundError: None there (the message says to run notebook 02).
    """
    found = _student_checkpoints(Path(output_dir))
    if not found:
        raise FileNotFoundError(f"no student checkpoint under {Path(output_dir) / 'runs'} "
                                "(runs/<name>/checkpoints/epoch_latest.pt); run notebook 02_distill.ipynb "
                                "(or `cnclip-kd train`) first, or pass CHECKPOINT")
    return max(found, key=lambda p: p.stat().st_mtime_ns)


def discover_models(output_dir: str | os.PathLike) -> dict[str, str]:
    """Every model the kit wrote under ``output_dir``: teacher folders, student runs by name, then the teachers
    those students were distilled from (e.g. ``efficientnet-lite2``), each once.

    Returns:
        Name → spec: ``{"demo-finetune": "/…/runs/demo-finetune/checkpoints/epoch_latest.pt", …,
        "efficientnet-lite2": "teacher:efficientnet-lite2"}``.
    """
    output_dir = Path(output_dir)
    specs: dict[str, str] = {}
    for cfg in sorted((output_dir / "teachers").glob("*/configuration.json")):
        specs[cfg.parent.name] = f"teacher:{cfg.parent.resolve()}"
    students = _student_checkpoints(output_dir)
    for ckpt in students:
        name = ckpt.parent.parent.name
        specs[name if name not in specs else f"{name}-student"] = str(ckpt.resolve())
    for ckpt in students:
        teacher = _checkpoint_facts(ckpt).get("teacher")
        if not teacher:
            continue
        path = Path(str(teacher)).expanduser()
        spec = f"teacher:{path.resolve() if path.exists() else teacher}"
        if spec not in specs.values():
            name = spec_name(spec)
            specs[name if name not in specs else f"{name}-teacher"] = spec
    return specs


def spec_name(spec: str | os.PathLike) -> str:
    """A short name for a model spec: the run name of ``runs/<name>/checkpoints/*.pt``, a file's stem,
    a teacher folder's name, or the pretrained name (``teacher:timm:convnext_tiny=/m/w.safetensors`` →
    ``timm-convnext_tiny``, ``teacher:random:preset:tiny`` → ``random-preset-tiny``)."""
    text = str(spec)
    if text.startswith("teacher:"):
        text = text[len("teacher:"):]
    if ":" in text or "=" in text:  # a spelled name, not a path: keep it a plain folder name
        return text.split("=", 1)[0].replace(":", "-").replace("/", "-")
    path = Path(text)
    if path.suffix == ".pt" and path.parent.name == "checkpoints":
        return path.parent.parent.name
    if path.suffix == ".pt":
        return path.stem
    return path.name or text.replace(":", "-")


def saved_indexes(root: str | os.PathLike) -> dict[str, Path]:
    """Index folders under ``root`` (notebook 03's ``OUTPUT_DIR/index``): name → folder.

    In the order of ``root/comparison.json`` when there is one, then by name.
    """
    root = Path(root)
    found = {stats.parent.name: stats.parent for stats in sorted(root.glob("*/stats.json"))}
    order: list[str] = []
    table = root / "comparison.json"
    if table.is_file():
        try:
            order = [r["model"] for r in json.loads(table.read_text(encoding="utf-8")).get("rows", [])]
        except (ValueError, KeyError, TypeError):
            order = []
    names = [n for n in order if n in found] + [n for n in sorted(found) if n not in order]
    return {n: found[n] for n in names}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "-" if value is None else str(value)


def comparison_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """Comparison rows (:func:`compare_models`) as a Markdown table: one line per model, metrics to 3 decimals."""
    keys = list(dict.fromkeys(k for r in rows for k in r if "@" in k and k != "recall@10"))
    head = "| 模型 model | 角色 role | 索引 index | N | " + " | ".join(keys) + " |"
    lines = [head, "|---|---|---|---:|" + "---:|" * len(keys)]
    lines += [f"| {r['model']} | {r.get('role', '')} | {r.get('index', '')} | {r.get('n', '')} | "
              + " | ".join(_fmt(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def index_markdown(index: GalleryIndex) -> str:
    """An index's facts and, when evaluated, its metrics (overall and per category) as Markdown."""
    st = index.stats
    lines = ["| 索引 index | N | D | 大小 size | 构建 build | recall@10 | 单次查询 query | 参数 params |",
             "|---|---:|---:|---:|---:|---:|---:|---|",
             f"| {st.get('kind')} | {st.get('n')} | {st.get('dim')} | {st.get('bytes', 0) / 2 ** 20:.2f} MB | "
             f"{st.get('build_s', 0):.2f} s | {_fmt(st.get('recall@10'))} | {st.get('search_ms', 0):.3f} ms | "
             f"{json.dumps(st.get('params') or {})} |"]
    ev = st.get("eval") or {}
    groups = [("类目 category", ev.get("label")), ("商品 product id", ev.get("product_id"))]
    groups += [(f"· {label}", m) for label, m in (ev.get("per_label") or {}).items()]
    groups = [(g, m) for g, m in groups if m]
    if groups:
        keys = [k for k in groups[0][1] if k != "n_queries"]
        lines += ["", "| 相关性 relevant = same … | 查询数 queries | " + " | ".join(keys) + " |",
                  "|---|---:|" + "---:|" * len(keys)]
        lines += [f"| {g} | {m.get('n_queries')} | " + " | ".join(_fmt(m.get(k)) for k in keys) + " |"
                  for g, m in groups]
    return "\n".join(lines)
