"""Decoding photos by content (not extension), upright (EXIF), as 8-bit RGB, cheaply.

PIL sniffs the format from the bytes, so a PNG or WebP named `.jpg` decodes. For JPEGs much
larger than the target, `draft()` lets libjpeg decode at 1/2, 1/4 or 1/8 scale in the DCT domain,
which is several times faster than a full decode followed by a resize.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# Orientation values whose transpose swaps width and height.
_SWAPS_AXES = {5, 6, 7, 8}
_ORIENTATION_TAG = 0x0112


class UnreadableImage(Exception):
    pass


# Everything PIL raises for a file it cannot or will not decode. DecompressionBombError (a header
# claiming more than twice PIL's pixel limit) is not an OSError, so it is named on its own.
DECODE_ERRORS = (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError)


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(_ORIENTATION_TAG, 1))
    except Exception:  # a broken EXIF block must not make the pixels unreadable
        return 1


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: scale to 8 bits instead of letting PIL clip everything above 255.
        array = np.asarray(image, dtype=np.float64)
        peak = array.max() if array.size else 0
        array = array * (255.0 / peak) if peak > 255 else array
        image = Image.fromarray(array.clip(0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        # Composite on black rather than dropping alpha (which could expose arbitrary colours).
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def read_size(path: Path) -> tuple[int, int]:
    """(width, height) as displayed (after EXIF rotation), reading only the header."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            return (height, width) if _orientation(image) in _SWAPS_AXES else (width, height)
    except DECODE_ERRORS as exc:
        raise UnreadableImage(f"{path}: {exc}") from exc


def size_labels(root: Path, paths, on_each=None) -> list[str]:
    """`WIDTHxHEIGHT` of each image (upright, from the header only), or `unreadable`."""
    labels = []
    for path in paths:
        try:
            width, height = read_size(root / path)
            labels.append(f"{width}x{height}")
        except UnreadableImage:
            labels.append("unreadable")
        if on_each:
            on_each(1)
    return labels


def load_rgb(path: Path, target: tuple[int, int] | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """Decode `path` upright as RGB. Returns the image and its full-resolution (width, height).

    With `target` (width, height), a JPEG may be decoded at a reduced scale that is still at
    least as large as the target on both axes, so the later resize loses nothing visible.
    """
    try:
        with Image.open(path) as image:
            orientation = _orientation(image)
            width, height = image.size
            if target is not None and image.format == "JPEG":
                want = (target[1], target[0]) if orientation in _SWAPS_AXES else target
                image.draft("RGB", want)
            image.load()
            upright = ImageOps.exif_transpose(image) if orientation != 1 else image
            rgb = _to_rgb(upright)
    except DECODE_ERRORS as exc:
        raise UnreadableImage(f"{path}: {exc}") from exc
    size = (height, width) if orientation in _SWAPS_AXES else (width, height)
    return rgb, size


# Truncated JPEGs raise instead of being padded with grey: a half-grey fish photo is a silent error.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# Real 8000x6000 photos exist; PIL's bomb guard (~179 MP) still protects against absurd files.
