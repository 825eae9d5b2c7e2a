"""synthetic.py, the simulated synthetic environment: simulate_distill / simulate_episode must equal
the sandbox-distilled trajectories message for message (same expert, same random stream, same
budgets, same rejection sampling), scores included, so the miniature's data shortcut is exact."""
import json
import math
import random

import pytest

import factory
import synthetic
from factory import FactoryConfig


def lines(path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines()]


@pytest.mark.parametrize("seed,noise,flaw,slack,log", [(3, 0.0, 0.0, 1.5, 0), (4, 0.3, 0.65, 1.0, 0),
                                                       (7, 0.15, 0.8, 1.2, 3)])
def test_simulated_trajectories_equal_the_sandbox_ones(tmp_path, seed, noise, flaw, slack, log):
    cfg = FactoryConfig(out_dir=tmp_path / "real", n_tasks=3, seed=seed, attempts=2,
                        threshold=0.99, noise=noise, flaw=flaw, m_range=(3, 6), turn_slack=slack,
                        workers=2, log_words=log)
    factory.run_factory(cfg, backend="local")
    attempts = {a["id"]: a for a in lines(tmp_path / "real" / "attempts.jsonl")}
    assert len(attempts) == 6 and all(a["score"] is not None for a in attempts.values())
    for a in attempts.values():                                   # every attempt, kept or not
        spec = synthetic.load_spec(tmp_path / "real" / "tasks" / a["task_id"])
        rng = random.Random(f"expert-{spec.task_id}-{seed * 1000 + a['meta']['attempt']}")
        sim = synthetic.simulate_episode(
            spec, lambda m: synthetic.expert_action(spec, m, rng, noise, flaw),
            math.ceil(slack * synthetic.turns_needed(spec)))
        assert sim.messages == a["messages"]
        assert sim.prefix_len == a["prefix_len"] and sim.score == pytest.approx(a["score"])
        assert sim.meta["stop_reason"] == a["meta"]["stop_reason"]
        assert sim.meta["turns"] == a["meta"]["turns"]
    real = lines(tmp_path / "real" / "trajectories.jsonl")
    sim = synthetic.simulate_distill(FactoryConfig(**{**cfg.__dict__, "out_dir": tmp_path / "sim"}))
    assert sorted(t.id for t in sim) == sorted(r["id"] for r in real)      # same tasks kept
    by_id = {r["id"]: r for r in real}
    for t in sim:
        assert t.messages == by_id[t.id]["messages"] and t.meta["scores"] == by_id[t.id]["meta"]["scores"]
    assert (tmp_path / "sim" / "trajectories.jsonl").exists()


def test_simulation_refuses_what_it_does_not_model():
    spec = synthetic.sample_spec(0, 0, (3, 3))
    with pytest.raises(ValueError, match="not simulated"):
        synthetic.simulate_episode(spec, lambda m: synthetic._call("python", {"code": "1"}, 0), 5)


def test_expert_recovers_progress_from_a_status_line_or_a_refusal_alone():
    """Under context management the window may hold no `ok` line: a status line or a refused
    item still gives the progress (the fix for context restarts)."""
    spec = synthetic.SyntheticSpec("t", "red", "cat", 10)
    tool = lambda text: {"role": "tool", "name": "bash", "content": text}  # noqa: E731
    assert synthetic.expected_action(spec, [tool("w 10 r 3")]) == ("r", 4, "cat")
    assert synthetic.expected_action(spec, [tool("w 6 r 0")]) == ("w", 7, "red")
    assert synthetic.expected_action(spec, [tool("w 10 r 0")]) == ("r", 1, "cat")
    assert synthetic.expected_action(spec, [tool("error: next is r 5\n[exit code 1]")]) == ("r", 5, "cat")
    assert synthetic.expected_action(spec, [tool("w 4 ok"), tool("error: wrong tag")]) == ("w", 5, "red")
    assert synthetic.expected_action(spec, [tool("w 10 r 10")]) is None


def test_the_size_knobs_change_only_the_sizes_they_name():
    """M's range and the observation length are knobs (Config.task_items, task_log_words): the
    same task index keeps its id and tags; accepted steps print `log_words` more words."""
    a, b = synthetic.sample_spec(5, 2, (24, 32)), synthetic.sample_spec(5, 2, (40, 48), 3)
    assert (a.task_id, a.tag_w, a.tag_r) == (b.task_id, b.tag_w, b.tag_r)
    assert 24 <= a.m <= 32 and 40 <= b.m <= 48 and (a.log_words, b.log_words) == (0, 3)
    cmd = f"{synthetic.STEP} w 1 {b.tag_w}"
    assert synthetic.step_observation(a, {"w": 0, "r": 0}, cmd.replace(b.tag_w, a.tag_w)) == "w 1 ok"
    assert synthetic.step_observation(b, {"w": 0, "r": 0}, cmd) == "w 1 ok log log log"
    assert synthetic.step_observation(b, {"w": 0, "r": 0}, cmd + "x").startswith("error: wrong tag")
    assert synthetic.expected_action(b, [{"role": "tool", "content": "w 1 ok log log log"}]) == \
        ("w", 2, b.tag_w)
