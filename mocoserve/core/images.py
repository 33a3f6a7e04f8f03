"""Finding and decoding image files: one implementation shared by training and serving.

A leaf module (PIL and numpy only), so the serving path and `train` can both use it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import numpy as np
from PIL import ExifTags, Image, ImageFile, ImageOps

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)
# Decompression-bomb guard: PIL raises above twice this many pixels (about 180 MP here).
# Serving and `embed` refuse at their own, lower limit first (`max_pixels`, TooManyPixels).
Image.MAX_IMAGE_PIXELS = 89_478_485
ImageFile.LOAD_TRUNCATED_IMAGES = False


def is_image_file(path: str | os.PathLike) -> bool:
    """True if the file name has one of the common image extensions."""
    return os.path.splitext(str(path))[1].lower() in IMAGE_EXTENSIONS


def iter_image_files(root: str | os.PathLike) -> Iterator[Path]:
    """Yield image files under `root` recursively, sorted, following each symlinked folder once."""
    seen: set[tuple[int, int]] = set()

    def walk(folder: Path) -> Iterator[Path]:
        st = folder.stat()
        if (st.st_dev, st.st_ino) in seen:  # a symlink loop or a folder linked twice
            return
        seen.add((st.st_dev, st.st_ino))
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            return
        for entry in entries:
            path = Path(entry.path)
            try:
                if entry.is_dir(follow_symlinks=True):
                    yield from walk(path)
                elif entry.is_file(follow_symlinks=True) and is_image_file(path):
                    yield path
            except OSError:
                continue

    yield from walk(Path(root))


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparent pixels become white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img if img.mode == "RGBA" else img.convert("RGBA")  # no copy of an RGBA image
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode != "RGB":
        return img.convert("RGB")
    return img


class TooManyPixels(Image.DecompressionBombError):
    """An image over an explicit pixel limit, found from its header before any decoding."""

    def __init__(self, width: int, height: int, max_pixels: int) -> None:
        super().__init__(
            f"{width} x {height} = {width * height:,} pixels, over the limit of "
            f"{max_pixels:,} per image"
        )


def load_rgb(path: str | os.PathLike | IO[bytes], draft_size: int | None = None) -> Image.Image:
    """Decode an image file to RGB: EXIF orientation applied, first frame of animations.

    `draft_size` lets JPEG decoding skip resolution it does not need (the result is at
    least that many pixels on its shorter side). Raises OSError/ValueError on bad files.
    """
    return decode_image(path, draft_size)[0]


def _check_and_draft(img: Image.Image, draft_size: int | None, max_pixels: int | None) -> None:
    """Refuse an image over `max_pixels` (header size); set a JPEG's draft (lazy, no decode)."""
    width, height = img.size
    if max_pixels is not None and width * height > max_pixels:
        raise TooManyPixels(width, height, max_pixels)
    if draft_size is not None and img.format == "JPEG":
        scale = max(draft_size / min(width, height), 1e-9)
        img.draft("RGB", (max(1, int(width * scale + 0.999)), max(1, int(height * scale + 0.999))))


def header_pixels(
    source: str | os.PathLike | IO[bytes],
    draft_size: int | None = None,
    max_pixels: int | None = None,
) -> tuple[int, int]:
    """(pixels in the image, pixels `decode_image` would decode) from the header alone.

    The second is smaller for a JPEG that decodes in draft mode. Raises TooManyPixels
    over `max_pixels`, and what Image.open raises for a file it cannot identify.
    """
    with Image.open(source) as img:
        pixels = img.size[0] * img.size[1]
        _check_and_draft(img, draft_size, max_pixels)
        return pixels, img.size[0] * img.size[1]


def decode_image(
    source: str | os.PathLike | IO[bytes],
    draft_size: int | None = None,
    max_pixels: int | None = None,
) -> tuple[Image.Image, tuple[int, int]]:
    """`load_rgb`, plus the full-resolution (width, height) after EXIF orientation.

    `max_pixels`: refuse (TooManyPixels) an image with more pixels, before decoding it.
    """
    with Image.open(source) as img:
        width, height = img.size
        _check_and_draft(img, draft_size, max_pixels)
        img.seek(0)
        img.load()
        orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
        if orientation in (5, 6, 7, 8):  # a quarter turn swaps the sides
            width, height = height, width
        if orientation != 1:  # exif_transpose copies even an upright image: 4 bytes a pixel
            img = ImageOps.exif_transpose(img)
        # leaving `with` closes only the file; the loaded pixels stay valid
        return _to_rgb(img), (width, height)


_FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}  # a package's interpolation


def resize_crop(
    image: Image.Image, resize: int, crop: int, interpolation: str = "bilinear"
) -> Image.Image:
    """Resize the shorter side to `resize` and centre-crop `crop` pixels, as torchvision does.

    `interpolation` (bilinear, bicubic) is Pillow's filter, as torchvision's and timm's eval
    transforms use on PIL images.
    """
    image = image.convert("RGB") if image.mode != "RGB" else image
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(resize * long / short)  # torchvision's Resize(int) arithmetic
    new_w, new_h = (resize, new_long) if w <= h else (new_long, resize)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), _FILTERS[interpolation])
    left = round((new_w - crop) / 2.0)  # torchvision's center_crop arithmetic
    top = round((new_h - crop) / 2.0)
    return image.crop((left, top, left + crop, top + crop))
