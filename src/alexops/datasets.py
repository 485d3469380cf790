"""Dataset descriptions and readers: raw files → uint8 image and int64 label tensors.

A `DatasetSpec` says which raw files a dataset needs (and how their publisher checksums them),
where to get them, and how to read a split from them. Fashion-MNIST is four IDX files, kept
decompressed. CIFAR-10 is the published python-version archive, kept exactly as published:
its md5 is of the .tar.gz itself. Its batches are Python pickles, so they are read in memory
(nothing is extracted to disk) and rebuilt by an unpickler that knows numpy arrays and
nothing else: a pickle can name any Python callable, and a checksum override
(`fetch.checksums`) means the archive need not be the published one.
"""

from __future__ import annotations

import io
import pickle
import struct
import tarfile
import zlib
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING

import numpy as np

from alexops.errors import AlexopsError
from alexops.images import NO_CAPTURE, Capture

if TYPE_CHECKING:
    import torch

# images, labels. torch is imported where a split is built, so that fetch, which builds none,
# starts without it (1.7 s of every fetch process)
Split = tuple["torch.Tensor", "torch.Tensor"]


class BadRawData(ValueError):
    """Raw data that is not what its dataset promises. The message says what is wrong; the
    caller adds the fix (fetch tries the next mirror, a reader asks for a fresh fetch)."""


@dataclass(frozen=True)
class RawFile:
    """One file a dataset needs, as its publisher vouches for it."""

    name: str  # as kept in data/raw/<dataset>/
    checksum: str  # hex digest of the bytes kept
    algorithm: str = "sha256"  # a hashlib name
    # True: the checksum is of the decompressed bytes (mirrors gzip with different headers), so a
    # mirror's `<name>.gz` is decompressed and kept decompressed. False: checked and kept as published.
    gunzip: bool = True
    # A structural check of the verified bytes before they are kept; raises BadRawData.
    check: Callable[[bytes], None] | None = None

    @property
    def published_names(self) -> tuple[str, ...]:
        """The names a mirror may hold it under, in the order tried; a URL mirror gets the first."""
        return (f"{self.name}.gz", self.name) if self.gunzip else (self.name,)


@dataclass(frozen=True)
class DatasetSpec:
    name: str  # also the directory under data/raw, data/prepared, artifacts and reports
    files: dict[str, RawFile]  # raw file name → its description
    classes: tuple[str, ...]
    channels: int
    # What `default` in fetch.mirrors stands for: local directories first, so that an offline
    # machine never waits on a network timeout.
    default_mirrors: tuple[str, ...]
    read: Callable[[Path, str], Split]  # (raw directory, "train" | "test") → images, labels
    offline_fix: str  # how to get the files without a network, for fetch's error message
    # How the dataset's images were made from photos; exported into the model's metadata, so that
    # the server can bring a user's photo into the same form (alexops.images.capture).
    capture: Capture = NO_CAPTURE


# --- IDX: the MNIST family --------------------------------------------------------------------

