"""The OpenAI-compatible clients against a real server: `transformers serve` (transformers'
`serving` extra), started offline on CPU for this module, serving tiny models trained in the
fixture to give one fixed reply each (tests/serve_model.py). Everything goes over real HTTP:

- agent.OpenAIPolicy: a real episode in the local sandbox, its tool calls parsed by the server;
- the LLM leaf grader (judge.parse_grader("openai:MODEL@URL")): grades arrive and aggregate;
- rubric generation (factory.evaluator + build_paper_task): a task folder from a paper;
- the factory's endpoint teacher (factory.distill, teacher "openai:MODEL@URL"), judged by the
  served grader, its trajectory kept.

A server that cannot start fails the module with its output (the extra is a declared
dependency, requirements.txt). Canned loopback servers stay for fault injection only
(tests/loopback.py)."""
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from openai import OpenAI

import agent
import factory
import judge
import split
import synthetic
from tests import serve_model
from tests.serve_model import AGENT_REPLY, JUDGE_REPLY

PAPER = "# A toy paper\n\nWe train a tiny model on toy data.\n"


@dataclass
class Served:
    url: str                  # OpenAI base URL, …/v1
    models: dict[str, Path]   # role (serve_model.REPLIES) -> model folder, the request's `model`

    def spec(self, role: str) -> str:
        return f"openai:{self.models[role]}@{self.url}"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One `transformers serve` for the module (it boots while the models train); its process
    group is ended after the module."""
    root = tmp_path_factory.mktemp("served")
    server = serve_model.TransformersServe(root)
    try:
        models = serve_model.build_models(root)
        try:
            server.wait_ready()
        except serve_model.ServeError as e:
            pytest.fail(str(e), pytrace=False)
        yield Served(server.url, models)
    finally:
        server.close()


def toy_task(tmp_path) -> Path:
    return synthetic.write_task_folder(tmp_path / "task", "toy", "A toy paper", PAPER,
                                       serve_model.RUBRIC, serve_model.ADDENDUM, None)


def calls(message: dict) -> list[tuple[str, dict]]:
    return [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]]


def test_the_server_parses_tool_calls_and_returns_no_logprobs(served):
    """What the clients below rely on, and what RL cannot: with the tokenizer's response
    template the reply's calls come back as OpenAI tool_calls (arguments a JSON string);
    log-probs are not returned even when asked for (docs/MACHINE.md)."""
    client = OpenAI(base_url=served.url, api_key="none", max_retries=0)
    r = client.chat.completions.create(
        model=str(served.models["agent"]), tools=agent.TOOLS, logprobs=True, temperature=1.0,
        messages=[{"role": "system", "content": agent.SYSTEM_PROMPT},
                  {"role": "user", "content": "Replicate the paper."}])
    message = r.choices[0].message
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] \
        == calls(AGENT_REPLY)
    assert not message.content and r.choices[0].logprobs is None
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0


def test_openai_policy_runs_a_real_episode_in_the_local_sandbox(served, tmp_path):
    """The served agent reads the paper, writes README.md and ends the task in one turn: the
    three calls run in the sandbox in order (the mandatory reading first opens the others)."""
    policy = agent.OpenAIPolicy(served.url, str(served.models["agent"]))
    episode = agent.run_episode(policy, toy_task(tmp_path), agent.Budget(max_turns=3),
                                backend="local", submission_out=tmp_path / "submission")
    messages = episode.trajectory.messages
    assert episode.stop_reason == "end_task" and episode.turns == 1
    assert calls(messages[2]) == calls(AGENT_REPLY)
    assert [m["name"] for m in messages[3:]] == ["bash", "write_file", "end_task"]
    assert PAPER.strip() in messages[3]["content"] and episode.trajectory.meta["paper_read"]
    assert (tmp_path / "submission" / "README.md").read_text() == "served by transformers"


def test_the_llm_leaf_grader_gets_its_grades_from_the_server(served, tmp_path):
    """parse_grader("openai:MODEL@URL"): every leaf of the toy rubric is judged by the served
    model, its Expectations / Reality / Score answer parsed into a valid pass."""
    (tmp_path / "submission").mkdir()
    (tmp_path / "submission" / "README.md").write_text("served by transformers")
    grader = judge.parse_grader(served.spec("judge"))
    graded = judge.grade_submission(toy_task(tmp_path), tmp_path / "submission", grader)
    leaves = [g for _, g in graded.leaves()]
    assert graded.score == 1.0 and graded.invalid_leaves() == 0 and len(leaves) == 2
    for leaf in leaves:
        assert leaf.judge_metadata["full_judge_response"] == JUDGE_REPLY["content"]
        assert leaf.explanation.startswith("# Expectations\nA README.")
        assert leaf.judge_metadata["grader"] == f"openai:{served.models['judge']}"


def test_rubric_generation_through_the_server_makes_a_task_folder(served, tmp_path):
    """factory.evaluator("openai:MODEL@URL") + build_paper_task: the served evaluation agent's
    JSON becomes the task's rubric.json and addendum.md beside the paper."""
    (tmp_path / "papers").mkdir()
    (tmp_path / "papers" / "toy.md").write_text(PAPER)
    [candidate] = factory.collect_local(tmp_path / "papers")
    task_dir = factory.build_paper_task(candidate, tmp_path / "tasks",
                                        factory.evaluator(served.spec("evaluator")))
    assert judge.load_rubric(task_dir / "rubric.json").to_dict() == serve_model.RUBRIC
    assert (task_dir / "addendum.md").read_text() == serve_model.ADDENDUM
    assert (task_dir / "paper.md").read_text() == PAPER


def test_the_factory_distils_with_a_served_teacher_judged_by_a_served_grader(served, tmp_path):
    """factory.distill with teacher and grader both "openai:MODEL@URL": the attempt runs, is
    judged Q = 1 and kept as an SFT trajectory."""
    cfg = factory.FactoryConfig(out_dir=tmp_path / "out", attempts=1, threshold=0.9,
                                max_turns=3, min_end_fraction=0.0, grader=served.spec("judge"),
                                workers=1)
    summary = factory.distill([toy_task(tmp_path)], cfg, teacher=served.spec("agent"),
                              backend="local")
    assert (summary.attempts, summary.failed, summary.kept, summary.mean_score) == (1, 0, 1, 1.0)
    [kept] = split.load_jsonl(tmp_path / "out" / "trajectories.jsonl")
    assert kept.meta["teacher"] == served.spec("agent") and kept.meta["stop_reason"] == "end_task"
    assert calls(kept.messages[2]) == calls(AGENT_REPLY) and kept.score == 1.0
