"""load_image on odd and broken photos: correct RGB pixels, or a BadImageError that says why."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

import badinputs
from cnclip_kd.core.images import BadImageError, encode_jpeg, fit_max_side, load_image


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    return badinputs.make_bad_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def large_bomb(tmp_path_factory) -> Path:
    return badinputs.write_large_bomb_png(tmp_path_factory.mktemp("bomb") / "large_bomb.png")


def load(path, **kw) -> np.ndarray:
    img = load_image(path, max_pixels=badinputs.CORPUS_MAX_PIXELS, **kw)
    assert isinstance(img, Image.Image) and img.mode == "RGB"
    return np.asarray(img).astype(int)


# ----------------------------------------------------------------------------- usable odd images


def test_rgba_is_composited_on_white(corpus):
    a = load(corpus["rgba"])
    assert a.shape == (32, 32, 3)
    # Fully transparent black background -> white, not black.
    for y, x in [(31, 0), (31, 31), (10, 2), (28, 28)]:
        assert a[y, x].tolist() == [255, 255, 255]
    # Opaque red stays red.
    assert a[16, 16].tolist() == [255, 0, 0]
    # Half-transparent blue over white: light blue (about 127, 127, 255).
    r, g, b = a[1, 16]
    assert 120 <= r <= 135 and 120 <= g <= 135 and b == 255


def test_palette_transparency_is_composited_on_white(corpus):
    a = load(corpus["palette_transparent"])
    assert a[0, 0].tolist() == [255, 255, 255]
    assert a[16, 16].tolist() == [0, 200, 0]


def test_cmyk_gives_plausible_rgb(corpus):
    a = load(corpus["cmyk"])
    assert a.shape == (32, 32, 3)
    cyan, yellow = a[16, 4], a[16, 28]
    # Cyan: no red, full green and blue. Yellow: full red and green, no blue.
    assert cyan[0] < 40 and cyan[1] > 215 and cyan[2] > 215, cyan
    assert yellow[0] > 215 and yellow[1] > 215 and yellow[2] < 40, yellow


def test_16bit_gradient_is_scaled_not_clipped(corpus):
    src = Image.open(corpus["grey16"])
    assert src.mode.startswith("I")  # the corpus really is 16-bit
    a = load(corpus["grey16"])
    assert a.shape == (8, 256, 3)
    row = a[4, :, 0]
    assert (np.diff(row) >= 0).all(), "gradient must stay monotonic"
    assert row[0] <= 1 and row[-1] >= 254, (row[0], row[-1])
    # PIL's own convert() clips at 255 and turns almost everything white.
    assert (row == 255).mean() < 0.05
    assert abs(int(row[128]) - 128) <= 2
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()


def test_greyscale_jpeg_gives_three_equal_channels(corpus):
    a = load(corpus["grey"])
    assert a.shape == (32, 32, 3)
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()
    assert abs(a[16, 4, 0] - 50) <= 4 and abs(a[16, 28, 0] - 200) <= 4


def test_exif_rotation_is_applied(corpus):
    stored = Image.open(corpus["exif_rotated"])
    assert stored.size == badinputs.EXIF_STORED_SIZE and stored.getexif()[0x0112] == 6
    a = load(corpus["exif_rotated"])
    w, h = badinputs.EXIF_STORED_SIZE
    assert a.shape == (w, h, 3)  # size swapped: shown tall
    left, top, right, bottom = badinputs.exif_expected_mark_box()
    mark = a[top + 4:bottom - 4, left + 4:right - 4].reshape(-1, 3).mean(0)
    assert np.abs(mark - badinputs.MARK).max() < 30, mark
    # The other corners are background: the block is where rotation puts it, not mirrored.
    for y, x in [(4, 4), (h * 2 - 5, 4), (h * 2 - 5, h - 5)]:
        assert np.abs(a[y, x] - badinputs.BACKGROUND).max() < 30, (y, x, a[y, x])


def test_bytes_input_matches_path_input(corpus):
    from_path = load(corpus["exif_rotated"])
    from_bytes = load(corpus["exif_rotated"].read_bytes())
    assert (from_path == from_bytes).all()


def test_plain_sample_photo_loads_unchanged():
    path = badinputs.sample_photo(0)
    img = load_image(path)
    with Image.open(path) as ref:
        assert img.size == ref.size
        assert (np.asarray(img) == np.asarray(ref.convert("RGB"))).all()


# ----------------------------------------------------------------------------- broken images


@pytest.mark.parametrize("case", sorted(badinputs.BAD_IMAGES))
def test_bad_image_raises_with_file_and_reason(corpus, case):
    path = corpus[case]
    with pytest.raises(BadImageError) as info:
        load_image(path, max_pixels=badinputs.CORPUS_MAX_PIXELS)
    err = info.value
    assert str(path) in str(err)
    assert err.source == str(path)
    for word in badinputs.BAD_IMAGES[case]:
        assert word in err.reason.lower(), (case, err.reason)
    assert isinstance(err, ValueError)


@pytest.mark.parametrize("case", ["truncated", "empty", "not_an_image"])
def test_bad_bytes_raise_with_given_name(corpus, case):
    with pytest.raises(BadImageError) as info:
        load_image(corpus[case].read_bytes(), name="upload.jpg")
    assert str(info.value).startswith("upload.jpg: ")
    for word in badinputs.BAD_IMAGES[case]:
        assert word in info.value.reason.lower()


def test_unnamed_bytes_are_called_bytes():
    with pytest.raises(BadImageError, match=r"^<bytes>: empty"):
        load_image(b"")


def test_missing_file(tmp_path):
    with pytest.raises(BadImageError, match="not found") as info:
        load_image(tmp_path / "nope.jpg")
    assert "nope.jpg" in str(info.value)


def test_small_bomb_is_refused_before_decoding(corpus):
    # Under the default limit it is a genuine (if boring) image.
    img = load_image(corpus["bomb"])
    assert img.size == badinputs.SMALL_BOMB_SIZE
    with pytest.raises(BadImageError, match="4,000,000 pixels is over the limit of 3,999,999"):
        load_image(corpus["bomb"], max_pixels=3_999_999)


def test_large_bomb_is_refused_with_default_limit(large_bomb):
    assert large_bomb.stat().st_size < 200_000  # tiny on disk, 400 Mpx inside
    with pytest.raises(BadImageError) as info:
        load_image(large_bomb)
    assert str(large_bomb) in str(info.value)
    assert "limit" in info.value.reason and "decompression bomb" in info.value.reason


def test_large_bomb_is_refused_even_when_pil_limit_is_off(large_bomb, monkeypatch):
    # modelscope sets Image.MAX_IMAGE_PIXELS = None at import in some modules.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with pytest.raises(BadImageError, match="20000x20000 = 400,000,000 pixels is over the limit"):
        load_image(large_bomb)


def test_truncated_fails_even_if_pil_allows_truncated_images(corpus, monkeypatch):
    # modelscope sets ImageFile.LOAD_TRUNCATED_IMAGES = True at import in some modules.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(BadImageError, match="truncated"):
        load_image(corpus["truncated"])
    # ... and the caller's setting is left as it was.
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True
    load_image(corpus["grey"])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True


# ----------------------------------------------------------------------------- helpers


def test_fit_max_side_shrinks_long_side_only():
    img = Image.new("RGB", (1000, 500))
    small = fit_max_side(img, 200)
    assert small.size == (200, 100)
    assert fit_max_side(img, 2000) is img
    assert fit_max_side(img, None) is img


def test_encode_jpeg_round_trips():
    img = Image.new("RGB", (16, 16), (10, 200, 30))
    data = encode_jpeg(img)
    assert data[:3] == b"\xff\xd8\xff"
    back = load_image(data)
    assert np.abs(np.asarray(back).astype(int) - [10, 200, 30]).max() <= 4
