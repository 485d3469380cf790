"""`python -m stack up|down|status|env [--dir DIR]`: what `make stack` and `make stack-down` run."""

from __future__ import annotations

import argparse
import sys

from stack.services import DVC_BUCKET, STATE_ENV, Stack, StackError, default_state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stack", description=__doc__)
    parser.add_argument("command", choices=("up", "down", "status", "env"))
    parser.add_argument("--dir", default=None, help=f"state directory (default: ${STATE_ENV} or .stack)")
    args = parser.parse_args(argv)
    stack = Stack(args.dir or default_state())
    try:
        if args.command == "up":
            stack.up()
            print(next_steps(stack))
        elif args.command == "down":
            stack.down()
        elif args.command == "status":
            states = stack.status()
            for service, up in states.items():
                print(f"{service:9} {'up' if up else 'down'}")
            return 0 if all(states.values()) else 1
        else:
            print(stack.env_file_text(), end="")
    except StackError as exc:
        print(f"stack: error: {exc}", file=sys.stderr)
        return 2
    return 0


def next_steps(stack: Stack) -> str:
    env = stack.state / "env"
    return "\n".join(
        [
            f"stack: ready. MLflow UI {stack.url('mlflow')}, Prefect UI {stack.url('prefect')}",
            "Use it from this shell, and push data and models to its S3 remote:",
            f"  source {env}",
            f"  .venv/bin/dvc remote add --local -d stack s3://{DVC_BUCKET}",
            "  .venv/bin/dvc remote modify --local stack endpointurl $AWS_ENDPOINT_URL_S3",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
