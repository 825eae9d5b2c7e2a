"""The priority judge queue (KLong §3.4 "pipeline imbalance"; docs/ARCHITECTURE.md resolution 8): judge
jobs of RL rollouts and of evaluation run on a bounded pool of worker threads, evaluation first.

    next job = argmin over queued jobs of (priority, submission order)   EVAL = 0 < TRAIN = 1

so an evaluation job waits at most for the jobs already running (one service time), never for a
training backlog. Retries with exponential backoff on endpoint outages (judge.JudgeUnavailable);
a deadline per job; a job that produced no score fails with judge.JudgeFailure (never a 0).

Departures and gap-fillers (the paper is silent on the judge's plumbing):
- A hung job cannot be killed (threads): at its deadline it fails and its worker is replaced.
- Errors in `fatal` (judge.JudgeAccessError: a wrong key, URL or model) are not retried and are
  raised as they are by `result()`, so the caller stops the run instead of dropping a rollout.
- A graceful stop (`drain`) hands back the jobs that never started with their `payload`, so a run
  can persist them and submit them again on resume.
"""
from __future__ import annotations

import heapq
import itertools
import queue
import threading
import time
from enum import IntEnum
from typing import Callable, Iterator, Sequence

from judge import Backoff, JudgeAccessError, JudgeFailure, JudgeUnavailable


class Priority(IntEnum):
    """Lower runs first: evaluation jobs jump ahead of training jobs (docs/ARCHITECTURE.md 8)."""
    EVAL = 0
    TRAIN = 1


class JudgeJob:
    """A submitted judge job; future-like. Times are time.monotonic() seconds."""

    def __init__(self, fn: Callable[[], object], priority: Priority, deadline_s: float | None,
                 name: str, payload: object = None):
        self.fn, self.priority, self.name = fn, priority, name
        self.payload = payload  # what the caller needs to submit it again after a stop (drain)
        self.submitted_at = time.monotonic()
        self.deadline = None if deadline_s is None else self.submitted_at + deadline_s
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.attempts = 0
        self.service_s = 0.0   # time spent inside fn, summed over attempts
        self.running = False   # a worker holds it (guarded by the queue's lock)
        self.worker: threading.Thread | None = None
        self.abandoned = False  # its deadline passed while a worker held it
        self._value: object = None
        self._error: BaseException | None = None
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[JudgeJob], None]] = []

    @property
    def queue_wait_s(self) -> float:
        """Submission to first start (to now, or to the failure, while it never started)."""
        end = self.started_at or self.finished_at or time.monotonic()
        return end - self.submitted_at

    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> object:
        """The value fn returned; raises JudgeFailure (a fatal error as it is), or TimeoutError
        after `timeout` seconds."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"judge job {self.name!r} not finished after {timeout} s")
        if self._error is not None:
            raise self._error
        return self._value

    def _finish(self, value: object = None, error: str | None = None,
                cause: BaseException | None = None, fatal: bool = False) -> bool:
        """Settle the job once (the first of worker and deadline wins); run the callbacks. A fatal
        cause is kept as the error itself."""
        with self._lock:
            if self._done.is_set():
                return False
            self._value = value
            if fatal:
                self._error = cause
            elif error is not None:
                self._error = JudgeFailure(f"judge job {self.name!r}: {error}", self)
                self._error.__cause__ = cause
            self.finished_at = time.monotonic()
            self._done.set()
            callbacks = list(self._callbacks)
        for cb in callbacks:
            cb(self)
        return True

    def add_done_callback(self, cb: Callable[[JudgeJob], None]) -> None:
        """Call cb(job) when the job finishes (at once if it has); like a Future's."""
        with self._lock:
            if not self._done.is_set():
                self._callbacks.append(cb)
                return
        cb(self)


