"""Image folders and archives of them: what a declared dataset's source holds, read safely.

The layout is torchvision's `ImageFolder` and ImageNet's: `<root>/<class>/<image>` (images may
sit deeper inside their class folder), or `<root>/train/<class>/...` beside `<root>/test/...`
or `<root>/val/...`. A root holding one folder only (an archive's `shoes/`) is entered. Class
names are the class folders' names, in sorted order, which is also `ImageFolder`'s order.

Archives (.tar, .tar.gz/.tgz, .zip) are read without extracting anything: a member is read
into memory, never written under its own name, so no name can place a file anywhere. An
archive whose member names leave it (absolute, or with `..`) is refused whole, since no
honest packer writes such names; a link is never followed (it is listed as a bad entry).
In a folder, links to files are followed, as `ImageFolder` does: the folder is the user's own.

Every function here is plain Python and Pillow-free: the decoding itself is `alexops.images`,
called from `decode_chunk` in worker processes.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from alexops import cache, images, progress
from alexops.errors import AlexopsError

SPLIT_DIRS = ("train", "test", "val")
# Left alone without a word: what operating systems and archivers add beside the images.
JUNK_NAMES = frozenset({"Thumbs.db", "desktop.ini", "__MACOSX"})
# A member larger than this is refused unread: no camera image is, and a zip bomb would be.
MAX_MEMBER_BYTES = 512 << 20
# Pixels decoded per image at most (Pillow's own bomb limit is twice its 89 M warning level).
MAX_PIXELS = 2 * 89_478_485
TOO_LARGE = f"the file is too large to decode: prepare decodes at most {MAX_PIXELS:,} pixels an image"


class UnsafeArchive(AlexopsError):
    """An archive with a member name that points outside it."""


@dataclass(frozen=True)
class Member:
    """One file of a source: its path inside the source (POSIX, no leading ./), its size and
    how to read it (`ref`: a file path, (offset, size) in a plain tar, or a zip member's name).
    `problem` is set for what is never read: a link in an archive, a device, a member too large."""

    name: str
    size: int
    ref: object = None
    problem: str = ""


@dataclass(frozen=True)
class Entry:
    """An image file of the dataset: its member, its class index and its split (None: the
    dataset has no test subtree and is split by prepare)."""

    member: Member
    label: int
    split: str | None


@dataclass
class Listing:
    """What a source holds, sorted by (split, class, name): the classes, the image entries and
    what is not an image entry (bad entries, ignored files, empty classes)."""

    classes: tuple[str, ...]
    entries: list[Entry]
    split_layout: bool
    bad: list[dict] = field(default_factory=list)  # {"path", "reason", "detail"}
    ignored: list[str] = field(default_factory=list)
    empty_classes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# ---- listing ----------------------------------------------------------------------------------


def archive_kind(path: str) -> str:
    """ "zip", "tar" (plain: random access) or "tar.gz" (a stream), from the name."""
    lower = path.lower()
    if lower.endswith(".zip"):
        return "zip"
    if lower.endswith((".tar.gz", ".tgz")):
        return "tar.gz"
    if lower.endswith(".tar"):
        return "tar"
    raise ValueError(f"not an archive name: {path}")


def list_source(path: Path) -> list[Member]:
    """The members of a folder or an archive; raises AlexopsError for what cannot be listed."""
    if path.is_dir():
        return list_folder(path)
    if not path.is_file():
        raise AlexopsError(f"{path} is missing. Fix: `dvc pull`, or `dvc repro fetch` to fetch it again.")
    kind = archive_kind(path.name)
    try:
        return list_zip(path) if kind == "zip" else list_tar(path)
    except UnsafeArchive:
        raise
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError, zlib.error) as exc:
        raise AlexopsError(
            f"{path} is not a readable {kind} archive ({exc.__class__.__name__}: {exc}). "
            "Fix: check the file (a download cut short?) and fetch it again: `dvc repro -f fetch`."
        ) from exc


def list_folder(root: Path) -> list[Member]:
    """Every file under `root`, links to files followed, directories linked to not entered."""
    members = []
    top = str(root)
    # plain strings, not Path objects: a quarter of the time per file (2,000 files: 35-70 → 9-17 ms)
    for directory, subdirs, names in os.walk(top):
        subdirs.sort()
        inside = os.path.relpath(directory, top)
        prefix = "" if inside == "." else inside.replace(os.sep, "/") + "/"
        if prefix:
            members.append(Member(prefix, 0))
        for name in sorted(names):
            path, relative = os.path.join(directory, name), prefix + name
            try:
                info = os.stat(path)  # follows a link
            except OSError as exc:
                members.append(Member(relative, 0, path, f"unreadable ({exc.strerror})"))
                continue
            if not stat.S_ISREG(info.st_mode):
                members.append(Member(relative, 0, path, "not a regular file"))
            else:
                members.append(Member(relative, info.st_size, path))
    return members


def safe_name(name: str, archive: str) -> str:
    """A member's name without a leading ./; an absolute or `..` name refuses the archive."""
    cleaned = name.removeprefix("./")
    if cleaned.startswith("/") or ".." in PurePosixPath(cleaned).parts or "\\.." in cleaned:
        raise UnsafeArchive(
            f"{archive}: member {name!r} points outside the archive. alexops reads nothing from such "
            "an archive. Fix: pack the folder again with relative names (e.g. `tar -czf x.tar.gz shoes/`)."
        )
    return cleaned


def list_tar(path: Path) -> list[Member]:
    streamed = archive_kind(path.name) == "tar.gz"
    members = []
    with tarfile.open(path, "r|*" if streamed else "r:") as tar:
        for info in tar:
            name = safe_name(info.name, path.name)
            if info.isdir():
                members.append(Member(name.rstrip("/") + "/", 0))
                continue
            if info.issym() or info.islnk():
                members.append(Member(name, 0, None, f"a link to {info.linkname!r}, not followed"))
            elif not info.isreg():
                members.append(Member(name, 0, None, "not a regular file (a device or a pipe)"))
            elif info.size > MAX_MEMBER_BYTES:
                members.append(Member(name, info.size, None, f"{info.size} bytes: too large to be an image"))
            else:
                members.append(Member(name, info.size, None if streamed else (info.offset_data, info.size)))
    return unique_names(members, path.name)


def list_zip(path: Path) -> list[Member]:
    members = []
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            name = safe_name(info.filename, path.name)
            mode = info.external_attr >> 16
            if info.is_dir():
                members.append(Member(name.rstrip("/") + "/", 0))
                continue
            if stat.S_ISLNK(mode):
                members.append(Member(name, 0, None, "a link, not followed"))
            elif info.flag_bits & 0x1:
                members.append(Member(name, info.file_size, None, "encrypted"))
            elif info.file_size > MAX_MEMBER_BYTES:
                members.append(Member(name, info.file_size, None, f"{info.file_size} bytes: too large"))
            else:
                members.append(Member(name, info.file_size, info.filename))
    return unique_names(members, path.name)


def unique_names(members: list[Member], archive: str) -> list[Member]:
    """A name seen before is a bad entry: extracting would let the second copy shadow the first."""
    seen, kept = set(), []
    for member in members:
        if member.name in seen and not member.problem and not member.name.endswith("/"):
            member = Member(member.name, member.size, None, f"appears twice in {archive}; the first is read")
        seen.add(member.name)
        kept.append(member)
    return kept


def hidden(name: str) -> bool:
    """Whether a member's name (a/b/c, "/"-separated) has a dot-file part or junk: skipped.
    Plain string parts, not PurePosixPath's: a quarter of the time, which 100,000 files notice."""
    return any((part.startswith(".") and part != ".") or part in JUNK_NAMES for part in name.split("/"))


def structure(members: list[Member]) -> Listing:
    """Members → classes and entries: the dataset's root entered, train/test subtrees found.

    Directory members (names ending in /) make class folders known even when they hold no
    image: such a class is listed in `empty_classes`.
    """
    kept = [m for m in members if not hidden(m.name)]
    prefix = common_root(kept)
    relative = {m: m.name[len(prefix) :] for m in kept if m.name.startswith(prefix) and m.name != prefix}
    tops = {name.split("/", 1)[0] for name in relative.values() if "/" in name}
    split_layout = "train" in tops and ("test" in tops or "val" in tops)
    test_dir = "test" if "test" in tops else "val"
    listing = Listing((), [], split_layout)
    if split_layout and "test" in tops and "val" in tops:
        listing.notes.append("val/ is not read: test/ is the test split")
    by_split: dict[str | None, dict[str, list[Member]]] = {}
    for member, name in relative.items():
        parts = name.rstrip("/").split("/")
        split = None
        if split_layout:
            if parts[0] not in ("train", test_dir):
                if not member.name.endswith("/"):
                    listing.ignored.append(member.name)
                continue
            split, parts = ("train" if parts[0] == "train" else "test"), parts[1:]
        if member.name.endswith("/"):  # a folder: a class folder when it sits where classes do
            if len(parts) == 1:
                by_split.setdefault(split, {}).setdefault(parts[0], [])
            continue
        if len(parts) < 2:  # a file beside the class folders (a README, a licence)
            listing.ignored.append(member.name)
            continue
        by_split.setdefault(split, {}).setdefault(parts[0], []).append(member)
    train_classes = by_split.get("train" if split_layout else None, {})
    listing.classes = tuple(sorted(train_classes))
    for split in sorted(by_split, key=lambda s: s == "test"):  # train (or unsplit) first, then test
        for class_name, class_members in sorted(by_split[split].items()):
            if class_name not in train_classes:
                listing.bad.extend(
                    {"path": m.name, "reason": "unknown_class", "detail": f"no train/{class_name}/ folder"}
                    for m in class_members
                )
                continue
            for member in sorted(class_members, key=lambda m: m.name):
                if member.problem:
                    listing.bad.append(
                        {"path": member.name, "reason": "unreadable", "detail": member.problem}
                    )
                else:
                    listing.entries.append(Entry(member, listing.classes.index(class_name), split))
    has_files = {listing.classes[e.label] for e in listing.entries if e.split in ("train", None)}
    listing.empty_classes = [c for c in listing.classes if c not in has_files]
    return listing


def common_root(members: list[Member]) -> str:
    """The folder to read from: '' or a chain of single folders (an archive's `shoes/`), never a
    train/test/val folder or a folder that holds files itself."""
    prefix = ""
    while True:
        rest = [m.name[len(prefix) :] for m in members if m.name != prefix]
        tops = {name.split("/", 1)[0] for name in rest}
        if len(tops) != 1 or any("/" not in name for name in rest):
            return prefix
        (top,) = tops
        if top in SPLIT_DIRS:
            return prefix
        prefix += top + "/"


# ---- reading and decoding ------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """Where the members' bytes are: a folder (refs are paths), a plain tar (refs are offsets),
    a zip (refs are member names) or a tar.gz (read in one stream by `stream_tar`)."""

    path: Path
    kind: str  # "folder" | "tar" | "zip" | "tar.gz"

    @classmethod
    def of(cls, path: Path) -> Source:
        return cls(path, "folder" if path.is_dir() else archive_kind(path.name))


_open_zips: dict[str, zipfile.ZipFile] = {}  # one handle per worker process and archive


def read_member(source: Source, member: Member) -> bytes:
    """A member's bytes (not for tar.gz, whose members come from `stream_tar`)."""
    if source.kind == "folder":
        with open(member.ref, "rb") as stream:
            return stream.read()
    if source.kind == "tar":
        offset, size = member.ref
        with open(source.path, "rb") as stream:
            stream.seek(offset)
            return stream.read(size)
    archive = _open_zips.get(str(source.path))
    if archive is None:
        archive = _open_zips[str(source.path)] = zipfile.ZipFile(source.path)
    return archive.read(member.ref)


def stream_tar(source: Source, wanted: dict[str, int]) -> Iterator[tuple[int, bytes]]:
    """(index, bytes) of the wanted members (name → index), in the archive's order: one pass."""
    pending = dict(wanted)
    with tarfile.open(source.path, "r|*") as tar:
        for info in tar:
            index = pending.pop(info.name.removeprefix("./"), None)
            if index is not None and info.isreg():
                yield index, tar.extractfile(info).read()


@dataclass(frozen=True)
class DecodeSpec:
    """How every image of a dataset is decoded (picklable: it travels to the workers)."""

    out: str  # the .npy file the pixels go to, row = entry index
    shape: tuple[int, int, int, int]  # (N, C, S, S)
    recipe: images.Capture  # kind photo, size S: decode (draft), square, background


@dataclass(frozen=True)
class Decoded:
    """What decoding one file gave: ok or the reason it is bad, the SHA-256 of its bytes (exact
    duplicates), whether its pixels are gray (channels auto), their `cache.pixel_moments`
    (the channel statistics, summed over the training images by prepare)."""

    index: int
    sha256: str
    reason: str = ""
    detail: str = ""
    gray: bool = True
    moments: np.ndarray | None = None


_outputs: dict[str, np.ndarray] = {}


def output(spec: DecodeSpec) -> np.ndarray:
    array = _outputs.get(spec.out)
    if array is None:
        array = _outputs[spec.out] = np.load(spec.out, mmap_mode="r+")
    return array


def decode_chunk(spec: DecodeSpec, source: Source, chunk: list[tuple[int, object]]) -> list[Decoded]:
    """Decode (index, member or bytes) items into rows of the output file; a worker's job."""
    out = output(spec)
    channels = spec.shape[1]
    done = []
    for index, item in chunk:
        try:
            data = item if isinstance(item, bytes) else read_member(source, item)
        except OSError as exc:
            done.append(Decoded(index, "", "unreadable", exc.strerror or str(exc)))
            continue
        digest = hashlib.sha256(data).hexdigest()
        try:
            # "the file": the report puts the detail after the file's name, which it would repeat
            pixels, _ = images.capture(
                data, channels, spec.recipe, "dataset", max_pixels=MAX_PIXELS, label="the file"
            )
        except images.ImageError as exc:
            # the decoder's own too-many-pixels detail speaks to the server's clients (--max-pixels)
            detail = TOO_LARGE if exc.reason == "too_many_pixels" else str(exc)
            done.append(Decoded(index, digest, exc.reason, detail))
            continue
        out[index] = pixels
        gray = channels == 1 or bool((pixels[0] == pixels[1]).all() and (pixels[1] == pixels[2]).all())
        done.append(Decoded(index, digest, gray=gray, moments=cache.pixel_moments(pixels)))
    return done


def shorter_sides(source: Source, entries: list[Entry], enough: int) -> int:
    """The largest shorter side (px) among the images, from their headers; the scan stops at the
    first image of at least `enough` px, so a photo folder costs one header."""
    largest = 0
    if source.kind == "tar.gz":
        wanted = {e.member.name: i for i, e in enumerate(entries)}
        stream = (data for _, data in stream_tar(source, wanted))
    else:
        stream = (_try_read(source, e.member) for e in entries)
    for data in stream:
        size = images.dimensions(data) if data else None
        if size:
            largest = max(largest, min(size))
            if largest >= enough:
                break
    return largest


def _try_read(source: Source, member: Member) -> bytes:
    try:
        return read_member(source, member)
    except OSError:
        return b""


CHUNK_ITEMS = 32  # images per task: few enough to balance the workers, many enough to amortise a task
INLINE_BELOW = 64  # fewer images than this are decoded in this process (a pool costs ~1 s to start)


def decode_all(
    source: Source, entries: list[Entry], spec: DecodeSpec, workers: int, desc: str
) -> list[Decoded]:
    """Decode every entry into its row of `spec.out`, on `workers` processes, with a progress bar.

    Workers read the files themselves (a folder, a plain tar, a zip); a tar.gz is one stream,
    read here and handed out as bytes, at most a few chunks ahead of the workers, so memory does
    not grow with the archive.
    """
    if source.kind == "tar.gz":
        wanted = {e.member.name: i for i, e in enumerate(entries)}
        items = stream_tar(source, wanted)
    else:
        items = ((i, e.member) for i, e in enumerate(entries))
    results: list[Decoded] = []
    with progress.bar(total=len(entries), desc=desc, unit="img") as bar:
        if workers <= 1 or len(entries) < INLINE_BELOW:
            from threadpoolctl import threadpool_limits

            # one BLAS thread, as in a worker: this process decodes on one core, and the BLAS
            # threads of the pixel moments spun on the others (2,000 photos on 2 cores: 12 s of
            # CPU in 6.5 s, now 5-6.5 s), taking them from whatever else runs
            with threadpool_limits(limits=1, user_api="blas"):
                for chunk in chunked(items, CHUNK_ITEMS):
                    results.extend(decode_chunk(spec, source, chunk))
                    bar.update(len(chunk))
            _outputs.pop(spec.out, None)
        else:
            results = _in_pool(items, spec, source, workers, bar)
    return sorted(results, key=lambda r: r.index)


def _in_pool(items, spec: DecodeSpec, source: Source, workers: int, bar) -> list[Decoded]:
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    results: list[Decoded] = []
    # fork: workers start at once and share this process's imports; they run Pillow and numpy only,
    # never torch, so the parent's torch threads do not matter to them
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init) as pool:
        pending = set()
        for chunk in chunked(items, CHUNK_ITEMS):
            if len(pending) >= 4 * workers:  # back-pressure: a tar.gz stream waits for the workers
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    results.extend(future.result())
                    bar.update(len(future.result()))
            pending.add(pool.submit(decode_chunk, spec, source, chunk))
        for future in pending:
            results.extend(future.result())
            bar.update(len(future.result()))
    return results


