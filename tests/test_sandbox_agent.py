"""agent.py on sandbox.py: tools, blacklist, the episode loop with KLong's scaffold guards and
context management, and the three policies (scripted, local transformers model with prompt
caching, OpenAI-compatible endpoint on a loopback server)."""
import json
import re
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from hypothesis import given

import agent as A
import sandbox as S
import split
from tests.loopback import JsonEndpoint
from tests.strategies import blacklist_urls

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "paperbench"
GOLD_FLAG = (SHARED / "fixtures/submissions/hex_flag/gold/flag.txt").read_text().strip()
TIERS = [pytest.param(t, marks=pytest.mark.skipif(S.tier_problem(t) is not None,
                                                    reason=f"{t}: {S.tier_problem(t)}"))
         for t in S.TIERS]
DOCKER_PROBLEM = S.docker_problem()
DOCKER = pytest.param("docker", marks=pytest.mark.skipif(DOCKER_PROBLEM is not None,
                                                         reason=f"docker: {DOCKER_PROBLEM}"))


def make_task(root: Path, paper: str, blacklist: str = "none\n", name: str = "hex-flag") -> Path:
    """A PaperBench task folder around the real hex_flag fixture rubric; the "paper" states the flag."""
    d = root / name
    d.mkdir(parents=True)
    (d / "paper.md").write_text(paper)
    (d / "addendum.md").write_text("Nothing else is needed.\n")
    (d / "blacklist.txt").write_text(blacklist)
    shutil.copy(SHARED / "fixtures/rubrics/hex_flag.json", d / "rubric.json")
    (d / "config.yaml").write_text(f"id: {name}\ntitle: The hex flag paper\n")
    return d


HEX_PAPER = (f"# The hex flag paper\n\nOur method outputs the flag {GOLD_FLAG}.\n"
             "Reproduce it: the file flag.txt at the root of the submission holds the flag.\n")


def call(name: str, n: int, **args) -> dict:
    return {"role": "assistant", "content": "", "tool_calls": [
        {"id": f"c{n}", "type": "function", "function": {"name": name, "arguments": args}}]}


def turn_of(messages: list[dict]) -> int:
    return sum(m["role"] == "assistant" for m in messages)


def flag_expert(messages: list[dict]) -> dict:
    """Read the paper (in 50-line chunks), look around, write the flag, commit, end."""
    n = turn_of(messages)
    tools = [m for m in messages if m["role"] == "tool"]
    last = tools[-1]["content"] if tools else ""
    if n == 0:
        return call("read_file_chunk", n, file="/home/paper/paper.md", start_line="1", max_lines="50")
    if n == 1:
        return call("bash", n, cmd="ls $HOME/paper && head -3 $HOME/instructions.txt")  # any tier
    if n == 2:
        flag = re.search(r"0x[0-9a-f]{8}", next(t["content"] for t in tools
                                                 if "File has" in t["content"])).group()
        return call("write_file", n, file="flag.txt", content=flag + "\n")
    if n == 3:
        return call("bash", n, cmd="git add -A && git commit -qm 'flag' && git log --oneline | wc -l")
    return call("end_task", n, end_message=f"done ({last.strip()} commit)")


# ----------------------------------------------------------------------------- end to end

@pytest.mark.parametrize("tier", TIERS + [DOCKER])
def test_a_scripted_policy_solves_the_hex_flag_fixture_end_to_end(tier, tmp_path):
    task = make_task(tmp_path, HEX_PAPER)
    ep = A.run_episode(A.ScriptedPolicy(flag_expert), task, A.Budget(max_turns=10), backend=tier,
                       submission_out=tmp_path / "submission")
    assert ep.stop_reason == "end_task" and not ep.failed and ep.turns == 5 and ep.tier == tier
    assert (ep.submission_dir / "flag.txt").read_text().strip() == GOLD_FLAG
    assert (ep.submission_dir / ".git").is_dir()
    msgs = ep.trajectory.messages
    listing = msgs[5]["content"]                       # `ls /home/paper`: the rubric never enters
    assert "paper.md" in listing and "blacklist.txt" in listing and "rubric" not in listing
    assert "config.yaml" not in listing
    assert ep.trajectory.prefix_len == 4               # system, user, read, its observation
    assert msgs[-3]["content"].strip() == "1"          # one commit
    record = json.loads(json.dumps(asdict(ep.trajectory)))
    again = split.trajectory_from_dict(record)         # a valid docs/ARCHITECTURE.md record
    assert again.messages == msgs and again.meta["paper_read"] and again.meta["tier"] == tier
    if tier == "plain":                                # paths the agent is told are real there
        assert re.search(r"(?<!/fs)/home/", msgs[1]["content"]) is None


