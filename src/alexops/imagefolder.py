"""A dataset declared under `datasets:`: an image folder, or an archive of one, as a DVC input.

fetch makes the source a DVC-tracked input in `data/raw/<name>/`, with `source.json` saying
where its images are and what they are (a SHA-256 per file, or the archive's):

- a folder or an archive inside the repository's `datasets/` (put there with `dvc add` or
  `dvc import-url`, so DVC versions it and `dvc pull` restores it) is read in place: fetch
  records its files' digests, and since `dvc.yaml`'s fetch depends on `datasets/`, a changed,
  added or removed image reruns fetch, and prepare onward;
- a folder or an archive anywhere else is copied into `data/raw/<name>/` (a DVC output, so
  `dvc push`/`dvc pull` carry it); DVC does not watch it there: `dvc repro -f fetch` reads it
  again;
- an archive at a URL is downloaded there, its SHA-256 checked (`checksum:`).

decode lists the classes (`alexops.folders`), decodes every image with `alexops.images` on all
cores into the cache (JPEG draft decoding, the paper's square crop to the cache size), finds
bad files and exact duplicates, and splits train/test (the source's own test/ or val/ subtree,
else a seeded stratified fraction).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alexops import files, folders, progress
from alexops.cache import IMAGES, NewImages
from alexops.datasets import Dataset, Decoded
from alexops.errors import AlexopsError
from alexops.images import Capture
from alexops.params import DatasetParams, Params
from alexops.paths import Paths

SOURCE_RECORD = "source.json"
COPY_FOLDER = "files"  # where an outside folder's copy goes in data/raw/<name>/
WORKSPACE_DATASETS = "datasets"  # the repository folder DVC-tracked sources live in


@dataclass
class ImageFolder(Dataset):
    name: str
    declared: DatasetParams

    # ---- fetch --------------------------------------------------------------------------------

    def fetch(self, params: Params, paths: Paths) -> None:
        key = f"datasets.{self.name}.source"
        if self.declared.is_url:
            record = self._download(params, paths)
        else:
            location = local_source(paths.root, self.declared.source, key)
            record = self._record_local(location, paths, key)
        if record["kind"] == "folder":
            contents = f"{len(record['files'])} files"
        else:  # refuse an unsafe or unreadable archive now, not in prepare
            members = folders.list_source(self._location(record, paths))
            count = sum(not member.name.endswith("/") for member in members)  # folders are members too
            contents = f"a {record['kind']} archive of {count} files"
        # prepare reads the declaration from here, not from params.yaml: editing another dataset's
        # declaration reruns this fetch, whose output then stays the same, and prepare does not rerun
        record["declared"] = dataclasses.asdict(self.declared)
        files.write_json(paths.raw / SOURCE_RECORD, record)
        print(f"fetch: {self.name} from {self.declared.source} ({record['location']}, {contents})")

    def _record_local(self, location: Path, paths: Paths, key: str) -> dict:
        root = paths.root.resolve()
        inside = location.resolve().is_relative_to(root)
        if inside and not location.resolve().is_relative_to(root / WORKSPACE_DATASETS):
            raise AlexopsError(
                f"{key}: {self.declared.source} is inside the repository but not under "
                f"{WORKSPACE_DATASETS}/, "
                f"the folder whose changes DVC watches for fetch. Fix: move it there (`dvc move` when DVC "
                f"tracks it, else `mv`), e.g. {WORKSPACE_DATASETS}/{self.name}, and update {key}."
            )
        base = {"dataset": self.name, "source": self.declared.source}
        if location.is_dir():
            members = folders.list_folder(location)
            if not any(not folders.hidden(m.name) and not m.name.endswith("/") for m in members):
                raise AlexopsError(
                    f"{key}: {location} holds no files. Fix: put the images in <class>/<image> folders there."
                )
            if inside:
                return base | {
                    "kind": "folder",
                    "location": "workspace",
                    "path": location.resolve().relative_to(root).as_posix(),
                    "files": folder_digests(location, members, copy_to=None),
                }
            target = paths.raw / COPY_FOLDER
            digests = folder_digests(location, members, copy_to=target)
            return base | {"kind": "folder", "location": "raw", "path": COPY_FOLDER, "files": digests}
        kind = folders.archive_kind(location.name)
        if inside:
            digest = checked_digest(location, self.declared, key)
            path = location.resolve().relative_to(root).as_posix()
            return base | {"kind": kind, "location": "workspace", "path": path, "sha256": digest}
        target = paths.raw / location.name
        digest = copy_checked(location, target, self.declared, key)
        return base | {"kind": kind, "location": "raw", "path": location.name, "sha256": digest}

    def _download(self, params: Params, paths: Paths) -> dict:
        from alexops import fetch

        name = self.declared.source.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
        target = paths.raw / name
        digest = fetch.download_to(self.declared.source, target, params.fetch)
        if digest != self.declared.sha256:
            target.unlink(missing_ok=True)
            raise AlexopsError(
                f"datasets.{self.name}: {self.declared.source} has SHA-256 {digest}, not the declared "
                f"{self.declared.sha256}; nothing was kept. Fix: check the URL, or update "
                f"datasets.{self.name}.checksum if the archive was meant to change."
            )
        kind = folders.archive_kind(name)
        return {"dataset": self.name, "source": self.declared.source, "kind": kind, "location": "raw",
                "path": name, "sha256": digest}  # fmt: skip

    @staticmethod
    def _location(record: dict, paths: Paths) -> Path:
        return (paths.root if record["location"] == "workspace" else paths.raw) / record["path"]

    # ---- decode -------------------------------------------------------------------------------

    def decode(self, params: Params, paths: Paths) -> Decoded:
        record = files.read_json(paths.raw / SOURCE_RECORD, produced_by="fetch")
        declared = record["declared"]
        self.declared = DatasetParams(**declared | {"background": tuple(declared["background"])})
        location = self._location(record, paths)
        if record["kind"] != "folder" and record["location"] == "workspace":
            self._check_unchanged(location, record["sha256"])
        source = folders.Source.of(location)
        listing = folders.structure(folders.list_source(location))
        self._check_layout(listing, location)
        problems = listing.bad + [
            {"path": f"{c}/", "reason": "empty_class", "detail": "no image in the class folder"}
            for c in listing.empty_classes
        ]
        capture = self.capture(params, source, listing)
        if problems and params.prepare.bad_files == "fail":  # found by listing alone: stop before decoding
            return self._decoded(None, listing, np.zeros(0, bool), capture, problems)
        channels = 3 if self.declared.channels == "auto" else int(self.declared.channels)
        size = capture.size
        images = NewImages.create(paths.prepared / IMAGES, (len(listing.entries), channels, size, size))
        try:
            spec = folders.DecodeSpec(str(images.path), images.shape, capture)
            workers = params.prepare.workers or len(os.sched_getaffinity(0))
            print(f"prepare: decoding {len(listing.entries)} images of {len(listing.classes)} classes to "
                  f"{size}×{size} px, channels {self.declared.channels}, on {workers} processes")  # fmt: skip
            results = folders.decode_all(source, listing.entries, spec, workers, desc=f"decode {self.name}")
            self._check_digests(record, listing, results)
            usable = np.array([not r.reason for r in results], dtype=bool)
            problems += [
                {"path": e.member.name, "reason": r.reason, "detail": r.detail}
                for e, r in zip(listing.entries, results, strict=True)
                if r.reason
            ]
            if self.declared.channels == "auto" and all(
                r.gray for r, ok in zip(results, usable, strict=True) if ok
            ):
                images = to_gray(images)
            decoded = self._decoded(images, listing, usable, capture, problems, results, params.base.seed)
            decoded.moments = stacked_moments(results, channels, images.shape[1])
        except BaseException:
            images.discard()
            raise
        return decoded

    def capture(self, params: Params, source: folders.Source, listing: folders.Listing) -> Capture:
        """The recipe the images are brought into the cache by, and served photos into the model."""
        wanted = params.prepare.image_size or max(
            params.train.image_size, round(params.train.image_size * params.train.resize_ratio)
        )
        largest = folders.shorter_sides(source, listing.entries, enough=wanted)
        size = min(wanted, largest) if largest else wanted
        return Capture(
            kind="photo",
            background=self.declared.background,
            size=size,
            source=f"the image folder {self.declared.source}, declared as dataset {self.name}",
            steps=(
                "decode: EXIF orientation, 8-bit, transparency over the background",
                f"shorter side to {size} px, centre {size}×{size} crop (Krizhevsky et al. 2012, §2)",
            ),
        )

    def _check_layout(self, listing: folders.Listing, location: Path) -> None:
        where = f"datasets.{self.name} ({self.declared.source})"
        if not listing.entries and not listing.bad:
            raise AlexopsError(
                f"{where}: no images in <class>/<image> folders were found. Fix: lay it out as "
                "<root>/<class>/<image> (optionally under train/ and test/)."
            )
        if len(listing.classes) < 2:
            raise AlexopsError(
                f"{where}: found {len(listing.classes)} class folder(s) "
                f"({', '.join(listing.classes) or 'none'}); "
                "a classifier needs at least 2. Fix: one folder per class, <root>/<class>/<image>."
            )

    @staticmethod
    def _check_unchanged(location: Path, expected: str) -> None:
        if files.sha256_file(location) != expected:
            raise AlexopsError(
                f"{location} changed since fetch recorded it. Fix: `dvc repro` (it reruns fetch first)."
            )

    @staticmethod
    def _check_digests(record: dict, listing: folders.Listing, results: list[folders.Decoded]) -> None:
        if "files" not in record:
            return
        recorded = {name: digest for name, _, digest in record["files"]}
        for entry, result in zip(listing.entries, results, strict=True):
            if result.sha256 and recorded.get(entry.member.name) != result.sha256:
                raise AlexopsError(
                    f"{entry.member.name} changed since fetch recorded the folder. "
                    "Fix: `dvc repro` (it reruns fetch first)."
                )

    def _decoded(self, images, listing, usable, capture, problems, results=(), seed: int = 0) -> Decoded:
        entries = listing.entries
        labels = np.array([e.label for e in entries], dtype=np.int64)
        test = np.array([e.split == "test" for e in entries], dtype=bool)
        notes = list(listing.notes)
        if listing.ignored:
            notes.append(
                f"{len(listing.ignored)} file(s) outside the class folders not read, "
                f"e.g. {listing.ignored[0]}"
            )
        if images is None:
            return Decoded(None, labels, test, np.zeros(len(entries), bool), listing.classes, capture,
                           self.declared.source, problems, notes)  # fmt: skip
        digests = np.array([r.sha256 for r in results])
        names = [e.member.name for e in entries]
        if listing.split_layout:
            problems += drop_duplicates(names, digests, test, usable)
        else:
            rows = np.flatnonzero(usable)
            test[rows] = folders.stratified_split(
                labels[rows], digests[rows], self.declared.test_fraction, seed
            )
        return Decoded(images, labels, test, usable, listing.classes, capture, self.declared.source,
                       problems, notes)  # fmt: skip


def stacked_moments(results: list[folders.Decoded], decoded: int, cached: int) -> np.ndarray:
    """(N, C + C²) int64: each image's `cache.pixel_moments` (zeros for a bad file), decoded to
    `decoded` channels, for a cache of `cached`: reduced to the first channel's sum and square
    sum when the cache became gray."""
    moments = np.zeros((len(results), decoded + decoded**2), np.int64)
    for row, result in enumerate(results):
        if result.moments is not None:
            moments[row] = result.moments
    return moments if decoded == cached else moments[:, [0, decoded]]


def drop_duplicates(
    names: list[str], digests: np.ndarray, test: np.ndarray, usable: np.ndarray
) -> list[dict]:
    """Test images whose bytes equal a training image's: listed, and left out of the test split
    (`usable` set False), so the test accuracy is never measured on images trained on."""
    train_files = {}
    for i in np.flatnonzero(usable & ~test):
        train_files.setdefault(digests[i], names[i])
    problems = []
    for i in np.flatnonzero(usable & test):
        twin = train_files.get(digests[i])
        if twin is not None:
            usable[i] = False
            problems.append({"path": names[i], "reason": "duplicate", "detail": f"the same bytes as {twin}"})
    return problems


def to_gray(images: NewImages) -> NewImages:
    """The images' first channel as a 1-channel file: every image was gray (its three channels
    equal, so the first is the luma that decoding to 1 channel gives)."""
    colour = images.array()
    gray = NewImages.create(images.target, (colour.shape[0], 1, *colour.shape[2:]))
    try:
        out = gray.array()
        step = max(1, (64 << 20) // max(1, int(np.prod(colour.shape[1:]))))
        for start in range(0, len(colour), step):
            out[start : start + step] = colour[start : start + step, :1]
        out.flush()
        del out, colour
    except BaseException:
        gray.discard()
        raise
    finally:
        images.discard()
    return gray


# ---- local sources ---------------------------------------------------------------------------


def local_source(root: Path, source: str, key: str) -> Path:
    path = Path(source).expanduser()
    path = path if path.is_absolute() else root / path
    if not path.exists():
        raise AlexopsError(
            f"{key}: {path} does not exist. Fix: give an existing folder or archive (a relative path is "
            f"relative to the project root), or `dvc pull` if DVC tracks it."
        )
    if not path.is_dir() and not path.name.lower().endswith((".tar", ".tar.gz", ".tgz", ".zip")):
        raise AlexopsError(
            f"{key}: {path} is a file but not an archive (.tar, .tar.gz, .tgz, .zip). "
            "Fix: give the folder, or an archive of it."
        )
    return path


def folder_digests(location: Path, members: list[folders.Member], copy_to: Path | None) -> list:
    """[name, size, SHA-256] of every file a dataset may read (hidden files left out), copying
    each into `copy_to` when given; a file that cannot be read is left for prepare to report."""
    kept = [member for member in members if not folders.hidden(member.name) and not member.problem]
    file_members = [member for member in kept if not member.name.endswith("/")]
    if copy_to is not None:  # folders are kept in the copy, an empty class folder too
        for folder in (member for member in kept if member.name.endswith("/")):
            (copy_to / folder.name).mkdir(parents=True, exist_ok=True)
    action = "read" if copy_to is None else "copy"
    digests = []
    for member in progress.bar(file_members, desc=f"fetch: {action} files", unit="file"):
        try:
            data = Path(member.ref).read_bytes()
        except OSError:
            continue
        if copy_to is not None:
            target = copy_to / member.name
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                target.write_bytes(data)
            except OSError as exc:
                raise AlexopsError(
                    f"cannot write {target}: {exc.strerror}. Fix: check free disk space and permissions."
                ) from exc
        digests.append([member.name, len(data), hashlib.sha256(data).hexdigest()])
    return digests


def checked_digest(path: Path, declared: DatasetParams, key: str) -> str:
    digest = files.sha256_file(path)
    if declared.checksum and digest != declared.sha256:
        raise AlexopsError(
            f"{key}: {path} has SHA-256 {digest}, not the declared {declared.sha256}. "
            f"Fix: use the archive the checksum belongs to, or update {key.rsplit('.', 1)[0]}.checksum."
        )
    return digest


def copy_checked(path: Path, target: Path, declared: DatasetParams, key: str) -> str:
    digest = checked_digest(path, declared, key)
    with files.atomic_path(target) as tmp:
        shutil.copyfile(path, tmp)
    return digest
