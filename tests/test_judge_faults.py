"""Issue 21 item 4: an RL run and an evaluation (`klong.py --stage rl|eval`, in process) judged by
an OpenAI-compatible LLM judge failing 30 % of its calls in every way (HTTP 500, 429 with
Retry-After, hangs past the client's timeout, malformed JSON, dropped connections; seeded:
tests/loopback.faulty_judge). The judge grades every criterion 1, so any other score not from a
disqualification would be made up. Asserted from the run's own files: both runs complete, no
silent score, every injected failure counted by kind in log.jsonl / the evaluation summary,
every failed try retried after a backoff, and each rollout left unscored says why."""
import json

import pytest

from bench import judge_faults
from tests.loopback import FAULT_KINDS

TIMEOUT_S, BACKOFF_S = 1.0, 0.05


@pytest.fixture(scope="module")
def faulty_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("judge_faults")
    result = judge_faults.run(run_dir, rate=0.3, seed=3, timeout_s=TIMEOUT_S, hang_s=1.5,
                              backoff_s=BACKOFF_S, retry_after_s=0.1,
                              rl=("--rl-timeouts", "3", "--rl-steps", "1", "--n-rollouts", "2",
                                  "--tasks-per-step", "1", "--n-tasks", "1"),
                              evaluation=("--eval-tasks", "1", "--eval-timeout", "6"))
    rl = [json.loads(x) for x in (run_dir / "rl" / "rollouts.jsonl").read_text().splitlines()]
    log = [json.loads(x) for x in (run_dir / "rl" / "log.jsonl").read_text().splitlines()]
    ev = json.loads((run_dir / "eval" / "results.json").read_text())
    return result, rl, log, ev


def kinds(records: list[dict]) -> dict[str, int]:
    out = {k: 0 for k in FAULT_KINDS}
    for r in records:
        for k, n in r["judge_failures_by_kind"].items():
            out[k] += n
    return out


def test_both_runs_complete_with_every_fault_kind_injected(faulty_run):
    result, rl, log, ev = faulty_run
    assert result["phases"]["rl"]["exit_code"] == 0 and result["phases"]["eval"]["exit_code"] == 0
    assert result["run_completed"] and [r["step"] for r in log] == [1] and ev["episodes"]
    assert all(n > 0 for n in result["injected"].values()), result["injected"]


def test_no_score_is_made_up(faulty_run):
    """Every rollout and evaluation episode is scored 1 from real judgments, or unscored with
    its reason (the judge failing after its retries), never a 0 in its place."""
    _, rl, log, ev = faulty_run
    for row in rl + ev["episodes"]:
        assert row["score"] == 1.0 or (row["score"] is None and row["failed"]) \
            or (row["score"] == 0.0 and row["disqualified"]), row
    dropped = [r for r in rl if r["score"] is None]
    assert all(r["failed"].startswith("judge: ") for r in dropped)
    assert len(dropped) == sum(r["judge_jobs_failed"] for r in log) == sum(r["failed"] for r in log)
    assert ev["unscored"] == sum(r["score"] is None for r in ev["episodes"]) == ev["judge_jobs_failed"]


@pytest.mark.parametrize("phase", ["rl", "eval"])
def test_every_injected_failure_is_counted_by_kind(faulty_run, phase):
    """Counted in log.jsonl (RL, summed over its records) and in the evaluation's summary. A
    timeout can also be real (a slow answer on a loaded machine): at least the injected ones."""
    result, _, log, ev = faulty_run
    records = log if phase == "rl" else [ev]
    counted, injected = kinds(records), result["phases"][phase]["injected"]
    assert {k: counted[k] for k in FAULT_KINDS if k != "timeout"} == \
        {k: injected[k] for k in FAULT_KINDS if k != "timeout"}
    assert counted["timeout"] >= injected["timeout"]
    calls = sum(r["judge_calls"] for r in records)
    unavailable = sum(r["judge_unavailable"] for r in records)
    # the server saw one request per try: an answered call's last try, and every failed try
    assert result["phases"][phase]["requests"] == calls - unavailable + sum(counted.values())


@pytest.mark.parametrize("phase", ["rl", "eval"])
def test_every_failure_is_retried_after_a_backoff(faulty_run, phase):
    _, _, log, ev = faulty_run
    records = log if phase == "rl" else [ev]
    failed_tries = sum(kinds(records).values())
    retries = sum(r["judge_retries"] for r in records)
    unavailable = sum(r["judge_unavailable"] for r in records)
    assert failed_tries > 0
    assert retries + unavailable == failed_tries   # each failed try: retried, or the call's last
    # waited: each timed-out try the client's timeout, and each retry at least the first backoff
    assert sum(r["judge_retry_wait_s"] for r in records) >= \
        kinds(records)["timeout"] * TIMEOUT_S + retries * BACKOFF_S
    # a call unavailable after its retries failed its judge job, which the queue tried again
    # or gave up on (the rollout unscored), never scored
    jobs = sum(r["judge_job_retries"] + r["judge_jobs_failed"] for r in records)
    assert (unavailable == 0) == (jobs == 0) and jobs <= unavailable


def test_the_judge_spec_sets_the_endpoint_timeout_and_backoff_and_rejects_unknown_options():
    import judge
    from cli import is_user_error
    g = judge.parse_grader("openai:judge@http://127.0.0.1:9/v1,timeout=2.5,backoff=0.2,max_backoff=3",
                           backoff=judge.Backoff(attempts=5))
    ep = g.chat.client
    assert (ep.url, ep.attempts, ep.backoff_s, ep.max_backoff_s) == \
        ("http://127.0.0.1:9/v1/chat/completions", 5, 0.2, 3.0)
    assert ep._client.timeout == 2.5
    for bad in ("openai:judge@http://h/v1,timeout=soon", "openai:judge@http://h/v1,retries=3"):
        with pytest.raises(judge.GraderSpecError, match="expected timeout=S") as err:
            judge.parse_grader(bad)
        assert is_user_error(err.value)   # the CLIs print one line and exit 2
