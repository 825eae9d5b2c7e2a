"""synthetic.py, synthetic tasks: the step environment, the scripted expert, the rubric checks and
the prefix-dependence property. The step script runs for real (bash on the host, in a copy of the
sandbox's layout: paper/ beside submission/); the sandbox path is in test_factory_distill.py."""
import json
import os
import random
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import synthetic
from synthetic import STEP, SyntheticSpec
from tests.strategies import synthetic_specs


def run_step(sub, cmd: str) -> str:
    """Run one `bash` action on the host, as the sandbox does: cwd = the submission folder,
    the task folder beside it as ../paper."""
    out = subprocess.run(["bash", "-c", cmd], cwd=sub, capture_output=True, text=True, timeout=10)
    return (out.stdout + out.stderr).strip()


def lay_out(tmp, spec):
    """tmp/paper (the task folder) and tmp/submission, like /home/paper and /home/submission."""
    task = synthetic.write_synthetic_task(tmp / "paper", spec)
    (tmp / "submission").mkdir()
    return task, tmp / "submission"


def play(task_dir, sub, spec, rng, noise=0.0, flaw=0.0, max_turns=400) -> list[dict]:
    """Drive the expert against the real step script until end_task; returns the messages."""
    messages = [{"role": "system", "content": "agent"}, {"role": "user", "content": "go"}]
    for _ in range(max_turns):
        msg = synthetic.expert_action(spec, messages, rng, noise=noise, flaw=flaw)
        messages.append(msg)
        call = msg["tool_calls"][0]
        name, args = call["function"]["name"], call["function"]["arguments"]
        if name == "end_task":
            return messages
        obs = ((task_dir / "paper.md").read_text() if name == "read_file_chunk"
               else run_step(sub, args["cmd"]))
        messages.append({"role": "tool", "tool_call_id": call["id"], "name": name, "content": obs})
    raise AssertionError("the expert did not finish")


def words(messages) -> set[str]:
    """Every word the agent saw or wrote: observation text and tool-call arguments."""
    text = [str(m.get("content") or "") for m in messages]
    text += [str(v) for m in messages for c in m.get("tool_calls") or []
             for v in c["function"]["arguments"].values()]
    return set(" ".join(text).replace(",", " ").split())


def leaf_checks(task_dir) -> list[str]:
    rubric = json.loads((task_dir / "rubric.json").read_text())
    out, stack = [], [rubric]
    while stack:
        node = stack.pop()
        stack += node["sub_tasks"]
        out += [node["check"]] if "check" in node else []
    return out


def passed(task_dir, sub) -> int:
    return sum(subprocess.run(["bash", "-c", c], cwd=sub).returncode == 0
               for c in leaf_checks(task_dir))


def commands(messages):
    return [m["tool_calls"][0]["function"]["arguments"].get("cmd") for m in messages
            if m["role"] == "assistant"]


def test_tasks_are_paperbench_folders_and_independent_of_count(tmp_path):
    a = synthetic.make_synthetic_tasks(tmp_path / "a", 5, seed=3)
    b = synthetic.make_synthetic_tasks(tmp_path / "b", 2, seed=3)
    held_out = synthetic.make_synthetic_tasks(tmp_path / "c", 5, seed=4)
    for d in a:
        assert {p.name for p in d.iterdir()} == {"paper.md", "addendum.md", "blacklist.txt",
                                                 "rubric.json", "config.yaml", "instructions.txt", "step"}
        assert (d / "blacklist.txt").read_text() == "none\n"
        assert os.access(d / "step", os.X_OK)
    assert [(d / "paper.md").read_text() for d in a[:2]] == [(d / "paper.md").read_text() for d in b]
    assert not {d.name for d in a} & {d.name for d in held_out}
    spec = synthetic.load_spec(a[0])
    assert 24 <= spec.m <= 32 and len(leaf_checks(a[0])) == 2 * spec.m


def test_generated_rubrics_validate_with_judge_and_every_leaf_has_a_check(tmp_path):
    judge = pytest.importorskip("judge")
    for task in synthetic.make_synthetic_tasks(tmp_path, 3, seed=1, m_range=(2, 30)):
        rubric = judge.load_rubric(task / "rubric.json")
        m = synthetic.load_spec(task).m
        assert judge.rubric_stats(rubric)["leaves"] == 2 * m
        assert all(leaf.check for _, leaf in rubric.leaves())


