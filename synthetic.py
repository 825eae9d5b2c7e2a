"""The synthetic extremely-long-horizon tasks of the miniature, their scripted expert, and an exact
simulation of the expert's episodes (docs/MINIATURE.md).

**Synthetic tasks** (docs/MINIATURE.md): the paper states a spec: tag_W, tag_R and M.
Phase 1 writes items 1..M with tag_W (`step w i tag_W`), phase 2 runs items 1..M with tag_R
(`step r i tag_R`), then `end_task`. `step` is a bash script the task ships in /home/paper; it keeps
its state in /home/submission, marks the end of each phase in its observation, and answers a wrong
action with an error that does not advance (and never reveals a tag). tag_R appears in no
observation and in no action before the first RUN: only the pinned prefix p (the paper reading)
holds it, so the right late action depends on the prefix. Rubric leaves carry executable checks
(`"check"`, run with cwd=/home/submission, exit 0 = pass), so the judge is exact offline.
The scripted expert solves the task; `noise` is its rate of random wrong actions; `flaw` is the
probability of a systematic, neutral no-op (`step s`) after each even-numbered item: the headroom
RL removes (docs/MINIATURE.md's third probe). Measured with the tiny tokenizer (chat.py trained on
tokenizer_text()): an action is 12-15 tokens, an observation 5-6, p ~200 (sandbox's system prompt
100 of them), so M = 24-32 gives expert trajectories of ~1,450-2,100 tokens, 4-5.5 × L = 384.
`simulate_distill` computes the expert's trajectories without a sandbox (the environment is
deterministic), message for message equal to the distilled ones (tests/test_factory_sim.py), ~200×
faster: the miniature's data volume (bench/miniature.py). Evaluation and RL always run for real.

The simulation reads the expert's settings from `cfg`, any object with factory.FactoryConfig's
fields (this module never imports factory). `write_task_folder` writes the PaperBench task layout;
factory.py's paper tasks use it too.
"""
from __future__ import annotations

import json
import math
import random
import re
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml
from tqdm import tqdm

import agent
import split

# ---------------------------------------------------------------------------------------------
# Synthetic tasks: the spec, the files of a task folder, the environment script
# ---------------------------------------------------------------------------------------------

TAGS_W = ("red", "blue", "green", "gold", "pink", "gray", "teal", "navy",
          "plum", "rose", "sand", "jade", "ruby", "lime", "mint", "rust")   # 16 phase-1 tags
TAGS_R = ("cat", "dog", "owl", "fox", "elk", "yak", "bee", "ant",
          "cow", "pig", "hen", "eel", "ram", "bat", "emu", "gnu")        # 16 phase-2 tags
STEP = "../paper/step"              # the environment script; bash runs in /home/submission
PAPER = "/home/paper/paper.md"      # read first (mandatory paper reading = the prefix p)
INSTRUCTIONS = f"Read {PAPER} and do what it says.\n"   # short: p is pinned in every window


@dataclass(frozen=True)
class SyntheticSpec:
    """What the paper of one synthetic task states (and the step script enforces)."""
    task_id: str
    tag_w: str      # tag of every phase-1 WRITE
    tag_r: str      # tag of every phase-2 RUN: held only by the prefix
    m: int          # items per phase
    log_words: int = 0   # observation length knob: words of log output after an accepted step


def _log(spec: SyntheticSpec) -> str:
    """The log output an accepted step prints after `w 3 ok` (" log log …"; "" by default)."""
    return "".join(" log" for _ in range(spec.log_words))


def sample_spec(seed: int, index: int, m_range: tuple[int, int], log_words: int = 0
                ) -> SyntheticSpec:
    """Task `index` of the family `seed`: independent of how many tasks are made (resume-safe).
    The size knobs (M's range, the observation length) leave the tags and task ids unchanged."""
    rng = random.Random(f"klong-synthetic-{seed}-{index}")
    return SyntheticSpec(task_id=f"syn-{seed}-{index:05d}", tag_w=rng.choice(TAGS_W),
                         tag_r=rng.choice(TAGS_R), m=rng.randint(*m_range), log_words=log_words)


