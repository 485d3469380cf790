"""Stage `train`: AlexNet with SGD on the uint8 cache, augmented per batch on the device.

A checkpoint is written after every epoch and deleted when training finishes and is recorded; a
rerun with the same params and data resumes from it (the crash case) instead of starting over. An
MLflow server that is down mid-training does not stop it: the epochs' metrics wait for it
(`tracking.EpochMetrics`). The whole dataset lives on the training device as uint8 (47 MB for
Fashion-MNIST), so there is no DataLoader; a cache beyond the memory budget is read from its memory
map a few batches ahead of the step (`cache.batches`).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import ctypes
import functools
import hashlib
import io
import json
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from humanize import naturalsize

from alexops import augment, distributed, figures, files, lrn, tracking
from alexops import model as model_module
from alexops import progress as progress_line
from alexops.cache import MEMORY_ENV, CachedImages, batches, memory_budget, take
from alexops.errors import AlexopsError
from alexops.evaluate import predict_probabilities
from alexops.model import AlexNet, count_parameters, pick_device
from alexops.params import Params, TrainParams
from alexops.paths import Paths
from alexops.prepare import load_split

HISTORY_FIELDS = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "seconds")


@dataclass
class PlateauState:
    """Paper §6: divide the learning rate by 10 when validation error stops improving."""

    best_error: float = math.inf
    bad_epochs: int = 0
    scale: float = 1.0
    patience: int = 1

    def update(self, error: float) -> None:
        if error < self.best_error - 1e-4:
            self.best_error, self.bad_epochs = error, 0
            return
        self.bad_epochs += 1
        if self.bad_epochs > self.patience:
            self.scale, self.bad_epochs = self.scale / 10, 0


@dataclass
class Progress:
    epoch: int = 0
    history: list[dict] = field(default_factory=list)
    plateau: PlateauState = field(default_factory=PlateauState)


def lr_at(opts: TrainParams, step: int, total: int, plateau_scale: float) -> float:
    """Learning rate for a global step: linear warm-up, then the schedule's shape."""
    warmup = min(total - 1, round(opts.warmup_epochs * total / opts.epochs))
    if opts.schedule == "onecycle":
        # one-cycle (Smith 2018): ramp from lr/25 over 30% of training, cosine down to ~0
        warmup = max(warmup, round(0.3 * total))
        if step < warmup:
            return opts.lr * (1 / 25 + (1 - 1 / 25) * step / warmup)
    elif step < warmup:
        return opts.lr * (step + 1) / warmup
    if opts.schedule == "plateau":
        return opts.lr * plateau_scale
    if opts.schedule == "constant":
        return opts.lr
    progress = (step - warmup) / max(1, total - warmup)
    return opts.lr * 0.5 * (1 + math.cos(math.pi * progress))


def fingerprint(params: Params, paths: Paths) -> str:
    """What a checkpoint must match to be resumed: the train params, seed and data."""
    blob = json.dumps({"train": asdict(params.train), "seed": params.base.seed}, sort_keys=True)
    data = files.sha256_file(paths.prepared / "train.pt")
    # the code that shapes the weights: a changed model or loop must not resume old weights
    code = "".join(files.sha256_file(Path(module.__file__)) for module in (augment, lrn, model_module))
    return hashlib.sha256(f"{blob}{data}{code}{files.sha256_file(Path(__file__))}".encode()).hexdigest()


