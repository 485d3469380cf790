"""The server's standard protocols, called by real outside clients, and photos as users have them.

One `alexops serve` process serves a tiny garment classifier exported with Fashion-MNIST's
capture recipe (tests/garments.py). Tritonclient speaks the Open Inference Protocol to it
(binary and JSON tensors, image files as BYTES, classification), MLflow's own scoring-server
client speaks /invocations, and every form of image file (EXIF orientations, 16-bit, float,
alpha, catalogue photos) is answered as its upright 8-bit dataset-form original is.
Expected logits come from onnxruntime run directly on the training code's preprocessing.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import torch
from garments import CLASSES, RECIPE, catalogue_photo, centroid_model, encode, garments
from PIL import Image
from test_serve import alexops, metric, start_server, stop_server

from alexops import augment

MAX_PIXELS = 4_000_000


@pytest.fixture(scope="module")
def originals() -> tuple[np.ndarray, np.ndarray]:
    """Dataset-form garments the model has not seen: 8 classes × 3."""
    return garments(3, seed=2)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "garments.onnx"
    path.write_bytes(centroid_model(*garments(20, seed=1)))
    return path


@pytest.fixture(scope="module")
def server(model_file, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "serve.log"
    running = start_server(
        log, "--model-uri", str(model_file), "--max-wait-ms", "50", "--threads", "1",
        "--max-pixels", str(MAX_PIXELS), "--max-body-mb", "4",
    )  # fmt: skip
    yield running
    stop_server(running)


@pytest.fixture(scope="module")
def session(model_file) -> ort.InferenceSession:
    return ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])


def preprocessed(images: np.ndarray) -> np.ndarray:
    return augment.preprocess(torch.from_numpy(images)[:, None], RECIPE).numpy()


@pytest.fixture(scope="module")
def triton(server):
    import tritonclient.http as tc

    client = tc.InferenceServerClient(url=server.url.removeprefix("http://"), concurrency=4)
    yield client
    client.close()


# ---- Open Inference Protocol, through tritonclient ------------------------------------------


def test_v2_health_and_metadata_through_tritonclient(triton):
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.get_server_metadata()["name"] == "alexops"
    assert triton.is_model_ready("garments")
    meta = triton.get_model_metadata("garments")
    assert meta["name"] == "garments" and meta["versions"] == [] and meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
    assert {o["name"] for o in meta["outputs"]} == {"logits", "probabilities", "capture"}
    assert not triton.is_model_ready("other")


@pytest.mark.parametrize("binary", [True, False])
def test_v2_fp32_tensors_through_tritonclient_equal_onnxruntime(triton, session, originals, binary):
    import tritonclient.http as tc

    x = preprocessed(originals[0][:5])
    tensor = tc.InferInput("image", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    outputs = [tc.InferRequestedOutput(name, binary_data=binary) for name in ("logits", "probabilities")]
    result = triton.infer("garments", [tensor], outputs=outputs, request_id="r1")
    expected = session.run(None, {"image": x})[0]
    assert np.allclose(result.as_numpy("logits"), expected, atol=1e-4)
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (5, len(CLASSES)) and np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    assert result.get_response()["id"] == "r1" and result.get_response()["model_name"] == "garments"


def test_v2_image_files_as_bytes_are_captured_and_classified_through_tritonclient(triton, originals):
    import tritonclient.http as tc

    images, _ = originals
    files = [encode(image) for image in images[:4]]
    files += [encode(catalogue_photo(image, 6, (30, 50, 20, 60)), "JPEG", quality=85) for image in images[:4]]
    tensor = tc.InferInput("image", [len(files)], "BYTES")
    tensor.set_data_from_numpy(np.array(files, dtype=object))
    result = triton.infer(
        "garments",
        [tensor],
        outputs=[tc.InferRequestedOutput("probabilities", class_count=2), tc.InferRequestedOutput("capture")],
        parameters={"capture": "auto"},
    )
    top = [row[0].decode().split(":") for row in result.as_numpy("probabilities")]
    labels = [label for _, _, label in top]
    assert labels[4:] == labels[:4]  # each catalogue photo: its original's class
    assert all(CLASSES.index(label) == int(index) for _, index, label in top)
    captured = [json.loads(value) for value in result.as_numpy("capture")]
    assert [c["applied"] for c in captured] == ["none"] * 4 + ["catalogue"] * 4
    assert all(c["mode"] == "auto" for c in captured)


def test_v2_concurrent_requests_share_the_batcher(server, triton, session, originals):
    """tritonclient's async_infer keeps 12 requests in flight on its connection pool; each input
    is run once, in however many onnxruntime calls the batcher merged them into."""
    import tritonclient.http as tc

    x = preprocessed(originals[0][:12])
    before = httpx.get(f"{server.url}/metrics").text
    pending = []
    for i in range(12):
        tensor = tc.InferInput("image", [1, 1, 28, 28], "FP32")
        tensor.set_data_from_numpy(x[i : i + 1])
        pending.append(triton.async_infer("garments", [tensor]))
    results = [request.get_result().as_numpy("logits") for request in pending]
    assert np.allclose(np.concatenate(results), session.run(None, {"image": x})[0], atol=1e-4)
    after = httpx.get(f"{server.url}/metrics").text
    assert metric(after, "alexops_batch_size_sum") - metric(before, "alexops_batch_size_sum") == 12
    calls = metric(after, "alexops_batch_size_count") - metric(before, "alexops_batch_size_count")
    assert 1 <= calls <= 12


def test_v2_errors_reach_tritonclient_as_its_exception(triton):
    import tritonclient.http as tc
    from tritonclient.utils import InferenceServerException

    tensor = tc.InferInput("image", [1, 1, 5, 5], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 1, 5, 5), np.float32))
    with pytest.raises(InferenceServerException) as caught:
        triton.infer("garments", [tensor])
    assert caught.value.status() == "400" and "[N, 1, 28, 28]" in caught.value.message()
    with pytest.raises(InferenceServerException) as caught:
        triton.get_model_metadata("garments", model_version="7")
    assert caught.value.status() == "404" and "no version" in caught.value.message()


def v2_json(inputs: list[dict], **extra) -> dict:
    return {"json": {"inputs": inputs, **extra}}


IMAGE = {"name": "image", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": [0.0] * 784}


INFER = "/v2/models/garments/infer"
HI = {"name": "image", "datatype": "BYTES", "shape": [1], "data": ["aGk="]}  # b"hi", not an image


def binary_request(declared_size: int, data: bytes) -> dict:
    """A request in the binary tensor extension: JSON header, then `data`, which it says holds
    `declared_size` bytes."""
    tensor = {k: v for k, v in IMAGE.items() if k != "data"} | {
        "parameters": {"binary_data_size": declared_size}
    }
    header = json.dumps({"inputs": [tensor]}).encode()
    return {"content": header + data, "headers": {"Inference-Header-Content-Length": str(len(header))}}


BAD_V2 = {
    "unknown model": ("/v2/models/nope/infer", v2_json([IMAGE]), 404, "unknown model"),
    "unknown version": ("/v2/models/garments/versions/3/infer", v2_json([IMAGE]), 404, "no version"),
    "empty body": (INFER, {"content": b""}, 400, "empty request body"),
    "not json": (INFER, {"content": b"{"}, 400, "not valid JSON"),
    "a list": (INFER, {"json": [IMAGE]}, 400, "JSON object"),
    "no inputs": (INFER, {"json": {}}, 400, "one tensor"),
    "two inputs": (INFER, v2_json([IMAGE, IMAGE]), 400, "one tensor"),
    "wrong name": (INFER, v2_json([IMAGE | {"name": "x"}]), 400, "unknown input"),
    "INT8": (INFER, v2_json([IMAGE | {"datatype": "INT8"}]), 400, "datatype"),
    "bad shape": (INFER, v2_json([IMAGE | {"shape": [1, 28, 28]}]), 400, "[N, 1, 28, 28]"),
    "negative dim": (INFER, v2_json([IMAGE | {"shape": [-1, 1, 28, 28]}]), 400, "non-negative"),
    "too few values": (INFER, v2_json([IMAGE | {"data": [0.0] * 10}]), 400, "needs 784"),
    "strings": (INFER, v2_json([IMAGE | {"data": ["a"] * 784}]), 400, "numbers only"),
    "NaN": (
        INFER,
        {"content": json.dumps({"inputs": [IMAGE | {"data": [float("nan")] * 784}]}).encode()},
        400,
        "NaN",
    ),
    "unknown output": (INFER, v2_json([IMAGE], outputs=[{"name": "x"}]), 400, "unknown output"),
    "bad classification": (
        INFER,
        v2_json([IMAGE], outputs=[{"name": "logits", "parameters": {"classification": "2"}}]),
        400,
        "classification",
    ),
    "capture of a tensor": (
        INFER, v2_json([IMAGE], outputs=[{"name": "capture"}]), 400, "BYTES",
    ),
    "bytes not base64": (
        INFER,
        v2_json([{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["!!"]}]),
        400,
        "base64",
    ),
    "bytes not an image": (
        INFER,
        v2_json([HI]),
        400,
        "not an image",
    ),
    "bytes count": (
        INFER,
        v2_json([{"name": "image", "datatype": "BYTES", "shape": [2], "data": ["aGk="]}]),
        400,
        "says 2",
    ),
    "bad capture": (
        INFER,
        v2_json([HI], parameters={"capture": 0}),
        400,
        "capture mode",
    ),
    "binary past the end": (INFER, binary_request(3136, b"\0" * 100), 400, "exceeds"),
    "header length junk": (
        INFER,
        {"content": b"{}", "headers": {"Inference-Header-Content-Length": "abc"}},
        400,
        "Inference-Header-Content-Length",
    ),
    "body too large": (INFER, {"content": b"x" * (5 * 2**20)}, 413, "--max-body-mb"),
    "no such v2 route": ("/v2/models/garments/explain", {"json": {}}, 404, "Open Inference Protocol routes"),
    "GET on infer": (INFER, None, 405, "not allowed"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_V2))
def test_v2_bad_requests_get_a_4xx_in_the_protocols_shape_and_the_server_keeps_serving(
    server, originals, case
):
    path, kwargs, status, fragment = BAD_V2[case]
    if kwargs is None:
        response = httpx.get(f"{server.url}{path}")
    else:
        response = httpx.post(f"{server.url}{path}", timeout=60, **kwargs)
    assert response.status_code == status, response.text
    assert set(response.json()) == {"error"} and fragment in response.json()["error"]
    data = base64.b64encode(encode(originals[0][0])).decode()
    good = v2_json([{"name": "image", "datatype": "BYTES", "shape": [1], "data": [data]}])
    assert httpx.post(f"{server.url}/v2/models/garments/infer", **good).status_code == 200


def test_v2_json_bytes_and_version_routes_answer_in_json(server, originals):
    data = [base64.b64encode(encode(image)).decode() for image in originals[0][:2]]
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2, 1], "data": [[d] for d in data]}]}
    response = httpx.post(f"{server.url}/v2/models/garments/infer", json=body)
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    assert outputs["logits"]["shape"] == [2, len(CLASSES)] and len(outputs["logits"]["data"]) == 2 * len(
        CLASSES
    )
    assert [json.loads(c)["applied"] for c in outputs["capture"]["data"]] == ["none", "none"]
    assert httpx.get(f"{server.url}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{server.url}/v2/models/garments/ready").json() == {"name": "garments", "ready": True}


# ---- MLflow's scoring protocol, through MLflow's own client ---------------------------------


def scoring_client(server):
    from mlflow.pyfunc.scoring_server.client import ScoringServerClient

    host, port = server.url.removeprefix("http://").split(":")
    return ScoringServerClient(host, int(port))


def test_mlflow_scoring_client_gets_mlflow_shaped_predictions(server, session, originals):
    import pandas as pd
    from mlflow.deployments import PredictionsResponse
    from mlflow.models import convert_input_example_to_serving_input

    client = scoring_client(server)
    client.wait_server_ready(timeout=30)
    client.ping()
    assert client.get_version().count(".") == 2  # the MLflow version spoken
    x = preprocessed(originals[0][:3])
    expected = session.run(None, {"image": x})[0]
    for data in (x, pd.DataFrame({"image": list(x)})):  # sent as "inputs" and as "dataframe_split"
        predictions = client.invoke(data)["predictions"]
        assert set(predictions) == {"logits"} and np.allclose(predictions["logits"], expected, atol=1e-4)
    # the tensor by name (MLflow 3.17's client cannot send a dict: dump_input_data iterates it wrongly)
    named = httpx.post(f"{server.url}/invocations", json={"inputs": {"image": x.tolist()}})
    assert np.allclose(
        PredictionsResponse.from_json(named.text)["predictions"]["logits"], expected, atol=1e-4
    )
    # the serving example MLflow writes beside a logged model (serving_input_example.json)
    example = json.loads(convert_input_example_to_serving_input(x[:1]))
    response = httpx.post(f"{server.url}/invocations", json=example)
    assert np.allclose(response.json()["predictions"]["logits"], expected[:1], atol=1e-4)


@pytest.mark.parametrize(
    "form",
    ["instances", "instances of objects", "dataframe_records", "with params"],
)
def test_invocations_accepts_what_mlflow_models_serve_accepts(server, session, originals, form):
    x = preprocessed(originals[0][:2])
    bodies = {
        "instances": {"instances": x.tolist()},
        "instances of objects": {"instances": [{"image": row.tolist()} for row in x]},
        "dataframe_records": {"dataframe_records": [{"image": row.tolist()} for row in x]},
        "with params": {"inputs": x.tolist(), "params": {"anything": 1}},
    }
    response = httpx.post(f"{server.url}/invocations", json=bodies[form])
    assert response.status_code == 200, response.text
    assert np.allclose(
        response.json()["predictions"]["logits"], session.run(None, {"image": x})[0], atol=1e-4
    )


JSON = "application/json"
BAD_INVOCATIONS = {
    "no format key": ({"json": {"data": []}}, 400, "exactly one of"),
    "two format keys": ({"json": {"inputs": [], "instances": []}}, 400, "exactly one of"),
    "a list": ({"json": [1, 2]}, 400, "JSON object"),
    "wrong shape": ({"json": {"inputs": np.zeros((1, 1, 5, 5)).tolist()}}, 400, "(N, 1, 28, 28)"),
    "strings": ({"json": {"inputs": [[["a"] * 28] * 28]}}, 400, "numbers only"),
    "wrong tensor name": ({"json": {"inputs": {"x": [0.0]}}}, 400, "'image'"),
    "NaN": ({"content": b'{"inputs": [NaN]}', "headers": {"content-type": "application/json"}}, 400, "NaN"),
    "csv": ({"content": b"a,b\n1,2\n", "headers": {"content-type": "text/csv"}}, 400, "dataframe format"),
    "text": ({"content": b"x", "headers": {"content-type": "text/plain"}}, 415, "Content-Type"),
    "latin-1": ({"content": b"{}", "headers": {"content-type": f"{JSON}; charset=latin-1"}}, 415, "UTF-8"),
    "empty": ({"content": b"", "headers": {"content-type": "application/json"}}, 400, "empty"),
    "too large": ({"content": b"x" * (5 * 2**20), "headers": {"content-type": JSON}}, 413, "limit"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_INVOCATIONS))
def test_invocations_bad_input_gets_mlflows_error_shape_and_the_server_keeps_serving(server, originals, case):
    kwargs, status, fragment = BAD_INVOCATIONS[case]
    response = httpx.post(f"{server.url}/invocations", timeout=60, **kwargs)
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error_code", "message"} and body["error_code"] == "BAD_REQUEST"
    assert fragment in body["message"]
    good = httpx.post(f"{server.url}/invocations", json={"inputs": preprocessed(originals[0][:1]).tolist()})
    assert good.status_code == 200


def test_mlflow_health_routes_answer_as_mlflow_does(server):
    for path in ("/ping", "/health"):
        response = httpx.get(f"{server.url}{path}")
        assert (response.status_code, response.text) == (200, "\n")
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}  # /health is not a prefix of it
    missing = httpx.get(f"{server.url}/invocations")
    assert missing.status_code == 405 and missing.json()["error_code"] == "BAD_REQUEST"


# ---- photos as users have them --------------------------------------------------------------


def with_exif_orientation(upright: np.ndarray, orientation: int, fmt: str = "JPEG") -> bytes:
    """The stored pixels for an EXIF orientation (EXIF 2.32, tag 0x0112), with the tag set."""
    u = upright
    stored = {1: u, 2: u[:, ::-1], 3: u[::-1, ::-1], 4: u[::-1], 5: u.T, 6: np.rot90(u, 1),
              7: u[::-1, ::-1].T, 8: np.rot90(u, -1)}[orientation]  # fmt: skip
    exif = Image.Exif()
    exif[0x0112] = orientation
    options = {"quality": 95} if fmt == "JPEG" else {}
    return encode(np.ascontiguousarray(stored), fmt, exif=exif.tobytes(), **options)


def forms_of(image: np.ndarray) -> dict[str, bytes]:
    """One garment in every form a user's file may take."""
    forms = {"original": encode(image)}
    for orientation in range(1, 9):
        forms[f"PNG orientation {orientation}"] = with_exif_orientation(image, orientation, "PNG")
        forms[f"JPEG orientation {orientation}"] = with_exif_orientation(image, orientation)
    forms["16-bit"] = encode(image.astype(np.uint16) * 257)
    forms["float"] = encode(image.astype(np.float32) / 255, "TIFF")
    forms["alpha"] = encode(np.dstack([image, np.where(image > 0, 255, 0).astype(np.uint8)]))
    dark = np.asarray(Image.fromarray(255 - image).resize((140, 140), Image.Resampling.BICUBIC))
    alpha = np.asarray(Image.fromarray(np.where(image > 0, 255, 0).astype(np.uint8)).resize((140, 140)))
    forms["transparent catalogue photo"] = encode(
        np.pad(np.dstack([dark, alpha]), ((30, 30), (20, 20), (0, 0)))
    )
    forms["catalogue JPEG"] = encode(catalogue_photo(image, 10, (60, 40, 80, 20)), "JPEG", quality=80)
    forms["catalogue JPEG on white"] = encode(
        catalogue_photo(image, 4, (8, 8, 30, 30), 255), "JPEG", quality=90
    )
    forms["catalogue PNG, rotated"] = with_exif_orientation(
        np.asarray(catalogue_photo(image, 5, (9, 9, 9, 9))), 6, "PNG"
    )
    return forms


