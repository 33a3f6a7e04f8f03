"""Generated image folders for tests: small, seeded, with classes that differ visibly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

PALETTE = [(220, 40, 40), (40, 180, 60), (40, 80, 220), (230, 200, 30), (160, 40, 200)]


def class_image(cls: int, i: int, size: int = 40, seed: int = 0) -> Image.Image:
    """A noisy image whose colour and stripe direction depend on the class."""
    rng = np.random.default_rng(seed * 100_003 + cls * 1009 + i)
    base = np.array(PALETTE[cls % len(PALETTE)], dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size]
    stripes = np.sin((xx if cls % 2 else yy) * (0.5 + 0.2 * cls) + rng.uniform(0, 6.28))
    img = base[None, None, :] * (0.6 + 0.3 * stripes[..., None])
    img += rng.normal(0, 20, size=(size, size, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def make_labelled(
    root: Path, classes: int = 3, per_class: int = 8, size: int = 40, seed: int = 0
) -> Path:
    for c in range(classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            ext = "png" if i % 2 else "jpg"
            class_image(c, i, size, seed).save(folder / f"img_{i:03d}.{ext}")
    return root


def make_flat(root: Path, n: int = 24, size: int = 40, seed: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        class_image(i % 3, i, size, seed).save(root / f"img_{i:03d}.png")
    return root


def _png_header_only(width: int, height: int) -> bytes:
    """A small PNG whose header claims width x height (1-bit): a decompression bomb."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def make_awkward_files(folder: Path) -> dict[str, str | None]:
    """Every kind of awkward file embed must handle: name -> failure reason fragment, or None.

    None means it must be embedded (correctly decoded); a string is part of the reason it
    must be recorded with in the failures table.
    """
    folder.mkdir(parents=True, exist_ok=True)
    base = class_image(0, 0, size=48)
    expected: dict[str, str | None] = {}

    base.save(folder / "ok.jpg", quality=95)
    expected["ok.jpg"] = None
    data = (folder / "ok.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    expected["truncated.jpg"] = "cannot decode"
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    expected["corrupt.png"] = "not an image"
    (folder / "empty.jpg").write_bytes(b"")
    expected["empty.jpg"] = "empty file"
    (folder / "notes.jpg").write_text("this is a text file with an image extension\n")
    expected["notes.jpg"] = "not an image"
    (folder / "bomb.png").write_bytes(_png_header_only(20_000, 10_000))  # 200 MP
    expected["bomb.png"] = "too many pixels"

    arr16 = (np.asarray(base.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(arr16).save(folder / "sixteen_bit.png")
    expected["sixteen_bit.png"] = None
    base.convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.png")
    expected["palette.png"] = None
    transparent = base.convert("P", palette=Image.Palette.ADAPTIVE)
    transparent.info["transparency"] = 0
    transparent.save(folder / "palette_transparent.png", transparency=0)
    expected["palette_transparent.png"] = None
    base.convert("CMYK").save(folder / "cmyk.jpg")
    expected["cmyk.jpg"] = None
    rgba = base.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(folder / "alpha.png")
    expected["alpha.png"] = None
    frames = [base, class_image(1, 0, size=48)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=50)
    expected["animated.gif"] = None
    expected.update(make_exif_rotated(folder))
    return expected


def exif_upright() -> Image.Image:
    """The picture that `rotated.png` shows once its EXIF orientation is applied (48 x 32)."""
    return class_image(2, 0, size=48).crop((0, 0, 48, 32))


def make_exif_rotated(folder: Path) -> dict[str, str | None]:
    """`rotated.png`: stored a quarter turn off, with EXIF orientation 6 to put it right."""
    stored = exif_upright().transpose(Image.Transpose.ROTATE_90)  # 32 x 48 on disk
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    stored.save(folder / "rotated.png", exif=exif)
    return {"rotated.png": None}
