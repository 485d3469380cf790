"""The one image decoder (alexops.images): every form a user's file comes in decodes to the pixels
of the upright 8-bit image, and the capture recipe brings catalogue photos into the dataset's form.

Files are written by Pillow in the real formats; the expected pixels come from the EXIF, PNG and
TIFF specifications (how a stored image maps to what a viewer shows), not from the decoder.
"""

from __future__ import annotations

import io
import pickle
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest
from garments import catalogue_photo
from garments import garments as made_as_the_dataset
from PIL import Image

from alexops import datasets, images
from alexops.images import ImageError

FASHION = datasets.FASHION_MNIST.capture


def encode(array: np.ndarray, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def upright() -> np.ndarray:
    """A 20×30 image unlike any of its rotations and mirror images."""
    return np.random.default_rng(0).integers(0, 256, (20, 30), dtype=np.uint8)


# ---- orientation ----------------------------------------------------------------------------


def stored_for(upright: np.ndarray, orientation: int) -> np.ndarray:
    """The pixels a camera stores for `upright` under an EXIF Orientation (EXIF 2.32, tag 0x0112:
    where row 0 and column 0 of the stored image are in the picture as shown)."""
    u = upright
    stored = {
        1: u,  # row 0 top, column 0 left
        2: u[:, ::-1],  # top, right
        3: u[::-1, ::-1],  # bottom, right
        4: u[::-1],  # bottom, left
        5: u.T,  # left, top
        6: np.rot90(u, 1),  # right, top: the usual phone portrait
        7: u[::-1, ::-1].T,  # right, bottom
        8: np.rot90(u, -1),  # left, bottom
    }[orientation]
    return np.ascontiguousarray(stored)


def with_orientation(stored: np.ndarray, orientation: int, fmt: str) -> bytes:
    if fmt == "TIFF":  # the Orientation tag in the TIFF's own directory
        return encode(stored, "TIFF", tiffinfo={274: orientation})
    exif = Image.Exif()
    exif[0x0112] = orientation
    options = {"lossless": True} if fmt == "WEBP" else {"quality": 95} if fmt == "JPEG" else {}
    return encode(stored, fmt, exif=exif.tobytes(), **options)  # PNG: an eXIf chunk


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "TIFF"])
def test_all_eight_orientations_decode_upright_in_lossless_formats(upright, fmt):
    for orientation in range(1, 9):
        data = with_orientation(stored_for(upright, orientation), orientation, fmt)
        assert np.array_equal(images.decode(data, 1)[0], upright), orientation


def test_all_eight_orientations_decode_upright_in_jpeg(upright):
    candidates = [stored_for(upright, o) for o in range(1, 9)]
    for orientation in range(1, 9):
        decoded = images.decode(with_orientation(stored_for(upright, orientation), orientation, "JPEG"), 1)[0]
        assert decoded.shape == upright.shape
        errors = [
            np.abs(decoded.astype(int) - c).mean() if c.shape == upright.shape else 999 for c in candidates
        ]
        assert errors[0] < 3 and int(np.argmin(errors)) == 0, (orientation, errors)


# ---- bit depth ------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "PPM"])
def test_16_bit_made_from_8_bit_decodes_to_exactly_the_8_bit_values(upright, fmt):
    deep = upright.astype(np.uint16) * 257
    assert np.array_equal(images.decode(encode(deep, fmt), 1)[0], upright)


def test_16_bit_is_scaled_by_the_full_range_not_clipped():
    deep = np.array([[0, 128, 129, 32896, 65535, 40000]], dtype=np.uint16)
    decoded = images.decode(encode(deep), 1)[0, 0]
    assert decoded.tolist() == [0, 0, 1, 128, 255, round(40000 * 255 / 65535)]


def test_a_pgm_maxval_and_a_tiff_max_sample_value_are_the_real_range(upright):
    twelve_bit = (upright.astype(np.uint32) * 4095 + 127) // 255  # 12-bit data, round trip exact
    pgm = b"P5\n30 20\n4095\n" + twelve_bit.astype(">u2").tobytes()
    assert np.array_equal(images.decode(pgm, 1)[0], upright)
    tiff = encode(twelve_bit.astype(np.uint16), "TIFF", tiffinfo={281: 4095})
    assert np.array_equal(images.decode(tiff, 1)[0], upright)