def test_every_form_of_an_image_gets_the_prediction_of_its_upright_8_bit_original(server, originals):
    images, _ = originals
    for image in images[::3]:  # one garment of each class
        forms = forms_of(image)
        files = [("file", (name, data)) for name, data in forms.items()]
        response = httpx.post(f"{server.url}/v1/predict", files=files, params={"top_k": 1}, timeout=60)
        assert response.status_code == 200, response.text
        predictions = response.json()["predictions"]
        best = {p["filename"]: p["top_k"][0]["class"] for p in predictions}
        assert {name: best[name] for name in forms} == {name: best["original"] for name in forms}
        captured = {p["filename"]: p["capture"]["applied"] for p in predictions}
        photos = [name for name in forms if "catalogue" in name]
        assert [name for name, applied in captured.items() if applied == "catalogue"] == photos


def test_capture_none_and_dataset_are_obeyed_and_reported(server, originals):
    image = originals[0][0]
    photo = encode(catalogue_photo(image, 6, (20, 20, 20, 20)), "JPEG")
    for capture, applied in (("none", "none"), ("dataset", "catalogue"), ("auto", "catalogue")):
        response = httpx.post(
            f"{server.url}/v1/predict", files=[("file", ("p.jpg", photo))], params={"capture": capture}
        )
        assert response.json()["predictions"][0]["capture"] == {
            "mode": capture,
            "applied": applied,
            "reason": response.json()["predictions"][0]["capture"]["reason"],
        }
    bad = httpx.post(f"{server.url}/v1/predict", files=[("file", ("p.jpg", photo))], params={"capture": "x"})
    assert bad.status_code == 422 and "capture" in bad.json()["detail"]


def test_predict_cli_applies_the_capture_recipe(model_file, originals, tmp_path):
    image = originals[0][6]
    (tmp_path / "photo.jpg").write_bytes(encode(catalogue_photo(image, 8, (30, 30, 60, 60)), "JPEG"))
    (tmp_path / "original.png").write_bytes(encode(image))
    paths = [str(tmp_path / "original.png"), str(tmp_path / "photo.jpg")]
    done = alexops("predict", "--model-uri", str(model_file), "--capture", "auto", *paths, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert lines[1]["top_k"][0]["class"] == lines[0]["top_k"][0]["class"]
    assert [line["capture"]["applied"] for line in lines] == ["none", "catalogue"]
    assert all(line["capture"]["mode"] == "auto" for line in lines)
