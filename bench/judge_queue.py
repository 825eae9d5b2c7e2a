"""Priority judge queue under a training backlog (docs/BENCH.md: "evaluation jobs wait <= one service
time"; docs/ARCHITECTURE.md 8).

Simulation: `workers` judge workers; a backlog of training jobs whose service times are spread
1-10x a base time (rollouts of very different lengths) is submitted at once, then evaluation jobs
arrive one by one while the backlog drains. Jobs sleep for their service time (a judge call is
I/O-bound for the caller). Ours: judge_queue.JudgeQueue with Priority.EVAL for evaluation jobs. Anchor,
same run and same jobs: the same queue with every job at one priority (plain FIFO).

Figure: an evaluation job's queue wait divided by the longest service time; with priority it
cannot exceed 1 (it waits at most for one running job to finish), FIFO waits for the backlog.

    python bench/judge_queue.py [--workers 4] [--backlog 48] [--evals 8] [--base 0.02] [--repeats 3]
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
from judge import Backoff  # noqa: E402
from judge_queue import JudgeQueue, Priority  # noqa: E402


def run(workers: int, backlog: int, evals: int, base: float, prioritise: bool, seed: int) -> dict:
    """One simulation; returns evaluation waits and the longest service time, in seconds."""
    rng = random.Random(seed)
    train_s = [base * rng.uniform(1, 10) for _ in range(backlog)]   # spread 1-10x
    eval_s = [base * rng.uniform(1, 10) for _ in range(evals)]
    gap = sum(train_s) / workers / (evals + 1)   # evaluation arrivals spread over the drain time
    with JudgeQueue(workers=workers, backoff=Backoff(attempts=1)) as q:
        train = [q.submit(lambda s=s: time.sleep(s), Priority.TRAIN) for s in train_s]
        ev = []
        for s in eval_s:
            time.sleep(gap)
            ev.append(q.submit(lambda s=s: time.sleep(s), Priority.EVAL if prioritise else Priority.TRAIN))
        for job in train + ev:
            job.result()
    return {"eval_wait_s": [j.queue_wait_s for j in ev],
            "max_service_s": max(j.service_s for j in train + ev)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--backlog", type=int, default=48, help="training jobs queued at the start")
    ap.add_argument("--evals", type=int, default=8, help="evaluation jobs arriving during the drain")
    ap.add_argument("--base", type=float, default=0.02, help="shortest service time, seconds")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rows = {}
    for name, prioritise in (("priority queue (ours)", True), ("FIFO (anchor)", False)):
        ratios, waits = [], []
        for r in range(args.repeats):
            res = run(args.workers, args.backlog, args.evals, args.base, prioritise, seed=r)
            ratios.append(max(res["eval_wait_s"]) / res["max_service_s"])
            waits.append(statistics.median(res["eval_wait_s"]))
        rows[name] = {"max_eval_wait_over_max_service": statistics.median(ratios),
                      "median_eval_wait_s": statistics.median(waits)}
    print(f"{'queue':<24} {'max eval wait / max service':>28} {'median eval wait (s)':>22}")
    for name, row in rows.items():
        print(f"{name:<24} {row['max_eval_wait_over_max_service']:>28.2f} "
              f"{row['median_eval_wait_s']:>22.3f}")
    ours = rows["priority queue (ours)"]["max_eval_wait_over_max_service"]
    print(f"target: evaluation jobs wait <= one service time: {'met' if ours <= 1.0 else 'NOT met'}")
    out = common.write(Path(__file__).resolve().parent / "results" / "judge_queue-cpu.json",
                       {**common.header("judge_queue", packages=()), "params": vars(args),
                        "results": rows, "target_met": ours <= 1.0})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
