"""The request scheduler: a worker thread that owns the engine's model work and batches requests.

    submit(prepared) -> Job (a concurrent.futures.Future plus a cancel flag), or Busy when the queue is full

Continuous scheduling (the engine's default; `decoding.RunningBatch`):
    worker: while idle, wait for a first job and up to `max_wait_s` after it arrived for more (or until
            `max_batch_size` are queued); then loop: admit queued jobs (oldest first, up to `max_batch_size`
            running) into the running batch, run one step (decode tokens and prompt chunks), resolve the
            jobs that finished
    A job arriving mid-generation starts at the next step; a finished one is answered at once.
Static scheduling (`Engine(..., scheduling="static")`, the earlier engine):
    worker: wait for a first job and the window as above; run one `Engine.generate` on up to
            `max_batch_size` compatible jobs (equal `GenerationSettings.batch_key`; the others wait for a
            later round in arrival order); resolve their futures; repeat.

`batch_sizes` counts how many jobs started together (one admission or one static batch); `step_sizes` how
many rows each continuous decode step ran. The queue is bounded: a full queue is refused (`Busy`, with a
retry estimate) rather than grown without bound. `max_batch_size=1` is the unbatched baseline.

Failures: a request that fails fails alone (the engine isolates rows: `decoding`, `Engine.generate_static`)
and its future gets the error. An error the engine could not pin on a row fails the rows it touched (the
admitted jobs, or the whole running batch after an unexplained step failure) and the worker goes on. The
worker is supervised: if it ever stops (an error escaping the loop), every queued and running job gets
`EngineUnavailable` at once, `alive` turns False and `submit` refuses (`Busy(closed=True)`), so nothing
waits on a worker that is gone. Every future is settled through `_settle`, which never sets a settled one.
Threads: the worker is the thread that runs the model; `threads` sets its intra-op (OpenMP) thread count at
its start (`utils.threads`: the count is per thread), so that callers may limit every other thread to one,
and then has the engine compile its kernels for that count (`Engine.warm_up`) before it takes requests.
`close(timeout)` stops taking work, lets the worker finish what it has for `timeout` seconds, then fails
whatever is left with `EngineUnavailable`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

from ..utils.threads import set_threads
from .decoding import Request, RunningBatch
from .engine import Engine
from .requests import ChatResult, EngineUnavailable, Prepared, failed
from .streaming import TextCallback

logger = logging.getLogger(__name__)


class Busy(RuntimeError):
    """The batcher cannot take more work now; `retry_after` is a suggested wait in seconds."""

    def __init__(self, message: str, retry_after: float, closed: bool = False) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.closed = closed


@dataclass(eq=False)
class Job:
    prepared: Prepared
    on_text: TextCallback | None = None
    future: Future = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    queued_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None

    def cancel(self) -> None:
        """Drop the job if it has not started; stop its row at the next step if it is running."""
        self.cancelled.set()
        self.future.cancel()


class Batcher:
    def __init__(
        self,
        engine: Engine,
        max_batch_size: int = 8,
        max_wait_s: float = 0.01,
        max_queue: int = 64,
        clock: Callable[[], float] = time.monotonic,
        threads: int | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError(f"max_batch_size and max_queue must be >= 1, got {max_batch_size}, {max_queue}")
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.clock = clock
        self.threads = threads  # the worker's intra-op threads (None: as the process sets them)
        self.batch_sizes: Counter[int] = Counter()  # how many times k jobs started together
        self.step_sizes: Counter[int] = Counter()  # continuous: how many decode steps ran k rows
        self.running = 0  # jobs started and not yet answered
        self._queue: deque[Job] = deque()
        self._active: set[Job] = set()  # started, not yet settled
        self._cond = threading.Condition()
        self._closed = False
        self.error: BaseException | None = None  # why the worker stopped, when it died
        self._seconds_per_batch = 1.0  # a recent batch's (static) or request's (continuous) service time
        loop = self._loop_static if engine.scheduling == "static" else self._loop_continuous
        self._thread = threading.Thread(
            target=self._supervise, args=(loop,), name="mgllava-batcher", daemon=True
        )
        self._thread.start()

    # -- callers ------------------------------------------------------------------------------------------
    def submit(self, prepared: Prepared, on_text: TextCallback | None = None) -> Job:
        job = Job(prepared, on_text)
        with self._cond:
            if self.error is not None:
                raise Busy(f"the generation worker stopped ({type(self.error).__name__}); the server must be "
                           "restarted", self.retry_after, closed=True)  # fmt: skip
            if self._closed:
                raise Busy("the server is shutting down", self.retry_after, closed=True)
            if len(self._queue) >= self.max_queue:
                raise Busy(f"{len(self._queue)} requests are already queued", self.retry_after)
            self._queue.append(job)
            self._cond.notify()
        return job

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closed and self.error is None

    @property
    def retry_after(self) -> int:
        """Seconds until the queue has likely drained by one batch's worth (at least 1)."""
        rounds = len(self._queue) / self.max_batch_size + 1
        return max(1, math.ceil(self._seconds_per_batch * rounds))

    def close(self, timeout: float | None = 30.0) -> None:
        """Refuse new work, let the worker finish what it has for `timeout` seconds, then fail the rest."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("the generation worker did not finish within %s s; failing what is left", timeout)
            self._fail_all(EngineUnavailable("the server shut down before this request finished"))

    # -- supervision --------------------------------------------------------------------------------------
    def _supervise(self, loop: Callable[[], None]) -> None:
        try:
            if self.threads is not None:
                set_threads(self.threads)
            self._warm_up()
            loop()
        except BaseException as err:  # the worker is gone: nobody may wait on it
            logger.critical("the generation worker stopped", exc_info=True)
            with self._cond:
                self.error = err
            self._fail_all(EngineUnavailable(f"the generation worker stopped ({type(err).__name__}: {err})"))

    def _warm_up(self) -> None:
        """The engine's compiled kernels for this thread's settings, before the first request; after a
        failure the worker serves all the same: kernels compiled in the building thread compile again at
        their first use, and kernels left to this warm-up (`Engine(warm=False)`) stay off (the fallback)."""
        try:
            self.engine.warm_up()
        except Exception:
            logger.exception("warming the engine up failed; serving without the kernels it did not compile")

    def _fail_all(self, error: Exception) -> None:
        with self._cond:
            jobs = [*self._queue, *self._active]
            self._queue.clear()
        for job in jobs:
            self._settle(job, error)

    def _start(self, jobs: Iterable[Job]) -> list[Job]:
        """(Holding the lock) the jobs that were not cancelled, now running and tracked."""
        started = [job for job in jobs if job.future.set_running_or_notify_cancel()]
        self._active.update(started)
        return started

    def _settle(self, job: Job, outcome: ChatResult | BaseException) -> None:
        """Hand `job` its result or error, once: a future already settled (by a shutdown, or a cancel) stays."""
        with self._cond:
            self._active.discard(job)
        try:
            if isinstance(outcome, BaseException):
                job.future.set_exception(outcome)
            else:
                job.future.set_result(outcome)
        except InvalidStateError:
            pass

    # -- static worker ------------------------------------------------------------------------------------
    def _loop_static(self) -> None:
        while True:
            jobs = self._next_batch()
            if jobs is None:
                return
            if jobs:
                self._run(jobs)

    def _next_batch(self) -> list[Job] | None:
        """Wait for work, then for the window to fill; None when closed and drained."""
        with self._cond:
            if not self._wait_for_work(self._compatible):
                return None
            jobs = self._compatible()[: self.max_batch_size]
            for job in jobs:
                self._queue.remove(job)
            return self._start(jobs)

    def _wait_for_work(self, candidates: Callable[[], list[Job]]) -> bool:
        """(Holding the lock) wait for a first job, then until `max_wait_s` after it arrived or until
        `max_batch_size` candidates are queued. False when closed and drained."""
        while not self._queue:
            if self._closed:
                return False
            self._cond.wait()
        deadline = self._queue[0].queued_at + self.max_wait_s
        while not self._closed and len(candidates()) < self.max_batch_size:
            remaining = deadline - self.clock()
            if remaining <= 0:
                break
            self._cond.wait(remaining)
        return True

    def _compatible(self) -> list[Job]:
        first = self._queue[0].prepared.settings.batch_key()
        if first is None:
            return [self._queue[0]]
        return [j for j in self._queue if j.prepared.settings.batch_key() == first]

    def _run(self, jobs: list[Job]) -> None:
        start = self.clock()
        self.running = len(jobs)
        try:
            results = self.engine.generate_static(
                [j.prepared for j in jobs], [j.on_text for j in jobs], [j.cancelled.is_set for j in jobs]
            )
        except Exception as err:  # not pinned on one request: the batch's jobs fail, the worker carries on
            logger.exception("batched generate failed for %d requests", len(jobs))
            results = [failed(err)] * len(jobs)
        finally:
            self.running = 0
        elapsed = self.clock() - start
        self._seconds_per_batch = 0.8 * self._seconds_per_batch + 0.2 * elapsed
        self.batch_sizes[len(jobs)] += 1
        for job, result in zip(jobs, results, strict=True):
            self._settle(job, result)

    # -- continuous worker --------------------------------------------------------------------------------
    def _loop_continuous(self) -> None:
        batch = self.engine.running_batch()
        while True:
            jobs = self._admissible(len(batch))
            if jobs is None:
                return
            if jobs:
                self._admit(batch, jobs)
            if batch:
                self._step(batch)
            self.running = len(batch)

    def _admissible(self, active: int) -> list[Job] | None:
        """The queued jobs that start now: when idle, after the window; when rows are running, the ones
        queued (no wait), up to `max_batch_size` running. None when closed, drained and idle."""
        with self._cond:
            if not active and not self._wait_for_work(lambda: list(self._queue)):
                return None
            room = self.max_batch_size - active
            jobs = self._start([self._queue.popleft() for _ in range(min(room, len(self._queue)))])
            self.running = active + len(jobs)
        return jobs

    def _admit(self, batch: RunningBatch, jobs: list[Job]) -> None:
        start = self.clock()
        for job in jobs:
            job.started_at = start
        try:
            finished = batch.admit([Request(j.prepared, j.on_text, j.cancelled.is_set, j) for j in jobs])
        except Exception as err:  # not pinned on a row: the batch's state is unknown, every row in it fails
            logger.exception("admitting %d requests failed", len(jobs))
            self._abort(batch, jobs, err)
            return
        self.batch_sizes[len(jobs)] += 1
        self._resolve(finished)

    def _step(self, batch: RunningBatch) -> None:
        rows = len(batch)
        try:
            finished = batch.step()
        except Exception as err:  # not pinned on a row: the batch's state is unknown, every row in it fails
            logger.exception("decode step failed for %d requests", rows)
            self._abort(batch, [], err)
            return
        self.step_sizes[rows] += 1
        self._resolve(finished)

    def _abort(self, batch: RunningBatch, jobs: list[Job], err: Exception) -> None:
        error = failed(err)
        for job in dict.fromkeys([*jobs, *batch.abort()]):
            self._settle(job, error)

    def _resolve(self, finished: list[tuple[Job, ChatResult | Exception]]) -> None:
        now = self.clock()
        for job, result in finished:
            if not isinstance(result, Exception) and job.started_at is not None:
                self._seconds_per_batch = 0.8 * self._seconds_per_batch + 0.2 * (now - job.started_at)
            self._settle(job, result)

    def run(self, prepared: Prepared, on_text: TextCallback | None = None) -> ChatResult:
        """Submit and wait (for callers on plain threads)."""
        return self.submit(prepared, on_text).future.result()
