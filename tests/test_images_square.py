"""The decoder's entry points for photo folders: the paper's square crop and JPEG draft decoding."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from alexops import images


def jpeg(array: np.ndarray, quality: int = 95, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG", quality=quality, **options)
    return buffer.getvalue()


def gradient(height: int, width: int) -> np.ndarray:
    """RGB (H, W, 3): red grows to the right, green downwards, blue constant: position is readable."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // (width - 1), y * 255 // (height - 1), np.full_like(x, 90)], -1).astype(
        np.uint8
    )


def test_an_image_already_at_the_size_comes_back_bit_for_bit():
    pixels = np.random.default_rng(0).integers(0, 256, (1, 28, 28), dtype=np.uint8)
    assert images.square(pixels, 28) is pixels


@pytest.mark.parametrize(("height", "width"), [(300, 400), (400, 300), (64, 64), (10, 30)])
def test_the_shorter_side_goes_to_the_size_and_the_centre_square_stays(height, width):
    pixels = gradient(height, width).transpose(2, 0, 1)
    out = images.square(pixels, 32)
    assert out.shape == (3, 32, 32) and out.dtype == np.uint8
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    reference = Image.fromarray(gradient(height, width)[top : top + side, left : left + side])
    expected = np.asarray(reference.resize((32, 32), Image.Resampling.BILINEAR)).transpose(2, 0, 1)
    # the same crop, resized by Pillow's own filter: equal up to the sub-pixel box's half pixel
    assert np.abs(out.astype(int) - expected.astype(int)).max() <= 4


def test_one_channel_and_three_channels_agree():
    gray = gradient(90, 120)[..., 0]
    one = images.square(gray[None], 40)
    three = images.square(np.repeat(gray[None], 3, axis=0), 40)
    assert one.shape == (1, 40, 40) and np.array_equal(three[0], one[0]) and np.array_equal(three[2], one[0])


@pytest.mark.parametrize(
    "draft, shape",
    [
        (100, (192, 256)),  # 2/8: 1/8 would make the short side 96 < 100
        (113, (192, 256)),
        (200, (288, 384)),  # 3/8: Pillow's own draft has no scale between 1/4 and 1/2
        (500, (576, 768)),  # 6/8
        (700, (768, 1024)),  # 8/8: 7/8 would make it 672 < 700
        (2000, (768, 1024)),  # never above the stored size
    ],
)
def test_draft_decodes_a_jpeg_at_the_smallest_dct_scale_not_below_the_size(draft, shape):
    data = jpeg(gradient(768, 1024))
    assert images.read(data, 3).colour.shape == (3, 768, 1024)
    assert images.read(data, 3, draft=draft).colour.shape == (3, *shape)
    assert images.read(data, 1, draft=draft).colour.shape == (1, *shape)  # straight from the luma plane


