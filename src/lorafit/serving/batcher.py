"""Dynamic batching: concurrent requests queue up and one worker thread runs them together.

The event loop only enqueues and awaits; the model runs on the worker, never in the loop. The worker
takes the first waiting request, gathers more until ``max_batch_size`` texts are in hand or
``max_wait_ms`` has passed since it took the first, and runs them all in one call (which sorts by
length and leaves padding out, as training does). Requests for different adapters share a batch: each
job carries its adapter, and ``run`` gets one per text. It waits for companions only while requests are
crowding in (some were queued when it came back from a batch, or the last batch held several): a lone
request runs at once instead of paying the wait for nobody. Requests admitted but not yet answered are capped
at ``max_queued``: the next one is refused at once (HTTP 429) instead of waiting without bound.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Sequence

log = logging.getLogger("lorafit.serve")


class Overloaded(Exception):
    """The queue is full."""


class Stopped(Exception):
    """The worker is shutting down and takes no new requests."""


@dataclass
class _Job:
    ids: list[list[int]]  # token ids of each text of one request
    adapter: object  # what the request's texts are classified with
    future: Future  # set to the logits of those texts


class Batcher:
    """One inference worker behind a bounded queue; ``run`` maps token ids and adapters (one of each per
    text) to one logits row per text."""

    def __init__(self, run: Callable[[list[list[int]], list[object]], Sequence], *, max_batch_size: int,
                 max_wait_ms: float,
                 max_queued: int, on_batch: Callable[[int], None] | None = None):
        self.run_batch = run  # what the worker calls on each batch (ids, adapter per row) -> a row each
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self.max_queued = max_queued
        self._on_batch = on_batch or (lambda n: None)
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pending = 0  # admitted, not yet answered
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="lorafit-inference", daemon=True)

    @property
    def pending(self) -> int:
        return self._pending

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def start(self) -> None:
        self._thread.start()

    def submit(self, ids: list[list[int]], adapter: object = None) -> Future:
        """Queue one request's texts; the future gets their logits (in order) or the worker's exception."""
        job = _Job(ids, adapter, Future())
        with self._lock:  # admitted and queued at once: stop() cannot slip its end mark in between
            if self._stopping:
                raise Stopped("the server is shutting down")
            if self._pending >= self.max_queued:
                raise Overloaded(f"{self._pending} requests are queued (--max-concurrent {self.max_queued})")
            self._pending += 1
            self._queue.put(job)
        job.future.add_done_callback(self._done)
        return job.future

    def _done(self, _future: Future) -> None:
        with self._lock:
            self._pending -= 1

    def stop(self, timeout: float | None = None) -> None:
        """Answer everything already queued, then end the worker."""
        with self._lock:
            if not self._stopping:
                self._stopping = True
                self._queue.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _gather(self, first: _Job, wait: float) -> tuple[list[_Job], bool]:
        """The first job and those queued or arriving within ``wait`` s, up to the batch size; and whether to stop."""
        jobs, n = [first], len(first.ids)
        deadline = time.monotonic() + wait
        while n < self.max_batch_size:
            try:
                job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:
                return jobs, True
            jobs.append(job)
            n += len(job.ids)
        return jobs, False

    def _work(self) -> None:
        stop, last = False, 0
        while not stop:
            crowded = last > 1 or not self._queue.empty()
            first = self._queue.get()
            if first is None:
                break
            jobs, stop = self._gather(first, self.max_wait if crowded else 0.0)
            last = len(jobs)
            self._execute(jobs)

    def _execute(self, jobs: list[_Job]) -> None:
        jobs = [job for job in jobs if job.future.set_running_or_notify_cancel()]  # skip requests given up on
        if not jobs:
            return
        ids = [x for job in jobs for x in job.ids]
        try:
            logits = self.run_batch(ids, [job.adapter for job in jobs for _ in job.ids])  # a row per text
        except Exception as e:  # every waiting request learns of it; the worker lives on
            log.exception("inference failed on a batch of %d texts", len(ids))
            for job in jobs:
                job.future.set_exception(e)
            return
        self._on_batch(len(ids))
        start = 0
        for job in jobs:
            job.future.set_result(logits[start:start + len(job.ids)])
            start += len(job.ids)
