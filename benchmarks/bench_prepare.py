"""Folder datasets, measured: equivalence with the IDX path, prepare speed, scale, streaming.

    python benchmarks/bench_prepare.py speed [--images 2000] [--photos 500x375 1600x1200] [--sizes 106 256]
    python benchmarks/bench_prepare.py equivalence [--epochs 30]
    python benchmarks/bench_prepare.py scale [--images 10000 100000]
    python benchmarks/bench_prepare.py stream [--steps 3]

- speed: images/s decoding a folder of real-size JPEGs (500×375 and 1600×1200 colour photos
  made from Fashion-MNIST's images) into the uint8 cache: alexops prepare against torchvision's
  ImageFolder + DataLoader (Resize, CenterCrop, PILToTensor) with the same number of worker
  processes, taking turns in rounds, both reading from the page cache.
- equivalence: Fashion-MNIST written out as PNG folders (train/<class>/<index>.png,
  test/<class>/<index>.png), prepared through the folder path with the default params and
  compared image by image with the IDX path's cache; then both trained and evaluated by the
  pipeline's own stages (`alexops fetch|prepare|train|evaluate`), same params, same seed.
- scale: prepare and one training epoch on a folder of N JPEGs (256×192), the cache streamed
  from its memory map (ALEXOPS_DATA_MEMORY below the cache's size); wall time and the peak
  memory of the stage's process tree, sampled every 0.1 s (resident, and anonymous: the
  processes' proportional anonymous memory, Pss_Anon, without the mapped files' pages).
- stream: the data share of a training step at 227 px (width 1.0, CPU) with the batches read
  from the memory-mapped cache: the gather of the batch's images plus the augmentation, against
  the whole step; with the cache's pages in memory and evicted before every step.

Each writes benchmarks/results/prepare-<mode>.json with the command that made it.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from alexops import augment, cache, fetch, params, prepare, train  # noqa: E402
from alexops.datasets import FASHION_MNIST, read_split  # noqa: E402
from alexops.paths import Paths  # noqa: E402

MIRROR = Path("/usr/share/datasets/fashion-mnist")
RESULTS = ROOT / "benchmarks" / "results"
WORKERS = len(os.sched_getaffinity(0))


# ---- data ---------------------------------------------------------------------------------------


def fashion_mnist() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    with tempfile.TemporaryDirectory() as tmp:
        for name in FASHION_MNIST.files:
            (Path(tmp) / name).write_bytes(gzip.decompress((MIRROR / f"{name}.gz").read_bytes()))
        return (*read_split(Path(tmp), "train"), *read_split(Path(tmp), "test"))


def class_folder(label: int) -> str:
    """`3_Dress`: the index first, so that the folders sort in the dataset's own label order."""
    return f"{label}_{FASHION_MNIST.classes[label].replace('/', '_')}"


def photo(garment: np.ndarray, size: tuple[int, int], seed: int) -> bytes:
    """A Fashion-MNIST garment as a colour shop photo of `size` (W, H): upscaled, tinted, on a lit
    backdrop with sensor noise, JPEG quality 90 (about what a camera's export weighs)."""
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    width, height = size
    side = int(min(width, height) * 0.85)
    mask = (
        np.asarray(Image.fromarray(garment).resize((side, side), Image.Resampling.BICUBIC), np.float32) / 255
    )
    tint = rng.uniform(0.3, 1.0, 3)
    y, x = np.mgrid[0:height, 0:width]
    backdrop = 200 + 40 * (x / width)[..., None] * np.array([1.0, 0.95, 0.9]) - 20 * (y / height)[..., None]
    canvas = backdrop.astype(np.float32)
    top, left = (height - side) // 2, (width - side) // 2
    region = canvas[top : top + side, left : left + side]
    region[:] = region * (1 - mask[..., None]) + (255 * tint * mask[..., None]) * 0.9
    canvas += rng.normal(0, 6, canvas.shape)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _write_photos(job) -> int:
    folder, items, size = job
    for index, label, garment in items:
        target = Path(folder) / class_folder(label) / f"{index:06d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(photo(garment, size, seed=index))
    return len(items)


