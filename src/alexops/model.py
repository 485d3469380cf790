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


def layer_summary(model: AlexNet, in_channels: int) -> list[dict]:
    """One row per layer of one image's forward pass: name (conv1 … fc8, relu1, lrn1, pool1,
    dropout6, …), kind, output shape (without the batch axis), parameters and multiply-adds.

    Multiply-adds count the convolutions and fully connected layers (the paper's convention,
    ~0.72 G per RGB image at 227 px and width 1.0); ReLU, LRN and pooling count 0.
    """
    names = _layer_names(model)
    rows: list[dict] = []

    def record(module: nn.Module, _inputs, output: torch.Tensor) -> None:
        macs = 0
        if isinstance(module, nn.Conv2d):
            window = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            macs = output[0].numel() * window
        elif isinstance(module, nn.Linear):
            macs = module.in_features * module.out_features
        rows.append(
            {
                "layer": names[module],
                "kind": _kind(module),
                "output": list(output.shape[1:]),
                "parameters": count_parameters(module),
                "multiply_adds": macs,
            }
        )

    hooks = [m.register_forward_hook(record) for m in names]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            parameter = next(model.parameters())
            model(parameter.new_zeros(1, in_channels, model.image_size, model.image_size))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return rows


def _layer_names(model: AlexNet) -> dict[nn.Module, str]:
    """The paper's names: convolutions 1-5 and fc 6-8; a ReLU, LRN, pool or dropout takes
    the number of the layer it follows."""
    names: dict[nn.Module, str] = {}
    number, prefixes = (
        0,
        {nn.ReLU: "relu", LocalResponseNorm: "lrn", nn.MaxPool2d: "pool", nn.Dropout: "dropout"},
    )
    for module in [*model.features, *model.classifier]:
        if isinstance(module, nn.Conv2d | nn.Linear):
            number += 1
            names[module] = f"{'conv' if isinstance(module, nn.Conv2d) else 'fc'}{number}"
        else:
            names[module] = f"{prefixes[type(module)]}{number}"
    return names


def _kind(module: nn.Module) -> str:
    if isinstance(module, nn.Conv2d):
        (kh, kw), (stride, _), groups = module.kernel_size, module.stride, module.groups
        return f"Conv {kh}×{kw}/{stride}" + (f", {groups} groups" if groups > 1 else "")
    if isinstance(module, nn.MaxPool2d):
        return f"MaxPool {module.kernel_size}×{module.kernel_size}/{module.stride}"
    if isinstance(module, nn.Dropout):
        return f"Dropout {module.p:g}"
    if isinstance(module, nn.Linear):
        return "Linear"
    return type(module).__name__.replace("LocalResponseNorm", "LRN")


def summary_text(rows: list[dict], in_channels: int, image_size: int) -> str:
    """The layer table as aligned text, with the input row and the totals."""
    header = ("layer", "kind", "output", "parameters", "multiply-adds")
    lines = [("input", "", "×".join(map(str, (in_channels, image_size, image_size))), "", "")]
    for row in rows:
        lines.append(
            (
                row["layer"],
                row["kind"],
                "×".join(map(str, row["output"])),
                f"{row['parameters']:,}" if row["parameters"] else "",
                f"{row['multiply_adds']:,}" if row["multiply_adds"] else "",
            )
        )
    params, macs = sum(r["parameters"] for r in rows), sum(r["multiply_adds"] for r in rows)
    lines.append(("total", f"{params * 4 / 1e6:.1f} MB of fp32 weights", "", f"{params:,}", f"{macs:,}"))
    widths = [max(len(str(line[i])) for line in [header, *lines]) for i in range(5)]
    align = ["<", "<", ">", ">", ">"]

    def fmt(line) -> str:
        return "  ".join(
            f"{str(cell):{a}{w}}" for cell, a, w in zip(line, align, widths, strict=True)
        ).rstrip()

    rule = "-" * len(fmt(header))
    return "\n".join([fmt(header), rule, *map(fmt, lines[:-1]), rule, fmt(lines[-1])]) + "\n"
