"""`alexops serve`: the model over HTTP on onnxruntime (FastAPI + uvicorn).

`POST /v1/predict` takes image files (multipart field `file`, repeated) or preprocessed
arrays (JSON `{"inputs": ...}`) and answers the top-k classes of each. Concurrent requests
are merged into one onnxruntime call (micro-batching). A model named by a registry alias
is reloaded when the alias moves; a request keeps the model it started with, so a swap
fails none. `GET /healthz`, `/readyz`, `/v1/model`, `/metrics` (Prometheus). Every error
is JSON, `{"detail": "..."}`, and names the problem.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import uvicorn
from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.requests import Request as StarletteRequest

from alexops import inference
from alexops.errors import AlexopsError
from alexops.inference import InputError, LoadedModel, ModelSource

log = logging.getLogger("alexops.serve")

MAX_FILES = 256  # per request; the body limit bounds their bytes
# Small images are decoded on the event loop: ~0.15 ms of work for a 28×28 PNG, less than a
# thread hop and its wait for the GIL; larger ones go to a thread so the loop keeps serving.
INLINE_PIXELS = 256 * 256
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = 64
    max_wait_ms: float = 5.0
    reload_interval: float = 2.0
    max_pixels: int = 4096 * 4096
    max_body_mb: float = 16.0

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)


# ---- metrics ------------------------------------------------------------------------------


class Metrics:
    """Prometheus metrics in a registry of the app's own, so two apps in one process never clash."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "alexops_http_requests", "HTTP requests", ["route", "method", "status"], registry=r
        )
        self.latency = Histogram(
            "alexops_http_request_duration_seconds", "request latency", ["route"], buckets=LATENCY_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.errors = Counter(
            "alexops_http_errors", "responses with status ≥ 400", ["route", "status"], registry=r
        )
        self.rejected = Counter(
            "alexops_rejected_inputs", "inputs refused, by reason", ["reason"], registry=r
        )
        self.batch_size = Histogram(
            "alexops_batch_size", "inputs per onnxruntime call", buckets=BATCH_BUCKETS, registry=r
        )
        self.inference_failures = Counter(
            "alexops_inference_failures", "onnxruntime calls that raised", registry=r
        )
        self.reloads = Counter("alexops_model_reloads", "model swaps after the alias moved", registry=r)
        self.reload_failures = Counter(
            "alexops_model_reload_failures", "failed alias checks or loads", registry=r
        )
        self.model_info = Gauge(
            "alexops_model_info",
            "the model being served (value 1)",
            ["name", "version", "provider"],
            registry=r,
        )

    def serving(self, model: LoadedModel) -> None:
        self.model_info.clear()
        self.model_info.labels(model.name, str(model.version), model.provider).set(1)

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)
        if status >= 400:
            self.errors.labels(route, str(status)).inc()


