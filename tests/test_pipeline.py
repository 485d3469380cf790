"""The whole pipeline under a real `dvc repro`, in a temporary git + DVC repository."""

import json
import re

import numpy as np
import onnxruntime as ort
import yaml
from conftest import VENV_BIN, run


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '([\w-]+)'", output)


def registry(env: dict):
    import mlflow

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    return mlflow.MlflowClient()


def mlflow_model_info(env: dict, uri: str):
    import mlflow

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    return mlflow.models.get_model_info(uri)


def test_dvc_repro_end_to_end_then_up_to_date_then_partial_rerun(workspace, ws_env):
    dvc = f"{VENV_BIN}/dvc"
    first = run([dvc, "repro"], workspace, ws_env)
    assert stages_run(first.stdout) == ["fetch", "prepare", "train", "evaluate", "export", "register"]

    reports = workspace / "reports" / "fashion-mnist"
    evaluation = json.loads((reports / "evaluate.json").read_text())
    assert 0.0 <= evaluation["accuracy"] <= 1.0
    assert {"accuracy_center_crop", "accuracy_ten_crop"} <= evaluation.keys()
    assert len(evaluation["per_class_accuracy"]) == 10
    assert (reports / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((reports / "confusion.csv").read_text().splitlines()) == 1 + 80

    metrics = run([dvc, "metrics", "show", "--json"], workspace, ws_env)
    assert "accuracy" in metrics.stdout

    onnx_path = workspace / "artifacts" / "fashion-mnist" / "model.onnx"
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    for n in (1, 5):
        logits = session.run(None, {"image": np.zeros((n, 1, 67, 67), np.float32)})[0]
        assert logits.shape == (n, 10)

    record = json.loads((reports / "register.json").read_text())
    client = registry(ws_env)
    champion = client.get_model_version_by_alias("alexnet-fashion-mnist", "champion")
    assert str(champion.version) == record["version"] == "1"
    assert champion.run_id == record["run_id"]
    run_data = client.get_run(record["run_id"]).data
    assert "test_accuracy" in run_data.metrics and "train_loss" in run_data.metrics
    assert run_data.params["train.epochs"] == "2"
    assert any(k.startswith("dvc.prepare.") for k in run_data.tags)
    info = mlflow_model_info(ws_env, "models:/alexnet-fashion-mnist@champion")
    assert info.signature.inputs.inputs[0].shape == (-1, 1, 67, 67)
    assert info.signature.outputs.inputs[0].shape == (-1, 10)

    second = run([dvc, "repro"], workspace, ws_env)
    assert stages_run(second.stdout) == []
    assert "up to date" in second.stdout

    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["train"]["epochs"] = 1
    (workspace / "params.yaml").write_text(yaml.safe_dump(params))
    third = run([dvc, "repro"], workspace, ws_env)
    assert stages_run(third.stdout) == ["train", "evaluate", "export", "register"]
    latest = json.loads((reports / "register.json").read_text())
    assert latest["version"] == "2" and latest["previous_champion"] == "1"
    promoted = latest["accuracy"] >= record["accuracy"]
    assert latest["alias"] == ("champion" if promoted else "challenger")
    assert str(client.get_model_version_by_alias("alexnet-fashion-mnist", "champion").version) == (
        "2" if promoted else "1"
    )


def test_a_stage_failure_prints_one_clear_error(workspace, ws_env):
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["fetch"]["mirrors"] = [str(workspace / "no-such-mirror")]
    (workspace / "params.yaml").write_text(yaml.safe_dump(params))
    done = run([f"{VENV_BIN}/dvc", "repro"], workspace, ws_env, check=False)
    assert done.returncode != 0
    assert "could not fetch fashion-mnist" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (workspace / "data" / "raw" / "fashion-mnist" / "train-images-idx3-ubyte").exists()
