"""Tiny models for a real `transformers serve` in the tests (tests/test_serve.py), and the server
process itself.

Each served model is trained for seconds to give one fixed reply, whatever the prompt:

- the tokenizer is the tiny preset's (chat.build_tiny_tokenizer on synthetic.tokenizer_text(),
  vocabulary 1,024, chat.py's compact template), saved with a `response_template`
  (chat.RESPONSE_TEMPLATE) that tells the server how to read `<|call|>name<|arg|>key<|val|>value` back
  into OpenAI `tool_calls`: without one, `transformers serve` parses tool calls only for
  qwen2/qwen3 models and would drop chat.py's markers from the text;
- the model is a Mistral-style config (the tiny preset is Llama-style) only for its
  `sliding_window`: every token sees the last WINDOW tokens and no further, so a reply token's
  receptive field reaches TAIL = LAYERS × WINDOW tokens back and the reply cannot depend on the
  prompt beyond its tail, at any prompt length (RoPE is relative). Training then needs short rows
  only: a prompt tail of TAIL tokens (windows of the real prompt texts: the agent's, the judge's,
  the evaluation agent's and the tokenizer corpus; random ids; repeated ids) followed by the
  reply, the loss on the reply. Adam at 1e-2 until every reply token is the argmax at a loss <
  TARGET_LOSS: 60-130 steps, ~20 s of one core for the three models (measured). Looser (loss
  0.02) left up to 9 of 15 odd prompts (a long run of one character, say) answered wrongly; at
  TARGET_LOSS all 45 were right;
- the saved generation config decodes greedily (transformers' default, `do_sample=False`), so the
  reply is the same at any requested temperature, and stops at `<|end|>`.

`TransformersServe` runs `transformers serve --device cpu` offline (HF_HUB_OFFLINE=1) on a free
loopback port in its own process group, with no model pinned: a request's `model` field is a
model folder, loaded on first use, so one server answers for every role.
"""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

import agent
import chat
import factory
import judge
import synthetic

WINDOW = 32            # tokens each position attends to (the model's sliding window)
LAYERS = 2
TAIL = LAYERS * WINDOW  # how far back into the prompt a reply token's receptive field reaches
TARGET_LOSS = 2e-3     # mean reply-token cross-entropy at which training may stop
MAX_STEPS = 600        # fails the fixture, rather than serving a model that did not learn

# How `transformers serve` reads a reply in chat.py's compact format: chat.RESPONSE_TEMPLATE,
# which every tokenizer of that format carries (chat.build_tiny_tokenizer, model.load_model).
RESPONSE_TEMPLATE = chat.RESPONSE_TEMPLATE


def _call(name: str, **arguments) -> dict:
    return {"id": name, "type": "function", "function": {"name": name, "arguments": arguments}}


# The agent (policy and factory teacher): read the paper (short enough to be shown whole, so the
# mandatory reading is done), write the submission, end. Relative paths: cwd is the submission.
AGENT_REPLY = {"role": "assistant", "content": "", "tool_calls": [
    _call("bash", cmd="cat ../paper/paper.md"),
    _call("write_file", file="README.md", content="served by transformers"),
    _call("end_task", end_message="done")]}
# The LLM leaf grader: judge.parse_verdict's three sections, a pass.
JUDGE_REPLY = {"role": "assistant", "content":
               "# Expectations\nA README.\n# Reality\nREADME.md is there.\n# Score\n1"}
# The evaluation agent (factory.generate_rubric): a rubric of two Code Development leaves, so
# grading needs no reproduction, and an addendum.
RUBRIC = {"id": "root", "requirements": "The paper is replicated.", "weight": 1,
          "task_category": None, "sub_tasks": [
              {"id": "readme", "requirements": "There is a README.md.", "weight": 1,
               "task_category": "Code Development", "sub_tasks": []},
              {"id": "served", "requirements": "The README says served.", "weight": 2,
               "task_category": "Code Development", "sub_tasks": []}]}
ADDENDUM = "Toy data only."
EVALUATOR_REPLY = {"role": "assistant",
                   "content": json.dumps({"addendum": ADDENDUM, "rubric": RUBRIC})}
REPLIES = {"agent": AGENT_REPLY, "judge": JUDGE_REPLY, "evaluator": EVALUATOR_REPLY}


def tokenizer():
    """The tiny preset's tokenizer (model.tiny_tokenizer with klong's vocab_size 1,024), carrying
    the compact format's response template."""
    tok = chat.build_tiny_tokenizer(synthetic.tokenizer_text(), vocab_size=1024)
    return tok