class MetricsMiddleware:
    """Counts and times every request by its route template (unknown paths: `unmatched`)."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets when the app raises before it starts a response

        async def send_and_record_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record_status)
        finally:
            route = scope.get("route")
            label = getattr(route, "path", "unmatched")
            self.metrics.observe(label, scope["method"], status, time.perf_counter() - started)


# ---- micro-batching -----------------------------------------------------------------------


@dataclass(eq=False)
class _Waiting:
    model: LoadedModel  # the model the inputs were preprocessed for; they run on it
    inputs: np.ndarray
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)


class MicroBatcher:
    """Merges concurrent requests into one onnxruntime call.

    One worker takes what is waiting once `max_batch_size` inputs are there, or once the
    oldest has waited `max_wait`, runs it as one batch on a thread of its own (the event
    loop goes on accepting requests) and hands each request its rows of the output.
    """

    def __init__(self, max_batch_size: int, max_wait_s: float, metrics: Metrics) -> None:
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.metrics = metrics
        self._waiting: collections.deque[_Waiting] = collections.deque()
        self._rows_waiting = 0
        self._arrived = asyncio.Event()
        self._full = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="alexops-onnxruntime")
        self._task: asyncio.Task | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        self._task = asyncio.create_task(self._work(), name="alexops-micro-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for waiting in self._waiting:
            waiting.future.cancel()
        self._executor.shutdown(wait=False)

    async def submit(self, model: LoadedModel, inputs: np.ndarray) -> np.ndarray:
        """The model's logits for `inputs`, computed in a batch with whatever else is waiting."""
        if not self.running:
            raise HTTPException(503, "the server is shutting down")
        future = asyncio.get_running_loop().create_future()
        self._waiting.append(_Waiting(model, inputs, future))
        self._rows_waiting += len(inputs)
        self._arrived.set()
        if self._rows_waiting >= self.max_batch_size:
            self._full.set()
        return await future

    async def _work(self) -> None:
        while True:
            await self._arrived.wait()
            await self._until_full_or_due()
            batch = self._take()
            try:
                await self._run(batch)
            except Exception:  # never let the worker die: every later request would hang
                log.exception("micro-batcher: a batch failed")

    async def _until_full_or_due(self) -> None:
        due = self._waiting[0].arrived + self.max_wait_s - time.monotonic()
        if self._rows_waiting < self.max_batch_size and due > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._full.wait(), due)

    def _take(self) -> list[_Waiting]:
        batch, rows = [], 0
        while self._waiting and (not batch or rows + len(self._waiting[0].inputs) <= self.max_batch_size):
            waiting = self._waiting.popleft()
            batch.append(waiting)
            rows += len(waiting.inputs)
        self._rows_waiting -= rows
        if self._rows_waiting < self.max_batch_size:
            self._full.clear()
        if not self._waiting:
            self._arrived.clear()
        return batch

    async def _run(self, batch: list[_Waiting]) -> None:
        by_model: dict[int, list[_Waiting]] = {}
        for waiting in batch:  # during a model swap a batch can hold inputs for two models
            by_model.setdefault(id(waiting.model), []).append(waiting)
        for group in by_model.values():
            await self._run_on_one_model(group)

    async def _run_on_one_model(self, group: list[_Waiting]) -> None:
        model = group[0].model
        x = np.concatenate([w.inputs for w in group]) if len(group) > 1 else group[0].inputs
        self.metrics.batch_size.observe(len(x))
        loop = asyncio.get_running_loop()
        try:
            logits = await loop.run_in_executor(self._executor, model.logits, x)
        except Exception as exc:
            self.metrics.inference_failures.inc()
            log.exception("onnxruntime failed on a batch of %d", len(x))
            for waiting in group:
                if not waiting.future.done():
                    waiting.future.set_exception(exc)
            return
        start = 0
        for waiting in group:
            rows = logits[start : start + len(waiting.inputs)]
            start += len(waiting.inputs)
            if not waiting.future.done():  # the client may have gone
                waiting.future.set_result(rows)


# ---- the served model and its reload ------------------------------------------------------


@dataclass
class Server:
    """What the endpoints share. `model` is replaced whole on reload, never mutated."""

    model: LoadedModel
    source: ModelSource
    options: ServeOptions
    metrics: Metrics
    batcher: MicroBatcher


async def follow_alias(server: Server) -> None:
    """Poll the registry alias; load a version it moves to and swap it in."""
    while True:
        await asyncio.sleep(server.options.reload_interval)
        current = server.model
        try:
            version = await asyncio.to_thread(server.source.current_version)
            if version == current.version:
                continue
            model = await asyncio.to_thread(load_warm, server.source, version)
        except Exception as exc:  # the store down, a broken upload: keep serving what we have
            server.metrics.reload_failures.inc()
            log.warning("reload: %s; still serving version %s", exc, current.version)
            continue
        server.model = model  # one reference assignment: each request already holds its model
        server.metrics.reloads.inc()
        server.metrics.serving(model)
        log.info(
            "reload: %s moved from version %s to %s; now serving %s",
            model.uri,
            current.version,
            version,
            version,
        )


def load_warm(source: ModelSource, version: str | None = None) -> LoadedModel:
    """Load the model and run it once, so that its first request does not pay for the set-up."""
    model = source.load(version)
    model.logits(np.zeros((1, model.input.channels, model.input.size, model.input.size), np.float32))
    return model


# ---- the API ------------------------------------------------------------------------------


class ErrorBody(BaseModel):
    detail: str = Field(description="what was wrong, and how to fix it")


