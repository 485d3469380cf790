"""Batched augmentation on the training device, and the test-time views (paper §4.1, §4.2).

Everything here works on whole uint8 batches as tensor ops: no PIL, no per-sample Python.
The recipe (sizes, mean, std) travels with the model in its ONNX metadata, so the server
and the CLI preprocess exactly as training evaluated.
"""

from __future__ import annotations

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


def crop_and_flip(x: torch.Tensor, size: int, flip: bool, generator: torch.Generator | None) -> torch.Tensor:
    """A random size×size crop of each image, mirrored with probability ½.

    `unfold` views every possible window without copying; one index per image then picks
    its window, so the only copy made is the output itself.
    """
    n, _, h, w = x.shape
    dev = x.device
    top = torch.randint(0, h - size + 1, (n,), device=dev, generator=generator)
    left = torch.randint(0, w - size + 1, (n,), device=dev, generator=generator)
    windows = x.unfold(2, size, 1).unfold(3, size, 1)  # (N, C, h-size+1, w-size+1, size, size)
    crops = windows[torch.arange(n, device=dev), :, top, left]
    if not flip:
        return crops
    mirrored = torch.rand(n, device=dev, generator=generator) < 0.5
    return torch.where(mirrored[:, None, None, None], crops.flip(-1), crops)


def pca_lighting(x: torch.Tensor, lighting: Lighting, generator: torch.Generator | None) -> torch.Tensor:
    """Add Σ αᵢ λᵢ pᵢ to every pixel, α redrawn per image (§4.1).

    For one channel the covariance is the pixel variance, p = [1]: a random brightness
    shift of standard deviation std·variance, the grayscale analogue of the paper's.
    """
    if lighting.std == 0:
        return x
    n, c = x.shape[:2]
    alpha = torch.randn(n, c, device=x.device, generator=generator) * lighting.std
    shift = (alpha * lighting.eigval.to(x.device)) @ lighting.eigvec.to(x.device).T  # (N, C)
    return x + shift[:, :, None, None]


def normalised(x: torch.Tensor, recipe: Recipe) -> torch.Tensor:
    mean = torch.tensor(recipe.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(recipe.std, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


def train_batch(
    images: torch.Tensor,
    recipe: Recipe,
    lighting: Lighting,
    flip: bool,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """uint8 batch on the device → augmented, normalised float batch."""
    x = crop_and_flip(resized(images, recipe.resize), recipe.image_size, flip, generator)
    return normalised(pca_lighting(x, lighting, generator), recipe)


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
