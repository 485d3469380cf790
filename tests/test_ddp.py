"""DDP under a real torchrun: two CPU processes (gloo) on tiny data."""

import json
import subprocess
import sys

import mlflow
import yaml
from conftest import stage_command

from alexops import files


def torchrun_train(root) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node=2 -m alexops.cli train`: two CPU ranks over gloo."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m"]
    command = [*launcher, *stage_command(root, "train")[2:]]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def test_two_process_ddp_trains_identical_weights_into_one_mlflow_run(prepared, tmp_path):
    raw = yaml.safe_load((prepared / "params.yaml").read_text())
    raw["train"] |= {"epochs": 2, "batch_size": 32}
    (prepared / "params.yaml").write_text(yaml.safe_dump(raw))
    done = torchrun_train(prepared)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "weights identical on all 2 ranks" in done.stdout
    assert "× 2 process(es)" in done.stdout

    artifacts = prepared / "artifacts" / "fashion-mnist"
    assert (artifacts / "model.pt").exists()
    report = json.loads((prepared / "reports" / "fashion-mnist" / "train.json").read_text())
    assert report["epochs"] == 2

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert len(runs) == 1
    assert runs[0].info.run_id == files.read_json(artifacts / "mlflow_run.json", "train")["run_id"]
    history = mlflow.MlflowClient().get_metric_history(runs[0].info.run_id, "train_loss")
    assert [m.step for m in history] == [1, 2]  # one record per epoch, not one per rank


def test_a_batch_that_does_not_split_over_the_ranks_is_a_clear_error(prepared):
    raw = yaml.safe_load((prepared / "params.yaml").read_text())
    raw["train"]["batch_size"] = 33
    (prepared / "params.yaml").write_text(yaml.safe_dump(raw))
    done = torchrun_train(prepared)
    assert done.returncode != 0
    assert "must divide evenly over 2 processes" in done.stderr
    assert not (prepared / "artifacts" / "fashion-mnist" / "model.pt").exists()