def test_32_bit_integer_tiff_is_scaled_by_its_signed_range(upright):
    deep = (upright.astype(np.int64) * 0x01010101 // 2).astype(np.int32)  # 0 .. 2^31 - 1
    assert np.array_equal(images.decode(encode(deep, "TIFF"), 1)[0], upright)


def test_float_images_map_0_to_1_onto_black_to_white(upright):
    assert np.array_equal(images.decode(encode(upright.astype(np.float32) / 255, "TIFF"), 1)[0], upright)
    odd = np.array([[-0.5, 0.5, 2.0, np.nan]], dtype=np.float32)
    assert images.decode(encode(odd, "TIFF"), 1)[0, 0].tolist() == [0, 128, 255, 0]
    declared = encode(upright.astype(np.float32), "TIFF", tiffinfo={340: 0.0, 341: 255.0})
    assert np.array_equal(images.decode(declared, 1)[0], upright)  # SMin/SMaxSampleValue


# ---- transparency, palette, CMYK, frames, channels -----------------------------------------


def test_transparency_is_composited_over_the_background(upright):
    alpha = np.zeros_like(upright)
    alpha[:, 10:20], alpha[:, 20:] = 128, 255
    rgba = np.dstack([upright] * 3 + [alpha])
    for background, value in ((0, 0), (255, 255), ((253, 253, 253), 253)):
        decoded = images.decode(encode(rgba), 1, background=background)[0].astype(int)
        assert (decoded[:, :10] == value).all()
        half = (upright[:, 10:20].astype(int) * 128 + value * 127 + 127) // 255
        assert np.array_equal(decoded[:, 10:20], half) and np.array_equal(decoded[:, 20:], upright[:, 20:])
    gray_alpha = images.decode(encode(np.dstack([upright, alpha]), "PNG"), 3, background=(10, 20, 30))
    assert gray_alpha[:, 0, 0].tolist() == [10, 20, 30]


def test_a_transparent_colour_in_a_palette_gray_or_16_bit_image_is_transparent(upright):
    key = int(upright[0, 0])
    for data in (
        encode(upright, "PNG", transparency=key),  # tRNS gray value
        encode(upright.astype(np.uint16) * 257, "PNG", transparency=key * 257),  # 16-bit tRNS
        encode(upright, "GIF", transparency=key),  # a palette's transparent index (L saved as P)
    ):
        layers = images.read(data, 1)
        assert layers.alpha is not None and layers.alpha[0, 0] == 0
        assert images.decode(data, 1, background=7)[0, 0, 0] == 7


def test_palette_cmyk_and_channel_conversions_follow_pillow(upright):
    rgb = np.dstack([upright, upright[::-1], upright[:, ::-1]])
    as_l = np.asarray(Image.fromarray(rgb).convert("L"))
    assert np.array_equal(images.decode(encode(rgb), 1)[0], as_l)  # ITU-R 601-2 luma
    assert np.array_equal(images.decode(encode(rgb), 3), rgb.transpose(2, 0, 1))
    three = images.decode(encode(upright), 3)
    assert three.shape == (3, 20, 30) and all(np.array_equal(c, upright) for c in three)
    palette = Image.fromarray(rgb).convert("P")
    buffer = io.BytesIO()
    palette.save(buffer, "PNG")
    expected = np.asarray(palette.convert("RGB")).transpose(2, 0, 1)
    assert np.array_equal(images.decode(buffer.getvalue(), 3), expected)
    cmyk = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(cmyk, "TIFF")
    assert np.abs(images.decode(cmyk.getvalue(), 3).astype(int) - rgb.transpose(2, 0, 1)).max() <= 1


def test_colour_spaces_without_a_direct_conversion_and_broken_exif_still_decode(upright):
    rgb = Image.fromarray(np.dstack([upright, upright[::-1], upright[:, ::-1]]))
    for mode in ("LAB", "YCbCr", "CMYK"):
        buffer = io.BytesIO()
        rgb.convert(mode).save(buffer, "TIFF")
        expected = np.asarray(rgb.convert(mode).convert("RGB").convert("L")).astype(int)
        assert np.abs(images.decode(buffer.getvalue(), 1)[0].astype(int) - expected).max() <= 1, mode
    broken = encode(upright, "JPEG", exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x05\x01\x12\x00")
    assert images.decode(broken, 1).shape == (1, 20, 30)  # shown as stored, as viewers do


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
def test_an_animated_image_decodes_to_its_first_frame(fmt):
    frames = [Image.new("L", (8, 6), 40), Image.new("L", (8, 6), 200)]
    buffer = io.BytesIO()
    options = {"lossless": True} if fmt == "WEBP" else {}
    frames[0].save(buffer, fmt, save_all=True, append_images=frames[1:], duration=100, **options)
    decoded = images.decode(buffer.getvalue(), 1)
    assert decoded.shape == (1, 6, 8) and (decoded == 40).all()


# ---- errors ---------------------------------------------------------------------------------


def test_bad_files_are_one_clear_error_with_a_reason():
    cases = {
        b"": "empty",
        b"hello, not an image": "not_an_image",
        encode(np.zeros((300, 300), np.uint8) + 7)[:300]: "corrupt_image",
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n": "not_an_image",  # never Ghostscript
    }
    for data, reason in cases.items():
        with pytest.raises(ImageError) as caught:
            images.decode(data, 1, label="file 'x.png'")
        assert caught.value.reason == reason and "file 'x.png'" in str(caught.value)
    with pytest.raises(ImageError, match="--max-pixels") as caught:
        images.decode(encode(np.zeros((100, 101), np.uint8)), 1, max_pixels=100 * 100)
    assert caught.value.reason == "too_many_pixels"
    copy = pickle.loads(pickle.dumps(caught.value))  # a process pool hands errors back pickled
    assert copy.reason == "too_many_pixels" and str(copy) == str(caught.value)


def test_decode_runs_in_a_process_pool(upright):
    """The datasets' readers decode in worker processes: a pure, picklable function."""
    files = [encode(upright), with_orientation(stored_for(upright, 6), 6, "PNG"), b"junk"]
    with ProcessPoolExecutor(1) as pool:
        futures = [pool.submit(images.decode, data, 1) for data in files]
        assert np.array_equal(futures[0].result()[0], upright)
        assert np.array_equal(futures[1].result()[0], upright)
        with pytest.raises(ImageError) as caught:
            futures[2].result()
    assert caught.value.reason == "not_an_image"


# ---- the capture recipe ---------------------------------------------------------------------


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def garments() -> list[np.ndarray]:
    return list(made_as_the_dataset(1, seed=4)[0])


def test_the_datasets_own_images_are_left_as_they_are(garments):
    for image in garments:
        for data in (encode(image), jpeg(Image.fromarray(image), 95)):
            pixels, done = images.capture(data, 1, FASHION, "auto")
            assert done.applied == "none" and "dataset's form" in done.reason
            assert np.array_equal(pixels, images.decode(data, 1))


@pytest.mark.parametrize(
    ("scale", "margins", "backdrop"),
    [(8, (40, 60, 90, 30), 253), (3, (5, 5, 30, 30), 255), (12, (2, 80, 1, 6), 240)],
)
def test_catalogue_photos_are_brought_back_to_the_dataset_form(garments, scale, margins, backdrop):
    for image in garments:
        data = jpeg(catalogue_photo(image, scale, margins, backdrop))
        pixels, done = images.capture(data, 1, FASHION, "auto")
        assert done.applied == "catalogue" and "light near-uniform border" in done.reason
        assert pixels.shape == (1, 28, 28)
        as_is = Image.fromarray(images.capture(data, 1, FASHION, "none")[0][0]).resize((28, 28))
        error, untouched = (np.abs(np.asarray(p, dtype=int) - image).mean() for p in (pixels[0], as_is))
        assert error < 20 and error < untouched / 5, (error, untouched)


def test_capture_dataset_always_applies_and_none_never(garments):
    data = jpeg(catalogue_photo(garments[0], 4, (10, 10, 10, 10)))
    assert images.capture(data, 1, FASHION, "none")[1].applied == "none"
    original = encode(garments[0])
    forced, done = images.capture(original, 1, FASHION, "dataset")
    assert done.applied == "catalogue" and forced.shape == (1, 28, 28)
    with pytest.raises(ValueError, match="auto, dataset, none"):
        images.capture(original, 1, FASHION, "sometimes")


def test_a_transparent_catalogue_photo_is_a_photo_and_a_transparent_dataset_image_is_not(garments):
    for image in garments:
        mask = np.where(image > 0, 255, 0).astype(np.uint8)
        for shade in (image, image // 4):  # a dark garment, and a white one (dim in the dataset's form)
            dark = 255 - np.asarray(Image.fromarray(shade).resize((112, 112), Image.Resampling.BICUBIC))
            cutout = np.asarray(Image.fromarray(mask).resize((112, 112)))
            photo = np.pad(np.dstack([dark, cutout]), ((20, 20), (30, 30), (0, 0)))  # transparent margins
            pixels, done = images.capture(encode(photo), 1, FASHION, "auto")
            assert done.applied == "catalogue" and "transparent backdrop" in done.reason
            assert np.abs(pixels[0].astype(int) - shade).mean() < 20
        # the dataset's own image, its black made transparent (and white underneath, which must not show)
        transparent = np.dstack([np.where(mask > 0, image, 255), mask])
        pixels, done = images.capture(encode(transparent), 1, FASHION, "auto")
        assert done.applied == "none" and "the dataset's size" in done.reason
        assert np.array_equal(pixels[0], image)  # transparency over the dataset's black


def test_a_photo_dataset_applies_nothing_and_puts_transparency_on_white(upright):
    cifar = datasets.CIFAR10.capture
    transparent = np.dstack([upright] * 3 + [np.zeros_like(upright)])
    pixels, done = images.capture(encode(transparent), 3, cifar, "dataset")
    assert done.applied == "none" and (pixels == 255).all()


def test_capture_recipes_travel_as_json():
    for spec in datasets.SPECS.values():
        assert images.Capture.from_dict(spec.capture.as_dict()) == spec.capture
    assert images.Capture.from_dict(FASHION.as_dict() | {"added_later": 1}) == FASHION


@pytest.mark.parametrize(
    "recipe",
    [datasets.FASHION_MNIST.capture, datasets.CIFAR10.capture,
     images.Capture(kind="photo", background=(255, 255, 255), source="a folder", size=64, steps=("square",))],
)  # fmt: skip
def test_a_capture_recipe_says_only_the_steps_it_takes_and_reads_back_whole(recipe):
    said = recipe.as_dict()
    catalogue_steps = {"backdrop", "trim_fuzz", "sharpen_sigma", "negate"}
    assert said.keys() >= catalogue_steps if recipe.kind == "catalogue" else not said.keys() & catalogue_steps
    assert images.Capture.from_dict(said) == recipe
