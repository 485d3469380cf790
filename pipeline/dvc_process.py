"""`dvc` as a flow's child process: live output, a clean stop, and what a dead run leaves behind.

- **Live, ordered output.** stdout and stderr are one pipe, read as it is written (the stages
  run with PYTHONUNBUFFERED), split into lines. A progress bar rewrites its line with `\\r`:
  its states come out at most once per `progress_interval_s`, and its final state with the
  newline that ends it.
- **A clean stop.** dvc runs in a process group of its own, so the flow decides how it ends:
  SIGINT to the group first, as Ctrl-C in a terminal does (the stage ends its MLflow run
  KILLED and DVC deletes a `--temp` copy), then SIGTERM, then SIGKILL. If the flow's own
  process dies, the kernel sends dvc SIGTERM (PR_SET_PDEATHSIG), and dvc's death does the same
  to its stage (`alexops.cli`).
- **Leftovers.** A `dvc exp run --temp` that died by SIGTERM or SIGKILL leaves its copy in
  `.dvc/tmp/exps/standalone/`, which `dvc exp show` lists as Running for ever;
  `remove_dead_experiment_copies` deletes copies in which no process runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from alexops.sweep import dvc_executable

PROGRESS_INTERVAL_S = 10.0
_LINE_END = re.compile(rb"\r\n|\n|\r")
EXPERIMENTS_TMP = Path(".dvc") / "tmp" / "exps"


# Exec'd in front of dvc on Linux: SIGTERM to dvc when the flow's process dies. A wrapper rather
# than preexec_fn, which can deadlock in a process with threads (Prefect runs several).
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "parent = os.getppid()\n"
    "ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG\n"
    "if os.getppid() != parent: sys.exit(143)\n"
    "os.execvp(sys.argv[1], sys.argv[1:])"
)


def _launcher() -> list[str]:
    return [sys.executable, "-c", _DIE_WITH_PARENT] if sys.platform.startswith("linux") else []


class DvcProcess:
    """One `dvc` command, started at once; iterate `lines()` to follow it to its end."""

    def __init__(self, args: list[str], workspace: Path, env: dict[str, str]) -> None:
        self.command = [dvc_executable(), *args]
        self.process = subprocess.Popen(
            [*_launcher(), *self.command],
            cwd=workspace,
            env=env | {"PYTHONUNBUFFERED": "1"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def lines(self, progress_interval_s: float = PROGRESS_INTERVAL_S) -> Iterator[str]:
        """Each output line as it is written; progress-bar states throttled."""
        buffer, last_progress = b"", 0.0
        for chunk in iter(lambda: os.read(self.process.stdout.fileno(), 65536), b""):
            buffer += chunk
            while (end := _LINE_END.search(buffer)) is not None:
                if end.group() == b"\r" and end.end() == len(buffer):
                    break  # perhaps the first half of \r\n: wait for the next chunk
                text, buffer = buffer[: end.start()].decode(errors="replace").rstrip(), buffer[end.end() :]
                if end.group() != b"\r":
                    if text:
                        yield text
                elif text and time.monotonic() - last_progress >= progress_interval_s:
                    last_progress = time.monotonic()
                    yield text
        if buffer.strip():
            yield buffer.decode(errors="replace").rstrip()
        self.process.wait()

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def stop(self, interrupt_s: float = 15.0, terminate_s: float = 3.0) -> None:
        """Ctrl-C to dvc and its stage; SIGTERM after `interrupt_s`, SIGKILL `terminate_s` later.
        Within Prefect's 30 s between its cancel's SIGTERM and its SIGKILL, with time to spare."""
        for number, wait_s in (
            (signal.SIGINT, interrupt_s),
            (signal.SIGTERM, terminate_s),
            (signal.SIGKILL, None),
        ):
            if self.process.poll() is not None:
                return
            try:
                os.killpg(self.process.pid, number)
            except ProcessLookupError:
                return
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=wait_s)


def remove_dead_experiment_copies(workspace: Path) -> list[Path]:
    """Delete the temporary copies of `dvc exp run --temp` runs that died, when no experiment is
    running in this workspace (a live one may still be filling its copy from the workspace).

    DVC lists such a run as Running while its copy exists (its record under
    `.dvc/tmp/exps/run/` says so); with the copy gone it stops listing it, as after Ctrl-C.
    """
    if _experiment_running(workspace):
        return []
    removed = []
    for record in sorted((workspace / EXPERIMENTS_TMP / "run").glob("*/*.run")):
        try:
            info = json.loads(record.read_text())
        except (OSError, ValueError):
            continue
        copy = Path(info.get("root_dir") or "")
        inside = copy.is_relative_to(workspace / EXPERIMENTS_TMP / "standalone")
        if info.get("location") == "tempdir" and inside and copy.is_dir():
            shutil.rmtree(copy, ignore_errors=True)
            removed.append(copy)
    return removed


def _experiment_running(workspace: Path) -> bool:
    """Is a `dvc exp run` (or a stage it started) at work in this workspace or one of its copies?
    (Linux /proc: the processes' command lines and working directories.)"""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            command = (proc / "cmdline").read_bytes().split(b"\0")
            cwd = Path(os.readlink(proc / "cwd"))
        except OSError:  # gone meanwhile, or not ours to read
            continue
        dvc_exp = any(part.endswith(b"dvc") for part in command) and b"exp" in command
        in_copy = cwd.is_relative_to(workspace / EXPERIMENTS_TMP)
        if (dvc_exp and cwd.is_relative_to(workspace)) or in_copy:
            return True
    return False
