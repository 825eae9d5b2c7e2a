"""Endpoint policies fit their context (issue 17, KLong's context-length error handling): an
OpenAIPolicy given the endpoint's window builds every prompt with split's context builder and never
sends an over-long one; an HTTP 400 about the context gets the context rebuilt smaller and one
more try, then the episode ends with the reason recorded. Against a loopback server that counts the
prompt as sent and enforces a limit."""
import json
from pathlib import Path

import pytest

import agent as A
from tests.loopback import JsonEndpoint
from tests.test_judge_guards import make_task

TOO_LONG = "This model's maximum context length is {limit} tokens. However, you requested {n} tokens."


class LimitedEndpoint(JsonEndpoint):
    """/v1/chat/completions refusing (HTTP 400, vLLM's wording) any request whose prompt (messages
    and tools, as sent, json_tokens) plus max_tokens passes `limit`, or any request after the
    first `refuse_after`; otherwise it reads the paper, then prints 600 numbers every turn."""

    def __init__(self, limit: int, refuse_after: int | None = None):
        self.limit, self.refuse_after, self.refused = limit, refuse_after, 0
        super().__init__(self.answer)

    @property
    def bodies(self) -> list[dict]:
        return [body for _, body in self.calls]

    def answer(self, path: str, body: dict) -> tuple[int, dict]:
        n = sum(A.json_tokens(m) for m in body["messages"]) + A.json_tokens(body["tools"])
        n += body.get("max_tokens") or 0
        late = self.refuse_after is not None and len(self.calls) > self.refuse_after
        if n > self.limit or late:
            self.refused += 1
            return 400, {"error": {"message": TOO_LONG.format(limit=self.limit, n=n)}}
        turn = sum(m["role"] == "assistant" for m in body["messages"])
        name, args = (("read_file_chunk", {"file": "/home/paper/paper.md"})
                      if len(self.calls) == 1 else ("bash", {"cmd": "seq 1 600"}))
        return 200, {"choices": [{"message": {
            "role": "assistant", "content": None, "tool_calls": [
                {"id": f"call_{len(self.calls)}_{turn}", "type": "function",
                 "function": {"name": name, "arguments": json.dumps(args)}}]}}]}


@pytest.fixture
def endpoint():
    servers = []

    def start(*a, **kw):
        servers.append(LimitedEndpoint(*a, **kw))
        return servers[-1]
    yield start
    for s in servers:
        s.close()


def episode(tmp_path: Path, policy: A.OpenAIPolicy, turns: int = 12) -> A.Episode:
    return A.run_episode(policy, make_task(tmp_path), A.Budget(max_turns=turns, reminder_every=0),
                         backend="local")


def test_a_policy_given_the_endpoint_window_never_sends_an_over_long_prompt(endpoint, tmp_path):
    server = endpoint(limit=3000)
    ep = episode(tmp_path, A.OpenAIPolicy(server.url, "m", context_len=3000, max_tokens=200))
    assert ep.stop_reason == "max_turns" and ep.turns == 12
    assert server.refused == 0 and len(server.bodies) == 12
    # the history outgrew the window: later prompts were rebuilt (the pinned paper reading kept)
    sent = [len(b["messages"]) for b in server.bodies]
    assert sent[-1] < len(ep.trajectory.messages) - 1 and max(sent) < len(ep.trajectory.messages)
    assert all("paper" in json.dumps(b["messages"][:4]) for b in server.bodies[1:])
    assert all(b["max_tokens"] == 200 for b in server.bodies)


def test_without_a_window_a_context_length_400_rebuilds_smaller_and_the_episode_goes_on(endpoint, tmp_path):
    server = endpoint(limit=3000)
    ep = episode(tmp_path, A.OpenAIPolicy(server.url, "m", max_tokens=200))
    assert ep.stop_reason == "max_turns" and ep.turns == 12
    assert server.refused == 1                            # once; the smaller window then holds
    assert ep.trajectory.meta["context_len"] < 3000


def test_a_second_refusal_ends_the_episode_with_the_reason(endpoint, tmp_path):
    server = endpoint(limit=10**6, refuse_after=4)        # the endpoint's limit dropped
    ep = episode(tmp_path, A.OpenAIPolicy(server.url, "m", context_len=10**5, max_tokens=200))
    assert ep.stop_reason == "context_error" and ep.failed and ep.turns == 4
    assert len(server.bodies) == 6 and server.refused == 2
    assert "refused the context twice" in ep.trajectory.meta["error"]
    assert "maximum context length" in ep.trajectory.meta["error"]
    # the retry was smaller than the refused prompt
    assert len(json.dumps(server.bodies[5]["messages"])) < len(json.dumps(server.bodies[4]["messages"]))


def test_only_a_context_length_400_is_rebuilt_other_400s_fail_at_once(endpoint):
    server = endpoint(limit=10)
    with pytest.raises(A.ContextTooLong, match="maximum context length is 10"):
        A.OpenAIPolicy(server.url, "m", retries=3, backoff_s=0.01).act(
            [{"role": "user", "content": "x" * 100}], A.TOOLS)
    assert len(server.bodies) == 1                        # a 400 is not retried
    with pytest.raises(ValueError, match="too little for answers"):
        A.OpenAIPolicy(server.url, "m", context_len=600, max_tokens=200)