@pytest.mark.parametrize("backend", [DOCKER])
def test_a_reproduction_runs_in_docker(backend, tmp_path):
    import judge
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "reproduce.sh").write_text("python3 -c \"print('acc,0.9')\" > results.csv\n"
                                      "touch /usr/planted 2>/dev/null || echo root is read-only\n"
                                      "echo done\n")
    rep = judge.run_reproduction(sub, tmp_path / "out", timeout_s=60, backend=backend)
    assert rep.sandbox_tier == "docker" and rep.exit_code == 0 and not rep.timed_out
    assert (rep.dir / "results.csv").read_text() == "acc,0.9\n"
    assert (rep.dir / "reproduce.log").read_text() == "root is read-only\ndone\n"


# ----------------------------------------------------------------------------- guards

def test_the_paper_must_be_read_through_before_other_tools(tmp_path):
    paper = "\n".join(f"line {i} of the paper" for i in range(1, 121)) + "\n"
    task = make_task(tmp_path, paper)
    script = [call("bash", 0, cmd="ls"), call("read_file_chunk", 1, file="../paper/paper.md"),
              call("write_file", 2, file="x", content="y"),
              call("read_file_chunk", 3, file="/home/paper/paper.md", start_line=51),
              call("end_task", 4, end_message="early"),
              call("read_file_chunk", 5, file="/home/paper/paper.md", start_line=101, max_lines=50),
              call("write_file", 6, file="x", content="y")]
    ep = A.run_episode(A.ScriptedPolicy(lambda m: script[turn_of(m)]), task,
                       A.Budget(max_turns=len(script), reminder_every=0), backend="local")
    obs = [m["content"] for m in ep.trajectory.messages if m["role"] == "tool"]
    assert obs[0].startswith("Refused: read the paper first. You have read 0 of the 120 lines")
    assert obs[1].startswith("File has 120 total lines.\n1: line 1")     # relative path works
    assert obs[2].startswith("Refused: read the paper first. You have read 50 of the 120")
    assert obs[4].startswith("Refused: read the paper first. You have read 100 of the 120")
    assert obs[6] == "Wrote 1 bytes to x."
    msgs = ep.trajectory.messages
    assert ep.trajectory.prefix_len == msgs.index(next(m for m in msgs if m.get("content") == obs[5])) + 1
    assert ep.trajectory.meta["paper_read"]


def test_reading_the_whole_paper_with_cat_also_counts(tmp_path):
    task = make_task(tmp_path, HEX_PAPER)
    script = [call("bash", 0, cmd="cat /home/paper/paper.md"), call("bash", 1, cmd="echo ok")]
    ep = A.run_episode(A.ScriptedPolicy(lambda m: script[turn_of(m)]), task,
                       A.Budget(max_turns=2), backend="local")
    assert ep.trajectory.prefix_len == 4 and ep.trajectory.messages[-1]["content"] == "ok"


def test_end_task_is_refused_before_the_minimum_share_of_the_budget(tmp_path):
    task = make_task(tmp_path, HEX_PAPER)
    read = call("read_file_chunk", 0, file="/home/paper/paper.md")
    ep = A.run_episode(A.ScriptedPolicy(lambda m: read if turn_of(m) == 0 else
                                        call("end_task", turn_of(m), end_message="bye")),
                       task, A.Budget(max_turns=10, min_end_fraction=0.5, reminder_every=0),
                       backend="local")
    ends = [m["content"] for m in ep.trajectory.messages if m.get("name") == "end_task"]
    assert ends[:4] == ["Refused: end_task is allowed once 50% of the budget is used "
                        f"({k}0% so far). Keep improving the submission." for k in (2, 3, 4)] + \
        ["Task ended."]
    assert ep.stop_reason == "end_task" and ep.turns == 5


