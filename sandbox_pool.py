"""Sandboxes started ahead of the episodes that will use them (issue 16: rollouts on the batched
sampler).

Why. The batched sampler (sampler.py) decodes every live episode in one forward per token, so an
episode still waiting for its sandbox is a row missing from every step. Opening a local sandbox
costs ~50 ms alone (an `unshare` + a `python -I -S` init, then `git init` of /home/submission) and
~0.25 s when eight open at once on two cores: measured with bench/sampler.py, that start-up was
12–29 % of the batched wall time of 24- and 12-turn episodes, time the per-episode decoder hid
(its episodes wait for one lock anyway). A `SandboxPool` keeps `size` sandboxes started by
background threads, so an episode's sandbox is usually ready when it asks (RL's rollout workers
and evaluation take theirs from one: grpo.RolloutManager, grpo.evaluate).

What an episode gets is what `open_sandbox(backend, task=task)` gives: a started sandbox never
used before, the task laid out as PaperBench does (task.py). Only the task-independent part
(/home/submission made a fresh git repository: task.make_submission) is done ahead; the task's
own files (paper, addendum, blacklist, instructions) are copied in by `take`. Rules:

- A sandbox is handed out at most once; a ready one that died while it waited is closed and
  replaced, never handed out (`stats["discarded"]`).
- When none is ready (a cold start, or episodes ending faster than the fillers start sandboxes),
  `take` waits for one a filler is starting when there are more on their way than takers already
  waiting (`stats["waited"]`), else opens one itself, as open_sandbox would (`stats["opened"]`);
  so a start-up error reaches the episode exactly as without a pool (agent.run_episode: a
  `sandbox_error` rollout). A filler that fails keeps the error (`last_error`) and waits `retry_s`
  before trying again. With `limit` (the number of episodes to come, when known: evaluation, the
  benchmark) no more are started than will be taken.
- `close()` (idempotent) closes the ready sandboxes and stops the fillers; a taken sandbox belongs
  to its episode, which closes it. Every pooled sandbox is also registered with sandbox.py's
  exit hook and leftover sweep, as any other.

The paper is silent (its episodes run for hours, where start-up is noise): a departure in timing
only. Idle pooled sandboxes hold an init process each (local) or a container (Docker).
"""
from __future__ import annotations

import contextlib
import logging
import threading

from sandbox import Sandbox, SandboxError, open_sandbox
from task import Task, lay_out_task, make_submission

log = logging.getLogger("klong.sandbox")


class SandboxPool:
    """Up to `size` started sandboxes kept ready by `fillers` background threads (see the module
    docstring). backend, allow_unisolated and limits: as open_sandbox."""

    def __init__(self, size: int, backend: str = "auto", allow_unisolated: bool | None = None,
                 fillers: int = 2, retry_s: float = 5.0, limit: int | None = None, **limits):
        if size < 0 or fillers < 1 or (limit is not None and limit < 0):
            raise ValueError(f"SandboxPool: size and limit must be >= 0 and fillers >= 1, got "
                             f"size={size}, fillers={fillers}, limit={limit}")
        self.size, self.backend, self.allow_unisolated = size, backend, allow_unisolated
        self.limits, self.retry_s = limits, retry_s
        self.limit = limit                    # sandboxes that will ever be taken (None: unknown)
        self._taken = 0
        self._waiting = 0                     # takers waiting for a filler's sandbox
        self.stats = {"started": 0, "hits": 0, "waited": 0, "opened": 0, "discarded": 0,
                      "failed": 0}   # started by fillers; takes: ready, waited for one, opened own
        self.last_error: str | None = None
        self._ready: list[Sandbox] = []
        self._starting = 0
        self._closed = False
        self._cv = threading.Condition()
        self._threads = [threading.Thread(target=self._fill, name=f"sandbox-pool-{k}", daemon=True)
                         for k in range(fillers if size else 0)]
        for t in self._threads:
            t.start()

    def _open(self) -> Sandbox:
        """A started sandbox with its fresh /home/submission (no task yet)."""
        box = open_sandbox(self.backend, allow_unisolated=self.allow_unisolated, **self.limits)
        try:
            make_submission(box)
        except BaseException:
            box.close()
            raise
        return box

    def _fill(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._closed or self._wanted() > 0)
                if self._closed:
                    return
                self._starting += 1
            box, failed = None, False
            try:
                box = self._open()
            except Exception as e:  # noqa: BLE001  (kept; `take` meets the same error itself)
                failed = True
                self.last_error = f"{type(e).__name__}: {e}"
                log.warning("sandbox pool: could not start a sandbox (%s); retrying in %.0f s",
                            self.last_error, self.retry_s)
            with self._cv:
                self._starting -= 1
                self._cv.notify_all()               # a waiting taker: delivered, or open your own
                if failed:
                    self.stats["failed"] += 1
                elif self._closed:
                    box.close()
                else:
                    self.stats["started"] += 1
                    self._ready.append(box)
            if failed:
                with self._cv:
                    self._cv.wait_for(lambda: self._closed, timeout=self.retry_s)

    def _wanted(self) -> int:
        """How many more sandboxes the fillers should start now (under the lock): up to `size`
        ready or starting, and never more than will still be taken (`limit`)."""
        room = self.size - len(self._ready) - self._starting
        if self.limit is not None:
            room = min(room, self.limit - self._taken - len(self._ready) - self._starting)
        return room

    def take(self, task: Task | None = None) -> Sandbox:
        """A started sandbox never handed out before, with `task` laid out (if given). The caller
        owns it (close it, or use it as a context manager). None ready: wait for one a filler is
        starting if there are more being started than takers already waiting, else open one."""
        box = None
        with self._cv:
            if self._closed:
                raise SandboxError("sandbox pool is closed")
            self._taken += 1
            hit = True
            while box is None:
                if self._ready:
                    box = self._ready.pop(0)        # the oldest first
                    if not box.alive():
                        self.stats["discarded"] += 1
                        box.close()
                        box = None
                elif self._starting > self._waiting and not self._closed:
                    hit = False                     # a cold start: that one is on its way
                    self._waiting += 1
                    self._cv.wait()
                    self._waiting -= 1
                else:
                    break
            if box is None and self._closed:
                raise SandboxError("sandbox pool is closed")
            self.stats["opened" if box is None else "hits" if hit else "waited"] += 1
            self._cv.notify_all()                   # a filler may start the replacement
        if box is None:
            box = self._open()
        if task is not None:
            try:
                lay_out_task(box, task, init_submission=False)
            except BaseException:
                box.close()
                raise
        return box

    def wait_ready(self, n: int | None = None, timeout: float = 60.0) -> bool:
        """Block until `n` (default: size) sandboxes are ready; False at the timeout."""
        n = self.size if n is None else n
        with self._cv:
            return self._cv.wait_for(lambda: len(self._ready) >= n or self._closed,
                                     timeout=timeout) and not self._closed

    def ready(self) -> int:
        with self._cv:
            return len(self._ready)

    def close(self) -> None:
        """Stop the fillers and close the ready sandboxes (idempotent)."""
        with self._cv:
            self._closed = True
            ready, self._ready = self._ready, []
            self._cv.notify_all()
        for box in ready:
            with contextlib.suppress(Exception):
                box.close()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=60)

    def __enter__(self) -> "SandboxPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
