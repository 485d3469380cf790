"""`alexops <stage>`: the one entry point DVC, Prefect and people call.

Two things happen before a stage starts:

- **The project's own code runs.** When the project root holds `src/alexops` and this process
  imported alexops from elsewhere (an editable install points at the workspace, but
  `dvc exp run --temp/--queue` runs each stage in a temporary copy holding the experiment's
  code), the command re-executes itself with that `src/` first on the path.
- **Signals end a stage cleanly.** SIGTERM (systemd, Kubernetes, `docker stop`, Prefect's
  cancel) and SIGHUP raise `Interrupted` like Ctrl-C does, so the stage unwinds: its MLflow run
  ends KILLED, locks are released, child processes stop, checkpoints written so far stay. A
  second Ctrl-C ends the process at once (`kill -9` always does). DVC does not pass SIGTERM on
  to the stage it runs (it dies and leaves the stage running), so on Linux a stage run by DVC
  watches that DVC process and sends itself SIGTERM when it exits (`stop_with_dvc`).

Exit codes: 0 done; 2 an error the user can fix (retrying will fail the same way); 75
(EX_TEMPFAIL) an error that may pass by itself (a network, a server); 128 + N killed by signal N.
"""

from __future__ import annotations

import argparse
import importlib
import multiprocessing
import os
import select
import signal
import sys
import threading
import time
from pathlib import Path

import alexops
from alexops import commands, sweep
from alexops.errors import AlexopsError

STAGES = ("fetch", "prepare", "train", "evaluate", "export", "quantize", "register")
EXIT_USER_ERROR = 2
EXIT_TRANSIENT = 75  # sysexits.h EX_TEMPFAIL: try again later
REEXEC_ENV = "ALEXOPS_SOURCE"  # the src/ a re-executed process was started for (no second re-exec)
GRACEFUL_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
SHELLS = {"sh", "dash", "bash", "zsh", "fish", "ksh", "mksh"}  # what DVC may run a stage's cmd with


class Interrupted(KeyboardInterrupt):
    """A stage stopped by a signal (SIGINT, SIGTERM, SIGHUP); its name is the message."""

    @property
    def signal_number(self) -> int:
        return int(signal.Signals[str(self)]) if str(self) in signal.Signals.__members__ else signal.SIGINT


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alexops", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--root", default=".", help="project root holding data/ and artifacts/")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for stage in STAGES:
        sub.add_parser(stage, help=f"run the {stage} stage")
    commands.add_parsers(sub)  # serve, predict: not stages, each with its own arguments
    sweep.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if argv is None:  # a command line of its own (not a call from Python): it may re-execute
            run_project_source(Path(args.root))
        if args.command in commands.NAMES:
            return commands.run(args)
        handle_signals()
        if args.command == "sweep":
            return sweep.run(args)
        return run_stage(args.command, Path(args.params), Path(args.root))
    except AlexopsError as exc:
        print(f"alexops {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_TRANSIENT if exc.transient else EXIT_USER_ERROR
    except KeyboardInterrupt as exc:
        for child in multiprocessing.active_children():
            child.terminate()
        stopped_by = str(exc) if isinstance(exc, Interrupted) else "SIGINT"
        print(f"alexops {args.command}: stopped by {stopped_by}; completed outputs are kept", file=sys.stderr)
        return 128 + (exc.signal_number if isinstance(exc, Interrupted) else signal.SIGINT)


def run_project_source(root: Path) -> None:
    """Re-execute with `<root>/src` first on the path when that is not the alexops imported."""
    source = (root / "src").resolve()
    if not (source / "alexops" / "__init__.py").is_file():
        return
    imported_from = Path(alexops.__file__).resolve().parent.parent
    if imported_from == source:
        return
    if os.environ.get(REEXEC_ENV) == str(source):
        raise AlexopsError(
            f"{source}/alexops is the project's code, but Python imports alexops from {imported_from}. "
            f"Fix: remove what shadows it (PYTHONPATH, a .pth file), or run from {imported_from.parent}."
        )
    path = os.pathsep.join(filter(None, (str(source), os.environ.get("PYTHONPATH"))))
    env = os.environ | {"PYTHONPATH": path, REEXEC_ENV: str(source)}
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", "alexops.cli", *sys.argv[1:]], env)


def handle_signals() -> None:
    for number in GRACEFUL_SIGNALS:
        signal.signal(number, _interrupt)
    stop_with_dvc()


def stop_with_dvc() -> None:
    """Linux: get SIGTERM when the DVC running this stage dies.

    DVC runs a stage as `$SHELL -c <cmd>`. bash executes a lone command in its own process, so
    DVC is the parent; dash (/bin/sh on Debian, DVC's shell when SHELL is unset, as under
    systemd, cron or CI) forks it, so DVC is the grandparent. Either way a thread waits on a
    pidfd of that DVC process (Linux >= 5.3) and signals this process when DVC exits."""
    dvc = _dvc_running_this()
    if dvc is None:
        return
    try:
        pidfd = os.pidfd_open(dvc)
    except ProcessLookupError:
        pidfd = None
    except (AttributeError, OSError):  # not Linux 5.3+
        return
    if pidfd is None or _dvc_running_this() != dvc:  # DVC died (its pid may be reused) meanwhile
        os.kill(os.getpid(), signal.SIGTERM)
        return
    threading.Thread(target=_signal_when_readable, args=(pidfd,), name="dvc-watch", daemon=True).start()


def _dvc_running_this() -> int | None:
    """DVC's pid when DVC started this process, directly or through a `<shell> -c`."""
    pid = os.getppid()
    for _ in range(2):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):  # no /proc: not Linux
            return None
        if any(Path(arg.decode(errors="replace")).name == "dvc" for arg in argv[:3]):
            return pid
        if Path(argv[0].decode(errors="replace")).name not in SHELLS or b"-c" not in argv:
            return None
        pid = parent
    return None


def _signal_when_readable(pidfd: int) -> None:
    select.select([pidfd], [], [])  # a pidfd turns readable when its process exits
    os.kill(os.getpid(), signal.SIGTERM)


def _interrupt(number: int, frame) -> None:
    # Unwinding takes a moment. A second Ctrl-C ends it at once; a repeated SIGTERM or SIGHUP does
    # not: a stop that signals the whole process group and DVC's death each deliver one.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    raise Interrupted(signal.Signals(number).name)


def run_stage(stage: str, params_path: Path, root: Path) -> int:
    # params are validated before the stage module (and torch, mlflow) is even imported
    from alexops import params as params_module
    from alexops.paths import Paths

    params = params_module.load(params_path)
    paths = Paths(root.resolve(), params.base.dataset)
    started = time.perf_counter()
    importlib.import_module(f"alexops.{stage}").run(params, paths)
    print(f"alexops {stage}: done in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
