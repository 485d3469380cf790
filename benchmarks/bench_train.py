"""Training speed and time to accuracy, alexops vs the seed recipe, side by side.

    python benchmarks/bench_train.py [--device cpu|cuda] [--image-size 227] [--width 1.0]
        [--epochs N --data DIR] [--out FILE]

1. throughput: img/s of an alexops training step (augmentation on the device included)
   and of the seed recipe (PIL DataLoader, Adam, batch 64) at the same input size;
2. data share: the fraction of an alexops step spent in augmentation;
3. with --epochs and --data (a directory holding the four Fashion-MNIST files, gzipped
   or not): a real training run with train.fit, the accuracy curve, and the test
   accuracy (centre crop and 10-crop) it reaches, with the wall time.
Results are printed and written as JSON (default benchmarks/results/train-<device>.json).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import seed_recipe  # noqa: E402

from alexops import augment, params, prepare, train  # noqa: E402
from alexops.datasets import FASHION_MNIST, read_split  # noqa: E402
from alexops.evaluate import metrics_from, predict_probabilities  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def synthetic(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g), torch.randint(
        0, 10, (n,), generator=g
    )


def stats_for(images: torch.Tensor) -> dict:
    return {
        "image_shape": list(images.shape[1:]),
        "classes": list(FASHION_MNIST.classes),
        **prepare.channel_statistics(images),
    }


def time_alexops(images, labels, opts, device, steps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    session = train.build(opts, stats_for(images), device)
    model = torch.compile(session.model) if opts.compile else session.model
    images, labels = images.to(device), labels.to(device)
    generator = torch.Generator(device=device).manual_seed(0)
    amp = train.autocast_enabled(device, opts)

    def step(i: int, timed_data: bool = False) -> float:
        index = torch.randint(0, len(labels), (opts.batch_size,), device=device, generator=generator)
        started = time.perf_counter()
        x = augment.train_batch(images[index], session.recipe, session.lighting, opts.flip, generator)
        if opts.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if timed_data:
            sync(device)
        data_seconds = time.perf_counter() - started
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = torch.nn.functional.cross_entropy(model(x).float(), labels[index])
        session.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        session.optimizer.step()
        return data_seconds

    for i in range(warmup):
        step(i)
    sync(device)
    started = time.perf_counter()
    for i in range(steps):
        step(i)
    sync(device)
    seconds = time.perf_counter() - started
    # data share: the same steps with a sync after augmentation, so its time is its own
    data, started_shared = 0.0, time.perf_counter()
    for i in range(steps):
        data += step(i, timed_data=True)
    sync(device)
    return {
        "img_per_s": steps * opts.batch_size / seconds,
        "data_share": data / (time.perf_counter() - started_shared),
        "batch_size": opts.batch_size,
        "parameters": sum(p.numel() for p in session.model.parameters()),
    }


def time_seed(images, labels, image_size: int, device, steps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    model = seed_recipe.SeedAlexNet(1, 10, image_size).to(device)
    optimizer = torch.optim.Adam(model.parameters())
    batches = iter(seed_recipe.loader(images, labels, image_size))
    for _ in range(warmup):
        x, y = next(batches)
        seed_recipe.train_step(model, optimizer, x.to(device), y.to(device))
    sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        x, y = next(batches)  # the per-sample PIL work happens here, as in the seed
        seed_recipe.train_step(model, optimizer, x.to(device), y.to(device))
    sync(device)
    return {"img_per_s": steps * 64 / (time.perf_counter() - started), "batch_size": 64}


def read_fashion_mnist(directory: Path):
    """The four IDX files from `directory` (gzipped or not) → train and test tensors."""
    with tempfile.TemporaryDirectory() as tmp:
        for name in FASHION_MNIST.files:
            gz, plain = directory / f"{name}.gz", directory / name
            data = gzip.decompress(gz.read_bytes()) if gz.exists() else plain.read_bytes()
            (Path(tmp) / name).write_bytes(data)
        return (*read_split(Path(tmp), "train"), *read_split(Path(tmp), "test"))


def accuracy_run(data_dir: Path, opts, device, seed: int, ten_crop: bool) -> dict:
    train_x, train_y, test_x, test_y = read_fashion_mnist(data_dir)
    torch.manual_seed(seed)
    order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(seed))
    val, keep = order[: opts.val_size], order[opts.val_size :]
    session = train.build(opts, stats_for(train_x), device)
    started = time.perf_counter()
    data = (train_x[keep], train_y[keep], train_x[val], train_y[val])
    progress = train.fit(session, data, opts, seed, 512, train.Progress())
    sync(device)
    train_seconds = time.perf_counter() - started
    result = {"train_seconds": train_seconds, "history": progress.history}
    for name, ten in (("center_crop", False), ("ten_crop", True)):
        if ten and not ten_crop:
            continue
        probs = predict_probabilities(session.model, test_x, session.recipe, 256, device, ten)
        result[f"test_accuracy_{name}"] = metrics_from(probs, test_y, list(FASHION_MNIST.classes))["accuracy"]
    result["wall_seconds"] = time.perf_counter() - started
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--image-size", type=int, default=227)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seed-steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--params", default=None, help="take train params from this params.yaml")
    parser.add_argument("--set", action="append", default=[], help="train.KEY=VALUE override (YAML value)")
    parser.add_argument("--epochs", type=int, default=0, help="run a time-to-accuracy training of N epochs")
    parser.add_argument("--data", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--no-ten-crop", action="store_true")
    parser.add_argument("--skip-seed", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    opts = train_params(args)
    images, labels = synthetic(4096)
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "train_params": {k: v for k, v in vars(opts).items()},
        "alexops": time_alexops(images, labels, opts, device, args.steps, args.warmup),
    }
    ours = result["alexops"]
    print(f"alexops: {ours['img_per_s']:.0f} img/s, data share {ours['data_share']:.1%}")
    if not args.skip_seed:
        result["seed"] = time_seed(images, labels, opts.image_size, device, args.seed_steps, 1)
        result["speedup_vs_seed"] = result["alexops"]["img_per_s"] / result["seed"]["img_per_s"]
        seed = result["seed"]["img_per_s"]
        print(f"seed recipe: {seed:.0f} img/s → alexops is {result['speedup_vs_seed']:.2f}×")
    if args.epochs:
        result["accuracy_run"] = accuracy_run(args.data, opts, device, 42, not args.no_ten_crop)
        run = result["accuracy_run"]
        print(
            f"accuracy run: {args.epochs} epochs in {run['train_seconds']:.0f} s → test accuracy "
            f"{run.get('test_accuracy_ten_crop', run['test_accuracy_center_crop']):.4f}"
        )
    out = args.out or Path(__file__).parent / "results" / f"train-{device.type}.json"
    write_json_atomic(out, result)
    print(f"wrote {out}")


def train_params(args) -> params.TrainParams:
    import yaml

    raw = yaml.safe_load(Path(args.params).read_text()) if args.params else {}
    section = dict(raw.get("train", {}))
    if not args.params:
        section |= {"image_size": args.image_size, "width": args.width, "batch_size": args.batch_size}
    section |= {"compile": args.compile} if args.compile else {}
    for item in args.set:
        key, _, value = item.partition("=")
        section[key.removeprefix("train.")] = yaml.safe_load(value)
    if args.epochs:
        section["epochs"] = args.epochs
    return params.from_dict({"train": section}).train


def write_json_atomic(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
