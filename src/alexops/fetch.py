"""Stage `fetch`: the raw dataset files from an ordered mirror list, checksum-verified.

A mirror is a local directory holding the files, the path of a file itself, or an http(s) base
URL; `default` in fetch.mirrors stands for the dataset's own mirrors (`DatasetSpec.default_mirrors`).
Each file is verified against the checksum its publisher gives: Fashion-MNIST's SHA-256 is of
the decompressed IDX files (mirrors gzip with different headers), so those are decompressed
first and kept decompressed; CIFAR-10's md5 is of the .tar.gz, which is kept as published, and
its members are then checked (names, types, presence) without unpickling anything.
A file is written (atomically) only after it passed, so a corrupt or foreign download is never
kept. Run by hand, a file already present with the right checksum is kept as is (under
`dvc repro` the stage starts from an empty output directory).
"""

from __future__ import annotations

import dataclasses
import errno
import gzip
import hashlib
import http.client
import os
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

from alexops import datasets, files, progress
from alexops.datasets import BadRawData, DatasetSpec, RawFile
from alexops.errors import AlexopsError
from alexops.params import DEFAULT_MIRRORS, FetchParams, Params
from alexops.paths import Paths


class MirrorError(Exception):
    """One mirror failed for one file; the reason goes into the final report. `transient`: a
    network failure that may pass (a timeout, a 5xx), as opposed to a wrong or missing file."""

    def __init__(self, reason: str, transient: bool = False) -> None:
        super().__init__(reason)
        self.transient = transient


def run(params: Params, paths: Paths) -> None:
    datasets.get(params).fetch(params, paths)


def fetch_published(dataset: DatasetSpec, opts: FetchParams, raw_dir: Path) -> None:
    """A built-in dataset's files into `raw_dir`, each from the first mirror that has it verified."""
    mirrors = mirror_list(opts.mirrors, dataset)
    for raw in expected_files(dataset, opts.checksums):
        target = raw_dir / raw.name
        if target.exists() and file_digest(target, raw.algorithm) == raw.checksum:
            print(f"fetch: {raw.name} present, checksum ok")
            continue
        fetch_file(raw, mirrors, opts, target, dataset)


def mirror_list(configured: tuple[str, ...], dataset: DatasetSpec) -> list[str]:
    """fetch.mirrors with each `default` replaced by the dataset's own mirrors, repeats dropped."""
    mirrors: list[str] = []
    for entry in configured:
        for mirror in dataset.default_mirrors if entry == DEFAULT_MIRRORS else (entry,):
            if mirror not in mirrors:
                mirrors.append(mirror)
    return mirrors


def expected_files(dataset: DatasetSpec, overrides: dict[str, str]) -> list[RawFile]:
    """The dataset's raw files; a fetch.checksums entry replaces a published checksum by a SHA-256
    of the same bytes (a re-packaged or synthetic copy)."""
    unknown = set(overrides) - set(dataset.files)
    if unknown:
        raise AlexopsError(
            f"fetch.checksums names {sorted(unknown)}, not files of {dataset.name}. "
            f"Fix: use the file names {sorted(dataset.files)}."
        )
    return [
        dataclasses.replace(raw, checksum=overrides[name], algorithm="sha256") if name in overrides else raw
        for name, raw in dataset.files.items()
    ]


def fetch_file(
    raw: RawFile, mirrors: list[str], opts: FetchParams, target: Path, dataset: DatasetSpec
) -> None:
    tried, transient = [], False
    for mirror in mirrors:
        try:
            data = verified(raw, read_from_mirror(mirror, raw, opts, sole_file=len(dataset.files) == 1))
        except MirrorError as exc:
            tried.append(f"{mirror}: {exc}")
            transient |= exc.transient
            continue
        files.write_bytes(target, data)
        print(f"fetch: {raw.name} from {mirror}, {raw.algorithm} ok")
        return
    attempts = "\n  - ".join(tried)
    raise AlexopsError(
        f"could not fetch {dataset.name} file {raw.name}; tried:\n  - {attempts}\n"
        f"Fix: {dataset.offline_fix}; online, check the network or the URLs.",
        transient=transient,
    )


def verified(raw: RawFile, data: bytes) -> bytes:
    """The bytes to keep: the checksum first, then (on a match only) the file's structural check."""
    if raw.gunzip:
        data = _decompress(data)
    got = digest(data, raw.algorithm)
    if got != raw.checksum:
        raise MirrorError(f"checksum mismatch ({raw.algorithm} {got[:12]}…, expected {raw.checksum[:12]}…)")
    if raw.check is not None:
        try:
            raw.check(data)
        except BadRawData as exc:
            raise MirrorError(f"checksum ok, but refused: {exc}") from exc
    return data


def digest(data: bytes, algorithm: str) -> str:
    # usedforsecurity=False: md5 is the published checksum for CIFAR-10, an integrity check;
    # without it a FIPS-mode Python refuses md5 outright.
    return hashlib.new(algorithm, data, usedforsecurity=False).hexdigest()


def file_digest(path: Path, algorithm: str) -> str:
    with open(path, "rb") as stream:
        return hashlib.file_digest(stream, lambda: hashlib.new(algorithm, usedforsecurity=False)).hexdigest()