class JudgeQueue:
    """A bounded pool of worker threads running judge jobs: by priority, FIFO within a priority;
    retries with exponential backoff on `retry_on` errors (endpoint outages); a deadline per job
    (a queued job past it never runs; a running one is failed at once and its worker replaced, so
    a hung job does not take a slot). Results as they finish: `as_completed`. `fatal` errors are
    not retried and reach `result()` as they are."""

    def __init__(self, workers: int = 4, backoff: Backoff | None = None,
                 retry_on: tuple[type[BaseException], ...] = (JudgeUnavailable,),
                 fatal: tuple[type[BaseException], ...] = (JudgeAccessError,)):
        self.workers, self.backoff, self.retry_on = workers, backoff or Backoff(), retry_on
        self.fatal = fatal
        self._counts = {"jobs": 0, "job_retries": 0, "jobs_failed": 0}   # guarded by _cv
        self._heap: list[tuple[int, int, JudgeJob]] = []        # (priority, seq, job)
        self._deadlines: list[tuple[float, int, JudgeJob]] = []  # (deadline, seq, job)
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._closed = False
        self._threads = [self._spawn() for _ in range(workers)]
        self._watchdog = threading.Thread(target=self._watch, name="judge-deadlines", daemon=True)
        self._watchdog.start()

    def submit(self, fn: Callable[[], object], priority: Priority = Priority.TRAIN,
               deadline_s: float | None = None, name: str | None = None,
               payload: object = None) -> JudgeJob:
        with self._cv:
            if self._closed:
                raise RuntimeError("the judge queue is closed")
            seq = next(self._seq)
            job = JudgeJob(fn, Priority(priority), deadline_s, name or f"job-{seq}", payload)
            heapq.heappush(self._heap, (job.priority, seq, job))
            if job.deadline is not None:
                heapq.heappush(self._deadlines, (job.deadline, seq, job))
            self._cv.notify_all()
        return job

    def as_completed(self, jobs: Sequence[JudgeJob],
                     timeout: float | None = None) -> Iterator[JudgeJob]:
        """Yield `jobs` as they finish (succeeded or failed: call .result())."""
        finished: queue.SimpleQueue[JudgeJob] = queue.SimpleQueue()
        for job in jobs:
            job.add_done_callback(finished.put)
        end = None if timeout is None else time.monotonic() + timeout
        for _ in range(len(jobs)):
            try:
                yield finished.get(timeout=None if end is None else max(0.0, end - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"judge jobs still running after {timeout} s") from None

    @property
    def stats(self) -> dict:
        """Running counts: jobs run, job_retries (attempts after an endpoint outage), jobs_failed
        (no score: retries exhausted, a deadline or an error; never a 0)."""
        with self._cv:
            return dict(self._counts)

    def pending(self) -> int:
        with self._cv:
            return sum(not job.done() for _, _, job in self._heap)

    def close(self, cancel_pending: bool = False) -> None:
        """Stop taking jobs; finish the queued ones (or fail them with cancel_pending)."""
        with self._cv:
            self._closed = True
            if cancel_pending:
                for _, _, job in self._heap:
                    job._finish(error="the judge queue closed before it ran")
                self._heap.clear()
            self._cv.notify_all()
        for t in list(self._threads):
            t.join()

    def drain(self) -> list[JudgeJob]:
        """A graceful stop: stop taking jobs, let the running ones finish, and hand back the
        queued ones that never started (by priority), their callbacks removed and their
        `result()` failing, so the caller can persist their payloads and submit them on resume."""
        with self._cv:
            self._closed = True
            left = [job for _, _, job in sorted(self._heap, key=lambda e: e[:2]) if not job.done()]
            self._heap.clear()
            self._cv.notify_all()
        for job in left:
            with job._lock:
                job._callbacks.clear()
            job._finish(error="the queue stopped before it ran (handed back by drain)")
        for t in list(self._threads):
            t.join()
        return left

    def __enter__(self) -> JudgeQueue:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _spawn(self) -> threading.Thread:
        t = threading.Thread(target=self._work, name="judge-worker", daemon=True)
        t.start()
        return t

    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._heap and not self._closed:
                    self._cv.wait()
                if not self._heap:
                    return
                job = heapq.heappop(self._heap)[2]
                if job.done():       # its deadline passed while it waited
                    continue
                job.running, job.started_at = True, time.monotonic()
                job.worker = threading.current_thread()
            self._run(job)
            with self._cv:
                job.running = False
                if job.abandoned:   # a replacement worker took this one's slot at the deadline
                    return

    def _run(self, job: JudgeJob) -> None:
        error: BaseException | None = None
        for k in range(self.backoff.attempts):
            if job.done():
                return
            t0 = time.monotonic()
            job.attempts += 1
            with self._cv:
                self._counts["jobs" if k == 0 else "job_retries"] += 1
            try:
                value = job.fn()
            except self.fatal as e:
                job.service_s += time.monotonic() - t0
                job._finish(cause=e, fatal=True)
                return
            except self.retry_on as e:
                job.service_s += time.monotonic() - t0
                error = e
            except Exception as e:
                job.service_s += time.monotonic() - t0
                self._count_failed(job._finish(error=f"failed: {type(e).__name__}: {e}", cause=e))
                return
            else:
                job.service_s += time.monotonic() - t0
                job._finish(value=value)
                return
            if k + 1 < self.backoff.attempts:
                job._done.wait(self.backoff.delay(k))   # wakes early if the deadline fails it
        self._count_failed(job._finish(error=f"still failing after {job.attempts} attempts: {error}",
                                       cause=error))

    def _count_failed(self, finished: bool) -> None:
        if finished:
            with self._cv:
                self._counts["jobs_failed"] += 1

    def _watch(self) -> None:
        """Fail jobs at their deadline; a running one's worker is replaced (threads cannot be
        killed: its fn finishes in the background and its result is dropped)."""
        with self._cv:
            while not (self._closed and not self._heap and
                       all(not t.is_alive() for t in self._threads)):
                now = time.monotonic()
                while self._deadlines and self._deadlines[0][0] <= now:
                    job = heapq.heappop(self._deadlines)[2]
                    failed = job._finish(error=f"deadline of {job.deadline - job.submitted_at:g} "
                                         "s passed")
                    self._counts["jobs_failed"] += failed
                    if failed and job.running:
                        job.abandoned = True   # close() will not wait for it either
                        self._threads = [t for t in self._threads
                                         if t.is_alive() and t is not job.worker]
                        self._threads.append(self._spawn())
                wait = self._deadlines[0][0] - now if self._deadlines else 0.5
                self._cv.wait(timeout=min(wait, 0.5))
