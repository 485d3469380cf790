"""AlexNet as in Krizhevsky, Sutskever & Hinton (2012), not torchvision's later variant.

Layer by layer (paper §3, Fig. 2), at width 1.0:

    conv1  96 × 11×11 /4          ReLU  LRN  max-pool 3/2
    conv2 256 ×  5×5  pad 2, g=2  ReLU  LRN  max-pool 3/2
    conv3 384 ×  3×3  pad 1       ReLU
    conv4 384 ×  3×3  pad 1, g=2  ReLU
    conv5 256 ×  3×3  pad 1, g=2  ReLU       max-pool 3/2
    fc6  4096  ReLU  dropout 0.5
    fc7  4096  ReLU  dropout 0.5
    fc8  num_classes (logits; softmax at inference)

`groups=2` is the paper's two-GPU split: conv2, conv4 and conv5 only see the kernel maps
on their own GPU, conv3 and the fc layers see both. Pools overlap (3×3, stride 2).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from alexops.augment import Recipe
from alexops.errors import AlexopsError
from alexops.lrn import LocalResponseNorm

MIN_IMAGE_SIZE = 67  # below this the third max-pool sees an empty feature map


def feature_size(image_size: int) -> int:
    """Side of conv5's pooled output for a square input (6 at the paper's 227 px)."""
    side = (image_size - 11) // 4 + 1  # conv1, stride 4, no padding
    for _ in range(3):  # three overlapping 3/2 pools; convs 2-5 keep the size
        side = (side - 3) // 2 + 1
    return side


class AlexNet(nn.Module):
    """The paper's AlexNet. `width` scales every hidden layer; 1.0 is the paper's net."""

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 1000,
        *,
        image_size: int = 227,
        width: float = 1.0,
        dropout: float = 0.5,
        init: str = "paper",
    ) -> None:
        super().__init__()
        if image_size < MIN_IMAGE_SIZE:
            raise ValueError(
                f"AlexNet's geometry needs inputs of at least {MIN_IMAGE_SIZE}×{MIN_IMAGE_SIZE} "
                f"px; got {image_size}×{image_size}. Upscale the images (train.image_size)."
            )
        self.image_size = image_size

        def ch(n: int) -> int:  # even, so that the two groups split evenly
            return max(2, 2 * round(n * width / 2))

        c1, c2, c3, c4, c5, fc = ch(96), ch(256), ch(384), ch(384), ch(256), ch(4096)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 11, stride=4),
            nn.ReLU(inplace=True),
            LocalResponseNorm(),
            nn.MaxPool2d(3, stride=2),
            nn.Conv2d(c1, c2, 5, padding=2, groups=2),
            nn.ReLU(inplace=True),
            LocalResponseNorm(),
            nn.MaxPool2d(3, stride=2),
            nn.Conv2d(c2, c3, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(c3, c4, 3, padding=1, groups=2),
            nn.ReLU(inplace=True),
            nn.Conv2d(c4, c5, 3, padding=1, groups=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2),
        )
        side = feature_size(image_size)
        self.classifier = nn.Sequential(
            nn.Linear(c5 * side * side, fc),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(fc, fc),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(fc, num_classes),
        )
        initialise(self, init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"this AlexNet was built for {self.image_size}×{self.image_size} px inputs; "
                f"got {tuple(x.shape[-2:])}. Resize and crop as in its preprocessing recipe."
            )
        return self.classifier(torch.flatten(self.features(x), 1))


# Paper §5: biases of 1 "accelerate the early stages of learning by providing the ReLUs
# with positive inputs" in conv2, conv4, conv5 and the hidden fc layers.
_PAPER_BIAS_ONE = {"features.4", "features.10", "features.12", "classifier.0", "classifier.3"}


def initialise(model: nn.Module, scheme: str) -> None:
    """`paper`: weights N(0, 0.01), biases 1 or 0 as in §5. `kaiming`: He-normal, biases 0.

    The paper's scheme needs its long schedule (~90 epochs) to leave the initial plateau;
    He initialisation trains the same network in a few epochs, hence the CPU default.
    """
    if scheme not in ("paper", "kaiming"):
        raise ValueError(f"unknown init scheme {scheme!r}: use 'paper' or 'kaiming'")
    for name, module in model.named_modules():
        if not isinstance(module, nn.Conv2d | nn.Linear):
            continue
        if scheme == "paper":
            nn.init.normal_(module.weight, 0.0, 0.01)
            nn.init.constant_(module.bias, 1.0 if name in _PAPER_BIAS_ONE else 0.0)
        else:
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            nn.init.zeros_(module.bias)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise AlexopsError("base.device is cuda but no CUDA device is visible. Fix: set base.device: auto.")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def load_trained(path: Path, device: torch.device | str = "cpu"):
    """The trained model (eval mode) and its metadata: config, recipe, classes."""
    try:
        blob = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError as exc:
        raise AlexopsError(f"{path} is missing. Fix: run `dvc repro train` first.") from exc
    except Exception as exc:
        raise AlexopsError(
            f"{path} is not a readable model ({exc.__class__.__name__}). Fix: `dvc repro -f train`."
        ) from exc
    config = json.loads(blob["config"])
    model = AlexNet(**config).to(device)
    model.load_state_dict(blob["state_dict"])
    model.eval()
    recipe = Recipe.from_dict(json.loads(blob["recipe"]))
    return model, config, recipe, json.loads(blob["classes"])
