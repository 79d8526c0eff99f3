"""prepare_dataset: sample data end to end, splits, reuse, atomicity, bad inputs, MUGE input."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import pickle
import shutil
from collections import defaultdict
from pathlib import Path

import lmdb
import pytest
from PIL import Image

import badinputs
import cnclip_kd
import cnclip_kd.data.prepare as data_mod
from cnclip_kd.data.dataset import DataError, read_labels
from cnclip_kd.data.prepare import Record, assign_splits, prepare_dataset

SPLITS = ("train", "valid", "test")
SAMPLE_LABELS = ["dress", "hat", "longsleeve", "outwear", "pants", "shirt", "shoes", "shorts", "skirt", "t-shirt"]


# ----------------------------------------------------------------------------- helpers


def labels_csv(out: Path) -> list[dict]:
    with open(out / "labels.csv", encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def read_pairs(split_dir: Path) -> list[tuple[int, int, str]]:
    env = lmdb.open(str(split_dir / "pairs"), readonly=True, lock=False)
    with env.begin() as txn:
        n = int(txn.get(b"num_samples"))
        pairs = [pickle.loads(txn.get(str(i).encode())) for i in range(n)]
    env.close()
    return pairs


def read_imgs(split_dir: Path) -> dict[int, bytes]:
    env = lmdb.open(str(split_dir / "imgs"), readonly=True, lock=False)
    with env.begin() as txn:
        n = int(txn.get(b"num_images"))
        imgs = {int(k): base64.urlsafe_b64decode(bytes(v)) for k, v in txn.cursor() if k != b"num_images"}
    env.close()
    assert len(imgs) == n
    return imgs


def read_muge_split(out: Path, split: str) -> dict[int, tuple[bytes, list[str]]]:
    """``{image_id: (jpeg_bytes, sorted captions)}`` from one split's MUGE files."""
    images = {}
    for line in (out / f"{split}_imgs.tsv").read_text(encoding="utf-8").splitlines():
        image_id, b64 = line.split("\t")
        images[int(image_id)] = base64.urlsafe_b64decode(b64)
    texts = defaultdict(list)
    for line in (out / f"{split}_texts.jsonl").read_text(encoding="utf-8").splitlines():
        obj = json.loads(line)
        for image_id in obj["image_ids"]:
            texts[image_id].append(obj["text"])
    assert set(texts) == set(images)
    return {i: (b, sorted(texts[i])) for i, b in images.items()}


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """``{relative path: (mtime_ns, size)}`` of every file under ``folder``."""
    return {p.relative_to(folder).as_posix(): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in folder.rglob("*") if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    """Temporary or old folders prepare_dataset may have left beside its output."""
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def small_manifest(root: Path, n: int = 4) -> Path:
    """A manifest of ``n`` sample photos in two categories."""
    root.mkdir(parents=True, exist_ok=True)
    rows = ["image,text,label"]
    for i in range(n):
        (root / f"p{i}.jpg").write_bytes(badinputs.sample_photo(i).read_bytes())
        rows.append(f"p{i}.jpg,照片{i},{'ab'[i % 2]}")
    path = root / "manifest.csv"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def decode(jpeg: bytes) -> Image.Image:
    assert jpeg[:3] == b"\xff\xd8\xff"
    img = Image.open(io.BytesIO(jpeg))
    img.load()
    return img


# ----------------------------------------------------------------------------- sample data


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample") / "data"
    report = prepare_dataset(cnclip_kd.SAMPLE_DATA, out)
    return report, out


@pytest.fixture(scope="module")
def sample_captions() -> dict[Path, str]:
    with open(cnclip_kd.SAMPLE_DATA / "manifest.csv", encoding="utf-8", newline="") as fh:
        return {(cnclip_kd.SAMPLE_DATA / r["image"]).resolve(): r["text"] for r in csv.DictReader(fh)}


def test_sample_report(sample):
    report, out = sample
    assert report.n_images == 600 and report.n_texts == 600
    assert report.categories == SAMPLE_LABELS
    assert report.skipped == [] and report.reused is False
    for label in SAMPLE_LABELS:
        assert [report.counts[s][label] for s in SPLITS] == [48, 6, 6]
    saved = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert saved["counts"] == report.counts and saved["n_images"] == 600
    assert saved["categories"] == SAMPLE_LABELS
    md = report.to_markdown()
    assert "| dress | 48 | 6 | 6 | 60 |" in md
    assert "**480**" in md and "**600**" in md and "跳过 skipped: 0" in md


def test_sample_files(sample):
    _, out = sample
    names = {p.relative_to(out).as_posix() for p in out.rglob("*")}
    for split in SPLITS:
        assert {f"{split}_imgs.tsv", f"{split}_texts.jsonl", f"lmdb/{split}/imgs", f"lmdb/{split}/pairs"} <= names
        assert (out / "lmdb" / split / "imgs" / "data.mdb").is_file()
    assert {"labels.csv", "report.json", "prepare.json"} <= names
    assert leftovers(out.parent) == []


def test_sample_labels_csv(sample, sample_captions):
    report, out = sample
    rows = labels_csv(out)
    assert len(rows) == 600
    assert len({r["image_id"] for r in rows}) == 600
    assert {Path(r["source"]).resolve() for r in rows} == set(sample_captions)
    for r in rows:
        assert r["text"] == sample_captions[Path(r["source"]).resolve()]
        assert r["product_id"].startswith(r["label"] + "-")
    per = defaultdict(lambda: defaultdict(int))
    for r in rows:
        per[r["split"]][r["label"]] += 1
    assert {s: dict(v) for s, v in per.items()} == report.counts
    assert [r["image_id"] for r in read_labels(out, "valid")] == [int(r["image_id"]) for r in rows
                                                                   if r["split"] == "valid"]


def test_sample_lmdb_matches_manifest(sample, sample_captions):
    report, out = sample
    source_of = {int(r["image_id"]): Path(r["source"]).resolve() for r in labels_csv(out)}
    split_of = {int(r["image_id"]): r["split"] for r in labels_csv(out)}
    text_ids = []
    for split in SPLITS:
        pairs = read_pairs(out / "lmdb" / split)
        imgs = read_imgs(out / "lmdb" / split)
        assert len(pairs) == len(imgs) == sum(report.counts[split].values())
        assert {p[0] for p in pairs} == set(imgs)
        for image_id, text_id, text in pairs:
            assert split_of[image_id] == split
            assert text == sample_captions[source_of[image_id]]
            text_ids.append(text_id)
        for jpeg in list(imgs.values())[:5]:
            assert decode(jpeg).mode == "RGB"
    assert len(set(text_ids)) == 600


def test_sample_lmdb_reads_with_cn_clip(sample, sample_captions):
    from cn_clip.clip import tokenize
    from cn_clip.training.data import LMDBDataset, _preprocess_text

    report, out = sample
    source_of = {int(r["image_id"]): Path(r["source"]).resolve() for r in labels_csv(out)}
    for split in SPLITS:
        ds = LMDBDataset(str(out / "lmdb" / split), split="val" if split != "train" else "train")
        assert len(ds) == sum(report.counts[split].values())
        pairs = read_pairs(out / "lmdb" / split)
        for index in (0, len(ds) - 1):
            image, tokens, eos = ds[index]
            assert tuple(image.shape) == (3, 224, 224)
            assert image.std() > 0.05  # a real photo, not a blank
            caption = sample_captions[source_of[pairs[index][0]]]
            expected = tokenize([_preprocess_text(caption)], context_length=64)[0]
            assert tokens.tolist() == expected.tolist()
            assert 1 < eos < 64 and tokens[eos + 1:].eq(0).all()
        del ds


def test_sample_muge_files(sample):
    report, out = sample
    labels = {int(r["image_id"]): r for r in labels_csv(out)}
    for split in SPLITS:
        muge = read_muge_split(out, split)
        assert len(muge) == sum(report.counts[split].values())
        lmdb_imgs = read_imgs(out / "lmdb" / split)
        for image_id, (jpeg, texts) in muge.items():
            assert labels[image_id]["split"] == split
            assert texts == [labels[image_id]["text"]]
            assert jpeg == lmdb_imgs[image_id]
        for jpeg, _ in list(muge.values())[:5]:
            img = decode(jpeg)
            assert img.mode == "RGB" and max(img.size) <= 512


# ----------------------------------------------------------------------------- splits


def test_same_seed_same_splits_other_seed_differs(sample, tmp_path):
    _, out = sample
    again = prepare_dataset(cnclip_kd.SAMPLE_DATA, tmp_path / "again", seed=0)
    assert (tmp_path / "again" / "labels.csv").read_bytes() == (out / "labels.csv").read_bytes()
    assert again.counts == sample[0].counts
    prepare_dataset(cnclip_kd.SAMPLE_DATA, tmp_path / "other", seed=1)
    split0 = {r["source"]: r["split"] for r in labels_csv(out)}
    split1 = {r["source"]: r["split"] for r in labels_csv(tmp_path / "other")}
    assert split0.keys() == split1.keys() and split0 != split1
    moved = sum(split0[k] != split1[k] for k in split0)
    assert moved > 20  # a real reshuffle, not one swapped pair


@pytest.mark.parametrize("valid_frac,test_frac", [(0.1, 0.1), (0.2, 0.15), (0.0, 0.3), (0.25, 0.0)])
def test_splits_are_stratified(valid_frac, test_frac):
    sizes = {"a": 7, "b": 13, "c": 40, "d": 101}
    records = [Record(source=f"{label}/{i}.jpg", texts=["x"], label=label)
               for label, n in sizes.items() for i in range(n)]
    splits = assign_splits(records, valid_frac=valid_frac, test_frac=test_frac, seed=3)
    for label, n in sizes.items():
        mine = [s for r, s in zip(records, splits) if r.label == label]
        assert mine.count("test") == round(n * test_frac), (label, n)
        assert mine.count("valid") == round(n * valid_frac), (label, n)
        assert mine.count("train") == n - round(n * test_frac) - round(n * valid_frac)


def test_tiny_category_keeps_a_training_image():
    records = [Record(source=f"{i}.jpg", texts=["x"], label="tiny") for i in range(2)]
    splits = assign_splits(records, valid_frac=0.5, test_frac=0.45)
    assert "train" in splits


def test_bad_fractions_are_refused():
    with pytest.raises(ValueError, match="valid_frac"):
        assign_splits([], valid_frac=0.6, test_frac=0.5)


def test_products_never_straddle_splits(tmp_path):
    manifest = badinputs.write_product_manifest(tmp_path / "in", n_products=12, per_product=3)
    report = prepare_dataset(manifest, tmp_path / "out", valid_frac=0.25, test_frac=0.25, seed=5)
    assert report.n_images == 72
    split_of_product = defaultdict(set)
    for r in labels_csv(tmp_path / "out"):
        split_of_product[r["product_id"]].add(r["split"])
    assert len(split_of_product) == 24
    assert all(len(s) == 1 for s in split_of_product.values()), split_of_product
    # Stratified by product: 12 products -> 3 test, 3 valid, 6 train, 3 images each.
    for label in ("cat_a", "cat_b"):
        assert [report.counts[s][label] for s in SPLITS] == [18, 9, 9]


def test_jsonl_manifest_gives_the_same_dataset(tmp_path):
    manifest = badinputs.write_product_manifest(tmp_path / "in", n_products=4, per_product=2)
    with open(manifest, encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    jsonl = manifest.with_suffix(".jsonl")
    jsonl.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    prepare_dataset(manifest, tmp_path / "from_csv")
    prepare_dataset(jsonl, tmp_path / "from_jsonl")
    assert labels_csv(tmp_path / "from_csv") == labels_csv(tmp_path / "from_jsonl")


def test_several_captions_per_image(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    (root / "a.jpg").write_bytes(badinputs.sample_photo(0).read_bytes())
    (root / "b.jpg").write_bytes(badinputs.sample_photo(1).read_bytes())
    (root / "manifest.csv").write_text(
        "image,text\na.jpg,红色连衣裙\na.jpg,夏季长裙\na.jpg,红色连衣裙\nb.jpg,帽子\n", encoding="utf-8")
    report = prepare_dataset(root, tmp_path / "out", valid_frac=0, test_frac=0)
    assert report.n_images == 2 and report.n_texts == 3
    assert len(report.skipped) == 1
    assert report.skipped[0].source.startswith("manifest.csv:4") and "duplicate row" in report.skipped[0].reason
    pairs = read_pairs(tmp_path / "out" / "lmdb" / "train")
    by_image = defaultdict(list)
    for image_id, _, text in pairs:
        by_image[image_id].append(text)
    assert sorted(map(sorted, by_image.values())) == [["夏季长裙", "红色连衣裙"], ["帽子"]]


# ----------------------------------------------------------------------------- reuse and rebuild


def test_rerun_reuses_and_touches_nothing(tmp_path):
    manifest = small_manifest(tmp_path / "in")
    out = tmp_path / "out"
    first = prepare_dataset(manifest, out)
    before, inode = snapshot(out), out.stat().st_ino
    second = prepare_dataset(manifest, out)
    assert second.reused is True and first.reused is False
    assert second.counts == first.counts and second.n_images == first.n_images == 4
    assert snapshot(out) == before and out.stat().st_ino == inode

    forced = prepare_dataset(manifest, out, force=True)
    assert forced.reused is False and out.stat().st_ino != inode
    assert labels_csv(out) and leftovers(tmp_path) == []


@pytest.mark.parametrize("change", ["caption", "image", "seed", "max_side"])
def test_changed_input_rebuilds(tmp_path, change):
    manifest = small_manifest(tmp_path / "in")
    out = tmp_path / "out"
    prepare_dataset(manifest, out)
    inode = out.stat().st_ino
    kwargs = {}
    if change == "caption":
        manifest.write_text(manifest.read_text(encoding="utf-8").replace("照片0", "新标题"), encoding="utf-8")
    elif change == "image":
        (tmp_path / "in" / "p0.jpg").write_bytes(badinputs.sample_photo(10).read_bytes())
    elif change == "seed":
        kwargs["seed"] = 7
    else:
        kwargs["max_side"] = 64
    report = prepare_dataset(manifest, out, **kwargs)
    assert report.reused is False and out.stat().st_ino != inode
    rows = labels_csv(out)
    if change == "caption":
        assert "新标题" in {r["text"] for r in rows}
    if change == "image":
        new = next(r for r in rows if r["source"].endswith("p0.jpg"))
        got = read_imgs(out / "lmdb" / new["split"])[int(new["image_id"])]
        assert got == badinputs.sample_photo(10).read_bytes()
    if change == "max_side":
        for split in SPLITS:
            for jpeg in read_imgs(out / "lmdb" / split).values():
                assert max(decode(jpeg).size) == 64
    assert leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- atomic writes


def failingwrite_lmdb_split(monkeypatch, fail_on_call: int = 2):
    """Make the ``fail_on_call``-th LMDB write raise, after earlier splits were written."""
    real = data_mod.write_lmdb_split
    calls = []

    def write(split_dir, images, pairs):
        calls.append(split_dir)
        if len(calls) == fail_on_call:
            (split_dir / "pairs").mkdir()  # half-written, then the "crash"
            raise RuntimeError("simulated crash while writing LMDB")
        real(split_dir, images, pairs)

    monkeypatch.setattr(data_mod, "write_lmdb_split", write)
    return calls


def test_interrupted_first_run_leaves_nothing(tmp_path, monkeypatch):
    manifest = small_manifest(tmp_path / "in")
    out = tmp_path / "out"
    calls = failingwrite_lmdb_split(monkeypatch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare_dataset(manifest, out)
    assert len(calls) == 2
    assert not out.exists()
    assert leftovers(tmp_path) == []
    # The next run succeeds from scratch.
    monkeypatch.undo()
    assert prepare_dataset(manifest, out).n_images == 4


def test_interrupted_rebuild_keeps_previous_dataset(tmp_path, monkeypatch):
    manifest = small_manifest(tmp_path / "in")
    out = tmp_path / "out"
    prepare_dataset(manifest, out)
    before = snapshot(out)
    contents = {name: (out / name).read_bytes() for name in before}
    failingwrite_lmdb_split(monkeypatch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare_dataset(manifest, out, force=True)
    assert snapshot(out) == before
    assert {name: (out / name).read_bytes() for name in before} == contents
    assert leftovers(tmp_path) == []
    monkeypatch.undo()
    # Still a valid, reusable dataset.
    assert prepare_dataset(manifest, out).reused is True


def test_failed_swap_restores_previous_dataset(tmp_path, monkeypatch):
    manifest = small_manifest(tmp_path / "in")
    out = tmp_path / "out"
    prepare_dataset(manifest, out)
    before = snapshot(out)
    real_replace = os.replace
    calls = []

    def replace(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:  # old dataset moved aside, new one not yet in place
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(data_mod.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(manifest, out, force=True)
    monkeypatch.undo()
    assert calls[0][0] == "out" and calls[1][1] == "out"
    assert snapshot(out) == before
    assert leftovers(tmp_path) == []


def test_refuses_to_overwrite_a_foreign_folder(tmp_path):
    manifest = small_manifest(tmp_path / "in")
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.docx").write_bytes(b"precious")
    with pytest.raises(DataError, match="not written by prepare_dataset") as info:
        prepare_dataset(manifest, out)
    assert str(out) in str(info.value)
    assert [p.name for p in out.iterdir()] == ["thesis.docx"]
    assert (out / "thesis.docx").read_bytes() == b"precious"
    assert leftovers(tmp_path) == []
    # force does not override the refusal either.
    with pytest.raises(DataError, match="not written by prepare_dataset"):
        prepare_dataset(manifest, out, force=True)
    # An empty folder is fine.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert prepare_dataset(manifest, empty).n_images == 4


# ----------------------------------------------------------------------------- bad inputs


def check_skips(report, out: Path, bad: dict[str, Path]) -> None:
    """Each bad image is in report.skipped, report.json and the Markdown, with its reason."""
    by_source = {s.source: s.reason for s in report.skipped}
    saved = {s["source"]: s["reason"] for s in json.loads((out / "report.json").read_text("utf-8"))["skipped"]}
    assert saved == by_source
    md = report.to_markdown()
    for case, path in bad.items():
        reason = by_source.get(str(path))
        assert reason is not None, (case, sorted(by_source))
        for word in badinputs.BAD_IMAGES[case]:
            assert word in reason.lower(), (case, reason)
        assert f"`{path}`" in md and reason in md
    assert f"跳过 skipped: {len(report.skipped)}" in md


def check_odd_images_kept(out: Path, corpus: dict[str, Path]) -> None:
    """The odd-but-good images are in the dataset, decoded the way load_image does."""
    rows = {Path(r["source"]).name: r for r in labels_csv(out)}
    imgs = {}
    for split in SPLITS:
        imgs.update(read_imgs(out / "lmdb" / split))
    stored = {}
    for case in badinputs.ODD_IMAGES:
        row = rows[corpus[case].name]
        stored[case] = decode(imgs[int(row["image_id"])])
        assert stored[case].mode == "RGB"
    # The EXIF rotation is baked in (the stored JPEG is upright and tall).
    w, h = badinputs.EXIF_STORED_SIZE
    assert stored["exif_rotated"].size == (h, w)
    assert stored["exif_rotated"].getexif().get(0x0112, 1) == 1
    # Transparent background became white, CMYK became RGB cyan.
    assert min(stored["rgba"].getpixel((0, 31))) > 245
    r, g, b = stored["cmyk"].getpixel((4, 16))
    assert r < 50 and g > 200 and b > 200
    assert stored["grey16"].getpixel((255, 4))[0] > 240 and stored["grey16"].getpixel((0, 4))[0] < 15


def test_bad_images_in_category_folder(tmp_path):
    root = tmp_path / "photos"
    corpus = badinputs.make_category_tree(root, n_good=3)
    (root / "odd" / "notes.txt").write_text("not a photo", encoding="utf-8")
    report = prepare_dataset(root, tmp_path / "out", max_pixels=badinputs.CORPUS_MAX_PIXELS,
                             caption_template="{label} 商品图")
    out = tmp_path / "out"
    assert report.n_images == 3 + len(badinputs.ODD_IMAGES)
    assert report.categories == ["good", "odd"]
    assert sum(report.counts[s].get("odd", 0) for s in SPLITS) == len(badinputs.ODD_IMAGES)
    assert len(report.skipped) == len(badinputs.BAD_IMAGES) + 1
    assert any(s.source == "odd/notes.txt" and "not an image extension" in s.reason for s in report.skipped)
    check_skips(report, out, {c: corpus[c] for c in badinputs.BAD_IMAGES})
    check_odd_images_kept(out, corpus)
    assert {r["text"] for r in labels_csv(out)} == {"good 商品图", "odd 商品图"}


def test_large_bomb_in_folder_is_skipped_with_default_limit(tmp_path):
    (tmp_path / "photos" / "hats").mkdir(parents=True)
    (tmp_path / "photos" / "hats" / "ok.jpg").write_bytes(badinputs.sample_photo(0).read_bytes())
    bomb = badinputs.write_large_bomb_png(tmp_path / "photos" / "hats" / "huge.png")
    report = prepare_dataset(tmp_path / "photos", tmp_path / "out")
    assert report.n_images == 1
    assert [s.source for s in report.skipped] == [str(bomb)]
    assert "limit" in report.skipped[0].reason and "decompression bomb" in report.skipped[0].reason


def test_folder_captions_file_overrides_template(tmp_path):
    root = tmp_path / "photos"
    (root / "hats").mkdir(parents=True)
    for i in range(2):
        (root / "hats" / f"h{i}.jpg").write_bytes(badinputs.sample_photo(i).read_bytes())
    captions = tmp_path / "captions.csv"
    captions.write_text("image,text\nhats/h0.jpg,红色棒球帽\n", encoding="utf-8")
    prepare_dataset(root, tmp_path / "out", captions=captions, caption_template="{label} 商品图")
    texts = {Path(r["source"]).name: r["text"] for r in labels_csv(tmp_path / "out")}
    assert texts == {"h0.jpg": "红色棒球帽", "h1.jpg": "hats 商品图"}


def test_bad_images_and_rows_in_manifest(tmp_path):
    manifest, expect = badinputs.write_bad_manifest(tmp_path / "in")
    out = tmp_path / "out"
    report = prepare_dataset(manifest, out, max_pixels=badinputs.CORPUS_MAX_PIXELS)
    rows = labels_csv(out)
    assert sorted(r["source"] for r in rows) == sorted(expect["good"])
    assert report.n_images == len(expect["good"])
    # Given image ids are kept.
    ids = {Path(r["source"]).name: int(r["image_id"]) for r in rows}
    assert ids["photo0.jpg"] == 100 and ids["photo1.jpg"] == 101
    assert len(set(ids.values())) == len(ids)
    check_skips(report, out, expect["bad_images"])
    row_skips = [s for s in report.skipped if s.source.startswith("manifest.csv:")]
    assert len(row_skips) == len(expect["row_skips"])
    for line, words in expect["row_skips"].items():
        match = [s for s in row_skips if s.source.startswith(f"manifest.csv:{line} ")]
        assert len(match) == 1, (line, row_skips)
        for word in words:
            assert word in match[0].reason, (line, match[0])
    dup = next(s for s in row_skips if "duplicate image_id" in s.reason)
    assert "manifest.csv:2" in dup.reason  # points at the first use of the id
    assert len(report.skipped) == len(expect["bad_images"]) + len(expect["row_skips"])


def test_non_utf8_manifest_is_refused_with_a_fix(tmp_path):
    manifest = badinputs.write_gbk_manifest(tmp_path / "in")
    with pytest.raises(DataError) as info:
        prepare_dataset(manifest, tmp_path / "out")
    msg = str(info.value)
    assert str(manifest) in msg and "UTF-8" in msg and "line 2" in msg
    assert "iconv -f GBK -t UTF-8" in msg
    assert not (tmp_path / "out").exists()
    # The same content in UTF-8 is accepted (so the encoding was the only problem).
    manifest.write_text(manifest.read_bytes().decode("gbk"), encoding="utf-8")
    assert prepare_dataset(manifest, tmp_path / "out").n_images == 1


def test_manifest_missing_column_is_refused(tmp_path):
    manifest = badinputs.write_manifest_missing_column(tmp_path / "in")
    # A folder holding manifest.csv is read as that manifest.
    with pytest.raises(DataError) as info:
        prepare_dataset(tmp_path / "in", tmp_path / "out")
    msg = str(info.value)
    assert str(manifest) in msg and "'text'" in msg and "title" in msg
    assert not (tmp_path / "out").exists()


def test_nothing_usable_is_an_error(tmp_path):
    corpus = badinputs.make_bad_corpus(tmp_path / "photos" / "broken")
    for case in badinputs.ODD_IMAGES:
        corpus[case].unlink()
    with pytest.raises(DataError, match="no usable image") as info:
        prepare_dataset(tmp_path / "photos", tmp_path / "out", max_pixels=badinputs.CORPUS_MAX_PIXELS)
    assert "truncated" in str(info.value) or "empty" in str(info.value)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- MUGE input


def test_muge_output_prepares_again_to_the_same_data(sample, tmp_path):
    report, out = sample
    again = prepare_dataset(out, tmp_path / "again")
    assert again.counts == report.counts and again.n_texts == report.n_texts
    assert again.skipped == []
    for split in SPLITS:
        assert read_muge_split(tmp_path / "again", split) == read_muge_split(out, split)
        assert sorted(read_pairs(tmp_path / "again" / "lmdb" / split)) == sorted(read_pairs(out / "lmdb" / split))
    old = {r["image_id"]: (r["split"], r["label"], r["product_id"], r["text"]) for r in labels_csv(out)}
    new = {r["image_id"]: (r["split"], r["label"], r["product_id"], r["text"]) for r in labels_csv(tmp_path / "again")}
    assert new == old


def test_muge_input_skips_broken_lines(sample, tmp_path):
    _, out = sample
    muge = tmp_path / "muge"
    muge.mkdir()
    shutil.copy(out / "valid_imgs.tsv", muge)
    shutil.copy(out / "valid_texts.jsonl", muge)
    lines = (muge / "valid_imgs.tsv").read_text(encoding="utf-8").splitlines()
    truncated_b64 = base64.urlsafe_b64encode(badinputs.sample_photo(0).read_bytes()[:3000]).decode()
    first_id, first_b64 = lines[0].split("\t")
    lines += [
        lines[0],  # the same image id twice
        "no tab here",
        f"999999\t{first_b64}",  # an id with no caption in valid_texts.jsonl
        f"{first_id}x\tAAAA",  # not an integer id
    ]
    # One listed image is broken: a truncated JPEG.
    victim_id = lines[3].split("\t")[0]
    lines[3] = f"{victim_id}\t{truncated_b64}"
    (muge / "valid_imgs.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    report = prepare_dataset(muge, tmp_path / "out")
    reasons = {s.source: s.reason for s in report.skipped}
    n = len(lines) - 4
    assert report.n_images == 60 - 1
    assert "duplicate image_id" in reasons[f"valid_imgs.tsv:{n + 1}"]
    assert "image_id<TAB>base64" in reasons[f"valid_imgs.tsv:{n + 2}"]
    assert "no caption" in reasons[f"valid_imgs.tsv:{n + 3}"]
    assert "bad image id" in reasons[f"valid_imgs.tsv:{n + 4}"]
    assert "truncated" in reasons["valid_imgs.tsv:4"]
    assert set(report.counts) == set(SPLITS) and sum(report.counts["valid"].values()) == 59
    assert sum(report.counts["train"].values()) == 0  # MUGE splits are kept, not re-split


def test_atomic_folder_replaces_keeps_or_leaves_the_target_as_it_was(tmp_path):
    """The temp-folder-then-rename writer every stage uses (prepare, index, teacher cache, kd-images, export)."""
    import os

    from cnclip_kd.core.files import atomic_folder

    out = tmp_path / "sub" / "out"
    with atomic_folder(out) as tmp:
        (tmp / "a.txt").write_text("1")
        assert not out.exists()  # nothing visible until the block ends
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "a.txt").read_text() == "1" and out.stat().st_mode & 0o777 == 0o777 & ~umask
    with atomic_folder(out) as tmp:
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]  # replaced whole
    with atomic_folder(out, keep_existing=True) as tmp:
        (tmp / "c.txt").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]  # another writer finished first: theirs is kept
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_folder(out) as tmp:
            (tmp / "d.txt").write_text("4")
            raise RuntimeError("boom")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]  # no temp or old folder left behind
