"""The whole pipeline under a real `dvc repro`, in a temporary git + DVC repository."""

import json
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import yaml
from conftest import REPO, VENV_BIN, run


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


def commit_all(root, message: str) -> None:
    run(["git", "add", "-A"], root)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", message], root)


def test_the_pipeline_end_to_end_and_what_users_do_with_it(workspace, ws_env, tmp_path, tiny_cifar10_mirror):
    """One `dvc repro` from nothing (the slow part), then each way users meet its results."""
    dvc = f"{VENV_BIN}/dvc"
    run([dvc, "remote", "add", "-d", "shared", str(tmp_path / "remote")], workspace, ws_env)
    commit_all(workspace, "remote")
    first = run([dvc, "repro"], workspace, ws_env)
    assert stages_run(first.stdout) == [
        "fetch", "prepare", "train", "evaluate", "export", "quantize", "register",
    ]  # fmt: skip
    assert "WARNING" not in first.stdout + first.stderr  # e.g. MLflow on a GPU provider a CPU host lacks
    check_outputs_and_registry(workspace, ws_env)
    check_lineage_from_the_champion(workspace, ws_env)
    check_plots(workspace, ws_env, tmp_path / "plots")

    second = run([dvc, "repro"], workspace, ws_env)
    assert stages_run(second.stdout) == []
    assert "up to date" in second.stdout

    check_a_retrained_identical_model_reports_but_is_not_registered_again(workspace, ws_env)
    check_push_then_pull_into_a_fresh_clone(workspace, ws_env, tmp_path / "clone")
    check_an_experiment_misses_the_gate(workspace, ws_env)
    check_a_lowered_gate_decides_the_same_weights_again(workspace, ws_env)
    check_a_second_dataset_leaves_the_first_alone(workspace, ws_env, tiny_cifar10_mirror)


def check_outputs_and_registry(workspace, ws_env) -> None:
    dvc = f"{VENV_BIN}/dvc"
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
    info = mlflow_model_info(ws_env, "models:/alexnet-fashion-mnist@champion")
    assert info.signature.inputs.inputs[0].shape == (-1, 1, 67, 67)
    assert info.signature.outputs.inputs[0].shape == (-1, 10)


def check_lineage_from_the_champion(workspace, ws_env) -> None:
    """@champion → version → run → git commit and the data hash in dvc.lock."""
    client = registry(ws_env)
    champion = client.get_model_version_by_alias("alexnet-fashion-mnist", "champion")
    logged = client.get_run(champion.run_id)
    head = run(["git", "rev-parse", "HEAD"], workspace).stdout.strip()
    assert logged.data.tags["git.commit"] == head and logged.data.tags["git.dirty"] == "false"
    lock = yaml.safe_load((workspace / "dvc.lock").read_text())["stages"]
    data_hash = lock["prepare"]["outs"][0]["md5"]
    assert logged.data.tags["dvc.prepare.data/prepared/fashion-mnist"] == data_hash
    assert [d.dataset.digest for d in logged.inputs.dataset_inputs] == [data_hash]
    model_hash = lock["export"]["outs"][0]["md5"]
    assert logged.data.tags["dvc.export.artifacts/fashion-mnist/model.onnx"] == model_hash
    assert "test accuracy" in champion.description.lower()
    artifacts = {a.path for a in client.list_artifacts(champion.run_id, "train")}
    assert {"train/curves.png", "train/train_history.csv"} <= artifacts


def check_plots(workspace, ws_env, out) -> None:
    """Exactly the declared plots, each once: two curves, the confusion matrix, two PNGs."""
    shown = json.loads(run([f"{VENV_BIN}/dvc", "plots", "show", "--json"], workspace, ws_env).stdout)["data"]
    assert sorted(shown) == sorted(
        [
            "loss",
            "accuracy",
            "confusion",
            "reports/fashion-mnist/confusion.png",
            "reports/fashion-mnist/curves.png",
        ]
    )
    run([f"{VENV_BIN}/dvc", "plots", "show", "-o", str(out)], workspace, ws_env)
    assert "confusion" in (out / "index.html").read_text()
    check_look(workspace, ws_env)