def paper_text(spec: SyntheticSpec) -> str:
    """paper.md: the whole spec in three lines (read in one read_file_chunk call)."""
    return (f"Phase w: for i = 1..{spec.m} run {STEP} w i {spec.tag_w}\n"
            f"Phase r: for i = 1..{spec.m} run {STEP} r i {spec.tag_r}\n"
            f"Then call end_task.\n")


def step_script(spec: SyntheticSpec) -> str:
    """The environment: bash (starts in milliseconds), state = the files it writes.

    Observations (short on purpose: dense loss): `w 3 ok`, `w 10 ok, phase w done`, `r 3 ok`,
    `r 10 ok, all done`, `w 10 r 4` (status), or `error: …` with exit 1 and no state change;
    `log_words` > 0 appends that many words of log to an accepted step (`w 3 ok log log`).
    State lives in ../submission seen from the script (/home/submission in every sandbox tier).
    """
    log = _log(spec)
    done_w = f'[ "$2" = {spec.m} ] && echo "w $2 ok, phase w done{log}" || echo "w $2 ok{log}"'
    done_r = f'[ "$2" = {spec.m} ] && echo "r $2 ok, all done{log}" || echo "r $2 ok{log}"'
    return f"""#!/bin/bash
# Environment of synthetic task {spec.task_id} (synthetic.py). Usage: step w I TAG | step r I TAG | step s
M={spec.m}; TW={spec.tag_w}; TR={spec.tag_r}
cd "${{0%/*}}/../submission" && {{ [ -d r ] || mkdir -p w r; }} || exit 2
shopt -s nullglob; ws=(w/*); rs=(r/*); nw=${{#ws[@]}}; nr=${{#rs[@]}}
fail() {{ echo "error: $1"; exit 1; }}
case "$1 $#" in
  "s 1") echo "w $nw r $nr";;
  "w 3") [ $nw -lt $M ] || fail "phase w done"
         [ "$2" = $((nw + 1)) ] || fail "next is w $((nw + 1))"
         [ "$3" = "$TW" ] || fail "wrong tag"
         echo "$3" > "w/$2"; {done_w};;
  "r 3") [ $nw -eq $M ] || fail "phase w first"
         [ $nr -lt $M ] || fail "all done"
         [ "$2" = $((nr + 1)) ] || fail "next is r $((nr + 1))"
         [ "$3" = "$TR" ] || fail "wrong tag"
         echo "$3" > "r/$2"; {done_r};;
  *) fail "usage: step w I TAG, step r I TAG, step s";;
esac
"""


def _node_id(task_id: str, path: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"klong:{task_id}:{path}"))


def synthetic_rubric(spec: SyntheticSpec) -> dict:
    """Root = mean of two phases; each phase = mean of M leaves with an executable check."""
    def phase(kind: str, tag: str, category: str) -> dict:
        leaves = [{"id": _node_id(spec.task_id, f"{kind}/{i}"),
                   "requirements": f"File {kind}/{i} holds the tag {tag}.",
                   "weight": 1, "sub_tasks": [], "task_category": category,
                   "finegrained_task_category": "Method Implementation",
                   "check": f"grep -qx {tag} {kind}/{i}"} for i in range(1, spec.m + 1)]
        name = {"w": "Phase w wrote", "r": "Phase r ran"}[kind]
        return {"id": _node_id(spec.task_id, kind), "requirements": f"{name} items 1..{spec.m}.",
                "weight": 1, "sub_tasks": leaves, "task_category": None,
                "finegrained_task_category": None}
    return {"id": _node_id(spec.task_id, ""), "requirements": f"Task {spec.task_id} is done.",
            "weight": 1, "sub_tasks": [phase("w", spec.tag_w, "Code Development"),
                                       phase("r", spec.tag_r, "Code Execution")],
            "task_category": None, "finegrained_task_category": None}