class ClassScore(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    class_name: str = Field(alias="class", description="class name")
    index: int = Field(description="the class's index in the model's output")
    probability: float = Field(description="softmax probability")


class Prediction(BaseModel):
    filename: str | None = Field(None, description="the uploaded file's name (image requests only)")
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


def _server(request: Request) -> Server:
    return request.app.state.server


@router.get("/healthz", response_model=Status, response_model_exclude_none=True, summary="the process is up")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", response_model=Status, responses=_errors(503), summary="a model is loaded and served")
async def readyz(request: Request):
    server = _server(request)
    if not server.batcher.running:
        return JSONResponse({"detail": "not ready: the batch worker is not running"}, status_code=503)
    return {"status": "ready", "version": server.model.version}


@router.get("/v1/model", response_model=ModelInfo, summary="the model being served")
async def model_info(request: Request) -> dict:
    server = _server(request)
    options = {"max_batch_size": server.options.max_batch_size, "max_wait_ms": server.options.max_wait_ms}
    return server.model.describe() | options


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    summary="Prometheus metrics",
)
async def prometheus_metrics(request: Request) -> Response:
    return Response(generate_latest(_server(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.post(
    "/v1/predict",
    response_model=PredictResponse,
    responses=_errors(400, 413, 415, 422, 503),
    openapi_extra={"requestBody": PREDICT_BODY},
    summary="top-k classes of images (multipart `file`) or preprocessed arrays (JSON `inputs`)",
)
async def predict(request: Request, top_k: int = Query(5, ge=1, le=1000, description="classes per input")):
    server = _server(request)
    model = server.model  # this request's model, even if a reload swaps another in meanwhile
    inputs, filenames = await read_inputs(request, model, server.options)
    logits = await server.batcher.submit(model, inputs)
    ranked = inference.top_k(logits, model.classes, top_k)
    predictions = [
        {"top_k": best} if name is None else {"filename": name, "top_k": best}
        for name, best in zip(filenames, ranked, strict=True)
    ]
    # a plain JSONResponse: the response model documents the shape, re-validating it costs time
    return JSONResponse({"model": {"name": model.name, "version": model.version}, "predictions": predictions})


async def read_inputs(request: Request, model: LoadedModel, options: ServeOptions):
    """(float32 (N, C, S, S), one filename or None per input) from either kind of body."""
    body = await read_body(request, options.max_body_bytes)
    if not body:
        raise InputError(
            "empty request body. Send image files as multipart/form-data (field `file`) "
            'or JSON {"inputs": [...]}.',
            reason="empty",
        )
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type == "application/json":
        inputs = await asyncio.to_thread(json_inputs, body, model)
        return inputs, [None] * len(inputs)
    if media_type == "multipart/form-data":
        return await file_inputs(request, body, model, options)
    raise InputError(
        f"unsupported Content-Type {media_type or '(none)'}. Send image files as multipart/form-data "
        '(field `file`) or preprocessed arrays as application/json {"inputs": [...]}.',
        status=415,
        reason="unsupported_media_type",
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed `limit` (header or bytes read)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _body_too_large(limit)
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _body_too_large(limit)
            chunks.append(chunk)
    except ClientDisconnect as exc:
        raise InputError(
            "the client disconnected before sending the whole body.", reason="disconnected"
        ) from exc
    return b"".join(chunks)


def _body_too_large(limit: int) -> InputError:
    return InputError(
        f"request body larger than this server's limit of {limit / 2**20:g} MiB (--max-body-mb). "
        "Fix: send fewer or smaller images per request.",
        status=413,
        reason="body_too_large",
    )


def json_inputs(body: bytes, model: LoadedModel):
    try:
        document = json.loads(body, parse_constant=_reject_constant)
    except InputError:
        raise
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise InputError(f"the body is not valid JSON ({str(exc)[:200]}).", reason="bad_json") from exc
    if not isinstance(document, dict) or "inputs" not in document:
        raise InputError('expected a JSON object {"inputs": [...]}.', reason="bad_json")
    if unknown := sorted(set(document) - {"inputs"}):
        raise InputError(
            f'unknown key(s) {", ".join(map(repr, unknown))[:200]}; send only "inputs".', reason="bad_json"
        )
    return inference.array_inputs(document["inputs"], model.input)


def _reject_constant(name: str):
    raise InputError(f'"inputs" holds {name}; only finite numbers are valid inputs.', reason="not_finite")


async def file_inputs(request: Request, body: bytes, model: LoadedModel, options: ServeOptions):
    async def replay_body() -> dict:  # the body is already read (and capped); parse it from memory
        return {"type": "http.request", "body": body, "more_body": False}

    form = await StarletteRequest(request.scope, replay_body).form(
        max_files=MAX_FILES, max_part_size=len(body)
    )
    try:
        uploads = form.getlist("file")
        if not uploads:
            fields = ", ".join(sorted(form.keys()))[:200] or "none"
            raise InputError(
                f"no image: send one or more files in the multipart field `file` (fields sent: {fields}).",
                reason="no_file",
            )
        if not all(isinstance(upload, UploadFile) for upload in uploads):
            raise InputError(
                "the multipart field `file` must carry files, not text values.", reason="no_file"
            )
        files = [(_label(upload, i), await upload.read()) for i, upload in enumerate(uploads)]
    finally:
        await form.close()
    if sum(inference.pixel_count(data) for _, data in files) <= INLINE_PIXELS:
        inputs = decode_and_preprocess(files, model, options.max_pixels)
    else:
        inputs = await asyncio.to_thread(decode_and_preprocess, files, model, options.max_pixels)
    return inputs, [upload.filename or "" for upload in uploads]


def _label(upload: UploadFile, index: int) -> str:
    name = (upload.filename or "")[:100]
    return f"file {name!r}" if name else f"file #{index + 1}"


def decode_and_preprocess(files: list[tuple[str, bytes]], model: LoadedModel, max_pixels: int) -> np.ndarray:
    images = [inference.decode_image(data, model.input.channels, max_pixels, label) for label, data in files]
    return inference.preprocess(images, model.recipe)


# ---- errors -------------------------------------------------------------------------------


def install_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    async def input_error(request: Request, exc: InputError) -> JSONResponse:
        metrics.rejected.labels(exc.reason).inc()
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(
            {"detail": _http_detail(request, exc)}, status_code=exc.status_code, headers=exc.headers
        )

    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        metrics.rejected.labels("bad_parameter").inc()
        return JSONResponse({"detail": f"invalid request: {problems}"[:500]}, status_code=422)

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return JSONResponse(
            {"detail": f"internal error ({exc.__class__.__name__}); the server logged it"}, status_code=500
        )

    app.add_exception_handler(InputError, input_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, unexpected)


def _http_detail(request: Request, exc: HTTPException) -> str:
    if exc.status_code == 404:
        return (
            f"no such route: {request.method} {request.url.path[:200]}. Routes: POST /v1/predict, "
            "GET /v1/model, /healthz, /readyz, /metrics; the API at /docs and /openapi.json."
        )
    if exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        return f"{request.method} is not allowed on {request.url.path[:200]}; allowed: {allowed}."
    return str(exc.detail)


# ---- the app and the process --------------------------------------------------------------


def create_app(source: ModelSource, model: LoadedModel, options: ServeOptions) -> FastAPI:
    metrics = Metrics()
    metrics.serving(model)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        server = Server(
            model,
            source,
            options,
            metrics,
            MicroBatcher(options.max_batch_size, options.max_wait_ms / 1e3, metrics),
        )
        app.state.server = server
        server.batcher.start()
        reloader = None
        if source.ref.follows_alias and options.reload_interval > 0:
            reloader = asyncio.create_task(follow_alias(server), name="alexops-reload")
        yield
        if reloader is not None:
            reloader.cancel()
        await server.batcher.stop()

    app = FastAPI(
        title="alexops",
        summary="AlexNet (Krizhevsky, Sutskever & Hinton 2012) on onnxruntime",
        version="1",
        lifespan=lifespan,
    )
    app.include_router(router)
    install_error_handlers(app, metrics)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a port in use is one clear error."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        raise AlexopsError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}. Fix: pick another --port "
            "(0 takes any free one) or stop what is using it."
        ) from exc
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(source: ModelSource, options: ServeOptions) -> None:
    import torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    inference.configure_pillow(options.max_pixels)
    disable_created_metrics()  # `_created` timestamps double the /metrics text and nobody reads them
    torch.set_num_threads(1)  # preprocessing is per request; parallelism comes from concurrent requests
    model = load_warm(source)
    sock = bind(options.host, options.port)
    host, port = sock.getsockname()[:2]
    log.info(
        "serving %s version %s (%s) on onnxruntime %s, %s threads, %s classes, input %s",
        model.name, model.version, model.uri, model.provider, model.threads or "default", len(model.classes),
        model.input.as_dict()["shape"],
    )  # fmt: skip
    if source.ref.follows_alias and options.reload_interval > 0:
        log.info("following %s: checking the alias every %g s", model.uri, options.reload_interval)
    log.info("listening on http://%s:%d", host, port)
    config = uvicorn.Config(
        create_app(source, model, options), log_config=None, access_log=False, lifespan="on"
    )
    uvicorn.Server(config).run(sockets=[sock])
