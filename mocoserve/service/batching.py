"""Dynamic batching: images of concurrent requests go through the model together.

A request's decoded images wait in one bounded queue; a single worker takes up to
`max_batch` of them as soon as that many are waiting, or `max_delay_s` after the oldest
arrived, and runs the model once in its own thread (the event loop never blocks). A full
queue refuses new work at once (`QueueFull`, the service's 503): never an unbounded backlog.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from mocoserve.model import to_input


class QueueFull(Exception):
    """More images are waiting than the queue holds; try again shortly."""


@dataclass
class _Request:
    pixels: list[np.ndarray]  # crop x crop x 3 uint8 each
    future: asyncio.Future
    enqueued: float
    out: np.ndarray | None = None
    done: int = 0
    started: float | None = None


@dataclass
class BatchStats:
    """What each model call did, for metrics: batch size, queue wait, model time."""

    observe_batch: Callable[[int, float], None] = lambda size, seconds: None
    observe_wait: Callable[[float], None] = lambda seconds: None
    batches: int = 0
    images: int = 0


class Batcher:
    """`await embed(pixels)` -> N x D vectors, batched with whatever else is waiting."""

    def __init__(
        self,
        run: Callable[[np.ndarray], np.ndarray],
        max_batch: int = 64,
        max_delay_s: float = 0.005,
        max_queue: int = 1024,
        stats: BatchStats | None = None,
    ) -> None:
        self.run = run  # N x 3 x S x S float32 -> N x D
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self.stats = stats or BatchStats()
        self._slots: deque[tuple[_Request, int]] = deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="mocoserve-model")

    @property
    def waiting(self) -> int:
        return len(self._slots)

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._work())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for request, _ in self._slots:
            if not request.future.done():
                request.future.set_exception(QueueFull())
        self._slots.clear()
        self._model_thread.shutdown(wait=False, cancel_futures=True)

    async def embed(self, pixels: list[np.ndarray]) -> np.ndarray:
        """Vectors for these decoded images (N x D); QueueFull when the queue has no room."""
        if not pixels:
            raise ValueError("no images to embed")
        if self._wake is None:
            raise RuntimeError("the batcher is not started")
        if len(self._slots) + len(pixels) > self.max_queue:
            raise QueueFull()
        request = _Request(pixels, asyncio.get_running_loop().create_future(), time.monotonic())
        self._slots.extend((request, i) for i in range(len(pixels)))
        self._wake.set()
        return await request.future

    async def _work(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            if not self._slots:
                self._wake.clear()
                continue
            # wait for a full batch, or until the oldest waiting image has waited max_delay
            oldest = self._slots[0][0].enqueued
            while len(self._slots) < self.max_batch:
                remaining = oldest + self.max_delay_s - time.monotonic()
                if remaining <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), remaining)
                except TimeoutError:
                    break
            batch = [self._slots.popleft() for _ in range(min(self.max_batch, len(self._slots)))]
            if not self._slots:
                self._wake.clear()
            now = time.monotonic()
            for request, _ in batch:
                if request.started is None:
                    request.started = now
                    self.stats.observe_wait(now - request.enqueued)
            started = time.perf_counter()
            try:
                inputs = to_input(np.stack([r.pixels[i] for r, i in batch]))
                vectors = await loop.run_in_executor(self._model_thread, self.run, inputs)
            except Exception as e:  # the model failed: every request in the batch hears so
                for request, _ in batch:
                    if not request.future.done():
                        request.future.set_exception(e)
                continue
            self.stats.observe_batch(len(batch), time.perf_counter() - started)
            self.stats.batches += 1
            self.stats.images += len(batch)
            for (request, i), vector in zip(batch, vectors, strict=True):
                if request.future.done():
                    continue  # its client went away
                if request.out is None:
                    request.out = np.empty((len(request.pixels), len(vector)), np.float32)
                request.out[i] = vector
                request.done += 1
                if request.done == len(request.pixels):
                    request.future.set_result(request.out)