def test_no_tool_call_is_nudged_and_time_is_reminded_every_five_turns(tmp_path):
    task = make_task(tmp_path, HEX_PAPER)
    ep = A.run_episode(A.ScriptedPolicy(lambda m: {"role": "assistant", "content": "thinking"}),
                       task, A.Budget(max_turns=10), backend="local")
    msgs = ep.trajectory.messages
    assert ep.stop_reason == "max_turns" and ep.turns == 10
    assert sum(m["content"] == A.NUDGE for m in msgs) == 10
    reminders = [m["content"] for m in msgs if m["role"] == "user" and m["content"].startswith("Info:")]
    assert len(reminders) == 2 and reminders[0].startswith("Info: 5 of 10 turns")
    assert "git commit" in reminders[0]
    assert not ep.trajectory.meta["paper_read"] and ep.trajectory.prefix_len == 2


class SlowAPI:
    """A policy whose every call waits 0.3 s on a (simulated) API retry, and says so."""

    def act(self, messages, tools):
        time.sleep(0.3)
        return A.PolicyReply({"role": "assistant", "content": "wait"}, api_wait_s=0.3)


def test_model_api_retry_time_is_off_the_episode_clock(tmp_path):
    task = make_task(tmp_path, HEX_PAPER)
    t0 = time.monotonic()
    ep = A.run_episode(SlowAPI(), task, A.Budget(max_turns=6, max_seconds=1.0), backend="local")
    assert ep.stop_reason == "max_turns"              # 1.8 s of API waits did not count
    assert time.monotonic() - t0 > 1.8 and ep.wall_s < 1.0
    assert ep.trajectory.meta["api_wait_s"] == pytest.approx(1.8)


def test_a_tool_call_is_capped_at_the_time_left(tmp_path):
    task = make_task(tmp_path, HEX_PAPER)
    script = [call("bash", 0, cmd="cat /home/paper/paper.md"),
              call("bash", 1, cmd="sleep 30", timeout="100")]
    ep = A.run_episode(A.ScriptedPolicy(lambda m: script[min(turn_of(m), 1)]), task,
                       A.Budget(max_seconds=2.0), backend="local", limits={"kill_grace_s": 0.2})
    slept = ep.trajectory.messages[5]["content"]
    timeout = float(re.search(r"timed out after ([\d.]+)s", slept).group(1))
    assert timeout <= 2.0 and ep.stop_reason == "max_seconds" and ep.wall_s < 4


def test_a_sandbox_that_dies_or_cannot_start_fails_the_rollout(tmp_path):
    task = make_task(tmp_path, HEX_PAPER)
    others = set(S._LOCAL_OPEN)                        # sandboxes of other tests stay alive

    def crash_then_act(messages):
        if turn_of(messages) == 1:                     # the sandbox dies under the agent
            for box in S._LOCAL_OPEN - others:
                box._proc.kill()
                box._proc.wait()
        return call("bash", turn_of(messages), cmd="cat /home/paper/paper.md")

    ep = A.run_episode(A.ScriptedPolicy(crash_then_act), task, A.Budget(max_turns=5), backend="local")
    assert ep.stop_reason == "sandbox_error" and ep.failed and ep.submission_dir is None
    assert ep.turns == 2 and ep.trajectory.messages[-1]["content"].startswith("Sandbox error:")
    never = A.run_episode(A.ScriptedPolicy(crash_then_act), task, A.Budget(max_turns=2),
                          backend="local", limits={"memory_mb": 1})
    assert never.stop_reason == "sandbox_error" and never.failed and never.turns == 0
    assert "did not start" in never.trajectory.meta["error"]