def read_from_mirror(mirror: str, raw: RawFile, opts: FetchParams, sole_file: bool) -> bytes:
    if mirror.startswith(("http://", "https://")):
        return _download(_url_for(mirror, raw), opts)
    location = Path(mirror.removeprefix("file://"))
    if location.is_file():
        return _read_file_mirror(location, raw, sole_file)
    for candidate in (location / name for name in raw.published_names):
        if candidate.is_file():
            return _read(candidate)
    if not location.is_dir():
        raise MirrorError("no such directory or file")
    names = raw.published_names
    raise MirrorError(f"neither {' nor '.join(names)} in it" if len(names) > 1 else f"no {names[0]} in it")


def _url_for(mirror: str, raw: RawFile) -> str:
    """A base URL gets the published name appended; a URL of the file itself is used as is."""
    url = mirror.rstrip("/")
    return url if url.rsplit("/", 1)[-1] in raw.published_names else f"{url}/{raw.published_names[0]}"


def _read_file_mirror(path: Path, raw: RawFile, sole_file: bool) -> bytes:
    """A mirror that is a file holds the dataset's only file (whatever its local name, say a
    browser's `cifar-10-python (1).tar.gz`), or else the file it is named after."""
    if sole_file or path.name in raw.published_names:
        return _read(path)
    raise MirrorError(f"a file, not {' or '.join(raw.published_names)}")


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise MirrorError(f"cannot read {path}: {exc.strerror}") from exc


def _download(url: str, opts: FetchParams) -> bytes:
    """GET with a timeout, retrying transient failures with exponential back-off."""
    for attempt in range(1, opts.retries + 1):
        try:
            return _get(url, opts.timeout_s)
        except urllib.error.HTTPError as exc:
            if exc.code < 500 and exc.code not in (408, 429):  # a 404 will not improve on a retry
                raise MirrorError(f"HTTP {exc.code} {exc.reason}") from exc
            reason = f"HTTP {exc.code} {exc.reason}"
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            reason = str(getattr(exc, "reason", exc)) or exc.__class__.__name__
        except ValueError as exc:  # a malformed URL in fetch.mirrors
            raise MirrorError(f"not a valid URL ({exc})") from exc
        if attempt < opts.retries:
            time.sleep(min(2 ** (attempt - 1), 10))
    raise MirrorError(f"{reason} (after {opts.retries} attempt(s))", transient=True)


def download_to(url: str, target: Path, opts: FetchParams) -> str:
    """Stream `url` into `target` (atomically; memory stays flat however large it is), with
    fetch's timeout and retries; the SHA-256 of what was written. Network failures that may pass
    are a transient AlexopsError (exit 75, retried by the Prefect flow)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.download")
    for attempt in range(1, opts.retries + 1):
        try:
            digest = _stream(url, partial, opts.timeout_s)
            os.replace(partial, target)
            return digest
        except urllib.error.HTTPError as exc:
            if exc.code < 500 and exc.code not in (408, 429):
                raise AlexopsError(
                    f"could not download {url}: HTTP {exc.code} {exc.reason}. Fix: check the URL."
                ) from exc
            reason = f"HTTP {exc.code} {exc.reason}"
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EFBIG, errno.EACCES, errno.EROFS):
                raise AlexopsError(
                    f"cannot write {target}: {exc.strerror}. Fix: check free disk space and permissions."
                ) from exc
            reason = str(getattr(exc, "reason", exc)) or exc.__class__.__name__
        except ValueError as exc:
            raise AlexopsError(f"{url} is not a valid URL ({exc}). Fix: correct the source.") from exc
        finally:
            partial.unlink(missing_ok=True)
        if attempt < opts.retries:
            time.sleep(min(2 ** (attempt - 1), 10))
    raise AlexopsError(
        f"could not download {url}: {reason} (after {opts.retries} attempt(s)). Fix: check the network "
        "or the URL; or download it yourself and give its path as the source.",
        transient=True,
    )


def _stream(url: str, target: Path, timeout_s: float) -> str:
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=timeout_s) as response, open(target, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        written = 0
        with progress.bar(total=total, unit="B", unit_scale=True, desc=url.rsplit("/", 1)[-1]) as bar:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                out.write(chunk)
                digest.update(chunk)
                written += len(chunk)
                bar.update(len(chunk))
    if total is not None and written != total:
        raise OSError(f"connection closed after {written} of {total} bytes")
    return digest.hexdigest()


def _get(url: str, timeout_s: float) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        chunks = []
        with progress.bar(total=total, unit="B", unit_scale=True, desc=url.rsplit("/", 1)[-1]) as bar:
            for chunk in iter(lambda: response.read(1 << 16), b""):
                chunks.append(chunk)
                bar.update(len(chunk))
        data = b"".join(chunks)
    if total is not None and len(data) != total:
        raise OSError(f"connection closed after {len(data)} of {total} bytes")
    return data


def _decompress(data: bytes) -> bytes:
    if data[:2] != b"\x1f\x8b":
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:
        raise MirrorError(f"corrupt gzip data ({exc})") from exc
