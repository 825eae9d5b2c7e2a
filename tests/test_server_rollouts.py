"""RL from server rollouts (issue 19.3): agent.OpenAIPolicy reads split.Samples out of vLLM's and
SGLang's chat completions, rollout_server.RolloutServer writes the weights after every update and
asks the server to reload them, and grpo.run_rl trains on what the server sampled.

The servers are loopback ones (ModelServer below) that speak each server's documented format and
sample with a REAL tiny model (the shipped SFT checkpoint, copied to the folder they serve and
re-read from there on a reload): the ids and log-probs they return are a model's, so the Samples
are checked against model.packed_logprobs (the trainer's quantity) of a separate copy of the same
weights. What a real vLLM would add (paged attention, batching) is not emulated; what it returns
is. A real vLLM server could not run here (README, "RL from an inference server")."""
from __future__ import annotations

import json
import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import agent as A
import chat
import grpo
import klong
import rollout_server as RS
from model import packed_logprobs
from tests.loopback import JsonEndpoint

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "checkpoints" / "tiny-sft"
TOL = 1e-4          # fp32: the server's incremental forward against the trainer's packed forward


def load(folder: Path):
    return AutoModelForCausalLM.from_pretrained(folder, local_files_only=True,
                                                dtype=torch.float32).eval()


def hf_messages(openai_messages: list[dict]) -> list[dict]:
    """What vLLM and SGLang do before templating: tool-call arguments JSON -> dicts."""
    out = []
    for m in openai_messages:
        m = dict(m)
        if m.get("tool_calls"):
            m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": json.loads(
                c["function"]["arguments"] or "{}")}} for c in m["tool_calls"]]
        out.append(m)
    return out


