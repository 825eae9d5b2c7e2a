"""The judge inside RL and evaluation (issue 17): a judgment that cannot be made drops the rollout
(logged, never scored 0); a judge refusing our key stops the run; evaluation reports unscored seeds
apart; evaluation jobs share the RL judge queue and go first; a graceful stop persists the queued
judge jobs and a resumed run judges them."""
import json
import threading
import time

import pytest

import judge
import judge_queue
import klong
from grpo import RolloutManager, judged_row, summarize_eval
from tests.test_judge_guards import ScriptedRollouts, flag_script, make_task, scripted
from tests.test_judge_llm import canned  # noqa: F401 (fixture)
import agent as A

FLAG_SCRIPT = flag_script("ls")


def manager(tmp_path, queue, grader, **cfg) -> ScriptedRollouts:
    cfg = klong.Config(sandbox="local", **{"rollout_workers": 1, **cfg})
    return ScriptedRollouts(FLAG_SCRIPT, None, queue, grader, cfg, tmp_path / "rollouts.jsonl",
                            tmp_path / "work")


def gate(q: judge_queue.JudgeQueue) -> threading.Event:
    """Hold the queue's single worker until the returned event is set."""
    release, started = threading.Event(), threading.Event()
    q.submit(lambda: (started.set(), release.wait(30)), judge_queue.Priority.EVAL, name="gate")
    assert started.wait(10)
    return release


# ----------------------------------------------------------------------------- failures in RL


def test_a_judgment_that_cannot_be_made_drops_the_rollout_and_logs_why(tmp_path):
    task = A.load_task(make_task(tmp_path))
    with judge_queue.JudgeQueue(workers=1) as q:
        mgr = manager(tmp_path, q, [])          # no grader takes the leaf: it is invalid
        mgr.request("g", task, 2, 4)
        group, = mgr.wait_groups(["g"])
        mgr.close()
    assert [r.score for r in group] == [None, None]
    assert all(r.failed.startswith("judge: ") and "1 of 1 leaves could not be graded" in r.failed
               for r in group)
    logged = [json.loads(x) for x in (tmp_path / "rollouts.jsonl").read_text().splitlines()]
    assert [x["score"] for x in logged] == [None, None] and all(x["failed"] for x in logged)


def test_a_judge_refusing_our_key_stops_rl_instead_of_failing_rollouts(canned, tmp_path):  # noqa: F811
    server = canned(lambda body: (401, "invalid api key"))
    task = A.load_task(make_task(tmp_path))
    chat = judge.OpenAIChat(server.url, "judge-model", backoff=judge.Backoff(attempts=3, base_s=0.01))
    with judge_queue.JudgeQueue(workers=1) as q:
        mgr = manager(tmp_path, q, judge.LLMGrader(chat))
        mgr.request("g", task, 2, 4)
        with pytest.raises(judge.JudgeAccessError, match="HTTP 401"):
            mgr.wait_groups(["g"])
        mgr.close()
    assert len(server.requests) == 1
    assert not (tmp_path / "rollouts.jsonl").exists()     # nothing recorded as a failed rollout


# ----------------------------------------------------------------------------- evaluation


def test_evaluation_reports_unscored_seeds_apart_instead_of_averaging_zeros():
    row = lambda seed, score: {"seed": seed, "task": "t", "score": score, "turns": 3,  # noqa: E731
                               "wall_s": 1.0, "timed_out": False, "stop_reason": "end_task",
                               "disqualified": ""}
    rows = [row(0, 1.0), row(0, 0.5), row(1, None), row(1, None), row(2, 0.0), row(2, None)]
    s = summarize_eval(rows, seeds=3)
    assert s["score_mean"] == pytest.approx((0.75 + 0.0) / 2)
    assert s["scored_seeds"] == [0, 2] and s["failed_seeds"] == [1] and s["unscored"] == 3
    assert summarize_eval([row(0, None)], seeds=1)["score_mean"] is None


