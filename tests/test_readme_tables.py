"""The README's benchmark tables are what benchmarks/results says (benchmarks/readme_tables.py)."""

import subprocess
import sys

from conftest import REPO


def test_readme_benchmark_tables_match_the_results_files():
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "readme_tables.py"), "--check"],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
