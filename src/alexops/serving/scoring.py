"""MLflow's scoring protocol, so that `alexops serve` is a drop-in for `mlflow models serve`.

What `mlflow models serve` (MLflow 3.17, `mlflow.pyfunc.scoring_server`) accepts for the
registered ONNX model, whose signature is one tensor `image` float32 (-1, C, S, S):

- `POST /invocations`, `application/json`, exactly one of
  `{"inputs": [N × C × S × S]}`, `{"inputs": {"image": [...]}}`,
  `{"instances": [N × C × S × S]}`, `{"instances": [{"image": [C × S × S]}, ...]}`;
  a `"params"` key is accepted and ignored, as MLflow does for ONNX models. Beyond MLflow
  (which refuses these for a tensor model): one (C, S, S) image as `inputs`, and the
  dataframe forms with one `image` column, `{"dataframe_split": {"columns": ["image"],
  "data": [[C × S × S], ...]}}` and `{"dataframe_records": [{"image": [...]}, ...]}`.
- The answer: `{"predictions": {"logits": [[K floats], ...]}}`, as MLflow's ONNX flavour.
- `GET /ping`, `/health`: 200 with body "\\n"; `GET /version`: the MLflow version spoken.

Errors are `{"error_code": "BAD_REQUEST", "message": "..."}`, MLflow's shape, with a 4xx.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from alexops.serving import bodies
from alexops.serving.inputs import InputError, array_inputs
from alexops.serving.model import LoadedModel
from alexops.serving.state import server_of

PREFIXES = ("/invocations", "/ping", "/health", "/version")
FORMATS = ("inputs", "instances", "dataframe_split", "dataframe_records")  # MLflow's SUPPORTED_FORMATS
ERROR_CODES = {404: "ENDPOINT_NOT_FOUND", 503: "TEMPORARILY_UNAVAILABLE", 500: "INTERNAL_ERROR"}


class MlflowError(BaseModel):
    error_code: str = Field(description="MLflow's error code, e.g. BAD_REQUEST")
    message: str = Field(description="what was wrong, and how to fix it")


INVOCATIONS_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "description": "exactly one of inputs, instances, dataframe_split, dataframe_records",
                "properties": {
                    "inputs": {"description": "N × C × S × S numbers, or {'image': ...}"},
                    "instances": {
                        "type": "array",
                        "description": "C × S × S arrays, or {'image': ...} objects",
                    },
                    "dataframe_split": {"type": "object"},
                    "dataframe_records": {"type": "array", "items": {"type": "object"}},
                    "params": {"type": "object", "description": "accepted and ignored, as MLflow does"},
                },
            }
        }
    },
}

router = APIRouter(tags=["MLflow scoring protocol"])


# MLflow answers these with bodies that are not JSON under a JSON content type ("\n", "3.17.2");
# they are kept byte for byte, so they stay out of the OpenAPI schema, which would promise JSON.


@router.get("/ping", include_in_schema=False)
@router.get("/health", include_in_schema=False)
async def ping() -> Response:
    return Response("\n", media_type="application/json")


@router.get("/version", include_in_schema=False)
async def version() -> Response:
    """The MLflow version whose scoring protocol this server speaks."""
    return Response(_mlflow_version(), media_type="application/json")


@router.post(
    "/invocations",
    openapi_extra={"requestBody": INVOCATIONS_BODY},
    responses={
        200: {"content": {"application/json": {"schema": {"type": "object", "required": ["predictions"]}}}},
        **{status: {"model": MlflowError} for status in (400, 413, 415, 503)},
    },
    response_class=JSONResponse,
    summary="predictions in MLflow's scoring protocol",
)
async def invocations(request: Request) -> JSONResponse:
    server = server_of(request)
    model = server.model
    check_content_type(request.headers.get("content-type", ""))
    body = await bodies.read_body(request, server.options.max_body_bytes)
    if not body:
        raise InputError('empty request body; send JSON such as {"inputs": [...]}.', reason="empty")
    x = await server.parse(parse, body, model)
    logits = await server.infer(model, x)
    return JSONResponse({"predictions": {model.output_name: logits.tolist()}})


def check_content_type(header: str) -> None:
    kind, *options = [part.strip() for part in header.split(";")]
    kind = kind.lower()
    for option in options:
        key, _, value = option.partition("=")
        if key.strip().lower() != "charset" or value.strip().strip('"').lower() != "utf-8":
            raise InputError(
                f"unsupported content type parameter {option[:50]!r}: the scoring server takes UTF-8 JSON.",
                status=415,
                reason="unsupported_media_type",
            )
    if kind in ("text/csv", "application/vnd.apache.parquet"):
        raise InputError(
            f"{kind} is a dataframe format; this model takes image tensors (N, C, S, S). "
            'Send application/json {"inputs": [...]}.',
            reason="unsupported_media_type",
        )
    if kind != "application/json":
        raise InputError(
            f"unsupported Content-Type {kind[:50] or '(none)'}: send application/json, "
            'e.g. {"inputs": [...]}.',
            status=415,
            reason="unsupported_media_type",
        )


def parse(body: bytes, model: LoadedModel) -> np.ndarray:
    """float32 (N, C, S, S) from any of the JSON forms MLflow accepts for this model."""
    document = bodies.parse_json(body)
    literals = bodies.may_hold_literals(body)
    if not isinstance(document, dict):
        raise InputError(
            f"the input must be a JSON object with exactly one of the keys {', '.join(FORMATS)}.",
            reason="bad_json",
        )
    present = [key for key in FORMATS if key in document]
    if len(present) != 1:
        found = ", ".join(sorted(map(str, document)))[:200] or "none"
        raise InputError(
            f"the input must be a JSON object with exactly one of the keys {', '.join(FORMATS)}; "
            f"found: {found}.",
            reason="bad_json",
        )
    key, name = present[0], model.input.name
    value = document[key]
    if key == "inputs":
        return array_inputs(_named(value, name, '"inputs"'), model.input, literals=literals)
    if key == "instances":
        if isinstance(value, list) and value and all(isinstance(row, dict) for row in value):
            value = [_named(row, name, "each instance") for row in value]
        return array_inputs(value, model.input, '"instances"', literals)
    if key == "dataframe_records":
        if not isinstance(value, list) or not all(isinstance(row, dict) for row in value):
            raise InputError(
                '"dataframe_records" must be a list of {"image": [...]} objects.', reason="bad_json"
            )
        return array_inputs(
            [_named(row, name, "each record") for row in value], model.input, '"dataframe_records"'
        )
    return array_inputs(_split_column(value, name), model.input, '"dataframe_split"', literals)


def _named(value: Any, name: str, what: str) -> Any:
    """A {name: tensor} object's tensor; anything else as it is."""
    if not isinstance(value, dict):
        return value
    if set(value) != {name}:
        keys = ", ".join(map(repr, sorted(map(str, value))))[:200] or "none"
        raise InputError(
            f"{what} names the tensor(s) {keys}; this model's one input is {name!r}.", reason="bad_json"
        )
    return value[name]


def _split_column(value: Any, name: str) -> Any:
    if not isinstance(value, dict) or not isinstance(value.get("data"), list):
        raise InputError(
            '"dataframe_split" must be {"columns": ["image"], "data": [[image], ...]}.', reason="bad_json"
        )
    if value.get("columns", [name]) != [name]:
        raise InputError(f'"dataframe_split" must have the one column {name!r}.', reason="bad_json")
    rows = value["data"]
    if not all(isinstance(row, list) and len(row) == 1 for row in rows):
        raise InputError(
            'each row of "dataframe_split" must hold one image, [[C × S × S]].', reason="bad_shape"
        )
    return [row[0] for row in rows]


def _mlflow_version() -> str:
    try:
        return metadata.version("mlflow")
    except metadata.PackageNotFoundError:
        return "unknown"


# ---- errors in this protocol's shape ------------------------------------------------------


def error_body(message: str, status: int) -> dict:
    return {"error_code": ERROR_CODES.get(status, "BAD_REQUEST"), "message": message}


def no_such_route(request: Request) -> str:
    return (
        f"no such route: {request.method} {request.url.path[:200]}. MLflow scoring routes: "
        "POST /invocations, GET /ping, /health, /version."
    )
