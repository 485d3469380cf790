"""Stage `fetch`: the raw dataset files from an ordered mirror list, checksum-verified.

A mirror is a local directory or an http(s) base URL holding `<name>.gz` (or `<name>`).
Checksums are of the decompressed files, because mirrors gzip with different headers.
A file is written (atomically) only after its checksum matched, so a corrupt download is
never kept. Run by hand, a file already present with the right checksum is kept as is
(under `dvc repro` the stage starts from an empty output directory).
"""

from __future__ import annotations

import gzip
import http.client
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

from tqdm import tqdm

from alexops import files
from alexops.datasets import DatasetSpec, spec
from alexops.errors import AlexopsError
from alexops.params import FetchParams, Params
from alexops.paths import Paths


class MirrorError(Exception):
    """One mirror failed for one file; the reason goes into the final report."""


def run(params: Params, paths: Paths) -> None:
    dataset = spec(params.base.dataset)
    unknown = set(params.fetch.checksums) - set(dataset.files)
    if unknown:
        raise AlexopsError(
            f"fetch.checksums names {sorted(unknown)}, not files of {dataset.name}. "
            f"Fix: use the file names {sorted(dataset.files)}."
        )
    for name, sha256 in (dataset.files | params.fetch.checksums).items():
        target = paths.raw / name
        if target.exists() and files.sha256_file(target) == sha256:
            print(f"fetch: {name} present, checksum ok")
            continue
        fetch_file(name, sha256, params.fetch, target, dataset)


def fetch_file(name: str, sha256: str, opts: FetchParams, target: Path, dataset: DatasetSpec) -> None:
    tried = []
    for mirror in opts.mirrors:
        try:
            data = _decompress(read_from_mirror(mirror, name, opts))
        except MirrorError as exc:
            tried.append(f"{mirror}: {exc}")
            continue
        got = files.sha256_bytes(data)
        if got != sha256:
            tried.append(f"{mirror}: checksum mismatch (sha256 {got[:12]}…, expected {sha256[:12]}…)")
            continue
        files.write_bytes(target, data)
        print(f"fetch: {name} from {mirror}, checksum ok")
        return
    attempts = "\n  - ".join(tried)
    raise AlexopsError(
        f"could not fetch {dataset.name} file {name}; tried:\n  - {attempts}\n"
        "Fix: offline, install the Debian mirror (`sudo apt-get install dataset-fashion-mnist`, "
        "files in /usr/share/datasets/fashion-mnist) or copy the files into a directory and list "
        "it first under fetch.mirrors in params.yaml; online, check the network or the URLs."
    )


def read_from_mirror(mirror: str, name: str, opts: FetchParams) -> bytes:
    if mirror.startswith(("http://", "https://")):
        return _download(f"{mirror.rstrip('/')}/{name}.gz", opts)
    directory = Path(mirror.removeprefix("file://"))
    for candidate in (directory / f"{name}.gz", directory / name):
        if candidate.is_file():
            try:
                return candidate.read_bytes()
            except OSError as exc:
                raise MirrorError(f"cannot read {candidate}: {exc.strerror}") from exc
    if not directory.is_dir():
        raise MirrorError("no such directory")
    raise MirrorError(f"neither {name}.gz nor {name} in it")


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
    raise MirrorError(f"{reason} (after {opts.retries} attempt(s))")


def _get(url: str, timeout_s: float) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        chunks = []
        with tqdm(total=total, unit="B", unit_scale=True, desc=url.rsplit("/", 1)[-1]) as bar:
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