_IDX_DTYPES = {0x08: np.uint8}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST family's format): magic, big-endian dims, then data."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise AlexopsError(f"{path} is missing. Fix: run `dvc repro fetch` first.") from exc
    if len(data) < 4 or data[0:2] != b"\0\0" or data[2] not in _IDX_DTYPES:
        raise AlexopsError(f"{path} is not an IDX file of unsigned bytes. Fix: `dvc repro -f fetch`.")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise AlexopsError(f"{path} is truncated inside its header. Fix: `dvc repro -f fetch`.")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        raise AlexopsError(
            f"{path} is truncated or padded: {len(data)} bytes, its header promises {expected}. "
            "Fix: `dvc repro -f fetch`."
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def read_idx_split(raw_dir: Path, split: str) -> Split:
    """One split of an MNIST-family dataset: images (N, 1, H, W) uint8, labels (N,) int64."""
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(raw_dir / f"{prefix}-images-idx3-ubyte")
    labels = read_idx(raw_dir / f"{prefix}-labels-idx1-ubyte")
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise AlexopsError(
            f"{raw_dir}: {split} images {images.shape} and labels {labels.shape} do not pair up. "
            "Fix: `dvc repro -f fetch`."
        )
    images, labels = tensors(images.copy(), labels.astype(np.int64))
    return images.unsqueeze(1), labels


def tensors(images: np.ndarray, labels: np.ndarray) -> Split:
    """numpy images and labels as torch tensors sharing their memory."""
    import torch

    return torch.from_numpy(images), torch.from_numpy(labels)


# --- CIFAR-10: the python-version archive -----------------------------------------------------

CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"  # published on the CIFAR page (ALEXNET.md)
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_BATCHES = {
    "train": tuple(f"{CIFAR10_FOLDER}/data_batch_{i}" for i in range(1, 6)),
    "test": (f"{CIFAR10_FOLDER}/test_batch",),
}
CIFAR10_META = f"{CIFAR10_FOLDER}/batches.meta"
CIFAR10_MEMBERS = frozenset((*CIFAR10_BATCHES["train"], *CIFAR10_BATCHES["test"], CIFAR10_META))
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
_CIFAR10_ROW = 3 * 32 * 32  # a row: 1024 red, then 1024 green, then 1024 blue, each row-major 32×32
# A published batch is 30 MiB; the bound keeps a hostile archive from filling memory.
_MAX_MEMBER_BYTES = 64 << 20


def cifar10_members(archive: IO[bytes], wanted: Collection[str]) -> dict[str, bytes]:
    """The bytes of the `wanted` members, after checking every member of the archive.

    Nothing is written to disk, so no member name can escape a directory; still, an absolute or
    `..` name or a link is never in the published archive, so such an archive is refused whole.
    """
    found: dict[str, bytes] = {}
    seen: set[str] = set()
    try:
        with tarfile.open(fileobj=archive, mode="r|gz") as tar:  # a stream: one pass, in order
            for member in tar:
                name = _checked_member(member, seen)
                if name in wanted:
                    found[name] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise BadRawData(f"not a readable tar.gz ({exc})") from exc
    missing = sorted(CIFAR10_MEMBERS - seen)
    if missing:
        raise BadRawData(f"the archive lacks {', '.join(missing)}")
    return found


def _checked_member(member: tarfile.TarInfo, seen: set[str]) -> str:
    """The member's name (without a leading ./) once it passed the safety checks."""
    name = member.name.removeprefix("./")
    if name.startswith("/") or ".." in PurePosixPath(name).parts:
        raise BadRawData(f"member {member.name!r} points outside the archive's folder")
    if not (member.isreg() or member.isdir()):
        raise BadRawData(f"member {member.name!r} is a link or a device, not a regular file")
    if name in CIFAR10_MEMBERS:
        if not member.isreg():
            raise BadRawData(f"member {name!r} is not a regular file")
        if name in seen:  # a second copy would shadow the first on extraction: ambiguous
            raise BadRawData(f"member {name!r} appears twice")
        if member.size > _MAX_MEMBER_BYTES:
            raise BadRawData(f"member {name!r} is {member.size} bytes, far more than a batch")
    seen.add(name)
    return name


def check_cifar10_archive(data: bytes) -> None:
    """fetch's structural check: every member safe, every needed member present. No unpickling."""
    cifar10_members(io.BytesIO(data), wanted=())


# The only globals a CIFAR-10 batch names: numpy rebuilding an array and its dtype. The batches
# were pickled by numpy 1.x (numpy.core); a re-pickled copy under numpy 2 says numpy._core. The
# function itself is taken from numpy's own pickling, so numpy's deprecated alias is not imported.
_RECONSTRUCT = np.ndarray((0,), np.uint8).__reduce__()[0]
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class ForbiddenGlobal(BadRawData, pickle.UnpicklingError):
    """A pickle named a global outside the allow-list; it was neither imported nor called."""


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Rebuilds dicts, lists, numbers, byte strings and numpy arrays; refuses every other global
    before it is imported, so a pickle carrying code cannot run it."""

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise ForbiddenGlobal(
                f"it names the Python global {module}.{name}, which a CIFAR-10 batch never does; "
                "refused without importing or calling it"
            ) from None

    def persistent_load(self, pid):
        raise ForbiddenGlobal("it holds a persistent id, which a CIFAR-10 batch never does")


def unpickle_cifar10(member: str, data: bytes) -> object:
    """A CIFAR-10 pickle, rebuilt with numpy arrays only. The batches were written by Python 2,
    whose byte strings become bytes here (encoding='bytes': keys are b'data', b'labels')."""
    try:
        return _NumpyOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
    except ForbiddenGlobal as exc:
        raise ForbiddenGlobal(f"{member}: {exc}") from None
    except Exception as exc:  # a truncated or foreign pickle: pickle and numpy raise many kinds
        raise BadRawData(f"{member} is not a readable pickle ({exc.__class__.__name__}: {exc})") from exc


def cifar10_batch_arrays(member: str, batch: object) -> tuple[np.ndarray, np.ndarray]:
    """A batch dict → images (N, 3, 32, 32) uint8 and labels (N,) int64, every promise checked."""
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise BadRawData(f"{member} is not a CIFAR-10 batch (a dict with b'data' and b'labels')")
    data, labels = batch[b"data"], np.asarray(batch[b"labels"])
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2):
        raise BadRawData(f"{member}: b'data' must be a 2-D uint8 array, got {_describe(data)}")
    if data.shape[1] != _CIFAR10_ROW:
        raise BadRawData(f"{member}: rows of {data.shape[1]} bytes, a 32×32 RGB image is {_CIFAR10_ROW}")
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) != len(data):
        raise BadRawData(f"{member}: b'labels' must be {len(data)} integers, got {_describe(labels)}")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(CIFAR10_CLASSES)):
        raise BadRawData(f"{member}: labels range over {labels.min()}..{labels.max()}, not 0..9")
    images = np.ascontiguousarray(data).reshape(len(data), 3, 32, 32)
    return images, labels.astype(np.int64)


def _describe(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"an array of {value.dtype} with shape {value.shape}"
    return f"a {type(value).__name__}"


def check_cifar10_meta(data: bytes) -> None:
    """batches.meta must name the classes in the order the labels count them."""
    meta = unpickle_cifar10(CIFAR10_META, data)
    names = meta.get(b"label_names") if isinstance(meta, dict) else None
    if not (isinstance(names, list) and all(isinstance(n, bytes) for n in names)):
        raise BadRawData(f"{CIFAR10_META} holds no list of class names (b'label_names')")
    decoded = tuple(n.decode("ascii", "replace") for n in names)
    if decoded != CIFAR10_CLASSES:
        raise BadRawData(f"{CIFAR10_META} names the classes {list(decoded)}, not {list(CIFAR10_CLASSES)}")


def read_cifar10_split(raw_dir: Path, split: str) -> Split:
    """One CIFAR-10 split from the kept archive: images (N, 3, 32, 32) uint8, labels (N,) int64."""
    archive = Path(raw_dir) / CIFAR10_ARCHIVE
    batches = CIFAR10_BATCHES[split]
    try:
        with open(archive, "rb") as stream:
            members = cifar10_members(stream, wanted=(*batches, CIFAR10_META))
        check_cifar10_meta(members.pop(CIFAR10_META))
        # pop: each batch's pickle bytes are freed once its array is built
        arrays = [cifar10_batch_arrays(m, unpickle_cifar10(m, members.pop(m))) for m in batches]
    except FileNotFoundError as exc:
        raise AlexopsError(f"{archive} is missing. Fix: run `dvc repro fetch` first.") from exc
    except BadRawData as exc:
        raise AlexopsError(
            f"{archive} is not a usable CIFAR-10 archive: {exc}. "
            "Fix: fetch the published archive again (`dvc repro -f fetch`) from a mirror you trust."
        ) from exc
    images, labels = zip(*arrays, strict=True)
    return tensors(np.concatenate(images), np.concatenate(labels))


# --- the datasets -------------------------------------------------------------------------------

_FASHION_MNIST_SHA256 = {  # of the decompressed IDX files (ALEXNET.md)
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}

FASHION_MNIST = DatasetSpec(
    name="fashion-mnist",
    files={name: RawFile(name, sha256) for name, sha256 in _FASHION_MNIST_SHA256.items()},
    classes=(
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),  # fmt: skip
    channels=1,
    default_mirrors=(
        "/usr/share/datasets/fashion-mnist",  # the Debian package dataset-fashion-mnist
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com",
    ),
    read=read_idx_split,
    offline_fix=(
        "offline, install the Debian mirror (`sudo apt-get install dataset-fashion-mnist`, "
        "files in /usr/share/datasets/fashion-mnist) or copy the files into a directory and list "
        "it first under fetch.mirrors in params.yaml"
    ),
    capture=Capture(
        kind="catalogue",
        background=(0,),
        backdrop=(253, 253, 253),  # #fdfdfd
        size=28,
        source="Xiao, Rasul & Vollgraf 2017, Fashion-MNIST, section 2 (arXiv:1708.07747)",
        steps=(
            "trim the edges close to the corner colour (5% of full intensity)",
            "fit the longest edge to 28 px",
            "sharpen (Gaussian, radius and sigma 1.0)",
            "extend to 28x28 with the object centred",
            "negate (light object on black)",
            "8-bit grayscale",
        ),
    ),
)

CIFAR10 = DatasetSpec(
    name="cifar10",
    files={
        CIFAR10_ARCHIVE: RawFile(
            CIFAR10_ARCHIVE, CIFAR10_MD5, algorithm="md5", gunzip=False, check=check_cifar10_archive
        )
    },
    classes=CIFAR10_CLASSES,
    channels=3,
    default_mirrors=("/usr/share/datasets/cifar10", CIFAR10_URL),
    read=read_cifar10_split,
    offline_fix=(
        f"offline, download {CIFAR10_ARCHIVE} (md5 {CIFAR10_MD5}) on a machine with a network "
        f"from {CIFAR10_URL}/{CIFAR10_ARCHIVE}, then copy it into /usr/share/datasets/cifar10 or "
        "into a directory listed under fetch.mirrors in params.yaml (a mirror may also be the "
        "archive's own path)"
    ),
    capture=Capture(
        kind="photo",
        background=(255, 255, 255),  # as a web page shows a transparent image; the photos came from the web
        source="Krizhevsky 2009, Learning Multiple Layers of Features from Tiny Images, section 3: "
        "natural colour photos downscaled to 32x32",
    ),
)

SPECS = {spec.name: spec for spec in (FASHION_MNIST, CIFAR10)}


def spec(name: str) -> DatasetSpec:
    return SPECS[name]


def read_split(raw_dir: Path, split: str, dataset: DatasetSpec = FASHION_MNIST) -> Split:
    """One split ("train" or "test") of `dataset` from its raw directory. The dataset defaults to
    Fashion-MNIST, which callers written before CIFAR-10 joined expect."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return dataset.read(Path(raw_dir), split)


# --- one interface for every dataset ------------------------------------------------------------
#
# A dataset is read by the reader of its source's kind: the IDX files (Fashion-MNIST), the CIFAR-10
# python archive, or an image folder or archive of one (a dataset declared under `datasets:` in
# params.yaml). The stages call `get(params)` and the two methods below; none of them asks which
# dataset it is.


@dataclass
class Decoded:
    """A dataset decoded into a new cache images file (rows: images), before prepare's subsets.

    labels (N,) int64 class indices; test (N,) bool; usable (N,) bool, False for a row left out
    (a bad file, a duplicate); problems: {"path", "reason", "detail"} for every bad file, empty
    class and duplicate found (prepare.bad_files decides whether they stop the stage).
    """

    images: object  # alexops.cache.NewImages
    labels: np.ndarray
    test: np.ndarray
    usable: np.ndarray
    classes: tuple[str, ...]
    capture: Capture
    source: str
    problems: list[dict]
    notes: list[str]
    moments: np.ndarray | None = None  # (N, C + C²) `cache.pixel_moments`, when decoding made them


class Dataset:
    """What every stage needs of a dataset, whatever its source.

    - `fetch(params, paths)`: its raw input into `paths.raw` (a DVC output), verified.
    - `decode(params, paths)`: every image as uint8 (C, S, S) into a new images file of the
      cache, with labels, splits and what was wrong (`Decoded`); the classes, in label order;
      the capture recipe (how its images were made, for the server).
    """

    name: str

    def fetch(self, params, paths) -> None:
        raise NotImplementedError

    def decode(self, params, paths) -> Decoded:
        raise NotImplementedError


@dataclass
class Published(Dataset):
    """A built-in dataset: published files, fetched from mirrors, read by its spec's reader."""

    spec: DatasetSpec

    @property
    def name(self) -> str:
        return self.spec.name

    def fetch(self, params, paths) -> None:
        from alexops import fetch

        fetch.fetch_published(self.spec, params.fetch, paths.raw)

    def decode(self, params, paths) -> Decoded:
        from alexops.cache import IMAGES, NewImages

        train = read_split(paths.raw, "train", self.spec)
        test = read_split(paths.raw, "test", self.spec)
        count = len(train[1]) + len(test[1])
        images = NewImages.create(paths.prepared / IMAGES, (count, *train[0].shape[1:]))
        try:
            out = images.array()
            out[: len(train[1])] = train[0].numpy()
            out[len(train[1]) :] = test[0].numpy()
            out.flush()
            del out
        except BaseException:
            images.discard()
            raise
        labels = np.concatenate([train[1].numpy(), test[1].numpy()])
        is_test = np.arange(count) >= len(train[1])
        return Decoded(
            images, labels, is_test, np.ones(count, dtype=bool), self.spec.classes, self.spec.capture,
            source=f"the published {self.name} files", problems=[], notes=[],
        )  # fmt: skip


def get(params) -> Dataset:
    """base.dataset's reader: a built-in's, or the folder/archive reader of a declared dataset."""
    name = params.base.dataset
    if name in SPECS:
        return Published(SPECS[name])
    from alexops.imagefolder import ImageFolder

    return ImageFolder(name, params.datasets[name])
