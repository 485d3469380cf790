"""Batched augmentation on the training device, and the test-time views (paper §4.1, §4.2).

Everything here works on whole uint8 batches as tensor ops: no PIL, no per-sample Python.
The recipe (sizes, mean, std) travels with the model in its ONNX metadata, so the server
and the CLI preprocess exactly as training evaluated.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Recipe:
    """Deterministic preprocessing: scale to [0, 1], resize, crop, normalise per channel."""

    image_size: int
    resize: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def create(cls, image_size: int, resize_ratio: float, mean, std) -> Recipe:
        return cls(image_size, max(image_size, round(image_size * resize_ratio)), tuple(mean), tuple(std))

    @classmethod
    def from_dict(cls, d: dict) -> Recipe:
        return cls(d["image_size"], d["resize"], tuple(d["mean"]), tuple(d["std"]))

    def as_dict(self) -> dict:
        return {"scale": "pixels / 255", "interpolation": "bilinear", **asdict(self)}


@dataclass(frozen=True)
class Lighting:
    """PCA colour lighting: eigenvalues/vectors of the training set's channel covariance."""

    eigval: torch.Tensor  # (C,)
    eigvec: torch.Tensor  # (C, C), columns are eigenvectors
    std: float  # α ~ N(0, std); the paper's 0.1


def resized(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, C, H, W) → float in [0, 1] at size × size."""
    x = images.float().div_(255)
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


@functools.lru_cache(maxsize=16)
def interpolation_matrix(
    out_size: int, in_size: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """(out, in): row i holds the weights that bilinear resizing (as `resized`) gives output
    pixel i; built by resizing the identity, so the weights are PyTorch's own."""
    identity = torch.eye(in_size, dtype=dtype, device=device)[None, None]
    return F.interpolate(identity, size=(out_size, in_size), mode="bilinear", align_corners=False)[0, 0]


def random_crops(
    x: torch.Tensor, resize: int, size: int, flip: bool, generator: torch.Generator | None
) -> torch.Tensor:
    """A random size×size crop of each image resized to resize×resize, mirrored with probability ½.

    Bilinear resizing is linear and separable, so resize, crop and mirror together are two
    small matrix products per image, `rows · x · colsᵀ`, with `rows` and `cols` the crop's
    rows of the resizing matrix (`cols` reversed to mirror). The resized image is never
    built: about 4× faster than resizing the batch and gathering windows on a 2-core CPU.
    Images already resize×resize (a folder dataset's cache is made at that size) need no
    resampling: their windows are cut out as they are, in any dtype (uint8 moves 4× fewer
    bytes than float), the same values the products would give without their cost (0.3 s
    of a 5 s step at the paper's 227 px on the CPU).
    """
    n, _, h, w = x.shape
    dev = x.device
    top = torch.randint(0, resize - size + 1, (n,), device=dev, generator=generator)
    left = torch.randint(0, resize - size + 1, (n,), device=dev, generator=generator)
    mirrored = torch.rand(n, device=dev, generator=generator) < 0.5 if flip else None
    if h == w == resize:
        windows = x.unfold(2, size, 1).unfold(3, size, 1)[torch.arange(n, device=dev), :, top, left]
        return (
            windows
            if mirrored is None
            else torch.where(mirrored[:, None, None, None], windows.flip(-1), windows)
        )
    steps = torch.arange(size, device=dev)
    row_index, col_index = top[:, None] + steps, left[:, None] + steps  # (N, size)
    if mirrored is not None:
        col_index = torch.where(mirrored[:, None], col_index.flip(-1), col_index)
    rows = interpolation_matrix(resize, h, x.dtype, dev)[row_index]  # (N, size, H)
    cols = interpolation_matrix(resize, w, x.dtype, dev)[col_index]  # (N, size, W)
    return rows[:, None] @ x @ cols[:, None].transpose(-1, -2)  # (N, C, size, size)


def pca_lighting(x: torch.Tensor, lighting: Lighting, generator: torch.Generator | None) -> torch.Tensor:
    """Add Σ αᵢ λᵢ pᵢ to every pixel, α redrawn per image (§4.1).

    For one channel the covariance is the pixel variance, p = [1]: a random brightness
    shift of standard deviation std·variance, the grayscale analogue of the paper's.
    """
    if lighting.std == 0:
        return x  # unchanged, and no random numbers drawn
    return x + lighting_shift(x, lighting, generator)[:, :, None, None]


def lighting_shift(x: torch.Tensor, lighting: Lighting, generator: torch.Generator | None) -> torch.Tensor:
    """(N, C): each image's colour shift Σ αᵢ λᵢ pᵢ; zeros, drawing nothing, when std is 0."""
    n, c = x.shape[:2]
    if lighting.std == 0:
        return x.new_zeros(n, c)
    alpha = torch.randn(n, c, device=x.device, generator=generator) * lighting.std
    return (alpha * lighting.eigval.to(x.device)) @ lighting.eigvec.to(x.device).T


