"""Photos without titles that only the KD term sees (``cnclip-kd train --kd-images SRC``).

The teacher needs no title to say which photos look alike, so unlabelled
photos (a folder, a manifest, or a prepared ``lmdb/<split>`` folder) can
carry the KD term beyond the labelled pairs. :func:`prepare_kd_images` checks
and encodes them once into an images-only LMDB (the way ``prepare`` does, bad
files skipped and reported); the trainer caches the teacher's features of
them (and of their seeded augmented views) like those of the training images,
and mixes ``kd_images_ratio × batch_size`` of them into every micro-batch
(:func:`kd_image_batches`), encoded by the student in the same forward pass.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from torch.utils.data import DataLoader, Dataset

from ..core.distributed import Dist, autocast, barrier
from ..core.files import atomic_folder
from ..core.images import DEFAULT_MAX_PIXELS
from ..data.dataset import DataError, LmdbImages
from ..data.prepare import Record, Skipped, encode_all, read_source, write_lmdb_split
from .config import TrainConfig
from .teacher_cache import TeacherFeatureCache, ViewAugment, build_teacher_cache

if TYPE_CHECKING:
    from ..models.teachers import Teacher

logger = logging.getLogger(__name__)

_FORMAT = "kd-images-v1"
_MAX_SIDE = 512  # as `cnclip-kd prepare` stores images (its default --max-side)
ACCEPTED = ("a photo folder (flat or one sub-folder per category), a manifest .csv/.jsonl (an `image` column; "
            "titles not needed) or an lmdb/<split> folder written by `cnclip-kd prepare`")


@dataclass
class KdImages:
    """Unlabelled photos ready for training.

    Attributes:
        lmdb_dir: Folder holding ``imgs/`` (an ``lmdb/<split>`` folder or one written here).
        n: Usable photos.
        skipped: Inputs left out, each with its reason (also in ``skipped.json`` beside ``imgs/``).
    """

    lmdb_dir: Path
    n: int
    skipped: list[Skipped] = field(default_factory=list)


# --------------------------------------------------------------------------- preparing


def _is_lmdb_split(path: Path) -> bool:
    return (path / "imgs" / "data.mdb").is_file()


def _fingerprint(records: list[Record], skipped: list[Skipped], params: dict) -> str:
    """Hash of every photo's path, size and mtime (or bytes), of what was skipped while reading, and of ``params``."""
    h = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
    h.update(json.dumps([[s.source, s.reason] for s in skipped], ensure_ascii=False).encode())
    for rec in records:
        h.update(rec.source.encode())
        if rec.data is not None:
            h.update(hashlib.sha256(rec.data).digest())
        else:
            st = os.stat(rec.source)
            h.update(f":{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def _load(folder: Path) -> KdImages:
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    skipped = [Skipped(**s) for s in json.loads((folder / "skipped.json").read_text(encoding="utf-8"))]
    return KdImages(lmdb_dir=folder, n=int(meta["n_images"]), skipped=skipped)


def _write(folder: Path, source: Path, good: list[tuple[Record, bytes]], skipped: list[Skipped]) -> None:
    """Write the images-only LMDB, ``skipped.json`` and ``meta.json`` into a temp folder, then rename it."""
    # keep_existing: another process that finished first wrote the same folder.
    with atomic_folder(folder, keep_existing=True) as tmp:
        images = [(i + 1, base64.urlsafe_b64encode(data).decode("utf-8")) for i, (_, data) in enumerate(good)]
        write_lmdb_split(tmp, images, [])  # cn_clip's layout; its `pairs` is empty (no titles)
        (tmp / "skipped.json").write_text(json.dumps([asdict(s) for s in skipped], ensure_ascii=False, indent=1),
                                          encoding="utf-8")
        (tmp / "meta.json").write_text(json.dumps({"source": str(source), "n_images": len(good),
                                                   "n_skipped": len(skipped)}, ensure_ascii=False, indent=1),
                                       encoding="utf-8")


def prepare_kd_images(source: str | os.PathLike, root: str | os.PathLike, *, max_side: int | None = _MAX_SIDE,
                      max_pixels: int = DEFAULT_MAX_PIXELS, num_workers: int | None = None) -> KdImages:
    """Check and encode unlabelled photos once, into ``root/<fingerprint>/imgs`` (reused when already there).

    Args:
        source: An ``lmdb/<split>`` folder written by ``cnclip-kd prepare`` (used as is, its titles ignored), a
            photo folder (flat, or one sub-folder per category) or a manifest ``.csv``/``.jsonl`` (read by
            :func:`cnclip_kd.data.prepare.read_source`; titles are not needed).
        root: Folder of prepared photo sets; the fingerprint covers the photos' paths, sizes and mtimes and
            the encoding parameters, so changed photos give a new set and a second run re-encodes nothing.
        max_side: Longer side images are shrunk to, as ``prepare`` does.
        max_pixels: Images over this many pixels are skipped (decompression bombs).
        num_workers: Decoding threads (default: CPU count).

    Returns:
        Where the images are, how many, and what was skipped (bad files, each with its reason).

    Raises:
        FileNotFoundError: ``source`` does not exist.
        DataError: No usable photo is there (an empty folder, or every file bad).
    """
    source = Path(source)
    if _is_lmdb_split(source):
        return KdImages(lmdb_dir=source, n=len(LmdbImages(source).ids()))
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such file or folder; --kd-images takes {ACCEPTED}")
    skipped: list[Skipped] = []
    records = read_source(source, skipped=skipped, unlabelled=True)
    params = {"format": _FORMAT, "max_side": max_side, "max_pixels": max_pixels}
    folder = Path(root) / _fingerprint(records, skipped, params)
    if (folder / "meta.json").is_file():
        kd = _load(folder)
        logger.info("kd-images: reusing %s (%d photos, %d skipped)", folder, kd.n, len(kd.skipped))
        return kd
    good = encode_all(records, skipped, max_side=max_side, max_pixels=max_pixels, num_workers=num_workers)
    for s in skipped:
        logger.warning("kd-images: skipped %s: %s", s.source, s.reason)
    if not good:
        raise DataError(f"{source}: no usable photo for --kd-images (skipped {len(skipped)}"
                        + "".join(f"; {s.source}: {s.reason}" for s in skipped[:5]) + f"); it takes {ACCEPTED}")
    _write(folder, source, good, skipped)
    logger.info("kd-images: %d photos from %s into %s; skipped %d", len(good), source, folder, len(skipped))
    return KdImages(lmdb_dir=folder, n=len(good), skipped=skipped)


# --------------------------------------------------------------------------- data


class UnlabelledViews(Dataset):
    """Unlabelled images of an LMDB folder, each in a seeded augmented view; item ``(index, view)``.

    Returns ``{"image_id", "view", "image"}`` (and ``"teacher_image"``, the teacher's own transform of the
    same picture, with ``teacher_transform``: the teacher then runs online). The view is drawn exactly as
    for the training images (:class:`cnclip_kd.distill.teacher_cache.ViewAugment`), so the cached teacher
    feature of (image id, view) is the teacher's feature of the very picture the student sees.
    """

    def __init__(self, lmdb_dir: str | os.PathLike, transform: Callable, views: ViewAugment | None = None,
                 teacher_transform: Callable | None = None, augment: Callable | None = None):
        self.images = LmdbImages(lmdb_dir)
        self.image_ids = self.images.ids()
        self.transform, self.views = transform, views
        self.teacher_transform, self.augment = teacher_transform, augment

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, item: int | tuple[int, int]) -> dict:
        index, view = item if isinstance(item, tuple) else (item, 0)
        image_id = self.image_ids[index]
        img = self.images.image(image_id)
        if view:
            if self.views is None:
                raise ValueError(f"unlabelled image {index} asked in view {view}, but there are no views")
            img = self.views(img, image_id, view, self.images)
        if self.augment is not None:  # train-time random augmentation (use_augment), as for the labelled images
            img = self.augment(img)
        out = {"image_id": image_id, "view": view, "image": self.transform(img)}
        if self.teacher_transform is not None:
            out["teacher_image"] = self.teacher_transform(img)
        return out


