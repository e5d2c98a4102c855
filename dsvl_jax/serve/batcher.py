"""Dynamic batching: one worker thread owns the model and decodes the requests that arrive together in one
`VLM.generate` batch.

The worker takes the oldest waiting job, then waits up to `wait_s` for more that can share its batch,
up to `max_batch`; the batch is padded to the next size in `buckets` (powers of two by default), so a
handful of compiled programs serve every load. Jobs share a batch when they decode alike: every greedy
job with every other greedy job (a row's greedy tokens do not depend on its neighbours), unseeded
sampling jobs with the same temperature and top_p. A job with a seed runs alone, so that its seed gives
the same answer whatever else the server is doing. Jobs that do not fit wait for the next round, in
arrival order.

A job's results travel to its asyncio event loop as events: ("delta", text) while streaming, then
("done", info) or ("error", message).
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import queue
import threading
import time
from typing import Optional, Sequence

from dsvl_jax.serve import rows as R
from dsvl_jax.serve.text import TextAssembler

log = logging.getLogger("dsvl_jax.serve")


class Overloaded(RuntimeError):
    """More jobs waiting than the server accepts."""


@dataclasses.dataclass
class Job:
    prepared: R.Prepared
    max_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: Optional[float] = None
    seed: Optional[int] = None
    stop: tuple = ()
    stream: bool = False
    loop: Optional[asyncio.AbstractEventLoop] = None
    events: Optional[asyncio.Queue] = None
    cancelled: bool = False  # the client went away: drop it if it has not run yet

    def key(self) -> tuple:
        """Jobs with equal keys may share a batch."""
        if self.temperature == 0:
            return ("greedy",)
        if self.seed is not None:
            return ("seeded", id(self))
        return ("sample", self.temperature, self.top_p)

    def emit(self, kind: str, payload) -> None:
        if self.loop is None or self.events is None:
            return
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


def default_buckets(max_batch: int) -> tuple:
    sizes, n = [], 1
    while n < max_batch:
        sizes.append(n)
        n *= 2
    return tuple(sizes + [max_batch])


class Batcher:
    def __init__(self, vlm, tokenizer, *, max_batch: int = 8, buckets: Optional[Sequence[int]] = None,
                 wait_s: float = 0.01, max_queue: int = 256):
        buckets = tuple(sorted(set(buckets))) if buckets else default_buckets(max_batch)
        if max_batch < 1 or buckets[0] < 1 or buckets[-1] < max_batch:
            raise ValueError(f"batch buckets {buckets} must be positive and reach max_batch={max_batch}")
        self.vlm, self.tokenizer = vlm, tokenizer
        self.max_batch, self.buckets, self.wait_s, self.max_queue = max_batch, buckets, wait_s, max_queue
        self._queue: "queue.Queue[Job]" = queue.Queue()
        self._held: collections.deque = collections.deque()  # taken from the queue, waiting for a later round
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.stats = {"batches": 0, "requests": 0, "largest_batch": 0, "sizes": collections.Counter(),
                      "generated_tokens": 0}

    # ---- life cycle ----
    def start(self) -> "Batcher":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="dsvl-serve-batcher", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def waiting(self) -> int:
        return self._queue.qsize() + len(self._held)

    def submit(self, job: Job) -> None:
        if self.waiting >= self.max_queue:
            raise Overloaded(f"{self.waiting} requests are waiting; try again later")
        self._queue.put(job)

    # ---- the worker ----
    def _next(self, timeout: float) -> Optional[Job]:
        if self._held:
            return self._held.popleft()
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def _gather(self, first: Job) -> list:
        """`first` and the jobs that can join it: the held ones first, then arrivals within the window."""
        batch, key = [first], first.key()
        kept = collections.deque()
        while self._held:
            job = self._held.popleft()
            (batch if len(batch) < self.max_batch and job.key() == key else kept).append(job)
        deadline = time.monotonic() + self.wait_s
        while len(batch) < self.max_batch:
            left = deadline - time.monotonic()
            try:
                job = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            (batch if job.key() == key else kept).append(job)
        self._held = kept
        return [j for j in batch if not j.cancelled]

    def _loop(self) -> None:
        while not self._stop.is_set():
            first = self._next(timeout=0.1)
            if first is None or first.cancelled:
                continue
            batch = self._gather(first)
            if not batch:
                continue
            try:
                self.run(batch)
            except Exception as e:  # a failed batch fails its requests, not the server
                log.exception("batch of %d failed", len(batch))
                for job in batch:
                    job.emit("error", f"generation failed: {type(e).__name__}: {e}")

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def run(self, batch: Sequence[Job]) -> None:
        """Decode `batch` (compatible jobs) together and deliver each job's events."""
        eos = self.tokenizer.eos_id
        texts = [TextAssembler(self.tokenizer, eos, j.max_tokens, j.stop) for j in batch]
        first = batch[0]
        kw = dict(max_new_tokens=max(j.max_tokens for j in batch), eos_id=eos, pad_to=self.bucket(len(batch)),
                  temperature=first.temperature, top_p=first.top_p, seed=first.seed)
        rows = [j.prepared for j in batch]
        if any(j.stream for j in batch):
            for step in R.stream(self.vlm, rows, **kw):
                for job, text, token in zip(batch, texts, step):
                    delta = text.add(int(token))
                    if delta and job.stream:
                        job.emit("delta", delta)
                if all(t.finished for t in texts):
                    break  # every answer is complete (stop strings, own budgets): stop decoding
        else:
            for text, tokens in zip(texts, R.generate(self.vlm, rows, **kw)):
                for token in tokens:
                    if text.finished:
                        break
                    text.add(int(token))
        self.stats["batches"] += 1
        self.stats["requests"] += len(batch)
        self.stats["sizes"][len(batch)] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(batch))
        for job, text in zip(batch, texts):
            delta = text.close()
            if delta and job.stream:
                job.emit("delta", delta)
            self.stats["generated_tokens"] += text.tokens
            job.emit("done", {"text": text.text, "finish_reason": text.finish_reason,
                              "prompt_tokens": job.prepared.prompt_tokens, "completion_tokens": text.tokens})
