"""The agent scaffold (PaperBench's basic agent + KLong's scaffold fixes): tools, policies and the
episode loop, on top of sandbox.py's unified sandbox.

1. **Tools** with PaperBench's names (bash, python, read_file_chunk, search_file, end_task) plus
   write_file / edit_file; errors come back as observations; blacklisted URLs are refused, and
   every episode is scanned afterwards the way PaperBench's monitor does.
2. **Policies**: `ScriptedPolicy`, `LocalPolicy` (transformers, token-level sampling with a KV cache
   kept across turns: the paper's prompt caching; its own replies stay the ids it sampled, so the
   next context extends this one token for token), `OpenAIPolicy` (chat-completions endpoint;
   from vLLM or SGLang it returns Samples too: RL from a server, rollout_server.py).
3. **The episode loop** `run_episode`, with KLong's scaffold guards: mandatory paper reading (the
   pinned prefix p ends when the paper has been read through), `end_task` refused before a share
   of the budget, the no-tool-call nudge, the 5-step time reminder, and context management with
   split.py's context builder (docs/ARCHITECTURE.md resolution 4: the same rule as in training).

Departures and gap-fillers (the paper is silent on the scaffold):
- Failed episodes (sandbox died, policy endpoint down, context cannot be built) end with a
  `stop_reason` in `FAILED` and are not scored (docs/ARCHITECTURE.md resolution 6).
"""
from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import shlex
import tempfile
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

from sandbox import (HOME, PAPER_DIR, SUBMISSION, ExecResult, Sandbox, SandboxError, Task,
                     clean_output, load_task, open_sandbox)
from split import Sample, SplitConfig, SplitError, Trajectory, build_context

if TYPE_CHECKING:
    from sandbox_pool import SandboxPool

log = logging.getLogger("klong.agent")

# ============================================================================ 1. tools (PaperBench names)