def write_photo_folder(folder: Path, count: int, size: tuple[int, int]) -> None:
    """`count` photos, `<index>_<class>/<n>.jpg`, made from Fashion-MNIST's images on all cores."""
    if (folder / ".complete").exists() and int((folder / ".complete").read_text()) == count:
        return
    shutil.rmtree(folder, ignore_errors=True)
    train_x, train_y, test_x, test_y = fashion_mnist()
    garments = torch.cat([test_x, train_x])[:, 0].numpy()
    labels = torch.cat([test_y, train_y]).numpy()
    items = [(i, int(labels[i % len(labels)]), garments[i % len(labels)]) for i in range(count)]
    jobs = [(str(folder), items[i : i + 500], size) for i in range(0, count, 500)]
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(WORKERS) as pool:
        done = 0
        for written in pool.imap_unordered(_write_photos, jobs):
            done += written
            print(f"\rwriting {folder.name}: {done}/{count}", end="", flush=True)
    print()
    (folder / ".complete").write_text(str(count))


def warm(folder: Path) -> int:
    """Read every file once, so that both sides of a comparison read from the page cache."""
    return sum(len(p.read_bytes()) for p in folder.rglob("*.jpg"))


def folder_params(name: str, source: Path, **sections) -> params.Params:
    raw = {"base": {"dataset": name}, "datasets": {name: {"source": str(source)}}}
    for section, values in sections.items():
        raw[section] = values
    return params.from_dict(raw)


# ---- speed --------------------------------------------------------------------------------------


def ours(project: Path, loaded: params.Params) -> tuple[float, torch.Size]:
    paths = Paths(project, loaded.base.dataset)
    shutil.rmtree(paths.prepared, ignore_errors=True)
    started = time.perf_counter()
    prepare.run(loaded, paths)
    seconds = time.perf_counter() - started
    return seconds, np.load(paths.prepared / cache.IMAGES, mmap_mode="r").shape


def torchvision_side(folder: Path, size: int) -> float:
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    started = time.perf_counter()
    recipe = transforms.Compose(
        [transforms.Resize(size), transforms.CenterCrop(size), transforms.PILToTensor()]
    )
    images = datasets.ImageFolder(str(folder), transform=recipe)
    loader = DataLoader(images, batch_size=64, num_workers=WORKERS)
    out = torch.empty((len(images), 3, size, size), dtype=torch.uint8)
    labels = torch.empty(len(images), dtype=torch.int64)
    at = 0
    for x, y in loader:
        out[at : at + len(y)], labels[at : at + len(y)] = x, y
        at += len(y)
    return time.perf_counter() - started


def speed(args) -> dict:
    work = Path(args.work)
    result = {"images": args.images, "workers": WORKERS, "photos": {}}
    for photo_size in args.photos:
        width, height = (int(side) for side in photo_size.split("x"))
        folder = work / f"photos-{photo_size}"
        write_photo_folder(folder, args.images, (width, height))
        size_bytes = warm(folder)
        found = result["photos"][photo_size] = {"mean_file_bytes": size_bytes / args.images, "sizes": {}}
        for size in args.sizes:
            found["sizes"][str(size)] = speed_at(work, folder, photo_size, size, args)
    return result


def speed_at(work: Path, folder: Path, photo_size: str, size: int, args) -> dict:
    """alexops prepare and torchvision taking turns on one folder, cache side `size` px."""
    loaded = folder_params("photos", folder, prepare={"image_size": size, "workers": WORKERS})
    project = work / f"project-speed-{photo_size}-{size}"
    fetch.run(loaded, Paths(project, "photos"))  # copies the folder into data/raw: not timed
    rounds = {"alexops": [], "torchvision": []}
    for _ in range(args.rounds):
        seconds, shape = ours(project, loaded)
        rounds["alexops"].append(args.images / seconds)
        rounds["torchvision"].append(args.images / torchvision_side(folder, size))
        print(f"{photo_size} photos, {size} px: alexops {rounds['alexops'][-1]:.0f} img/s ({tuple(shape)}), "
              f"torchvision {rounds['torchvision'][-1]:.0f} img/s")  # fmt: skip
    ratios = [a / b for a, b in zip(rounds["alexops"], rounds["torchvision"], strict=True)]
    return {
        "alexops_img_per_s": statistics.median(rounds["alexops"]),
        "torchvision_img_per_s": statistics.median(rounds["torchvision"]),
        "speedup": statistics.median(ratios),
        "speedup_by_round": ratios,
        "by_round": rounds,
    }


