"""`alexops serve`: one model over HTTP on onnxruntime (FastAPI + uvicorn), in three protocols.

The project's own `/v1` (`serving.v1`), the Open Inference Protocol `/v2` (`serving.v2`) and
MLflow's scoring protocol `/invocations` (`serving.scoring`) are thin adapters over one
micro-batcher (`serving.batcher`): concurrent requests of every protocol share onnxruntime
calls. A model named by a registry alias is reloaded when the alias moves; a request keeps
the model it started with, so a swap fails none. Every error is JSON in the shape of the
protocol whose route was called.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from types import ModuleType

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import disable_created_metrics
from starlette.exceptions import HTTPException

from alexops import images
from alexops.errors import AlexopsError
from alexops.serving import inputs, scoring, v1, v2
from alexops.serving.batcher import MicroBatcher
from alexops.serving.inputs import ServingError
from alexops.serving.metrics import Metrics, MetricsMiddleware
from alexops.serving.model import LoadedModel, ModelSource
from alexops.serving.state import ServeOptions, Server, follow_alias, load_warm

log = logging.getLogger("alexops.serve")

PROTOCOLS: tuple[ModuleType, ...] = (v2, scoring, v1)  # v1 last: it answers for every other path


def protocol_of(path: str) -> ModuleType:
    """The protocol whose routes `path` belongs to, so that an error comes in that protocol's shape."""
    for protocol in PROTOCOLS:
        if any(path == prefix or path.startswith(prefix + "/") for prefix in protocol.PREFIXES):
            return protocol
    return v1


def error_response(request: Request, message: str, status: int, headers: dict | None = None) -> JSONResponse:
    body = protocol_of(request.url.path).error_body(message, status)
    return JSONResponse(body, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    async def serving_error(request: Request, exc: ServingError) -> JSONResponse:
        metrics.rejected.labels(exc.reason).inc()
        return error_response(request, str(exc), exc.status)

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error_response(request, _http_message(request, exc), exc.status_code, exc.headers)

    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        metrics.rejected.labels("bad_parameter").inc()
        return error_response(request, f"invalid request: {problems}"[:500], 422)

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return error_response(
            request, f"internal error ({exc.__class__.__name__}); the server logged it", 500
        )

    app.add_exception_handler(ServingError, serving_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, unexpected)


def _http_message(request: Request, exc: HTTPException) -> str:
    if exc.status_code == 404:
        return protocol_of(request.url.path).no_such_route(request)
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
        batcher = MicroBatcher(options.max_batch_size, options.max_wait_ms / 1e3, metrics)
        server = Server(model, source, options, metrics, batcher)
        app.state.server = server
        batcher.start()
        reloader = None
        if source.ref.follows_alias and options.reload_interval > 0:
            reloader = asyncio.create_task(follow_alias(server), name="alexops-reload")
        yield
        if reloader is not None:
            reloader.cancel()
        await batcher.stop()

    app = FastAPI(
        title="alexops",
        summary="AlexNet (Krizhevsky, Sutskever & Hinton 2012) on onnxruntime: /v1, Open Inference "
        "Protocol /v2, MLflow /invocations",
        version="1",
        lifespan=lifespan,
    )
    for protocol in PROTOCOLS:
        app.include_router(protocol.router)
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
    inputs.configure_pillow(options.max_pixels)
    disable_created_metrics()  # `_created` timestamps double the /metrics text and nobody reads them
    torch.set_num_threads(1)  # preprocessing is per request; parallelism comes from concurrent requests
    started = time.perf_counter()
    model = load_warm(source)
    sock = bind(options.host, options.port)
    host, port = sock.getsockname()[:2]
    log.info(
        "serving %s version %s (%s) on onnxruntime %s, %s threads, %s classes, input %s, loaded in %.1f s",
        model.name, model.version, model.uri, model.provider, model.threads or "default", len(model.classes),
        model.input.as_dict()["shape"], time.perf_counter() - started,
    )  # fmt: skip
    log.info("capture recipe: %s", images.describe(model.capture))
    if source.ref.follows_alias and options.reload_interval > 0:
        log.info("following %s: checking the alias every %g s", model.uri, options.reload_interval)
    log.info("listening on http://%s:%d (/v1, /v2, /invocations)", host, port)
    config = uvicorn.Config(
        create_app(source, model, options), log_config=None, access_log=False, lifespan="on"
    )
    uvicorn.Server(config).run(sockets=[sock])
