"""Training speed and time to accuracy, alexops vs the seed recipe, side by side.

    python benchmarks/bench_train.py [--device cpu|cuda] [--image-size 227] [--width 1.0]
        [--epochs N --data DIR] [--out FILE]

1. throughput: img/s of an alexops training step (augmentation on the device included)
   and of the seed recipe (PIL DataLoader, Adam, batch 64) at the same input size, each
   also as arithmetic speed (GFLOP/s), next to the machine's own 4096² matrix product;
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
import shlex
import statistics
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
from alexops.model import count_parameters  # noqa: E402

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


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


def forward_multiply_adds(model: torch.nn.Module, example: torch.Tensor) -> int:
    """Multiply-adds of one image's forward pass through the convolutions and linear layers."""
    counted = 0

    def count(module, _inputs, output):
        nonlocal counted
        if isinstance(module, torch.nn.Conv2d):
            window = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            counted += output[0].numel() * window
        elif isinstance(module, torch.nn.Linear):
            counted += module.in_features * module.out_features

    hooks = [m.register_forward_hook(count) for m in model.modules()]
    with torch.no_grad():
        model(example[:1])
    for hook in hooks:
        hook.remove()
    return counted


def training_gflop(model: torch.nn.Module, example: torch.Tensor) -> float:
    """About 3 forward passes per trained image (forward, input and weight gradients), 2 FLOP each."""
    return 3 * 2 * forward_multiply_adds(model, example) / 1e9