def _worker_init() -> None:
    """A worker leaves Ctrl-C and SIGTERM to the stage, which stops the pool (alexops.cli), and
    runs numpy's BLAS on one thread: the workers already fill the cores, and the BLAS threads
    each one would start for a pixel-moment product spin against the other workers (prepare
    measured 4-8x slower on 2 cores, depending on the scheduler, with OpenBLAS's default)."""
    import signal

    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def chunked(items, size: int):
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def stratified_split(labels: np.ndarray, digests: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A seeded test split of `fraction` of each class (at least one image when a class has two or
    more), whole groups at a time: exact duplicates (same SHA-256) never straddle the split.

    Stable as a folder grows: a class's images are taken in the order of a hash of the seed and
    each image's content, not of a shuffle, so adding or replacing images moves only those at
    the class's boundary between test and train. A shuffle would redraw the whole split, and a
    version re-tested on the new split (register) would meet images it was trained on.
    labels: (N,) int; digests: (N,) str, each usable image's SHA-256. Returns bool (N,), True for test.
    """
    test = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        group_digests, inverse, counts = np.unique(digests[rows], return_inverse=True, return_counts=True)
        target = max(1, round(fraction * len(rows))) if len(rows) > 1 else 0
        order = sorted(range(len(group_digests)), key=lambda g: _split_rank(seed, group_digests[g]))
        chosen, taken = [], 0
        for group in order:
            if taken >= target:
                break
            if taken + counts[group] < len(rows):  # a class keeps one training image at least
                chosen.append(group)
                taken += counts[group]
        test[rows[np.isin(inverse, chosen)]] = True
    return test


def _split_rank(seed: int, digest: str) -> bytes:
    return hashlib.sha256(f"{seed}:{digest}".encode()).digest()