@pytest.mark.parametrize("progressive", [False, True])
@pytest.mark.parametrize("subsampling", [0, 2])  # 4:4:4 and 4:2:0 chroma
def test_a_drafted_jpeg_shows_what_pillows_full_decode_shows(progressive, subsampling):
    """The scaled decode is a smaller picture of the same image: the full decode, squared to the
    same size, differs by the two resampling paths' rounding and ringing only."""
    data = jpeg(gradient(375, 500), quality=90, progressive=progressive, subsampling=subsampling)
    for channels in (1, 3):
        drafted = images.read(data, channels, draft=113, square_opaque=True).colour.astype(int)
        full = images.square(images.read(data, channels).colour, 113).astype(int)
        assert drafted.shape == full.shape == (channels, 113, 113)
        assert np.abs(drafted - full).mean() < 1.0 and np.abs(drafted - full).max() <= 12


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_drafted_jpeg_is_turned_upright_for_every_exif_orientation(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = jpeg(gradient(480, 640), exif=exif.tobytes())
    upright = images.read(data, 3).colour  # Pillow's full decode, `exif_transpose`d
    drafted = images.read(data, 3, draft=100).colour  # 2/8 scale: 120 × 160 stored
    assert drafted.shape[1:] == tuple(side // 4 for side in upright.shape[1:])
    expected = upright.reshape(3, drafted.shape[1], 4, drafted.shape[2], 4).mean(axis=(2, 4))
    assert np.abs(drafted - expected).max() <= 6


def test_a_phones_mpo_is_drafted_from_its_first_frame_and_turned_upright():
    """A phone's MPO (a JPEG with a second frame after it): the scaled decode reads the first
    frame and its EXIF orientation, as Pillow's full decode does."""
    stored = np.zeros((480, 640, 3), dtype=np.uint8)
    stored[:, :320, 0] = 255  # the left half red: upright (orientation 6, 90° clockwise), the top half
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    first, second = Image.fromarray(stored), Image.fromarray(255 - stored)
    first.save(buffer, "MPO", save_all=True, append_images=[second], exif=exif.tobytes())
    drafted = images.read(buffer.getvalue(), 3, draft=100).colour
    assert drafted.shape == (3, 160, 120)
    assert drafted[0, :70].min() > 200 and drafted[0, 90:].max() < 50 and drafted[1].max() < 50


@pytest.mark.parametrize("keep", [0.3, 0.6, 0.9])
@pytest.mark.parametrize("progressive", [False, True])
def test_a_truncated_jpeg_is_refused_with_a_draft_as_without(keep, progressive):
    noise = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    data = jpeg(noise, progressive=progressive)
    cut = data[: int(len(data) * keep)]
    for options in ({}, {"draft": 113}, {"draft": 113, "square_opaque": True}):
        with pytest.raises(images.ImageError) as refused:
            images.read(cut, 3, **options)
        assert refused.value.reason == "corrupt_image" and "truncated" in str(refused.value)


def test_draft_leaves_other_formats_alone():
    buffer = io.BytesIO()
    Image.fromarray(gradient(768, 1024)).save(buffer, "PNG")
    assert images.read(buffer.getvalue(), 3, draft=100).colour.shape == (3, 768, 1024)


def test_dimensions_from_the_header():
    assert images.dimensions(jpeg(gradient(30, 50))) == (50, 30)
    assert images.dimensions(b"not an image") is None


def test_a_folder_datasets_capture_squares_every_photo_upright():
    recipe = images.Capture(kind="photo", background=(255, 255, 255), size=64, source="a folder")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: the viewer turns it 90° clockwise
    data = jpeg(gradient(480, 640), exif=exif.tobytes())
    pixels, done = images.capture(data, 3, recipe, "auto")
    assert pixels.shape == (3, 64, 64) and done.applied == "photo"
    # upright, the stored image's left column (red 0) is at the top: red grows downwards
    assert pixels[0, 5, 32] < pixels[0, 58, 32]
    assert images.capture(data, 3, recipe, "dataset")[0].shape == (3, 64, 64)
    kept, none = images.capture(data, 3, recipe, "none")
    assert kept.shape == (3, 640, 480) and none.applied == "none"


def test_a_photo_dataset_without_a_size_still_applies_nothing():
    data = jpeg(gradient(48, 64))
    recipe = images.Capture(kind="photo", background=(255,), source="CIFAR-like")
    pixels, done = images.capture(data, 3, recipe, "auto")
    assert pixels.shape == (3, 48, 64) and done.applied == "none"


def encoded(array: np.ndarray, fmt: str, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(array)
    (image.convert(mode) if mode else image).save(buffer, fmt)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "fmt, mode", [("JPEG", None), ("JPEG", "L"), ("JPEG", "CMYK"), ("PNG", "P"), ("PNG", "1"), ("WEBP", None)]
)
@pytest.mark.parametrize("channels, size", [(3, 40), (1, 40), (3, 200)])
def test_squaring_from_pillows_image_gives_the_numpy_paths_pixels(fmt, mode, channels, size):
    """read(square_opaque=True) squares an opaque image before it leaves Pillow (prepare's fast
    path); the pixels must be those of squaring the decoded array, downscaled or upscaled."""
    data = encoded(gradient(90, 130), fmt, mode)
    fast = images.read(data, channels, draft=size, square_opaque=True).colour
    assert fast.shape == (channels, size, size)
    assert np.array_equal(fast, images.square(images.read(data, channels, draft=size).colour, size))


def jpeg_with(segments: list[bytes], array: np.ndarray, **options) -> bytes:
    """A JPEG of `array` with `segments` (whole marker segments) put in after its start-of-image."""
    data = jpeg(array, **options)
    return data[:2] + b"".join(segments) + data[2:]


def segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload


XMP = b"http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta xmlns:x='adobe:ns:meta/'/>"
PLAIN_EXTRAS = {  # segments with nothing for Pillow to act on: the fast path decodes past them
    "comment": segment(0xFE, b"made by a test"),
    "fill bytes": b"\xff\xff" + segment(0xFE, b"after two fill bytes"),
}


def general_path(monkeypatch, data: bytes, channels: int, size: int, **options) -> images.Layers:
    """What `read(..., square_opaque=True)` gives with the fast path turned off."""
    with monkeypatch.context() as patched:
        patched.setattr(images, "_plain_jpeg", lambda *args: None)
        return images.read(data, channels, draft=size, square_opaque=True, **options)


def without_pillows_parse(monkeypatch, data: bytes, channels: int, size: int) -> images.Layers:
    """`read(..., square_opaque=True)` with Pillow's `Image.open` refusing to run: the fast path."""
    with monkeypatch.context() as patched:
        patched.setattr(images.Image, "open", lambda *args, **kwargs: pytest.fail("Pillow parsed it"))
        return images.read(data, channels, draft=size, square_opaque=True)


@pytest.mark.parametrize("extra", [None, *PLAIN_EXTRAS])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"progressive": True},
        {"subsampling": 0},
        {"subsampling": 1},
        {"optimize": True, "restart_marker_rows": 2},
    ],
    ids=["baseline 4:2:0", "progressive", "4:4:4", "4:2:2", "restart markers"],
)
@pytest.mark.parametrize("channels, size", [(3, 106), (1, 106), (3, 400), (1, 60)])
def test_a_plain_jpeg_skips_pillows_parse_for_the_general_paths_pixels(
    monkeypatch, extra, options, channels, size
):
    """A JPEG with a plain header is decoded without Pillow's header parse (`_plain_jpeg`); its
    pixels must be the general path's, for these codings, extra segments and sizes (400 px is
    above the stored 375: upscaled from the full decode)."""
    data = jpeg_with([PLAIN_EXTRAS[extra]] if extra else [], gradient(375, 500), **options)
    for source in (data, jpeg(gradient(375, 500)[..., 1], **options)):  # colour and gray files
        fast = without_pillows_parse(monkeypatch, source, channels, size)
        general = general_path(monkeypatch, source, channels, size).colour
        assert fast.alpha is None and fast.colour.flags.writeable and fast.colour.flags.c_contiguous
        assert fast.colour.shape == (channels, size, size) and np.array_equal(fast.colour, general)


