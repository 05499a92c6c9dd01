"""The local backend: this process decodes, through the batching scheduler."""

from __future__ import annotations

import asyncio

from kmerge.serving.engine import GenRequest
from kmerge.serving.scheduler import Scheduler


class LocalBackend:
    def __init__(self, model, config, metrics) -> None:
        self.model = model
        self.scheduler = Scheduler(
            model,
            metrics,
            max_batch_size=config.max_batch_size,
            batch_wait_ms=config.batch_wait_ms,
            max_queue=config.max_queue,
        )

    def start(self) -> None:
        self.scheduler.start()

    def submit(self, request: GenRequest) -> None:
        self.scheduler.submit(request)

    async def aclose(self, timeout: float) -> None:
        # The worker finishes what is queued; join it off the event loop.
        await asyncio.to_thread(self.scheduler.stop, timeout)

    def health(self) -> dict:
        return {
            "backend": "local",
            "worker_alive": self.scheduler.thread.is_alive(),
            "outstanding": self.scheduler.outstanding,
        }
