"""Photos as shops have them: Fashion-MNIST's test images rendered as catalogue photos.

    python benchmarks/bench_capture.py --model artifacts/fashion-mnist/model.onnx
        [--data /usr/share/datasets/fashion-mnist] [--limit 10000] [--out FILE]

Each test image is rendered as a shop would show the product (the inverse of Xiao et al.
2017 §2): negated to a dark garment on a light backdrop (white, #fdfdfd or a light gray),
enlarged 4-20× with a random filter, on a larger canvas with random margins on each side,
saved as JPEG (quality 60-95, RGB or gray). Every rendering is seeded by its index, so a
rerun draws the same photos. Then both the originals (PNG) and the renderings go through
exactly what `alexops serve` does with an uploaded file (`alexops.serving.inputs`: the one
decoder, the capture step, the test-time view) and the trained model, with capture=none,
auto and dataset, and with ablations of the recipe (no sharpening, a tighter trim).

Goals (issue 14): renderings with capture=auto within 3 points of the originals; the
originals lose nothing (capture=auto gives exactly capture=none's predictions).
Results are printed and written as JSON (default benchmarks/results/capture.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import io
import os
import platform
import struct
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from alexops import files  # noqa: E402
from alexops.serving import inputs  # noqa: E402
from alexops.serving.model import LoadedModel, load_model  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "capture.json"
DEFAULT_DATA = Path("/usr/share/datasets/fashion-mnist")
GOALS = {
    "catalogue_auto_vs_originals": "within 3 points",
    "originals_auto_vs_none": "identical predictions",
}
FILTERS = (
    Image.Resampling.BICUBIC,
    Image.Resampling.BILINEAR,
    Image.Resampling.LANCZOS,
    Image.Resampling.NEAREST,
)


def idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped or not): magic (0, 0, type 8 = uint8, ndim), big-endian dims, data."""
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def test_set(directory: Path) -> tuple[np.ndarray, np.ndarray]:
    def first(stem: str) -> Path:
        for name in (f"{stem}.gz", stem):
            if (directory / name).exists():
                return directory / name
        raise SystemExit(f"bench_capture: no {stem}(.gz) in {directory}. Install dataset-fashion-mnist.")

    return idx(first("t10k-images-idx3-ubyte")), idx(first("t10k-labels-idx1-ubyte")).astype(np.int64)


def catalogue_photo(image: np.ndarray, seed: int) -> tuple[bytes, dict]:
    """One test image as a shop's product photo, drawn from `seed`; the bytes and how it was made."""
    rng = np.random.default_rng(seed)
    scale = int(rng.integers(4, 21))
    backdrop = int(rng.choice([255, 253, int(rng.integers(232, 251))]))
    resample = FILTERS[int(rng.integers(len(FILTERS)))]
    side = 28 * scale
    margins = [int(rng.uniform(0.05, 0.6) * side) for _ in range(4)]  # top, bottom, left, right
    negated = 255 - image.astype(np.int32)
    # the photo's backdrop is `backdrop`, not white: the dataset's black maps onto it
    photo = np.clip(negated - (255 - backdrop), 0, 255).astype(np.uint8)
    large = Image.fromarray(photo).resize((side, side), resample)
    top, bottom, left, right = margins
    canvas = Image.new("L", (side + left + right, side + top + bottom), backdrop)
    canvas.paste(large, (left, top))
    gray = rng.random() < 0.3
    quality = int(rng.integers(60, 96))
    buffer = io.BytesIO()
    (canvas if gray else canvas.convert("RGB")).save(buffer, "JPEG", quality=quality)
    made = {"scale": scale, "backdrop": backdrop, "filter": resample.name, "margins": margins}
    return buffer.getvalue(), made | {"quality": quality, "gray": gray}


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return buffer.getvalue()


def predictions(
    model: LoadedModel, encoded: list[bytes], capture: str, batch: int = 256
) -> tuple[np.ndarray, list]:
    """Top-1 class of each file, through what the server does with an upload; and what capture did."""
    best, applied = [], []
    for start in range(0, len(encoded), batch):
        chunk = [(f"#{start + i}", data) for i, data in enumerate(encoded[start : start + batch])]
        x, done = inputs.image_inputs(chunk, model, capture, 10**8)
        best.append(model.logits(x).argmax(axis=1))
        applied += [d.applied for d in done]
    return np.concatenate(best), applied