def test_load_task_names_the_missing_file():
    with pytest.raises(FileNotFoundError, match="self-composing-policies/paper.md: missing"):
        S.load_task(SHARED / "papers/self-composing-policies")    # PaperBench ships no paper text


def test_budget_needs_a_limit():
    with pytest.raises(ValueError, match="max_turns and/or max_seconds"):
        A.Budget()


# ----------------------------------------------------------------------------- context management

def test_the_context_builder_kicks_in_on_a_long_episode(tmp_path):
    task = make_task(tmp_path, HEX_PAPER)
    cfg = split.SplitConfig(context_len=700, overlap=60, reserve=64)
    contexts = []

    def policy(messages):
        contexts.append(messages)
        n = turn_of(messages)
        if not any(m.get("name") == "read_file_chunk" for m in messages) and n == 0:
            return call("read_file_chunk", 0, file="/home/paper/paper.md")
        return call("bash", 100 + len(contexts), cmd=f"echo step {len(contexts)}; seq 40")

    ep = A.run_episode(A.ScriptedPolicy(policy), task, A.Budget(max_turns=60, context=cfg),
                       backend="local")
    msgs, p = ep.trajectory.messages, ep.trajectory.prefix_len
    assert p == 4 and ep.turns == 60
    total = sum(A.rough_count(m) for m in msgs)
    assert total > 3 * cfg.context_len                       # the history outgrew the window
    assert all(sum(A.rough_count(m) for m in c) + cfg.reserve <= cfg.context_len for c in contexts)
    assert sum(len(c) < len(msgs[:k]) for k, c in enumerate(contexts)) > 0
    for c in contexts[1:]:
        assert c[:p] == msgs[:p]                             # the pinned prefix p, always
    restarts = sum(1 for a, b in zip(contexts, contexts[1:]) if b[:len(a)] != a)
    assert 2 <= restarts < 30                                # rebuilt now and then, not each turn


# ----------------------------------------------------------------------------- tools and blacklist

@pytest.fixture(scope="module", params=TIERS)
def toolbox(request):
    box = S.open_sandbox(request.param)
    yield A.Toolbox(box, ["https://github.com/mikelma/componet"])
    box.close()


def run(tb: A.Toolbox, name: str, **args) -> str:
    try:
        coerced = A.coerce_arguments(name, args)
    except A.ToolError as e:
        return f"Error: {e}"
    return tb.run(name, coerced, timeout=coerced.pop("timeout", 10))


def test_file_tools_read_search_write_and_edit(toolbox):
    text = "\n".join(f"row {i}" + (" Needle" if i % 30 == 0 else "") for i in range(1, 131))
    assert run(toolbox, "write_file", file="notes/a.txt", content=text) == f"Wrote {len(text)} bytes to notes/a.txt."
    chunk = run(toolbox, "read_file_chunk", file="/home/submission/notes/a.txt", start_line="61", max_lines="500")
    lines = chunk.splitlines()
    assert lines[0] == "File has 130 total lines." and lines[1] == "61: row 61" and len(lines) == 51
    assert run(toolbox, "read_file_chunk", file="notes/a.txt", start_line=131).startswith("Error: start_line 131")
    found = run(toolbox, "search_file", file="notes/a.txt", query="needle", max_matches="2", context_lines="1")
    assert found.startswith("Found 4 matches for 'needle' in notes/a.txt (page 1 of 2).")
    assert "30> row 30 Needle" in found and "29: row 29" in found and "90>" not in found
    assert "120> row 120 Needle" in run(toolbox, "search_file", file="notes/a.txt", query="NEEDLE", max_matches=2, page=2)
    assert run(toolbox, "edit_file", file="notes/a.txt", old="row 7\n", new="ROW SEVEN\n").startswith("Edited")
    assert "7: ROW SEVEN" in run(toolbox, "read_file_chunk", file="notes/a.txt", start_line=7, max_lines=1)
    assert "occurs 4 times" in run(toolbox, "edit_file", file="notes/a.txt", old="Needle", new="x")
    assert "occurs 0 times" in run(toolbox, "edit_file", file="notes/a.txt", old="absent", new="x")
    assert run(toolbox, "read_file_chunk", file="nope.txt").startswith("Error:")