def write_synthetic_task(task_dir: Path, spec: SyntheticSpec) -> Path:
    """Write one synthetic task in PaperBench format, plus the `step` script the agent runs and a
    one-line instructions.txt (sandbox.py's default instructions would cost ~150 tokens of p)."""
    write_task_folder(task_dir, task_id=spec.task_id, title=f"Synthetic two-phase task {spec.task_id}",
                      paper_md=paper_text(spec), rubric=synthetic_rubric(spec),
                      addendum="Synthetic task: no data, no internet, nothing to install.\n",
                      blacklist=None, extra_config={"synthetic": asdict(spec)})
    (task_dir / "instructions.txt").write_text(INSTRUCTIONS)
    script = task_dir / "step"
    script.write_text(step_script(spec))
    script.chmod(0o755)
    return task_dir


def make_synthetic_tasks(out_dir: Path, n: int, seed: int,
                         m_range: tuple[int, int] = (24, 32), log_words: int = 0) -> list[Path]:
    """Tasks 0..n-1 of family `seed` under out_dir/<task_id>/ (another seed: held-out tasks)."""
    out_dir = Path(out_dir)
    return [write_synthetic_task(out_dir / spec.task_id, spec)
            for spec in (sample_spec(seed, i, m_range, log_words) for i in range(n))]


def turns_needed(spec: SyntheticSpec) -> int:
    """Assistant turns a perfect agent needs: read the paper, 2M steps, end_task."""
    return 2 * spec.m + 2


def load_spec(task_dir: Path) -> SyntheticSpec:
    """The spec of a synthetic task folder (its config.yaml); a clear error for other tasks."""
    path = Path(task_dir) / "config.yaml"
    config = yaml.safe_load(path.read_text()) or {}
    if "synthetic" not in config:
        raise ValueError(f"{path}: field 'synthetic' missing; expected a synthetic task made by "
                         f"synthetic.make_synthetic_tasks (the scripted expert solves only those)")
    return SyntheticSpec(**config["synthetic"])


# ---------------------------------------------------------------------------------------------
# The scripted expert (the teacher of the synthetic tasks)
# ---------------------------------------------------------------------------------------------

_OK = re.compile(r"\b([wr]) (\d+) ok\b")
_STATUS = re.compile(r"^w (\d+) r (\d+)$", re.M)          # `step s`: "w 10 r 4"
_NEXT = re.compile(r"\berror: next is ([wr]) (\d+)\b")    # a refused item names the next one


def _call(name: str, arguments: dict, n: int) -> dict:
    return {"role": "assistant", "content": "", "tool_calls": [{
        "id": f"call_{n}", "type": "function", "function": {"name": name, "arguments": arguments}}]}


def _step(kind: str, i: int, tag: str, n: int) -> dict:
    return _call("bash", {"cmd": f"{STEP} {kind} {i} {tag}"}, n)


def expected_action(spec: SyntheticSpec, messages: list[dict]) -> tuple[str, int, str] | None:
    """The next right (kind, item, tag) from the observations so far; None = time to end_task.

    Progress comes from the latest observation that states it: `w i ok` / `r i ok`, the status
    line `w N r M` of `step s`, or `error: next is w i`. Nudges, reminders, refusals and other
    errors never confuse the count, and under context management (a window that no longer holds
    the last `ok`) a status line or a refused item still gives it.
    """
    last = None
    for m in messages:
        if m.get("role") != "tool":
            continue
        text = str(m.get("content") or "")
        if found := _OK.findall(text):
            last = found[-1]
        elif status := _STATUS.search(text):
            nw, nr = int(status[1]), int(status[2])
            last = ("r", str(nr)) if nr > 0 or nw == spec.m else ("w", str(nw))
        elif nxt := _NEXT.search(text):
            last = (nxt[1], str(int(nxt[2]) - 1))
    kind, i = (last[0], int(last[1])) if last else ("w", 0)
    if kind == "w" and i < spec.m:
        return "w", i + 1, spec.tag_w
    if kind == "w" or i < spec.m:
        return "r", (i + 1 if kind == "r" else 1), spec.tag_r
    return None


