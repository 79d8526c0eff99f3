"""Image–text training pairs read from a prepared LMDB split, and the epoch's batches."""

from __future__ import annotations

import hashlib
import math
import os
import pickle
import unicodedata
from pathlib import Path
from typing import Callable

import lmdb
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..core.tokenizer import preprocess_text
from ..data.dataset import LmdbImages
from .teacher_cache import ViewAugment

# --------------------------------------------------------------------------- data


def title_key(text: str) -> int:
    """A stable signed 64-bit key of a title: equal for titles that read the same.

    The title is normalised (Unicode NFKC, so full-width letters and spaces
    become half-width; stripped; whitespace runs collapsed to one space;
    lowercased) and hashed with blake2b (8 bytes). Unlike ``hash()``, the
    key is the same in every process and run, so DataLoader workers and DDP
    ranks agree.

    Args:
        text: The title (caption) of a sample.

    Returns:
        An int in the int64 range, usable as ``torch.long``.
    """
    norm = " ".join(unicodedata.normalize("NFKC", text).split()).lower()
    digest = hashlib.blake2b(norm.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


class LMDBPairs(Dataset):
    """Image–text pairs from a cn_clip LMDB folder (``imgs`` + ``pairs``), as cn_clip's LMDBDataset reads them.

    Unlike cn_clip's class it also returns the sample index and image id (for
    the teacher cache), can return the teacher's own view of the image, and
    opens LMDB lazily so DataLoader workers each get their own handle. With
    ``views``, an index may be ``(index, view)``: the sample shown in that seeded
    augmented view (see :class:`cnclip_kd.distill.teacher_cache.ViewAugment`). With
    ``memory_mb``, finished samples (deterministic ones only: not with
    ``augment``) are kept in memory up to that size, so small datasets decode
    and transform each (image, view) once instead of every epoch.
    """

    def __init__(self, lmdb_dir: str | os.PathLike, *, transform: Callable, context_length: int = 52,
                 teacher_transform: Callable | None = None, augment: Callable | None = None,
                 views: ViewAugment | None = None, memory_mb: float = 0):
        self.lmdb_dir = Path(lmdb_dir)
        for sub in ("imgs", "pairs"):
            if not (self.lmdb_dir / sub).is_dir():
                raise FileNotFoundError(f"{self.lmdb_dir / sub}: missing; is {self.lmdb_dir} an lmdb/<split> "
                                        "folder written by `cnclip-kd prepare`?")
        self.transform = transform
        self.teacher_transform = teacher_transform
        self.augment = augment
        self.views = views
        self.context_length = context_length
        self._memory: dict = {}
        self._memory_left = 0 if augment is not None else int(memory_mb * 2 ** 20)
        self.images = LmdbImages(self.lmdb_dir)
        self._txn_pairs = None
        env = lmdb.open(str(self.lmdb_dir / "pairs"), readonly=True, lock=False, readahead=False)
        with env.begin() as txn:
            self.n_pairs = int(txn.get(b"num_samples").decode())
        env.close()

    def __len__(self) -> int:
        return self.n_pairs

    def pair(self, index: int) -> tuple[int, int, str]:
        """``(image_id, text_id, text)`` of sample ``index``."""
        if self._txn_pairs is None:
            self._env_pairs = lmdb.open(str(self.lmdb_dir / "pairs"), readonly=True, lock=False, readahead=False,
                                        meminit=False)
            self._txn_pairs = self._env_pairs.begin(buffers=True)
        return pickle.loads(bytes(self._txn_pairs.get(str(index).encode())))

    def image(self, image_id: int) -> Image.Image:
        """The decoded RGB image stored under ``image_id``."""
        return self.images.image(image_id)

    def __getitem__(self, index: int | tuple[int, int]) -> dict:
        from cn_clip.clip import tokenize

        index, view = index if isinstance(index, tuple) else (index, 0)
        if (index, view) in self._memory:
            return self._memory[(index, view)]
        image_id, _, text = self.pair(index)
        img = self.image(image_id)
        if view:
            if self.views is None:
                raise ValueError(f"sample {index} asked in view {view}, but this dataset has no views")
            img = self.views(img, image_id, view, self.images)
        if self.augment is not None:
            img = self.augment(img)
        item = {"index": index, "image_id": image_id, "view": view, "image": self.transform(img),
                "text": tokenize([preprocess_text(text)], context_length=self.context_length)[0],
                # Equal titles are positives of each other with TrainConfig.title_positives.
                "title_key": torch.tensor(title_key(text), dtype=torch.long)}
        if self.teacher_transform is not None:
            item["teacher_image"] = self.teacher_transform(img)
        size = sum(v.numel() * v.element_size() for v in item.values() if torch.is_tensor(v))
        if size <= self._memory_left:
            self._memory[(index, view)] = item
            self._memory_left -= size
        return item

    def __getstate__(self):
        # LMDB handles cannot cross process boundaries; workers reopen them.
        state = {k: v for k, v in self.__dict__.items() if k != "_env_pairs"}
        state["_txn_pairs"] = None
        state["_memory"], state["_memory_left"] = {}, 0
        return state


def epoch_batches(n: int, global_batch: int, seed: int, epoch: int) -> list[list[int]]:
    """The global batches of one epoch: a seeded permutation, padded by wrapping to whole batches.

    The same (n, batch, seed, epoch) always gives the same batches, which is
    what makes a resumed run continue exactly where it stopped.
    """
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    steps = max(1, math.ceil(n / global_batch))
    order = (order * (1 + steps * global_batch // max(n, 1)))[: steps * global_batch]
    return [order[i * global_batch:(i + 1) * global_batch] for i in range(steps)]


def train_augmentation(resolution: int) -> Callable:
    from timm.data.auto_augment import auto_augment_transform
    from torchvision import transforms as T

    return T.Compose([
        T.RandomResizedCrop(resolution, scale=(0.9, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        auto_augment_transform("original", {"translate_const": int(resolution * 0.45), "img_mean": (124, 116, 104)}),
    ])