def test_tool_arguments_are_checked_and_coerced(toolbox):
    assert run(toolbox, "bash", cmd="echo $((6 * 7))", timeout="5") == "42"
    assert run(toolbox, "bash", cmd="exit 3") == "[exit code 3]"
    assert run(toolbox, "bash", cmd="true") == "[no output]"
    assert run(toolbox, "python", code="import sys\nprint(sys.version_info[0])") == "3"
    assert run(toolbox, "read_file_chunk", file="x", start_line="one") == \
        "Error: read_file_chunk: argument 'start_line' must be an integer, got 'one'"
    assert run(toolbox, "bash") == "Error: bash: missing argument 'cmd'"
    assert run(toolbox, "bash", cmd="ls", color="red").startswith("Error: bash: unknown argument 'color'")
    assert run(toolbox, "browse", url="x").startswith("Error: unknown tool 'browse'")


def test_blacklisted_urls_are_refused_and_the_scan_flags_what_got_through(toolbox, tmp_path):
    url = (SHARED / "papers/self-composing-policies/blacklist.txt").read_text().strip()
    out = run(toolbox, "bash", cmd=f"git clone {url}.git")
    assert out.startswith(A.REFUSED_BLACKLIST) and url in out
    assert run(toolbox, "write_file", file="r.sh", content=f"wget {url}/archive/main.zip").startswith(A.REFUSED_BLACKLIST)
    task = make_task(tmp_path, HEX_PAPER, blacklist=url + "\n")
    script = [call("bash", 0, cmd="cat /home/paper/paper.md"),
              call("bash", 1, cmd=f"git clone {url}"),
              call("bash", 2, cmd="u=github.com/mikelma; printf 'wget %s\\n' \"$u/componet\""),
              call("bash", 3, cmd=f"echo the code is at {url} but I will not use it")]
    ep = A.run_episode(A.ScriptedPolicy(lambda m: script[turn_of(m)]), task,
                       A.Budget(max_turns=4), backend="local")
    hits = ep.trajectory.meta["blacklist_hits"]
    assert [(h["message_index"], h["verb"], h["refused"]) for h in hits] == \
        [(4, "git clone", True), (7, "wget", False)]          # the mention alone is no hit


@given(case=blacklist_urls())
def test_a_blacklist_pattern_matches_every_spelling_and_no_near_miss(case):
    url, spelling, near_miss = case
    pattern = A.blacklist_pattern(url)
    assert pattern.search(f"run {spelling} now") and not pattern.search(f"run {near_miss} now")


# ----------------------------------------------------------------------------- LocalPolicy

@pytest.fixture(scope="module")
def tiny():
    """The tiny tokenizer and a random 2-layer Qwen2 (docs/ARCHITECTURE.md scale-down knobs)."""
    import chat
    from transformers import Qwen2Config, Qwen2ForCausalLM
    tok = chat.build_tiny_tokenizer()
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=4096)
    return tok, Qwen2ForCausalLM(cfg).eval()


