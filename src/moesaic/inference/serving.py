"""Serving side of the engine: an async stream per request and the background thread that steps.

`AsyncEngineMixin` is mixed into `Engine`; it needs `submit`, `abort`, `step` and `scheduler`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator

from moesaic.inference.request import Request
from moesaic.inference.sampler import SamplingParams


class AsyncEngineMixin:
    _bg: threading.Thread | None
    _bg_wake: threading.Event
    _closing: bool
    _step_lock: threading.Lock

    async def astream(self, prompt: str | list[int], params: SamplingParams | None = None) -> AsyncIterator[tuple[str, Request]]:
        """Async text deltas for servers: a background thread steps the engine while requests run.

        Yields (delta, request); after the last one `request.finished` is True and
        `request.completion()` holds the result.
        """
        import asyncio

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def push(delta: str, r: Request) -> None:  # runs on the stepping thread
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (delta, r.finished))
            except RuntimeError:  # the consumer's event loop is closed: nobody is listening any more
                r.abort()

        req = self.submit(prompt, params, on_delta=push)
        self._ensure_background()
        try:
            while True:
                delta, last = await queue.get()
                yield delta, req
                if last:
                    return
        finally:
            if not req.finished:
                self.abort(req.request_id)

    def _ensure_background(self) -> None:
        if self._bg is not None and self._bg.is_alive():
            return
        self._bg = threading.Thread(target=self._background_loop, name="moesaic-engine", daemon=True)
        self._bg.start()

    def close(self) -> None:
        """Abort what is still queued or running and stop the background stepping thread (servers' shutdown)."""
        self._closing = True
        for r in list(self.scheduler.running) + list(self.scheduler.waiting):
            r.abort()
        self._bg_wake.set()
        if self._bg is not None:
            self._bg.join(timeout=10)
            self._bg = None
        with self._step_lock:
            self.scheduler.release_finished()
            with self.scheduler.lock:
                self.scheduler.waiting.clear()
        self._closing = False

    def _background_loop(self) -> None:
        while not self._closing:
            if self.scheduler.has_work():
                try:
                    self.step()
                except Exception:  # fail the requests rather than leave their streams hanging
                    logging.getLogger("moesaic.engine").exception("engine step failed; aborting requests")
                    for r in list(self.scheduler.running) + list(self.scheduler.waiting):
                        r.abort()
                    self.scheduler.waiting.clear()
                    self.scheduler.release_finished()
            else:
                self._bg_wake.clear()
                if not self.scheduler.has_work():
                    self._bg_wake.wait(timeout=1.0)
