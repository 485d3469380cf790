"""What every protocol's endpoints share: the served model, the batcher, the options.

The protocols (`v1`, `v2`, `scoring`) are thin adapters: each parses its own request shape
into model inputs, calls `Server.images` or sends arrays straight to `Server.infer`, and
renders the logits in its own response shape.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import numpy as np
from starlette.requests import Request

from alexops import images
from alexops.serving import inputs
from alexops.serving.batcher import MicroBatcher
from alexops.serving.metrics import Metrics
from alexops.serving.model import LoadedModel, ModelSource

log = logging.getLogger("alexops.serve")


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = 64
    max_wait_ms: float = 5.0
    reload_interval: float = 2.0
    max_pixels: int = images.DEFAULT_MAX_PIXELS
    max_body_mb: float = 16.0

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)


@dataclass
class Server:
    """`model` is replaced whole on reload, never mutated: a request reads it once and keeps it."""

    model: LoadedModel
    source: ModelSource
    options: ServeOptions
    metrics: Metrics
    batcher: MicroBatcher

    async def infer(self, model: LoadedModel, x: np.ndarray) -> np.ndarray:
        """`model`'s logits for float32 (N, C, S, S), batched with whatever else is waiting."""
        return await self.batcher.submit(model, x)

    async def parse(self, parse, body: bytes, *args):
        """`parse(body, *args)`: on the event loop for a body of at most INLINE_BYTES (a 99×99
        image's 80 kB of JSON parse in about a millisecond, less than a thread's hop and its wait
        for the GIL); larger ones on a thread, so that the loop keeps serving meanwhile."""
        if len(body) <= inputs.INLINE_BYTES:
            return parse(body, *args)
        return await asyncio.to_thread(parse, body, *args)

    async def images(
        self, files: list[tuple[str, bytes]], model: LoadedModel, capture: str
    ) -> tuple[np.ndarray, list[images.Captured]]:
        """Decoded, captured and preprocessed model inputs for image files."""
        if inputs.total_pixels(files) <= inputs.INLINE_PIXELS:
            return inputs.image_inputs(files, model, capture, self.options.max_pixels)
        return await asyncio.to_thread(inputs.image_inputs, files, model, capture, self.options.max_pixels)


def server_of(request: Request) -> Server:
    return request.app.state.server


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