def test_step_script_refuses_wrong_actions_without_advancing_or_revealing(tmp_path):
    spec = SyntheticSpec("syn-x-00000", tag_w="ruby", tag_r="owl", m=2)
    task, sub = lay_out(tmp_path, spec)
    say = lambda cmd: run_step(sub, cmd)  # noqa: E731
    assert say(f"{STEP} r 1 owl") == "error: phase w first"
    assert say(f"{STEP} w 2 ruby") == "error: next is w 1"
    assert say(f"{STEP} w 1 blue") == "error: wrong tag"
    assert say(f"{STEP} s") == "w 0 r 0"
    assert say(f"{STEP} w 1 ruby") == "w 1 ok"
    assert say(f"{STEP} w 2 ruby") == "w 2 ok, phase w done"
    assert say(f"{STEP} w 3 ruby") == "error: phase w done"
    wrong = say(f"{STEP} r 1 cat")
    assert wrong == "error: wrong tag" and "owl" not in wrong
    assert say(f"{STEP} r 1 owl") == "r 1 ok"
    assert say(f"{STEP} r 2 owl") == "r 2 ok, all done"
    assert say(f"{STEP} s") == "w 2 r 2"
    assert say(f"{STEP} x") .startswith("error: usage")
    assert passed(task, sub) == 4


@settings(max_examples=6)
@given(spec=synthetic_specs(), seed=st.integers(0, 10**6),
       noise=st.sampled_from([0.0, 0.3]), flaw=st.sampled_from([0.0, 0.8]))
def test_expert_solves_every_task_and_an_empty_submission_fails(tmp_path_factory, spec, seed,
                                                               noise, flaw):
    tmp = tmp_path_factory.mktemp("solve")
    task, sub = lay_out(tmp, spec)
    messages = play(task, sub, spec, random.Random(seed), noise=noise, flaw=flaw)
    assert messages[-1]["tool_calls"][0]["function"]["name"] == "end_task"
    assert passed(task, sub) == 2 * spec.m
    (tmp / "empty").mkdir()
    assert passed(task, tmp / "empty") == 0


def test_flaw_adds_a_neutral_status_call_after_even_items(tmp_path):
    spec = SyntheticSpec("syn-x-00001", tag_w="gold", tag_r="emu", m=7)
    clean = commands(play(*lay_out(tmp_path / "a", spec), spec, random.Random(0)))
    always = commands(play(*lay_out(tmp_path / "b", spec), spec, random.Random(0), flaw=1.0))
    assert f"{STEP} s" not in clean and len(clean) == 1 + 2 * spec.m + 1   # read, steps, end
    # one status call after items 2, 4, 6 of each phase, and nothing else changes
    assert always.count(f"{STEP} s") == 2 * (spec.m // 2)
    assert [c for c in always if c != f"{STEP} s"] == clean
    for i, c in enumerate(always):
        if c == f"{STEP} s":
            assert int(always[i - 1].split()[2]) % 2 == 0      # ../paper/step w 4 gold


@settings(max_examples=8)
@given(spec=synthetic_specs(), seed=st.integers(0, 10**6), other=st.integers(1, 15))
def test_prefix_dependence_the_first_run_is_decided_by_the_prefix_alone(
        tmp_path_factory, spec, seed, other):
    """Two tasks that differ only in tag_R give the same history after the prefix up to the first
    RUN (noise and flaw included: same seed), while the right action there differs: no policy that
    sees only that history can be right on both. The pinned prefix (the paper reading) names
    tag_R, so a policy that sees it can."""
    twin = SyntheticSpec(spec.task_id, spec.tag_w,
                         synthetic.TAGS_R[(synthetic.TAGS_R.index(spec.tag_r) + other) % 16], spec.m)
    views = []
    for s in (spec, twin):
        task, sub = lay_out(tmp_path_factory.mktemp("twin"), s)
        msgs = play(task, sub, s, random.Random(seed), noise=0.2, flaw=0.65)
        prefix_len = 4                   # system, user, read_file_chunk, the paper
        first_run = next(i for i, m in enumerate(msgs) if m["role"] == "assistant"
                         and (commands([m])[0] or "").startswith(f"{STEP} r "))
        history = msgs[prefix_len:first_run]
        views.append((msgs[:prefix_len], history, synthetic.expected_action(s, msgs[:first_run])))
    (p_a, hist_a, right_a), (p_b, hist_b, right_b) = views
    assert hist_a == hist_b                                      # the truncated view is shared
    assert right_a == ("r", 1, spec.tag_r) and right_b == ("r", 1, twin.tag_r)
    assert spec.tag_r not in words(hist_a) and twin.tag_r not in words(hist_b)
    assert spec.tag_r in words(p_a[3:]) and twin.tag_r in words(p_b[3:])   # the prefix decides


def test_tokenizer_text_makes_tags_indices_and_observations_short():
    chat = pytest.importorskip("chat")
    tok = chat.build_tiny_tokenizer(synthetic.tokenizer_text())
    for word in [*synthetic.TAGS_W, *synthetic.TAGS_R, *map(str, range(1, 33))]:
        assert len(tok.encode(" " + word, add_special_tokens=False)) == 1, word
    obs = {"role": "tool", "tool_call_id": "c", "name": "bash", "content": "w 12 ok"}
    action = synthetic._step("r", 12, "owl", 0)
    assert len(chat.encode_message(tok, obs)[0]) <= 6
    assert len(chat.encode_message(tok, action)[0]) <= 18