# ---- equivalence --------------------------------------------------------------------------------


def write_png_folders(folder: Path) -> None:
    from PIL import Image

    if (folder / ".complete").exists():
        return
    train_x, train_y, test_x, test_y = fashion_mnist()
    for split, images, labels in (("train", train_x, train_y), ("test", test_x, test_y)):
        for index, (image, label) in enumerate(zip(images[:, 0].numpy(), labels.tolist(), strict=True)):
            target = folder / split / class_folder(label) / f"{index:05d}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(target)
    (folder / ".complete").write_text("done")


def stage_command(project: Path, name: str) -> list[str]:
    """`alexops <name>` on a project root, as DVC would run it there."""
    root = ["--root", str(project), "--params", str(project / "params.yaml")]
    return [sys.executable, "-m", "alexops.cli", *root, name]


def stage(project: Path, name: str, env: dict) -> float:
    started = time.perf_counter()
    subprocess.run(stage_command(project, name), check=True, env=env)
    return time.perf_counter() - started


def equivalence(args) -> dict:
    import yaml

    work = Path(args.work)
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    base["train"]["epochs"] = args.epochs = args.epochs or base["train"]["epochs"]
    projects = {"idx": work / "eq-idx", "folder": work / "eq-folder"}
    for project in projects.values():
        shutil.rmtree(project, ignore_errors=True)
        project.mkdir(parents=True)
    (projects["idx"] / "params.yaml").write_text(yaml.safe_dump(base))
    folder = projects["folder"] / "datasets" / "fashion-mnist-png"
    started = time.perf_counter()
    write_png_folders(folder)
    write_seconds = time.perf_counter() - started
    declared = base | {"base": base["base"] | {"dataset": "fmpng"},
                       "datasets": {"fmpng": {"source": "datasets/fashion-mnist-png"}}}  # fmt: skip
    (projects["folder"] / "params.yaml").write_text(yaml.safe_dump(declared))
    result = {"epochs": args.epochs, "train_params": base["train"], "png_files": 70000}
    result |= {"png_write_seconds": write_seconds, "runs": {}}
    for kind, project in projects.items():
        env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{project}/mlflow.db")
        seconds = {name: stage(project, name, env) for name in ("fetch", "prepare")}
        result["runs"][kind] = {"seconds": seconds}
    result["arrays"] = compare_caches(projects)
    for kind, project in projects.items():
        env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{project}/mlflow.db")
        run = result["runs"][kind]
        run["seconds"] |= {name: stage(project, name, env) for name in ("train", "evaluate")}
        dataset = "fashion-mnist" if kind == "idx" else "fmpng"
        evaluation = json.loads((project / "reports" / dataset / "evaluate.json").read_text())
        history = json.loads((project / "reports" / dataset / "train.json").read_text())
        run |= {key: evaluation[key] for key in ("accuracy", "accuracy_center_crop", "accuracy_ten_crop")}
        run["val_accuracy"] = history["val_accuracy"]
        print(
            f"{kind}: test accuracy {run['accuracy']:.4f} (10-crop), {run['accuracy_center_crop']:.4f} centre"
        )
    result["accuracy_difference_points"] = 100 * (
        result["runs"]["folder"]["accuracy"] - result["runs"]["idx"]["accuracy"]
    )
    return result


