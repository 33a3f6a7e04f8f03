"""What one app runs on beside its `ServiceState`: metrics, thread pools, the batcher.

`create_app` makes one `Runtime` and puts it on `app.state.runtime`; the handlers reach
it through `deps.py`. The lifespan starts it (the batcher, the background load and the
index watcher) and stops it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from mocoserve.service.admission import PixelBudget, return_large_frees
from mocoserve.service.batching import Batcher, BatchStats
from mocoserve.service.metrics import ServiceMetrics
from mocoserve.service.state import Served, ServiceConfig, ServiceState, model_sha256, reason

log = logging.getLogger("mocoserve.serve")


class Runtime:
    """The service's moving parts: metrics, the decode and search pools, the batcher."""

    def __init__(
        self,
        config: ServiceConfig,
        state: ServiceState,
        on_fatal: Callable[[str], None] | None = None,
    ) -> None:
        self.config, self.state, self.on_fatal = config, state, on_fatal
        self.metrics = metrics = ServiceMetrics()
        self.decode_pool = ThreadPoolExecutor(
            config.decode_threads, thread_name_prefix="mocoserve-decode"
        )
        # searches build their answers in Python: two threads keep the cores busy (the index
        # lock serialises the searches themselves) without more threads taking the GIL from
        # the event loop
        self.search_pool = ThreadPoolExecutor(2, thread_name_prefix="mocoserve-search")
        return_large_frees()
        # large decodes: one thread always left to small images; one full-size image at a time
        self.large_decodes = PixelBudget(config.max_image_pixels, max(1, config.decode_threads - 1))
        self.batcher = Batcher(
            lambda x: state.encoder.embed(x),  # type: ignore[union-attr]
            config.max_batch,
            config.max_delay_ms / 1000,
            config.max_queue,
            BatchStats(metrics.observe_batch, metrics.queue_wait.observe),
        )
        metrics.queue_images.set_function(lambda: self.batcher.waiting)
        state.on_swap.append(self.on_swap)
        state.on_reload_error.append(lambda _message: metrics.reload_failures.inc())
        if state.served is not None:  # handed in loaded
            self.on_swap(state.served)

    def on_swap(self, served: Served) -> None:
        self.metrics.index_items.set(len(served.index))
        self.metrics.index_version.set(served.version)

    async def load_then_watch(self) -> None:
        """Load the model and the index (unless loaded already), then reload on each save."""
        state, config = self.state, self.config
        if state.status == "loading":  # a state handed in loaded is not loaded again
            try:
                await asyncio.to_thread(state.load)
            except Exception as e:  # any error (a damaged database's too), said in one line
                if self.on_fatal is not None:
                    self.on_fatal(reason(e))  # the CLI stops the server and says it in one line
                else:
                    log.error("cannot load: %s", reason(e))
                return
        encoder = state.encoder
        if encoder is not None:
            self.metrics.model.info(
                {
                    "sha256": model_sha256(encoder),
                    "dim": str(encoder.embedding_dim),
                    "provider": encoder.provider,
                }
            )
        while config.index is not None:
            await asyncio.sleep(config.reload_seconds)
            try:  # a reload records its own failures; this is for a bug: watching goes on
                await asyncio.to_thread(state.reload_if_changed)
            except Exception as e:
                log.error("watching the index: %s", reason(e))

    async def stop(self) -> None:
        await self.batcher.stop()
        self.decode_pool.shutdown(wait=False, cancel_futures=True)
        self.search_pool.shutdown(wait=False, cancel_futures=True)