def check_look(workspace, ws_env) -> None:
    """`make look`: the pictures of a batch as the model sees it, the model summary and the worst
    test images, rendered by `dvc plots` apart from the five, each from this run's outputs."""
    makefile = str(REPO / "Makefile")
    run(["make", "-s", "-f", makefile, "look", f"VENV={Path(VENV_BIN).parent}"], workspace, ws_env)
    page = (workspace / "dvc_plots" / "look" / "index.html").read_text()
    for name in ("augmented.png", "model_summary.png", "mistakes.png"):
        shown = workspace / "dvc_plots" / "look" / "static" / f"workspace_reports_fashion-mnist_{name}"
        assert shown.read_bytes() == (workspace / "reports" / "fashion-mnist" / name).read_bytes()
        assert f"reports/fashion-mnist/{name}" in page


def check_a_retrained_identical_model_reports_but_is_not_registered_again(workspace, ws_env) -> None:
    """A forced retraining with the same params and seed gives version 1's weights: the new
    MLflow run gets its test metrics and evaluation (the stages after train depend on the run
    it opened, so none is restored from DVC's run-cache), and it names version 1 instead of
    registering a copy."""
    dvc = f"{VENV_BIN}/dvc"
    first = registry(ws_env).get_model_version("alexnet-fashion-mnist", "1").run_id
    run([dvc, "repro", "--force", "--single-item", "train"], workspace, ws_env)
    again = run([dvc, "repro"], workspace, ws_env)
    assert stages_run(again.stdout) == ["evaluate", "export", "quantize", "register"]
    record = json.loads((workspace / "reports" / "fashion-mnist" / "register.json").read_text())
    assert record["run_id"] != first and record["registered"] is False
    assert (record["version"], record["alias"]) == ("1", "champion") and "identical weights" in record[
        "reason"
    ]
    client = registry(ws_env)
    assert len(client.search_model_versions("name='alexnet-fashion-mnist'")) == 1
    logged = client.get_run(record["run_id"])
    assert "test_accuracy" in logged.data.metrics and logged.data.tags["registered_version"] == "1"
    assert "evaluate/confusion.csv" in {a.path for a in client.list_artifacts(record["run_id"], "evaluate")}


def check_a_lowered_gate_decides_the_same_weights_again(workspace, ws_env) -> None:
    """Version 2 failed register.min_accuracy 1.0; with the floor lowered, register reruns alone,
    finds version 2's weights, and passes them through the gate again instead of keeping the old
    verdict. It records into a run nested under version 2's, named after what changed."""
    dvc = f"{VENV_BIN}/dvc"
    again = run([dvc, "exp", "run", "-S", "register.min_accuracy=0.0"], workspace, ws_env)
    assert stages_run(again.stdout) == ["register"]
    client = registry(ws_env)
    version = client.get_model_version("alexnet-fashion-mnist", "2")
    assert version.tags["gate"] == "passed" and "min_accuracy" not in version.tags["decision"]
    best = max(
        client.search_model_versions("name='alexnet-fashion-mnist'"), key=lambda v: float(v.tags["accuracy"])
    )
    champion = client.get_model_version_by_alias("alexnet-fashion-mnist", "champion")
    assert float(champion.tags["accuracy"]) == float(best.tags["accuracy"])
    nested = client.search_runs([client.get_run(version.run_id).info.experiment_id],
                                filter_string=f"tags.`mlflow.parentRunId` = '{version.run_id}'")  # fmt: skip
    assert [r.info.run_name for r in nested] == ["register: register.min_accuracy=0.0"]
    assert client.get_run(version.run_id).info.status == "FINISHED"  # version 2's own run is untouched

    # no accuracy beats a constant answer at significance 0: the same weights fail the gate again
    run([dvc, "exp", "run", "-S", "register.significance=0.0"], workspace, ws_env)
    record = json.loads((workspace / "reports" / "fashion-mnist" / "register.json").read_text())
    assert (record["version"], record["alias"], record["significance"]) == ("2", "challenger", 0.0)
    assert "for every image" in record["reason"] and "register.significance 0" in record["reason"]
    assert registry(ws_env).get_model_version("alexnet-fashion-mnist", "2").tags["gate"] == "failed"