def compare_caches(projects: dict[str, Path]) -> dict:
    """Image by image: the folder path's cache against the IDX path's, matched by file index."""
    found = {}
    for split in ("train", "test"):
        idx_images, idx_labels = prepare.load_split(
            projects["idx"] / "data/prepared/fashion-mnist" / f"{split}.pt"
        )
        folder_images, folder_labels = prepare.load_split(
            projects["folder"] / "data/prepared/fmpng" / f"{split}.pt"
        )
        source = json.loads((projects["folder"] / "data/raw/fmpng/source.json").read_text())
        names = sorted(n for n, _, _ in source["files"] if n.startswith(f"{split}/"))
        order = torch.tensor([int(Path(n).stem) for n in names])  # the IDX index each row came from
        found[split] = {
            "images": len(order),
            "pixels_identical": bool(torch.equal(torch.as_tensor(folder_images[:]), idx_images[order])),
            "labels_identical": bool(torch.equal(folder_labels, idx_labels[order])),
        }
        print(f"{split}: {found[split]}")
    stats = [json.loads((p / "data/prepared" / d / "stats.json").read_text())
             for p, d in ((projects["idx"], "fashion-mnist"), (projects["folder"], "fmpng"))]  # fmt: skip
    found["stats_equal"] = {k: stats[0][k] == stats[1][k] for k in ("mean", "std", "eigval", "image_shape")}
    return found


# ---- scale --------------------------------------------------------------------------------------


class MemorySampler:
    """Peak resident and anonymous memory of a process tree, sampled every 0.1 s.

    Anonymous memory is the sum of each process's Pss_Anon (/proc/<pid>/smaps_rollup): its
    private anonymous pages, and its share of those it shares copy-on-write with the processes
    forked from it, so the decoding pool does not count the stage's heap three times. The
    memory map's pages are file pages, in the resident figure only."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.root = psutil.Process(pid)
        self.peak_rss = self.peak_anon = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        import psutil

        while not self.stop.is_set():
            rss = anon = 0
            try:
                for process in [self.root, *self.root.children(recursive=True)]:
                    rss += process.memory_info().rss
                    anon += proportional_anonymous(process.pid)
            except (psutil.Error, OSError):
                pass
            self.peak_rss, self.peak_anon = max(self.peak_rss, rss), max(self.peak_anon, anon)
            self.stop.wait(0.1)

    def done(self) -> dict:
        self.stop.set()
        self.thread.join()
        return {"peak_rss_mib": self.peak_rss / 2**20, "peak_anonymous_mib": self.peak_anon / 2**20}


def proportional_anonymous(pid: int) -> int:
    """Bytes of Pss_Anon in /proc/<pid>/smaps_rollup (Linux ≥ 5.7)."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss_Anon:"):
            return int(line.split()[1]) * 1024
    raise OSError(f"no Pss_Anon in /proc/{pid}/smaps_rollup")


def measured_stage(project: Path, name: str, env: dict) -> dict:
    started = time.perf_counter()
    process = subprocess.Popen(stage_command(project, name), env=env)
    sampler = MemorySampler(process.pid)
    code = process.wait()
    memory = sampler.done()
    if code:
        raise SystemExit(f"{name} failed ({code})")
    return {"seconds": time.perf_counter() - started, **memory}


def scale(args) -> dict:
    import yaml

    work = Path(args.work)
    result = {"runs": {}, "memory_budget": args.budget}
    for count in args.images:
        project = work / f"scale-{count}"
        folder = project / "datasets" / "photos"
        write_photo_folder(folder, count, (256, 192))
        raw = yaml.safe_load((ROOT / "params.yaml").read_text())
        raw["base"]["dataset"] = "photos"
        raw["datasets"] = {"photos": {"source": "datasets/photos"}}
        raw["train"]["epochs"] = 1
        (project / "params.yaml").write_text(yaml.safe_dump(raw))
        env = dict(
            os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{project}/mlflow.db", ALEXOPS_DATA_MEMORY=args.budget
        )
        for path in ("data", "artifacts", "reports"):
            shutil.rmtree(project / path, ignore_errors=True)
        run = {name: measured_stage(project, name, env) for name in ("fetch", "prepare", "train")}
        cache_file = project / "data" / "prepared" / "photos" / cache.IMAGES
        run["cache_mib"] = cache_file.stat().st_size / 2**20
        run["cache_shape"] = list(np.load(cache_file, mmap_mode="r").shape)
        run["train_report"] = json.loads((project / "reports" / "photos" / "train.json").read_text())
        result["runs"][str(count)] = run
        print(f"{count} images: {json.dumps(run, indent=1)}")
    return result