def _wrong_action(spec: SyntheticSpec, right: tuple[str, int, str], rng: random.Random
                  ) -> tuple[str, int, str]:
    """A random wrong step: the right kind with a wrong tag or a wrong item. It never names the
    other phase's tag, so noise does not leak tag_R into the history before phase 2."""
    kind, i, tag = right
    if rng.random() < 0.5:
        pool = TAGS_W if kind == "w" else TAGS_R
        return kind, i, rng.choice([t for t in pool if t != tag])
    return kind, rng.choice([j for j in range(1, spec.m + 2) if j != i]), tag


def expert_action(spec: SyntheticSpec, messages: list[dict], rng: random.Random,
                  noise: float = 0.0, flaw: float = 0.0) -> dict:
    """The scripted expert's next assistant message given the conversation so far (pure in rng).

    read the paper → `step w 1..M tag_W` → `step r 1..M tag_R` → end_task; with probability
    `noise` a random wrong step instead (the environment refuses it; the expert then retries);
    after the right step of an even-numbered item, with probability `flaw` a neutral `step s`.
    """
    n = sum(m.get("role") == "assistant" for m in messages)
    if not agent.paper_was_read(messages, paper_text(spec)):   # the agent's own rule
        return _call("read_file_chunk", {"file": PAPER}, n)     # lines 1-50 by default
    last = next((m for m in reversed(messages) if m.get("role") == "tool"), None)
    just_done = _OK.findall(str(last.get("content") or "")) if last else []
    if just_done and int(just_done[-1][1]) % 2 == 0 and rng.random() < flaw:
        return _call("bash", {"cmd": f"{STEP} s"}, n)
    right = expected_action(spec, messages)
    if right is None:
        return _call("end_task", {"end_message": "done"}, n)
    if rng.random() < noise:
        return _step(*_wrong_action(spec, right, rng), n)
    return _step(*right, n)


def tokenizer_text(seed: int = 0, n: int = 64) -> str:
    """Representative text of the synthetic tasks, their actions and observations, for training
    the tiny BPE (chat.build_tiny_tokenizer(extra_text=...)): every tag, index, command and
    observation appears often, so each becomes one or a few tokens."""
    lines = ["bash cmd read_file_chunk file start_line max_lines end_task end_message done",
             f"{PAPER} {STEP} s"]
    for i in range(1, 33):
        for kind, pool in (("w", TAGS_W), ("r", TAGS_R)):
            tag = pool[i % len(pool)]
            lines += [f"{STEP} {kind} {i} {tag}", f"{kind} {i} ok", f"error: next is {kind} {i}",
                      f"{kind} {i} ok, phase w done" if kind == "w" else f"r {i} ok, all done",
                      f"w {i} r {i % 7}"]
    lines += ["error: wrong tag", "error: phase w done", "error: phase w first", "error: all done",
              "error: usage: step w I TAG, step r I TAG, step s"]
    for i in range(n):
        lines += paper_text(sample_spec(seed, i, (8, 32))).splitlines()
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Task folders (PaperBench format)
# ---------------------------------------------------------------------------------------------

