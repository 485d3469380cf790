"""Atomic writes: a crash or a full disk never leaves a half-written output behind."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from alexops.errors import AlexopsError


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it over `target` only on success."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as exc:
        raise AlexopsError(
            f"cannot write {target}: {exc.strerror or exc}. "
            "Fix: make the directory writable and check free disk space."
        ) from exc
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes 0600 files; outputs are read by servers and other users too
        os.chmod(tmp_path, 0o666 & ~_umask())
        with open(tmp_path, "rb") as written:  # on disk before the rename makes it visible
            os.fsync(written.fileno())
        os.replace(tmp_path, target)
    except OSError as exc:
        raise AlexopsError(
            f"cannot write {target}: {exc.strerror or exc}. "
            "Fix: check free disk space and permissions; nothing was overwritten."
        ) from exc
    finally:
        tmp_path.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(target: Path, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def save_torch(target: Path, obj: Any) -> None:
    """torch.save, atomically; serialised in memory first because torch reports a failed
    write (a full disk) as a RuntimeError from deep inside its zip writer."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes(target, buffer.getvalue())


def write_text(target: Path, text: str) -> None:
    write_bytes(target, text.encode())


def write_json(target: Path, obj: Any) -> None:
    write_text(target, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: Path, produced_by: str) -> Any:
    """Read a JSON file another stage wrote; a missing or broken one names that stage."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise AlexopsError(
            f"{path} is missing. Fix: run `alexops {produced_by}` (or `dvc repro`) first."
        ) from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AlexopsError(
            f"{path} is not valid JSON ({exc}). Fix: rerun `dvc repro -f {produced_by}`."
        ) from exc


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file's bytes, hex. Read into one reused buffer (`hashlib.file_digest`):
    half the time of reading it in fresh blocks on a 393 MB cache."""
    with open(path, "rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()
