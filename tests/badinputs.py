"""Odd and broken inputs for the image-loading and data-preparation tests.

Everything is generated at test time with PIL/numpy (nothing binary is
committed). Each ``write_*`` function writes one case to the path it is given
and returns that path; :func:`make_bad_corpus` writes them all into one folder,
and the ``write_*_manifest`` functions write manifest-level cases.

The expected results live next to the generators (``BAD_IMAGES`` with the
words the error must contain, ``ODD_IMAGES`` for the ones that must load), so
the tests and the corpus cannot drift apart.
"""

from __future__ import annotations

import csv
import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

import cnclip_kd

#: Colours of the EXIF test pattern (far apart, so JPEG noise cannot confuse them).
MARK = (220, 30, 30)
BACKGROUND = (30, 30, 220)
#: Stored (not displayed) size of the EXIF-rotated image: wide, so a rotation swaps it.
EXIF_STORED_SIZE = (64, 32)
#: Size of the small decompression bomb: 4 Mpx, a few kB on disk.
SMALL_BOMB_SIZE = (2000, 2000)
#: Size of the large one: 400 Mpx, over PIL's own hard limit (2 × 89.5 Mpx) and our default.
LARGE_BOMB_SIZE = (20000, 20000)

#: Broken images -> words the error reason must contain (lower case).
BAD_IMAGES = {
    "truncated": ("truncated",),
    "empty": ("empty",),
    "not_an_image": ("not an image",),
    "bomb": ("limit", "decompression bomb"),
}
#: Odd but usable images; they must load as correct RGB.
ODD_IMAGES = ("rgba", "palette_transparent", "cmyk", "grey16", "grey", "exif_rotated")


def sample_photo(index: int = 0) -> Path:
    """A real JPEG from the embedded sample data (sorted, so the choice is stable)."""
    photos = sorted((cnclip_kd.SAMPLE_DATA / "images").rglob("*.jpg"))
    return photos[index]


def write_truncated_jpeg(path: Path) -> Path:
    """A real sample photo cut to the first half of its bytes (an interrupted upload)."""
    data = sample_photo(0).read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def write_empty(path: Path) -> Path:
    """A zero-byte file (``.jpg``)."""
    path.write_bytes(b"")
    return path


def write_text_as_image(path: Path) -> Path:
    """A text file given an image extension."""
    path.write_text("这不是图片 this is not an image\n" * 20, encoding="utf-8")
    return path


def write_rgba_png(path: Path) -> Path:
    """32×32 RGBA PNG: transparent BLACK background, opaque red square at [8:24, 8:24],
    and a half-transparent blue row band at [0:4, :] (alpha 128).

    Composited on white, the corners must be white (a plain ``convert("RGB")``
    would give black) and the band light blue.
    """
    arr = np.zeros((32, 32, 4), dtype=np.uint8)  # (0,0,0,0): black, fully transparent
    arr[8:24, 8:24] = (255, 0, 0, 255)
    arr[0:4, :] = (0, 0, 255, 128)
    Image.fromarray(arr, mode="RGBA").save(path, format="PNG")
    return path


def write_palette_png(path: Path) -> Path:
    """32×32 palette PNG whose index 0 (black) is transparent; green square at [8:24, 8:24]."""
    img = Image.new("P", (32, 32), 0)
    img.putpalette([0, 0, 0, 0, 200, 0] + [0] * (254 * 3))
    img.paste(1, (8, 8, 24, 24))
    img.save(path, format="PNG", transparency=0)
    return path


def write_cmyk_jpeg(path: Path) -> Path:
    """32×32 CMYK JPEG: left half pure cyan, right half pure yellow."""
    img = Image.new("CMYK", (32, 32), (255, 0, 0, 0))
    img.paste((0, 0, 255, 0), (16, 0, 32, 32))
    img.save(path, format="JPEG", quality=95)
    return path


def write_grey16_png(path: Path) -> Path:
    """16-bit greyscale PNG (mode ``I;16``), 256×8, a left-to-right gradient over 0..65535."""
    row = np.linspace(0, 65535, 256).round().astype(np.uint16)
    Image.fromarray(np.tile(row, (8, 1))).save(path, format="PNG")
    return path


