"""The prepared uint8 cache: every decoded image in one memory-mapped file, the splits as rows of it.

`data/prepared/<dataset>/` holds

- `images.npy`: uint8 (N, C, S, S), the decoded images (NumPy's .npy format, so it maps into
  memory as it is: a page is read when a batch touches it);
- `train.pt`, `test.pt`: per split the rows of `images.npy` it uses and their labels (int64), and
  the SHA-256 of `images.npy`, so that a split's file changes whenever its pixels do (train's
  resume fingerprint hashes it);
- `stats.json`: classes, capture recipe, per-channel mean/std, the channel covariance's eigen-
  decomposition (PCA lighting).

`load_split` gives a split's images as a tensor when they fit the memory budget (the whole
Fashion-MNIST: 47 MB), and otherwise as `CachedImages`, which reads one batch at a time from
the memory map; `take` makes the same choice for a subset (train's validation split).
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from alexops import files
from alexops.errors import AlexopsError

IMAGES = "images.npy"
MEMORY_ENV = "ALEXOPS_DATA_MEMORY"  # bytes the data may take in memory, e.g. 2G; default: half the free RAM
CHUNK_BYTES = 64 << 20  # reads and writes of the cache go in chunks this large
READ_AHEAD = 2  # batches read ahead of training from a streamed cache (cache.batches)


# ---- writing ------------------------------------------------------------------------------------


@dataclass
class NewImages:
    """An images file being written: a temporary .npy beside its target, its space reserved, so
    that a full disk is an error now rather than a crash (SIGBUS) when a page is written later."""

    target: Path
    path: Path
    shape: tuple[int, ...]

    @classmethod
    def create(cls, target: Path, shape: tuple[int, ...]) -> NewImages:
        header = _npy_header(shape)
        path = None
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
            path = Path(name)
            with open(fd, "wb") as stream:
                stream.write(header)
                stream.flush()
                size = len(header) + int(np.prod(shape))
                if size > len(header):
                    os.posix_fallocate(stream.fileno(), 0, size)
        except OSError as exc:
            if path is not None:
                path.unlink(missing_ok=True)
            raise cannot_write(target, exc) from exc
        os.chmod(path, 0o644)  # mkstemp's 0600 would keep other users (a server) out
        return cls(target, path, tuple(shape))

    def array(self) -> np.ndarray:
        return np.load(self.path, mmap_mode="r+")

    def commit(self) -> str:
        """Rename into place, synced to disk; the SHA-256 of the file's bytes."""
        try:
            # The disk writes while the hash reads the page cache: both release the GIL.
            with ThreadPoolExecutor(1) as pool:
                synced = pool.submit(_fsync, self.path)
                digest = files.sha256_file(self.path)
                synced.result()
            os.replace(self.path, self.target)
        except OSError as exc:
            raise cannot_write(self.target, exc) from exc
        finally:
            self.path.unlink(missing_ok=True)
        return digest

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    with open(path, "rb+") as stream:
        os.fsync(stream.fileno())


def _npy_header(shape: tuple[int, ...]) -> bytes:
    import io

    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": "|u1", "fortran_order": False, "shape": tuple(int(s) for s in shape)}
    )
    return buffer.getvalue()


def cannot_write(target: Path, exc: OSError) -> AlexopsError:
    return AlexopsError(
        f"cannot write {target}: {exc.strerror or exc}. "
        "Fix: check free disk space and permissions; nothing was overwritten."
    )


def write_split(target: Path, rows: np.ndarray, labels: np.ndarray, images_sha256: str) -> None:
    """A split's file: its rows of images.npy, their labels, and the images' digest."""
    files.save_torch(
        target,
        {
            "rows": torch.from_numpy(np.asarray(rows, dtype=np.int64)),
            "labels": torch.from_numpy(np.asarray(labels, dtype=np.int64)),
            "images": IMAGES,
            "images_sha256": images_sha256,
        },
    )


# ---- reading ------------------------------------------------------------------------------------


def load_split(path) -> tuple[torch.Tensor | CachedImages, torch.Tensor]:
    """A split's images (N, C, S, S) uint8 and labels (N,) int64.

    The images are a tensor when they fit in `memory_budget()` (mapped, not copied, when the
    split's rows are consecutive), else `CachedImages`. Raises AlexopsError for a missing or
    unreadable cache, naming `dvc repro -f prepare` as the fix.
    """
    path = Path(path)
    try:
        blob = torch.load(path, weights_only=True)
        rows, labels = blob["rows"].numpy(), blob["labels"]
        mapped = np.load(path.with_name(blob["images"]), mmap_mode="c")  # copy-on-write: never written
        if len(rows) and (rows.min() < 0 or rows.max() >= len(mapped)):
            raise ValueError(f"rows beyond the {len(mapped)} images")
    except FileNotFoundError as exc:
        raise AlexopsError(f"{exc.filename or path} is missing. Fix: run `dvc repro prepare` first.") from exc
    except Exception as exc:  # a truncated or foreign file: torch and numpy raise several kinds
        raise AlexopsError(
            f"{path} is not a readable prepared split ({exc.__class__.__name__}). "
            "Fix: `dvc repro -f prepare`."
        ) from exc
    return take(CachedImages(mapped, rows), torch.arange(len(rows))), labels