def full_forward_logprobs(model, sample, temperature):
    ids = torch.tensor([sample.context_ids + sample.action_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(sample.context_ids) - 1:-1]   # (A, V)
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(1, torch.tensor(sample.action_ids)[:, None])[:, 0]


def test_local_policy_reuses_its_kv_cache_and_reports_exact_logprobs(tiny):
    import chat
    tok, model = tiny
    pol = A.LocalPolicy(model, tok, temperature=0.7, max_new_tokens=12, seed=1)
    msgs = [{"role": "system", "content": "sys"}, {"role": "user", "content": "read the paper"}]
    first = pol.act(msgs, A.TOOLS)
    assert first.sample.context_ids == chat.encode_messages(tok, msgs)[0] + chat.generation_prefix(tok)
    msgs += [first.message, {"role": "tool", "tool_call_id": "c", "name": "bash", "content": "w 1 ok"},
             {"role": "user", "content": "go on"}]
    before = pol.encoded_tokens
    second = pol.act(msgs, A.TOOLS)
    fed = pol.encoded_tokens - before - (len(second.sample.action_ids) - 1)
    held = first.sample.context_ids + first.sample.action_ids[:-1]      # what the cache held
    shared = A._common_prefix(held, second.sample.context_ids)
    assert shared >= len(first.sample.context_ids)
    assert fed == len(second.sample.context_ids) - shared                # only the new tail
    short = msgs[:2] + [{"role": "user", "content": "[... 1 earlier turns omitted ...]"}]
    third = pol.act(short, A.TOOLS)                             # re-truncated: rebuilt from p
    for reply in (first, second, third):
        s = reply.sample
        assert len(s.logprobs) == len(s.action_ids) and s.policy_version == 0
        assert torch.allclose(torch.tensor(s.logprobs), full_forward_logprobs(model, s, 0.7), atol=1e-4)


def test_local_policy_turns_an_unparsable_reply_into_a_nudge(tiny, tmp_path):
    import chat
    tok, model = tiny
    forced = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    torch.nn.init.zeros_(forced.weight)
    with torch.no_grad():
        forced.bias.zero_()
        forced.bias[tok.convert_tokens_to_ids(chat.CALL)] = 30.0     # only "<|call|>": no name
    original, model.lm_head = model.lm_head, forced
    try:
        pol = A.LocalPolicy(model, tok, max_new_tokens=4, seed=0)
        ep = A.run_episode(pol, make_task(tmp_path, HEX_PAPER), A.Budget(max_turns=2), backend="local")
    finally:
        model.lm_head = original
    msgs = ep.trajectory.messages
    assert ep.stop_reason == "max_turns" and "tool_calls" not in msgs[2] and msgs[3]["content"] == A.NUDGE
    assert [s.action_ids for s in ep.trajectory.samples] == [[tok.convert_tokens_to_ids(chat.CALL)] * 4] * 2


def test_a_local_policy_episode_records_every_sample_with_its_exact_context(tiny, tmp_path):
    import chat
    tok, model = tiny
    cfg = split.SplitConfig(context_len=512, overlap=32, reserve=48)
    pol = A.LocalPolicy(model, tok, temperature=1.0, max_new_tokens=24, version=3, seed=2)
    ep = A.run_episode(pol, make_task(tmp_path, HEX_PAPER), A.Budget(max_turns=12, context=cfg),
                       backend="local", system_prompt="You are an agent.")
    traj = ep.trajectory
    assert len(traj.samples) == ep.turns == 12
    prefix_ids = chat.encode_messages(tok, traj.messages[:traj.prefix_len])[0]
    for s in traj.samples:
        assert traj.messages[s.message_index]["role"] == "assistant" and s.policy_version == 3
        gen = chat.generation_prefix(tok)
        assert s.context_ids[-len(gen):] == gen and s.context_ids[:len(prefix_ids)] == prefix_ids
        assert len(s.context_ids) - len(gen) + cfg.reserve <= cfg.context_len   # split's bound
        assert len(s.action_ids) == len(s.logprobs) <= 24
    back = split.trajectory_from_dict(json.loads(json.dumps(asdict(traj))))
    assert back.samples == traj.samples


# ----------------------------------------------------------------------------- OpenAIPolicy (loopback server)

class FakeEndpoint(JsonEndpoint):
    """A loopback chat-completions server: fails the first `fail` requests with `status`, then
    answers from `script(body)`; records every (path, body) in `bodies`."""

    def __init__(self, script, fail: int = 0, status: int = 500):
        self.script, self.fail, self.status = script, fail, status
        super().__init__(self.answer)

    @property
    def bodies(self) -> list[tuple[str, dict]]:
        return self.calls

    def answer(self, path: str, body: dict) -> tuple[int, dict]:
        if self.fail > 0:
            self.fail -= 1
            return self.status, {"error": "busy"}
        return 200, {"choices": [{"message": self.script(body)}]}


def openai_call(name: str, n: int, **args) -> dict:
    return {"role": "assistant", "content": None, "tool_calls": [
        {"id": f"call_{n}", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}]}


def test_openai_policy_retries_with_backoff_and_reports_the_wait():
    server = FakeEndpoint(lambda body: openai_call("bash", 0, cmd="ls"), fail=2, status=503)
    try:
        pol = A.OpenAIPolicy(server.url, "tiny", backoff_s=0.1, retries=3)
        history = [{"role": "user", "content": "hi"}, call("bash", 9, cmd="pwd"),
                   {"role": "tool", "tool_call_id": "c9", "name": "bash", "content": "/home"}]
        reply = pol.act(history, A.TOOLS)
    finally:
        server.close()
    assert reply.message["tool_calls"][0]["function"] == {"name": "bash", "arguments": {"cmd": "ls"}}
    assert reply.api_wait_s >= 0.1 + 0.2
    path, body = server.bodies[-1]
    assert path == "/v1/chat/completions" and len(server.bodies) == 3 and body["model"] == "tiny"
    assert body["tools"] == A.TOOLS
    assert body["messages"][1]["tool_calls"][0]["function"]["arguments"] == '{"cmd": "pwd"}'
    assert body["messages"][2] == {"role": "tool", "tool_call_id": "c9", "content": "/home"}


def test_openai_policy_gives_up_clearly():
    server = FakeEndpoint(lambda body: {}, fail=10, status=400)
    try:
        with pytest.raises(A.PolicyError, match="HTTP 400 \\(not retried\\)"):
            A.OpenAIPolicy(server.url + "/v1", "m", backoff_s=0.01).act([], A.TOOLS)
        assert len(server.bodies) == 1
    finally:
        server.close()
    with pytest.raises(A.PolicyError, match="no answer after 2 tries"):
        A.OpenAIPolicy(server.url, "m", retries=1, backoff_s=0.01, timeout_s=2).act([], A.TOOLS)


def test_an_endpoint_policy_solves_the_fixture_and_a_dead_one_fails_the_rollout(tmp_path):
    def script(body):
        hf = [m if m["role"] != "assistant" else {**m, "tool_calls": [
            {**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
            for c in m.get("tool_calls") or []]} for m in body["messages"]]
        reply = flag_expert(hf)
        f = reply["tool_calls"][0]["function"]
        if turn_of(hf) == 1:
            return {"role": "assistant", "content": "a malformed call",
                    "tool_calls": [{"id": "x", "type": "function",
                                    "function": {"name": "bash", "arguments": "{not json"}}]}
        return openai_call(f["name"], turn_of(hf), **f["arguments"])

    server = FakeEndpoint(script, fail=1)
    try:
        ep = A.run_episode(A.OpenAIPolicy(server.url, "m", backoff_s=0.05), make_task(tmp_path, HEX_PAPER),
                           A.Budget(max_turns=10), backend="local")
    finally:
        server.close()
    assert ep.stop_reason == "end_task"
    assert (ep.submission_dir / "flag.txt").read_text().strip() == GOLD_FLAG
    assert ep.trajectory.meta["api_wait_s"] >= 0.05
    dropped = ep.trajectory.messages[4]
    assert "dropped: arguments are not a JSON object" in dropped["content"] and "tool_calls" not in dropped
    dead = A.run_episode(A.OpenAIPolicy(server.url, "m", retries=1, backoff_s=0.01, timeout_s=2),
                         make_task(tmp_path / "2", HEX_PAPER), A.Budget(max_turns=3), backend="local")
    assert dead.stop_reason == "policy_error" and dead.failed and "no answer" in dead.trajectory.meta["error"]


# ----------------------------------------------------------------------------- command line

def test_the_command_line_runs_a_command_in_a_task_sandbox(tmp_path, capsys):
    task = make_task(tmp_path, HEX_PAPER)
    assert S.main([str(task), "--backend", "local", "--", "ls", "/home/paper", "/home"]) == 0
    out = capsys.readouterr()
    assert "paper.md" in out.out and "rubric" not in out.out and "instructions.txt" in out.out
    assert "[sandbox tier: " in out.err
    assert S.main(["--tiers"]) == 0 and "local picks:" in capsys.readouterr().out
