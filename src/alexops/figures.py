"""Pictures to look at before and after training: the augmented images exactly as the model
sees them, the model's layer table, and the test images it gets most wrong.

Each function returns PNG bytes (stages write them atomically and log them to MLflow; DVC
shows them in `dvc plots`). Images arrive normalised, as the model takes them; they are shown
after undoing the normalisation (pixels / 255 again), clipped to [0, 1].
"""

from __future__ import annotations

import io
import math

import torch

from alexops.augment import Recipe


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def displayable(x: torch.Tensor, recipe: Recipe) -> torch.Tensor:
    """Normalised (N, C, S, S) → (N, S, S, C) in [0, 1]: what the pixels were before normalising."""
    mean = torch.tensor(recipe.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(recipe.std, device=x.device).view(1, -1, 1, 1)
    return (x.float() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).cpu()


def image_grid(images: torch.Tensor, titles: list[str], title: str, columns: int = 8) -> bytes:
    """(N, S, S, C) images in [0, 1] with one caption each, `columns` per row, as a PNG."""
    plt = _pyplot()
    rows = max(1, math.ceil(len(images) / columns))
    lines = max(t.count("\n") + 1 for t in titles) if titles else 1
    size = (1.6 * columns, (1.6 + 0.18 * lines) * rows + 0.5)
    fig, axes = plt.subplots(rows, columns, figsize=size, dpi=100, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= len(images):
            continue
        image = images[i]
        if image.shape[-1] == 1:
            ax.imshow(image[..., 0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        else:
            ax.imshow(image.numpy(), interpolation="nearest")
        ax.set_title(titles[i], fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _png(fig, plt)


def augmented_grid(
    batch: torch.Tensor, labels: torch.Tensor, classes: list[str], recipe: Recipe, count: int = 32
) -> bytes:
    """The first `count` images of a training batch as the model sees them, with their labels."""
    shown = displayable(batch[:count], recipe)
    titles = [classes[int(y)] for y in labels[:count]]
    size = batch.shape[-1]
    return image_grid(shown, titles, f"Training images as the model sees them ({size}×{size} px, augmented)")


def worst_mistakes(probs: torch.Tensor, labels: torch.Tensor, count: int = 32) -> torch.Tensor:
    """Indices of the misclassified images, most confident mistake first (at most `count`)."""
    confidence, predicted = probs.max(1)
    wrong = (predicted != labels).nonzero().flatten()
    return wrong[confidence[wrong].argsort(descending=True)][:count]


def mistakes_grid(
    views: torch.Tensor,
    labels: torch.Tensor,
    probs: torch.Tensor,
    classes: list[str],
    recipe: Recipe,
    how: str,
) -> bytes:
    """Test images (normalised views, the model's input) with true class, prediction and its
    probability; with no views (every test image right), a picture that says so."""
    title = f"The test images the model gets most wrong ({how})"
    if len(views) == 0:
        return table_png(f"None: every test image is classified right ({how}).", title)
    titles = []
    for y, p in zip(labels.tolist(), probs, strict=True):
        guess = int(p.argmax())
        titles.append(f"true: {classes[y]}\npred: {classes[guess]} {p[guess]:.0%}")
    return image_grid(displayable(views, recipe), titles, title)


def table_png(text: str, title: str) -> bytes:
    """A monospaced text table (e.g. model.summary_text) as an image, for `dvc plots`."""
    plt = _pyplot()
    lines = text.rstrip("\n").split("\n")
    width = max(len(line) for line in lines)
    height = 0.165 * len(lines) + 0.7  # inches: a 9-point line, plus the title
    fig = plt.figure(figsize=(0.085 * width + 0.4, height), dpi=100)
    fig.text(0.02, 1 - 0.15 / height, title, fontsize=11, va="top", ha="left")
    fig.text(0.02, 1 - 0.55 / height, text, family="monospace", fontsize=9, va="top", ha="left")
    return _png(fig, plt)


def _png(fig, plt) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()
