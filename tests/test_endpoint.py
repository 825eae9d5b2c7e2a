"""endpoint.ChatEndpoint against a loopback OpenAI-compatible server: what is sent, what comes
back (extra fields kept), which failures are retried (each kind counted) with what waits, which
are not, and the running stats under concurrent callers."""
import re
import threading
import time
from email.utils import formatdate

import pytest

import endpoint as E
from tests.loopback import FAULT_KINDS, FaultPlan, JsonEndpoint, fault

MSGS = [{"role": "user", "content": "hi"}]


def answer(content: str = "ok", **extra) -> tuple[int, dict]:
    return 200, {"id": "c1", "choices": [{"index": 0, "message": {"role": "assistant",
                                                                   "content": content}}],
                 "usage": {"prompt_tokens": 3, "completion_tokens": 1}, **extra}


@pytest.fixture
def serve():
    servers = []

    def start(respond):
        servers.append(JsonEndpoint(respond, poll_interval=0.05))
        return servers[-1]
    yield start
    for s in servers:
        s.close()


def failing_first(kinds: list[str], **fault_args):
    """A respond() failing the first calls with `kinds` in turn, then answering."""
    todo = list(kinds)
    return lambda path, body: fault(todo.pop(0), **fault_args) if todo else answer()


@pytest.mark.parametrize("suffix", ["", "/", "/v1", "/v1/", "/v1/chat/completions"])
def test_every_url_form_reaches_v1_chat_completions(serve, suffix):
    s = serve(lambda path, body: answer())
    E.ChatEndpoint(s.url + suffix, "m").create(MSGS)
    assert [p for p, _ in s.calls] == ["/v1/chat/completions"]


def test_a_prefix_before_v1_is_kept(serve):
    s = serve(lambda path, body: answer())
    E.ChatEndpoint(s.url + "/openai/v1", "m").create(MSGS)
    assert s.calls[0][0] == "/openai/v1/chat/completions"


def test_the_request_carries_what_is_given_and_nothing_unset(serve):
    s = serve(lambda path, body: answer())
    ep = E.ChatEndpoint(s.url, "judge-model")
    tools = [{"type": "function", "function": {"name": "bash", "parameters": {"type": "object"}}}]
    ep.create(MSGS, tools=tools, max_tokens=7, temperature=0.5, seed=3,
              extra_body={"return_tokens_as_token_ids": True, "logprobs": True})
    ep.create(MSGS)
    full, bare = (b for _, b in s.calls)
    assert full == {"model": "judge-model", "messages": MSGS, "tools": tools, "max_tokens": 7,
                    "temperature": 0.5, "seed": 3, "return_tokens_as_token_ids": True,
                    "logprobs": True}
    assert bare == {"model": "judge-model", "messages": MSGS}


def test_the_reply_keeps_fields_outside_the_openai_schema(serve):
    """vLLM/SGLang put log-probs and token ids where OpenAI's schema has nothing: raw keeps them."""
    lp = {"content": [{"token": "token_id:42", "logprob": -0.25}]}
    s = serve(lambda path, body: (200, {"choices": [{"message": {"role": "assistant", "content": "x",
                                                                 "reasoning_content": "r"},
                                                     "logprobs": lp, "token_ids": [42]}],
                                        "prompt_token_ids": [1, 2], "usage": None}))
    c = E.ChatEndpoint(s.url, "m").create(MSGS)
    assert c.message == {"role": "assistant", "content": "x", "reasoning_content": "r"}
    assert c.raw["choices"][0]["logprobs"] == lp and c.raw["choices"][0]["token_ids"] == [42]
    assert c.raw["prompt_token_ids"] == [1, 2] and c.usage is None
    assert (c.retries, c.failures, c.wait_s) == (0, [], 0.0)


@pytest.mark.parametrize("kind", FAULT_KINDS)
def test_each_failure_kind_is_retried_and_named(serve, kind):
    s = serve(failing_first([kind], hang_s=1.5))
    ep = E.ChatEndpoint(s.url, "m", timeout_s=1.0, attempts=3, backoff_s=0.01)
    c = ep.create(MSGS)
    assert c.message["content"] == "ok" and c.failures == [kind] and c.retries == 1
    assert len(s.calls) == 2
    assert ep.stats == {"calls": 1, "answered": 1, "retries": 1, "unavailable": 0,
                        "access_errors": 0, "request_errors": 0, "wait_s": pytest.approx(c.wait_s),
                        "failures": {kind: 1}}
    if kind == "timeout":   # the failed try lasted the client's timeout, not the server's hang
        assert 1.0 <= c.wait_s < 1.5


def test_backoff_doubles_from_its_base_and_is_counted_as_waiting(serve):
    s = serve(failing_first(["http_500"] * 3))
    c = E.ChatEndpoint(s.url, "m", attempts=4, backoff_s=0.1).create(MSGS)
    assert c.failures == ["http_500"] * 3
    assert 0.1 + 0.2 + 0.4 <= c.wait_s < 0.7 + 1.0   # (slack for a loaded machine)


