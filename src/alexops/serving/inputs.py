"""What every protocol turns its requests into: float32 (N, C, S, S) model inputs.

Image files go through the one decoder (`alexops.images`), the dataset's capture recipe, and
the test-time view training evaluated with (`alexops.augment.preprocess`). Arrays sent as
JSON are checked for shape, type and finiteness. No HTTP here: errors are `InputError`, which
each protocol renders in its own shape.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from alexops import augment, images
from alexops.errors import AlexopsError
from alexops.serving.model import InputSpec, LoadedModel, top_k

# Small images are decoded on the event loop: ~0.15 ms of work for a 28×28 PNG, less than a
# thread hop and its wait for the GIL; larger ones go to a thread so the loop keeps serving.
INLINE_PIXELS = 256 * 256
INLINE_BYTES = 1 << 20  # JSON bodies parsed on the event loop (see Server.parse)


class ServingError(AlexopsError):
    """A request the server cannot answer; `status` is the HTTP status, `reason` a label for the
    metrics. Each protocol renders it in its own error shape."""

    def __init__(self, message: str, status: int = 400, reason: str = "bad_input") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


class InputError(ServingError):
    """Input the caller sent that the model cannot take (a 4xx)."""


def from_image_error(exc: images.ImageError) -> InputError:
    status = 413 if exc.reason == "too_many_pixels" else 400
    return InputError(str(exc), status=status, reason=exc.reason)


def check_capture_mode(mode: str) -> str:
    if mode not in images.CAPTURE_MODES:
        raise InputError(
            f"capture={str(mode)[:50]!r} is not a capture mode; use one of {', '.join(images.CAPTURE_MODES)} "
            "(auto: bring a photo into the dataset's form when it is not in it already).",
            reason="bad_parameter",
        )
    return mode


def image_inputs(
    files: list[tuple[str, bytes]], model: LoadedModel, capture: str, max_pixels: int
) -> tuple[np.ndarray, list[images.Captured]]:
    """(label, file bytes) pairs → float32 (N, C, S, S) for `model`, and what capture did to each."""
    pictures, done = [], []
    for label, data in files:
        try:
            pixels, captured = images.capture(
                data, model.input.channels, model.capture, capture, max_pixels=max_pixels, label=label
            )
        except images.ImageError as exc:
            raise from_image_error(exc) from exc
        pictures.append(torch.from_numpy(pixels)[None])
        done.append(captured)
    return preprocess(pictures, model.recipe), done


def preprocess(pictures: list[torch.Tensor], recipe: augment.Recipe) -> np.ndarray:
    """uint8 (1, C, H, W) images of any sizes → float32 (N, C, S, S), each resized alone, as in training."""
    with torch.no_grad():
        return torch.cat([augment.preprocess(picture, recipe) for picture in pictures]).numpy()


def total_pixels(files: list[tuple[str, bytes]]) -> int:
    return sum(images.pixel_count(data) for _, data in files)


def array_inputs(inputs: Any, spec: InputSpec, name: str = '"inputs"', literals: bool = True) -> np.ndarray:
    """JSON arrays (an (N, C, S, S) nested list, or one (C, S, S) image) → float32, checked.

    literals: whether the JSON text may hold true/false/null (`bodies.may_hold_literals`).
    """
    expected = f"(N, {spec.channels}, {spec.size}, {spec.size})"
    if not isinstance(inputs, list) or not inputs:
        raise InputError(f"{name} must be a non-empty array of shape {expected}.", reason="bad_shape")
    array = numbers(inputs, name, expected, literals)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[1:] != (spec.channels, spec.size, spec.size):
        raise InputError(
            f"{name} has shape {tuple(array.shape)}; this model takes {expected}.", reason="bad_shape"
        )
    return array


def numbers(values: Any, name: str, expected: str, literals: bool = True) -> np.ndarray:
    """A rectangular nested list of JSON numbers → float32; strings, booleans, nulls, ragged
    rows, NaN/±inf and values beyond float32 are refused, naming the problem.

    When the JSON cannot hold booleans or nulls (`literals` False) and numpy reads the lists
    as numbers, they are numbers: converted at once, without looking at each value in Python
    (2× faster on a 99×99 image). Anything else takes the value-by-value path that names it.
    """
    if not literals:
        try:
            fast = np.array(values)
        except ValueError:
            fast = None  # ragged: diagnosed below
        if fast is not None and fast.dtype.kind in "iuf":
            return _finite_float32(fast, name)
    try:
        raw = np.array(values, dtype=object)
    except ValueError as exc:
        raise InputError(f"{name} is not a rectangular array ({exc}).", reason="bad_shape") from exc
    kinds = {type(v) for v in raw.flat}
    if list in kinds or dict in kinds:
        raise InputError(f"{name} is not a rectangular array of shape {expected}.", reason="bad_shape")
    if kinds - {int, float}:
        names = ", ".join(sorted(_json_type(k) for k in kinds - {int, float}))
        raise InputError(f"{name} must hold numbers only; found {names}.", reason="bad_dtype")
    return _finite_float32(raw, name)


def _finite_float32(raw: np.ndarray, name: str) -> np.ndarray:
    try:
        with np.errstate(over="ignore"):
            array = raw.astype(np.float32)
    except OverflowError as exc:
        raise InputError(f"{name} holds an integer too large for float32.", reason="not_finite") from exc
    if not np.isfinite(array).all():
        raise InputError(f"{name} holds NaN, ±inf or a value beyond float32's range.", reason="not_finite")
    return array


def _json_type(kind: type) -> str:
    return {bool: "true/false", str: "strings", type(None): "null"}.get(kind, kind.__name__)


def reject_constant(name: str):
    """json.loads(parse_constant=...): NaN and Infinity are not JSON, and not valid inputs."""
    raise InputError(f"the body holds {name}; only finite numbers are valid inputs.", reason="not_finite")


# ---- `alexops predict` --------------------------------------------------------------------


def predict_images(
    model: LoadedModel,
    files: list[tuple[str, bytes]],
    k: int,
    max_pixels: int,
    capture: str = "auto",
    batch: int = 64,
) -> list[dict]:
    """One record per (label, file bytes): the label as `path`, the top-k classes and what capture did.

    Every image is decoded before any is run, so that a bad file stops the command before
    it prints anything.
    """
    x, done = image_inputs(files, model, capture, max_pixels)
    records = []
    for start in range(0, len(x), batch):
        ranked = top_k(model.logits(x[start : start + batch]), model.classes, k)
        records += [
            {"path": label, "model": {"name": model.name, "version": model.version}, "top_k": best,
             "capture": captured.as_dict()}
            for (label, _), best, captured in zip(
                files[start : start + batch], ranked, done[start : start + batch], strict=True
            )
        ]  # fmt: skip
    return records


def read_image(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise AlexopsError(
            f"cannot read image {path}: {exc.strerror or exc}. Fix: check the path and its permissions."
        ) from exc


def configure_pillow(max_pixels: int) -> None:
    """Pillow's own decompression-bomb check at our limit, its warning raised as an error.

    Process-wide on purpose: set once at start-up, never from request threads.
    """
    Image.MAX_IMAGE_PIXELS = max_pixels
    warnings.simplefilter("error", Image.DecompressionBombWarning)