def write_grey_jpeg(path: Path) -> Path:
    """8-bit greyscale JPEG (mode ``L``): left half 50, right half 200."""
    img = Image.new("L", (32, 32), 50)
    img.paste(200, (16, 0, 32, 32))
    img.save(path, format="JPEG", quality=95)
    return path


def write_exif_rotated_jpeg(path: Path) -> Path:
    """A JPEG stored 64×32 (wide) with EXIF orientation 6 ("rotate 90° clockwise to view").

    Stored pattern: blue background with a red 16×16 block in the stored
    top-left corner. Shown upright it is 32×64 (tall) with the red block in the
    top-RIGHT corner; see :func:`exif_expected_mark_box`.
    """
    img = Image.new("RGB", EXIF_STORED_SIZE, BACKGROUND)
    img.paste(MARK, (0, 0, 16, 16))
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(path, format="JPEG", quality=95, exif=exif.tobytes())
    return path


def exif_expected_mark_box() -> tuple[int, int, int, int]:
    """Where the red block must be (left, top, right, bottom) once orientation 6 is applied."""
    w, h = EXIF_STORED_SIZE
    # Rotating 90° clockwise sends stored (x, y) to (h - 1 - y, x): top-left -> top-right.
    return (h - 16, 0, h, 16)


def write_small_bomb_png(path: Path, size: tuple[int, int] = SMALL_BOMB_SIZE) -> Path:
    """A one-colour PNG, tiny on disk but ``size`` in pixels (use a small ``max_pixels``)."""
    Image.new("L", size, 0).save(path, format="PNG", optimize=True)
    return path


def write_large_bomb_png(path: Path, size: tuple[int, int] = LARGE_BOMB_SIZE) -> Path:
    """A valid 1-bit PNG of ``size`` pixels (400 Mpx by default), ~50 kB on disk.

    Written by hand (PIL would need the pixels in memory): the IDAT stream is
    all-zero rows compressed chunk by chunk.
    """
    width, height = size

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    row = bytes(1 + (width + 7) // 8)  # filter byte 0 + packed 1-bit pixels
    comp = zlib.compressobj(9)
    rows_per_block = 1000
    parts = [comp.compress(row * rows_per_block) for _ in range(height // rows_per_block)]
    parts.append(comp.compress(row * (height % rows_per_block)))
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts))
                     + chunk(b"IEND", b""))
    return path


#: File name of each case in :func:`make_bad_corpus`.
CORPUS_FILES = {
    "truncated": "truncated.jpg",
    "empty": "empty.jpg",
    "not_an_image": "not_an_image.jpg",
    "bomb": "bomb.png",
    "rgba": "rgba.png",
    "palette_transparent": "palette.png",
    "cmyk": "cmyk.jpg",
    "grey16": "grey16.png",
    "grey": "grey.jpg",
    "exif_rotated": "exif_rotated.jpg",
}
_WRITERS = {
    "truncated": write_truncated_jpeg,
    "empty": write_empty,
    "not_an_image": write_text_as_image,
    "bomb": write_small_bomb_png,
    "rgba": write_rgba_png,
    "palette_transparent": write_palette_png,
    "cmyk": write_cmyk_jpeg,
    "grey16": write_grey16_png,
    "grey": write_grey_jpeg,
    "exif_rotated": write_exif_rotated_jpeg,
}
#: ``max_pixels`` to use with the corpus: the small bomb is over it, every other case under it.
CORPUS_MAX_PIXELS = 1_000_000


