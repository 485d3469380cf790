"""The images the README's serving examples send: three of Fashion-MNIST's test images.

    .venv/bin/python examples/make_examples.py [--data /usr/share/datasets/fashion-mnist]

`ankle-boot.png` is test image 0 as the dataset has it (28×28 gray PNG), `pullover.jpg` test
image 1 as a JPEG, and `shop-photo.jpg` test image 9 (a sneaker) as a shop's catalogue photo,
drawn as `benchmarks/bench_capture.py` draws them (a dark garment enlarged on a light backdrop
with margins), the kind of photo `capture=dataset` is for. Fashion-MNIST: Xiao, Rasul and
Vollgraf 2017, MIT licence.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "benchmarks"))

import bench_capture  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=bench_capture.DEFAULT_DATA)
    args = parser.parse_args()
    images, labels = bench_capture.test_set(args.data)
    if [labels[0], labels[1], labels[9]] != [9, 2, 7]:  # an ankle boot, a pullover, a sneaker
        raise SystemExit(f"make_examples: the test set in {args.data} is not Fashion-MNIST's.")
    (HERE / "ankle-boot.png").write_bytes(bench_capture.png(images[0]))
    buffer = io.BytesIO()
    Image.fromarray(images[1]).save(buffer, "JPEG", quality=90)
    (HERE / "pullover.jpg").write_bytes(buffer.getvalue())
    (HERE / "shop-photo.jpg").write_bytes(bench_capture.catalogue_photo(images[9], seed=9)[0])


if __name__ == "__main__":
    main()