def prompt_stream(tok) -> list[int]:
    """The ids of real prompt texts one after another, as the chat template renders them."""
    texts = [agent.SYSTEM_PROMPT, agent.NUDGE, judge.SYSTEM_PROMPT, judge.GRADING_REQUEST,
             judge.RANKING_PROMPT, factory.RUBRIC_SYSTEM, *judge.CATEGORY_QUESTIONS.values(),
             *chat.CORPUS.read_text().split("\n\n")]
    roles = ["system", "user", "tool"]
    return chat.encode_messages(tok, [{"role": roles[i % 3], "content": t}
                                      for i, t in enumerate(texts)])[0]


def prompt_tail(stream: list[int], vocab: int, end: int, rng: random.Random) -> list[int]:
    """TAIL ids that end a prompt (the last is <|end|>, as a message ends): a window of the real
    prompt texts (half the rows), random ids, or a short cycle of ids repeated, so that the
    model learns to answer the same after any of them."""
    kind, n = rng.random(), TAIL - 1
    if kind < 0.5:
        s = rng.randrange(len(stream) - n)
        ids = stream[s:s + n]
    elif kind < 0.8:
        ids = [rng.randrange(vocab) for _ in range(n)]
    else:
        cycle = [rng.randrange(vocab) for _ in range(rng.randint(1, 4))]
        ids = (cycle * n)[:n]
    return ids + [end]


def train_reply_model(out: Path, reply: dict, seed: int = 0, batch: int = 8) -> int:
    """Train a tiny sliding-window model to answer `reply` after any prompt tail; save it with
    the tokenizer to `out` (save_pretrained). Returns the steps taken; raises when the reply was
    not learnt within MAX_STEPS."""
    from transformers import MistralConfig, MistralForCausalLM
    tok = tokenizer()
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = MistralForCausalLM(MistralConfig(
        vocab_size=len(tok), hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, sliding_window=WINDOW,
        max_position_embeddings=1 << 20, tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id, eos_token_id=chat.stop_token_id(tok), bos_token_id=None))
    target = chat.encode_message(tok, reply)[0]          # <|assistant|> … <|end|>
    stream, end = prompt_stream(tok), tok.convert_tokens_to_ids(chat.END)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss = float("inf")
    for step in range(1, MAX_STEPS + 1):
        x = torch.tensor([prompt_tail(stream, len(tok), end, rng) + target
                          for _ in range(batch)])         # (B, TAIL + len(target))
        labels = x.clone()
        labels[:, :TAIL + 1] = -100                       # loss on the reply after <|assistant|>
        out_ = model(input_ids=x, labels=labels)
        opt.zero_grad()
        out_.loss.backward()
        opt.step()
        loss = out_.loss.item()
        # greedy decoding gives the reply once every reply token is the argmax (logits at
        # position t predict token t + 1); the loss bound keeps a margin over the runner-up
        exact = bool((out_.logits[:, TAIL:-1].argmax(-1) == x[:, TAIL + 1:]).all())
        if exact and loss < TARGET_LOSS:
            break
    else:
        raise RuntimeError(f"served model {out.name}: loss {loss:.4f} after {MAX_STEPS} steps "
                           f"(expected < {TARGET_LOSS}, every reply token the argmax)")
    model.generation_config.do_sample = False
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return step


def build_models(root: Path) -> dict[str, Path]:
    """One trained model folder per role of REPLIES under `root`."""
    out = {}
    with torch.random.fork_rng():   # the seeds set here stay here
        for k, (role, reply) in enumerate(REPLIES.items()):
            train_reply_model(root / role, reply, seed=k)
            out[role] = root / role
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeError(RuntimeError):
    """`transformers serve` did not start: its exit status and the tail of its output."""


class TransformersServe:
    """`transformers serve` on a free loopback port, offline, CPU, no model pinned. `url` is the
    OpenAI base URL (…/v1). `wait_ready` polls /health; `close` kills the process group."""

    def __init__(self, log_dir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.log = Path(log_dir) / "transformers-serve.log"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "HF_HUB_DISABLE_UPDATE_CHECK": "1",   # the CLI's PyPI version check: no network
               "OMP_NUM_THREADS": "1", "NO_COLOR": "1"}
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "transformers.cli.transformers", "serve", "--device", "cpu",
                 "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True, cwd=tempfile.gettempdir())

    def output(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServeError(f"transformers serve exited with status {self.proc.returncode}:"
                                 f"\n{self.output()}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        raise ServeError(f"transformers serve did not answer /health within {timeout_s:.0f} s:"
                         f"\n{self.output()}")

    def close(self) -> None:
        """SIGKILL to the process group: the server holds nothing to save, and after a SIGTERM
        its idle-unload timers (--model-timeout, 300 s) keep the interpreter alive ~10 s."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