class ModelServer:
    """A loopback vLLM or SGLang server over a real model folder.

    /v1/chat/completions: the prompt is the chat template of the messages (as the real servers
    build it), sampled token by token at the request's temperature (log-probs of the sampling
    distribution, i.e. vLLM's `--logprobs-mode processed_logprobs`), with the fields each server
    documents: vLLM `logprobs.content[i].token` = "token_id:N" under return_tokens_as_token_ids,
    top-level `prompt_token_ids` and `choices[0].token_ids` under return_token_ids; SGLang text
    tokens and per-choice `prompt_token_ids` / `token_ids`. Knobs turn off what older servers or
    other set-ups lack: `prompt_ids` (vLLM < 0.10.2), `token_ids` (SGLang before 2026-07),
    `tool_parser` (no parser for chat.py's format: content is the text without special tokens),
    `dev_mode` (vLLM's /collective_rpc and /reset_prefix_cache answer 404 without it).
    Reload routes re-read the weights from disk; every route's calls are counted in `routes`."""

    def __init__(self, kind: str, folder: Path, *, prompt_ids: bool = True, token_ids: bool = True,
                 tool_parser: bool = True, dev_mode: bool = True, logprobs: bool = True):
        self.kind, self.folder = kind, Path(folder)
        self.prompt_ids, self.token_ids, self.tool_parser = prompt_ids, token_ids, tool_parser
        self.dev_mode, self.logprobs = dev_mode, logprobs
        self.tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.model = load(folder)
        self.stop = chat.stop_token_id(self.tok)
        self.rng = torch.Generator().manual_seed(0)
        self.lock = threading.Lock()
        self.routes: Counter[str] = Counter()
        self.sampled: list[dict] = []         # per completion: prompt, ids, logprobs
        self.http = JsonEndpoint(self.respond)
        self.url = self.http.url

    def close(self):
        self.http.close()

    def respond(self, path: str, body: dict) -> tuple[int, dict]:
        with self.lock:
            self.routes[path] += 1
            if path == "/v1/chat/completions":
                return 200, self.complete(body)
            if self.kind == "sglang" and path == "/update_weights_from_disk":
                self.model = load(Path(body["model_path"]))
                return 200, {"success": True, "message": "Succeeded to update model weights."}
            if self.kind == "vllm" and self.dev_mode and path == "/collective_rpc":
                assert body["method"] == "reload_weights"
                self.model = load(self.folder)    # vLLM re-reads the folder it serves
                return 200, {"results": [None]}
            if self.kind == "vllm" and self.dev_mode and path == "/reset_prefix_cache":
                return 200, {}
            return 404, {"detail": "Not Found"}

    def complete(self, body: dict) -> dict:
        messages = hf_messages(body["messages"])
        prompt = list(self.tok.apply_chat_template(messages, tools=body.get("tools"),
                                                   add_generation_prompt=True, tokenize=True,
                                                   return_dict=True)["input_ids"])
        T = body.get("temperature", 1.0)
        g = torch.Generator().manual_seed(body["seed"]) if body.get("seed") is not None \
            else self.rng                         # unseeded requests draw from the server's RNG
        ids, lps, ctx = [], [], list(prompt)
        with torch.no_grad():
            for _ in range(body.get("max_tokens") or 16):
                logits = self.model(torch.tensor([ctx])).logits[0, -1].float()
                logp = torch.log_softmax(logits / (T or 1.0), dim=-1)
                t = int(logp.argmax()) if T == 0 else int(torch.multinomial(logp.exp(), 1,
                                                                            generator=g))
                ids.append(t)
                lps.append(float(logp[t]))
                ctx.append(t)
                if t == self.stop:
                    break
        self.sampled.append({"prompt": prompt, "ids": ids, "logprobs": lps, "body": body})
        if self.tool_parser:
            try:
                parsed = chat.decode_assistant(self.tok, ids)
                message = {"role": "assistant", "content": parsed.get("content") or "",
                           "tool_calls": [{"id": f"call_{k}", "type": "function", "function": {
                               "name": c["function"]["name"],
                               "arguments": json.dumps(c["function"]["arguments"])}}
                               for k, c in enumerate(parsed.get("tool_calls") or [])]}
            except chat.ToolCallParseError:
                message = {"role": "assistant", "content": self.tok.decode(ids)}
        else:
            message = {"role": "assistant",
                       "content": self.tok.decode(ids, skip_special_tokens=True)}
        choice = {"index": 0, "message": message,
                  "finish_reason": "stop" if ids[-1] == self.stop else "length"}
        out = {"id": "chatcmpl-loopback", "object": "chat.completion", "model": body["model"],
               "choices": [choice], "usage": {"prompt_tokens": len(prompt),
                                              "completion_tokens": len(ids)}}
        want_ids = body.get("return_token_ids") and self.token_ids
        if body.get("logprobs") and self.logprobs:
            as_ids = self.kind == "vllm" and body.get("return_tokens_as_token_ids")
            choice["logprobs"] = {"content": [
                {"token": f"token_id:{t}" if as_ids else self.tok.decode([t]), "logprob": lp,
                 "bytes": list(self.tok.decode([t]).encode()), "top_logprobs": []}
                for t, lp in zip(ids, lps)]}
        if want_ids:
            choice["token_ids"] = ids
            if self.prompt_ids:
                (out if self.kind == "vllm" else choice)["prompt_token_ids"] = prompt
        return out


@pytest.fixture
def served(tmp_path):
    """A copy of the shipped checkpoint in the folder a server is started on."""
    folder = tmp_path / "served"
    shutil.copytree(SHIPPED, folder)
    return folder


@pytest.fixture
def tok():
    return AutoTokenizer.from_pretrained(SHIPPED, local_files_only=True)


HISTORY = [{"role": "system", "content": A.SYSTEM_PROMPT},
           {"role": "user", "content": "Read /home/paper/paper.md, then write /home/submission/"
                                       "flag.txt."},
           {"role": "assistant", "content": "", "tool_calls": [
               {"id": "c0", "type": "function",
                "function": {"name": "read_file_chunk",
                             "arguments": {"file": "/home/paper/paper.md", "start_line": 1,
                                           "max_lines": 50}}}]},
           {"role": "tool", "tool_call_id": "c0", "name": "read_file_chunk",
            "content": "1: # A paper\n2: the flag is w 3"}]


