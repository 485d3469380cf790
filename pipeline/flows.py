"""The alexops pipeline as a Prefect flow.

Each task runs one dvc.yaml stage through DVC (`dvc repro --single-item <stage>`), which
calls `alexops <stage>`: DVC keeps owning what is up to date and cached, Prefect adds
scheduling, retries, logs and the UI view. Run it on Prefect's temporary local server:

    python -m pipeline.flows [--workspace DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run

from alexops.cli import STAGES  # dvc.yaml's stages in order; tests/test_flow.py holds them together
from alexops.tracking import PREFECT_FLOW_RUN_ENV


class StageFailed(RuntimeError):
    pass


def dvc_executable() -> str:
    """The dvc beside this interpreter (the project's venv), else the one on PATH."""
    beside = Path(sys.executable).with_name("dvc")
    return str(beside) if beside.exists() else (shutil.which("dvc") or "dvc")


@task(task_run_name="{stage}")
def run_stage(stage: str, workspace: str) -> None:
    logger = get_run_logger()
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if flow_run.id:
        env[PREFECT_FLOW_RUN_ENV] = str(flow_run.id)
    command = [dvc_executable(), "repro", "--single-item", stage]
    logger.info("running %s in %s", " ".join(command), workspace)
    done = subprocess.run(command, cwd=workspace, env=env, capture_output=True, text=True)
    for line in (done.stdout + done.stderr).split("\n"):
        shown = line.rsplit("\r", 1)[-1].strip()  # a progress bar's last state, as a terminal shows it
        if shown:
            logger.info(shown)
    if done.returncode != 0:
        raise StageFailed(f"stage {stage} failed (exit {done.returncode}):\n{done.stderr[-2000:]}")


@flow(name="alexops-pipeline", log_prints=True)
def pipeline(workspace: str = ".") -> None:
    """fetch → prepare → train → evaluate → export → register, as in dvc.yaml."""
    workspace = str(Path(workspace).resolve())
    for stage in STAGES:
        # the network is the flaky part: fetch retries with back-off, the rest fail fast
        retries = {"retries": 3, "retry_delay_seconds": [10, 30, 90]} if stage == "fetch" else {}
        run_stage.with_options(**retries)(stage, workspace)


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the alexops pipeline as a Prefect flow.")
    parser.add_argument("--workspace", default=".", help="the DVC workspace (default: .)")
    pipeline(workspace=parser.parse_args().workspace)


if __name__ == "__main__":
    main()
