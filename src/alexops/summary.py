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
    print(headline(paths.dataset, evaluation, record))
    return 0


def headline(dataset: str, evaluation: dict, record: dict) -> str:
    """Test accuracy, the version registered and why, and where the rest is: three short lines
    where `dvc metrics show` prints one line of some forty columns."""
    accuracy = f"{evaluation['accuracy']:.4f} ({'10-crop' if evaluation['ten_crop'] else 'centre crop'})"
    if evaluation["ten_crop"]:
        accuracy += f", {evaluation['accuracy_center_crop']:.4f} (centre crop)"
    version = f"{record['model_name']} version {record['version']}"
    return "\n".join([
        f"{dataset}: test accuracy {accuracy}",
        f"registered {version} as @{record['alias']}: {record['reason']}",
        f"every metric: dvc metrics show; the curves and pictures: dvc plots show, reports/{dataset}",
    ])  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