def write_task_folder(task_dir: Path, task_id: str, title: str, paper_md: str, rubric: dict,
                      addendum: str, blacklist: list[str] | None,
                      extra_config: dict | None = None) -> Path:
    """paper.md, addendum.md, blacklist.txt ("none" when empty), rubric.json, config.yaml."""
    task_dir = Path(task_dir)
    task_dir.mkdir(parents=True, exist_ok=True)
    (task_dir / "paper.md").write_text(paper_md)
    (task_dir / "addendum.md").write_text(addendum)
    (task_dir / "blacklist.txt").write_text("\n".join(blacklist) + "\n" if blacklist else "none\n")
    (task_dir / "rubric.json").write_text(json.dumps(rubric, indent=2) + "\n")
    config = {"id": task_id, "title": title, **(extra_config or {})}
    (task_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return task_dir


def expert_policy(task, noise: float = 0.0, flaw: float = 0.0, seed: int = 0) -> agent.Policy:
    """The scripted teacher of a synthetic task (a sandbox.Task or its folder) as a sandbox policy."""
    spec = load_spec(getattr(task, "dir", task))
    rng = random.Random(f"expert-{spec.task_id}-{seed}")
    return agent.ScriptedPolicy(lambda messages: expert_action(spec, messages, rng, noise, flaw))


# ---------------------------------------------------------------------------------------------
# Exact simulation of the synthetic environment (the miniature's data volume)
# ---------------------------------------------------------------------------------------------
# Distilling one expert trajectory through the sandbox costs ~1.5 s of CPU (a sandbox, ~80 bash
# round trips, the judge's checks); the miniature wants thousands per seed. The synthetic
# environment is deterministic, so it is computed here in Python instead: the step script's
# semantics (step_script), agent.Toolbox's observation format and agent.run_episode's message
# layout, driven by the same expert_action and the same random stream. The result equals the
# sandbox-distilled trajectory message for message (tests/test_factory_sim.py checks it on several
# tasks, seeds and noise/flaw settings). Only the expert's actions are simulated: anything else
# raises ValueError, so the shortcut can never silently differ. Evaluation and RL stay real.

def paper_observation(spec: SyntheticSpec) -> str:
    """read_file_chunk's answer for paper.md (agent.Toolbox._read_file_chunk, lines 1-50)."""
    lines = paper_text(spec).splitlines()
    return f"File has {len(lines)} total lines.\n" + "\n".join(
        f"{k + 1}: {line}" for k, line in enumerate(lines[:50]))


def step_observation(spec: SyntheticSpec, done: dict[str, int], cmd: str) -> str:
    """What `bash` answers to `cmd` (run in /home/submission) given `done` = {"w": items written,
    "r": items run}; updates `done` like the step script updates its files. A refused step
    prints `error: …` and exits 1, which agent.Toolbox._observe shows as `[exit code 1]`."""
    words = cmd.split()
    if not words or words[0] != STEP:
        raise ValueError(f"simulate: only `{STEP} ...` commands are simulated, got {cmd!r}")
    args = words[1:]
    fail = lambda msg: f"error: {msg}\n[exit code 1]"  # noqa: E731
    nw, nr = done["w"], done["r"]
    case = f"{args[0] if args else ''} {len(args)}"            # bash: case "$1 $#"
    if case == "s 1":
        return f"w {nw} r {nr}"
    if case == "w 3":
        if not nw < spec.m:
            return fail("phase w done")
        if args[1] != str(nw + 1):
            return fail(f"next is w {nw + 1}")
        if args[2] != spec.tag_w:
            return fail("wrong tag")
        done["w"] += 1
        return (f"w {args[1]} ok, phase w done" if args[1] == str(spec.m) else f"w {args[1]} ok") \
            + _log(spec)
    if case == "r 3":
        if nw != spec.m:
            return fail("phase w first")
        if not nr < spec.m:
            return fail("all done")
        if args[1] != str(nr + 1):
            return fail(f"next is r {nr + 1}")
        if args[2] != spec.tag_r:
            return fail("wrong tag")
        done["r"] += 1
        return (f"r {args[1]} ok, all done" if args[1] == str(spec.m) else f"r {args[1]} ok") \
            + _log(spec)
    return fail("usage: step w I TAG, step r I TAG, step s")


def simulate_episode(spec: SyntheticSpec, act, max_turns: int) -> split.Trajectory:
    """agent.run_episode of the policy function `act` (messages → assistant message) on the
    synthetic task `spec`, with Budget(max_turns, reminder_every=0) and no context management,
    computed without a sandbox. score = the judge's: each rubric leaf is a file holding the right
    tag, and the step script only writes right tags, so Q = ½·(w done)/M + ½·(r done)/M."""
    messages = [{"role": "system", "content": agent.SYSTEM_PROMPT},
                {"role": "user", "content": INSTRUCTIONS}]
    prefix_len, done, turns, stop, read = len(messages), {"w": 0, "r": 0}, 0, None, False
    reading = agent.PaperReading(paper_text(spec))
    while stop is None:
        if turns >= max_turns:
            stop = "max_turns"
            break
        message = agent._normalise(act(messages), turns)
        messages.append(message)
        turns += 1
        if not message.get("tool_calls"):
            raise ValueError("simulate: a reply without a tool call is not simulated")
        for call in message["tool_calls"]:
            name, args = call["function"]["name"], call["function"]["arguments"]
            if name == "read_file_chunk" and args == {"file": PAPER}:
                observation = paper_observation(spec)
            elif read and name == "bash" and set(args) == {"cmd"}:
                observation = step_observation(spec, done, args["cmd"])
            elif read and name == "end_task":
                observation, stop = "Task ended.", "end_task"
            else:
                raise ValueError(f"simulate: call {name}({args}) is not simulated")
            messages.append({"role": "tool", "tool_call_id": call["id"], "name": name,
                             "content": observation})
            if not read:   # p ends with the paper reading (the agent's rule)
                reading.observe(name, agent.coerce_arguments(name, args), observation)
                read, prefix_len = reading.done, len(messages) if reading.done else prefix_len
            if stop:
                break
    meta = {"stop_reason": stop, "turns": turns, "paper_read": read, "simulated": True}
    return split.Trajectory(id="", task_id=spec.task_id, messages=messages, prefix_len=prefix_len,
                            score=0.5 * done["w"] / spec.m + 0.5 * done["r"] / spec.m, meta=meta)


def simulate_distill(cfg) -> list[split.Trajectory]:
    """run_factory with the scripted expert, simulated: the same synthetic tasks (sample_spec),
    attempts (seeded as make_teacher seeds them), budgets (attempt_budget) and rejection sampling
    (the first best attempt, kept when Q ≥ threshold). Writes out_dir/trajectories.jsonl (the SFT
    stage's input) and returns the kept trajectories. ~200× faster than the sandbox path."""
    if cfg.tasks or cfg.reminder_every or cfg.max_hours:
        raise ValueError("simulate_distill: synthetic tasks only, without reminders or a clock")
    kept = []
    for index in tqdm(range(cfg.n_tasks), desc="factory (simulated)", unit="task",
                      dynamic_ncols=True):
        spec = sample_spec(cfg.seed, index, cfg.m_range, cfg.log_words)
        tries = []
        for attempt in range(cfg.attempts):
            rng = random.Random(f"expert-{spec.task_id}-{cfg.seed * 1000 + attempt}")
            traj = simulate_episode(
                spec, lambda msgs: expert_action(spec, msgs, rng, cfg.noise, cfg.flaw),
                math.ceil(cfg.turn_slack * turns_needed(spec)))
            traj.id = f"{spec.task_id}/{attempt}"
            traj.meta.update({"teacher": "expert", "attempt": attempt})
            tries.append(traj)
        best = max(tries, key=lambda t: t.score)
        if best.score >= cfg.threshold:
            best.meta["scores"] = [t.score for t in tries]
            kept.append(best)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    split.save_jsonl(out / "trajectories.jsonl", kept)
    return kept