def trainer_logprobs(model, sample, temperature: float) -> list[float]:
    """log π(action | context) as the RL update computes it (grpo's packing, packed_logprobs)."""
    seqs = grpo.sampled_subtrajectories([sample])
    batch, index = grpo._as_packed(seqs, pad_id=0)
    with torch.no_grad():
        logp = packed_logprobs(model, batch, temperature)
    return [float(x) for x in logp[index.targets >= 0]]


def policy(server: ModelServer, tok, **kw) -> A.OpenAIPolicy:
    return A.OpenAIPolicy(server.url, "served", tokens=server.kind, tokenizer=tok, max_tokens=24,
                          retries=0, **kw)


# ----------------------------------------------------------------------------- the formats

@pytest.mark.parametrize("kind", ["vllm", "sglang"])
def test_a_reply_is_a_sample_whose_ids_and_logprobs_are_the_served_models(kind, served, tok):
    server = ModelServer(kind, served)
    try:
        reply = policy(server, tok, temperature=1.0, seed=7, version=3).act(HISTORY, A.TOOLS)
    finally:
        server.close()
    (path, body), = server.http.calls
    assert path == "/v1/chat/completions" and body["model"] == "served" and body["seed"] == 7
    assert body["logprobs"] is True and body["top_logprobs"] == 0
    assert body["return_token_ids"] is True
    assert body.get("return_tokens_as_token_ids") is (True if kind == "vllm" else None)
    s, sampled = reply.sample, server.sampled[0]
    assert s.context_ids == sampled["prompt"] == A.template_ids(tok, HISTORY, A.TOOLS)
    assert s.action_ids == sampled["ids"] and s.policy_version == 3
    assert s.logprobs == pytest.approx(sampled["logprobs"], abs=1e-7)
    # π_old as the trainer sees it: the same numbers from a separate copy of the served weights
    assert trainer_logprobs(load(SHIPPED), s, 1.0) == pytest.approx(s.logprobs, abs=TOL)
    expect = chat.decode_assistant(tok, s.action_ids)
    assert [c["function"] for c in reply.message.get("tool_calls", [])] == \
        [c["function"] for c in expect.get("tool_calls", [])]


def test_without_prompt_ids_or_a_tool_parser_the_local_tokenizer_fills_in(served, tok):
    """vLLM before 0.10.2 returns no prompt ids (the prompt is tokenised here with the chat
    template) and a server without a parser for chat.py's format returns the reply's text
    without its special tokens (the call is parsed here from the sampled ids)."""
    server = ModelServer("vllm", served, prompt_ids=False, tool_parser=False)
    try:
        pol = policy(server, tok, temperature=0.0)
        reply = pol.act(HISTORY, A.TOOLS)
    finally:
        server.close()
    assert pol.prompt_ids == "local"
    assert reply.sample.context_ids == server.sampled[0]["prompt"]
    assert reply.sample.action_ids == server.sampled[0]["ids"]
    expect = chat.decode_assistant(tok, reply.sample.action_ids)
    assert expect.get("tool_calls"), "the greedy SFT model answers with a tool call"
    assert reply.message["tool_calls"][0]["function"] == expect["tool_calls"][0]["function"]
    # greedy: log-probs of the temperature-1 distribution, as LocalPolicy reports them
    assert trainer_logprobs(load(SHIPPED), reply.sample, 1.0) == \
        pytest.approx(reply.sample.logprobs, abs=TOL)


@pytest.mark.parametrize("kind,knob,field", [("sglang", "token_ids", "token_ids"),
                                             ("vllm", "logprobs", "logprobs"),
                                             ("sglang", "logprobs", "logprobs")])
