"""`alexops <stage>`: the one entry point DVC, Prefect and people call."""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

from alexops import commands
from alexops.errors import AlexopsError

STAGES = ("fetch", "prepare", "train", "evaluate", "export", "quantize", "register")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alexops", description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--root", default=".", help="project root holding data/ and artifacts/")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for stage in STAGES:
        sub.add_parser(stage, help=f"run the {stage} stage")
    commands.add_parsers(sub)  # serve, predict: not stages, each with its own arguments
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command in commands.NAMES:
            return commands.run(args)
        return run_stage(args.command, Path(args.params), Path(args.root))
    except AlexopsError as exc:
        print(f"alexops {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"alexops {args.command}: interrupted; completed outputs are kept", file=sys.stderr)
        return 130


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