def kd_image_batches(n_images: int, per_step: int, steps: int, seed: int, epoch: int,
                     views: int = 0) -> list[list[tuple[int, int]]]:
    """The unlabelled ``(index, view)`` lists of one epoch's ``steps`` (micro-)batches, ``per_step`` each.

    The run reads one stream: seeded permutations of the images, one after another (another seed at each
    wrap), epoch ``e`` taking positions ``e × steps × per_step`` on, so every image is shown once before
    any is shown again, across epochs too. Each position gets a view in ``0..views`` drawn from
    (seed, epoch). Everything depends only on the arguments: a resumed run recomputes the same lists.
    """
    if n_images <= 0 or per_step <= 0:
        raise ValueError(f"kd_image_batches needs n_images > 0 and per_step > 0, got {n_images}, {per_step}")
    total = per_step * steps
    start = epoch * total
    order: list[int] = []
    for wrap in range(start // n_images, (start + total - 1) // n_images + 1 if total else 0):
        g = torch.Generator().manual_seed(seed * 1_000_003 + wrap * 7 + 5)
        order += torch.randperm(n_images, generator=g).tolist()
    offset = start % n_images
    picked = order[offset:offset + total]
    if views > 0:
        g = torch.Generator().manual_seed(seed * 7919 + epoch + 104_729)
        shown = torch.randint(0, views + 1, (total,), generator=g).tolist()
    else:
        shown = [0] * total
    pairs = list(zip(picked, shown))
    return [pairs[s * per_step:(s + 1) * per_step] for s in range(steps)]


# --------------------------------------------------------------------------- the trainer's feed


def check_kd_config(cfg: TrainConfig) -> None:
    """Reject ``kd_images`` settings that cannot work, before anything is loaded.

    Raises:
        ValueError: ``kd_images`` without distillation, or ``kd_images_ratio`` <= 0.
    """
    if cfg.kd_images and not cfg.distillation:
        raise ValueError(f"kd_images={cfg.kd_images!r} feeds only the KD term: add --distillation "
                         "--teacher-model-name NAME, or leave --kd-images empty")
    if cfg.kd_images and not cfg.kd_images_ratio > 0:
        raise ValueError(f"kd_images_ratio must be > 0 (unlabelled images per labelled sample), "
                         f"got {cfg.kd_images_ratio}")


@dataclass
class KdImageFeed:
    """The unlabelled photos of a run: their dataset, their teacher features and this process's share per step."""

    images: KdImages
    dataset: UnlabelledViews
    cache: TeacherFeatureCache | None  # None: the teacher runs online on ``teacher_image``
    per_device: int
    views: int

    def describe(self) -> dict:
        """What was used, for the run's ``metrics.json``."""
        return {"kd_images_lmdb": str(self.images.lmdb_dir), "kd_images_n": self.images.n,
                "kd_images_skipped": len(self.images.skipped), "kd_images_per_device": self.per_device}

    def epoch_loader(self, cfg: TrainConfig, d: Dist, micro_steps: int, epoch: int, start_micro: int) -> DataLoader:
        """This process's unlabelled micro-batches of ``epoch``, from micro-batch ``start_micro`` on."""
        per_step = self.per_device * d.world_size
        batches = kd_image_batches(self.images.n, per_step, micro_steps, cfg.seed, epoch, self.views)
        local = [b[d.rank * self.per_device:(d.rank + 1) * self.per_device] for b in batches]
        # A generator of its own: drawing worker seeds must not touch the global RNG (exact resume).
        return DataLoader(self.dataset, batch_sampler=local[start_micro:], num_workers=cfg.num_workers,
                          generator=torch.Generator().manual_seed(cfg.seed + epoch + 1_000_003),
                          persistent_workers=False, pin_memory=d.device.type == "cuda")

    def teacher_features(self, batch: dict, teacher: Teacher, device: torch.device, autocast_dtype) -> torch.Tensor:
        """The teacher's features of this unlabelled batch: from the cache, else computed now."""
        if self.cache is not None:
            return self.cache.lookup(batch["image_id"], batch["view"]).to(device, non_blocking=True)
        with torch.no_grad(), autocast(device, autocast_dtype):
            return teacher.encode_image(batch["teacher_image"].to(device, non_blocking=True))


def build_kd_feed(cfg: TrainConfig, d: Dist, teacher: Teacher | None, views: ViewAugment | None,
                  transform: Callable, *, use_cache: bool, augment: Callable | None = None,
                  autocast_dtype=None) -> KdImageFeed | None:
    """Prepare ``cfg.kd_images`` (under ``{logs}/kd-images``) and their teacher features; None without them.

    The main process encodes the photos while the others wait, then every process reads the same folder.
    The teacher's features of the photos and of their ``augment_views`` views are cached as for the training
    images (``use_cache``), in the same cache folder.
    """
    if not cfg.kd_images or teacher is None:
        return None
    root = Path(cfg.logs) / "kd-images"
    if d.is_main:
        images = prepare_kd_images(cfg.kd_images, root)
    barrier(d)
    if not d.is_main:
        images = prepare_kd_images(cfg.kd_images, root)
    cache = None
    if use_cache:
        cache = build_teacher_cache(teacher, images.lmdb_dir,
                                    cfg.teacher_cache_dir or Path(cfg.logs) / "teacher-cache",
                                    batch_size=cfg.teacher_batch_size, num_workers=cfg.num_workers, d=d,
                                    autocast_dtype=autocast_dtype, augment=views, views=cfg.augment_views)
    dataset = UnlabelledViews(images.lmdb_dir, transform, views,
                              teacher_transform=None if use_cache else teacher.transform, augment=augment)
    per_device = max(1, round(cfg.kd_images_ratio * cfg.batch_size))
    logger.info("kd-images: %d unlabelled photos from %s, %d per step per device", images.n, cfg.kd_images,
                per_device)
    return KdImageFeed(images, dataset, cache, per_device, cfg.augment_views if views is not None else 0)
