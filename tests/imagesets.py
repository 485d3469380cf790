"""Tiny image folders and archives for the dataset tests, in the formats people have on disk."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("circle", "square", "triangle")  # sorted, as the folder reader orders classes


def shape_image(kind: str, size: tuple[int, int], seed: int, colour=(200, 60, 40)) -> np.ndarray:
    """RGB (H, W, 3): a learnable shape (by class) on a noisy background."""
    rng = np.random.default_rng(seed)
    height, width = size
    image = rng.integers(0, 50, (height, width, 3)).astype(np.uint8)
    y, x = np.mgrid[0:height, 0:width]
    cy, cx, r = height / 2, width / 2, min(height, width) / 3
    if kind == "circle":
        mask = (y - cy) ** 2 + (x - cx) ** 2 < r**2
    elif kind == "square":
        mask = (abs(y - cy) < r) & (abs(x - cx) < r)
    else:
        mask = (y > cy - r) & (y < cy + r) & (abs(x - cx) < (y - (cy - r)) / 2)
    image[mask] = colour
    return image


def encode(array: np.ndarray, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt, **options)
    return buffer.getvalue()


def write_folder(
    root: Path, per_class: int = 8, size=(40, 56), formats=("PNG", "JPEG"), seed: int = 0
) -> dict[str, bytes]:
    """`<root>/<class>/<i>.<ext>` for every class; returns relative path → bytes."""
    written = {}
    for c, kind in enumerate(CLASSES):
        for i in range(per_class):
            fmt = formats[i % len(formats)]
            data = encode(
                shape_image(kind, size, seed=seed + 100 * c + i),
                fmt,
                **({"quality": 92} if fmt == "JPEG" else {}),
            )
            name = f"{kind}/{i:03d}.{'jpg' if fmt == 'JPEG' else fmt.lower()}"
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(data)
            written[name] = data
    return written


def exif_jpeg(array: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(array, "JPEG", quality=95, exif=exif.tobytes())


def png16(array_gray: np.ndarray) -> bytes:
    """A 16-bit grayscale PNG of an 8-bit image (v · 257: the decoder must give v back)."""
    return encode((array_gray.astype(np.uint16) * 257), "PNG")


def cmyk_jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).convert("CMYK").save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def tar_bytes(members: dict[str, bytes], links: dict[str, str] | None = None, gz: bool = False) -> bytes:
    """A tar (or tar.gz) holding `members` and symbolic `links` (name → target), names as given."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if gz else "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return buffer.getvalue()


def zip_bytes(members: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = 0o120777 << 16  # a symbolic link, as Info-ZIP stores one
            archive.writestr(info, target)
    return buffer.getvalue()