def test_a_reply_without_exact_tokens_fails_naming_the_missing_field(kind, knob, field, served,
                                                                      tok):
    server = ModelServer(kind, served, **{knob: False})
    try:
        with pytest.raises(A.PolicyError, match=rf"no exact tokens in the {kind} reply: .*{field}"):
            policy(server, tok).act(HISTORY, A.TOOLS)
    finally:
        server.close()


def test_token_ids_that_disagree_with_the_logprobs_tokens_are_refused():
    raw = {"choices": [{"message": {"content": "x"}, "token_ids": [5, 6],
                        "logprobs": {"content": [{"token": "token_id:5", "logprob": -0.1},
                                                 {"token": "token_id:7", "logprob": -0.2}]}}]}
    with pytest.raises(ValueError, match="disagree"):
        A.completion_tokens(raw, "vllm")
    raw["choices"][0]["token_ids"] = [5, 7]
    raw["prompt_token_ids"] = [1, 2]
    assert A.completion_tokens(raw, "vllm") == ([1, 2], [5, 7], [-0.1, -0.2])
    raw["choices"][0]["logprobs"]["content"][1]["token"] = "tok"
    with pytest.raises(ValueError, match="token_id:N"):
        A.completion_tokens(raw, "vllm")


def test_the_rollout_server_flag_is_parsed_or_refused_in_one_line():
    assert RS.parse_spec("vllm:http://h:8000/v1") == RS.ServerSpec("vllm", "http://h:8000/v1")
    assert RS.parse_spec("sglang:m@http://h:30000") == RS.ServerSpec("sglang", "http://h:30000",
                                                                     "m")
    assert RS.server_root("http://h:8000/v1/chat/completions") == "http://h:8000"
    for bad in ("vllm", "tgi:http://h", "vllm:h:8000", "sglang:"):
        with pytest.raises(ValueError, match="expected"):
            RS.parse_spec(bad)
    assert klong.main(["--stage", "rl", "--rollout-server", "tgi:http://h"]) == 2


# ----------------------------------------------------------------------------- weight reloads

def perturbed(model, scale: float = 0.05) -> dict:
    g = torch.Generator().manual_seed(1)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kind", ["vllm", "sglang"])
def test_publish_writes_the_weights_and_the_server_serves_them_after_its_reload(kind, served, tok,
                                                                                tmp_path):
    server = ModelServer(kind, served)
    weights = served if kind == "vllm" else tmp_path / "published"
    cfg = klong.Config(max_new_tokens=24)
    rs = RS.RolloutServer(RS.ServerSpec(kind, server.url), tok, load(SHIPPED).config, weights, cfg)
    new = perturbed(load(SHIPPED))
    try:
        before = rs.policy(greedy=True).act(HISTORY, A.TOOLS).sample
        rs.publish(new, 1)
        after = rs.policy(greedy=True).act(HISTORY, A.TOOLS).sample
    finally:
        server.close()
    routes = {"vllm": ["/collective_rpc", "/reset_prefix_cache"],
              "sglang": ["/update_weights_from_disk"]}[kind]
    assert all(server.routes[r] == 1 for r in routes) and rs.reloads == 1
    assert (before.policy_version, after.policy_version) == (0, 1)
    trained = load(SHIPPED)
    trained.load_state_dict(new)
    assert trainer_logprobs(trained, after, 1.0) == pytest.approx(after.logprobs, abs=TOL)
    assert trainer_logprobs(load(SHIPPED), after, 1.0) != pytest.approx(after.logprobs, abs=TOL)
    assert load(weights).state_dict()["lm_head.weight"].equal(new["lm_head.weight"])


