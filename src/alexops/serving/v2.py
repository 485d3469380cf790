"""Open Inference Protocol (KServe v2, REST), over the same batcher as `/v1`.

Spec: kserve.github.io/website, "Open Inference Protocol (V2 Inference Protocol)", REST part;
the binary tensor extension and the classification extension as Triton defines them
(github.com/triton-inference-server/server, docs/protocol/extension_binary_data.md and
extension_classification.md), which `tritonclient` uses by default.

- `GET /v2`, `/v2/health/live`, `/v2/health/ready`
- `GET /v2/models/{name}[/versions/{version}]`: name, versions, platform, inputs, outputs
- `GET /v2/models/{name}[/versions/{version}]/ready`
- `POST /v2/models/{name}[/versions/{version}]/infer`: input `image`, either FP32
  `[N, C, S, S]` (preprocessed, as /v1/model describes) or BYTES `[N]` holding encoded image
  files (base64 strings in JSON, raw in the binary extension), brought into the dataset's
  form by request parameter `capture` (auto, dataset, none). Outputs `logits` and
  `probabilities` (FP32 `[N, K]`), `capture` (BYTES `[N]`, JSON: what capture did to each
  image file); an output's `classification: k` parameter answers BYTES `[N, k]`
  "value:index:label" instead.

Errors are `{"error": "..."}` with a 4xx (5xx: the server's fault), as the protocol says.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from importlib import metadata
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from alexops.serving import bodies
from alexops.serving.inputs import InputError, check_capture_mode, numbers
from alexops.serving.model import LoadedModel, softmax
from alexops.serving.state import server_of

PREFIXES = ("/v2",)
HEADER_LENGTH = "Inference-Header-Content-Length"  # the binary tensor extension's header
OUTPUTS = ("logits", "probabilities", "capture")
MAX_CLASSIFICATION = 1000


class V2Error(BaseModel):
    error: str = Field(description="what was wrong, and how to fix it")


def _errors(*statuses: int) -> dict:
    return {status: {"model": V2Error} for status in statuses}


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


INFER_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["inputs"],
                "properties": {
                    "id": {"type": "string"},
                    "parameters": {
                        "type": "object",
                        "description": '{"capture": "auto" | "dataset" | "none"}',
                    },
                    "inputs": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["name", "shape", "datatype"],
                            "properties": {
                                "name": {"type": "string", "enum": ["image"]},
                                "shape": {"type": "array", "items": {"type": "integer"}},
                                "datatype": {"type": "string", "enum": ["FP32", "BYTES"]},
                                "parameters": {"type": "object"},
                                "data": {"type": "array"},
                            },
                        },
                    },
                    "outputs": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["name"],
                            "properties": {
                                "name": {"type": "string", "enum": list(OUTPUTS)},
                                "parameters": {"type": "object"},
                            },
                        },
                    },
                },
            }
        }
    },
}
INFER_RESPONSES = {
    200: {
        "description": "the outputs (JSON; with the binary extension, JSON then raw tensor bytes)",
        "content": {"application/json": {"schema": {"type": "object"}}, "application/octet-stream": {}},
    }
} | _errors(400, 404, 413, 503)

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol (v2)"])


@router.get("", response_model=ServerMetadata, summary="server metadata")
async def server_metadata() -> dict:
    return {"name": "alexops", "version": _version(), "extensions": ["binary_tensor_data", "classification"]}


@router.get("/health/live", response_model=Live, summary="the server is live")
async def live() -> dict:
    return {"live": True}


@router.get("/health/ready", response_model=Ready, responses=_errors(503), summary="the server is ready")
async def ready(request: Request):
    if not server_of(request).batcher.running:
        return JSONResponse({"error": "not ready: the batch worker is not running"}, status_code=503)
    return {"ready": True}


@router.get("/models/{name}", response_model=ModelMetadata, responses=_errors(404), summary="model metadata")
async def model_metadata(request: Request, name: str) -> dict:
    return describe(served(request, name, None))


@router.get(
    "/models/{name}/versions/{version}",
    response_model=ModelMetadata,
    responses=_errors(404),
    summary="model metadata of one version",
)
async def version_metadata(request: Request, name: str, version: str) -> dict:
    return describe(served(request, name, version))


@router.get("/models/{name}/ready", response_model=ModelReady, responses=_errors(404), summary="model ready")
async def model_ready(request: Request, name: str) -> dict:
    return {"name": served(request, name, None).name, "ready": True}


@router.get(
    "/models/{name}/versions/{version}/ready",
    response_model=ModelReady,
    responses=_errors(404),
    summary="model version ready",
)
async def version_ready(request: Request, name: str, version: str) -> dict:
    return {"name": served(request, name, version).name, "ready": True}


@router.post(
    "/models/{name}/infer",
    openapi_extra={"requestBody": INFER_BODY},
    responses=INFER_RESPONSES,
    response_class=Response,
    summary="inference",
)
async def infer(request: Request, name: str) -> Response:
    return await run_inference(request, served(request, name, None))


@router.post(
    "/models/{name}/versions/{version}/infer",
    openapi_extra={"requestBody": INFER_BODY},
    responses=INFER_RESPONSES,
    response_class=Response,
    summary="inference on one version",
)
async def infer_version(request: Request, name: str, version: str) -> Response:
    return await run_inference(request, served(request, name, version))


def served(request: Request, name: str, version: str | None) -> LoadedModel:
    """The model being served if `name` (and `version`, when given) name it; else a 404."""
    model = server_of(request).model
    if name != model.name:
        raise InputError(
            f"unknown model {name[:100]!r}: this server serves {model.name!r}.", 404, "unknown_model"
        )
    if version is not None and version != (model.version or ""):
        have = f"version {model.version}" if model.version else "a model file, which has no versions"
        raise InputError(
            f"model {model.name!r} has no version {version[:50]!r} here: it serves {have}.",
            404,
            "unknown_model",
        )
    return model


def describe(model: LoadedModel) -> dict:
    k, c, s = len(model.classes), model.input.channels, model.input.size
    return {
        "name": model.name,
        "versions": [model.version] if model.version else [],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": model.input.name, "datatype": "FP32", "shape": [-1, c, s, s]}],
        "outputs": [
            {"name": "logits", "datatype": "FP32", "shape": [-1, k]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, k]},
            {"name": "capture", "datatype": "BYTES", "shape": [-1]},
        ],
    }


# ---- inference ----------------------------------------------------------------------------


async def run_inference(request: Request, model: LoadedModel) -> Response:
    server = server_of(request)
    body = await bodies.read_body(request, server.options.max_body_bytes)
    header, binary = split_body(body, request.headers.get(HEADER_LENGTH))
    document = bodies.parse_json(header)
    if not isinstance(document, dict):
        raise InputError('the inference request must be a JSON object {"inputs": [...]}.', reason="bad_json")
    tensor = the_input(document, model)
    parameters = _object(document.get("parameters", {}), "parameters")
    requested = requested_outputs(document, parameters)
    captured = None
    if tensor["datatype"] == "BYTES":
        capture = check_capture_mode(
            str(tensor_parameters(tensor).get("capture", parameters.get("capture", "auto")))
        )
        files = [(f"image #{i + 1}", data) for i, data in enumerate(bytes_elements(tensor, binary))]
        x, captured = await server.images(files, model, capture)
    else:
        x = fp32_tensor(tensor, binary, model, bodies.may_hold_literals(header))
    if "capture" in requested and captured is None and document.get("outputs") is not None:
        raise InputError('output "capture" exists only for BYTES (image file) inputs.', reason="bad_output")
    logits = await server.infer(model, x)
    return respond(document, model, logits, captured, requested)


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """(JSON header, binary tensor data) per the binary tensor extension."""
    if not body:
        raise InputError(
            'empty request body; send a JSON inference request {"inputs": [...]}.', reason="empty"
        )
    if header_length is None:
        return body, b""
    if not header_length.strip().isdigit() or int(header_length) > len(body):
        raise InputError(
            f"{HEADER_LENGTH}: {header_length[:20]!r} is not a length within the {len(body)}-byte body.",
            reason="bad_json",
        )
    return body[: int(header_length)], body[int(header_length) :]


def the_input(document: dict, model: LoadedModel) -> dict:
    tensors = document.get("inputs")
    if not isinstance(tensors, list) or len(tensors) != 1 or not isinstance(tensors[0], dict):
        raise InputError(
            f'"inputs" must be a list of one tensor, {model.input.name!r}: FP32 [N, {model.input.channels}, '
            f"{model.input.size}, {model.input.size}] or BYTES [N] of image files.",
            reason="bad_json",
        )
    tensor = tensors[0]
    if tensor.get("name") != model.input.name:
        raise InputError(
            f"unknown input {str(tensor.get('name'))[:50]!r}; this model's input is {model.input.name!r}."
        )
    if tensor.get("datatype") not in ("FP32", "BYTES"):
        raise InputError(
            f"input {model.input.name!r} has datatype {str(tensor.get('datatype'))[:20]!r}; send FP32 "
            "(preprocessed images) or BYTES (encoded image files).",
            reason="bad_dtype",
        )
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise InputError(
            f"input {model.input.name!r}: shape must be a list of non-negative integers.", reason="bad_shape"
        )
    return tensor


def tensor_parameters(tensor: dict) -> dict:
    return _object(tensor.get("parameters", {}), "the input's parameters")


def fp32_tensor(tensor: dict, binary: bytes, model: LoadedModel, literals: bool = True) -> np.ndarray:
    spec = model.input
    shape = tuple(tensor["shape"])
    expected = (spec.channels, spec.size, spec.size)
    if len(shape) != 4 or shape[1:] != expected or shape[0] < 1:
        raise InputError(
            f"input {spec.name!r} has shape {list(shape)}; this model takes FP32 [N, {spec.channels}, "
            f"{spec.size}, {spec.size}] with N ≥ 1.",
            reason="bad_shape",
        )
    count = int(np.prod(shape))
    size = binary_size(tensor)
    if size is not None:
        raw = binary_slice(binary, size)
        if len(raw) != 4 * count:
            raise InputError(
                f"binary FP32 data of {len(raw)} bytes does not hold {list(shape)}.", reason="bad_shape"
            )
        array = np.frombuffer(raw, dtype="<f4").astype(np.float32)
        if not np.isfinite(array).all():
            raise InputError("the binary FP32 data holds NaN or ±inf.", reason="not_finite")
    else:
        data = tensor.get("data")
        if not isinstance(data, list) or not data:
            raise InputError(f'input {spec.name!r} needs "data" (or binary data).', reason="bad_shape")
        array = numbers(data, '"data"', f"{list(shape)}", literals)
        if array.size != count:
            raise InputError(
                f'"data" holds {array.size} values; shape {list(shape)} needs {count}.', reason="bad_shape"
            )
    return array.reshape(shape)


def bytes_elements(tensor: dict, binary: bytes) -> list[bytes]:
    shape = tensor["shape"]
    if not 1 <= len(shape) <= 2 or shape[0] < 1 or (len(shape) == 2 and shape[1] != 1):
        raise InputError(
            f"a BYTES input holds one image file per row: shape [N] or [N, 1], got {shape}.",
            reason="bad_shape",
        )
    size = binary_size(tensor)
    if size is not None:
        elements = unpack_bytes(binary_slice(binary, size))
    else:
        data = tensor.get("data")
        if not isinstance(data, list) or not all(isinstance(v, str) for v in _flat(data)):
            raise InputError(
                'BYTES "data" in JSON must be base64 strings, one per image file.', reason="bad_dtype"
            )
        elements = [_base64(v, i) for i, v in enumerate(_flat(data))]
    if len(elements) != shape[0]:
        raise InputError(
            f"the BYTES input holds {len(elements)} elements; its shape {shape} says {shape[0]}.",
            reason="bad_shape",
        )
    return elements


def binary_size(tensor: dict) -> int | None:
    size = tensor_parameters(tensor).get("binary_data_size")
    if size is None:
        return None
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InputError("binary_data_size must be a non-negative integer.", reason="bad_json")
    return size


def binary_slice(binary: bytes, size: int) -> bytes:
    if size > len(binary):
        raise InputError(
            f"binary_data_size {size} exceeds the {len(binary)} bytes after the JSON header.",
            reason="bad_shape",
        )
    return binary[:size]  # one input, so its data starts the binary part


def unpack_bytes(raw: bytes) -> list[bytes]:
    """A binary BYTES tensor: each element a 4-byte little-endian length, then its bytes."""
    elements, at = [], 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise InputError("binary BYTES data ends inside an element's length.", reason="bad_shape")
        (length,) = struct.unpack_from("<I", raw, at)
        if at + 4 + length > len(raw):
            raise InputError("binary BYTES data ends inside an element.", reason="bad_shape")
        elements.append(raw[at + 4 : at + 4 + length])
        at += 4 + length
    return elements


def _flat(data: list) -> list:
    return [v for row in data for v in (row if isinstance(row, list) else [row])]


def _base64(text: str, index: int) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InputError(f"BYTES element {index} is not base64 ({exc}).", reason="bad_dtype") from exc


def requested_outputs(document: dict, parameters: dict) -> dict[str, dict]:
    """Output name → its parameters; every output when none is named."""
    outputs = document.get("outputs")
    binary = bool(parameters.get("binary_data_output", False))
    if outputs is None:
        return {name: {"binary_data": binary} for name in OUTPUTS}
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise InputError('"outputs" must be a list of {"name": ...} objects.', reason="bad_json")
    requested = {}
    for output in outputs:
        name = output.get("name")
        if name not in OUTPUTS:
            raise InputError(
                f"unknown output {str(name)[:50]!r}; outputs: {', '.join(OUTPUTS)}.", reason="bad_output"
            )
        options = {"binary_data": binary} | _object(
            output.get("parameters", {}), f"output {name}'s parameters"
        )
        k = options.get("classification", 0)
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= MAX_CLASSIFICATION:
            raise InputError(
                f"classification must be an integer 0-{MAX_CLASSIFICATION}.", reason="bad_output"
            )
        if k and name == "capture":
            raise InputError('output "capture" has no classes to classify.', reason="bad_output")
        requested[name] = options
    return requested


def respond(
    document: dict, model: LoadedModel, logits: np.ndarray, captured, requested: dict[str, dict]
) -> Response:
    values = {"logits": logits.astype(np.float32), "probabilities": softmax(logits).astype(np.float32)}
    if captured is not None:
        values["capture"] = np.array([json.dumps(c.as_dict()).encode() for c in captured], dtype=object)
    outputs, chunks = [], []
    for name, options in requested.items():
        if name not in values:
            continue  # "capture" for tensor inputs, when every output was asked for
        tensor, datatype = values[name], "BYTES" if name == "capture" else "FP32"
        if k := options.get("classification", 0):
            tensor, datatype = classification(tensor, model.classes, k), "BYTES"
        entry = {"name": name, "datatype": datatype, "shape": list(tensor.shape)}
        if options.get("binary_data"):
            raw = pack_bytes(tensor) if datatype == "BYTES" else tensor.astype("<f4").tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = (
                [v.decode() for v in tensor.ravel()] if datatype == "BYTES" else tensor.ravel().tolist()
            )
        outputs.append(entry)
    answer = {"model_name": model.name, "model_version": model.version or "", "outputs": outputs}
    if isinstance(document.get("id"), str):
        answer["id"] = document["id"]
    header = json.dumps(answer).encode()
    if not chunks:
        return Response(header, media_type="application/json")
    return Response(
        header + b"".join(chunks),
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(header))},
    )


def classification(scores: np.ndarray, classes: tuple[str, ...], k: int) -> np.ndarray:
    """BYTES [N, k]: "value:index:label" of the k highest scores per row, highest first."""
    k = min(k, scores.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.array(
        [
            [f"{row[i]:f}:{i}:{classes[i]}".encode() for i in ranking]
            for row, ranking in zip(scores, order, strict=True)
        ],
        dtype=object,
    )


def pack_bytes(tensor: np.ndarray) -> bytes:
    return b"".join(struct.pack("<I", len(v)) + v for v in tensor.ravel())


def _object(value: Any, what: str) -> dict:
    if not isinstance(value, dict):
        raise InputError(f"{what} must be a JSON object.", reason="bad_json")
    return value


def _version() -> str:
    try:
        return metadata.version("alexops")
    except metadata.PackageNotFoundError:
        return "unknown"


# ---- errors in this protocol's shape ------------------------------------------------------


def error_body(message: str, status: int) -> dict:
    return {"error": message}


def no_such_route(request: Request) -> str:
    return (
        f"no such route: {request.method} {request.url.path[:200]}. Open Inference Protocol routes: GET /v2, "
        "/v2/health/live, /v2/health/ready, /v2/models/{name}[/versions/{v}][/ready], "
        "POST /v2/models/{name}[/versions/{v}]/infer."
    )
