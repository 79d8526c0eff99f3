"""The teacher's image features, computed once and reused: plain images and seeded augmented views.

A teacher that is far larger than its student costs most of a distillation
run when it runs every step (EfficientNet-Lite2 at 260 px: ~80 ms per image
on 2 CPU cores, against ~4 ms for the demo student's training step). So its
features are computed once per (dataset, teacher) and memory-mapped from disk.

Augmentation and a cache go together through *views*: view 0 is the plain
image, views 1..V are augmentations drawn with a seed fixed by (image id,
view). The student is shown one view of each image per epoch (picked by the
run's seed and the epoch), recomputes that view from the same seed, and
learns from the teacher's cached features *of that very view*. The teacher
runs V + 1 times per image in all, however many epochs and runs reuse it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..core.distributed import Dist, autocast, barrier
from ..core.files import atomic_folder
from ..data.dataset import LmdbImages

logger = logging.getLogger(__name__)

_VIEW_VERSION = "views-v1"


class ViewAugment:
    """Seeded augmented views of an image: the same (image id, view) always gives the same picture.

    View 0 is the image itself. Other views: a random resized crop (area ``scale``,
    aspect 3/4–4/3) at the image's own size, a horizontal flip with probability 0.5,
    and colour jitter (brightness, contrast, saturation ± ``jitter``). Geometry and
    colour change, the product stays in the picture, so the teacher's notion of
    "the same kind of thing" is what the student is taught on each view.

    With ``mix`` > 0, that fraction of the views (seeded per image and view) is a *mixed* view, as in
    function matching (Beyer et al. 2022): the view blended pixel by pixel (mixup) with a view of
    another photo of the same folder, the image's own weight λ drawn from Beta(``mix_alpha``,
    ``mix_alpha``) and folded into [0.5, 1], so the image still dominates the picture its title
    describes. The teacher's feature is computed on the blended picture itself.
    """

    def __init__(self, scale: Sequence[float] = (0.35, 1.0), jitter: float = 0.3, seed: int = 0,
                 mix: float = 0.0, mix_alpha: float = 1.0):
        from torchvision import transforms as T

        if not 0.0 <= mix <= 1.0 or mix_alpha <= 0:
            raise ValueError(f"mix must be in [0, 1] (--augment-mix) and mix_alpha > 0, got {mix}, {mix_alpha}")
        self.scale = (float(scale[0]), float(scale[1]))
        self.jitter = float(jitter)
        self.seed = int(seed)
        self.mix, self.mix_alpha = float(mix), float(mix_alpha)
        # The crop is sized per image in __call__; flip and jitter draw from torch's RNG, seeded there.
        self._flip_jitter = T.Compose([T.RandomHorizontalFlip(), T.ColorJitter(self.jitter, self.jitter, self.jitter)])
        self._pools: dict[str, list[int]] = {}

    def describe(self) -> dict:
        """What decides the pictures (part of the cache key; views without mixing keep their old key)."""
        out = {"v": _VIEW_VERSION, "scale": list(self.scale), "jitter": self.jitter, "seed": self.seed}
        if self.mix:
            out.update(mix=self.mix, mix_alpha=self.mix_alpha)
        return out

    def mixing(self, image_id: int, view: int, pool: Sequence[int]) -> tuple[int, float] | None:
        """``(partner image id, the image's own weight λ)`` if this view is a mixed one, else None.

        The partner is another id of ``pool`` (the folder's sorted ids); everything is fixed by
        (seed, image id, view), so every process and run draws the same.
        """
        if view == 0 or not self.mix or len(pool) < 2:
            return None
        rng = np.random.default_rng([self.seed, int(image_id), int(view), 0x6D6978])
        if rng.random() >= self.mix:
            return None
        pick = int(rng.integers(len(pool) - 1))
        partner = pool[pick] if pool[pick] != image_id else pool[-1]
        lam = float(rng.beta(self.mix_alpha, self.mix_alpha))
        return int(partner), max(lam, 1.0 - lam)

    def _plain_view(self, image, image_id: int, view: int):
        from torchvision.transforms import RandomResizedCrop
        from torchvision.transforms import functional as F

        with torch.random.fork_rng(devices=[]):  # every draw below is torch's: seed it, leave the caller's alone
            torch.manual_seed((self.seed * 1_000_003 + int(image_id)) * 1009 + int(view))
            top, left, h, w = RandomResizedCrop.get_params(image, self.scale, (3 / 4, 4 / 3))
            out = F.resized_crop(image, top, left, h, w, list(image.size[::-1]))
            return self._flip_jitter(out)

    def __call__(self, image, image_id: int, view: int, source: LmdbImages | None = None):
        """The ``view``-th augmented view of ``image`` (a PIL image); view 0 returns it unchanged.

        Args:
            image: The decoded image stored under ``image_id``.
            image_id: Its id.
            view: Which view (0 = the image itself).
            source: The folder the image comes from; needed with ``mix`` (the partner photo is read there).
        """
        if view == 0:
            return image
        out = self._plain_view(image, image_id, view)
        if not self.mix:
            return out
        if source is None:
            raise ValueError("mixed views need the images' folder: call with source=LmdbImages(...)")
        key = str(source.lmdb_dir)
        if key not in self._pools:
            self._pools[key] = source.ids()
        mixed = self.mixing(image_id, view, self._pools[key])
        if mixed is None:
            return out
        partner_id, lam = mixed
        other = self._plain_view(source.image(partner_id), partner_id, view).resize(out.size, Image.BICUBIC)
        return Image.blend(other, out, lam)  # (1 − λ) × partner + λ × image

    def __repr__(self) -> str:
        return f"ViewAugment({self.describe()})"


def epoch_views(n: int, views: int, seed: int, epoch: int) -> list[int]:
    """Which view (0..views) each of ``n`` samples shows in ``epoch``; fixed by (seed, epoch)."""
    if views <= 0:
        return [0] * n
    g = torch.Generator().manual_seed(seed * 7919 + epoch + 17)
    return torch.randint(0, views + 1, (n,), generator=g).tolist()


class LMDBImages(Dataset):
    """Every image of an LMDB folder once (no texts), for encoding and the teacher cache.

    With ``augment`` and ``views``, item ``i`` is image ``i // (views + 1)`` in view ``i % (views + 1)``.
    """

    def __init__(self, lmdb_dir: str | os.PathLike, transform: Callable, image_ids: list[int] | None = None,
                 augment: ViewAugment | None = None, views: int = 0):
        self.images = LmdbImages(lmdb_dir)
        self.transform = transform
        self.image_ids = list(image_ids) if image_ids is not None else self.images.ids()
        self.augment = augment
        self.views = int(views) if augment is not None else 0

    def __len__(self) -> int:
        return len(self.image_ids) * (self.views + 1)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        image_id = self.image_ids[i // (self.views + 1)]
        img = self.images.image(image_id)
        if self.augment is not None:
            img = self.augment(img, image_id, i % (self.views + 1), self.images)
        return image_id, self.transform(img)


def _dataset_fingerprint(lmdb_dir: Path) -> str:
    st = (lmdb_dir / "imgs" / "data.mdb").stat()
    return f"{lmdb_dir.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def teacher_cache_key(teacher, lmdb_dir: str | os.PathLike, augment: ViewAugment | None = None,
                      views: int = 0, autocast_dtype=None) -> str:
    """Cache key: (dataset fingerprint, teacher weights and preprocessing, views and their augmentation,
    the teacher's autocast dtype when not fp32)."""
    text = f"{_dataset_fingerprint(Path(lmdb_dir))}|{teacher.fingerprint()}"
    if views:
        text += f"|{views}|{json.dumps(augment.describe(), sort_keys=True)}"
    if autocast_dtype is not None:
        text += f"|{autocast_dtype}"
    return hashlib.sha256(text.encode()).hexdigest()[:20]


class TeacherFeatureCache:
    """The teacher's image features of one LMDB folder, memory-mapped from disk.

    Layout of ``{root}/{key}/``: ``features.npy`` — ``[N, D]`` float32, or
    ``[N, V + 1, D]`` with views — ``image_ids.npy`` ``[N]``, ``meta.json``
    (written last: its presence marks a complete cache).
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.features = np.load(self.path / "features.npy", mmap_mode="r")
        ids = np.load(self.path / "image_ids.npy")
        self.row = {int(i): r for r, i in enumerate(ids)}
        self.views = self.features.shape[1] - 1 if self.features.ndim == 3 else 0

    def lookup(self, image_ids: torch.Tensor, views: torch.Tensor | None = None) -> torch.Tensor:
        """Features ``[B, D]`` of these image ids (in these views; default the plain images)."""
        rows = [self.row[int(i)] for i in image_ids]
        if self.features.ndim == 2:
            return torch.from_numpy(np.ascontiguousarray(self.features[rows]))
        cols = [0] * len(rows) if views is None else [int(v) for v in views]
        return torch.from_numpy(np.ascontiguousarray(self.features[rows, cols]))


@torch.no_grad()
def build_teacher_cache(teacher, lmdb_dir: str | os.PathLike, root: str | os.PathLike, *, batch_size: int = 64,
                        num_workers: int = 0, d: Dist | None = None, autocast_dtype=None,
                        augment: ViewAugment | None = None, views: int = 0) -> TeacherFeatureCache:
    """Compute (or reuse) the teacher's features of every image in ``lmdb_dir`` (and of its views).

    Each DDP rank encodes its shard; rank 0 merges the shards and writes the
    cache atomically (temp folder + rename). Later epochs and later runs with
    the same data, teacher and views read it back without running the teacher.

    Args:
        teacher: A :class:`cnclip_kd.models.teachers.Teacher`.
        lmdb_dir: The ``lmdb/{split}`` folder.
        root: Folder of caches (one sub-folder per key).
        views: Augmented views per image besides the plain one (0: plain images only).
        augment: How views are drawn (required with ``views``).
    """
    d = d or Dist()
    if views and augment is None:
        raise ValueError("views > 0 needs augment (a ViewAugment)")
    lmdb_dir = Path(lmdb_dir)
    path = Path(root) / teacher_cache_key(teacher, lmdb_dir, augment, views, autocast_dtype)
    if (path / "meta.json").is_file():
        logger.info("teacher features: reusing cache %s", path)
        return TeacherFeatureCache(path)
    all_ids = LmdbImages(lmdb_dir).ids()
    shard = all_ids[d.rank::d.world_size]
    ds = LMDBImages(lmdb_dir, teacher.transform, shard, augment=augment if views else None, views=views)
    loader = DataLoader(ds, batch_size=batch_size, num_workers=num_workers)
    ids, feats = [], []
    what = f"teacher features, {views + 1} views" if views else "teacher features"
    for batch_ids, images in tqdm(loader, desc=f"{what} (rank {d.rank})", unit="batch", disable=not d.is_main):
        with autocast(d.device, autocast_dtype):
            f = teacher.encode_image(images.to(d.device, non_blocking=True))
        feats.append(f.float().cpu())
        ids.append(batch_ids)
    part_ids = torch.cat(ids).numpy()[:: views + 1]
    part_feats = torch.cat(feats).numpy()
    if views:
        part_feats = part_feats.reshape(len(part_ids), views + 1, -1)
    Path(root).mkdir(parents=True, exist_ok=True)
    if d.world_size > 1:
        parts_dir = Path(root) / f".parts-{path.name}"
        parts_dir.mkdir(exist_ok=True)
        np.save(parts_dir / f"ids-{d.rank}.npy", part_ids)
        np.save(parts_dir / f"feats-{d.rank}.npy", part_feats)
        barrier(d)
        if d.is_main:
            part_ids = np.concatenate([np.load(parts_dir / f"ids-{r}.npy") for r in range(d.world_size)])
            part_feats = np.concatenate([np.load(parts_dir / f"feats-{r}.npy") for r in range(d.world_size)])
    if d.is_main:
        # keep_existing: another run that finished first wrote the same features.
        with atomic_folder(path, keep_existing=True) as tmp:
            np.save(tmp / "features.npy", part_feats.astype(np.float32))
            np.save(tmp / "image_ids.npy", part_ids.astype(np.int64))
            (tmp / "meta.json").write_text(json.dumps({
                "teacher": teacher.name, "kind": teacher.kind, "embed_dim": int(part_feats.shape[-1]),
                "n_images": int(len(part_ids)), "views": int(views),
                "augment": augment.describe() if views else None, "lmdb": str(lmdb_dir.resolve()),
                "teacher_fingerprint": teacher.fingerprint(),
                "precision": str(autocast_dtype).replace("torch.", "") if autocast_dtype is not None else "fp32"},
                indent=1))
        if d.world_size > 1:
            shutil.rmtree(Path(root) / f".parts-{path.name}", ignore_errors=True)
        logger.info("teacher features: %d images × %d views × %d written to %s", len(part_ids), views + 1,
                    part_feats.shape[-1], path)
    barrier(d)
    return TeacherFeatureCache(path)