def test_a_reload_waits_for_requests_in_flight_and_holds_new_ones(served, tok):
    server = ModelServer("sglang", served)
    rs = RS.RolloutServer(RS.ServerSpec("sglang", server.url), tok, load(SHIPPED).config,
                          served.parent / "published", klong.Config())
    try:
        with rs.sampling() as version:
            t = threading.Thread(target=rs.publish, args=(load(SHIPPED).state_dict(), 1))
            t.start()
            time.sleep(0.5)
            assert version == 0 and server.routes["/update_weights_from_disk"] == 0
        t.join(30)
        assert server.routes["/update_weights_from_disk"] == 1
        with rs.sampling() as version:
            assert version == 1
    finally:
        server.close()


def test_a_vllm_server_without_dev_mode_stops_the_run_with_the_reason(served, tok):
    server = ModelServer("vllm", served, dev_mode=False)
    rs = RS.RolloutServer(RS.ServerSpec("vllm", server.url), tok, load(SHIPPED).config, served,
                          klong.Config())
    try:
        with pytest.raises(RuntimeError, match="HTTP 404.*VLLM_SERVER_DEV_MODE=1"):
            rs.publish(load(SHIPPED).state_dict(), 1)
    finally:
        server.close()
    assert rs.version == 0


# ----------------------------------------------------------------------------- RL

def test_rl_trains_on_server_rollouts_and_the_server_reloads_after_every_update(served, tmp_path):
    """`klong.py --stage rl --rollout-server vllm:URL`: every rollout is sampled by the server, the
    trainer's π_old is the server's log-prob (checked against the starting weights for the
    samples of version 0), each update is written to the served folder and reloaded (once at the
    start, once per step), and the server then answers with the final weights."""
    server = ModelServer("vllm", served)
    run = tmp_path / "run"
    try:
        _, cfg = klong.parse_args([
            "--stage", "rl", "--run-dir", str(run), "--rl-timeouts", "8", "--rl-steps", "2",
            "--n-rollouts", "3", "--tasks-per-step", "1", "--n-tasks", "2", "--rl-eval", "false",
            "--rollout-workers", "1", "--rollout-server", f"vllm:{server.url}/v1",
            "--rollout-weights", str(served)])
        grpo.run_rl(cfg)
        log = [json.loads(x) for x in (run / "rl" / "log.jsonl").read_text().splitlines()]
        rollouts = [json.loads(x) for x in (run / "rl" / "rollouts.jsonl").read_text().splitlines()]
        final = load(run / "rl" / "final")
        probe = A.OpenAIPolicy(server.url, str(served), tokens="vllm",
                               tokenizer=AutoTokenizer.from_pretrained(SHIPPED), temperature=0.0,
                               max_tokens=24, retries=0).act(HISTORY, A.TOOLS).sample
    finally:
        server.close()
    steps = [r for r in log if "reward_mean" in r]
    assert len(steps) == 2 and all(r["action_tokens"] > 0 for r in steps), log
    # step 1 starts at π_ref (its KL term has no gradient): a gradient there is the policy
    # gradient of the server-sampled rollouts' advantages
    assert steps[0]["reward_std"] > 0 and steps[0]["grad_norm"] > 0, log
    assert server.routes["/collective_rpc"] == server.routes["/reset_prefix_cache"] == 1 + 2
    samples = [s for r in rollouts for s in r["trajectory"]["samples"]]
    n_turns = sum(r["turns"] for r in rollouts)
    assert len(samples) == n_turns == server.routes["/v1/chat/completions"] - 1   # all served
    first = [split_sample(s) for s in samples if s["policy_version"] == 0][:4]
    assert first
    start = load(SHIPPED)
    for s in first:                                                     # π_old exactly
        assert trainer_logprobs(start, s, 1.0) == pytest.approx(s.logprobs, abs=TOL)
    assert not load(SHIPPED).state_dict()["lm_head.weight"].equal(final.state_dict()["lm_head.weight"])
    assert trainer_logprobs(final, probe, 1.0) == pytest.approx(probe.logprobs, abs=TOL)


def split_sample(d: dict):
    import split
    return split.Sample(**d)
