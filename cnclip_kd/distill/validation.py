"""Validation during and after training: encode a split, category P@k and teacher agreement."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.utils.data import DataLoader

from ..core.distributed import autocast as _autocast
from ..core.metrics import image_to_image_metrics, neighbour_agreement
from ..data.dataset import read_labels
from ..models.students import (
    encode_images,
    image_transform,
)
from .teacher_cache import LMDBImages


def data_dir_of(lmdb_dir: Path) -> Path:
    # prepare writes {data}/lmdb/{split}; labels.csv lives in {data}.
    return lmdb_dir.resolve().parent.parent


@torch.no_grad()
def encode_split(encode: Callable[[torch.Tensor], torch.Tensor], transform: Callable, lmdb_dir: str | os.PathLike, *,
                 batch_size: int = 128, num_workers: int = 0, device: torch.device | str = "cpu",
                 autocast_dtype=None) -> tuple[list[int], torch.Tensor]:
    """Image ids and features (``[N, D]`` float32, on the CPU) of every image in an ``lmdb/{split}`` folder."""
    ds = LMDBImages(lmdb_dir, transform)
    ids, feats = [], []
    device = torch.device(device)
    for batch_ids, images in DataLoader(ds, batch_size=batch_size, num_workers=num_workers):
        with _autocast(device, autocast_dtype):
            feats.append(encode(images.to(device)).float().cpu())
        ids += batch_ids.tolist()
    return ids, torch.cat(feats)


def evaluate_encoder(encode: Callable[[torch.Tensor], torch.Tensor], transform: Callable,
                     lmdb_dir: str | os.PathLike, *, batch_size: int = 128, num_workers: int = 0,
                     device: torch.device | str = "cpu", autocast_dtype=None, k: int = 10,
                     reference: torch.Tensor | None = None) -> dict:
    """Image→image category metrics (P@k, mAP@k, R@1/5/10) of any image encoder on a prepared split.

    Args:
        encode: Batch of transformed images → features (student or teacher).
        transform: PIL image → tensor, the encoder's own preprocessing.
        lmdb_dir: An ``lmdb/{split}`` folder; labels come from the ``labels.csv``
            that ``prepare`` wrote beside ``lmdb/``.
        reference: Another encoder's features of the same split in the same order (e.g. the teacher's,
            from :func:`encode_split`); then ``"teacher@k"`` is added: the mean share of each image's
            top-k neighbours that the reference also ranks in its top k (:func:`neighbour_agreement`).
    """
    ids, feats = encode_split(encode, transform, lmdb_dir, batch_size=batch_size, num_workers=num_workers,
                              device=device, autocast_dtype=autocast_dtype)
    return split_metrics(ids, feats, lmdb_dir, k=k, reference=reference)


def split_metrics(ids: Sequence[int], feats: torch.Tensor, lmdb_dir: str | os.PathLike, *, k: int = 10,
                  reference: torch.Tensor | None = None) -> dict:
    """:func:`evaluate_encoder`'s metrics from features already computed with :func:`encode_split`."""
    lmdb_dir = Path(lmdb_dir)
    labels = {r["image_id"]: r["label"] for r in read_labels(data_dir_of(lmdb_dir))}
    missing = [i for i in ids if i not in labels]
    if missing:
        raise ValueError(f"{lmdb_dir}: {len(missing)} image ids have no label in labels.csv (e.g. {missing[:3]})")
    out = image_to_image_metrics(feats, [labels[i] for i in ids], k=k)
    if reference is not None:
        out[f"teacher@{k}"] = neighbour_agreement(feats, reference, k=k)
    return out


def evaluate_lmdb(model: torch.nn.Module, lmdb_dir: str | os.PathLike, *, resolution: int, **kwargs) -> dict:
    """:func:`evaluate_encoder` for a cn_clip model (its features L2-normalised)."""
    model.eval()
    return evaluate_encoder(lambda x: encode_images(model, x), image_transform(resolution), lmdb_dir, **kwargs)
