"""`python -m alexops.summary`: the headline of the last pipeline run, as `make run` ends."""

from __future__ import annotations

import sys
from pathlib import Path

from alexops import files, params
from alexops.errors import AlexopsError
from alexops.paths import Paths


def main() -> int:
    try:
        paths = Paths(Path.cwd(), params.load("params.yaml").base.dataset)
        evaluation = files.read_json(paths.reports / "evaluate.json", produced_by="evaluate")
        record = files.read_json(paths.reports / "register.json", produced_by="register")
    except AlexopsError as exc:
        print(f"summary: {exc}", file=sys.stderr)
        return 2
    print(
        f"test accuracy {evaluation['accuracy']:.4f} ({paths.dataset}, "
        f"{'10-crop' if evaluation['ten_crop'] else 'centre crop'}); "
        f"registered {record['model_name']} version {record['version']} as @{record['alias']} "
        f"({record['reason']})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