def _fn(name: str, description: str, properties: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": required}}}


_S, _I = {"type": "string"}, {"type": "integer"}
TOOLS: list[dict] = [
    _fn("bash", "Run a bash command (a fresh `bash -lc`, cwd /home/submission, no stdin). Long jobs: "
        "run them in the background with output to a file.",
        {"cmd": _S, "timeout": {**_I, "description": "seconds (capped by the time left)"}}, ["cmd"]),
    _fn("python", "Run Python code in a fresh python3 process (cwd /home/submission).",
        {"code": _S, "timeout": _I}, ["code"]),
    _fn("read_file_chunk", "Read up to 50 numbered lines of a text file.",
        {"file": _S, "start_line": {**_I, "default": 1}, "max_lines": {**_I, "default": 50}}, ["file"]),
    _fn("search_file", "Case-insensitive search of a text file, with context lines, paged.",
        {"file": _S, "query": _S, "context_lines": {**_I, "default": 2},
         "max_matches": {**_I, "default": 5}, "page": {**_I, "default": 1}}, ["file", "query"]),
    _fn("write_file", "Write a text file (parent folders are created; an existing file is replaced).",
        {"file": _S, "content": _S}, ["file", "content"]),
    _fn("edit_file", "Replace the one exact occurrence of `old` in a file by `new`.",
        {"file": _S, "old": _S, "new": _S}, ["file", "old", "new"]),
    _fn("end_task", "End the task (your submission is graded as it is in /home/submission).",
        {"end_message": _S}, ["end_message"]),
]
_SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
READING_TOOLS = ("read_file_chunk", "search_file")


class ToolError(ValueError):
    """A tool call the tool cannot run; its message becomes the observation."""


def coerce_arguments(name: str, args: dict) -> dict:
    """Check a call against its schema; integers may arrive as strings (the compact chat format
    renders every argument with str()). Defaults are filled in."""
    if name not in _SCHEMAS:
        raise ToolError(f"unknown tool {name!r}; the tools are {', '.join(_SCHEMAS)}")
    schema, out = _SCHEMAS[name], {}
    for key in args:
        if key not in schema["properties"]:
            raise ToolError(f"{name}: unknown argument {key!r}; expected {list(schema['properties'])}")
    for key, spec in schema["properties"].items():
        if key not in args:
            if key in schema["required"]:
                raise ToolError(f"{name}: missing argument {key!r}")
            if "default" in spec:
                out[key] = spec["default"]
            continue
        value = args[key]
        if spec["type"] == "integer":
            try:
                value = int(str(value).strip())
            except ValueError:
                raise ToolError(f"{name}: argument {key!r} must be an integer, got {value!r}") from None
        else:
            value = value if isinstance(value, str) else json.dumps(value)
        out[key] = value
    return out


def blacklist_pattern(url: str) -> re.Pattern:
    """A blacklisted URL as a pattern: any scheme, `www.`, `.git`, `host:path` (ssh) or a
    trailing slash match; a longer name (`repo2`) does not."""
    core = re.sub(r"^[a-z+]+://|^git@", "", url.strip(), flags=re.I)
    core = re.sub(r"^www\.", "", core, flags=re.I).rstrip("/").removesuffix(".git")
    host, _, path = core.partition("/")
    body = re.escape(host) + (r"[/:]" + re.escape(path) if path else "")
    return re.compile(r"(?<![\w.-])(?:www\.)?" + body + r"(?![\w-])", re.I)


ACCESS_VERBS = ("git clone", "curl", "wget", "git+", "urlopen", "requests.get", "urllib.request")


def scan_blacklist(messages: list[dict], blacklist: list[str], window: int = 200) -> list[dict]:
    """PaperBench's monitor, after the fact: a blacklisted URL within `window` characters of an
    access verb (git clone, curl, wget, ...) in an action or an observation is a hit.
    Each hit: message_index, url, verb, refused (the action was refused by the tool layer)."""
    patterns = [(u, blacklist_pattern(u)) for u in blacklist]
    refused = {m.get("tool_call_id") for m in messages
               if m.get("role") == "tool" and str(m.get("content", "")).startswith(REFUSED_BLACKLIST)}
    hits = []
    for i, m in enumerate(messages):
        texts = [(str(m.get("content") or ""), None)]
        for call in m.get("tool_calls") or []:
            args = call["function"].get("arguments") or {}
            texts += [(json.dumps(args) if not isinstance(args, str) else args, call.get("id"))]
        for text, call_id in texts:
            low = text.lower()
            for url, pat in patterns:
                for hit in pat.finditer(text):
                    near = low[max(0, hit.start() - window):hit.end() + window]
                    verb = next((v for v in ACCESS_VERBS if v in near), None)
                    if verb:
                        hits.append({"message_index": i, "url": url, "verb": verb,
                                     "refused": call_id is not None and call_id in refused})
    return hits


REFUSED_BLACKLIST = "Refused (blacklist):"


class Toolbox:
    """The tools of one episode, bound to its sandbox and its task's blacklist."""

    def __init__(self, box: Sandbox, blacklist: list[str]):
        self.box = box
        self.blacklist = [(u, blacklist_pattern(u)) for u in blacklist]
        self._n = 0

    def refusal(self, args: dict) -> str | None:
        """A call whose arguments name a blacklisted URL is refused (where we can see it)."""
        text = json.dumps(args)
        for url, pat in self.blacklist:
            if pat.search(text):
                return (f"{REFUSED_BLACKLIST} this call refers to {url}, which is on the task's "
                        f"blacklist ({PAPER_DIR}/blacklist.txt: resources you may not use, such as "
                        f"the paper's official code). Do the work without it.")
        return None

    def run(self, name: str, args: dict, timeout: float) -> str:
        """The observation of one (coerced) call. Sandbox failures propagate (SandboxError);
        everything else the agent did wrong comes back as text."""
        refused = self.refusal(args)
        if refused:
            return refused
        try:
            return getattr(self, f"_{name}")(timeout=timeout, **args)
        except ToolError as e:
            return f"Error: {e}"

    def _observe(self, r: ExecResult, timeout: float) -> str:
        """The output, then a note when it did not simply succeed."""
        lines = [r.output.rstrip("\n")] if r.output.strip() else []
        if r.oom:
            lines.append("[killed: out of memory]")
        elif r.timed_out:
            lines.append(f"[timed out after {timeout:g}s; the command and everything it started "
                         f"were killed]")
        elif r.exit_code:
            lines.append(f"[exit code {r.exit_code}]")
        return "\n".join(lines) or "[no output]"

    def _bash(self, cmd: str, timeout: float, **_) -> str:
        return self._observe(self.box.exec(cmd, timeout, cwd=SUBMISSION), timeout)

    def _python(self, code: str, timeout: float, **_) -> str:
        self._n += 1
        path = f"{self.box.tmp}/klong_python_{self._n}.py"
        self.box.write_file(path, code)
        return self._observe(self.box.exec(f"python3 {path}", timeout, cwd=SUBMISSION), timeout)

    def _text(self, file: str) -> str:
        try:
            return self.box.read_file(file).decode("utf-8", errors="replace")
        except SandboxError as e:
            raise ToolError(str(e)) from None

    def _lines(self, file: str) -> list[str]:
        return self._text(file).splitlines()

    def _read_file_chunk(self, file: str, start_line: int, max_lines: int, **_) -> str:
        lines = self._lines(file)
        if start_line < 1 or max_lines < 1:
            raise ToolError("start_line and max_lines must be ≥ 1")
        if start_line > max(len(lines), 1):
            raise ToolError(f"start_line {start_line} is past the end: the file has {len(lines)} lines")
        chunk = lines[start_line - 1:start_line - 1 + min(max_lines, 50)]
        body = "\n".join(f"{start_line + k}: {line}" for k, line in enumerate(chunk))
        return f"File has {len(lines)} total lines.\n{body}"

    def _search_file(self, file: str, query: str, context_lines: int, max_matches: int,
                     page: int, **_) -> str:
        lines = self._lines(file)
        if not query:
            raise ToolError("query must not be empty")
        hits = [k for k, line in enumerate(lines) if query.lower() in line.lower()]
        if not hits:
            return f"No matches for {query!r} in {file}."
        per, pages = max(1, max_matches), -(-len(hits) // max(1, max_matches))
        if not 1 <= page <= pages:
            raise ToolError(f"page {page} does not exist: {len(hits)} matches in {pages} pages")
        out = [f"Found {len(hits)} matches for {query!r} in {file} (page {page} of {pages})."]
        for k in hits[(page - 1) * per:page * per]:
            lo, hi = max(0, k - context_lines), min(len(lines), k + context_lines + 1)
            out.append("\n".join(f"{j + 1}{'>' if j == k else ':'} {lines[j]}" for j in range(lo, hi)))
        return "\n---\n".join(out)

    def _write(self, file: str, content: str) -> None:
        try:
            self.box.write_file(file, content)
        except SandboxError as e:
            raise ToolError(str(e)) from None

    def _write_file(self, file: str, content: str, **_) -> str:
        self._write(file, content)
        return f"Wrote {len(content.encode())} bytes to {file}."

    def _edit_file(self, file: str, old: str, new: str, **_) -> str:
        text = self._text(file)
        n = text.count(old) if old else 0
        if n != 1:
            raise ToolError(f"`old` must occur exactly once in {file}; it occurs {n} times"
                            + (" (it is empty)" if not old else ""))
        self._write(file, text.replace(old, new))
        return f"Edited {file}: replaced {len(old)} characters by {len(new)}."


# ============================================================================ 2. policies

@dataclass
class PolicyReply:
    """One assistant message; a local policy (or a vLLM / SGLang server) adds the exact tokens it
    sampled (RL needs them)."""
    message: dict
    sample: Sample | None = None
    api_wait_s: float = 0.0     # time spent waiting on retries of a model API (not on the clock)


class Policy(Protocol):
    def act(self, messages: list[dict], tools: list[dict]) -> PolicyReply: ...


class PolicyError(RuntimeError):
    """The policy cannot produce an action (an endpoint down after its retries)."""


class ContextTooLong(PolicyError):
    """The endpoint refused the prompt as longer than its context (HTTP 400): the episode loop
    rebuilds a smaller context and asks once more (_act)."""


def json_tokens(x: object) -> int:
    """Tokens of what is sent as JSON, about 4 characters a token (no tokenizer for an endpoint)."""
    return (len(json.dumps(x)) + 3) // 4


class ScriptedPolicy:
    """A policy given by a function of the (context) messages: the synthetic tasks' expert, tests."""

    def __init__(self, fn: Callable[[list[dict]], dict]):
        self.fn = fn

    def act(self, messages: list[dict], tools: list[dict]) -> PolicyReply:
        return PolicyReply(self.fn(messages))


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class LocalPolicy:
    """A transformers causal LM in chat.py's format, sampled token by token.

    The context is encoded message by message (chat.encode_message, message-additive) plus
    chat.generation_prefix; sampling runs at `temperature` until chat's stop token or
    `max_new_tokens`. **Prompt caching** (the paper's rollout speed-up): the KV cache of the last
    turn is kept; the next context usually extends it (previous context + the action + the new
    observation), so only the new tokens are encoded. The cache is cropped to the longest common
    prefix of the ids it holds and the new context, so when the context builder re-truncates the
    history it is rebuilt from the end of what is shared (at least the pinned prefix p).

    The returned Sample holds the exact context ids, the sampled ids and their log-probs under
    the *sampling* distribution softmax(logits / temperature) (the RL side uses the same
    temperature; temperature 0 = greedy, log-probs then under temperature 1). An unparsable
    reply becomes an assistant message without a tool call (the episode loop then nudges)."""

    def __init__(self, model, tokenizer, temperature: float = 1.0, max_new_tokens: int = 256,
                 version: int = 0, prompt_cache: bool = True, seed: int | None = None):
        import torch
        self.model, self.tokenizer = model.eval(), tokenizer
        self.temperature, self.max_new_tokens = temperature, max_new_tokens
        self.version, self.prompt_cache = version, prompt_cache
        self._replies = OwnReplies(tokenizer)
        self.count_tokens = self._replies.count_tokens
        self._stop = self._replies.stop
        self._cache, self._cached = None, []          # the KV cache and the ids it holds
        self._gen = torch.Generator().manual_seed(seed if seed is not None else
                                                   int.from_bytes(os.urandom(4), "little"))
        self.encoded_tokens = 0                       # tokens run through the model (prefill + decode)

    def _forward(self, ids: list[int]):
        import torch
        out = self.model(input_ids=torch.tensor([ids], device=self.model.device),
                         past_key_values=self._cache, use_cache=True, logits_to_keep=1)
        self.encoded_tokens += len(ids)
        return out.logits[0, -1].float()             # (V,)

    def act(self, messages: list[dict], tools: list[dict]) -> PolicyReply:
        import torch
        from transformers import DynamicCache

        context = self._replies.context(messages)
        keep = _common_prefix(self._cached, context) \
            if self.prompt_cache and self._cache is not None else 0
        keep = min(keep, len(context) - 1)           # the last context token is always fed
        if keep == 0:
            self._cache = DynamicCache(config=self.model.config)
        else:                                         # transformers 5: crop(-n) drops n tokens
            self._cache.crop(keep - self._cache.get_seq_length())
        action, logprobs = [], []
        with torch.no_grad():
            logits = self._forward(context[keep:])
            while True:
                logp = torch.log_softmax(logits / (self.temperature or 1.0), dim=-1)  # log π(·|ctx) at T
                tok = int(logp.argmax()) if self.temperature == 0 else \
                    int(torch.multinomial(logp.exp(), 1, generator=self._gen))
                action.append(tok)
                logprobs.append(float(logp[tok]))
                if tok == self._stop or len(action) == self.max_new_tokens:
                    break
                logits = self._forward([tok])
        self._cached = context + action[:-1]          # the last sampled token is never fed
        return PolicyReply(self._replies.reply(action),
                           Sample(-1, context, action, logprobs, self.version))


class OwnReplies:
    """A local policy's contexts as ids, its own earlier replies kept as the ids it sampled.

    The context is encoded message by message (chat.encode_message) plus chat.generation_prefix;
    this policy's own replies are not re-tokenised but replaced by the ids it sampled, so the next
    context extends this one token for token (the KV cache stays valid, and RL trains on one
    sequence per run of turns, not one per turn: docs/ARCHITECTURE.md 4). Shared by LocalPolicy and
    sampler.py's per-episode policies."""

    def __init__(self, tokenizer):
        import chat
        self.tokenizer = tokenizer
        cache = chat.MessageCache(tokenizer)          # each message encoded once: count and ids
        self.count_tokens = cache.count
        self.prefix = chat.generation_prefix(tokenizer)
        self.stop = chat.stop_token_id(tokenizer)
        self._encode = cache.encode
        self._own: dict[str, list[int]] = {}          # reply key -> header + the ids sampled

    def context(self, messages: list[dict]) -> list[int]:
        """The ids to sample the next reply from (ends with the assistant header)."""
        return [i for m in messages for i in
                (self._own.get(_reply_key(m)) if m["role"] == "assistant" else None)
                or self._encode(m)[0]] + self.prefix

    def reply(self, action: list[int]) -> dict:
        """The assistant message of sampled ids (unparsable: content only, no tool call), kept
        so that later contexts hold it as sampled."""
        import chat
        try:
            message = chat.decode_assistant(self.tokenizer, action)
        except chat.ToolCallParseError:
            message = {"role": "assistant",
                       "content": self.tokenizer.decode(action, skip_special_tokens=True)}
        self._own.setdefault(_reply_key(message), self.prefix + action)
        return message


def _reply_key(m: dict) -> str:
    """An assistant message's content and calls (ids aside), to recognise a policy's own reply."""
    calls = [(c["function"]["name"], c["function"].get("arguments")) for c in m.get("tool_calls") or []]
    return json.dumps([str(m.get("content") or ""), calls], sort_keys=True, default=str)


def _to_openai(m: dict) -> dict:
    """HF chat message -> OpenAI chat-completions message (arguments as a JSON string)."""
    if m["role"] == "assistant":
        out = {"role": "assistant", "content": m.get("content") or ""}
        if m.get("tool_calls"):
            out["tool_calls"] = [{"id": c["id"], "type": "function", "function": {
                "name": c["function"]["name"],
                "arguments": json.dumps(c["function"].get("arguments") or {})}}
                for c in m["tool_calls"]]
        return out
    if m["role"] == "tool":
        return {"role": "tool", "tool_call_id": m.get("tool_call_id", ""), "content": m["content"]}
    return {"role": m["role"], "content": m["content"]}


def _from_openai(msg: dict) -> dict:
    """OpenAI assistant message -> HF chat message; calls with invalid JSON arguments are dropped
    with a note in the content (the episode loop then nudges)."""
    out, notes = {"role": "assistant", "content": msg.get("content") or "", "tool_calls": []}, []
    for k, c in enumerate(msg.get("tool_calls") or []):
        try:
            args = json.loads(c["function"].get("arguments") or "{}")
            if not isinstance(args, dict):
                raise ValueError("not an object")
        except ValueError as e:
            notes.append(f"[tool call {c['function'].get('name')} dropped: arguments are not a "
                         f"JSON object ({e})]")
            continue
        out["tool_calls"].append({"id": c.get("id") or f"call_{k}", "type": "function",
                                  "function": {"name": c["function"]["name"], "arguments": args}})
    out["content"] = "\n".join([out["content"]] + notes).strip() if notes else out["content"]
    if not out["tool_calls"]:
        del out["tool_calls"]
    return out


TOKEN_FORMATS = ("vllm", "sglang")   # servers whose chat completions can carry Samples


def _token_id(token: str) -> int:
    """vLLM's `return_tokens_as_token_ids` spelling of a sampled token: "token_id:N" -> N."""
    if not token.startswith("token_id:"):
        raise ValueError(f"token {token!r} is not of the form token_id:N "
                         "(return_tokens_as_token_ids ignored by the server?)")
    return int(token[len("token_id:"):])


def completion_tokens(raw: dict, flavour: str) -> tuple[list[int] | None, list[int], list[float]]:
    """(prompt ids or None, sampled ids, their log-probs) of one chat completion (the response
    JSON), from the fields each server documents (see OpenAIPolicy). Raises ValueError, naming
    the missing field, when the reply cannot give exact sampled ids and log-probs."""
    choice = raw["choices"][0]
    content = (choice.get("logprobs") or {}).get("content")
    if content is None:
        raise ValueError("choices[0].logprobs.content is missing (the server ignored "
                         "`logprobs: true`)")
    logprobs = [float(c["logprob"]) for c in content]
    ids = choice.get("token_ids")
    if flavour == "vllm" and content:                     # token_id:N, always there with logprobs
        from_logprobs = [_token_id(c["token"]) for c in content]
        if ids is not None and list(ids) != from_logprobs:
            raise ValueError("choices[0].token_ids disagree with the token_id:N of logprobs")
        ids = from_logprobs
    if ids is None:
        raise ValueError("choices[0].token_ids is missing (SGLang answers it to "
                         "`return_token_ids: true` from 2026-07 on)")
    if len(ids) != len(logprobs):
        raise ValueError(f"{len(ids)} sampled ids but {len(logprobs)} log-probs")
    prompt = raw.get("prompt_token_ids") or choice.get("prompt_token_ids")
    return (list(prompt) if prompt else None), [int(i) for i in ids], logprobs


def template_ids(tokenizer, messages: list[dict], tools: list[dict]) -> list[int]:
    """The prompt ids a server builds from `messages` with the model's chat template (the
    fallback when it does not return them): the local tokenizer's template, generation prompt
    added, tool-call arguments as dicts (as vLLM and SGLang pass them to the template)."""
    return list(tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True,
                                              tokenize=True, return_dict=True)["input_ids"])


class OpenAIPolicy:
    """An OpenAI-compatible /v1/chat/completions endpoint (vLLM, SGLang, hosted APIs) with tools,
    through endpoint.ChatEndpoint (the official `openai` client, retries by `tenacity`):
    connection errors, timeouts, 429, 5xx and malformed replies are retried with exponential
    backoff; the time spent in failed attempts and backoff is returned as api_wait_s (off the
    episode clock, as PaperBench does). Other 4xx and exhausted retries raise PolicyError.

    Context (KLong's context-length handling): with `context_len` (the endpoint's window in
    tokens, klong.Config.policy_context_len) the episode loop builds every prompt with split's
    context builder under `self.context`: the window less the tools' schema, with the answer's
    max_tokens kept free, all counted as sent (json_tokens), so no prompt is over-long. An HTTP
    400 about the prompt's length raises ContextTooLong: the loop rebuilds smaller and retries
    once, then ends the episode (context_error, the reason recorded).

    Samples for RL (`tokens="vllm"` or `"sglang"`, issue 19.3): each reply also returns a
    split.Sample (prompt ids, sampled ids, behaviour log-probs, `version`), so PPO's π_old is the
    server's own log-prob of what it sampled. What is asked and read:
    - vLLM (OpenAI server, v0.10.2 or later, vllm-project/vllm PR 22587): `logprobs: true`,
      `top_logprobs: 0`, `return_tokens_as_token_ids: true` (each logprobs.content[i].token is
      "token_id:N", so the sampled ids are exact even for tokens that are not valid UTF-8) and
      `return_token_ids: true` (the response's top-level `prompt_token_ids`, and
      `choices[0].token_ids`, checked against the token_id:N list).
    - SGLang (OpenAI server; sgl-project/sglang PR 30917, 2026-07): `logprobs: true`,
      `top_logprobs: 0`, `return_token_ids: true` (per choice `prompt_token_ids` and
      `token_ids`; its logprobs.content tokens are text, so without `token_ids` there is no
      Sample and the reply fails as a policy error naming the field).
    Where a server returns no prompt ids (vLLM before 0.10.2), the prompt is tokenised here with
    the local `tokenizer`'s chat template (template_ids; `self.prompt_ids` says which was
    used): exact only when the server uses the same template and tokenizer.
    Log-probs are the server's: vLLM's default `--logprobs-mode raw_logprobs` is the
    temperature-1 distribution, so a run at another temperature needs `--logprobs-mode
    processed_logprobs` on the server (RL's log-probs are at klong.Config.temperature).
    The server's own prompt is its re-tokenisation of the messages, not the ids sampled earlier
    (LocalPolicy keeps those): a reply that re-tokenises differently starts a new training
    sequence in grpo.sampled_subtrajectories, still exact, counted as one more R_j.
    When the server parsed no tool call (no tool parser for the model's format) and a
    `tokenizer` is given, the sampled ids are parsed here (chat.decode_assistant)."""

    def __init__(self, url: str, model: str, api_key: str | None = None, temperature: float = 1.0,
                 max_tokens: int | None = None, timeout_s: float = 600.0, retries: int = 6,
                 backoff_s: float = 1.0, max_backoff_s: float = 60.0,
                 context_len: int | None = None, tokens: str | None = None, tokenizer=None,
                 version: int = 0, seed: int | None = None):
        import endpoint
        if tokens is not None and tokens not in TOKEN_FORMATS:
            raise ValueError(f"OpenAIPolicy: tokens {tokens!r}: expected one of {TOKEN_FORMATS}")
        self.context: SplitConfig | None = None
        if context_len:
            reserve = max_tokens or ANSWER_TOKENS
            room = context_len - json_tokens(TOOLS)
            if room <= 2 * reserve:
                raise ValueError(f"OpenAIPolicy: context_len {context_len} leaves {room} tokens "
                                 f"after the tools' schema: too little for answers of {reserve}")
            self.context = SplitConfig(context_len=room, reserve=reserve)
            max_tokens = reserve
        self.endpoint = endpoint.ChatEndpoint(url, model, api_key=api_key, timeout_s=timeout_s,
                                              attempts=retries + 1, backoff_s=backoff_s,
                                              max_backoff_s=max_backoff_s)
        self.url, self.model = self.endpoint.url, model
        self.temperature, self.max_tokens, self.seed = temperature, max_tokens, seed
        self.tokens, self.tokenizer, self.version = tokens, tokenizer, version
        self.prompt_ids = None            # "server" or "local" (template_ids) once a Sample is made
        if tokenizer is not None:         # the context builder counts the model's tokens
            import chat
            self.count_tokens = chat.MessageCache(tokenizer).count
            self.max_new_tokens = max_tokens or 0

    def count_tokens(self, message: dict) -> int:
        """A message's tokens as it is sent (the context builder's count)."""
        return json_tokens(_to_openai(message))

    def _extra_body(self) -> dict | None:
        if self.tokens is None:
            return None
        extra = {"logprobs": True, "top_logprobs": 0, "return_token_ids": True}
        if self.tokens == "vllm":
            extra["return_tokens_as_token_ids"] = True
        return extra

    def act(self, messages: list[dict], tools: list[dict]) -> PolicyReply:
        import endpoint
        try:
            done = self.endpoint.create([_to_openai(m) for m in messages], tools=tools,
                                        max_tokens=self.max_tokens or None,
                                        temperature=self.temperature, seed=self.seed,
                                        extra_body=self._extra_body())
        except endpoint.ContextLengthError as e:
            raise ContextTooLong(f"{self.url}: HTTP 400: {' '.join(e.body.split())[:300]}") from None
        except endpoint.EndpointRequestError as e:
            raise PolicyError(f"{self.url}: HTTP {e.status} (not retried): {e.body[:500]}") from None
        except endpoint.EndpointUnavailable as e:
            raise PolicyError(f"{self.url}: no answer after {self.endpoint.attempts} tries: {e}") \
                from None
        except endpoint.EndpointError as e:
            raise PolicyError(str(e)) from None
        message = _from_openai(done.message)
        if self.tokens is None:
            return PolicyReply(message, api_wait_s=done.wait_s)
        try:
            prompt, action, logprobs = completion_tokens(done.raw, self.tokens)
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise PolicyError(f"{self.url}: no exact tokens in the {self.tokens} reply: "
                              f"{type(e).__name__}: {e}") from None
        if prompt is None:
            if self.tokenizer is None:
                raise PolicyError(f"{self.url}: the reply has no prompt_token_ids and no local "
                                  "tokenizer was given to tokenise the prompt")
            prompt, self.prompt_ids = template_ids(self.tokenizer, messages, tools), "local"
        else:
            self.prompt_ids = "server"
        if not message.get("tool_calls") and self.tokenizer is not None:
            import chat
            try:                          # the server had no tool parser for this format
                parsed = chat.decode_assistant(self.tokenizer, action)
                if parsed.get("tool_calls"):
                    message = parsed
            except chat.ToolCallParseError:
                pass
        return PolicyReply(message, Sample(-1, prompt, action, logprobs, self.version),
                           api_wait_s=done.wait_s)


# ============================================================================ 3. the episode loop

@dataclass
class Budget:
    """An episode's limits (PaperBench: wall clock; the miniature: assistant turns) and guards."""
    max_turns: int | None = None
    """Assistant turns; None = no turn limit."""
    max_seconds: float | None = None
    """Wall-clock seconds, model-API retry time excluded; None = no time limit."""
    min_end_fraction: float = 0.0
    """KLong's guard: end_task is refused before this share of the budget is used."""
    context: SplitConfig | None = None
    """The model's window: contexts are built by split.build_context (None = the whole history)."""
    tool_timeout_s: float = 600.0
    """Cap on one tool call (it is also capped at the time left)."""
    reminder_every: int = 5
    """A time reminder every this many turns (PaperBench: 5); 0 = never."""

    def __post_init__(self):
        if self.max_turns is None and self.max_seconds is None:
            raise ValueError("Budget: set max_turns and/or max_seconds (an episode must end)")
        if not 0.0 <= self.min_end_fraction <= 1.0:
            raise ValueError(f"Budget.min_end_fraction: expected 0..1, got {self.min_end_fraction}")


FAILED = ("sandbox_error", "policy_error", "context_error")


@dataclass
class Episode:
    trajectory: Trajectory
    stop_reason: str            # end_task | max_turns | max_seconds | one of FAILED
    turns: int
    wall_s: float               # episode clock: wall time minus model-API retry time
    submission_dir: Path | None  # host copy of /home/submission (None when the sandbox died)
    tier: str

    @property
    def failed(self) -> bool:
        """docs/ARCHITECTURE.md resolution 6: failed rollouts leave the group, they are not scored 0."""
        return self.stop_reason in FAILED

    @property
    def disqualified(self) -> str:
        """PaperBench's monitor: a blacklisted resource named beside an access verb in an action
        or observation disqualifies the run (score 0); this is the reason, "" when clean. A hit
        whose call the tool layer refused (ours: PaperBench has no refusal) reached nothing and
        does not disqualify; it stays in meta["blacklist_hits"]."""
        hits = [h for h in self.trajectory.meta.get("blacklist_hits", []) if not h["refused"]]
        if not hits:
            return ""
        h = hits[0]
        return (f"blacklist: {h['url']} near `{h['verb']}` in message {h['message_index']}"
                + (f" (and {len(hits) - 1} more hits)" if len(hits) > 1 else ""))


@dataclass
class Scored:
    """An episode's score Q as PaperBench gives it: a disqualified run scores 0 with the reason."""
    score: float
    disqualified: str = ""        # the monitor's reason; "" when the submission was judged
    graded: object = None         # judge.GradedNode of the judged submission (None: disqualified)


def score_episode(ep: Episode, task: Task, grader, **judge_options) -> Scored:
    """Q of a finished, non-failed episode: 0 when disqualified (the grader is not called), else
    judge.grade_submission(task, submission, grader, **judge_options). Raises judge.JudgeFailure
    (no score: the caller drops or retries the rollout, resolution 6) or judge.JudgeAccessError."""
    if ep.disqualified:
        return Scored(0.0, ep.disqualified)
    import judge
    graded = judge.grade_submission(task.dir, ep.submission_dir, grader, **judge_options)
    return Scored(graded.score, "", graded)


SYSTEM_PROMPT = """\
You are an agent working in a Linux sandbox on a long task. Act with one tool call per message:
bash, python, read_file_chunk, search_file, write_file, edit_file, end_task. Observations are cut
to their head and tail: write long outputs to files and search them."""
NUDGE = "You did not call a tool. Continue the task with a tool call (end_task when you are done)."


def rough_count(message: dict) -> int:
    """Token estimate for policies without a tokenizer: about 4 characters a token."""
    return 4 + (len(str(message.get("content") or ""))
                + len(json.dumps(message.get("tool_calls") or []))) // 4


PAPER_PATHS = frozenset({f"{PAPER_DIR}/paper.md"})
READ_PROGRAMS = ("cat", "head", "tail", "nl", "less", "more", "grep", "sed", "wc", "fold")
_SHELL_SYNTAX = re.compile(r"[;&|<>`$(){}\n\\]")


def is_paper_read_command(cmd: str) -> bool:
    """A bash command that only reads the paper: one read-only program (READ_PROGRAMS; sed without
    -i) on a path ending in paper.md, with no shell syntax (no ;, |, &&, redirection, $(...))."""
    if _SHELL_SYNTAX.search(cmd):
        return False
    try:
        words = shlex.split(cmd)
    except ValueError:
        return False
    if not words or words[0] not in READ_PROGRAMS:
        return False
    if words[0] == "sed" and any(w.startswith(("-i", "--in-place")) or
                                 (w.startswith("-") and not w.startswith("--") and "i" in w[1:])
                                 for w in words[1:]):
        return False
    return any(posixpath.basename(w) == "paper.md" for w in words[1:])


class PaperReading:
    """KLong's mandatory paper reading, the one rule for the agent's guard, the factory's expert
    and its simulation. The paper counts as read when every line has been shown by read_file_chunk
    on the paper, or a bash/python observation held the whole paper (e.g. `cat paper.md` when it
    is short enough to be shown whole). Before that, only reading tools run, and bash only for a
    command that just reads the paper (is_paper_read_command); any other call is refused."""

    def __init__(self, paper: str, paths: set[str] | frozenset[str] = PAPER_PATHS):
        self.lines = len(paper.splitlines())
        self.text = clean_output(paper.encode()).strip()
        self.paths, self.seen, self.done = paths, set(), not self.text

    def observe(self, name: str, args: dict, observation: str) -> None:
        """Count what a call that ran showed of the paper."""
        if name == "read_file_chunk" and not observation.startswith(("Error", "Refused")):
            if posixpath.normpath(posixpath.join(SUBMISSION, args["file"])) in self.paths:
                start = args["start_line"]
                self.seen.update(range(start, min(start + min(args["max_lines"], 50), self.lines + 1)))
        elif name in ("bash", "python") and self.text in observation:
            self.seen = set(range(1, self.lines + 1))
        self.done = self.done or len(self.seen) >= self.lines

    def allows(self, name: str, args: dict) -> bool:
        return self.done or name in READING_TOOLS or (name == "bash" and
                                                      is_paper_read_command(args["cmd"]))

    def refusal(self) -> str:
        return (f"Refused: read the paper first. You have read {len(self.seen)} of the "
                f"{self.lines} lines of {PAPER_DIR}/paper.md; the other tools open once it is read "
                f"through (read_file_chunk, 50 lines a call; `cat` if it is short enough to be "
                f"shown whole).")


def paper_was_read(messages: list[dict], paper: str,
                   paths: set[str] | frozenset[str] = PAPER_PATHS) -> bool:
    """PaperReading replayed over a conversation (or a context built from one: the reading is in
    the pinned prefix p): each tool observation is matched to its call by tool_call_id."""
    reading, calls = PaperReading(paper, paths), {}
    for m in messages:   # a call comes before its observation
        calls.update((c.get("id"), c["function"]) for c in m.get("tool_calls") or [])
        call = calls.get(m.get("tool_call_id")) if m.get("role") == "tool" else None
        if call is None:
            continue
        try:
            args = coerce_arguments(call["name"], call.get("arguments") or {})
        except ToolError:
            continue
        reading.observe(call["name"], args, str(m.get("content") or ""))
        if reading.done:   # the reading opens the conversation: stop there
            return True
    return reading.done


ANSWER_TOKENS = 1024   # kept free for an endpoint's answer when its max_tokens is not given
SHRINK = 0.75          # a context the endpoint refused is rebuilt at this share of its size


def _act(policy: Policy, messages: list[dict], prefix_len: int, window_start: int, count,
         window: SplitConfig | None) -> tuple[PolicyReply, SplitConfig | None, int]:
    """One action from the context `window` builds (resolution 4; the whole history without
    one). An endpoint that answers the context is too long (ContextTooLong) is asked once more
    with a window SHRINK times the size it refused, kept for the rest of the episode; a second
    refusal propagates. Returns (reply, window, window_start)."""
    for attempt in (0, 1):
        context = messages
        if window is not None:
            context, window_start = build_context(messages, prefix_len, window_start, count,
                                                  window)
        try:
            return policy.act(context, TOOLS), window, window_start
        except ContextTooLong as e:
            if attempt:
                raise
            sent = sum(count(m) for m in context)
            base = window or SplitConfig(reserve=getattr(policy, "max_tokens", None) or ANSWER_TOKENS)
            window = replace(base, context_len=int(SHRINK * (sent + base.reserve)))
            log.warning("%s; rebuilding the context at %d tokens", e, window.context_len)
    raise AssertionError("unreachable")


def _normalise(message: dict, turn: int) -> dict:
    """An assistant message in the trajectory format: content a string, calls with ids."""
    out = {"role": "assistant", "content": str(message.get("content") or "")}
    calls = []
    for k, c in enumerate(message.get("tool_calls") or []):
        args = c["function"].get("arguments") or {}
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                args = {"_unparsed": args}
        calls.append({"id": c.get("id") or f"call_{turn}_{k}", "type": "function",
                      "function": {"name": c["function"]["name"], "arguments": args}})
    if calls:
        out["tool_calls"] = calls
    return out


def run_episode(policy: Policy, task: "Task | str | Path", budget: Budget, backend: str = "auto",
                submission_out: Path | None = None, system_prompt: str = SYSTEM_PROMPT,
                limits: dict | None = None, allow_unisolated: bool | None = None,
                sandboxes: "SandboxPool | None" = None) -> Episode:
    """One agent episode on `task` in a fresh sandbox (PaperBench's basic agent + KLong's guards):
    opened here (`backend`, `limits`, `allow_unisolated`: open_sandbox's), or taken from
    `sandboxes`, a sandbox_pool.SandboxPool that started it ahead (its own backend and limits).

    Messages: system, user (the instructions), then turns: an assistant message (aᵢ) and its
    observation (sᵢ₊₁: one tool message per call, plus a nudge or a reminder as user messages).
    Before each action, with `budget.context`, the policy gets split.build_context's context
    instead of the whole history (resolution 4). prefix_len = messages up to the observation that
    completed the paper reading (2 if it never was). The submission is copied to the host
    (`submission_out`, else a fresh temporary folder) before the sandbox closes."""
    task = task if isinstance(task, Task) else load_task(task)
    count = getattr(policy, "count_tokens", None) or rough_count
    window = budget.context or getattr(policy, "context", None)   # an endpoint's own window
    if budget.context and getattr(policy, "max_new_tokens", 0) >= budget.context.reserve:
        log.warning("max_new_tokens %d ≥ SplitConfig.reserve %d: a long action may pass L_max",
                    policy.max_new_tokens, budget.context.reserve)
    t0, api_wait, turns = time.monotonic(), 0.0, 0
    clock = (lambda: time.monotonic() - t0 - api_wait)
    stop, error, submission, samples = None, None, None, []
    try:
        box = sandboxes.take(task) if sandboxes is not None else \
            open_sandbox(backend, task=task, allow_unisolated=allow_unisolated, **(limits or {}))
    except SandboxError as e:                 # fails the rollout, not the run (resolution 6)
        meta = {"tier": None, "stop_reason": "sandbox_error", "turns": 0, "wall_s": clock(),
                "error": str(e), "blacklist_hits": []}
        return Episode(Trajectory(uuid.uuid4().hex, task.id, [], 0, meta=meta), "sandbox_error",
                       0, meta["wall_s"], None, "none")
    with box:
        here = (lambda text: text.replace(f"{HOME}/", f"{box.home}/") if box.home != HOME else text)
        messages = [{"role": "system", "content": here(system_prompt)},
                    {"role": "user", "content": here(task.instructions)}]
        prefix_len = window_start = len(messages)
        prefix_done = False
        paper = PaperReading(task.paper, PAPER_PATHS | {f"{box.home}/paper/paper.md"})
        tools = Toolbox(box, task.blacklist)

        def used() -> float:
            return max([turns / budget.max_turns if budget.max_turns else 0.0,
                        clock() / budget.max_seconds if budget.max_seconds else 0.0])

        while stop is None:
            if budget.max_turns is not None and turns >= budget.max_turns:
                stop = "max_turns"
                break
            if budget.max_seconds is not None and clock() >= budget.max_seconds:
                stop = "max_seconds"
                break
            try:
                reply, window, window_start = _act(policy, messages, prefix_len, window_start,
                                                   count, window)
            except ContextTooLong as e:
                stop, error = "context_error", f"the endpoint refused the context twice: {e}"
                break
            except SplitError as e:
                stop, error = "context_error", str(e)
                break
            except Exception as e:  # noqa: BLE001  (any policy failure fails the rollout, not the run)
                stop, error = "policy_error", f"{type(e).__name__}: {e}"
                break
            api_wait += reply.api_wait_s
            message = _normalise(reply.message, turns)
            messages.append(message)
            turns += 1
            if reply.sample is not None:
                reply.sample.message_index = len(messages) - 1
                samples.append(reply.sample)
            if not message.get("tool_calls"):
                messages.append({"role": "user", "content": NUDGE})
            for call in message.get("tool_calls", []):
                name = call["function"]["name"]
                try:
                    args = coerce_arguments(name, call["function"]["arguments"])
                    left = budget.max_seconds - clock() if budget.max_seconds else float("inf")
                    timeout = min(args.pop("timeout", None) or budget.tool_timeout_s,
                                  budget.tool_timeout_s, left)
                    if not paper.allows(name, args):
                        observation = paper.refusal()
                    elif name == "end_task":
                        if used() < budget.min_end_fraction:
                            observation = (f"Refused: end_task is allowed once "
                                           f"{budget.min_end_fraction:.0%} of the budget is used "
                                           f"({used():.0%} so far). Keep improving the submission.")
                        else:
                            observation, stop = "Task ended.", "end_task"
                    elif timeout <= 0:
                        observation, stop = "No time left.", "max_seconds"
                    else:
                        observation = tools.run(name, args, timeout)
                        paper.observe(name, args, observation)
                except ToolError as e:
                    observation = f"Error: {e}"
                except SandboxError as e:
                    observation, stop, error = f"Sandbox error: {e}", "sandbox_error", str(e)
                messages.append({"role": "tool", "tool_call_id": call["id"], "name": name,
                                 "content": observation})
                if paper.done and not prefix_done:    # p ends with the paper reading
                    prefix_len = window_start = len(messages)
                    prefix_done = True
                if stop:
                    break
            if stop is None and budget.reminder_every and turns % budget.reminder_every == 0:
                left_turns = f" of {budget.max_turns}" if budget.max_turns else ""
                left_time = f" of {budget.max_seconds:.0f}s" if budget.max_seconds else ""
                messages.append({"role": "user", "content": (
                    f"Info: {turns}{left_turns} turns and {clock():.0f}s{left_time} used. "
                    f"Remember to git commit your work in {here(SUBMISSION)} regularly.")})
        if box.alive():
            submission = Path(submission_out or tempfile.mkdtemp(prefix="klong-submission-"))
            box.download(SUBMISSION, submission, max_file_bytes=10 << 20)
        tier = box.tier
    meta = {"tier": tier, "stop_reason": stop, "turns": turns, "wall_s": clock(),
            "api_wait_s": api_wait, "paper_read": paper.done, "policy": type(policy).__name__,
            "context_len": window.context_len if window else None,
            "blacklist_hits": scan_blacklist(messages, task.blacklist)}
    if error:
        meta["error"] = error
    trajectory = Trajectory(id=uuid.uuid4().hex, task_id=task.id, messages=messages,
                            prefix_len=prefix_len, meta=meta, samples=samples)
    return Episode(trajectory, stop, turns, meta["wall_s"], submission, tier)