@functools.lru_cache(maxsize=64)
def on_device(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """A recipe's per-channel constants as a float32 tensor on `device`, made once: a fresh
    torch.tensor(..., device="cuda") per batch copies from pageable memory, which waits for
    every kernel already queued on the GPU, and so stalls the training loop at every step."""
    return torch.tensor(values, dtype=torch.float32, device=device)


def normalised(x: torch.Tensor, recipe: Recipe) -> torch.Tensor:
    mean = on_device(recipe.mean, x.device).view(1, -1, 1, 1)
    std = on_device(recipe.std, x.device).view(1, -1, 1, 1)
    return (x - mean) / std


def train_batch(
    images: torch.Tensor,
    recipe: Recipe,
    lighting: Lighting,
    flip: bool,
    generator: torch.Generator | None = None,
    erasing: float = 0.0,
) -> torch.Tensor:
    """uint8 batch on the device → augmented, normalised float batch: random erasing (with
    probability `erasing` per image), random crop and mirror, PCA lighting, normalisation."""
    if images.shape[-2:] == (recipe.resize, recipe.resize):  # a cache made at the resize size
        # no resampling: the crops are windows, cut while still uint8; erasing draws on the crop
        x = random_crops(images, recipe.resize, recipe.image_size, flip, generator).float().div_(255)
        x = random_erasing(x, erasing, generator)
    else:
        # erased at the stored size (28×28 for Fashion-MNIST): 12× fewer pixels than after resizing
        x = random_erasing(images.float().div_(255), erasing, generator)
        x = random_crops(x, recipe.resize, recipe.image_size, flip, generator)
    # lighting and normalisation in one pass: (x + shift - mean) / std = x·(1/std) + (shift - mean)/std
    scale = 1 / on_device(recipe.std, x.device)
    bias = (lighting_shift(x, lighting, generator) - on_device(recipe.mean, x.device)) * scale
    return torch.addcmul(bias[:, :, None, None], x, scale[None, :, None, None])


# Random erasing's published defaults (Zhong et al. 2020, "Random Erasing Data Augmentation", §3.1):
# the erased area is 2%-40% of the image, its aspect ratio between 0.3 and 1/0.3.
ERASING_AREA = (0.02, 0.4)
ERASING_ASPECT = (0.3, 1 / 0.3)


def erasing_boxes(
    n: int, height: int, width: int, probability: float, device: torch.device, generator
) -> torch.Tensor:
    """(N, H, W) bool: each image's erased rectangle (all False for the images left alone).

    Area fraction ~ U(0.02, 0.4), log aspect ratio uniform in [log 0.3, log 1/0.3]; a box
    that would not fit is clipped to the image (the paper redraws it; clipping keeps the
    batch free of per-sample loops at the cost of slightly smaller boxes at extreme ratios).
    """
    draws = torch.rand(n, 5, device=device, generator=generator)
    area = (ERASING_AREA[0] + (ERASING_AREA[1] - ERASING_AREA[0]) * draws[:, 0]) * height * width
    log_low, log_high = math.log(ERASING_ASPECT[0]), math.log(ERASING_ASPECT[1])
    aspect = torch.exp(log_low + (log_high - log_low) * draws[:, 1])
    box_h = (area * aspect).sqrt().round().clamp(1, height)
    box_w = (area / aspect).sqrt().round().clamp(1, width)
    top = ((height - box_h + 1) * draws[:, 2]).floor()
    left = ((width - box_w + 1) * draws[:, 3]).floor()
    erased = draws[:, 4] < probability
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    in_rows = (rows >= top[:, None]) & (rows < (top + box_h)[:, None]) & erased[:, None]
    in_cols = (cols >= left[:, None]) & (cols < (left + box_w)[:, None])
    return in_rows[:, :, None] & in_cols[:, None, :]


def random_erasing(x: torch.Tensor, probability: float, generator: torch.Generator | None) -> torch.Tensor:
    """With probability `probability`, replace a random rectangle of each image by noise.

    `x` holds pixel values in [0, 1], (N, C, H, W); the noise is uniform in [0, 1] per pixel
    and channel (the paper's best filling, "random values", §3.1). Nothing is drawn when the
    probability is 0, so the other augmentations' draws stay as they were.
    """
    if probability == 0:
        return x
    n, _, height, width = x.shape
    boxes = erasing_boxes(n, height, width, probability, x.device, generator)[:, None]
    noise = torch.rand(x.shape, device=x.device, generator=generator, dtype=x.dtype)
    return torch.where(boxes, noise, x)


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    top = (x.shape[-2] - size) // 2
    left = (x.shape[-1] - size) // 2
    return x[..., top : top + size, left : left + size]


def preprocess(images: torch.Tensor, recipe: Recipe) -> torch.Tensor:
    """The deterministic test-time view: resize, centre crop, normalise."""
    return normalised(center_crop(resized(images, recipe.resize), recipe.image_size), recipe)


def ten_crop_views(images: torch.Tensor, recipe: Recipe) -> torch.Tensor:
    """(10, N, C, S, S): four corners and the centre, and their mirror images (§4.1)."""
    x = normalised(resized(images, recipe.resize), recipe)
    s, h, w = recipe.image_size, x.shape[-2], x.shape[-1]
    corners = [x[..., :s, :s], x[..., :s, w - s :], x[..., h - s :, :s], x[..., h - s :, w - s :]]
    views = [*corners, center_crop(x, s)]
    return torch.stack(views + [v.flip(-1) for v in views])
