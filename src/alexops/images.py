"""The one image decoder: every image that enters alexops goes through `decode` or `read`.

The server, `alexops predict` and the folder datasets all call this module, so that a file
means the same pixels everywhere. A pure function of bytes: numpy, Pillow and simplejpeg
(libjpeg-turbo's scaled decoding) only, no torch, no globals changed, every argument
picklable (a process pool can call it).

What a viewer shows is what the model gets:

- EXIF orientation, all eight values, in every format that carries it (JPEG/MPO, PNG's
  eXIf chunk, WebP, TIFF), by Pillow's own `ImageOps.exif_transpose`.
- Bit depth: 16- and 32-bit integer samples are scaled to 8 bits by their real range (see
  `sample_range`), never clipped; float samples map 0.0 → 0 and 1.0 → 255 (see
  `float_range`).
- Transparency (an alpha channel, a palette's or a PNG's transparent colour) is
  composited over a background colour the caller names: the dataset's background.
- Palette, CMYK, YCbCr, LAB, bilevel: converted by Pillow; animated files (GIF, APNG,
  WebP, multi-page TIFF): the first frame.
- The capture recipe (`Capture`): how a dataset's images were made from photographs.
  `capture` brings a photo into that form (Fashion-MNIST: trim, fit, centre, negate; a
  folder dataset: shorter side to its cache size, centre square crop, as the paper made
  ImageNet's), detecting first, in mode `auto`, whether the image is already in it.
- JPEG draft decoding (`draft`): a JPEG larger than the size it is brought to is decoded
  at a scale M/8 (M = 1..8) in the DCT domain, never below that size (`_drafted`); one
  whose header holds nothing for Pillow to act on (no EXIF, XMP, ICC profile...) skips
  Pillow until the resampling (`_plain_jpeg`), with the same pixels.

Errors are `ImageError` (an `AlexopsError`) naming the image, the problem and the fix.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import struct
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import simplejpeg
from PIL import Image, ImageFilter, ImageOps

from alexops.errors import AlexopsError

DEFAULT_MAX_PIXELS = 4096 * 4096
# Formats read. EPS is left out on purpose: Pillow hands it to Ghostscript.
FORMATS = (
    "PNG", "JPEG", "MPO", "GIF", "BMP", "DIB", "TIFF", "WEBP", "PPM", "TGA", "ICO", "PCX", "QOI",
    "SGI", "PSD", "AVIF",
)  # fmt: skip
MODES = {1: "L", 3: "RGB"}  # channels → the Pillow mode of the pixels returned
CAPTURE_MODES = ("auto", "dataset", "none")


class ImageError(AlexopsError):
    """An image that cannot be decoded. `reason` is a short label (metrics, HTTP status):
    empty, not_an_image, corrupt_image, too_many_pixels."""

    def __init__(self, message: str, reason: str = "corrupt_image") -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # keeps `reason` across a process pool's pickling
        return (type(self), (str(self), self.reason))


# ---- decoding -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layers:
    """A decoded image before compositing: colour uint8 (C, H, W), alpha uint8 (H, W) or None.

    Alpha is straight (not premultiplied), 255 opaque; None when the file has no transparency.
    """

    colour: np.ndarray
    alpha: np.ndarray | None


def decode(
    data: bytes,
    channels: int,
    *,
    background: Sequence[int] | int = 0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    label: str = "image",
) -> np.ndarray:
    """Image file bytes → uint8 (channels, H, W), upright, 8-bit, transparency over `background`.

    channels: 1 (grayscale, ITU-R 601-2 luma as Pillow's "L") or 3 (RGB; gray copied to all three).
    background: the colour under transparent pixels, 0-255, one value or one per channel.
    max_pixels: width × height refused beyond (checked from the header, before decoding).
    Raises ImageError (empty, not an image, truncated or corrupt, too many pixels).
    """
    return composite(read(data, channels, max_pixels=max_pixels, label=label), background)


def read(
    data: bytes,
    channels: int,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    label: str = "image",
    draft: int = 0,
    square_opaque: bool = False,
) -> Layers:
    """Like `decode`, but the alpha channel kept apart (for callers that decide the background).

    draft: when > 0 and the file is a JPEG, decode it at the smallest of the scales M/8
    (M = 1..8) that keeps both sides ≥ draft px (libjpeg-turbo's DCT scaling, `_drafted`):
    up to 64× fewer pixels decoded for an image that is then shrunk to `draft` px anyway.
    square_opaque: with draft, an opaque 8-bit image comes back already `square`d to draft px,
    resampled from Pillow's decoded image (the same pixels, without two full-size copies
    through numpy); an image with alpha comes back as decoded, to be squared after compositing.
    """
    if channels not in MODES:
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if not data:
        raise ImageError(f"{label} is empty (0 bytes).", reason="empty")
    if draft > 0 and square_opaque:
        squared = _plain_jpeg(data, channels, draft, max_pixels, label)
        if squared is not None:
            return squared
    try:
        with Image.open(io.BytesIO(data), formats=readable_formats()) as image:
            check_pixels(image.size, max_pixels, label)  # from the header, before decoding
            if draft > 0 and image.format in ("JPEG", "MPO"):
                image = _drafted(data, image, channels, draft)
            return _layers(image, channels, draft if square_opaque else 0)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:  # Pillow's own limit
        raise too_many_pixels(label, max_pixels, str(exc)) from exc
    except Image.UnidentifiedImageError as exc:
        raise ImageError(
            f"{label} is not an image alexops can read ({', '.join(readable_formats()[:8])}, ...).",
            reason="not_an_image",
        ) from exc
    except Exception as exc:  # truncated data and corrupt chunks raise OSError, ValueError, SyntaxError...
        problem = (str(exc).splitlines() or [""])[0][:200] or exc.__class__.__name__
        raise ImageError(
            f"{label} could not be decoded: {problem} (truncated or corrupt file?).", reason="corrupt_image"
        ) from exc


def composite(layers: Layers, background: Sequence[int] | int = 0) -> np.ndarray:
    """Straight alpha over an opaque background colour: c·a + bg·(1 − a), rounded; uint8 (C, H, W)."""
    if layers.alpha is None:
        return layers.colour
    channels = layers.colour.shape[0]
    bg = _colour(background, channels)[:, None, None]
    a = layers.alpha.astype(np.int32)[None]
    mixed = layers.colour.astype(np.int32) * a + bg * (255 - a)
    return ((mixed + 127) // 255).astype(np.uint8)


def pixel_count(data: bytes) -> int:
    """Width × height from the header alone; 0 when the header is not one `read` accepts."""
    try:
        with Image.open(io.BytesIO(data), formats=readable_formats()) as image:
            return image.width * image.height
    except Exception:  # whatever it is, `read` reports it properly
        return 0


def dimensions(data: bytes) -> tuple[int, int] | None:
    """(width, height) as stored, from the header alone; None when `read` would not accept it."""
    try:
        with Image.open(io.BytesIO(data), formats=readable_formats()) as image:
            return image.size
    except Exception:  # whatever it is, `read` reports it properly
        return None


def _drafted(data: bytes, image: Image.Image, channels: int, size: int) -> Image.Image:
    """A JPEG decoded in the DCT domain at the smallest scale that keeps both sides ≥ `size` px.

    libjpeg-turbo scales by M/8 (M = 1..8) while it decodes; simplejpeg calls it with every M,
    Pillow's `Image.draft` with 1/8, 1/4 and 1/2 only (a 500×375 photo brought to 113 px: 3/8,
    188×141 px, against Pillow's 1/2, 250×188). The mode as decoded: gray straight from the
    luma plane, RGB from YCbCr. CMYK and YCCK files, and files libjpeg-turbo reports damaged,
    go to Pillow's draft, which converts the one and says what is wrong with the other.
    The result keeps the file's metadata (`info`), where `upright` finds the orientation.
    """
    if image.mode not in ("L", "RGB"):  # CMYK, YCCK
        image.draft(image.mode, (size, size))
        return image
    colourspace = "GRAY" if channels == 1 else "RGB"
    try:
        pixels = simplejpeg.decode_jpeg(data, colorspace=colourspace, min_height=size, min_width=size)
    except ValueError:  # truncated or corrupt (strict: warnings too)
        image.draft(MODES[channels], (size, size))
        return image
    decoded = Image.fromarray(pixels[..., 0] if channels == 1 else pixels)
    decoded.info = dict(image.info)
    return decoded


def _plain_jpeg(data: bytes, channels: int, size: int, max_pixels: int, label: str) -> Layers | None:
    """`read(data, channels, draft=size, square_opaque=True)` for a JPEG with nothing for
    Pillow to act on, without Pillow's header parse and copies; None for any other file.

    Such a JPEG has a plain header (`_plain_header`: no EXIF or XMP, where an orientation
    lives, nothing Pillow's parser could refuse) and is coded gray or YCbCr, so it is opaque,
    upright and 8-bit: what `read` would do to it is `_drafted` and `square`, done here on
    the decoder's own buffer (RGBX: 4 bytes a pixel, Pillow's layout, so Pillow resamples it
    without a copy). The same pixels, 6-11% sooner: 0.1 ms of the 1.2-1.6 ms that a 500×375
    photo brought to 106 px takes in a prepare worker (hash and moments included), most of the
    rest being libjpeg-turbo's decoding and Pillow's resampling. A file that libjpeg-turbo
    calls damaged, or that is over Pillow's own pixel limit, goes back to `read`, which says
    what is wrong in Pillow's words.
    """
    if not data.startswith(b"\xff\xd8") or not _plain_header(data):
        return None
    try:
        height, width, coding, _ = simplejpeg.decode_jpeg_header(data)
        if coding not in ("Gray", "YCbCr"):
            return None
        check_pixels((width, height), max_pixels, label)
        if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
            return None  # Pillow's decompression-bomb warning or error, as `read` gives them
        colourspace, mode = ("GRAY", "L") if channels == 1 else ("RGBX", "RGBX")
        pixels = simplejpeg.decode_jpeg(data, colorspace=colourspace, min_height=size, min_width=size)
    except ValueError:  # truncated or corrupt (strict: warnings too)
        return None
    height, width = pixels.shape[:2]
    image = Image.frombuffer(mode, (width, height), pixels, "raw", mode, 0, 1)  # no copy
    squared = np.asarray(_square_image(image, size))
    colour = squared[None] if channels == 1 else squared[..., :3].transpose(2, 0, 1)
    return Layers(_own(colour), None)


# The segments of a plain JPEG header (ITU-T T.81, Table B.1), by marker: the frame (baseline,
# extended or progressive Huffman), quantisation and Huffman tables, restart interval,
# comments; and JFIF's APP0. Whole, Pillow's parser neither refuses them nor acts on them here.
# Any other segment (APP1 EXIF or XMP, APP2 ICC or MPF, APP14 Adobe, a lossless or arithmetic
# frame...) or a parameterless marker sends a file Pillow's way.
PLAIN_SEGMENTS = frozenset({0xC0, 0xC1, 0xC2, 0xC4, 0xDB, 0xDD, 0xFE})
APP0, JFIF, JFIF_LENGTH = 0xE0, b"JFIF\x00", 16  # identifier, version, units, density, thumbnail size


def _plain_header(jpeg: bytes) -> bool:
    """Whether a JPEG's segments before its first scan are all PLAIN_SEGMENTS or a whole JFIF
    APP0 (Pillow reads its version and density, and refuses one too short for them); False
    for anything else, and for a header that does not parse as a chain of segments."""
    at = 2  # after the start-of-image marker
    while at + 4 <= len(jpeg) and jpeg[at] == 0xFF:
        marker = jpeg[at + 1]
        if marker == 0xFF:  # a fill byte before the marker
            at += 1
            continue
        if marker == 0xDA:  # start of scan: the header is over
            return True
        length = int.from_bytes(jpeg[at + 2 : at + 4], "big")  # counts its own two bytes
        if marker == APP0:
            if length < JFIF_LENGTH or not jpeg.startswith(JFIF, at + 4):
                return False
        elif marker not in PLAIN_SEGMENTS or length < 2:
            return False
        at += 2 + length
    return False


def square(pixels: np.ndarray, size: int) -> np.ndarray:
    """uint8 (C, H, W) → (C, size, size): the shorter side resized to `size`, the centre square kept.

    How Krizhevsky et al. (2012, §2) brought ImageNet's images to 256 × 256: "rescaled the image
    such that the shorter side was of length 256, and then cropped out the central 256×256
    patch". Done here as one resampling of the central square (Pillow's antialiased bilinear
    filter, sub-pixel box), so the cropped-away sides are never resampled. An image already
    size × size is returned as it is, bit for bit.
    """
    channels, height, width = pixels.shape
    if height == width == size:
        return pixels
    out = np.asarray(
        _square_image(Image.fromarray(pixels[0] if channels == 1 else pixels.transpose(1, 2, 0)), size)
    )
    return _own(out[None] if channels == 1 else out.transpose(2, 0, 1))


def _square_image(image: Image.Image, size: int) -> Image.Image:
    """`square` on a Pillow image (L or RGB): the central square resampled to size × size."""
    width, height = image.size
    if width == height == size:
        return image
    side = min(height, width)
    box = ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)
    return image.resize((size, size), Image.Resampling.BILINEAR, box=box)


@functools.cache
def readable_formats() -> tuple[str, ...]:
    """FORMATS that this Pillow build reads (AVIF needs libavif, for one)."""
    Image.init()
    return tuple(name for name in FORMATS if name in Image.OPEN)


def check_pixels(size: tuple[int, int], max_pixels: int, label: str = "image") -> None:
    width, height = size
    if width * height > max_pixels:
        raise too_many_pixels(label, max_pixels, f"{width}×{height} = {width * height} pixels")


def too_many_pixels(label: str, max_pixels: int, detail: str) -> ImageError:
    return ImageError(
        f"{label} is too large to decode ({detail}); at most {max_pixels} pixels are decoded "
        "(--max-pixels). Fix: send a smaller image.",
        reason="too_many_pixels",
    )


def _layers(image: Image.Image, channels: int, square_to: int = 0) -> Layers:
    image.seek(0)  # an animated file: its first frame (also where Pillow opens it)
    deep = image.mode in ("I", "F") or image.mode.startswith("I;")
    if deep:  # the file's own declarations; the transposed copy below has lost its format and tags
        image.load()
        declared = Declared(image.format, dict(getattr(image, "tag_v2", {}) or {}))
    image = upright(image)
    if deep:
        gray, alpha = _deep_gray(image, declared)
        colour = gray[None] if channels == 1 else np.repeat(gray[None], 3, axis=0)
        return Layers(_own(colour), alpha)
    mode = MODES[channels]
    if _has_transparency(image):
        if image.mode == "La":  # premultiplied gray: Pillow converts it to LA only
            image = image.convert("LA")
        pixels = np.asarray(_convert(_convert(image, "RGBA"), f"{mode}A" if mode == "L" else "RGBA"))
        colour, alpha = pixels[..., :-1], pixels[..., -1]
        if alpha.min() == 255:
            alpha = None
    else:
        colour = _convert(image, mode)
        colour, alpha = np.asarray(_square_image(colour, square_to) if square_to else colour), None
    colour = colour[None] if colour.ndim == 2 else colour.transpose(2, 0, 1)
    return Layers(_own(colour), None if alpha is None else _own(alpha))


# Where Pillow finds an orientation besides TIFF's own tags (Image.getexif): EXIF, ImageMagick's
# hex EXIF in a PNG text chunk, XMP. An image without any of these is upright as stored.
ORIENTATION_SOURCES = ("exif", "Raw profile type exif", "xmp", "XML:com.adobe.xmp")


def upright(image: Image.Image) -> Image.Image:
    """The image as viewers show it: its EXIF orientation applied, in place (the image, loaded).
    EXIF that cannot be read is ignored, as viewers ignore it: the pixels are shown as stored."""
    image.load()  # a PNG's eXIf chunk may follow its pixels
    if image.format != "TIFF" and not any(key in image.info for key in ORIENTATION_SOURCES):
        return image  # nothing to apply: skip Pillow's EXIF parse (0.1 ms of a 28 px PNG)
    # in place: a camera photo, orientation 1 or not, is not copied; the errors are Pillow's EXIF parser's
    with contextlib.suppress(SyntaxError, ValueError, TypeError, struct.error, KeyError):
        ImageOps.exif_transpose(image, in_place=True)
    return image


def _convert(image: Image.Image, mode: str) -> Image.Image:
    """Pillow's conversion, through RGB(A) where it has no direct one (CMYK → L, LAB → L)."""
    try:
        return image.convert(mode)
    except ValueError:
        return image.convert("RGBA" if mode.endswith("A") else "RGB").convert(mode)