def check_push_then_pull_into_a_fresh_clone(workspace, ws_env, clone) -> None:
    dvc = f"{VENV_BIN}/dvc"
    run([dvc, "push"], workspace, ws_env)
    commit_all(workspace, "results")
    run(["git", "clone", "-q", str(workspace), str(clone)], workspace)
    run([dvc, "pull"], clone, ws_env)
    for path in ("data/prepared/fashion-mnist/train.pt", "artifacts/fashion-mnist/model.onnx"):
        assert (clone / path).read_bytes() == (workspace / path).read_bytes()
    status = run([dvc, "status"], clone, ws_env).stdout
    assert "up to date" in status, status


def check_an_experiment_misses_the_gate(workspace, ws_env) -> None:
    """`dvc exp run -S`: params for this run, listed by `dvc exp show`; the gate keeps its
    model out of @champion since it misses register.min_accuracy."""
    dvc = f"{VENV_BIN}/dvc"
    flags = ["-S", "train.epochs=1", "-S", "register.min_accuracy=1.0"]
    third = run([dvc, "exp", "run", *flags], workspace, ws_env)
    assert stages_run(third.stdout) == ["train", "evaluate", "export", "quantize", "register"]
    evaluation = json.loads((workspace / "reports" / "fashion-mnist" / "evaluate.json").read_text())
    assert evaluation["accuracy"] < 1.0  # so min_accuracy=1.0 must hold it back
    latest = json.loads((workspace / "reports" / "fashion-mnist" / "register.json").read_text())
    assert latest["version"] == "2" and latest["previous_champion"] == "1"
    assert latest["alias"] == "challenger" and "register.min_accuracy" in latest["reason"]
    client = registry(ws_env)
    assert str(client.get_model_version_by_alias("alexnet-fashion-mnist", "champion").version) == "1"
    assert "min_accuracy" in client.get_model_version("alexnet-fashion-mnist", "2").tags["decision"]
    shown = run([dvc, "exp", "show", "--no-pager", "--md"], workspace, ws_env).stdout
    assert "accuracy" in shown and "train.epochs" in shown


def check_a_second_dataset_leaves_the_first_alone(workspace, ws_env, cifar10_mirror) -> None:
    """CIFAR-10: its own outputs, MLflow experiment and registered model."""
    kept = {p: p.read_bytes() for p in (workspace / "artifacts" / "fashion-mnist").iterdir()}
    client = registry(ws_env)
    fashion_versions = client.search_model_versions("name='alexnet-fashion-mnist'")
    fashion_champion = client.get_model_version_by_alias("alexnet-fashion-mnist", "champion").version
    # `dvc exp run -S` left its values in the workspace params.yaml: back to the committed ones
    run(["git", "checkout", "params.yaml"], workspace)
    mirror, checksums = cifar10_mirror
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["base"]["dataset"] = "cifar10"
    params["fetch"] |= {"mirrors": [str(mirror)], "checksums": checksums}
    (workspace / "params.yaml").write_text(yaml.safe_dump(params))
    run([f"{VENV_BIN}/dvc", "repro"], workspace, ws_env)
    assert {p: p.read_bytes() for p in kept} == kept
    record = json.loads((workspace / "reports" / "cifar10" / "register.json").read_text())
    assert (record["model_name"], record["version"], record["alias"]) == ("alexnet-cifar10", "1", "champion")
    info = mlflow_model_info(ws_env, "models:/alexnet-cifar10@champion")
    assert info.signature.inputs.inputs[0].shape == (-1, 3, 67, 67)
    assert len(client.search_model_versions("name='alexnet-fashion-mnist'")) == len(fashion_versions)
    assert client.get_model_version_by_alias("alexnet-fashion-mnist", "champion").version == fashion_champion
    fashion_run = client.get_model_version("alexnet-fashion-mnist", "1").run_id
    assert (
        client.get_run(record["run_id"]).info.experiment_id != client.get_run(fashion_run).info.experiment_id
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