@dataclass
class Session:
    """One training run's model, optimiser and data recipe, on its device."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    recipe: augment.Recipe
    lighting: augment.Lighting
    config: dict
    device: torch.device
    world: distributed.World = distributed.ALONE
    # an exponential moving average of the weights (train.ema_decay > 0), else None
    average: WeightAverage | None = None

    @property
    def trained(self) -> torch.nn.Module:
        """The weights that are validated and shipped: the average when there is one."""
        return self.average.module if self.average is not None else self.model


# mallopt(3) parameters, from glibc's <malloc.h>
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


@functools.cache
def keep_freed_memory() -> bool:
    """Have glibc's malloc keep the memory a CPU training step frees, for the next step.

    A step allocates and frees its activations and gradients, megabytes each (conv1's output
    for 128 images at 99 px: 6.5 MB). glibc's defaults serve blocks that large with a fresh
    mmap(2) (from M_MMAP_THRESHOLD, 128 KiB rising to 32 MiB) and give freed memory at the
    heap's top back to the kernel (M_TRIM_THRESHOLD, 128 KiB), so each step writes to new
    pages, every 4 KiB of them a page fault. With no mmap'd blocks (M_MMAP_MAX 0) and no
    trimming, a step reuses the pages of the one before: the default model's step measured
    ×1.10 faster on 2 cores (rounds ×1.09–1.14), the paper-size one's ×1.17 (×1.07–1.19)
    (`benchmarks/bench_heap.py`), with the same bits. The cost: the process keeps its peak heap
    until it exits (the paper-size model's peak resident set grew by 13%).

    Linux with glibc only (mallopt(3)); elsewhere nothing changes. Once per process; returns
    whether the settings took.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)  # the C library this process already runs on
    return libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1


def build(
    opts: TrainParams, stats: dict, device: torch.device, world: distributed.World = distributed.ALONE
) -> Session:
    """AlexNet, SGD and the augmentation recipe from the train params and data statistics;
    on a CPU, the process's malloc set up for training (`keep_freed_memory`)."""
    if device.type == "cpu":
        keep_freed_memory()
    recipe = augment.Recipe.create(opts.image_size, opts.resize_ratio, stats["mean"], stats["std"])
    lighting = augment.Lighting(
        torch.tensor(stats["eigval"], dtype=torch.float32, device=device),
        torch.tensor(stats["eigvec"], dtype=torch.float32, device=device),
        opts.lighting_std,
    )
    config = {
        "in_channels": stats["image_shape"][0],
        "num_classes": len(stats["classes"]),
        "image_size": opts.image_size,
        "width": opts.width,
        "dropout": opts.dropout,
    }
    model = AlexNet(**config, init=opts.init).to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick kernels
    if opts.channels_last:  # faster on both: measured +16% (227 px) to +30% (99 px) on a 2-core CPU
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=opts.lr, momentum=opts.momentum, weight_decay=opts.weight_decay
    )
    average = None
    if opts.ema_decay > 0:  # AlexNet has no buffers (no batch norm): averaging the parameters is all
        average = WeightAverage(model, ema_with_warmup(opts.ema_decay, EMA_EVERY))
    return Session(model, optimizer, recipe, lighting, config, device, world, average)


def augmented(session: Session, images: torch.Tensor, opts: TrainParams, generator) -> torch.Tensor:
    """A uint8 batch on the device → the augmented float batch the model trains on."""
    x = augment.train_batch(images, session.recipe, session.lighting, opts.flip, generator, opts.erasing)
    return x.contiguous(memory_format=torch.channels_last) if opts.channels_last else x


# An update of the weight average reads and writes every weight (18 MB at the CPU default, 0.7 GB
# at the paper's size): every 4th step costs a quarter of that, with the decay compounded to match.
EMA_EVERY = 4


class WeightAverage(torch.nn.Module):
    """An average of a model's parameters, kept in `module`, updated by `update_parameters`:
    the first call copies them, call n ≥ 1 runs `update(averaged, current, n)` on the lists.

    torch.optim.swa_utils.AveragedModel does the same but copies its count to the GPU at every
    update, a copy from pageable memory that waits for the GPU to finish its queue; here the
    count stays on the CPU and reaches `update` as an int. Its state_dict is AveragedModel's:
    `module.*` and `n_averaged`, so checkpoints of either read back into the other.
    """

    def __init__(self, model: torch.nn.Module, update):
        super().__init__()
        self.module = copy.deepcopy(model)
        self.register_buffer("n_averaged", torch.tensor(0, dtype=torch.long))  # on the CPU
        self.update = update

    @torch.no_grad()
    def update_parameters(self, model: torch.nn.Module) -> None:
        averaged = [p.detach() for p in self.module.parameters()]
        current = [p.detach() for p in model.parameters()]
        count = int(self.n_averaged)
        if count == 0:
            torch._foreach_copy_(averaged, current)
        else:
            self.update(averaged, current, count)
        self.n_averaged += 1