def _own(array: np.ndarray) -> np.ndarray:
    """A contiguous array the caller may write to (Pillow's are read-only views)."""
    array = np.ascontiguousarray(array)
    return array if array.flags.writeable else array.copy()


def _has_transparency(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


# ---- bit depth ----------------------------------------------------------------------------

# TIFF tags (TIFF 6.0 §8, §19)
BITS_PER_SAMPLE, SAMPLE_FORMAT, MAX_SAMPLE_VALUE = 258, 339, 281
S_MIN_SAMPLE_VALUE, S_MAX_SAMPLE_VALUE = 340, 341


@dataclass(frozen=True)
class Declared:
    """What a file says about its samples: its format and (TIFF) its tags."""

    format: str | None
    tags: dict


def sample_range(declared: Declared, mode: str, values: np.ndarray) -> int:
    """The real range of an integer image's samples, 0..M: what its file says a sample can hold.

    - TIFF: its MaxSampleValue tag when present, else 2^BitsPerSample − 1 (2^31 − 1 for
      signed samples, whose negative values are clipped to black).
    - PNG (and the 16-bit "I;16" modes of any format): 65535. The PNG spec has encoders scale
      samples of fewer significant bits (sBIT) up to the full 16 bits, so the full range is right.
    - PGM/PPM: 65535, since Pillow rescales the file's maxval to 65535 when it reads it.
    - Any other format: 65535 when every value fits in 16 bits, else 2^31 − 1.

    Not the image's own minimum and maximum: that would stretch every image to full
    contrast (a dark photo would lose its exposure, a blank one would become noise), and a
    16-bit copy v·257 of an 8-bit image would not come back as v. With M = 65535 it does:
    round(v·257·255 / 65535) = v.
    """
    if declared.format == "TIFF":
        tags = declared.tags
        if (top := _first(tags.get(MAX_SAMPLE_VALUE))) and top > 0:
            return int(top)
        bits = int(_first(tags.get(BITS_PER_SAMPLE)) or 16)
        signed = _first(tags.get(SAMPLE_FORMAT)) == 2
        return 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    if mode.startswith("I;16") or declared.format in ("PNG", "PPM"):
        return 65535
    return 65535 if values.size == 0 or values.max() <= 65535 else 2**31 - 1


def float_range(declared: Declared) -> tuple[float, float]:
    """The range of a float image that maps to black..white: (0.0, 1.0), the convention of
    scikit-image, OpenCV's float images, PFM and OpenEXR viewers; a TIFF's SMinSampleValue and
    SMaxSampleValue tags replace it when present. Values outside are clipped, NaN is black.
    A float image that holds 0-255 values therefore comes out white: save such images as 8-bit."""
    if declared.format == "TIFF":
        tags = declared.tags
        low, high = _first(tags.get(S_MIN_SAMPLE_VALUE)), _first(tags.get(S_MAX_SAMPLE_VALUE))
        if low is not None and high is not None and float(high) > float(low):
            return float(low), float(high)
    return 0.0, 1.0


def _deep_gray(image: Image.Image, declared: Declared) -> tuple[np.ndarray, np.ndarray | None]:
    """A 16/32-bit integer or 32-bit float grayscale image → uint8 (H, W), alpha or None."""
    values = np.asarray(image)
    alpha = None
    if (transparent := image.info.get("transparency")) is not None and np.isscalar(transparent):
        alpha = np.where(values == transparent, 0, 255).astype(np.uint8)  # a PNG tRNS gray value
    if image.mode == "F":
        low, high = float_range(declared)
        scaled = np.nan_to_num((values.astype(np.float64) - low) / (high - low), nan=0.0)
        return np.floor(np.clip(scaled, 0.0, 1.0) * 255 + 0.5).astype(np.uint8), alpha
    top = sample_range(declared, image.mode, values)
    # integer arithmetic: round(v · 255 / top), halves up, exact for every v in 0..top
    v = np.clip(values.astype(np.int64), 0, top)
    return ((v * 255 + top // 2) // top).astype(np.uint8), alpha


def _first(value):
    """A TIFF tag's value: Pillow gives a tuple for per-sample tags, a scalar otherwise."""
    if isinstance(value, tuple):
        return value[0] if value else None
    return value


def _colour(value: Sequence[int] | int, channels: int) -> np.ndarray:
    values = [int(value)] if isinstance(value, int | np.integer) else [int(v) for v in value]
    if len(values) == 1:
        values *= channels
    elif channels == 1 and len(values) == 3:  # an RGB colour for a gray image: its luma
        r, g, b = values
        values = [(r * 299 + g * 587 + b * 114 + 500) // 1000]
    if len(values) != channels or not all(0 <= v <= 255 for v in values):
        raise ValueError(f"a background colour needs 1 or {channels} values in 0-255, got {value!r}")
    return np.asarray(values, dtype=np.int32)


# ---- the capture recipe ---------------------------------------------------------------------


CATALOGUE_ONLY = ("backdrop", "trim_fuzz", "sharpen_sigma", "negate")


@dataclass(frozen=True)
class Capture:
    """How a dataset's images were made from photographs: its capture recipe.

    kind "photo": natural photographs. Without `size` they were downscaled as a whole (CIFAR-10):
    nothing to bring an image into. With `size` (a folder dataset) each was brought to size ×
    size as the paper did ImageNet's (`square`: shorter side to `size`, centre square crop), and
    so is every image served: decoded with JPEG draft scaling to `size`, squared.
    kind "catalogue": product photos on a light backdrop brought into the dataset's form as
    Xiao, Rasul & Vollgraf (2017, §2) made Fashion-MNIST: trim the edges within `trim_fuzz`
    of the backdrop colour, fit the longest edge to `size`, sharpen, centre on a `size` ×
    `size` canvas, negate, grayscale; a light object on black.

    background: the dataset's background colour in its own form, where transparency goes
    (Fashion-MNIST 0: black after negation; CIFAR-10 white, as a web page shows a
    transparent image). backdrop: the photos' backdrop before the recipe (Fashion-MNIST
    #fdfdfd), where a transparent catalogue photo's transparency goes.
    """

    kind: str
    background: tuple[int, ...]
    source: str
    backdrop: tuple[int, ...] | None = None
    size: int | None = None
    trim_fuzz: float = 0.05  # share of full intensity (the paper's "5% of the maximum possible intensity")
    sharpen_sigma: float = 1.0  # a Gaussian unsharp mask at the fitted size (the paper's radius and σ 1.0)
    negate: bool = True
    steps: tuple[str, ...] = field(default=())

    def as_dict(self) -> dict:
        """The recipe's fields; a photo recipe's without the catalogue steps it does not take."""
        fields = asdict(self)
        if self.kind != "catalogue":
            for key in CATALOGUE_ONLY:
                del fields[key]
        return fields

    @classmethod
    def from_dict(cls, d: dict) -> Capture:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        for key in ("background", "backdrop", "steps"):
            if known.get(key) is not None:
                known[key] = tuple(known[key])
        return cls(**known)


NO_CAPTURE = Capture(kind="photo", background=(255,), source="none declared")


@dataclass(frozen=True)
class Captured:
    """What `capture` did to one image: `applied` is the recipe's kind, or "none"; `reason` why."""

    mode: str
    applied: str
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)


# How `auto` tells a catalogue photo: its border is light (luma at least LIGHT) and near-uniform
# (at least UNIFORM of its pixels within NEAR of the border's median). Fashion-MNIST's own
# images have a black border; none of its 10,000 test images passes (benchmarks/bench_capture.py).
LIGHT, UNIFORM, NEAR = 128, 0.9, 0.15 * 255
TRANSPARENT = 0.05  # share of pixels under half opacity from which transparency is the backdrop


def capture(
    data: bytes,
    channels: int,
    recipe: Capture,
    mode: str = "auto",
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    label: str = "image",
) -> tuple[np.ndarray, Captured]:
    """Decode an image and bring it into the dataset's form: uint8 (channels, H, W) and what was done.

    mode "none": decoded only, transparency over the dataset's background. "dataset": the
    recipe always (transparency over the photos' backdrop). "auto": the recipe when the image
    is not already in the dataset's form (see `looks_like_a_photo`).
    """
    if mode not in CAPTURE_MODES:
        raise ValueError(f"capture mode must be one of {', '.join(CAPTURE_MODES)}, got {mode!r}")
    squared = recipe.kind == "photo" and bool(recipe.size) and mode != "none"
    layers = read(data, channels, max_pixels=max_pixels, label=label, draft=recipe.size if squared else 0,
                  square_opaque=squared)  # fmt: skip
    if squared:
        why = f"shorter side to {recipe.size} px, centre square crop, as the dataset's images were made"
        return square(composite(layers, recipe.background), recipe.size), Captured(mode, "photo", why)
    if recipe.kind != "catalogue":
        why = "the dataset's images are natural photos: nothing to undo" if recipe.kind == "photo" else ""
        return composite(layers, recipe.background), Captured(mode, "none", why or f"kind {recipe.kind}")
    if mode == "none":
        return composite(layers, recipe.background), Captured(mode, "none", "capture=none")
    photo = composite(layers, recipe.backdrop or (255,))
    if mode == "auto":
        is_photo, why = looks_like_a_photo(layers, photo, recipe.size or 0)
        if not is_photo:
            return composite(layers, recipe.background), Captured(mode, "none", why)
    else:
        why = "capture=dataset"
    return catalogue_to_dataset(photo, recipe), Captured(mode, recipe.kind, why)


def looks_like_a_photo(layers: Layers, photo: np.ndarray, size: int) -> tuple[bool, str]:
    """Whether an image is a catalogue photo rather than in the dataset's form, and why.

    An image with transparent pixels (at least TRANSPARENT of them) has transparency for its
    backdrop, in either form; what tells them apart is the size: larger than the dataset's
    `size` it is a photo (a product cut-out), at most that it is a dataset image. The
    object's brightness cannot tell: a third of Fashion-MNIST's test images have a garment
    darker than mid-gray, since the negation makes white garments dark. Without
    transparency, a light, near-uniform border (the photo's backdrop) marks a catalogue
    photo; the dataset's own images have a black one.
    """
    if layers.alpha is not None and (layers.alpha < 128).mean() >= TRANSPARENT:
        height, width = layers.alpha.shape
        if max(height, width) > size:
            return True, f"transparent backdrop, {width}×{height} px: a photo (the dataset's are {size} px)"
        return False, f"transparent backdrop, {width}×{height} px: the dataset's size, so its form"
    ring = border_pixels(photo)
    ring = ring[0] if len(ring) == 1 else luma(ring[:, None, :])[0]
    light = int(np.count_nonzero(ring >= LIGHT))
    if 2 * light <= ring.size:  # the median is dark: no need to compute it (most uploads)
        dark = 100 * (1 - light / ring.size)
        return False, f"border mostly dark ({dark:.0f}% under luma {LIGHT}): already in the dataset's form"
    ring = ring.astype(np.float64)
    median = float(np.median(ring))
    near = float((np.abs(ring - median) <= NEAR).mean())
    if median >= LIGHT and near >= UNIFORM:
        return True, f"light near-uniform border (luma {median:.0f}, {100 * near:.0f}% within 15%)"
    return False, f"border luma {median:.0f}, {100 * near:.0f}% within 15%: already in the dataset's form"


def catalogue_to_dataset(photo: np.ndarray, recipe: Capture) -> np.ndarray:
    """A catalogue photo, uint8 (C, H, W) on an opaque backdrop → the dataset's form (C, size, size).

    Xiao et al. 2017 §2, step by step: trim the edges close to the backdrop (the border's
    median colour), fit the longest edge to `size`, sharpen, centre on a square canvas of the
    backdrop colour, negate, grayscale. Two refinements: fitting and centring are one
    resampling of the photo at sub-pixel precision, averaging the pixels it drops (the
    paper subsampled and placed the object at whole pixels; on 300 test images rendered by
    benchmarks/bench_capture.py, resizing and then placing at whole pixels left a mean
    absolute error of 14.4 levels against the originals, this 10.0); the negation is taken
    from the backdrop, so that the backdrop becomes exactly the dataset's black.
    """
    channels = photo.shape[0]
    gray = luma(photo)
    backdrop = float(np.median(border(gray)))
    fitted = fit(gray, trim_box(photo, recipe.trim_fuzz), recipe.size, backdrop)
    if recipe.sharpen_sigma > 0:
        fitted = sharpen(fitted, recipe.sharpen_sigma)
    if recipe.negate:
        fitted = (backdrop - fitted) * (255 / max(backdrop, 1.0))
    out = np.floor(np.clip(fitted, 0, 255) + 0.5).astype(np.uint8)
    return np.repeat(out[None], channels, axis=0)


def trim_box(photo: np.ndarray, fuzz: float) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of what is left after trimming every edge row and column whose
    pixels are all within `fuzz` · 255 of the border's median colour (RMS over channels); the
    whole image when nothing would be left."""
    pixels = photo.astype(np.float64)
    reference = np.median(border_pixels(pixels), axis=1)[:, None, None]
    distance = np.sqrt(((pixels - reference) ** 2).mean(axis=0))
    content = distance > fuzz * 255
    rows, cols = np.flatnonzero(content.any(axis=1)), np.flatnonzero(content.any(axis=0))
    if rows.size == 0:
        return 0, photo.shape[1], 0, photo.shape[2]
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def fit(gray: np.ndarray, box: tuple[int, int, int, int], size: int, backdrop: float) -> np.ndarray:
    """float (size, size): the `box` (top, bottom, left, right) of `gray`, its longest edge fitted
    to `size` px, centred on a canvas of `backdrop`, in one resampling at sub-pixel precision.

    Placed as the dataset's were: the short edge's length rounded to whole pixels, and an odd
    leftover pixel after it, not before (Fashion-MNIST's objects sit half a pixel right of or
    below the centre, never left or above).
    """
    top, bottom, left, right = box
    height, width = bottom - top, right - left
    scale = size / max(height, width)  # canvas pixels per photo pixel
    offsets = []
    for extent in (height * scale, width * scale):
        whole = max(1, round(extent))
        offsets.append((size - whole + 1) // 2 + (whole - extent) / 2)
    # the photo's region that becomes the canvas, and a backdrop-filled window holding it
    y0, x0 = top - offsets[0] / scale, left - offsets[1] / scale
    span = size / scale
    wy, wx = math.floor(y0), math.floor(x0)
    n = math.ceil(span) + 2
    window = np.full((n, n), backdrop, dtype=np.float32)
    sy, sx = max(wy, 0), max(wx, 0)
    ey, ex = min(wy + n, gray.shape[0]), min(wx + n, gray.shape[1])
    window[sy - wy : ey - wy, sx - wx : ex - wx] = gray[sy:ey, sx:ex]
    method = Image.Resampling.BOX if scale < 1 else Image.Resampling.BILINEAR
    region = (x0 - wx, y0 - wy, x0 - wx + span, y0 - wy + span)
    return np.asarray(
        Image.fromarray(window, mode="F").resize((size, size), method, box=region), dtype=np.float64
    )


def sharpen(gray: np.ndarray, sigma: float) -> np.ndarray:
    """Unsharp mask: x + (x − gaussian(x, σ)), the Gaussian sharpening of Xiao et al. §2."""
    image = Image.fromarray(np.clip(gray, 0, 255).astype(np.uint8))
    blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(sigma)), dtype=np.float64)
    return gray + (gray - blurred)


def luma(colour: np.ndarray) -> np.ndarray:
    """float (H, W): ITU-R 601-2 luma of a (1 or 3, H, W) image, as Pillow's "L" conversion."""
    if colour.shape[0] == 1:
        return colour[0].astype(np.float64)
    r, g, b = colour.astype(np.float64)
    return r * 0.299 + g * 0.587 + b * 0.114


def border(plane: np.ndarray) -> np.ndarray:
    """The outermost ring of pixels of an (H, W) plane, flat."""
    if min(plane.shape) <= 2:
        return plane.ravel()
    return np.concatenate([plane[0], plane[-1], plane[1:-1, 0], plane[1:-1, -1]])


def border_pixels(pixels: np.ndarray) -> np.ndarray:
    """(C, ring length): the outermost ring of a (C, H, W) image."""
    if min(pixels.shape[1:]) <= 2:
        return pixels.reshape(pixels.shape[0], -1)
    edges = (pixels[:, 0], pixels[:, -1], pixels[:, 1:-1, 0], pixels[:, 1:-1, -1])
    return np.concatenate(edges, axis=1)


def describe(capture_recipe: Capture) -> str:
    """One line for logs and docs."""
    if capture_recipe.kind == "photo" and capture_recipe.size:
        return f"photo → shorter side {capture_recipe.size} px, centre square ({capture_recipe.source})"
    if capture_recipe.kind != "catalogue":
        return f"{capture_recipe.kind} ({capture_recipe.source})"
    return f"catalogue → {capture_recipe.size}×{capture_recipe.size} ({capture_recipe.source})"


__all__ = [
    "CAPTURE_MODES", "Capture", "Captured", "DEFAULT_MAX_PIXELS", "FORMATS", "ImageError", "Layers",
    "NO_CAPTURE", "capture", "catalogue_to_dataset", "composite", "decode", "describe", "dimensions",
    "float_range", "looks_like_a_photo", "pixel_count", "read", "sample_range", "square",
]  # fmt: skip
