"""Reading user photos safely: one function that turns any odd file into RGB or a clear error.

Product photos come from phones, scanners and marketplaces: CMYK JPEGs, 16-bit
PNGs, transparent PNGs, EXIF-rotated shots, truncated uploads, and the odd text
file named ``.jpg``. Everything that reads an image in this kit goes through
:func:`load_image`, so every step treats them the same way.
"""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

#: Default pixel limit (width × height). Large enough for a 12k × 8k scan,
#: small enough that a decompression bomb is refused before it is decoded.
DEFAULT_MAX_PIXELS = 100_000_000

#: CLIP's per-channel pixel mean and standard deviation (RGB, on [0, 1] values): the normalisation of
#: every cn_clip model's input (training, the exported ONNX image encoder, :func:`cnclip_kd.deploy.backends.to_pixels`).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview]


class BadImageError(ValueError):
    """An input that cannot be used as an image.

    Attributes:
        source: The file path (or ``"<bytes>"``) that failed.
        reason: A short reason, suitable for a skip report.
    """

    def __init__(self, source: str, reason: str):
        self.source = source
        self.reason = reason
        super().__init__(f"{source}: {reason}")


class TooManyPixelsError(BadImageError):
    """An image over the pixel limit (a possible decompression bomb), found from its header before decoding."""


def _open(source: ImageSource, name: str) -> Image.Image:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise BadImageError(name, "empty data (0 bytes)")
        return Image.open(io.BytesIO(data))
    path = Path(source)
    if not path.is_file():
        raise BadImageError(name, "file not found")
    if path.stat().st_size == 0:
        raise BadImageError(name, "empty file (0 bytes)")
    return Image.open(path)


# Some libraries (modelscope's OFA preprocessors and several of its pipelines)
# set PIL's process-wide ImageFile.LOAD_TRUNCATED_IMAGES at import, which turns a
# truncated upload into a half-grey image without a word. Loads here switch it
# off while any of them runs, and restore it when the last one ends.
_strict_lock = threading.Lock()
_strict_users = 0
_saved_truncated_flag = False


def load_strict(img: Image.Image) -> None:
    global _strict_users, _saved_truncated_flag
    with _strict_lock:
        if _strict_users == 0:
            _saved_truncated_flag = ImageFile.LOAD_TRUNCATED_IMAGES
            ImageFile.LOAD_TRUNCATED_IMAGES = False
        _strict_users += 1
    try:
        img.load()
    finally:
        with _strict_lock:
            _strict_users -= 1
            if _strict_users == 0:
                ImageFile.LOAD_TRUNCATED_IMAGES = _saved_truncated_flag


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB the way a person would expect to see it."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: PIL's convert() clips at 255, which turns most
        # photos white; scale the full range down instead.
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo or 1.0) * 255.0
        return Image.fromarray(arr.astype(np.uint8), mode="L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent product cut-outs: put them on white, as shops show them.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode != "RGB":
        return img.convert("RGB")
    return img


def load_image(
    source: ImageSource,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    name: str | None = None,
) -> Image.Image:
    """Open, check and decode an image into an RGB PIL image.

    The EXIF orientation is applied, transparency is composited on white,
    CMYK/greyscale/16-bit images are converted to 8-bit RGB, and the image is
    fully decoded (so a truncated file fails here, not later in a DataLoader).

    Args:
        source: A file path, or the encoded bytes of an image.
        max_pixels: Refuse images with more pixels than this (checked from the
            header, before decoding), which guards against decompression bombs.
        name: How to name the input in errors; defaults to the path.

    Returns:
        A decoded ``RGB`` image.

    Raises:
        BadImageError: The input is missing, empty, not an image, corrupt or
            truncated, or larger than ``max_pixels``. The message names the
            input and the reason.
    """
    if name is None:
        name = "<bytes>" if isinstance(source, (bytes, bytearray, memoryview)) else str(source)
    try:
        img = _open(source, name)
    except UnidentifiedImageError:
        raise BadImageError(name, "not an image file (unknown or corrupt format)") from None
    except Image.DecompressionBombError as err:
        # PIL's own hard limit (2 x Image.MAX_IMAGE_PIXELS) fires inside Image.open, before the check below.
        raise TooManyPixelsError(name, f"over PIL's pixel limit (possible decompression bomb): {err}") from None
    except OSError as err:
        raise BadImageError(name, f"cannot open: {err}") from err
    try:
        width, height = img.size
        if width * height > max_pixels:
            raise TooManyPixelsError(
                name,
                f"{width}x{height} = {width * height:,} pixels is over the limit of "
                f"{max_pixels:,} (possible decompression bomb); raise max_pixels if the image is genuine",
            )
        if width == 0 or height == 0:
            raise BadImageError(name, f"image has no pixels ({width}x{height})")
        try:
            load_strict(img)
        except Image.DecompressionBombError as err:
            raise TooManyPixelsError(name, f"decompression bomb: {err}") from err
        except (OSError, SyntaxError, ValueError) as err:
            raise BadImageError(name, f"truncated or corrupt image data ({err})") from err
    except BadImageError:
        img.close()  # release the file handle Image.open kept
        raise
    return _to_rgb(ImageOps.exif_transpose(img))


def fit_max_side(img: Image.Image, max_side: int | None) -> Image.Image:
    """Shrink ``img`` so its longer side is at most ``max_side`` (bicubic); never enlarge."""
    if not max_side or max(img.size) <= max_side:
        return img
    scale = max_side / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(size, Image.BICUBIC)


def encode_jpeg(img: Image.Image, quality: int = 95) -> bytes:
    """Encode an RGB image as JPEG bytes."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