def ema_with_warmup(decay: float, every: int):
    """The weight average's update (WeightAverage's `update`), with TensorFlow's warm-up.

    At training step s the per-step decay is min(decay, (1 + s) / (10 + s)), the schedule of
    tf.train.ExponentialMovingAverage with `num_updates`: early on the average covers about the
    last tenth of the run, so a short run ships trained weights, not an average still close to
    the initial ones (0.999 per step needs thousands of steps). Updates come every `every` steps
    with the per-step decay compounded; from step 8,990 on (decay 0.999) it is the plain EMA.
    """

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: int):
        step = int(num_averaged) * every  # update n is made at step n × every (update 0 copies)
        per_step = min(decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(averaged, current, 1 - per_step**every)

    return update


def train_step(
    model, session: Session, x: torch.Tensor, y: torch.Tensor, opts: TrainParams, amp: bool, index: int = 0
):
    """SGD step number `index` (counted over the whole run) on an augmented batch, and the
    weight average's update every EMA_EVERY steps; returns (loss, logits)."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        logits = model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=opts.label_smoothing)
    session.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    session.optimizer.step()
    if session.average is not None and index % EMA_EVERY == 0:
        session.average.update_parameters(session.model)
    return loss, logits


def fit(
    session: Session,
    data: tuple[torch.Tensor, ...],
    opts: TrainParams,
    seed: int,
    eval_batch: int,
    progress: Progress,
    on_epoch=lambda progress: None,
) -> Progress:
    """Train from `progress.epoch` to opts.epochs; `on_epoch` saves and logs after each."""
    train_x, train_y, val_x, val_y = data
    train_x, train_y = train_x.to(session.device), train_y.to(session.device)
    step_model = distributed.wrap(session.model, session.world, session.device)
    step_model = torch.compile(step_model) if opts.compile else step_model
    for epoch in range(progress.epoch + 1, opts.epochs + 1):
        started = time.perf_counter()
        loss, acc, lr = train_epoch(step_model, session, train_x, train_y, opts, epoch, seed, progress)
        val_loss, val_acc = validate(session, val_x, val_y, eval_batch)
        if opts.schedule == "plateau" and len(val_y):
            progress.plateau.update(1 - val_acc)
        row = (epoch, loss, acc, val_loss, val_acc, lr, time.perf_counter() - started)
        progress.history.append(dict(zip(HISTORY_FIELDS, row, strict=True)))
        progress.epoch = epoch
        if session.world.is_main:
            print(progress_line.format_epoch(progress.history, opts.epochs), flush=True)
            on_epoch(progress)
    return progress


def run(params: Params, paths: Paths) -> None:
    opts = params.train
    world = distributed.from_env()
    if opts.batch_size % world.size:
        raise AlexopsError(
            f"train.batch_size ({opts.batch_size}) must divide evenly over {world.size} processes. "
            "Fix: a multiple of --nproc-per-node."
        )
    device = distributed.start(world, pick_device(params.base.device))
    try:
        train_on(params, paths, device, world)
    finally:
        distributed.stop(world)


def train_on(params: Params, paths: Paths, device: torch.device, world: distributed.World) -> None:
    opts = params.train
    torch.manual_seed(params.base.seed)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
        # which also NaN-fills every new tensor, a check for reads of uninitialised memory: this
        # code makes none (the weights come out bit-identical without it), and it cost ~5% of a step
        torch.utils.deterministic.fill_uninitialized_memory = False
    stats = files.read_json(paths.prepared / "stats.json", produced_by="prepare")
    data = split_validation(paths, opts.val_size, params.base.seed)
    session = build(opts, stats, device, world)
    expected = fingerprint(params, paths)
    progress, run_id = resume(paths, expected, session)
    if world.is_main:
        print(
            f"train: AlexNet {count_parameters(session.model) / 1e6:.2f} M parameters on {device} "
            f"× {world.size} process(es), {len(data[1])} train / {len(data[3])} val images "
            f"at {opts.image_size} px{', bf16 autocast' if autocast_enabled(device, opts) else ''}"
        )
        if isinstance(data[0], CachedImages):
            images, budget = (naturalsize(n, binary=True) for n in (data[0].nbytes, memory_budget()))
            print(
                f"train: the training images ({images}) exceed the data memory budget ({budget}, "
                f"{MEMORY_ENV}): each batch is read from the memory map, two batches ahead; the weights "
                "are the same as in memory"
            )
    patience_s = tracking.patience_s()  # read now: a mistyped value stops the stage before any run
    # rank 0 alone talks to MLflow and writes files; the others only train
    tracked = tracking.new_run(params, paths, run_id) if world.is_main else contextlib.nullcontext()
    with tracked as mlflow:
        sent = tracking.EpochMetrics(mlflow, progress.history, patience_s) if world.is_main else None

        def after_epoch(progress: Progress) -> None:
            # the epoch's weights are on disk before anything that may fail with the network
            save_checkpoint(paths, session, progress, expected, mlflow.active_run().info.run_id)
            sent.add(progress.history[-1])

        if world.is_main:  # look before you train: the inputs and the model, before the first step
            for name in write_previews(paths, session, data, opts, params.base.seed, stats["classes"]):
                mlflow.log_artifact(str(paths.reports / name), artifact_path="train")
        fit(session, data, opts, params.base.seed, params.evaluate.batch_size, progress, after_epoch)
        if not distributed.weights_agree(session.model, world):
            raise AlexopsError(
                "DDP ranks ended with different weights; nothing was written. Please report it."
            )
        if world.is_main:
            if world.size > 1:
                print(f"train: weights identical on all {world.size} ranks")
            sent.flush(paths.checkpoint)
            write_outputs(paths, session, stats, progress)
            log_parameter_count(mlflow, count_parameters(session.model))
            for name in ("train.json", "train_history.csv", "curves.png"):
                mlflow.log_artifact(str(paths.reports / name), artifact_path="train")
            # finished and recorded: a forced rerun trains afresh (until then, a rerun resumes)
            paths.checkpoint.unlink(missing_ok=True)


def log_parameter_count(mlflow, count: int) -> None:
    """The model's size as the run's `parameters` metric, once: a rerun that resumes a run which
    already logged it (a late failure, after training) adds no second point."""
    if "parameters" in mlflow.get_run(mlflow.active_run().info.run_id).data.metrics:
        return
    with tracking.store_write(mlflow):
        mlflow.log_metrics({"parameters": count})


def split_validation(paths: Paths, val_size: int, seed: int):
    images, labels = load_split(paths.prepared / "train.pt")
    if val_size >= len(labels):
        raise AlexopsError(
            f"train.val_size ({val_size}) leaves no training images out of {len(labels)}. "
            f"Fix: lower train.val_size (a tenth of the images: {max(1, len(labels) // 10)}), or raise "
            "prepare.max_train if it is set."
        )
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    val, train = order[:val_size], order[val_size:]
    # a cache too large for memory stays memory-mapped, and batches are read from it as indexed
    return take(images, train), labels[train], take(images, val), labels[val]


def epoch_draws(n: int, seed: int, epoch: int, world: distributed.World, device: torch.device):
    """(this rank's share of the epoch's order, the generator of its augmentation draws)."""
    generator = torch.Generator(device=device).manual_seed(seed * 1000 + epoch)
    # every rank draws the same order and trains on its own slice of it (DDP sharding)
    order = torch.randperm(n, device=device, generator=generator)[world.rank :: world.size]
    if world.size > 1:  # and its own augmentation draws
        generator = torch.Generator(device=device).manual_seed(seed * 1000 + epoch + 7919 * world.rank)
    return order, generator


def first_batch(session: Session, images, labels, opts: TrainParams, seed: int):
    """The first training batch of epoch 1 exactly as the model gets it: (augmented images, labels).

    The same draws as train_epoch's, from fresh generators, so training itself is not disturbed."""
    device = session.device
    order, generator = epoch_draws(len(labels), seed, 1, session.world, device)
    index = order[: opts.batch_size // session.world.size]
    return augmented(session, images.to(device)[index], opts, generator), labels.to(device)[index]


def train_epoch(model, session: Session, images, labels, opts: TrainParams, epoch, seed, progress):
    """One pass in a seeded order; seeds derive from (seed, epoch) so a resume repeats it."""
    model.train()
    optimizer = session.optimizer
    device, world = images.device, session.world
    order, generator = epoch_draws(len(labels), seed, epoch, world, device)
    batch_size = opts.batch_size // world.size
    steps = len(labels) // world.size // batch_size or 1
    total_steps = steps * opts.epochs
    amp = autocast_enabled(device, opts)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    desc = f"epoch {epoch}/{opts.epochs}"
    bar = progress_line.bar(range(steps), desc=desc, unit="batch", disable=not world.is_main)
    started = time.perf_counter()
    for step, images_of_batch in zip(bar, batches(images, order, batch_size, steps), strict=True):
        index = (epoch - 1) * steps + step
        lr = lr_at(opts, index, total_steps, progress.plateau.scale)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = order[step * batch_size : (step + 1) * batch_size]
        x, y = augmented(session, images_of_batch, opts, generator), labels[batch]
        loss, logits = train_step(model, session, x, y, opts, amp, index)
        loss_sum += loss.detach() * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
        # reading the loss waits for the GPU, so check for divergence every 20 steps only;
        # nothing of this epoch is saved before the check at its last step
        if step % 20 == 0 or step == steps - 1:
            if not torch.isfinite(loss_sum):
                raise AlexopsError(
                    f"training diverged: the loss became {loss.item()} at epoch {epoch}, by step "
                    f"{step + 1}. Fix: lower train.lr (now {opts.lr}) or add train.warmup_epochs; "
                    "nothing was saved, exported or registered."
                )
            img_s = seen * world.size / (time.perf_counter() - started)
            bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{img_s:.0f}")
    sums = distributed.total(
        torch.stack([loss_sum, correct.to(loss_sum.dtype), loss_sum.new_tensor(seen)]), world
    )
    loss_total, correct_total, seen_total = sums.tolist()
    return loss_total / seen_total, correct_total / seen_total, lr


@torch.no_grad()
def validate(session: Session, images, labels, batch_size: int) -> tuple[float, float]:
    if len(labels) == 0:
        return math.nan, math.nan
    probs = predict_probabilities(
        session.trained, images, session.recipe, batch_size, session.device, ten_crop=False
    )
    loss = F.nll_loss(probs.clamp_min(1e-12).log(), labels).item()
    return loss, (probs.argmax(1) == labels).float().mean().item()


def resume(paths: Paths, expected: str, session: Session) -> tuple[Progress, str | None]:
    """Continue from the last checkpoint when it belongs to this very run's params and data."""
    if not paths.checkpoint.exists():
        return Progress(), None
    try:
        state = torch.load(paths.checkpoint, map_location="cpu", weights_only=True)
    except Exception as exc:
        print(f"train: ignoring unreadable checkpoint {paths.checkpoint} ({exc.__class__.__name__})")
        return Progress(), None
    if state.get("fingerprint") != expected:
        print("train: checkpoint is from other params or data; starting afresh")
        return Progress(), None
    try:
        session.model.load_state_dict(state["model"])
        session.optimizer.load_state_dict(state["optimizer"])
        if session.average is not None:
            session.average.load_state_dict(state["average"])
    except (RuntimeError, ValueError, KeyError) as exc:
        print(f"train: checkpoint does not fit this model ({exc.__class__.__name__}); starting afresh")
        return Progress(), None
    torch.set_rng_state(state["rng_cpu"])
    progress = Progress(
        state["epoch"], json.loads(state["history"]), PlateauState(**json.loads(state["plateau"]))
    )
    print(f"train: resuming after epoch {progress.epoch} from {paths.checkpoint}")
    return progress, state["run_id"]


def save_checkpoint(paths: Paths, session: Session, progress: Progress, fp: str, run_id: str) -> None:
    state = {
        "model": session.model.state_dict(),
        "optimizer": session.optimizer.state_dict(),
        "epoch": progress.epoch,
        "history": json.dumps(progress.history),
        "plateau": json.dumps(asdict(progress.plateau)),
        "rng_cpu": torch.get_rng_state(),
        "fingerprint": fp,
        **({"average": session.average.state_dict()} if session.average is not None else {}),
        "run_id": run_id,
    }
    files.save_torch(paths.checkpoint, state)


def write_outputs(paths: Paths, session: Session, stats: dict, progress: Progress) -> None:
    model = session.trained
    trained = {
        "config": json.dumps(session.config),
        "recipe": json.dumps(session.recipe.as_dict()),
        "classes": json.dumps(stats["classes"]),
        "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
    }
    files.save_torch(paths.model, trained)
    last = progress.history[-1]
    summary = {
        "epochs": last["epoch"],
        "train_loss": last["train_loss"],
        "train_accuracy": last["train_accuracy"],
        "val_accuracy": None if math.isnan(last["val_accuracy"]) else last["val_accuracy"],
        "train_seconds": sum(row["seconds"] for row in progress.history),
        "parameters": count_parameters(model),
    }
    files.write_json(paths.reports / "train.json", summary)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=HISTORY_FIELDS)
    writer.writeheader()
    writer.writerows(progress.history)
    files.write_text(paths.reports / "train_history.csv", buffer.getvalue())
    files.write_bytes(paths.reports / "curves.png", curves_png(progress.history))


PREVIEWS = ("augmented.png", "model_summary.txt", "model_summary.png")


def write_previews(paths: Paths, session: Session, data, opts: TrainParams, seed: int, classes) -> tuple:
    """The first augmented training batch as a labelled grid and the model's layer table
    (text and image); returns their file names under reports/."""
    batch, labels = first_batch(session, data[0], data[1], opts, seed)
    grid = figures.augmented_grid(batch, labels, classes, session.recipe)
    channels = session.config["in_channels"]
    table = model_module.summary_text(
        model_module.layer_summary(session.model, channels), channels, opts.image_size
    )
    title = f"AlexNet at {opts.image_size} px, width {opts.width:g}: one image's forward pass"
    files.write_bytes(paths.reports / PREVIEWS[0], grid)
    files.write_text(paths.reports / PREVIEWS[1], table)
    files.write_bytes(paths.reports / PREVIEWS[2], figures.table_png(table, title))
    return PREVIEWS


def autocast_enabled(device: torch.device, opts: TrainParams) -> bool:
    """bf16 autocast where the hardware computes in bf16: CUDA, or a CPU with AVX512-BF16/AMX."""
    if not opts.amp:
        return False
    if device.type == "cuda":
        return True
    try:  # a private oneDNN probe; without it, bf16 on the CPU would be emulated and slower
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def curves_png(history: list[dict]) -> bytes:
    """Loss and accuracy per epoch, train beside validation: the run at a glance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
        for split in ("train", "val"):
            values = [row[f"{split}_{metric}"] for row in history]
            if not all(math.isnan(v) for v in values):  # no val line when train.val_size is 0
                ax.plot(epochs, values, marker="o", label=split)
        ax.set(xlabel="epoch", ylabel=metric, title=metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()
