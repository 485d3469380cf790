"""The micro-batcher every protocol submits to: concurrent requests, one onnxruntime call."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from alexops.serving.inputs import ServingError
from alexops.serving.metrics import Metrics
from alexops.serving.model import LoadedModel

log = logging.getLogger("alexops.serve")


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
            raise ServingError("the server is shutting down; retry on another replica.", 503, "shutting_down")
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
