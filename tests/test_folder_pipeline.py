"""A folder of images through the whole pipeline under a real `dvc repro`, served by its class names."""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys

import httpx
import numpy as np
import yaml
from conftest import VENV_BIN, run
from imagesets import CLASSES, encode, shape_image, write_folder
from test_pipeline import commit_all, registry, stages_run
from test_serve import start_server, stop_server

from alexops import register
from alexops.prepare import load_split
from alexops.serving.model import load_model

DVC = f"{VENV_BIN}/dvc"
STAGES = ["fetch", "prepare", "train", "evaluate", "export", "quantize", "register"]


def digests(folder) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file()
    }


def test_a_folder_dataset_trains_registers_and_serves_its_class_names(workspace, ws_env, tmp_path):
    run([DVC, "remote", "add", "-d", "shared", str(tmp_path / "remote")], workspace, ws_env)
    run([DVC, "repro", "fetch"], workspace, ws_env)  # the built-in dataset's raw data, left alone below
    built_in = digests(workspace / "data" / "raw" / "fashion-mnist")

    images = workspace / "datasets" / "shapes"
    write_folder(images, per_class=14, size=(48, 64))
    (images / "square" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    run([DVC, "add", "datasets/shapes"], workspace, ws_env)  # the raw images: a DVC-tracked input
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["base"]["dataset"] = "shapes"
    params["datasets"] = {"shapes": {"source": "datasets/shapes", "test_fraction": 0.25}}
    params["prepare"]["bad_files"] = "skip"
    params["train"] |= {"epochs": 3, "val_size": 6, "batch_size": 8}
    params["quantize"]["calibration_images"] = 16
    (workspace / "params.yaml").write_text(yaml.safe_dump(params))
    commit_all(workspace, "the shapes dataset")

    # a data memory budget below the training images' size: train streams them from the memory map
    first = run([DVC, "repro"], workspace, ws_env | {"ALEXOPS_DATA_MEMORY": "10K"})
    assert stages_run(first.stdout) == STAGES
    assert "each batch is read from the memory map" in first.stdout
    assert "memory budget (10.0 KiB, ALEXOPS_DATA_MEMORY)" in first.stdout
    assert "\r" not in first.stdout + first.stderr  # progress bars in a log: whole lines, no redraws
    reports = workspace / "reports" / "shapes"
    found = json.loads((reports / "prepare.json").read_text())
    assert found["classes"] == list(CLASSES) and found["images"] == {"train": 30, "test": 12}
    assert "batch-12 speed-up" in first.stdout  # quantize times every test image when fewer than 64
    assert [(p["path"], p["reason"]) for p in found["problems"]] == [("square/broken.jpg", "corrupt_image")]
    evaluation = json.loads((reports / "evaluate.json").read_text())
    assert list(evaluation["per_class_accuracy"]) == list(CLASSES)
    rows = confusion_rows(reports)
    actual = [row["actual"] for row in rows]
    most = max(CLASSES, key=actual.count)  # the first of equals, as evaluate's argmax
    assert (evaluation["majority_class"], evaluation["majority_class_accuracy"]) == (
        most,
        actual.count(most) / 12,
    )
    for row in rows:  # the folders' class names, and their indices in the dataset's order
        assert CLASSES[int(row["actual_index"])] == row["actual"]
        assert CLASSES[int(row["predicted_index"])] == row["predicted"]
    record = json.loads((reports / "register.json").read_text())
    assert (record["model_name"], record["version"], record["alias"]) == ("alexnet-shapes", "1", "champion")
    run_data = registry(ws_env).get_run(record["run_id"]).data
    assert json.loads(run_data.tags["dataset.classes"]) == list(CLASSES)
    assert run_data.params["datasets.shapes.source"] == "datasets/shapes"
    # the test set its accuracy is on: a later version on changed data says it compares unlike sets
    version = registry(ws_env).get_model_version("alexnet-shapes", "1")
    assert version.tags["data.prepared"] == run_data.tags["dvc.prepare.data/prepared/shapes"]
    experiment = registry(ws_env).get_experiment(
        registry(ws_env).get_run(record["run_id"]).info.experiment_id
    )
    assert experiment.name == "alexops-shapes"

    check_the_server_answers_with_the_folders_class_names(workspace, ws_env, tmp_path)
    check_predict_names_the_classes(workspace, ws_env)
    check_a_fresh_clone_pulls_the_images(workspace, ws_env, tmp_path / "clone")

    # one image changed: fetch records the folder again, and prepare and every stage after it are due
    (images / "circle" / "000.png").write_bytes(encode(shape_image("circle", (48, 64), seed=999), "PNG"))
    again = run([DVC, "repro", "prepare"], workspace, ws_env)
    assert stages_run(again.stdout) == ["fetch", "prepare"]
    assert json.loads((reports / "prepare.json").read_text())["images"] == found["images"]
    status = yaml.safe_load(run([DVC, "status", "--json"], workspace, ws_env).stdout)
    assert {"train", "evaluate", "export", "quantize"} <= set(status)  # the prepared data they read changed
    assert digests(workspace / "data" / "raw" / "fashion-mnist") == built_in  # the other dataset untouched
    check_versions_compete_on_todays_test_set(workspace, ws_env, images)


def check_versions_compete_on_todays_test_set(workspace, ws_env, images) -> None:
    """The data changed since version 1 was tested: register re-tests it on today's test set
    before choosing the champion; so it does when evaluate's crops change; once the classes
    change, it cannot answer them and leaves the running."""
    client, reports = registry(ws_env), workspace / "reports" / "shapes"
    run([DVC, "repro"], workspace, ws_env)
    record = json.loads((reports / "register.json").read_text())
    assert record["version"] == "2" and [r["version"] for r in record["retested"]] == ["1"]
    first, second = (client.get_model_version("alexnet-shapes", v) for v in ("1", "2"))
    assert first.tags["data.prepared"] == second.tags["data.prepared"]  # one test set now
    assert first.tags["accuracy"] == f"{record['retested'][0]['after']:.6f}"
    ten_crop_accuracy = record["retested"][0]["after"]
    assert "re-tested as this version was: version 1" in record["reason"]
    contenders = [v for v in (first, second) if v.tags["gate"] == "passed"]
    best = max(contenders, key=lambda v: (float(v.tags["accuracy"]), int(v.version)))
    assert str(client.get_model_version_by_alias("alexnet-shapes", "champion").version) == str(best.version)
    # the re-test scores an ONNX model as evaluate scores its torch model (10-crop)
    model = load_model(
        (workspace / "artifacts" / "shapes" / "model.onnx").read_bytes(), name="m", version=None, uri="m"
    )
    test_images, labels = load_split(workspace / "data" / "prepared" / "shapes" / "test.pt")
    evaluation = json.loads((reports / "evaluate.json").read_text())
    retested = register.onnx_accuracy(model, test_images, labels, ten_crop=True)
    assert round(retested * len(labels)) == round(evaluation["accuracy"] * len(labels))  # images right

    params = yaml.safe_load((workspace / "params.yaml").read_text())  # centre crops from now on
    params["evaluate"]["ten_crop"] = False
    (workspace / "params.yaml").write_text(yaml.safe_dump(params))
    run([DVC, "repro"], workspace, ws_env)
    record = json.loads((reports / "register.json").read_text())
    assert record["version"] == "2" and [r["version"] for r in record["retested"]] == ["1"]
    first = client.get_model_version("alexnet-shapes", "1")
    assert first.tags["test.crops"] == "centre" and "was test.crops 10-crop" in first.tags["retested"]

    params["evaluate"]["ten_crop"] = True  # back to a test version 1 has had: answered from its tags
    (workspace / "params.yaml").write_text(yaml.safe_dump(params))
    run([DVC, "repro"], workspace, ws_env)
    (back,) = json.loads((reports / "register.json").read_text())["retested"]
    assert back["version"] == "1" and back["after"] == ten_crop_accuracy
    assert back["said"].endswith(", as on this test before")
    tests = json.loads(client.get_model_version("alexnet-shapes", "1").tags["tests"])
    assert len(tests) == 3 and list(tests)[-1].endswith(" 10-crop")  # first data, centre, 10-crop
    # today's version, scored by evaluate each time, remembers its tests too
    today = json.loads(client.get_model_version("alexnet-shapes", "2").tags["tests"])
    assert [key.split()[-1] for key in today] == ["centre", "10-crop"]
    assert today[list(today)[-1]] == json.loads((reports / "evaluate.json").read_text())["accuracy"]

    (images / "wedge").mkdir()  # a fourth class: no earlier version can answer it
    for i in range(14):
        shape = shape_image("triangle", (48, 64), seed=500 + i, colour=(40, 60, 200))
        (images / "wedge" / f"{i:03d}.png").write_bytes(encode(shape, "PNG"))
    run([DVC, "repro"], workspace, ws_env)
    record = json.loads((reports / "register.json").read_text())
    assert record["version"] == "3"
    assert [r["version"] for r in record["retested"]] == [str(v.version) for v in contenders]
    for version in contenders:
        retested = client.get_model_version("alexnet-shapes", version.version)
        assert np.isnan(float(retested.tags["accuracy"])) and "cannot be" in retested.tags["retested"]
    assert all(r["after"] is None for r in record["retested"])  # JSON's null, not NaN
    assert "nan" not in record["reason"] and "no champion yet" not in record["reason"]
    third = client.get_model_version("alexnet-shapes", "3")
    aliases = {k: str(v) for k, v in client.get_registered_model("alexnet-shapes").aliases.items()}
    assert aliases.get("champion") == ("3" if third.tags["gate"] == "passed" else None)
    if third.tags["gate"] == "passed":
        before = record["previous_champion"]
        assert record["reason"].startswith(f"the champion before, version {before}, is out of the running")
    assert aliases.get("challenger") in (None, "3")  # never a version that cannot answer the new class


def confusion_rows(reports) -> list[dict]:
    """confusion.csv's rows, one a test image: actual, predicted, actual_index, predicted_index."""
    return list(csv.DictReader((reports / "confusion.csv").read_text().splitlines()))


def check_the_server_answers_with_the_folders_class_names(workspace, ws_env, tmp_path) -> None:
    log = tmp_path / "serve.log"
    env = ws_env | {"PYTHONPATH": str(workspace / "src")}
    server = start_server(log, "--model-uri", "models:/alexnet-shapes@champion", env=env)
    try:
        model = httpx.get(f"{server.url}/v1/model", timeout=30).json()
        assert model["classes"] == list(CLASSES) and model["capture"]["kind"] == "photo"
        photo = encode(shape_image("triangle", (300, 400), seed=5), "JPEG", quality=90)
        answer = httpx.post(f"{server.url}/v1/predict", files={"file": ("t.jpg", photo)}, timeout=30).json()
        (prediction,) = answer["predictions"]
        assert [c["class"] for c in prediction["top_k"]] and {c["class"] for c in prediction["top_k"]} <= set(
            CLASSES
        )
        assert prediction["capture"]["applied"] == "photo"  # squared as the folder's images were
        name, shape = model["name"], model["input"]["shape"][1:]
        # the Open Inference Protocol's classification extension names the classes too
        v2 = httpx.post(
            f"{server.url}/v2/models/{name}/infer",
            json={
                "inputs": [{"name": "image", "shape": [1, *shape], "datatype": "FP32",
                            "data": np.zeros(int(np.prod(shape)), np.float32).tolist()}],
                "outputs": [{"name": "probabilities", "parameters": {"classification": 3}}],
            },
            timeout=30,
        )  # fmt: skip
        assert v2.status_code == 200, v2.text
        labels = [entry.split(":", 2)[2] for entry in v2.json()["outputs"][0]["data"]]
        assert sorted(labels) == sorted(CLASSES)
    finally:
        stop_server(server)


def check_predict_names_the_classes(workspace, ws_env) -> None:
    image = workspace / "datasets" / "shapes" / "square" / "001.jpg"
    command = [sys.executable, "-m", "alexops.cli", "predict", "--model-uri", "artifacts/shapes/model.onnx"]
    done = subprocess.run(
        [*command, str(image)],
        cwd=workspace, env=ws_env | {"PYTHONPATH": str(workspace / "src")}, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (line,) = done.stdout.strip().splitlines()
    assert {c["class"] for c in json.loads(line)["top_k"]} <= set(CLASSES)


def check_a_fresh_clone_pulls_the_images(workspace, ws_env, clone) -> None:
    run([DVC, "push"], workspace, ws_env)
    commit_all(workspace, "results")
    run(["git", "clone", "-q", str(workspace), str(clone)], workspace)
    run([DVC, "pull"], clone, ws_env)
    assert digests(clone / "datasets" / "shapes") == digests(workspace / "datasets" / "shapes")
    for path in ("data/prepared/shapes/images.npy", "artifacts/shapes/model.onnx"):
        assert (clone / path).read_bytes() == (workspace / path).read_bytes()
    status = run([DVC, "status"], clone, ws_env).stdout
    assert "up to date" in status, status
