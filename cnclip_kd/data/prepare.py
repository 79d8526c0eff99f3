"""Data preparation: user photos + Chinese titles → Chinese-CLIP's MUGE files and LMDB.

Three inputs a user really has are read into one list of :class:`Record`:

* a folder with one sub-folder per category (titles from a template, or from
  an optional captions file);
* a CSV or JSONL manifest (``image``, ``text``, optional ``label``,
  ``product_id``, ``image_id``); a folder holding ``manifest.csv`` or
  ``manifest.jsonl`` is read as that manifest;
* data already in Chinese-CLIP's MUGE format (``{split}_imgs.tsv`` +
  ``{split}_texts.jsonl``), whose splits are kept.

:func:`prepare_dataset` checks every image, splits (deterministic, stratified
by category, grouped by product id), and writes into an output folder:
``{split}_imgs.tsv``/``{split}_texts.jsonl`` (MUGE), ``labels.csv`` (image id →
split, category, product id, caption, source), ``lmdb/{split}/{imgs,pairs}``
exactly as cn_clip's ``preprocess/build_lmdb_dataset.py`` writes them, and
``report.json``. The folder is built beside the target and renamed into place,
so an interrupted run never leaves a half-written dataset that looks complete.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import logging
import os
import pickle
import random
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import lmdb
from PIL import Image
from tqdm.auto import tqdm

from ..core.files import atomic_folder
from ..core.images import DEFAULT_MAX_PIXELS, BadImageError, encode_jpeg, fit_max_side, load_image
from .dataset import SPLITS, DataError, read_rows, read_text

logger = logging.getLogger(__name__)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MANIFEST_NAMES = ("manifest.csv", "manifest.jsonl")
FORMAT_VERSION = 1


@dataclass
class Record:
    """One image with its caption(s), before splitting.

    Attributes:
        source: Image file path, or ``"<muge:split:image_id>"`` for MUGE input.
        texts: Chinese captions (at least one; none for photos read with ``unlabelled``).
        label: Category, or ``""`` when unknown.
        product_id: Product id; images of one product never go to two splits.
        origin: Where the record came from, e.g. ``"manifest.csv:12"``.
        image_id: A numeric id given by the input, if any.
        data: Encoded image bytes (MUGE input), instead of a file.
        split: Split given by the input (MUGE), else ``None``.
    """

    source: str
    texts: list[str]
    label: str = ""
    product_id: str = ""
    origin: str = ""
    image_id: int | None = None
    data: bytes | None = field(default=None, repr=False)
    split: str | None = None


@dataclass
class Skipped:
    """An input that was left out, and why."""

    source: str
    reason: str


@dataclass
class PrepareReport:
    """What :func:`prepare_dataset` did.

    Attributes:
        out_dir: The dataset folder.
        counts: ``{split: {label: n_images}}``.
        n_images: Images written (all splits).
        n_texts: Image–text pairs written (all splits).
        skipped: Inputs left out, each with its reason.
        reused: True when the folder was already up to date and nothing was rebuilt.
    """

    out_dir: str
    counts: dict[str, dict[str, int]]
    n_images: int
    n_texts: int
    skipped: list[Skipped]
    reused: bool = False

    @property
    def categories(self) -> list[str]:
        """Sorted category labels present in any split."""
        return sorted({label for per in self.counts.values() for label in per})

    def to_dict(self) -> dict:
        d = asdict(self)
        d["categories"] = self.categories
        return d

    def to_markdown(self) -> str:
        """Counts per category and split, then the skipped inputs, as Markdown tables."""
        splits = [s for s in SPLITS if s in self.counts] + [s for s in self.counts if s not in SPLITS]
        lines = ["| 类目 category | " + " | ".join(splits) + " | 合计 total |",
                 "|---|" + "---:|" * (len(splits) + 1)]
        for label in self.categories:
            row = [self.counts[s].get(label, 0) for s in splits]
            lines.append(f"| {label or '(无 none)'} | " + " | ".join(map(str, row)) + f" | {sum(row)} |")
        totals = [sum(self.counts[s].values()) for s in splits]
        lines.append("| **合计 total** | " + " | ".join(f"**{t}**" for t in totals) + f" | **{sum(totals)}** |")
        lines.append("")
        lines.append(f"跳过 skipped: {len(self.skipped)}")
        if self.skipped:
            lines += ["", "| 输入 input | 原因 reason |", "|---|---|"]
            lines += [f"| `{s.source}` | {s.reason} |" for s in self.skipped]
        return "\n".join(lines)


def read_manifest(path: str | os.PathLike, skipped: list[Skipped] | None = None, *,
                  unlabelled: bool = False) -> list[Record]:
    """Read a CSV or JSONL manifest into records.

    Columns: ``image`` (path, relative to the manifest's folder or absolute)
    and ``text`` are required; ``label``, ``product_id`` and ``image_id`` are
    optional. Several rows naming the same image give that image several
    captions.

    Args:
        path: The ``.csv`` or ``.jsonl`` file.
        skipped: A list that receives rows left out (missing image, empty
            caption, duplicate id), each with its reason.
        unlabelled: Photos without titles (e.g. for the KD term only): only ``image`` is
            required, and a row without a caption is kept (its ``texts`` empty).

    Returns:
        One record per distinct image.

    Raises:
        DataError: The file is not UTF-8, is malformed, or lacks a required column.
    """
    path = Path(path)
    skipped = skipped if skipped is not None else []
    if not path.is_file():
        raise DataError(f"{path}: manifest not found")
    root = path.parent
    by_image: dict[str, Record] = {}
    ids: dict[int, tuple[str, str]] = {}
    checked_columns = False
    for n, row in read_rows(path):
        origin = f"{path.name}:{n}"
        if not checked_columns:
            missing = [c for c in (("image",) if unlabelled else ("image", "text")) if c not in row]
            if missing:
                raise DataError(
                    f"{path}: missing required column(s) {missing}; found {sorted(row)}. "
                    "A manifest needs `image` (path) and `text` (Chinese caption); "
                    "`label`, `product_id`, `image_id` are optional."
                )
            checked_columns = True
        image = str(row.get("image") or "").strip()
        text = str(row.get("text") or "").strip()
        if not image:
            skipped.append(Skipped(origin, "empty image path"))
            continue
        image_path = Path(image) if Path(image).is_absolute() else root / image
        source = str(image_path)
        if not text and not unlabelled:
            skipped.append(Skipped(f"{origin} ({image})", "empty caption"))
            continue
        if not image_path.is_file():
            skipped.append(Skipped(f"{origin} ({image})", "image file not found"))
            continue
        image_id = None
        raw_id = str(row.get("image_id") or "").strip()
        if raw_id:
            try:
                image_id = int(raw_id)
            except ValueError:
                skipped.append(Skipped(origin, f"image_id {raw_id!r} is not an integer"))
                continue
            first = ids.get(image_id)
            if first is not None and first[0] != source:
                skipped.append(Skipped(f"{origin} ({image})",
                                       f"duplicate image_id {image_id} (first used at {first[1]})"))
                continue
            ids[image_id] = (source, origin)
        rec = by_image.get(source)
        if rec is None:
            by_image[source] = Record(
                source=source, texts=[text] if text else [], label=str(row.get("label") or "").strip(),
                product_id=str(row.get("product_id") or "").strip(), origin=origin, image_id=image_id,
            )
        elif text in rec.texts or not text:
            skipped.append(Skipped(f"{origin} ({image})", f"duplicate row (same image and caption as {rec.origin})"))
        else:
            rec.texts.append(text)
    if not checked_columns:
        raise DataError(f"{path}: the manifest has no rows")
    return list(by_image.values())


def read_folder(
    root: str | os.PathLike,
    *,
    caption_template: str = "{label}",
    captions: str | os.PathLike | None = None,
    skipped: list[Skipped] | None = None,
    unlabelled: bool = False,
) -> list[Record]:
    """Read a folder with one sub-folder per category.

    Args:
        root: The folder; each sub-folder name is a category label.
        caption_template: Caption for images without one in ``captions``;
            ``{label}`` is replaced by the sub-folder name, e.g. ``"{label} 商品图"``.
        captions: Optional CSV/JSONL with ``image`` (path relative to ``root``)
            and ``text`` columns giving per-image captions.
        skipped: Receives files left out, with reasons.
        unlabelled: Photos without titles: images directly in ``root`` are read too (label ``""``), and a
            folder without sub-folders is no error (an empty one gives no records).

    Returns:
        One record per image file, each its own product.
    """
    root = Path(root)
    skipped = skipped if skipped is not None else []
    given: dict[str, list[str]] = {}
    if captions is not None:
        for n, row in read_rows(Path(captions)):
            if "image" not in row or "text" not in row:
                raise DataError(f"{captions}: captions file needs `image` and `text` columns; found {sorted(row)}")
            if str(row["text"]).strip():
                given.setdefault(Path(str(row["image"]).strip()).as_posix(), []).append(str(row["text"]).strip())
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if unlabelled:
        folders = [root, *folders]
    elif not folders:
        raise DataError(
            f"{root}: no category sub-folders, no manifest.csv/manifest.jsonl and no MUGE *_imgs.tsv; "
            "put images in <root>/<category>/*.jpg or pass a manifest"
        )
    records = []
    for folder in folders:
        for f in sorted(folder.glob("*") if folder == root else folder.rglob("*")):
            if not f.is_file() or f.name.startswith("."):
                continue
            rel = f.relative_to(root).as_posix()
            if f.suffix.lower() not in IMAGE_EXTENSIONS:
                skipped.append(Skipped(rel, f"not an image extension ({f.suffix or 'none'})"))
                continue
            label = "" if folder == root else folder.name
            texts = given.get(rel) or [caption_template.format(label=label)]
            records.append(Record(source=str(f), texts=texts, label=label,
                                  product_id=rel, origin=rel))
    return records


def read_muge(root: str | os.PathLike, skipped: list[Skipped] | None = None) -> list[Record]:
    """Read data already in MUGE format (``{split}_imgs.tsv`` + ``{split}_texts.jsonl``).

    Splits are kept as given. A ``labels.csv`` (``image_id,label[,product_id]``)
    beside them, if present, supplies categories.
    """
    root = Path(root)
    skipped = skipped if skipped is not None else []
    labels: dict[int, dict] = {}
    if (root / "labels.csv").is_file():
        for _, row in read_rows(root / "labels.csv"):
            try:
                labels[int(row["image_id"])] = row
            except (KeyError, ValueError):
                raise DataError(f"{root / 'labels.csv'}: needs an integer `image_id` column") from None
    records: list[Record] = []
    seen: dict[int, str] = {}  # image id -> where first seen, across all splits
    for split in SPLITS:
        tsv, jsonl = root / f"{split}_imgs.tsv", root / f"{split}_texts.jsonl"
        if not tsv.exists():
            continue
        if not jsonl.exists():
            raise DataError(f"{jsonl}: missing; MUGE data needs {split}_texts.jsonl beside {tsv.name}")
        texts: dict[int, list[str]] = defaultdict(list)
        for n, obj in read_rows(jsonl):
            missing = [k for k in ("text_id", "text", "image_ids") if k not in obj]
            if missing:
                raise DataError(f"{jsonl}:{n}: missing field(s) {missing}")
            if not str(obj["text"]).strip():
                skipped.append(Skipped(f"{jsonl.name}:{n}", "empty caption"))
                continue
            for image_id in obj["image_ids"]:
                texts[int(image_id)].append(str(obj["text"]).strip())
        for n, line in enumerate(read_text(tsv).splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split("\t")
            origin = f"{tsv.name}:{n}"
            if len(parts) != 2:
                skipped.append(Skipped(origin, "expected `image_id<TAB>base64`"))
                continue
            try:
                image_id = int(parts[0])
                data = base64.urlsafe_b64decode(parts[1].strip())
            except ValueError as err:
                skipped.append(Skipped(origin, f"bad image id or base64 ({err})"))
                continue
            if image_id in seen:
                skipped.append(Skipped(origin, f"duplicate image_id {image_id} (first at {seen[image_id]})"))
                continue
            seen[image_id] = origin
            if not texts.get(image_id):
                skipped.append(Skipped(origin, f"image_id {image_id} has no caption in {jsonl.name}"))
                continue
            meta = labels.get(image_id, {})
            records.append(Record(
                source=f"<muge:{split}:{image_id}>", texts=texts[image_id], label=str(meta.get("label") or ""),
                product_id=str(meta.get("product_id") or ""), origin=origin, image_id=image_id,
                data=data, split=split,
            ))
    return records


def read_source(
    source: str | os.PathLike,
    *,
    caption_template: str = "{label}",
    captions: str | os.PathLike | None = None,
    skipped: list[Skipped] | None = None,
    unlabelled: bool = False,
) -> list[Record]:
    """Read any supported input, deciding the kind from what is there.

    A ``.csv``/``.jsonl`` file is a manifest; a folder with ``*_imgs.tsv`` is
    MUGE data; a folder with ``manifest.csv``/``manifest.jsonl`` is that
    manifest; any other folder is read as one sub-folder per category. With
    ``unlabelled`` no title is needed (see :func:`read_manifest`, :func:`read_folder`).
    """
    source = Path(source)
    if source.is_file():
        if source.suffix.lower() not in (".csv", ".jsonl"):
            raise DataError(f"{source}: a manifest must be .csv or .jsonl")
        return read_manifest(source, skipped, unlabelled=unlabelled)
    if not source.is_dir():
        raise DataError(f"{source}: no such file or folder")
    if any(source.glob("*_imgs.tsv")):
        return read_muge(source, skipped)
    for name in MANIFEST_NAMES:
        if (source / name).is_file():
            return read_manifest(source / name, skipped, unlabelled=unlabelled)
    return read_folder(source, caption_template=caption_template, captions=captions, skipped=skipped,
                       unlabelled=unlabelled)


# --------------------------------------------------------------------------- splitting


def assign_splits(
    records: Sequence[Record], *, valid_frac: float = 0.1, test_frac: float = 0.1, seed: int = 0
) -> list[str]:
    """Split records deterministically, stratified by category, grouped by product id.

    All images of one product go to the same split. Within each category the
    products are shuffled with ``seed`` and the first ``round(n * test_frac)``
    go to test, the next ``round(n * valid_frac)`` to valid, the rest to train
    (train keeps at least one product per category). Records that carry a
    split (MUGE input) keep it.

    Returns:
        The split name of each record, in order.
    """
    if not (0 <= valid_frac < 1 and 0 <= test_frac < 1 and valid_frac + test_frac < 1):
        raise ValueError(f"valid_frac={valid_frac} and test_frac={test_frac} must be in [0, 1) and sum below 1")
    groups: dict[str, list[int]] = defaultdict(list)
    for i, rec in enumerate(records):
        groups[rec.product_id or rec.source].append(i)
    by_label: dict[str, list[str]] = defaultdict(list)
    for key, idx in groups.items():
        # A product's category: its most common label (ties by name).
        labels = Counter(records[i].label for i in idx)
        label = min(labels, key=lambda x: (-labels[x], x))
        by_label[label].append(key)
    splits: list[str] = [""] * len(records)
    for label in sorted(by_label):
        keys = sorted(by_label[label])
        random.Random(f"{seed}:{label}").shuffle(keys)
        n = len(keys)
        n_test = round(n * test_frac)
        n_valid = round(n * valid_frac)
        while n_test + n_valid >= n and (n_test or n_valid):
            if n_valid >= n_test and n_valid:
                n_valid -= 1
            else:
                n_test -= 1
        for rank, key in enumerate(keys):
            split = "test" if rank < n_test else "valid" if rank < n_test + n_valid else "train"
            for i in groups[key]:
                splits[i] = records[i].split or split
    return splits


# --------------------------------------------------------------------------- writing


def _encode_record(rec: Record, max_side: int | None, max_pixels: int) -> bytes:
    """Decode, check and (if needed) re-encode one image; returns JPEG bytes."""
    name = rec.origin if rec.data is not None else rec.source
    raw = rec.data if rec.data is not None else Path(rec.source).read_bytes()
    img = load_image(raw, max_pixels=max_pixels, name=name)
    small = fit_max_side(img, max_side)
    # Keep the original bytes when they already are a plain, upright, small
    # enough RGB JPEG: re-encoding would only lose quality.
    if small is img and raw[:3] == b"\xff\xd8\xff":
        with Image.open(io.BytesIO(raw)) as probe:
            orientation = probe.getexif().get(0x0112, 1)
            if probe.mode == "RGB" and orientation == 1:
                return raw
    return encode_jpeg(small)


def write_lmdb_split(split_dir: Path, images: list[tuple[int, str]], pairs: list[tuple[int, int, str]]) -> None:
    """Write ``imgs`` and ``pairs`` LMDBs exactly as cn_clip's build_lmdb_dataset.py does."""
    total = sum(len(b) for _, b in images) + sum(len(t) * 4 + 64 for *_, t in pairs)
    map_size = max(total * 2, 1 << 24) + (1 << 24)
    env = lmdb.open(str(split_dir / "pairs"), map_size=map_size)
    with env.begin(write=True) as txn:
        for idx, pair in enumerate(pairs):
            txn.put(str(idx).encode("utf-8"), pickle.dumps(pair))
        txn.put(b"num_samples", str(len(pairs)).encode("utf-8"))
    env.close()
    env = lmdb.open(str(split_dir / "imgs"), map_size=map_size)
    with env.begin(write=True) as txn:
        for image_id, b64 in images:
            txn.put(str(image_id).encode("utf-8"), b64.encode("utf-8"))
        txn.put(b"num_images", str(len(images)).encode("utf-8"))
    env.close()


def _fingerprint(records: Sequence[Record], params: dict, skipped: Sequence[Skipped] = ()) -> str:
    h = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
    # Rows skipped while reading count too: a new bad row must show in a fresh report.
    h.update(json.dumps([[s.source, s.reason] for s in skipped], ensure_ascii=False).encode())
    for rec in records:
        h.update(json.dumps([rec.source, rec.texts, rec.label, rec.product_id, rec.image_id, rec.split],
                            ensure_ascii=False).encode())
        if rec.data is not None:
            h.update(hashlib.sha256(rec.data).digest())
        else:
            st = os.stat(rec.source)
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _load_report(out_dir: Path) -> PrepareReport:
    d = json.loads((out_dir / "report.json").read_text(encoding="utf-8"))
    return PrepareReport(out_dir=str(out_dir), counts=d["counts"], n_images=d["n_images"], n_texts=d["n_texts"],
                         skipped=[Skipped(**s) for s in d["skipped"]], reused=True)


def _up_to_date(out_dir: Path, fingerprint: str, force: bool) -> PrepareReport | None:
    """The report of ``out_dir`` when it already holds this exact dataset (and ``force`` is off), else ``None``.

    Raises:
        DataError: ``out_dir`` exists, is not empty and was not written by :func:`prepare_dataset`.
    """
    if not out_dir.exists():
        return None
    stamp = out_dir / "prepare.json"
    if not stamp.is_file():
        if any(out_dir.iterdir()):
            raise DataError(f"{out_dir}: exists, is not empty and was not written by prepare_dataset; "
                            "choose another output folder or empty it")
    elif not force and json.loads(stamp.read_text(encoding="utf-8")).get("fingerprint") == fingerprint:
        logger.info("%s is up to date; nothing to do", out_dir)
        return _load_report(out_dir)
    return None


def encode_all(records: Sequence[Record], skipped: list[Skipped], *, max_side: int | None, max_pixels: int,
               num_workers: int | None) -> list[tuple[Record, bytes]]:
    """Decode every image once on ``num_workers`` threads: bad ones go to ``skipped``, good ones are encoded.

    Returns:
        ``(record, JPEG bytes)`` of every usable image, in input order.
    """
    workers = num_workers or os.cpu_count() or 1

    def work(rec: Record) -> bytes | Skipped:
        try:
            return _encode_record(rec, max_side, max_pixels)
        except BadImageError as err:
            return Skipped(rec.origin if rec.data is not None else rec.source, err.reason)
        except OSError as err:
            return Skipped(rec.source, f"cannot read: {err}")

    with ThreadPoolExecutor(workers) as pool:
        results = list(tqdm(pool.map(work, records), total=len(records), desc="checking images", unit="img"))
    good: list[tuple[Record, bytes]] = []
    for rec, res in zip(records, results):
        if isinstance(res, Skipped):
            skipped.append(res)
        else:
            good.append((rec, res))
    return good


def _number_images(kept: Sequence[Record]) -> list[int]:
    """Numeric image ids (MUGE uses integers): given ones are kept, others are numbered after the largest
    given id in input order."""
    next_id = max([r.image_id for r in kept if r.image_id is not None], default=0) + 1
    image_ids = []
    for rec in kept:
        if rec.image_id is None:
            image_ids.append(next_id)
            next_id += 1
        else:
            image_ids.append(rec.image_id)
    return image_ids


def _write_splits(folder: Path, good: Sequence[tuple[Record, bytes]], splits: Sequence[str],
                  image_ids: Sequence[int]) -> tuple[dict[str, dict[str, int]], int]:
    """Write the MUGE files, the LMDBs of every split and ``labels.csv`` into ``folder``.

    Returns:
        ``(counts, n_texts)``: ``{split: {label: n_images}}`` and the number of image–text pairs.
    """
    counts: dict[str, dict[str, int]] = {}
    n_texts = 0
    text_id = 0
    label_rows = []
    for split in SPLITS:
        members = [i for i, s in enumerate(splits) if s == split]
        counts[split] = dict(sorted(Counter(good[i][0].label for i in members).items()))
        images, pairs, lines = [], [], []
        for i in members:
            rec, data = good[i]
            b64 = base64.urlsafe_b64encode(data).decode("utf-8")
            images.append((image_ids[i], b64))
            for text in rec.texts:
                text_id += 1
                pairs.append((image_ids[i], text_id, text))
                lines.append(json.dumps({"text_id": text_id, "text": text, "image_ids": [image_ids[i]]},
                                        ensure_ascii=False))
            label_rows.append({"image_id": image_ids[i], "split": split, "label": rec.label,
                               "product_id": rec.product_id, "text": rec.texts[0], "source": rec.source})
        n_texts += len(pairs)
        with open(folder / f"{split}_imgs.tsv", "w", encoding="utf-8") as fh:
            fh.writelines(f"{image_id}\t{b64}\n" for image_id, b64 in images)
        with open(folder / f"{split}_texts.jsonl", "w", encoding="utf-8") as fh:
            fh.writelines(line + "\n" for line in lines)
        split_dir = folder / "lmdb" / split
        split_dir.mkdir(parents=True)
        write_lmdb_split(split_dir, images, pairs)
    with open(folder / "labels.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=["image_id", "split", "label", "product_id", "text", "source"])
        w.writeheader()
        w.writerows(label_rows)
    return counts, n_texts


def _write_and_report(out_dir: Path, good: Sequence[tuple[Record, bytes]], splits: Sequence[str],
                      skipped: list[Skipped], *, stamp: dict) -> PrepareReport:
    """Build the dataset in a fresh folder beside ``out_dir``, then swap it into place.

    ``report.json`` and, last, the ``prepare.json`` stamp (``stamp``: fingerprint, source and parameters)
    mark it complete. On any failure the half-built folder is removed and ``out_dir`` is left as it was.

    Returns:
        The report of what was written.
    """
    image_ids = _number_images([rec for rec, _ in good])
    with atomic_folder(out_dir) as tmp:
        counts, n_texts = _write_splits(tmp, good, splits, image_ids)
        report = PrepareReport(out_dir=str(out_dir), counts=counts, n_images=len(good), n_texts=n_texts,
                               skipped=skipped)
        d = report.to_dict()
        d.pop("out_dir")
        d.pop("reused")
        (tmp / "report.json").write_text(json.dumps(d, ensure_ascii=False, indent=1), encoding="utf-8")
        # The stamp is the last file written: its presence marks a complete dataset.
        (tmp / "prepare.json").write_text(json.dumps(stamp, ensure_ascii=False, indent=1), encoding="utf-8")
    return report


def prepare_dataset(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    valid_frac: float = 0.1,
    test_frac: float = 0.1,
    seed: int = 0,
    max_side: int | None = 512,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    caption_template: str = "{label}",
    captions: str | os.PathLike | None = None,
    num_workers: int | None = None,
    force: bool = False,
) -> PrepareReport:
    """Prepare a training set that Chinese-CLIP's own training code reads.

    Args:
        source: A category folder, a CSV/JSONL manifest (or a folder holding
            ``manifest.csv``), or a folder of MUGE files. See :func:`read_source`.
        out_dir: Output folder; created or replaced as a whole.
        valid_frac: Fraction of products per category for the ``valid`` split.
        test_frac: Fraction of products per category for the ``test`` split.
        seed: Split seed; the same inputs and seed give the same splits.
        max_side: Images are shrunk so the longer side is at most this
            (``None`` keeps the size); training resizes to 224 anyway.
        max_pixels: Images over this many pixels are skipped (decompression bombs).
        caption_template: Caption for folder input, ``{label}`` = sub-folder name.
        captions: Optional captions file for folder input.
        num_workers: Threads decoding images (default: CPU count).
        force: Rebuild even if ``out_dir`` is already up to date.

    Returns:
        The report: counts per split and category, and every skipped input.

    Raises:
        DataError: The input cannot be read at all, no usable image is left,
            or ``out_dir`` exists and is not a dataset this function wrote.
    """
    out_dir = Path(out_dir)
    skipped: list[Skipped] = []
    records = read_source(source, caption_template=caption_template, captions=captions, skipped=skipped)
    params = {"version": FORMAT_VERSION, "valid_frac": valid_frac, "test_frac": test_frac, "seed": seed,
              "max_side": max_side, "max_pixels": max_pixels, "caption_template": caption_template}
    fingerprint = _fingerprint(records, params, skipped)
    reused = _up_to_date(out_dir, fingerprint, force)
    if reused is not None:
        return reused

    good = encode_all(records, skipped, max_side=max_side, max_pixels=max_pixels, num_workers=num_workers)
    if not good:
        raise DataError(f"{source}: no usable image (skipped {len(skipped)}: "
                        + "; ".join(f"{s.source}: {s.reason}" for s in skipped[:5]) + ")")
    splits = assign_splits([rec for rec, _ in good], valid_frac=valid_frac, test_frac=test_frac, seed=seed)
    report = _write_and_report(out_dir, good, splits, skipped,
                               stamp={"fingerprint": fingerprint, "source": str(source), **params})
    for s in skipped:
        logger.warning("skipped %s: %s", s.source, s.reason)
    logger.info("prepared %d images (%d pairs) into %s; skipped %d", report.n_images, report.n_texts, out_dir,
                len(skipped))
    return report


def ensure_dataset(data_dir: str | os.PathLike, *, valid_frac: float = 0.2, test_frac: float = 0.2,
                   seed: int = 0) -> PrepareReport:
    """Use the dataset in ``data_dir`` if one is there; otherwise prepare the embedded sample data into it.

    Lets every notebook run alone: a dataset prepared earlier (by notebook 01,
    from the user's photos) is never replaced.
    """
    from .. import SAMPLE_DATA

    data_dir = Path(data_dir)
    if (data_dir / "prepare.json").is_file():
        return _load_report(data_dir)
    logger.info("no dataset in %s yet: preparing the sample data", data_dir)
    return prepare_dataset(SAMPLE_DATA, data_dir, valid_frac=valid_frac, test_frac=test_frac, seed=seed)
