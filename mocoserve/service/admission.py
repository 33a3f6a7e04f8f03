"""Admission of costly decodes: a pixel budget taken on the event loop before a thread is used.

A decode's memory and time grow with its pixels (4 bytes a pixel, ~20 ns a pixel for a PNG),
so large decodes wait here, first come first served, until their pixels fit the budget and a
thread is free for them; small ones go straight to the pool. The pool then never fills with
large decodes, and a small image never queues behind one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

T = TypeVar("T")

# Decodes of at most this many pixels skip the budget: a 12-MP JPEG photo decodes to <= 3 MP
# in draft mode; 4 MP at 4 bytes a pixel is 16 MB a pool thread.
SMALL_DECODE_PIXELS = 4_000_000


class PixelBudget:
    """At most `slots` decodes at once, their pixels together at most `capacity`; FIFO."""

    def __init__(self, capacity: int, slots: int) -> None:
        self.capacity, self.slots = capacity, slots
        self.pixels = 0  # taken by admitted decodes
        self.running = 0
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def _fits(self, cost: int) -> bool:
        return self.running < self.slots and self.pixels + cost <= self.capacity

    def _take(self, cost: int) -> None:
        self.pixels += cost
        self.running += 1

    def _release(self, cost: int) -> None:
        self.pixels -= cost
        self.running -= 1
        self._admit()

    def _admit(self) -> None:
        # only the head may go: a stream of smaller decodes cannot starve a large one
        while self._waiting and self._fits(self._waiting[0][0]):
            cost, admitted = self._waiting.popleft()
            if not admitted.done():  # not cancelled
                self._take(cost)
                admitted.set_result(None)

    async def run(self, pool: Executor, fn: Callable[..., T], *args: Any, cost: int) -> T:
        """`fn(*args)` in `pool` once `cost` pixels fit; they are freed when `fn` returns.

        The pixels stay taken until the thread is done, even if the caller is cancelled.
        """
        cost = max(0, min(cost, self.capacity))  # one image over the budget runs alone
        loop = asyncio.get_running_loop()
        if not self._waiting and self._fits(cost):
            self._take(cost)
        else:
            admitted: asyncio.Future[None] = loop.create_future()
            self._waiting.append((cost, admitted))
            try:
                await admitted
            except asyncio.CancelledError:
                if admitted.done() and not admitted.cancelled():
                    self._release(cost)  # admitted, then cancelled before it started
                elif (cost, admitted) in self._waiting:  # _admit drops a cancelled head itself
                    self._waiting.remove((cost, admitted))
                    self._admit()  # it may have been the head that blocked the others
                raise
        try:
            future = pool.submit(fn, *args)
        except BaseException:
            self._release(cost)
            raise

        def done(_: object) -> None:
            with contextlib.suppress(RuntimeError):  # a closed loop: nothing waits any more
                loop.call_soon_threadsafe(self._release, cost)

        future.add_done_callback(done)
        return await asyncio.wrap_future(future)


def return_large_frees() -> None:
    """Have glibc give large freed blocks back to the OS at once (a fixed mmap threshold).

    Its default threshold rises to the largest block freed (up to 32 MB), after which a
    decode's 16-MB image blocks come from each pool thread's heap and stay there: resident
    memory would grow to a full-size decode per thread, however few run at once.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = getattr(libc, "mallopt", None)  # glibc only
    except OSError:
        return
    if mallopt is not None:
        mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: blocks of 1 MB and more are mmap'd