def matmul_gflop_per_s(dtype: torch.dtype, device: torch.device, n: int = 4096) -> float:
    """The machine's yardstick: the best of five n×n matrix products, in GFLOP/s."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    a @ b  # warm-up: the library's first call picks its kernels
    best = 0.0
    for _ in range(5):
        sync(device)
        started = time.perf_counter()
        a @ b
        sync(device)
        best = max(best, 2 * n**3 / (time.perf_counter() - started) / 1e9)
    return best


def alexops_step(images, labels, opts, device):
    """(step, images per step, session): one alexops training step, augmentation included.

    `step(fixed=True)` trains on the batch of the step before again: the model's work alone.
    """
    torch.manual_seed(0)
    session = train.build(opts, stats_for(images), device)
    model = torch.compile(session.model) if opts.compile else session.model
    images, labels = images.to(device), labels.to(device)
    generator = torch.Generator(device=device).manual_seed(0)
    amp = train.autocast_enabled(device, opts)
    last = {}
    counter = [0]

    def step(fixed: bool = False) -> None:
        if not (fixed and last):
            index = torch.randint(0, len(labels), (opts.batch_size,), device=device, generator=generator)
            last["x"], last["y"] = train.augmented(session, images[index], opts, generator), labels[index]
        counter[0] += 1
        train.train_step(model, session, last["x"], last["y"], opts, amp, counter[0])  # the loop's own step

    return step, opts.batch_size, session


def seed_step(images, labels, image_size: int, device):
    """(step, images per step, model): one step of the seed recipe, its PIL loading included."""
    torch.manual_seed(0)
    model = seed_recipe.SeedAlexNet(1, 10, image_size).to(device)
    optimizer = torch.optim.Adam(model.parameters())

    def batches():
        while True:
            yield from seed_recipe.loader(images, labels, image_size)

    stream = batches()

    def step() -> None:
        x, y = next(stream)  # the per-sample PIL work happens here, as in the seed
        seed_recipe.train_step(model, optimizer, x.to(device), y.to(device))

    return step, 64, model


def timed_rounds(runs: dict, rounds: int, warmup: int, device) -> dict[str, list[float]]:
    """img/s of each run in each round; `runs` maps a name to (step, images per step, steps).

    The runs take turns, so that a shared machine's drift slows both sides of a round alike.
    """
    for step, _, _ in runs.values():
        for _ in range(warmup):
            step()
    speeds = {name: [] for name in runs}
    for _ in range(rounds):
        for name, (step, per_step, steps) in runs.items():
            sync(device)
            started = time.perf_counter()
            for _ in range(steps):
                step()
            sync(device)
            speeds[name].append(steps * per_step / (time.perf_counter() - started))
    return speeds


def data_share(step, steps: int, device) -> float:
    """The part of an alexops step's time that its data (the batch's draw and augmentation) adds:
    1 − (time of `steps` steps on one fixed batch) / (time of `steps` whole steps). A sync after
    the augmentation would also wait for the step before it, queued on a GPU, and overstate it."""
    seconds = {}
    for fixed in (False, True, False, True):  # in turns, each measured twice
        sync(device)
        started = time.perf_counter()
        for _ in range(steps):
            step(fixed=fixed)
        sync(device)
        seconds[fixed] = seconds.get(fixed, 0.0) + time.perf_counter() - started
    return 1 - seconds[True] / seconds[False]


def measure_throughput(images, labels, opts, device, args) -> dict:
    ours, batch, session = alexops_step(images, labels, opts, device)
    model, example = session.model, augment.preprocess(images[:1], session.recipe).to(device)
    rounds = max(1, args.rounds)
    runs = {"alexops": (ours, batch, max(1, args.steps // rounds))}
    gflop = {"alexops": training_gflop(model, example)}
    if not args.skip_seed:
        seed, seed_batch, seed_model = seed_step(images, labels, opts.image_size, device)
        runs["seed"] = (seed, seed_batch, max(1, args.seed_steps // rounds))
        gflop["seed"] = training_gflop(seed_model, torch.zeros_like(example))
    speeds = timed_rounds(runs, rounds, args.warmup, device)
    result = {
        name: {
            "img_per_s": statistics.median(speeds[name]),
            "img_per_s_by_round": speeds[name],
            "gflop_per_image": gflop[name],
            "batch_size": runs[name][1],
        }
        for name in runs
    }
    result["alexops"]["data_share"] = data_share(ours, max(1, args.steps // 2), device)
    result["alexops"]["parameters"] = count_parameters(model)
    if "seed" in result:
        by_round = [a / b for a, b in zip(speeds["alexops"], speeds["seed"], strict=True)]
        result |= {
            "speedup_vs_seed": statistics.median(by_round),
            "speedup_vs_seed_by_round": by_round,
        }
    return result


def read_fashion_mnist(directory: Path):
    """The four IDX files from `directory` (gzipped or not) → train and test tensors."""
    with tempfile.TemporaryDirectory() as tmp:
        for name in FASHION_MNIST.files:
            gz, plain = directory / f"{name}.gz", directory / name
            data = gzip.decompress(gz.read_bytes()) if gz.exists() else plain.read_bytes()
            (Path(tmp) / name).write_bytes(data)
        return (*read_split(Path(tmp), "train"), *read_split(Path(tmp), "test"))


def test_accuracy(model, recipe, test_x, test_y, device, ten_crop: bool) -> dict:
    result = {}
    for name, ten in (("center_crop", False), ("ten_crop", True)):
        if ten and not ten_crop:
            continue
        probs = predict_probabilities(model, test_x, recipe, 256, device, ten)
        result[f"test_accuracy_{name}"] = metrics_from(probs, test_y, list(FASHION_MNIST.classes))["accuracy"]
    return result


def accuracy_run(
    data_dir: Path, opts, device, seed: int, ten_crop: bool, save: Path | None = None, max_train: int = 0
) -> dict:
    """Train on Fashion-MNIST as the train stage does (same validation split and seeds) and
    test on all 10,000 test images; `max_train` > 0 keeps that many training images (dry runs)."""
    train_x, train_y, test_x, test_y = read_fashion_mnist(data_dir)
    torch.manual_seed(seed)
    order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(seed))
    val, keep = order[: opts.val_size], order[opts.val_size :]
    keep = keep[:max_train] if max_train else keep
    session = train.build(opts, stats_for(train_x), device)
    started = time.perf_counter()
    data = (train_x[keep], train_y[keep], train_x[val], train_y[val])
    progress = train.fit(session, data, opts, seed, 512, train.Progress())
    sync(device)
    train_seconds = time.perf_counter() - started
    result = {"train_seconds": train_seconds, "history": progress.history}
    result |= test_accuracy(session.trained, session.recipe, test_x, test_y, device, ten_crop)
    if session.average is not None:  # the average never feeds back into training: the same run without it
        result["without_average"] = test_accuracy(
            session.model, session.recipe, test_x, test_y, device, ten_crop
        )
    result["wall_seconds"] = time.perf_counter() - started
    if save is not None:  # the trained model in train's format, for export/quantize benchmarks
        trained = {
            "config": json.dumps(session.config),
            "recipe": json.dumps(session.recipe.as_dict()),
            "classes": json.dumps(list(FASHION_MNIST.classes)),
            "state_dict": {k: v.cpu() for k, v in session.trained.state_dict().items()},
        }
        save.parent.mkdir(parents=True, exist_ok=True)
        torch.save(trained, save)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--image-size", type=int, default=227)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seed-steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps of each before the rounds")
    parser.add_argument("--rounds", type=int, default=3, help="turns of alexops and the seed (default 3)")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--params", default=None, help="take train params from this params.yaml")
    parser.add_argument("--preset", default=None, help="take train params from this preset (alexops.presets)")
    parser.add_argument("--set", action="append", default=[], help="train.KEY=VALUE override (YAML value)")
    parser.add_argument("--epochs", type=int, default=0, help="run a time-to-accuracy training of N epochs")
    parser.add_argument("--data", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--max-train", type=int, default=0, help="train on this many images (dry runs)")
    parser.add_argument("--no-ten-crop", action="store_true")
    parser.add_argument(
        "--save", type=Path, default=None, help="write the trained model here (train's format)"
    )
    parser.add_argument("--skip-seed", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    opts = train_params(args)
    images, labels = synthetic(4096)
    result = {
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "train_params": {k: v for k, v in vars(opts).items()},
    }
    # Arithmetic speed next to the machine's matrix-product speed says how much room is left
    dtype = torch.bfloat16 if train.autocast_enabled(device, opts) else torch.float32
    result["matmul_gflop_per_s"] = matmul_gflop_per_s(dtype, device)
    print(f"{str(dtype)[6:]} 4096² matrix product: {result['matmul_gflop_per_s']:.0f} GFLOP/s")
    result |= measure_throughput(images, labels, opts, device, args)
    ours = result["alexops"]
    print(f"alexops: {ours['img_per_s']:.0f} img/s ({arithmetic(ours)}), data share {ours['data_share']:.1%}")
    if "seed" in result:
        low, high = min(result["speedup_vs_seed_by_round"]), max(result["speedup_vs_seed_by_round"])
        print(
            f"seed recipe: {result['seed']['img_per_s']:.0f} img/s ({arithmetic(result['seed'])}) "
            f"→ alexops is {result['speedup_vs_seed']:.2f}× (rounds: {low:.2f}–{high:.2f}×)"
        )
    if args.epochs:
        result["accuracy_run"] = accuracy_run(
            args.data, opts, device, 42, not args.no_ten_crop, save=args.save, max_train=args.max_train
        )
        run = result["accuracy_run"]
        print(
            f"accuracy run: {args.epochs} epochs in {run['train_seconds']:.0f} s → test accuracy "
            f"{run.get('test_accuracy_ten_crop', run['test_accuracy_center_crop']):.4f}"
        )
    out = args.out or Path(__file__).parent / "results" / f"train-{device.type}.json"
    write_json_atomic(out, result)
    print(f"wrote {out}")


def arithmetic(timing: dict) -> str:
    per_image = timing["gflop_per_image"]
    return f"{per_image:.3g} GFLOP/image, {timing['img_per_s'] * per_image:.0f} GFLOP/s"


def train_params(args) -> params.TrainParams:
    import yaml

    from alexops import presets

    raw = yaml.safe_load(Path(args.params).read_text()) if args.params else {}
    if args.preset:  # the preset's train settings over params.yaml's (its device choice aside)
        raw = presets.apply(raw or yaml.safe_load(PARAMS.read_text()), args.preset)
    section = dict(raw.get("train", {}))
    if not (args.params or args.preset):
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
