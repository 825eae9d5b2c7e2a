"""The RL pipeline: partial rollouts + priority judge queue vs synchronous batches (docs/BENCH.md row
"judged rollouts per minute, rollout times spread 1–10×"; KLong §3.4 "pipeline imbalance").

The real grpo.RolloutManager and judge_queue.JudgeQueue run with their real threads; only the work is
replaced by sleeps, so the figure measures the pipeline, not the model: an episode lasts
base × U(1, 10) (rollouts hit different timeouts), grading one rollout `judge` seconds, an
optimizer step `train` seconds.

- synchronous (the anchor): start a step's n·tasks rollouts, wait for all, then judge all, then
  train; the next step's rollouts start after training;
- ours (grpo.run_rl's loop): the next step's rollouts start before this step trains, each rollout
  is judged as soon as it ends (its worker moves on), and training waits only for its own groups.

Also: with a training backlog in the queue, the wait of evaluation jobs (judge_queue.Priority.EVAL).

    python bench/rollout_pipeline.py [--steps 6] [--base 0.05]

Writes bench/results/rollout_pipeline-cpu.json.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
import grpo  # noqa: E402
import judge_queue  # noqa: E402
import klong  # noqa: E402
import split  # noqa: E402


def fake_episode(rng: random.Random, base: float):
    time.sleep(base * rng.uniform(1, 10))
    return SimpleNamespace(trajectory=split.Trajectory("r", "t", [], 0), stop_reason="max_turns",
                           turns=1, wall_s=0.0, submission_dir=Path("."), failed=False)


class SleepingManager(grpo.RolloutManager):
    """grpo.RolloutManager with the episode and the judge replaced by sleeps."""

    def __init__(self, *a, base: float, judge_s: float, seed: int, **kw):
        super().__init__(*a, **kw)
        self.base, self.judge_s, self.rng = base, judge_s, random.Random(seed)

    def _episode(self, task, timeout, out):
        return fake_episode(self.rng, self.base)

    def _grade(self, task, ep) -> float:
        time.sleep(self.judge_s)
        return 1.0


def ours(cfg, steps: int, base: float, judge_s: float, train_s: float, seed: int) -> float:
    with tempfile.TemporaryDirectory() as tmp, judge_queue.JudgeQueue(cfg.judge_workers) as queue:
        mgr = SleepingManager(None, queue, None, cfg, Path(tmp) / "r.jsonl", Path(tmp),
                              base=base, judge_s=judge_s, seed=seed)
        plan = grpo.schedule(cfg, 8)[:steps]
        task = SimpleNamespace(id="t", dir=Path(tmp))
        t0, done = time.perf_counter(), 0
        for i, step in enumerate(plan):
            for s in plan[i:i + 2]:                          # this step and the next (partial)
                for g, _ in s.groups:
                    mgr.request(g, task, cfg.n_rollouts, step.timeout)
            done += sum(len(g) for g in mgr.wait_groups([g for g, _ in step.groups]))
            time.sleep(train_s)
        wall = time.perf_counter() - t0
        mgr.close()
    return 60 * done / wall


def synchronous(cfg, steps: int, base: float, judge_s: float, train_s: float, seed: int) -> float:
    rng = random.Random(seed)
    n = cfg.n_rollouts * cfg.tasks_per_step
    with ThreadPoolExecutor(cfg.rollout_workers) as pool, judge_queue.JudgeQueue(cfg.judge_workers) as q:
        t0 = time.perf_counter()
        for _ in range(steps):
            list(pool.map(lambda _: fake_episode(rng, base), range(n)))       # all rollouts end
            jobs = [q.submit(lambda: time.sleep(judge_s)) for _ in range(n)]  # then all are judged
            for j in jobs:
                j.result()
            time.sleep(train_s)                                               # then training
        wall = time.perf_counter() - t0
    return 60 * n * steps / wall


def eval_wait(cfg, judge_s: float) -> dict:
    """Evaluation jobs submitted behind a backlog of training jobs: their wait vs a service."""
    with judge_queue.JudgeQueue(cfg.judge_workers) as q:
        [q.submit(lambda: time.sleep(judge_s)) for _ in range(6 * cfg.judge_workers)]
        time.sleep(judge_s / 2)
        ev = [q.submit(lambda: time.sleep(judge_s), judge_queue.Priority.EVAL) for _ in range(2)]
        for j in ev:
            j.result()
        return {"max_eval_wait_s": max(j.queue_wait_s for j in ev), "service_s": judge_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--base", type=float, default=0.05, help="shortest episode, seconds")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    cfg = klong.Config(n_rollouts=4, tasks_per_step=2, rollout_workers=8, judge_workers=4,
                       rl_timeouts=(1,), rl_steps=(a.steps,))
    judge_s, train_s = 2 * a.base, 3 * a.base
    runs = [(ours(cfg, a.steps, a.base, judge_s, train_s, s),
             synchronous(cfg, a.steps, a.base, judge_s, train_s, s)) for s in range(a.repeats)]
    o, y = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
    ev = eval_wait(cfg, judge_s)
    res = {**common.header("rollout_pipeline"),
           "params": {"steps": a.steps, "episode_s": [a.base, 10 * a.base], "judge_s": judge_s,
                      "train_s": train_s, "rollouts_per_step": cfg.n_rollouts * cfg.tasks_per_step,
                      "rollout_workers": cfg.rollout_workers, "judge_workers": cfg.judge_workers,
                      "repeats": a.repeats},
           "judged_rollouts_per_min": {"ours": o, "synchronous": y}, "speedup": o / y,
           "target_speedup": 1.5, "eval_wait": ev,
           "eval_wait_over_service": ev["max_eval_wait_s"] / ev["service_s"]}
    print(f"judged rollouts/min: partial + priority queue {o:.0f} vs synchronous {y:.0f} "
          f"→ {o / y:.2f}× (target ≥ 1.5×); evaluation wait {res['eval_wait_over_service']:.2f} "
          "service times (target ≤ 1)")
    out = common.write(ROOT / "bench" / "results" / "rollout_pipeline-cpu.json", res)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
