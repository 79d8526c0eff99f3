"""Atomic file writes: a temp file beside the target, then one rename, so a killed run never leaves half a file."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "atomic_folder", "atomic_save_npy", "atomic_write_json", "atomic_write_text", "load_stamped", "save_stamped",
    "swap_into_place",
]


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """``np.save`` to ``path`` through a temp file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            np.save(fh, array)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` through a temp file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    """``data`` as indented UTF-8 JSON (non-ASCII kept), written atomically."""
    atomic_write_text(path, json.dumps(data, ensure_ascii=False, indent=1, default=str))


def load_stamped(array_path: str | os.PathLike, key: str, shape: tuple) -> np.ndarray | None:
    """A cached array saved by :func:`save_stamped`, or ``None`` when it is missing, unreadable, or was made
    for another key (another model, gallery or text list) or shape."""
    array_path = Path(array_path)
    stamp = array_path.with_suffix(".json")
    if not (array_path.is_file() and stamp.is_file()):
        return None
    try:
        if json.loads(stamp.read_text(encoding="utf-8")).get("key") != key:
            return None
        array = np.load(array_path)
    except (OSError, ValueError):
        return None
    return array if array.shape == tuple(shape) else None


def save_stamped(array_path: str | os.PathLike, array: np.ndarray, key: str, **facts: Any) -> None:
    """Save a cache array and, after it, its stamp (``<name>.json``: ``key`` plus ``facts``), each atomically;
    the stamp is written last, so a half-finished save is never taken for a valid cache."""
    array_path = Path(array_path)
    atomic_save_npy(array_path, array)
    atomic_write_json(array_path.with_suffix(".json"), {"key": key, **facts})


def swap_into_place(tmp: Path, out_dir: Path) -> None:
    """Replace ``out_dir`` by ``tmp`` with renames only, so a crash leaves old or new, never half."""
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
        try:
            os.replace(tmp, out_dir)
        except BaseException:
            os.replace(old, out_dir)  # put the previous dataset back rather than leave it hidden
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


@contextlib.contextmanager
def atomic_folder(out_dir: str | os.PathLike, *, keep_existing: bool = False) -> Iterator[Path]:
    """A temp folder beside ``out_dir`` to fill; when the block ends it becomes ``out_dir`` in one rename.

    On an error the temp folder is removed and ``out_dir`` is left as it was. The folder gets the permissions of
    any new folder (``mkdtemp`` alone makes it 0700).

    Args:
        out_dir: The folder to write.
        keep_existing: If ``out_dir`` exists when the block ends (another process finished the same work first),
            keep it and drop ours; otherwise replace it (:func:`swap_into_place`).
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        yield tmp
        if keep_existing and out_dir.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
