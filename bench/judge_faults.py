"""Judge endpoint faults (issue 21 item 4): a tiny RL run and an evaluation judged by an
OpenAI-compatible LLM judge that fails 30 % of its calls in every way (HTTP 500, 429 with
Retry-After, hangs past the client's timeout, malformed JSON, dropped connections; seeded), both
through the real CLI (`klong.main`, in process) with `--judge openai:judge@URL,...`.

    python bench/judge_faults.py            # writes bench/results/judge_faults-cpu.json

The judge (tests/loopback.faulty_judge) grades every criterion 1, so every honest score is 1 (or
0 for a disqualified run): `silent_scores` counts scored rollouts and evaluation episodes with
any other score, i.e. a made-up score instead of "unscored". Counted from the run's own files,
not from inside the process: log.jsonl (RL: judge_* fields per record, summed) and the
evaluation's results.json; `requests` is what the loopback server received, which must equal
calls − unavailable + failed tries (each failed try is one request, and each call answered after
its retries one more). Injected faults are the server's own tally; a timeout can also be real
(an answer slower than the client's timeout on this loaded 2-core machine), so counted timeouts
may exceed the injected ones, while every other kind is counted exactly.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # not bench/: its judge_queue.py would shadow the module

import klong  # noqa: E402
from bench import common  # noqa: E402
from tests.loopback import FAULT_KINDS, faulty_judge  # noqa: E402

OUT = ROOT / "bench" / "results" / "judge_faults-cpu.json"
COUNTS = ("judge_calls", "judge_retries", "judge_unavailable", "judge_job_retries",
          "judge_jobs_failed", "judge_retry_wait_s")


def summed(records: list[dict]) -> dict:
    """The judge counts of log records (or of one summary) added up."""
    out = {k: sum(r.get(k, 0) for r in records) for k in COUNTS}
    kinds: dict[str, int] = {}
    for r in records:
        for k, n in r.get("judge_failures_by_kind", {}).items():
            kinds[k] = kinds.get(k, 0) + n
    out["judge_failures_by_kind"] = kinds
    return out


def silent(rows: list[dict]) -> int:
    """Scores the judge did not give: a score other than its 1 without a disqualification, or no
    score without a reason."""
    return sum((r["score"] is not None and r["score"] != 1.0 and not r.get("disqualified"))
               or (r["score"] is None and not r.get("failed")) for r in rows)


def run(run_dir: Path, *, rate: float = 0.3, seed: int = 0, timeout_s: float = 2.0,
        hang_s: float = 3.0, backoff_s: float = 0.05, retry_after_s: float = 0.1,
        rl: tuple[str, ...] = ("--rl-timeouts", "3", "--rl-steps", "2", "--n-rollouts", "2",
                               "--tasks-per-step", "1", "--n-tasks", "2"),
        evaluation: tuple[str, ...] = ("--eval-tasks", "2", "--eval-timeout", "6")) -> dict:
    """The RL run and the evaluation against one faulty judge; their figures, per phase and in all."""
    server, plan = faulty_judge(rate, seed, hang_s=hang_s, retry_after_s=retry_after_s)
    spec = f"openai:judge@{server.url}/v1,timeout={timeout_s},backoff={backoff_s},max_backoff=1"
    common_args = ["--run-dir", str(run_dir), "--judge", spec]
    phases, t0 = {}, time.perf_counter()
    try:
        for phase, argv in (("rl", ["--stage", "rl", *rl, "--rl-eval", "false"]),
                            ("eval", ["--stage", "eval", *evaluation])):
            injected0, requests0, t = dict(plan.injected), len(server.calls), time.perf_counter()
            rc = klong.main([*argv, *common_args])
            out = Path(run_dir) / phase
            if phase == "rl":
                log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()] \
                    if (out / "log.jsonl").exists() else []
                counts = summed(log)
                rows = [json.loads(x) for x in (out / "rollouts.jsonl").read_text().splitlines()] \
                    if (out / "rollouts.jsonl").exists() else []
                completed = rc == 0 and (out / "final").exists()
            else:
                summary = json.loads((out / "results.json").read_text()) \
                    if (out / "results.json").exists() else {}
                counts, rows = summed([summary]), summary.get("episodes", [])
                completed = rc == 0 and bool(summary)
            phases[phase] = {
                "run_completed": completed, "exit_code": rc,
                "injected": {k: plan.injected[k] - injected0[k] for k in FAULT_KINDS},
                "requests": len(server.calls) - requests0, **counts,
                "scored": sum(r["score"] is not None for r in rows),
                "unscored": sum(r["score"] is None for r in rows),
                "silent_scores": silent(rows), "wall_s": time.perf_counter() - t}
    finally:
        server.close()
    both = list(phases.values())
    kinds = {k: sum(p["judge_failures_by_kind"].get(k, 0) for p in both) for k in FAULT_KINDS}
    injected = {k: sum(p["injected"][k] for p in both) for k in FAULT_KINDS}
    return {"rate": rate, "seed": seed, "client_timeout_s": timeout_s, "hang_s": hang_s,
            "backoff_s": backoff_s, "retry_after_s": retry_after_s,
            "calls": sum(p["judge_calls"] for p in both),
            "requests": sum(p["requests"] for p in both),
            "injected": injected, "failures_counted": kinds,
            "uncounted": {k: injected[k] - kinds[k] for k in FAULT_KINDS if k != "timeout"},
            "real_timeouts": kinds["timeout"] - injected["timeout"],
            "retries": sum(p["judge_retries"] for p in both),
            "unavailable": sum(p["judge_unavailable"] for p in both),
            "job_retries": sum(p["judge_job_retries"] for p in both),
            "jobs_failed": sum(p["judge_jobs_failed"] for p in both),
            "retry_wait_s": sum(p["judge_retry_wait_s"] for p in both),
            "unscored": sum(p["unscored"] for p in both),
            "silent_scores": sum(p["silent_scores"] for p in both),
            "run_completed": all(p["run_completed"] for p in both),
            "wall_s": time.perf_counter() - t0, "phases": phases}


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="klong_judge_faults_") as tmp:
        result = {**common.header("judge_faults"), **run(Path(tmp))}
    common.write(OUT, result)
    print(json.dumps({k: v for k, v in result.items() if k != "phases"}, indent=2))
    return 0 if result["run_completed"] and result["silent_scores"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
