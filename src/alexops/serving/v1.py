"""The project's own API, `/v1`: top-k classes of image files or preprocessed arrays.

`POST /v1/predict` takes image files (multipart field `file`, repeated) or preprocessed
arrays (JSON `{"inputs": ...}`) and answers the top-k classes of each, and for files what
the capture step did. `GET /v1/model`, `/healthz`, `/readyz`, `/metrics` (Prometheus).
Errors are JSON `{"detail": "..."}` naming the problem.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from alexops.serving import bodies
from alexops.serving.inputs import InputError, array_inputs
from alexops.serving.model import LoadedModel
from alexops.serving.model import top_k as top_k_of
from alexops.serving.state import Server, server_of

PREFIXES = ()  # the default protocol: every path no other protocol claims


class ErrorBody(BaseModel):
    detail: str = Field(description="what was wrong, and how to fix it")


class ClassScore(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    class_name: str = Field(alias="class", description="class name")
    index: int = Field(description="the class's index in the model's output")
    probability: float = Field(description="softmax probability")


class Captured(BaseModel):
    mode: str = Field(description="the capture mode asked for: auto, dataset or none")
    applied: str = Field(description="the recipe applied (its kind, e.g. catalogue), or none")
    reason: str = Field(description="why: what capture=auto saw, or the mode")


class Prediction(BaseModel):
    filename: str | None = Field(None, description="the uploaded file's name (image requests only)")
    capture: Captured | None = Field(None, description="what the capture step did (image requests only)")
    top_k: list[ClassScore] = Field(description="the most probable classes, most probable first")


class ModelVersion(BaseModel):
    name: str
    version: str | None = Field(description="registry version; null for a model served from a file")


class PredictResponse(BaseModel):
    model: ModelVersion
    predictions: list[Prediction] = Field(description="one per input, in the order sent")


class InputDescription(BaseModel):
    name: str
    shape: list[int | None]
    dtype: str


class ModelInfo(BaseModel):
    name: str
    version: str | None
    uri: str
    classes: list[str]
    input: InputDescription
    preprocessing: dict
    capture: dict = Field(description="how the dataset's images were made (its capture recipe)")
    provider: str = Field(description="the onnxruntime execution provider in use")
    threads: int = Field(description="onnxruntime intra-op threads (0: its default)")
    max_batch_size: int
    max_wait_ms: float


class Status(BaseModel):
    status: str
    version: str | None = None


def _errors(*statuses: int) -> dict:
    return {status: {"model": ErrorBody} for status in statuses}


# One endpoint takes two kinds of body, so its request body is described here rather than
# inferred from parameters; the nested arrays' shape is the model's input, (N, C, S, S).
PREDICT_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file"],
                "properties": {
                    "file": {
                        "type": "array",
                        "items": {"type": "string", "format": "binary"},
                        "description": "image files (PNG, JPEG, ... any size and mode)",
                    }
                },
            }
        },
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["inputs"],
                "additionalProperties": False,
                "properties": {
                    "inputs": {
                        "type": "array",
                        "description": "preprocessed images (N, C, S, S), or one (C, S, S): see /v1/model",
                        "items": {
                            "type": "array",
                            "items": {
                                "type": "array",
                                "items": {"type": "array", "items": {"type": "number"}},
                            },
                        },
                    }
                },
            }
        },
    },
}

router = APIRouter()


@router.get("/healthz", response_model=Status, response_model_exclude_none=True, summary="the process is up")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", response_model=Status, responses=_errors(503), summary="a model is loaded and served")
async def readyz(request: Request):
    server = server_of(request)
    if not server.batcher.running:
        return JSONResponse({"detail": "not ready: the batch worker is not running"}, status_code=503)
    return {"status": "ready", "version": server.model.version}


@router.get("/v1/model", response_model=ModelInfo, summary="the model being served")
async def model_info(request: Request) -> dict:
    server = server_of(request)
    options = {"max_batch_size": server.options.max_batch_size, "max_wait_ms": server.options.max_wait_ms}
    return server.model.describe() | options


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    summary="Prometheus metrics",
)
async def prometheus_metrics(request: Request) -> Response:
    return Response(generate_latest(server_of(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.post(
    "/v1/predict",
    response_model=PredictResponse,
    responses=_errors(400, 413, 415, 422, 503),
    openapi_extra={"requestBody": PREDICT_BODY},
    summary="top-k classes of images (multipart `file`) or preprocessed arrays (JSON `inputs`)",
)
async def predict(
    request: Request,
    top_k: int = Query(5, ge=1, le=1000, description="classes per input"),
    capture: Literal["auto", "dataset", "none"] = Query(
        "auto", description="bring image files into the dataset's form: when needed (auto), always, never"
    ),
):
    server = server_of(request)
    model = server.model  # this request's model, even if a reload swaps another in meanwhile
    x, labels = await read_inputs(request, server, model, capture)
    logits = await server.infer(model, x)
    ranked = top_k_of(logits, model.classes, top_k)
    predictions = [
        {"top_k": best}
        if label is None
        else {"filename": label[0], "capture": label[1].as_dict(), "top_k": best}
        for label, best in zip(labels, ranked, strict=True)
    ]
    # a plain JSONResponse: the response model documents the shape, re-validating it costs time
    return JSONResponse({"model": {"name": model.name, "version": model.version}, "predictions": predictions})


async def read_inputs(request: Request, server: Server, model: LoadedModel, capture: str):
    """(float32 (N, C, S, S), per input None or (filename, what capture did)) from either kind of body."""
    body = await bodies.read_body(request, server.options.max_body_bytes)
    if not body:
        raise InputError(
            "empty request body. Send image files as multipart/form-data (field `file`) "
            'or JSON {"inputs": [...]}.',
            reason="empty",
        )
    kind = bodies.media_type(request)
    if kind == "application/json":
        x = await server.parse(json_inputs, body, model)
        return x, [None] * len(x)
    if kind == "multipart/form-data":
        files = await bodies.multipart_files(request, body, "file")
        x, done = await server.images([(label, data) for label, data, _ in files], model, capture)
        return x, [(name, captured) for (_, _, name), captured in zip(files, done, strict=True)]
    raise InputError(
        f"unsupported Content-Type {kind or '(none)'}. Send image files as multipart/form-data "
        '(field `file`) or preprocessed arrays as application/json {"inputs": [...]}.',
        status=415,
        reason="unsupported_media_type",
    )


def json_inputs(body: bytes, model: LoadedModel) -> np.ndarray:
    document = bodies.parse_json(body)
    if not isinstance(document, dict) or "inputs" not in document:
        raise InputError('expected a JSON object {"inputs": [...]}.', reason="bad_json")
    if unknown := sorted(set(document) - {"inputs"}):
        raise InputError(
            f'unknown key(s) {", ".join(map(repr, unknown))[:200]}; send only "inputs".', reason="bad_json"
        )
    return array_inputs(document["inputs"], model.input, literals=bodies.may_hold_literals(body))


# ---- errors in this protocol's shape ------------------------------------------------------


def error_body(message: str, status: int) -> dict:
    return {"detail": message}


def no_such_route(request: Request) -> str:
    return (
        f"no such route: {request.method} {request.url.path[:200]}. Routes: POST /v1/predict, "
        "GET /v1/model, /healthz, /readyz, /metrics; Open Inference Protocol under /v2; MLflow's "
        "POST /invocations, GET /ping; the API at /docs and /openapi.json."
    )
