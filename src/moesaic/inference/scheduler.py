"""Continuous batching: who is running, who waits, which KV slot each running request holds.

Requests join the running batch at step boundaries when a slot is free (first come, first served)
and leave it the step they finish, giving their slot back. Running requests are kept packed in
slots 0..n-1: when one leaves, the request in the last slot moves into its slot, so the decode
step's cache view is a slice rather than a gather.
"""

from __future__ import annotations

import threading
from collections import deque

from moesaic.inference.cache import SlotCache
from moesaic.inference.request import Request


class Scheduler:
    def __init__(self, cache: SlotCache) -> None:
        self.cache = cache
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # running[i] holds slot i
        self.lock = threading.Lock()

    @property
    def max_batch(self) -> int:
        return self.cache.n_slots

    def add(self, req: Request) -> None:
        with self.lock:
            self.waiting.append(req)

    def has_work(self) -> bool:
        with self.lock:
            return bool(self.running or self.waiting)

    def admit(self) -> list[Request]:
        """Move waiting requests into free slots; returns the newly admitted ones."""
        new: list[Request] = []
        with self.lock:
            while self.waiting and len(self.running) < self.max_batch:
                req = self.waiting.popleft()
                if req.finished:  # aborted while waiting
                    continue
                req.slot = len(self.running)
                self.cache.reset(req.slot)
                self.running.append(req)
                new.append(req)
        return new

    def release_finished(self) -> list[Request]:
        """Drop finished requests from the batch, free their slots and repack the rest."""
        done = [r for r in self.running if r.finished]
        if not done:
            return []
        with self.lock:
            for req in done:
                last = self.running[-1]
                i = req.slot
                if last is not req:
                    self.cache.move(last.slot, i)
                    last.slot = i
                    self.running[i] = last
                else:
                    self.cache.reset(i)
                self.running.pop()
                req.slot = -1
        return done

    def find(self, request_id: str) -> Request | None:
        with self.lock:
            for r in list(self.running) + list(self.waiting):
                if r.request_id == request_id:
                    return r
        return None