def measure(model: LoadedModel, originals: list[bytes], photos: list[bytes], labels: np.ndarray) -> dict:
    results = {}
    for name, encoded, capture in (
        ("originals_none", originals, "none"),
        ("originals_auto", originals, "auto"),
        ("catalogue_none", photos, "none"),
        ("catalogue_auto", photos, "auto"),
        ("catalogue_dataset", photos, "dataset"),
    ):
        started = time.perf_counter()
        best, applied = predictions(model, encoded, capture)
        results[name] = {
            "accuracy": float((best == labels).mean()),
            "recipe_applied_share": float(np.mean([a != "none" for a in applied])),
            "ms_per_image": 1e3 * (time.perf_counter() - started) / len(encoded),
        }
        results[name]["_predictions"] = best
        r = results[name]
        print(
            f"  {name:18s} accuracy {r['accuracy']:.4f}  recipe applied to {r['recipe_applied_share']:.1%}  "
            f"{r['ms_per_image']:.2f} ms/image",
            flush=True,
        )
    same = results["originals_auto"]["_predictions"] == results["originals_none"]["_predictions"]
    results["originals_auto_changed_predictions"] = int((~same).sum())
    for entry in results.values():
        if isinstance(entry, dict):
            entry.pop("_predictions", None)
    results["catalogue_auto_minus_originals_points"] = 100 * (
        results["catalogue_auto"]["accuracy"] - results["originals_none"]["accuracy"]
    )
    return results


def ablations(model: LoadedModel, photos: list[bytes], labels: np.ndarray) -> dict:
    """The recipe's choices, one at a time, on the renderings (capture=dataset)."""
    variants = {
        "no_sharpening": {"sharpen_sigma": 0.0},
        "sharpen_sigma_0.5": {"sharpen_sigma": 0.5},
        "trim_fuzz_0.02": {"trim_fuzz": 0.02},
        "trim_fuzz_0.10": {"trim_fuzz": 0.10},
    }
    out = {}
    for name, change in variants.items():
        variant = dataclasses.replace(model, capture=dataclasses.replace(model.capture, **change))
        best, _ = predictions(variant, photos, "dataset")
        out[name] = {"change": change, "accuracy": float((best == labels).mean())}
        print(f"  ablation {name:18s} accuracy {out[name]['accuracy']:.4f}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="the trained model.onnx (fashion-mnist)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"IDX files (default {DEFAULT_DATA})")
    parser.add_argument("--limit", type=int, default=10000, help="test images used (default: all 10,000)")
    parser.add_argument("--no-ablations", action="store_true")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    images, labels = test_set(args.data)
    images, labels = images[: args.limit], labels[: args.limit]
    model = load_model(
        args.model.read_bytes(), name=args.model.stem, version=None, uri=str(args.model), threads=0
    )
    print(f"{len(images)} test images, model {args.model} (capture recipe: {model.capture.kind})", flush=True)
    started = time.perf_counter()
    rendered = [catalogue_photo(image, seed) for seed, image in enumerate(images)]
    photos = [data for data, _ in rendered]
    originals = [png(image) for image in images]
    print(
        f"  rendered in {time.perf_counter() - started:.0f} s; "
        f"mean photo {np.mean([len(p) for p in photos]) / 1e3:.0f} kB"
    )
    results = measure(model, originals, photos, labels)
    payload = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                    "python": platform.python_version(), "load_average_1min": os.getloadavg()[0]},
        "goals": GOALS,
        "model": str(args.model),
        "test_images": len(images),
        "rendering": "negated to the backdrop, enlarged 4-20x (bicubic/bilinear/lanczos/nearest), margins "
        "5-60% of the garment per side, backdrop 255, 253 or 232-250, JPEG quality 60-95, 30% gray",
        "examples": [made for _, made in rendered[:5]],
        "results": results,
    }  # fmt: skip
    if not args.no_ablations:
        payload["ablations"] = ablations(model, photos, labels)
    files.write_json(args.out, payload)
    print(
        f"catalogue photos, capture=auto: {results['catalogue_auto']['accuracy']:.2%} vs originals "
        f"{results['originals_none']['accuracy']:.2%} "
        f"({results['catalogue_auto_minus_originals_points']:+.2f} points); "
        f"originals changed by auto: {results['originals_auto_changed_predictions']}. Wrote {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
