"""Readers of a prepared dataset (``labels.csv``, ``lmdb/{split}``) that every later stage uses."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
from pathlib import Path
from typing import Iterable, Iterator

import lmdb
from PIL import Image

SPLITS = ("train", "valid", "test")


class DataError(ValueError):
    """An input that cannot be prepared at all (as opposed to one skipped row)."""


# --------------------------------------------------------------------------- reading inputs


def read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(
            f"{path}: not UTF-8 (bad byte 0x{raw[err.start]:02x} at line {line}). "
            f"Save the file as UTF-8, e.g. `iconv -f GBK -t UTF-8 {path.name} > {path.stem}.utf8{path.suffix}`."
        ) from None


def read_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, row)`` from a CSV or JSONL manifest."""
    text = read_text(path)
    if path.suffix.lower() == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{n}: not valid JSON ({err.msg}); each line must be one JSON object") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{n}: expected a JSON object per line, got {type(row).__name__}")
            yield n, row
        return
    reader = csv.DictReader(text.splitlines())
    for row in reader:
        yield reader.line_num, row


def read_labels(data_dir: str | os.PathLike, split: str | None = None) -> list[dict]:
    """Read ``labels.csv`` of a prepared dataset (``image_id`` as int), optionally one split."""
    path = Path(data_dir) / "labels.csv"
    if not path.is_file():
        raise DataError(f"{path}: missing; run `cnclip-kd prepare` (or notebook 01) first")
    rows = []
    for _, row in read_rows(path):
        if split is None or row["split"] == split:
            row["image_id"] = int(row["image_id"])
            rows.append(row)
    return rows


class LmdbImages:
    """Read-only access to the ``imgs`` LMDB of an ``lmdb/{split}`` folder, opened lazily per process.

    Used by training, the teacher cache, gallery embedding and display alike.
    LMDB handles cannot cross process boundaries, so DataLoader workers reopen
    them (see ``__getstate__``).
    """

    def __init__(self, lmdb_dir: str | os.PathLike):
        self.lmdb_dir = Path(lmdb_dir)
        self._env = self._txn = None

    def _begin(self):
        if self._txn is None:
            self._env = lmdb.open(str(self.lmdb_dir / "imgs"), readonly=True, lock=False, readahead=False,
                                  meminit=False)
            self._txn = self._env.begin(buffers=True)
        return self._txn

    def get(self, image_id: int) -> bytes:
        """The encoded image stored under ``image_id``."""
        value = self._begin().get(str(int(image_id)).encode())
        if value is None:
            raise KeyError(f"image id {image_id} is not in {self.lmdb_dir / 'imgs'}")
        return base64.urlsafe_b64decode(bytes(value))

    def image(self, image_id: int) -> Image.Image:
        """The decoded RGB image stored under ``image_id``."""
        return Image.open(io.BytesIO(self.get(image_id))).convert("RGB")

    def ids(self) -> list[int]:
        """All stored image ids, sorted (through a short-lived handle: forked workers must not inherit one)."""
        env = lmdb.open(str(self.lmdb_dir / "imgs"), readonly=True, lock=False, readahead=False)
        try:
            with env.begin() as txn:
                return sorted(int(k) for k in txn.cursor().iternext(values=False) if k != b"num_images")
        finally:
            env.close()

    def __getstate__(self):
        return {"lmdb_dir": self.lmdb_dir, "_env": None, "_txn": None}


def iter_lmdb_images(lmdb_dir: str | os.PathLike) -> Iterable[tuple[int, bytes]]:
    """Yield ``(image_id, jpeg_bytes)`` from an ``lmdb/{split}`` folder, in key order."""
    env = lmdb.open(str(Path(lmdb_dir) / "imgs"), readonly=True, lock=False, readahead=False)
    try:
        with env.begin() as txn:
            for key, value in txn.cursor():
                if key == b"num_images":
                    continue
                yield int(key.decode("utf-8")), base64.urlsafe_b64decode(bytes(value))
    finally:
        env.close()


def read_split(data_dir: str | os.PathLike, split: str) -> list[dict]:
    """Rows of ``labels.csv`` for one split, each with its stored image bytes under ``"image"``.

    The images come from the split's LMDB, so this works for every input kind
    (MUGE input has no source files to point at).
    """
    rows = read_labels(data_dir, split)
    images = dict(iter_lmdb_images(Path(data_dir) / "lmdb" / split))
    return [{**row, "image": images[row["image_id"]]} for row in rows if row["image_id"] in images]