# ---- stream -------------------------------------------------------------------------------------


def evict(path: Path) -> None:
    with open(path, "rb") as stream:
        os.posix_fadvise(stream.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def stream(args) -> dict:
    work = Path(args.work)
    folder = work / "photos-500x375"
    write_photo_folder(folder, args.images, (500, 375))
    loaded = folder_params("photos", folder, train={"image_size": 227, "width": 1.0, "batch_size": 128},
                           prepare={"workers": WORKERS})  # fmt: skip
    project = work / "project-stream"
    paths = Paths(project, "photos")
    if not (paths.prepared / "train.pt").exists():
        fetch.run(loaded, paths)
        prepare.run(loaded, paths)
    stats = json.loads((paths.prepared / "stats.json").read_text())
    os.environ[cache.MEMORY_ENV] = "1"  # every read goes to the memory map
    images, labels = prepare.load_split(paths.prepared / "train.pt")
    assert isinstance(images, cache.CachedImages)
    opts = loaded.train
    torch.manual_seed(0)
    session = train.build(opts, stats, torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    result = {"cache_shape": list(images.mapped.shape), "image_size": 227, "width": 1.0,
              "batch_size": opts.batch_size, "threads": torch.get_num_threads(), "modes": {}}  # fmt: skip

    def step(cold: bool) -> tuple[float, float, float]:
        if cold:
            evict(paths.prepared / cache.IMAGES)
        index = torch.randperm(len(labels), generator=generator)[: opts.batch_size]
        started = time.perf_counter()
        batch = images[index]
        gathered = time.perf_counter()
        x = augment.train_batch(batch, session.recipe, session.lighting, opts.flip, generator)
        x = x.contiguous(memory_format=torch.channels_last)
        augmented = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(session.model(x), labels[index])
        session.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        session.optimizer.step()
        return gathered - started, augmented - gathered, time.perf_counter() - started

    step(False)  # warm-up
    for mode in ("page cache", "evicted before every step"):
        timings = [step(mode != "page cache") for _ in range(args.steps)]
        read, aug, total = (sum(t[i] for t in timings) for i in range(3))
        result["modes"][mode] = {
            "read_seconds_per_step": read / args.steps,
            "augment_seconds_per_step": aug / args.steps,
            "step_seconds": total / args.steps,
            "data_share": (read + aug) / total,
            "read_share": read / total,
        }
        print(f"{mode}: {json.dumps(result['modes'][mode])}")
    return result


def synthetic_cache(path: Path, count: int, side: int) -> np.ndarray:
    """A memory-mapped cache file of `count` random 3×side×side uint8 images (flushed: in the page
    cache, clean), the layout prepare writes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mapped = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(count, 3, side, side))
    block = np.random.default_rng(0).integers(0, 256, (min(count, 256), 3, side, side), dtype=np.uint8)
    for start in range(0, count, len(block)):
        mapped[start : start + len(block)] = block[: count - start]
    mapped.flush()
    return np.load(path, mmap_mode="r")


def stream_loop(args) -> dict:
    """The training loop itself (train.train_epoch, the `paper` preset's step) on `args.device`: one
    epoch with the images streamed from a memory-mapped cache, one with them resident on the
    device, and the same number of steps on one fixed augmented batch (the model alone), in turns.
    The data share is the part of an epoch's time the model alone does not account for."""
    from alexops import presets

    device = torch.device(args.device)
    section = {k.removeprefix("train."): v for k, v in presets.overrides("paper").items()}
    section |= {"epochs": 1, "compile": args.compile, "image_size": args.image_size, "width": args.width}
    opts = params.from_dict({"train": section}).train
    side = augment.Recipe.create(opts.image_size, opts.resize_ratio, [0.5] * 3, [0.25] * 3).resize
    mapped = synthetic_cache(Path(args.work) / "stream-loop" / cache.IMAGES, args.images, side)
    labels = torch.randint(0, 10, (args.images,), generator=torch.Generator().manual_seed(0)).to(device)
    stats = {"mean": [0.5] * 3, "std": [0.25] * 3, "eigval": [0.1, 0.01, 0.001], "eigvec": np.eye(3).tolist(),
             "image_shape": [3, side, side], "classes": list("abcdefghij")}  # fmt: skip
    torch.manual_seed(0)
    session = train.build(opts, stats, device)
    model = torch.compile(session.model) if opts.compile else session.model
    streamed = cache.CachedImages(mapped, np.arange(args.images), device)
    resident = torch.from_numpy(np.array(mapped)).to(device)
    x, y = train.first_batch(session, resident, labels, opts, 0)
    steps = args.images // opts.batch_size
    amp = train.autocast_enabled(device, opts)

    def timed(run) -> float:
        sync_device(device)
        started = time.perf_counter()
        run()
        sync_device(device)
        return time.perf_counter() - started

    def epoch(images):
        return lambda: train.train_epoch(model, session, images, labels, opts, 1, 0, train.Progress())

    def model_alone():
        for i in range(steps):
            train.train_step(model, session, x, y, opts, amp, i)

    runs = {"streamed": epoch(streamed), "resident": epoch(resident), "model alone": model_alone}
    for run in runs.values():  # warm-up: compilation, cuDNN's choice of kernels, the page cache
        run()
    seconds = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            seconds[name].append(timed(run))
    median = {name: statistics.median(times) for name, times in seconds.items()}
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {WORKERS} cores",
        "torch": torch.__version__, "cache_shape": list(mapped.shape), "cache_gib": mapped.nbytes / 2**30,
        "image_size": opts.image_size, "width": opts.width, "batch_size": opts.batch_size, "amp": amp,
        "compile": opts.compile, "steps_per_epoch": steps, "read_ahead": cache.READ_AHEAD,
        "seconds_by_round": seconds,
        "img_per_s": {name: steps * opts.batch_size / t for name, t in median.items()},
        "data_share": {name: 1 - median["model alone"] / median[name] for name in ("streamed", "resident")},
    }  # fmt: skip
    print(json.dumps({k: result[k] for k in ("img_per_s", "data_share")}, indent=1))
    return result


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- main ---------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "alexops-bench-prepare"),
                        help="where the image folders and projects go (kept for reruns)")  # fmt: skip
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("speed")
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--sizes", type=int, nargs="+", default=[106, 256],
                   help="cache sides, px: the default cache (99 × 1.07) and the paper's 256")  # fmt: skip
    p.add_argument("--photos", nargs="+", default=["500x375", "1600x1200"],
                   help="photo sizes, WxH: ImageNet's typical photo, and a small camera's")  # fmt: skip
    p.add_argument("--rounds", type=int, default=5)
    p = sub.add_parser("equivalence")
    p.add_argument("--epochs", type=int, default=0, help="0: params.yaml's train.epochs (the default recipe)")
    p = sub.add_parser("scale")
    p.add_argument("--images", type=int, nargs="+", default=[10000, 100000])
    p.add_argument("--budget", default="1G", help="ALEXOPS_DATA_MEMORY for train: below the cache's size")
    p = sub.add_parser("stream")
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--steps", type=int, default=3)
    p = sub.add_parser("stream-loop")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--images", type=int, default=20000, help="in the synthetic cache (20,000: 3.7 GiB)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--image-size", type=int, default=227)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--compile", action="store_true")
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/prepare-<mode>.json")
    args = parser.parse_args()
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": f"{platform.processor() or platform.machine()}, {WORKERS} cores",
        "date": time.strftime("%Y-%m-%d"),
        **{"speed": speed, "equivalence": equivalence, "scale": scale, "stream": stream,
           "stream-loop": stream_loop}[args.mode](args),
    }  # fmt: skip
    out = args.out or RESULTS / f"prepare-{args.mode}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
