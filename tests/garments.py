"""Test data for image decoding and the capture recipe: Fashion-MNIST-like garments made the way
Xiao et al. 2017 §2 made the dataset's images, the same garments as shop photos, and a tiny model
that tells them apart (nearest class centroid, as an ONNX graph the server loads like any export)."""

from __future__ import annotations

import io
import json

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from PIL import Image, ImageDraw

from alexops import augment, datasets, export

SIZE = 28
# Silhouettes on a 112 px grid, one per class: distinct outlines, as the dataset's ten classes have.
SHAPES = {
    "T-shirt": [(0, 8), (111, 8), (111, 44), (84, 44), (84, 111), (28, 111), (28, 44), (0, 44)],
    "Trouser": [(30, 0), (82, 0), (86, 111), (62, 111), (56, 30), (50, 111), (26, 111)],
    "Pullover": [(0, 0), (111, 0), (111, 111), (90, 111), (90, 30), (80, 30), (80, 111), (32, 111),
                 (32, 30), (22, 30), (22, 111), (0, 111)],
    "Dress": [(36, 0), (76, 0), (111, 111), (0, 111)],
    "Sandal": [(0, 70), (111, 70), (111, 80), (0, 80), (0, 100), (111, 100), (111, 111), (0, 111)],
    "Sneaker": [(0, 50), (50, 30), (111, 66), (111, 96), (0, 96)],
    "Bag": [(0, 30), (30, 30), (30, 0), (82, 0), (82, 30), (111, 30), (111, 111), (0, 111)],
    "Ankle boot": [(30, 0), (80, 0), (80, 60), (111, 80), (111, 111), (20, 111), (30, 60)],
}  # fmt: skip
CLASSES = list(SHAPES)


def garment(kind: int, rng: np.random.Generator) -> np.ndarray:
    """A 28×28 uint8 image made as the dataset's were: a light, textured silhouette trimmed to
    its edges, its longest edge fitted to 28 px, centred on black."""
    canvas = Image.new("L", (112, 112), 0)
    points = [(x * rng.uniform(0.9, 1.0), y * rng.uniform(0.9, 1.0)) for x, y in SHAPES[CLASSES[kind]]]
    ImageDraw.Draw(canvas).polygon(points, fill=int(rng.integers(150, 230)))
    large = np.asarray(canvas).astype(int)
    texture = rng.integers(-25, 25, (28, 28)).repeat(4, 0).repeat(4, 1)
    large = np.clip(np.where(large > 0, large + texture, 0), 0, 255).astype(np.uint8)
    rows, cols = np.flatnonzero(large.any(axis=1)), np.flatnonzero(large.any(axis=0))
    cropped = Image.fromarray(large[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1])
    scale = SIZE / max(cropped.size)
    fitted = cropped.resize([max(1, round(side * scale)) for side in cropped.size], Image.Resampling.BOX)
    out = Image.new("L", (SIZE, SIZE), 0)
    out.paste(fitted, ((SIZE - fitted.width) // 2, (SIZE - fitted.height) // 2))
    return np.asarray(out)


def garments(per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, 28, 28) uint8 images and (N,) labels."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(CLASSES)), per_class)
    return np.stack([garment(int(k), rng) for k in labels]), labels


def catalogue_photo(image: np.ndarray, scale: int, margins: tuple[int, int, int, int], backdrop: int = 253):
    """`image` as a shop shows it: negated (dark on light), enlarged, on a larger RGB canvas."""
    photo = Image.fromarray(255 - image).resize((SIZE * scale, SIZE * scale), Image.Resampling.BICUBIC)
    top, bottom, left, right = margins
    canvas = Image.new("RGB", (SIZE * scale + left + right, SIZE * scale + top + bottom), (backdrop,) * 3)
    canvas.paste(photo.convert("RGB"), (left, top))
    return canvas


def encode(image: Image.Image | np.ndarray, fmt: str = "PNG", **options) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


RECIPE = augment.Recipe.create(SIZE, 32 / 28, [0.3], [0.35])


def centroid_model(images: np.ndarray, labels: np.ndarray) -> bytes:
    """An ONNX model exported as alexops exports (metadata: classes, preprocessing, Fashion-MNIST's
    capture recipe) whose logits w·x − |w|²/2 pick the nearest class centroid of the preprocessed
    training images."""
    x = augment.preprocess(torch.from_numpy(images)[:, None], RECIPE).reshape(len(images), -1).numpy()
    centroids = np.stack([x[labels == k].mean(axis=0) for k in range(len(CLASSES))]).astype(np.float32)
    bias = (-0.5 * (centroids**2).sum(axis=1)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["image"], ["flat"], axis=1),
            helper.make_node("Gemm", ["flat", "centroids", "bias"], ["logits"], transB=1),
        ],
        "nearest_centroid",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", len(CLASSES)])],
        [onnx.numpy_helper.from_array(centroids, "centroids"), onnx.numpy_helper.from_array(bias, "bias")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    proto.ir_version = 10
    capture = json.dumps(datasets.FASHION_MNIST.capture.as_dict())
    export.add_metadata(proto, CLASSES, RECIPE.as_dict(), {"dataset": "fashion-mnist", "capture": capture})
    onnx.checker.check_model(proto)
    return proto.SerializeToString()
