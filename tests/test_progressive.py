"""RL stages by wall clock (`--rl-wall-s`, grpo.py "Stages by wall clock"; issue 15 item 3): the
budget is shared by the stages like their rl_steps, steps are planned one ahead from the measured
step times, and a real run's stages advance exactly as that rule says, replayed from its log."""
import json

import pytest

import grpo
import klong
from cli import UserError


def test_stage_deadlines_share_the_budget_like_the_step_counts():
    assert grpo.stage_deadlines(90.0, (1, 1, 1)) == pytest.approx([30.0, 60.0, 90.0])
    assert grpo.stage_deadlines(90.0, (2, 1)) == pytest.approx([60.0, 90.0])
    assert grpo.stage_deadlines(50.0, (4,)) == pytest.approx([50.0])


def test_plan_next_stage_follows_the_documented_rule():
    """The next step goes to the first stage whose deadline it reaches at least half done."""
    T, D = (10, 20, 30), [30.0, 60.0, 90.0]
    one = [(10.0, 10)]                       # 1 s per turn of timeout: a stage-m step = T_m s
    assert grpo.plan_next_stage(15.0, 0, T, D, one) == 0        # 15 + 10 + 5 = 30 <= 30
    assert grpo.plan_next_stage(22.0, 0, T, D, one) == 1        # 37 > 30; 32 + 10 <= 60
    assert grpo.plan_next_stage(45.0, 0, T, D, one) == 2        # stage 1 no longer fits: skipped
    assert grpo.plan_next_stage(60.0, 1, T, D, one) is None     # 80 + 10 > 60, 80 + 15 > 90
    # the estimate is the mean cost per turn of timeout over the finished steps, scaled to T_m
    assert grpo.plan_next_stage(25.0, 1, T, D, [(10.0, 10), (60.0, 20)]) is None  # 2 s/turn
    assert grpo.plan_next_stage(25.0, 1, T, D, [(5.0, 10), (10.0, 20)]) == 1      # 0.5 s/turn
    # planned again at the current step's real end (running=False): only the next step counts
    assert grpo.plan_next_stage(35.0, 1, T, D, one, running=False) == 1         # 35 + 10 <= 60
    assert grpo.plan_next_stage(55.0, 1, T, D, one, running=False) == 2         # 65 > 60; 70 <= 90
    assert grpo.plan_next_stage(80.0, 1, T, D, one, running=False) is None      # 95 > 90


def test_wall_steps_pick_tasks_by_seed_and_index_only():
    _, cfg = klong.parse_args(["--stage", "rl", "--rl-wall-s", "60", "--tasks-per-step", "2"])
    a, b = grpo.wall_step(cfg, 32, 5, 0), grpo.wall_step(cfg, 32, 5, 2)
    assert a.groups == b.groups and (a.stage, b.stage) == (0, 2)
    assert (a.timeout, b.timeout) == (cfg.rl_timeouts[0], cfg.rl_timeouts[2])
    assert grpo.wall_step(cfg, 32, 6, 0).groups != a.groups
    assert [s.index for s in grpo._growing([a, b], 1)] == [5]


def test_a_negative_wall_budget_is_a_user_error():
    with pytest.raises(UserError, match="--rl-wall-s"):
        klong.parse_args(["--stage", "rl", "--rl-wall-s", "-5"])


def test_a_wall_clock_run_advances_its_stages_as_documented(tmp_path):
    """A real RL run from the shipped checkpoint under a wall budget: replaying the rule on the
    logged RL clock gives exactly the logged stages, the run stops when no step fits (so it
    cannot overrun by more than its last two steps' estimate error), it took > 1 step, and run
    again it resumes with its clock spent and takes none."""
    budget = 24.0
    _, cfg = klong.parse_args([
        "--stage", "rl", "--run-dir", str(tmp_path), "--rl-timeouts", "3,6", "--rl-steps", "1,1",
        "--rl-wall-s", str(budget), "--n-rollouts", "2", "--tasks-per-step", "1",
        "--n-tasks", "2", "--rl-eval", "false"])
    grpo.run_rl(cfg)
    log = [json.loads(x) for x in (tmp_path / "rl" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "reward_mean" in r]
    assert len(steps) >= 2
    assert [r["step"] for r in steps] == list(range(1, len(steps) + 1))
    deadlines = grpo.stage_deadlines(budget, (1, 1))
    clocks = [0.0] + [r["rl_clock_s"] for r in steps]              # clock when step k started
    laps = [(clocks[k + 1] - clocks[k], steps[k]["timeout"]) for k in range(len(steps))]
    assert steps[0]["stage"] == 0
    for k in range(len(steps)):   # step k+1 was planned when step k started, else when it ended
        planned = grpo.plan_next_stage(clocks[k], steps[k]["stage"], (3, 6), deadlines,
                                       laps[:k]) if k else None
        if planned is None:
            planned = grpo.plan_next_stage(clocks[k + 1], steps[k]["stage"], (3, 6), deadlines,
                                           laps[:k + 1], running=False)
        assert planned == (steps[k + 1]["stage"] if k + 1 < len(steps) else None)
        assert steps[k]["timeout"] == (3, 6)[steps[k]["stage"]]
    assert all(lap > 0 for lap, _ in laps)
    assert clocks[-1] <= budget + laps[-1][0] + (laps[-2][0] if len(laps) > 1 else 0.0)
    assert clocks[-1] > budget / 3           # it ran on while steps fitted
    assert steps[-1]["rl_cpu_s"] > 0
    before = (tmp_path / "rl" / "log.jsonl").read_text()
    grpo.run_rl(cfg)                         # resumed after the end: the budget is spent, no step
    assert (tmp_path / "rl" / "log.jsonl").read_text() == before