def make_bad_corpus(directory: Path) -> dict[str, Path]:
    """Write every image case (see ``CORPUS_FILES``) into ``directory``; returns ``{case: path}``.

    Use ``max_pixels=CORPUS_MAX_PIXELS`` so ``bomb`` is refused; the large
    bomb is separate (:func:`write_large_bomb_png`) as it costs ~0.5 s.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return {case: _WRITERS[case](directory / CORPUS_FILES[case]) for case in CORPUS_FILES}


def make_category_tree(root: Path, n_good: int = 3) -> dict[str, Path]:
    """A category-folder input: ``good/`` with ``n_good`` sample photos and ``odd/`` with the corpus.

    Returns the corpus ``{case: path}`` (inside ``root/odd``).
    """
    good = Path(root) / "good"
    good.mkdir(parents=True)
    for i in range(n_good):
        (good / f"photo{i}.jpg").write_bytes(sample_photo(i).read_bytes())
    return make_bad_corpus(Path(root) / "odd")


def _write_csv(path: Path, rows: list[dict], fieldnames: list[str], encoding: str = "utf-8") -> Path:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fieldnames, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    path.write_bytes(buf.getvalue().encode(encoding))
    return path


def write_bad_manifest(root: Path) -> tuple[Path, dict]:
    """A ``manifest.csv`` with good rows, the image corpus, and broken rows.

    Returns ``(manifest_path, expect)`` where ``expect`` holds:
    ``good`` (image paths that must be kept: 3 photos + the odd images),
    ``bad_images`` (``{case: path}`` that must be skipped),
    ``row_skips`` (``{line_number: reason words}`` for row-level problems).
    """
    root = Path(root)
    corpus = make_bad_corpus(root / "imgs")
    photos = []
    for i in range(4):
        p = root / "imgs" / f"photo{i}.jpg"
        p.write_bytes(sample_photo(i).read_bytes())
        photos.append(p)
    rows: list[dict] = []
    row_skips: dict[int, tuple[str, ...]] = {}

    def add(image: str, text: str, image_id: str = "", label: str = "things", skip: tuple[str, ...] = ()):
        rows.append({"image": image, "text": text, "label": label, "product_id": "", "image_id": image_id})
        if skip:
            row_skips[len(rows) + 1] = skip  # +1: the header is line 1

    add("imgs/photo0.jpg", "第一张照片", image_id="100")
    add("imgs/photo1.jpg", "第二张照片", image_id="101")
    add("imgs/photo2.jpg", "第三张照片")
    for case, path in corpus.items():
        add(f"imgs/{path.name}", f"测试图 {case}")
    add("imgs/does_not_exist.jpg", "不存在的图片", skip=("not found",))
    add("imgs/photo3.jpg", "   ", skip=("empty caption",))
    # Same image_id as photo0's row, but a different image.
    add("imgs/photo3.jpg", "重复编号", image_id="100", skip=("duplicate image_id",))
    manifest = _write_csv(root / "manifest.csv", rows, ["image", "text", "label", "product_id", "image_id"])
    good = [str(p) for p in photos[:3]] + [str(corpus[c]) for c in ODD_IMAGES]
    bad = {case: corpus[case] for case in BAD_IMAGES}
    return manifest, {"good": good, "bad_images": bad, "row_skips": row_skips}


def write_gbk_manifest(root: Path) -> Path:
    """A valid manifest, but saved in GBK (as Excel on a Chinese Windows does)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "a.jpg").write_bytes(sample_photo(0).read_bytes())
    return _write_csv(root / "manifest.csv", [{"image": "a.jpg", "text": "红色连衣裙"}], ["image", "text"],
                      encoding="gbk")


def write_manifest_missing_column(root: Path) -> Path:
    """A manifest whose caption column is called ``title`` instead of ``text``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "a.jpg").write_bytes(sample_photo(0).read_bytes())
    return _write_csv(root / "manifest.csv", [{"image": "a.jpg", "title": "红色连衣裙"}], ["image", "title"])


def write_product_manifest(root: Path, n_products: int = 12, per_product: int = 3,
                           labels: tuple[str, ...] = ("cat_a", "cat_b")) -> Path:
    """A manifest where several images share a ``product_id`` (``per_product`` photos each).

    Images are sample photos copied under new names; each label gets
    ``n_products`` products.
    """
    root = Path(root)
    (root / "imgs").mkdir(parents=True, exist_ok=True)
    rows, k = [], 0
    for label in labels:
        for p in range(n_products):
            for j in range(per_product):
                name = f"imgs/{label}_{p}_{j}.jpg"
                (root / name).write_bytes(sample_photo(k % 600).read_bytes())
                k += 1
                rows.append({"image": name, "text": f"{label} 商品 {p} 第{j}张", "label": label,
                             "product_id": f"{label}-{p}"})
    return _write_csv(root / "manifest.csv", rows, ["image", "text", "label", "product_id"])