def test_retry_after_is_honoured_and_capped(serve):
    s = serve(failing_first(["http_429"], retry_after_s=0.5))
    c = E.ChatEndpoint(s.url, "m", backoff_s=0.01).create(MSGS)
    assert c.failures == ["http_429"] and 0.5 <= c.wait_s < 1.5
    s = serve(failing_first(["http_429"], retry_after_s=30))
    c = E.ChatEndpoint(s.url, "m", backoff_s=0.01, max_backoff_s=0.2).create(MSGS)
    assert 0.2 <= c.wait_s < 2.0   # the cap, not the 30 s asked


def test_retry_after_headers_in_seconds_dates_and_milliseconds():
    assert E.retry_after_s({"retry-after": "2.5"}) == 2.5
    assert E.retry_after_s({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    assert 8 <= E.retry_after_s({"retry-after": formatdate(time.time() + 10, usegmt=True)}) <= 10
    assert E.retry_after_s({"retry-after": "soon"}) is None and E.retry_after_s({}) is None
    assert [E.backoff_s(k, 1.0, 5.0) for k in range(5)] == [1, 2, 4, 5, 5]
    assert E.backoff_s(0, 1.0, 5.0, retry_after=3.0) == 3.0
    assert E.backoff_s(0, 1.0, 5.0, retry_after=0.0) == 0.0
    assert E.backoff_s(2, 1.0, 100.0, factor=3.0) == 9.0


def test_exhausted_retries_raise_unavailable_with_every_failure(serve):
    s = serve(failing_first(["http_500", "malformed", "connection"]))
    ep = E.ChatEndpoint(s.url, "m", attempts=3, backoff_s=0.01)
    with pytest.raises(E.EndpointUnavailable, match="failed 3 times; last error: ") as err:
        ep.create(MSGS)
    assert err.value.failures == ["http_500", "malformed", "connection"] and len(s.calls) == 3
    assert err.value.wait_s >= 0.01 + 0.02
    assert ep.stats["unavailable"] == 1 and ep.stats["retries"] == 2 and ep.stats["answered"] == 0


def test_a_dead_port_is_unavailable_and_names_the_transport_error():
    ep = E.ChatEndpoint("http://127.0.0.1:9/v1", "m", attempts=2, backoff_s=0.01, timeout_s=2)
    with pytest.raises(E.EndpointUnavailable, match="ConnectError") as err:
        ep.create(MSGS)
    assert err.value.failures == ["connection", "connection"]


@pytest.mark.parametrize("status", [401, 403, 404])
def test_access_errors_are_never_retried_and_stop_every_later_call(serve, status):
    s = serve(lambda path, body: (status, {"error": "no"}))
    ep = E.ChatEndpoint(s.url, "m", attempts=4, backoff_s=0.01)
    for _ in range(2):
        with pytest.raises(E.EndpointAccessError, match=re.escape(f"HTTP {status}, {E.ACCESS_ERRORS[status]}")):
            ep.create(MSGS)
    assert len(s.calls) == 1 and ep.stats["access_errors"] == 1 and ep.stats["retries"] == 0


@pytest.mark.parametrize("status,text,error", [
    (400, "This model's maximum context length is 10 tokens", E.ContextLengthError),
    (400, "unknown field 'foo'", E.EndpointRequestError),
    (422, "messages: field required", E.EndpointRequestError)])
def test_other_4xx_are_refusals_never_retried(serve, status, text, error):
    s = serve(lambda path, body: (status, {"error": {"message": text}}))
    ep = E.ChatEndpoint(s.url, "m", attempts=4, backoff_s=0.01)
    with pytest.raises(E.EndpointRequestError) as err:
        ep.create(MSGS)
    assert type(err.value) is error and err.value.status == status and text in err.value.body
    assert len(s.calls) == 1 and ep.stats["request_errors"] == 1
    with pytest.raises(E.EndpointRequestError):   # a refusal is not sticky: the next call is sent
        ep.create(MSGS)
    assert len(s.calls) == 2


def test_stats_add_up_under_concurrent_callers(serve):
    """8 threads × 10 calls with 30 % of calls failing in every way: every injected failure is
    counted, by kind, and every call ends answered or unavailable. A timeout can also be real (an
    answer slower than the client's timeout on a loaded machine), so timeouts are at least the
    injected ones; the other kinds cannot happen by chance and match exactly."""
    plan = FaultPlan(0.3, seed=1)
    s = serve(lambda path, body: fault(k, hang_s=1.0) if (k := plan.draw()) else answer())
    ep = E.ChatEndpoint(s.url, "m", timeout_s=0.6, attempts=4, backoff_s=0.01)
    outcomes = []

    def work():
        for _ in range(10):
            try:
                outcomes.append(ep.create(MSGS).retries)
            except E.EndpointUnavailable as e:
                outcomes.append(e)
    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    st, injected = ep.stats, plan.injected
    assert len(outcomes) == st["calls"] == 80 == st["answered"] + st["unavailable"]
    assert all(injected.values()) and set(st["failures"]) == set(FAULT_KINDS)
    assert {k: n for k, n in st["failures"].items() if k != "timeout"} == \
        {k: n for k, n in injected.items() if k != "timeout"}
    assert st["failures"]["timeout"] >= injected["timeout"]
    assert sum(st["failures"].values()) == st["retries"] + st["unavailable"]
    assert len(s.calls) == st["answered"] + sum(st["failures"].values())   # one request per try