def oriented(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return segment(0xE1, b"Exif\x00\x00" + exif.tobytes())


def icc_profile(payload: bytes) -> bytes:
    return segment(0xE2, b"ICC_PROFILE\x00" + payload)


NOT_PLAIN = {  # what sends a JPEG Pillow's way, with what Pillow would do with it
    "EXIF orientation 6": [oriented(6)],
    "XMP": [segment(0xE1, XMP)],
    "EXIF after a comment": [PLAIN_EXTRAS["comment"], oriented(3)],
    # a parameterless marker in the header: its next two bytes are a marker, not a length;
    # read as a length, they would jump over the EXIF that follows
    "EXIF after a restart marker": [b"\xff\xd0", oriented(6)],
    "EXIF after TEM": [b"\xff\x01", oriented(8)],
    "an ICC profile": [icc_profile(b"\x01\x01" + bytes(128))],
    "an ICC segment too short for Pillow": [icc_profile(b"")],
    "an Adobe segment too short for Pillow": [segment(0xEE, b"Adobe")],
    "an Adobe segment (RGB-coded, CMYK)": [segment(0xEE, b"Adobe\x00\x64\x00\x00\x00\x00\x01")],
    "a Photoshop segment Pillow cannot parse": [segment(0xED, b"Photoshop 3.0\x008BIM\x03\xed")],
    "a JFIF segment too short for Pillow": [segment(0xE0, b"JFIF\x00\x01")],
}


@pytest.mark.parametrize("segments", NOT_PLAIN.values(), ids=NOT_PLAIN.keys())
def test_a_jpeg_with_more_in_its_header_is_read_the_general_way(monkeypatch, segments):
    """Orientation (EXIF, XMP), colour profiles, Adobe and Photoshop segments, and whatever
    Pillow's parser refuses: the same pixels, turned upright, or the same error, as without
    the fast path."""
    data = jpeg_with(segments, gradient(48, 64))
    assert not images._plain_header(data)
    try:
        expected = general_path(monkeypatch, data, 3, 32).colour
    except images.ImageError as refused:
        with pytest.raises(images.ImageError) as also:
            images.read(data, 3, draft=32, square_opaque=True)
        assert (also.value.reason, str(also.value)) == (refused.reason, str(refused))
        return
    got = images.read(data, 3, draft=32, square_opaque=True).colour
    assert np.array_equal(got, expected)


def test_an_exif_orientation_still_turns_a_squared_jpeg_upright():
    """Orientation 6 (turn 90° clockwise): the stored image's left column is the top row."""
    data = jpeg_with([oriented(6)], gradient(48, 64))
    upright = images.read(data, 3, draft=32, square_opaque=True).colour
    assert upright[0, 2, 16] < 64 < upright[0, 29, 16]  # red, growing to the right as stored, grows downwards


def test_a_header_that_is_not_a_chain_of_segments_is_not_plain():
    assert not images._plain_header(b"\xff\xd8not segments")
    assert not images._plain_header(b"\xff\xd8" + segment(0xFE, b"x")[:3])  # cut inside a segment
    assert not images._plain_header(b"\xff\xd8\xff\xfe\x00\x01\xff\xda")  # a length under 2
    assert images._plain_header(jpeg(gradient(8, 8)))


def test_a_jpeg_over_pillows_own_pixel_limit_gets_pillows_error(monkeypatch):
    data = jpeg(gradient(48, 64))
    monkeypatch.setattr(images.Image, "MAX_IMAGE_PIXELS", 1000)  # a bomb: over twice the limit
    with pytest.raises(images.ImageError) as refused:
        images.read(data, 3, draft=32, square_opaque=True)
    assert refused.value.reason == "too_many_pixels" and "exceeds limit" in str(refused.value)


def test_a_plain_jpeg_over_the_pixel_limit_is_refused_from_its_header():
    data = jpeg(gradient(101, 100))
    with pytest.raises(images.ImageError) as refused:
        images.read(data, 3, draft=50, square_opaque=True, max_pixels=100 * 100)
    assert refused.value.reason == "too_many_pixels"


@pytest.mark.parametrize("channels", [1, 3])
def test_a_plain_jpeg_already_at_the_size_is_decoded_as_stored(channels):
    data = jpeg(gradient(64, 64))
    fast = images.read(data, channels, draft=64, square_opaque=True).colour
    assert fast.flags.writeable and np.array_equal(fast, images.read(data, channels, draft=64).colour)
    if channels == 3:
        assert np.array_equal(fast, images.read(data, 3).colour)  # Pillow's own decode, too