@dataclass
class CachedImages:
    """uint8 images (N, C, S, S): rows of a memory-mapped images file, read when indexed.

    Indexing (an int, a slice, an index tensor or array) reads those images, in file order for
    locality, and returns them as a tensor on `device`; `to(device)` names where batches go
    (pinned host memory, then a non-blocking copy, for CUDA). What a training loop needs of a
    tensor of images: len, shape, dtype, device, indexing, to.
    """

    mapped: np.ndarray
    rows: np.ndarray
    device: torch.device = torch.device("cpu")

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.rows), *self.mapped.shape[1:]))

    @property
    def dtype(self) -> torch.dtype:
        return torch.uint8

    @property
    def nbytes(self) -> int:
        return len(self.rows) * int(np.prod(self.mapped.shape[1:]))

    def to(self, device, non_blocking: bool = False) -> CachedImages:
        return CachedImages(self.mapped, self.rows, torch.device(device))

    def subset(self, index) -> CachedImages:
        return CachedImages(self.mapped, self.rows[_numpy_index(index)], self.device)

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, int):
            return self[[index]][0]
        if isinstance(index, slice) and (index.step or 1) == 1:
            start, stop, _ = index.indices(len(self.rows))
            return self._read(self.rows[start:stop])
        return self._read(self.rows[_numpy_index(index)])

    def materialize(self) -> torch.Tensor:
        return self[:]

    def _read(self, rows: np.ndarray) -> torch.Tensor:
        """The images of `rows` on `self.device`, read from the map in file order (pages read once,
        forwards) into host memory, pinned for CUDA so that the copy to the device does not block."""
        host = torch.empty(
            (len(rows), *self.mapped.shape[1:]), dtype=torch.uint8, pin_memory=self.device.type == "cuda"
        )
        batch = host.numpy()
        if len(rows) and rows[-1] - rows[0] == len(rows) - 1 and (np.diff(rows) == 1).all():
            batch[:] = self.mapped[rows[0] : rows[-1] + 1]  # one sequential read
        else:
            order = np.argsort(rows, kind="stable")
            batch[order] = self.mapped[rows[order]]
        return host.to(self.device, non_blocking=True)


def _numpy_index(index) -> np.ndarray | slice:
    if isinstance(index, torch.Tensor):
        return index.cpu().numpy()
    return index if isinstance(index, slice) else np.asarray(index)


def take(images: torch.Tensor | CachedImages, index: torch.Tensor) -> torch.Tensor | CachedImages:
    """images[index]: a tensor when it fits in `memory_budget()` (as before streaming existed),
    else the rows to read batch by batch (`CachedImages`)."""
    if not isinstance(images, CachedImages):
        return images[index]
    chosen = images.subset(index)
    if chosen.nbytes > memory_budget():
        return chosen
    rows = chosen.rows
    if len(rows) and rows[-1] - rows[0] == len(rows) - 1 and (np.diff(rows) == 1).all():
        # consecutive rows: the map itself, read on first touch, shared with the page cache
        return torch.from_numpy(chosen.mapped[rows[0] : rows[-1] + 1])
    return chosen.materialize()


def batches(images: torch.Tensor | CachedImages, order: torch.Tensor, batch_size: int, steps: int):
    """images[order[i·batch_size : (i+1)·batch_size]] for i in range(steps), on the images' device.

    A tensor is indexed as it is. `CachedImages` are read READ_AHEAD batches ahead on threads
    while the caller trains on the current one, so that the reads from the map (and, for CUDA,
    the copies to the device, on a side stream) overlap the steps before instead of stalling them.
    """
    if not isinstance(images, CachedImages):
        yield from (images[order[i * batch_size : (i + 1) * batch_size]] for i in range(steps))
        return
    rows = order.cpu().numpy()  # copied once per epoch, not once per step
    cuda = images.device.type == "cuda"
    side = [torch.cuda.Stream(images.device) for _ in range(READ_AHEAD)] if cuda else [None] * READ_AHEAD

    def read(i: int):
        with torch.cuda.stream(side[i % READ_AHEAD]) if cuda else contextlib.nullcontext():
            batch = images[rows[i * batch_size : (i + 1) * batch_size]]
            return batch, side[i % READ_AHEAD].record_event() if cuda else None

    with ThreadPoolExecutor(READ_AHEAD, thread_name_prefix="alexops-read") as reader:
        pending = deque(reader.submit(read, i) for i in range(min(READ_AHEAD, steps)))
        for i in range(steps):
            batch, copied = pending.popleft().result()
            if i + READ_AHEAD < steps:
                pending.append(reader.submit(read, i + READ_AHEAD))
            if cuda:  # the step waits for its batch's copy; the allocator learns who uses the memory
                current = torch.cuda.current_stream(images.device)
                current.wait_event(copied)
                batch.record_stream(current)
            yield batch