def test_an_evaluation_job_behind_a_training_backlog_is_judged_first(tmp_path):
    """What --eval-every does during RL: the evaluation episode's judgment goes through the RL
    run's queue, behind the training rollouts' backlog, and runs before it."""
    task = A.load_task(make_task(tmp_path))
    ep = A.run_episode(scripted(FLAG_SCRIPT), task, A.Budget(max_turns=4), backend="local",
                       submission_out=tmp_path / "sub")
    cfg = klong.Config(sandbox="local")
    finished = []
    with judge_queue.JudgeQueue(workers=1) as q:
        release = gate(q)
        backlog = [q.submit(lambda: time.sleep(0.05), judge_queue.Priority.TRAIN, name=f"train-{i}")
                   for i in range(4)]
        for job in backlog:
            job.add_done_callback(lambda j: finished.append(j.name))
        threading.Timer(0.3, release.set).start()
        row = judged_row(ep, task, judge.CheckGrader("local"), q, cfg, seed=0)
        finished.append("eval")
        for job in backlog:
            job.result(timeout=30)
    assert row["score"] == 1.0 and row["failed"] == ""
    assert finished[0] == "eval" and len(finished) == 5


def test_a_failed_evaluation_episode_is_not_judged_and_has_no_score(tmp_path):
    task = A.load_task(make_task(tmp_path))
    ep = A.run_episode(A.ScriptedPolicy(lambda m: 1 / 0), task, A.Budget(max_turns=3),
                       backend="local")
    assert ep.failed
    with judge_queue.JudgeQueue(workers=1) as q:
        row = judged_row(ep, task, judge.CheckGrader("local"), q, klong.Config(sandbox="local"), 0)
    assert row["score"] is None and row["failed"] == "policy_error"


# ----------------------------------------------------------------------------- graceful stop


def test_a_graceful_stop_persists_queued_judge_jobs_and_a_resumed_run_judges_them(tmp_path):
    task = A.load_task(make_task(tmp_path))
    pending = tmp_path / "pending_judge.jsonl"
    with judge_queue.JudgeQueue(workers=1) as q:
        release = gate(q)
        mgr = manager(tmp_path, q, judge.CheckGrader("local"))
        mgr.request("g", task, 3, 4)
        deadline = time.monotonic() + 60
        while q.pending() < 3 and time.monotonic() < deadline:   # 3 episodes, their jobs queued
            time.sleep(0.05)
        stopped = []
        t = threading.Thread(target=lambda: stopped.append(mgr.stop(pending)))
        t.start()
        while q.pending() and time.monotonic() < deadline:      # drained: the heap is empty
            time.sleep(0.01)
        release.set()
        t.join(30)
    assert stopped == [3]
    assert not (tmp_path / "rollouts.jsonl").exists()             # none failed, none lost
    saved = [json.loads(x) for x in pending.read_text().splitlines()]
    assert [p["group"] for p in saved] == ["g"] * 3
    assert all((tmp_path / "work" / p["submission"].split("/")[-1] / "flag.txt").exists()
               for p in saved)

    with judge_queue.JudgeQueue(workers=1) as q:                   # the resumed run
        again = manager(tmp_path, q, judge.CheckGrader("local"))
        assert again.resume_pending(pending, {task.id: task}, consumed=set()) == 3
        again.request("g", task, 3, 4)                               # no new episode: 3 started
        group, = again.wait_groups(["g"])
        again.close()
    assert again.episodes == 0 and not pending.exists()
    assert [r.score for r in group] == [1.0, 1.0, 1.0], [r.failed for r in group]
    assert len((tmp_path / "rollouts.jsonl").read_text().splitlines()) == 3


def test_resume_skips_pending_jobs_of_groups_already_trained_on(tmp_path):
    task = A.load_task(make_task(tmp_path))
    pending = tmp_path / "pending_judge.jsonl"
    pending.write_text(json.dumps({"group": "old", "task_id": task.id, "k": 0,
                                   "submission": str(tmp_path / "gone"), "stop_reason": "end_task",
                                   "turns": 3, "wall_s": 1.0, "tier": "local",
                                   "trajectory": {"id": "old-0", "task_id": task.id,
                                                  "messages": [], "prefix_len": 0}}) + "\n")
    with judge_queue.JudgeQueue(workers=1) as q:
        mgr = RolloutManager(None, q, judge.CheckGrader("local"), klong.Config(),
                             tmp_path / "rollouts.jsonl", tmp_path / "work")
        assert mgr.resume_pending(pending, {task.id: task}, consumed={"old"}) == 0
        mgr.close()
    assert not pending.exists()