def memory_budget() -> int:
    """Bytes of images that may be held in memory (and on the GPU, when there is one): ALEXOPS_DATA_MEMORY
    (a number of bytes, optionally with K, M, G or T), else half of the available RAM and GPU memory."""
    given = os.environ.get(MEMORY_ENV, "").strip()
    if given:
        match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?", given, re.IGNORECASE)
        if not match:
            raise AlexopsError(
                f"{MEMORY_ENV}={given!r} is not a size. Fix: a number of bytes, e.g. 2G or 500M."
            )
        scale = 1024 ** " KMGT".index((match[2] or " ").upper())
        return int(float(match[1]) * scale)
    budget = available_ram() // 2
    if torch.cuda.is_available():
        budget = min(budget, torch.cuda.mem_get_info()[0] // 2)
    return budget


def available_ram() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


# ---- statistics ---------------------------------------------------------------------------------


def channel_statistics(images: np.ndarray, rows: np.ndarray, moments: np.ndarray | None = None) -> dict:
    """Mean, std and covariance eigen-decomposition of the pixel values, scaled to [0, 1], of
    `images[rows]` ((N, C, H, W) uint8), read in chunks: memory stays flat however large N is.
    `moments`, when given, holds every image's `pixel_moments` ((N, C + C²) int64, computed
    while decoding): then the rows' moments are summed and no pixel is read again.

    The channel sums and cross-product sums are exact (integers), so the covariance
    `(n·Σxy − Σx·Σy) / (n(n−1))` has no rounding but the last division. PCA lighting
    (paper §4.1) uses the eigen-decomposition.
    """
    channels = images.shape[1]
    rows = np.sort(np.asarray(rows, dtype=np.int64))
    n = len(rows) * int(np.prod(images.shape[2:]))
    if n == 0:
        raise AlexopsError("prepare: no training images are left. Fix: check the dataset's source.")
    if moments is None:
        per_chunk = max(1, CHUNK_BYTES // (8 * max(1, int(np.prod(images.shape[1:])))))  # 8: float64
        totals = sum((pixel_moments(chunk) for chunk in _chunks(images, rows, per_chunk)), start=0)
    else:
        totals = moments[rows].sum(axis=0)
    sums = [int(total) for total in totals[:channels]]
    products = [[int(totals[channels + c * channels + d]) for d in range(channels)] for c in range(channels)]
    mean = np.array([total / n for total in sums]) / 255
    covariance = np.array(
        [[(n * products[c][d] - sums[c] * sums[d]) / (n * max(n - 1, 1)) for d in range(channels)]
         for c in range(channels)]
    ) / 255**2  # fmt: skip
    eigval, eigvec = np.linalg.eigh(covariance)
    return {
        "mean": mean.tolist(),
        "std": np.maximum(np.sqrt(np.diag(covariance)), 1e-6).tolist(),
        "eigval": np.maximum(eigval, 0).tolist(),
        "eigvec": eigvec.tolist(),
    }


def pixel_moments(pixels: np.ndarray) -> np.ndarray:
    """(C + C²,) int64: each channel's sum of pixel values, then the channels' cross-product sums
    (row-major), of uint8 (C, H, W) pixels, or of a float64 (C, pixels) chunk holding integer
    values. Exact: float64 holds the integer sums of up to 2³⁷ pixels of 255² without rounding."""
    channels = pixels.shape[0]
    values = pixels.reshape(channels, -1).astype(np.float64, copy=False)
    products = np.empty((channels, channels))
    for c in range(channels):  # one dot product per pair: 2.6× faster than `values @ values.T`
        for d in range(c, channels):  # on one image's (3, 113²) in a worker, whose BLAS has 1 thread
            products[c, d] = products[d, c] = np.dot(values[c], values[d])
    return np.concatenate([values.sum(axis=1), products.ravel()]).astype(np.int64)


def _chunks(images: np.ndarray, rows: np.ndarray, per_chunk: int):
    """(C, pixels) float64 holding the integer pixel values (0-255) of each chunk of rows."""
    for start in range(0, len(rows), per_chunk):
        block = np.asarray(images[rows[start : start + per_chunk]])
        yield block.transpose(1, 0, 2, 3).reshape(images.shape[1], -1).astype(np.float64)
