"""Trajectory-splitting SFT (KLong §3.3): records, the splitter, the inference context builder,
tokenisation and packing with a shared prefix.

The paper cuts a trajectory τ = (s₁, a₁, …, s_N, a_N), longer than the context L_max, into K
overlapping sub-trajectories that all start with the pinned prefix p (task + paper reading):

    τ⁽ⁱ⁾ = [ p, s_{t_i}, a_{t_i}, …, s_{t_i+L−1}, a_{t_i+L−1} ]
    L_SFT = − Σ_i Σ_{t ∈ window i} log P_θ(a_t | τ⁽ⁱ⁾_{<t})

Resolutions where the paper is silent (docs/ARCHITECTURE.md; each is repeated where it is coded):
 1. A turn is one assistant message (action aᵢ) plus the tool/user messages after it (observation
    sᵢ₊₁). Splitting never cuts inside a turn; a single observation longer than the budget is cut
    head+tail with a visible marker.
 2. Sub-trajectory i = p ⊕ Cᵢ ⊕ Wᵢ. Wᵢ: the turns supervised in i. Cᵢ: the turns just before Wᵢ
    (at least `overlap` tokens of whole turns: the overlap with i−1; the newest turn always, cut
    head+tail when it alone is over-long), then older turns progressively truncated
    (observations cut more the older they are, by the `keep` schedule; a cut that would not be
    shorter in tokens keeps the observation whole), then whole turns dropped behind one marker
    `[... N earlier turns omitted ...]`. Cᵢ depends on Wᵢ's first turn only. Invariant
    (`_Splitter.context`): for i < i', every turn τ⁽ⁱ⁾ drops is dropped from τ⁽ⁱ'⁾, and a message
    in both contexts keeps no more characters in τ⁽ⁱ'⁾ ("the later, the more of the middle is
    gone").
 3. Loss on the assistant tokens of Wᵢ only: every action is trained exactly once.
    `supervise_overlap=True` gives the paper's literal formula (overlap actions trained twice).
    Actions inside p are supervised once, in sub-trajectory 1.
 4. The same context builder runs at inference (`build_context`), so the policy samples from the
    kind of context it was trained on, and RL trains on exactly the contexts it sampled.

Also here: `mode="none"` (the paper's baseline: one sequence per trajectory, head-truncated to
L_max) and `mode="window"` (sliding windows without the pinned prefix, the miniature's middle
arm), and packing `[p | C₁W₁ | C₂W₂ | …]` with doc/segment ids (docs/ARCHITECTURE.md, "Packing with a
shared prefix"; beyond the paper).

Token counts come from a `count(message) -> int` function and ids from an `encode(message)`
function; for a real tokenizer both come from one chat.MessageCache (`.count`, `.encode`), so
every message is encoded once. Encoding is message-additive (chat.py), so a sub-trajectory's
length is the sum of its messages' counts. Dimension letters: B rows, T tokens per row.
"""
from __future__ import annotations

import bisect
import json
import re
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterable

import torch

Count = Callable[[dict], int]
Encode = Callable[[dict], tuple[list[int], list[int]]]
IGNORE = -100
MIN_CUT = 24          # fewest tokens an observation is cut to (its marker needs ~15)


# ----------------------------------------------------------------------------- records

@dataclass
class Sample:
    """One assistant turn sampled by a local policy: what RL trains on, token for token."""
    message_index: int          # index in Trajectory.messages of the assistant message produced
    context_ids: list[int]      # the exact prompt it was sampled from (ends with the role header)
    action_ids: list[int]       # the sampled ids (end with the stop token unless cut)
    logprobs: list[float]       # behaviour log-probs of action_ids, same length
    policy_version: int = 0


@dataclass
class Trajectory:
    """One agent episode in Hugging Face chat format; `prefix_len` leading messages form p."""
    id: str
    task_id: str
    messages: list[dict]
    prefix_len: int
    score: float | None = None
    meta: dict = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)


@dataclass
class SubTrajectory:
    """τ⁽ⁱ⁾ = p ⊕ Cᵢ ⊕ Wᵢ as messages, with which messages carry loss and where each came from."""
    traj_id: str
    index: int                  # i, from 0
    messages: list[dict]
    supervised: list[bool]      # per message: its assistant tokens are trained on
    source: list[int]           # per message: index in the trajectory (-1 for the omission marker)
    prefix_len: int             # leading messages that are the pinned prefix p (0 without one)


class RecordError(ValueError):
    """A malformed trajectory record or file: one line naming the file, the line and every bad
    field (`load_jsonl` reports every bad line, `trajectory_from_dict` every bad field)."""


_ROLES = {"system", "user", "assistant", "tool"}
MAX_REPORTED = 20     # bad fields/lines listed in one RecordError (the rest are counted)


def _message_problems(messages) -> list[str]:
    if not isinstance(messages, list):
        return ["field 'messages': expected a list of chat messages"]
    bad = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict):
            bad.append(f"field 'messages[{k}]': expected an object, got {type(m).__name__}")
            continue
        role = m.get("role")
        if not isinstance(role, str) or role not in _ROLES:
            bad.append(f"field 'messages[{k}].role': expected one of {sorted(_ROLES)}, got {role!r}")
        if not isinstance(m.get("content", ""), (str, type(None))):
            bad.append(f"field 'messages[{k}].content': expected a string")
        calls = m.get("tool_calls") or []
        if not isinstance(calls, list):
            bad.append(f"field 'messages[{k}].tool_calls': expected a list")
            continue
        for c, call in enumerate(calls):
            if not isinstance(call, dict) or not isinstance(call.get("function"), dict) \
                    or not isinstance(call["function"].get("name"), str):
                bad.append(f"field 'messages[{k}].tool_calls[{c}].function.name': "
                           "expected {'function': {'name': ..., 'arguments': ...}}")
    return bad


def _sample_problems(samples) -> list[str]:
    if not isinstance(samples, list):
        return ["field 'samples': expected a list"]
    bad = []
    for k, s in enumerate(samples):
        if not isinstance(s, dict):
            bad.append(f"field 'samples[{k}]': expected an object")
            continue
        for name in ("message_index", "context_ids", "action_ids", "logprobs"):
            if name not in s:
                bad.append(f"field 'samples[{k}].{name}' is missing")
        for name in ("context_ids", "action_ids"):
            if name in s and not (isinstance(s[name], list) and all(
                    isinstance(x, int) and not isinstance(x, bool) for x in s[name])):
                bad.append(f"field 'samples[{k}].{name}': expected a list of token ids")
        if "logprobs" in s and not (isinstance(s["logprobs"], list) and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in s["logprobs"])):
            bad.append(f"field 'samples[{k}].logprobs': expected a list of numbers")
        for name in ("message_index", "policy_version"):
            if name in s and (not isinstance(s[name], int) or isinstance(s[name], bool)):
                bad.append(f"field 'samples[{k}].{name}': expected int")
        extra = sorted(set(s) - {f.name for f in fields(Sample)})
        if extra:
            bad.append(f"field 'samples[{k}]': unexpected keys {extra}")
    return bad


def _join(where: str, problems: list[str]) -> str:
    more = len(problems) - MAX_REPORTED
    return f"{where}: " + "; ".join(problems[:MAX_REPORTED]) + (f"; and {more} more" if more > 0 else "")


def trajectory_from_dict(d: dict, where: str = "<record>") -> Trajectory:
    """Validate one JSON record (docs/ARCHITECTURE.md "Data on disk") into a Trajectory; a bad
    record raises one RecordError naming every bad field."""
    if not isinstance(d, dict):
        raise RecordError(f"{where}: expected a JSON object, got {type(d).__name__}")
    bad = []
    for name, typ in (("id", str), ("task_id", str), ("prefix_len", int)):
        if name not in d:
            bad.append(f"field '{name}' is missing")
        elif not isinstance(d[name], typ) or isinstance(d[name], bool):
            bad.append(f"field '{name}': expected {typ.__name__}, got {type(d[name]).__name__}")
    if "messages" not in d:
        bad.append("field 'messages' is missing")
    else:
        bad += _message_problems(d["messages"])
    if isinstance(d.get("prefix_len"), int) and isinstance(d.get("messages"), list) \
            and not isinstance(d["prefix_len"], bool) \
            and not 0 <= d["prefix_len"] <= len(d["messages"]):
        bad.append(f"field 'prefix_len': expected 0..{len(d['messages'])}, got {d['prefix_len']}")
    score = d.get("score")
    if score is not None and (not isinstance(score, (int, float)) or isinstance(score, bool)
                              or score != score):
        bad.append("field 'score': expected a number or null")
    if not isinstance(d.get("meta") or {}, dict):
        bad.append("field 'meta': expected an object")
    bad += _sample_problems(d.get("samples") or [])
    if bad:
        raise RecordError(_join(where, bad))
    return Trajectory(id=d["id"], task_id=d["task_id"], messages=d["messages"],
                      prefix_len=d["prefix_len"], score=d.get("score"), meta=d.get("meta") or {},
                      samples=[Sample(**s) for s in d.get("samples") or []])


def read_records(path, parse: Callable[[object, str], object]) -> list:
    """`parse(record, "FILE:LINE")` for each non-blank line of a JSONL file. A missing file, a
    file that is not UTF-8 text, lines that are not JSON and records `parse` rejects (RecordError)
    raise one RecordError naming every bad line (FileNotFoundError, UnicodeDecodeError and
    JSONDecodeError never reach the caller); an empty file raises one too."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise RecordError(f"{path}: no such file (expected JSONL, one record a line)") from None
    except IsADirectoryError:
        raise RecordError(f"{path}: is a folder (expected a JSONL file)") from None
    out, bad = [], []
    for n, line in enumerate(raw.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            out.append(parse(json.loads(line.decode("utf-8")), f"{path}:{n}"))
        except UnicodeDecodeError as e:
            bad.append(f"{path}:{n}: not UTF-8 text (byte {e.start + 1}); is this a binary file?")
        except json.JSONDecodeError as e:
            bad.append(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})")
        except RecursionError:
            bad.append(f"{path}:{n}: not valid JSON (nested too deep)")
        except RecordError as e:
            bad.append(str(e))
        if len(bad) > 2 * MAX_REPORTED and not out:
            break                                          # clearly not this kind of file
    if bad:
        more = len(bad) - MAX_REPORTED
        raise RecordError(" | ".join(bad[:MAX_REPORTED]) + (f" | and {more} more bad lines" if more > 0 else ""))
    if not out:
        raise RecordError(f"{path}: no records (expected JSONL, one record a line)")
    return out


def load_jsonl(path) -> list[Trajectory]:
    """The trajectories of a JSONL file (docs/ARCHITECTURE.md "Data on disk"); a bad file raises
    one RecordError naming every bad line and field (`read_records`)."""
    return read_records(path, trajectory_from_dict)


def save_jsonl(path, trajs: Iterable[Trajectory]) -> None:
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "w") as f:
        for t in trajs:
            f.write(json.dumps(asdict(t)) + "\n")
    tmp.replace(path)        # atomic: a crash never leaves half a file


def append_jsonl(path, traj: Trajectory) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(asdict(traj)) + "\n")
        f.flush()


# ----------------------------------------------------------------------------- the splitter

@dataclass
class SplitConfig:
    """Knobs of the splitter (docs/ARCHITECTURE.md resolutions 1–3) and of the inference context."""
    context_len: int = 512
    """L_max: no sub-trajectory (and no live context) is longer, in tokens."""
    overlap: int = 64
    """Tokens of whole turns before Wᵢ repeated from sub-trajectory i−1 (at least this many)."""
    history: float = 0.25
    """Share of (L_max − |p|) given to Cᵢ: the overlap plus the progressively truncated history."""
    keep: tuple[float, ...] = (1.0, 0.5, 0.25, 0.1)
    """Kept fraction of an older observation by age (0 = newest beyond the overlap); the last
    value holds for all older ones; must not increase. 0 drops the turn."""
    supervise_overlap: bool = False
    """True: overlap actions are trained again in i (the paper's literal sum)."""
    mode: str = "klong"
    """"klong" (pinned p + C + W), "none" (baseline: head truncation, one sequence), "window"
    (sliding windows, no pinned prefix, no history beyond the overlap)."""
    reserve: int = 64
    """Tokens kept free after p ⊕ Cᵢ: for the next action when the live context is (re)built, and
    (the same Cᵢ) at least this much room for Wᵢ in training."""

    def __post_init__(self):
        self.keep = tuple(self.keep)
        if self.mode not in ("klong", "none", "window"):
            raise ValueError(f"SplitConfig.mode: expected klong|none|window, got {self.mode!r}")
        if any(b > a for a, b in zip(self.keep, self.keep[1:])) or not self.keep \
                or not all(0.0 <= k <= 1.0 for k in self.keep):
            raise ValueError(f"SplitConfig.keep: expected a non-increasing schedule in [0, 1], "
                             f"got {self.keep}")
        if self.context_len <= 0 or self.overlap < 0 or not 0 <= self.history <= 1:
            raise ValueError("SplitConfig: context_len > 0, overlap ≥ 0, 0 ≤ history ≤ 1 expected")


class SplitError(ValueError):
    """The trajectory cannot be split under this configuration (e.g. L_max too small)."""


def turns_of(messages: list[dict], start: int) -> list[tuple[int, int]]:
    """Resolution 1: message ranges [a, b) of the turns after `start`; a turn opens with an
    assistant message (an observation-only turn may open the list)."""
    bounds = [j for j in range(start, len(messages)) if messages[j]["role"] == "assistant"]
    if start < len(messages) and (not bounds or bounds[0] != start):
        bounds.insert(0, start)
    return list(zip(bounds, bounds[1:] + [len(messages)]))


def omitted_marker(n_turns: int) -> dict:
    return {"role": "user", "content": f"[... {n_turns} earlier turns omitted ...]"}


def cut_message(message: dict, target: int, count: Count) -> dict:
    """Resolution 1: cut a message's content head+tail so that count(result) ≤ target tokens,
    leaving a visible marker. Never applied to a supervised message."""
    text = str(message.get("content") or "")
    n = len(text)
    keep = n
    for _ in range(64):
        keep = min(keep, n)
        head, tail = keep - keep // 2, keep // 2
        body = text if keep >= n else (
            text[:head] + f"\n[... {n - keep} characters omitted ...]\n" + (text[-tail:] if tail else ""))
        cut = {**message, "content": body}
        have = count(cut)
        if have <= target:
            return cut
        if keep == 0:
            break
        keep = int(keep * max(0.0, min(0.95, (target - 2) / have)))   # shrink by the overshoot
    raise SplitError(f"cannot cut a {message['role']} message to {target} tokens "
                     f"(even the empty cut needs {have})")


_MARKERS: dict[Count, list[int]] = {}


class _Splitter:
    """State for splitting one message list: token counts, turns, cached cuts and contexts.

    Cᵢ is a function of its window's first turn s alone (`context(s)`), so training (every window
    of a trajectory) and inference (`build_context`, one window at a time) build the same Cᵢ.
    The budgets (resolution 2), with B = L_max − |p| and marker(s) = the most tokens a marker
    `[... k earlier turns omitted ...]` with k ≤ s can take:

        H          = min(⌊history·B⌋, B − reserve)                     Cᵢ's share
        room(s)    = min(B − reserve, max(H, 2·overlap)) − marker(s)   the overlap V fits in this
        history(s) = H − marker(s) − |V(s)|                           older turns fit in this

    both non-increasing in s, which is what makes the truncation progressive (see `context`);
    room(s) leaves Wᵢ at least B − max(H, 2·overlap) tokens."""

    def __init__(self, messages: list[dict], prefix_len: int, count: Count, cfg: SplitConfig):
        self.m, self.cfg, self.count = messages, cfg, count
        self.P = prefix_len if cfg.mode == "klong" else 0
        self.n = [count(x) for x in messages]                     # ℓ_j
        self.p_tokens = sum(self.n[:self.P])                      # |p|
        self.turns = turns_of(messages, self.P)
        self.B = cfg.context_len - self.p_tokens                  # budget after p
        if self.B <= 0 or self.B < cfg.reserve:
            raise SplitError(f"pinned prefix p is {self.p_tokens} tokens; L_max = "
                             f"{cfg.context_len} (reserve {cfg.reserve}) leaves no room for a turn: "
                             "raise context_len")
        self.H = min(int(cfg.history * self.B), self.B - cfg.reserve)   # Cᵢ's share of B
        self._cuts: dict[tuple[int, int], dict] = {}                 # (j, target) -> cut
        self._short: dict[tuple[int, float], tuple[dict, int]] = {}  # (j, frac) -> shortened
        self._older: dict[tuple[int, int], tuple[dict, int]] = {}    # (j, age) -> version
        # running max of count(omitted_marker(k)), k = 0, 1, …: shared by the splitters of one
        # counter (build_context makes one per agent step)
        self._markers = _MARKERS.setdefault(count, [0])
        if len(_MARKERS) > 16:
            _MARKERS.pop(next(iter(_MARKERS)))
        self._greedy: dict[int, tuple] = {}
        self._sizes: dict[tuple[int, int], int] = {}
        self._cum = [0]
        for x in self.n:
            self._cum.append(self._cum[-1] + x)
        self._fitted_new: dict[int, list | None] = {}

    # -- cutting one message or one turn

    def cut(self, j: int, target: int) -> tuple[dict, int]:
        if target >= self.n[j]:
            return self.m[j], self.n[j]
        key = (j, target)
        if key not in self._cuts:
            self._cuts[key] = cut_message(self.m[j], target, self.count)
        c = self._cuts[key]
        return c, self.count(c)

    def turn_tokens(self, t: int) -> int:
        a, b = self.turns[t]
        return self._cum[b] - self._cum[a]

    def fit_min(self, t: int) -> int:
        """Fewest tokens turn t can be cut to: its actions whole, observations at MIN_CUT."""
        a, b = self.turns[t]
        return sum(self.n[j] if self.m[j]["role"] == "assistant" else min(self.n[j], MIN_CUT)
                   for j in range(a, b))

    def fitted(self, t: int, room: int) -> list[tuple[int, dict, int]]:
        """Turn t's messages, observations cut head+tail so the turn fits `room` (resolution 1).
        Actions are never cut; observations share the room by water-filling (short ones whole)."""
        a, b = self.turns[t]
        out = [(j, self.m[j], self.n[j]) for j in range(a, b)]
        if sum(x[2] for x in out) <= room:
            return out
        obs = sorted((k for k, (j, _, _) in enumerate(out) if self.m[j]["role"] != "assistant"),
                     key=lambda k: out[k][2])
        share = room - sum(n for j, _, n in out if self.m[j]["role"] == "assistant")
        if share < sum(min(out[k][2], MIN_CUT) for k in obs):
            raise SplitError(
                f"L_max = {self.cfg.context_len} is too small: p ({self.p_tokens} tokens) plus the "
                f"action of turn {t} and its shortest cut observation do not fit")
        for left, k in zip(range(len(obs), 0, -1), obs):
            j, _, n = out[k]
            out[k] = (j, *self.cut(j, min(n, share // left)))
            share -= out[k][2]
        return out

    def shorten(self, j: int, frac: float) -> tuple[dict, int]:
        """Observation j keeping ⌊frac·len⌋ characters head+tail (resolution 2's truncation), or
        whole when that cut would not be shorter in tokens: shortening never lengthens."""
        if frac >= 1:
            return self.m[j], self.n[j]
        key = (j, frac)
        if key not in self._short:
            text = str(self.m[j].get("content") or "")
            keep = int(frac * len(text))
            head, tail = keep - keep // 2, keep // 2
            cut = {**self.m[j], "content": text[:head] + f"\n[... {len(text) - keep} "
                   f"characters omitted ...]\n" + (text[len(text) - tail:] if tail else "")}
            n = self.count(cut)
            self._short[key] = (cut, n) if n < self.n[j] else (self.m[j], self.n[j])
        return self._short[key]

    def marker(self, s: int) -> int:
        """max over k ≤ s of count(omitted_marker(k)): the room C reserves for its marker."""
        if self.cfg.mode != "klong":
            return 0
        while len(self._markers) <= s:
            k = len(self._markers)
            self._markers.append(max(self._markers[-1], self.count(omitted_marker(k))))
        return self._markers[s]

    def room(self, s: int) -> int:
        """room(s): tokens the whole turns of V(s) may take (class docstring)."""
        return min(self.B - self.cfg.reserve, max(self.H, 2 * self.cfg.overlap)) - self.marker(s)

    def newest(self, t: int) -> list[tuple[int, dict, int]] | None:
        """Turn t as the newest turn of C(t+1) when it does not fit whole (None when it does):
        cut head+tail by `fitted`, the rule that cuts an over-long turn in a training window, to
        room(t+1) (at least to its shortest cut, within B − reserve)."""
        if t not in self._fitted_new:
            s = t + 1
            room = self.room(s)
            if self.turn_tokens(t) <= room:
                self._fitted_new[t] = None
            else:
                target = max(room, self.fit_min(t))
                if target > self.B - self.cfg.reserve - self.marker(s):
                    raise SplitError(
                        f"L_max = {self.cfg.context_len} is too small: p ({self.p_tokens} tokens), "
                        f"reserve {self.cfg.reserve} and turn {t} cut to its shortest "
                        f"({self.fit_min(t)} tokens) do not fit")
                self._fitted_new[t] = self.fitted(t, target)
        return self._fitted_new[t]

    def older(self, j: int, t: int, age: int) -> tuple[dict, int]:
        """Observation j (of turn t) at `age` in C: the version keeping the fewest characters of
        those used at ages ≤ age (keep[0..age], and the newest-turn cut when turn t had one). So
        a message never gets back characters a younger C had cut (resolution 2)."""
        key = (j, age)
        if key not in self._older:
            keep = self.cfg.keep
            best = (self.m[j], self.n[j])
            for frac in reversed(keep[:min(age, len(keep) - 1) + 1]):   # smallest fraction first
                cand = self.shorten(j, frac)
                if cand[0] is not self.m[j]:      # a real cut: no larger fraction keeps fewer
                    best = cand
                    break
            try:
                cut = self.newest(t)
            except SplitError:           # C(t+1) cannot be built, so no C held that cut
                cut = None
            if cut is not None:
                cand = next((msg, n) for jj, msg, n in cut if jj == j)
                if _kept_chars(cand[0]) < _kept_chars(best[0]):
                    best = cand
            self._older[key] = best
        return self._older[key]

    # -- Cᵢ

    def _turn_at(self, t: int, age: int) -> list[tuple[int, dict, int]]:
        """Turn t as an older turn of age `age` in C: actions whole, observations by `older`."""
        return [(j, self.m[j], self.n[j]) if self.m[j]["role"] == "assistant"
                else (j, *self.older(j, t, age)) for j in range(*self.turns[t])]

    def _size_at(self, t: int, age: int) -> int:
        """Tokens of `_turn_at(t, age)`, cached (ages past the schedule's end share one size)."""
        key = (t, min(age, len(self.cfg.keep) - 1))
        n = self._sizes.get(key)
        if n is None:
            n = self._sizes[key] = sum(x[2] for x in self._turn_at(t, key[1]))
        return n

    def _greedy_context(self, s: int):
        """C(s) before the progressive-drop rule: (V items, V tokens, v, ages of the older turns
        kept, first kept turn g(s)). V: the fewest whole turns just before s holding ≥ `overlap`
        tokens within room(s), the newest turn always (cut by `newest` when over-long); older
        turns newest first at keep[age], while they fit history(s)."""
        if s in self._greedy:
            return self._greedy[s]
        cfg = self.cfg
        room = self.room(s)
        v, v_tok = s, 0
        cut = self.newest(s - 1)
        if cut is not None:                 # the newest turn always stays, over-long: cut
            v, v_tok = s - 1, sum(x[2] for x in cut)
        while cut is None and v > 0 and (v == s or v_tok < cfg.overlap):
            n = self.turn_tokens(v - 1)
            if v_tok + n > room:
                break
            v, v_tok = v - 1, v_tok + n
        V = list(cut) if cut is not None else [
            (j, self.m[j], self.n[j]) for j in range(self.turns[v][0] if v < s else 0,
                                                       self.turns[s - 1][1] if v < s else 0)]
        older: dict[int, int] = {}          # turn -> its age in C(s)
        t = v - 1
        if cfg.mode == "klong":
            budget = self.H - self.marker(s) - v_tok
            while t >= 0:
                age = v - 1 - t
                if cfg.keep[min(age, len(cfg.keep) - 1)] <= 0:
                    break
                size = self._size_at(t, age)
                if size > budget:
                    break
                older[t], budget, t = age, budget - size, t - 1
        out = (V, v_tok, v, older, t + 1)
        self._greedy[s] = out
        return out

    def context(self, s: int) -> tuple[list[tuple[int, dict, int]], int, int]:
        """Cᵢ for a window starting at turn s: [marker] + older truncated turns + overlap V.
        Returns the items (message index or −1, message, tokens), their tokens, and the first
        message index of V.

        The progressive-truncation invariant (resolution 2), exact for every trajectory and every
        token counter: for s < s', (a) every turn C(s) drops behind the marker is dropped from
        C(s') as well, and (b) a message in both keeps no more characters in C(s') than in C(s).
        (a) holds because C(s) drops the turns before d(s) = max over s'' ≤ s of g(s''), the
        greedy first kept turn (only s'' in (g(s), s) can raise it; d(s) never passes V's start);
        (b) because V's start never moves back (room(s) does not grow) and `older` keeps the
        fewest characters any younger age kept. The paper's "the later the sub-trajectory, the
        more of the middle is gone"."""
        if s == 0:
            return [], 0, self.P
        V, v_tok, v, older, g = self._greedy_context(s)
        d = g
        for x in range(g + 1, s) if self.cfg.mode == "klong" else ():
            try:
                d = max(d, self._greedy_context(x)[4])
            except SplitError:           # a C(x) that cannot be built constrains nothing
                pass
        items = [x for t in sorted(older) if t >= d for x in self._turn_at(t, older[t])] + V
        if self.cfg.mode == "klong" and d > 0:
            items = [(-1, omitted_marker(d), self.count(omitted_marker(d)))] + items
        v_start = self.turns[v][0] if v < s else self.turns[s][0] if s < len(self.turns) \
            else len(self.m)
        return items, sum(x[2] for x in items), v_start

    def subtrajectory(self, traj_id: str, i: int, s: int) -> tuple[SubTrajectory, int]:
        """τ⁽ⁱ⁾ whose window starts at turn s; returns it and the next window's start."""
        cfg, L = self.cfg, self.cfg.context_len
        hist, h_tok, v_start = self.context(s)
        used = self.p_tokens + h_tok
        window, e = [], s
        while e < len(self.turns):
            size = self.turn_tokens(e)
            if used + size > L:
                if e > s:
                    break
                window = self.fitted(e, L - used)      # one over-long turn: cut its observations
                e += 1
                break
            window += [(j, self.m[j], self.n[j]) for j in range(*self.turns[e])]
            used, e = used + size, e + 1
        items = [(j, self.m[j], self.n[j]) for j in range(self.P)] + hist + window
        w0 = self.P + len(hist)                            # first item of Wᵢ
        sup = []
        for k, (j, msg, _) in enumerate(items):
            # resolution 3: Wᵢ's actions; p's actions in τ⁽¹⁾ only; the overlap again on request
            trained = k >= w0 or (i == 0 and k < self.P) or (
                cfg.supervise_overlap and j >= v_start and k >= self.P)
            sup.append(msg["role"] == "assistant" and j >= 0 and trained)
        return SubTrajectory(traj_id=traj_id, index=i, messages=[x[1] for x in items],
                             supervised=sup, source=[x[0] for x in items], prefix_len=self.P), e


_OMITTED = re.compile(r"\n\[\.\.\. (\d+) characters omitted \.\.\.\]\n")


def _kept_chars(message: dict) -> int:
    """Characters of the original content a (possibly cut) message still holds."""
    text = str(message.get("content") or "")
    m = _OMITTED.search(text)
    return len(text) if m is None else len(text) - len(m.group(0))


def split_trajectory(traj: Trajectory, count: Count, cfg: SplitConfig) -> list[SubTrajectory]:
    """Cut τ into K sub-trajectories τ⁽¹⁾…τ⁽ᴷ⁾, each ≤ L_max tokens (resolutions 1–3)."""
    if cfg.mode == "none":
        return [head_truncate(traj, count, cfg.context_len)]
    sp = _Splitter(traj.messages, traj.prefix_len, count, cfg)
    if not sp.turns:        # only p: one sub-trajectory, p's actions supervised
        if sp.p_tokens > cfg.context_len:
            raise SplitError(f"{traj.id}: p is {sp.p_tokens} tokens > L_max {cfg.context_len}")
        return [SubTrajectory(traj.id, 0, list(traj.messages),
                              [m["role"] == "assistant" for m in traj.messages],
                              list(range(len(traj.messages))), sp.P)]
    subs, s = [], 0
    while s < len(sp.turns):
        sub, s = sp.subtrajectory(traj.id, len(subs), s)
        subs.append(sub)
    return subs


def head_truncate(traj: Trajectory, count: Count, context_len: int) -> SubTrajectory:
    """The paper's baseline SFT: one sequence per trajectory, its first L_max tokens (whole
    messages that fit; the first one that does not ends it)."""
    used, keep = 0, 0
    for m in traj.messages:
        n = count(m)
        if used + n > context_len:
            break
        used, keep = used + n, keep + 1
    if keep == 0:
        raise SplitError(f"{traj.id}: the first message alone is longer than L_max {context_len}")
    msgs = traj.messages[:keep]
    return SubTrajectory(traj.id, 0, list(msgs), [m["role"] == "assistant" for m in msgs],
                         list(range(keep)), 0)


def build_context(messages: list[dict], prefix_len: int, window_start: int, count: Count,
                  cfg: SplitConfig) -> tuple[list[dict], int]:
    """Resolution 4: the context an agent acts from, built by the splitter's own rule.

    `messages` is the live history; `window_start` the message index where the current window
    began (start with `prefix_len`). The context p ⊕ C ⊕ messages[window_start:] grows turn by
    turn (so a KV cache stays valid); when it plus `cfg.reserve` would pass L_max, the window
    restarts at the end of the history and C is rebuilt exactly as Cᵢ is in training: it holds
    the newest turn (its action verbatim; an over-long observation cut head+tail by the rule that
    cuts an over-long turn in a training window), and context + reserve ≤ L_max.
    Baseline agents (`mode="none"`) slide a window without p, like `mode="window"`. They have no
    pinned p, so their first window starts at the first message, as the first training window
    does: a `window_start` at or before the end of p means that first window (a restart always
    moves it past p).
    """
    if cfg.mode == "none":
        cfg = SplitConfig(**{**asdict(cfg), "mode": "window"})
    if cfg.mode == "window" and window_start <= prefix_len:
        window_start = 0
    sp = _Splitter(messages, prefix_len, count, cfg)
    starts = [a for a, _ in sp.turns]
    s = bisect.bisect_left(starts, max(window_start, sp.P))
    window_start = starts[s] if s < len(starts) else len(messages)
    hist, h_tok, _ = sp.context(s)
    if sp.p_tokens + h_tok + sum(sp.n[window_start:]) + cfg.reserve > cfg.context_len:
        s, window_start = len(starts), len(messages)       # the window restarts here
        hist, h_tok, _ = sp.context(s)
    ctx = list(messages[:sp.P]) + [x[1] for x in hist] + list(messages[window_start:])
    return ctx, window_start


# ----------------------------------------------------------------------------- tokenisation

@dataclass
class TokenizedSub:
    """A sub-trajectory as ids; labels = ids on supervised assistant tokens, −100 elsewhere."""
    traj_id: str
    index: int
    input_ids: list[int]
    labels: list[int]
    prefix_tokens: int          # |p| in tokens (the shared part when packing)


def tokenize(sub: SubTrajectory, encode: Encode) -> TokenizedSub:
    """ids of p ⊕ Cᵢ ⊕ Wᵢ and labels selecting exactly the supervised assistant tokens."""
    ids, labels, p_tok = [], [], 0
    for k, (msg, sup) in enumerate(zip(sub.messages, sub.supervised)):
        i, mask = encode(msg)
        ids += i
        labels += [t if (sup and m) else IGNORE for t, m in zip(i, mask)]
        if k < sub.prefix_len:
            p_tok += len(i)
    return TokenizedSub(sub.traj_id, sub.index, ids, labels, p_tok)


# ----------------------------------------------------------------------------- packing

@dataclass
class Packed:
    """Rows `[p | C₁W₁ | C₂W₂ | …]` (+ other trajectories), all tensors [B, T].

    targets[b, j] is the token position j must predict (already shifted; −100 = no loss), so a
    segment's first token is never a target of the previous segment's last token.
    """
    input_ids: torch.Tensor
    targets: torch.Tensor
    position_ids: torch.Tensor
    doc: torch.Tensor           # trajectory copy within the row
    seg: torch.Tensor           # 0 = the shared prefix p, k = the k-th segment

    def allowed(self) -> torch.Tensor:
        """Boolean [B, T, T]: k ≤ q and doc[k] = doc[q] and (seg[k] = seg[q] or seg[k] = 0)."""
        T = self.doc.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=self.doc.device).tril()
        same_doc = self.doc[:, :, None] == self.doc[:, None, :]
        seg_ok = (self.seg[:, :, None] == self.seg[:, None, :]) | (self.seg[:, None, :] == 0)
        return causal & same_doc & seg_ok

    def attention_mask(self, dtype=torch.float32) -> torch.Tensor:
        """Additive float mask [B, 1, T, T] (0 / dtype min): the form every HF attention path
        honours (a boolean 4D mask is silently wrong on eager, docs/MACHINE.md)."""
        m = torch.zeros(self.allowed().shape, dtype=dtype, device=self.doc.device)
        return m.masked_fill(~self.allowed(), torch.finfo(dtype).min)[:, None]

    @property
    def n_supervised(self) -> int:
        return int((self.targets != IGNORE).sum())


def _shift(labels: list[int]) -> list[int]:
    """Targets of a sequence: position j predicts token j+1 (the last predicts nothing)."""
    return labels[1:] + [IGNORE]


def pack(subs: list[TokenizedSub], row_len: int, pad_id: int = 0,
         share_prefix: bool = True) -> Packed:
    """Pack tokenized sub-trajectories (in order) into rows of ≤ row_len tokens.

    share_prefix=True: consecutive sub-trajectories of one trajectory share one copy of p per row;
    p gets positions 0…|p|−1 and each segment continues from |p|. p's own targets come from
    sub-trajectory 0, the only one that supervises p's actions (resolution 3). False: every
    sub-trajectory is its own document (padding-free packing, p copied K times).
    """
    rows: list[list[tuple]] = []     # per row: pieces (ids, targets, positions, doc, seg)
    doc = None                       # the open document: [traj_id, row, doc id, next seg, p piece]

    def used(row):
        return sum(len(piece[0]) for piece in row)

    for sub in subs:
        if len(sub.input_ids) > row_len:
            raise SplitError(f"{sub.traj_id}[{sub.index}]: {len(sub.input_ids)} tokens do not "
                             f"fit row_len {row_len}")
        P = sub.prefix_tokens if share_prefix else 0
        if 0 < P < len(sub.labels) and sub.labels[P] != IGNORE:
            raise SplitError(f"{sub.traj_id}[{sub.index}]: the token after p is supervised, so a "
                             "shared p would need several targets")
        body_ids, body_labels = sub.input_ids[P:], sub.labels[P:]
        joins = P > 0 and doc is not None and doc[0] == sub.traj_id and doc[1] == len(rows) - 1 \
            and used(rows[-1]) + len(body_ids) <= row_len
        if not joins:
            if not rows or used(rows[-1]) + len(sub.input_ids) > row_len:
                rows.append([])
            doc = [sub.traj_id, len(rows) - 1, len({pc[3] for pc in rows[-1]}) + 1, 1, None]
            if P:
                rows[-1].append((sub.input_ids[:P], [IGNORE] * P, list(range(P)), doc[2], 0))
                doc[4] = len(rows[-1]) - 1
        if P and sub.index == 0:     # resolution 3: p's actions are trained in τ⁽¹⁾ only
            ids, _, pos, d, s = rows[-1][doc[4]]
            rows[-1][doc[4]] = (ids, _shift(sub.labels[:P]), pos, d, s)
        rows[-1].append((body_ids, _shift(body_labels), list(range(P, P + len(body_ids))),
                         doc[2], doc[3] if P else 0))
        doc[3] += 1
    T = max(used(r) for r in rows)
    B = len(rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)                 # (B, T)
    tgt = torch.full((B, T), IGNORE, dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    doc_t = torch.zeros((B, T), dtype=torch.long)
    seg = torch.zeros((B, T), dtype=torch.long)
    for b, row in enumerate(rows):
        j = 0
        for x_ids, x_tgt, x_pos, x_doc, x_seg in row:
            n = len(x_ids)
            ids[b, j:j + n], tgt[b, j:j + n] = torch.tensor(x_ids), torch.tensor(x_tgt)
            pos[b, j:j + n] = torch.tensor(x_pos)
            doc_t[b, j:j + n], seg[b, j:j + n] = x_doc, x_seg
            j += n
        doc_t[b, j:] = torch.arange(T - j) + 1_000_000      # padding: each token its own doc
    return Packed(ids, tgt, pos, doc_t, seg)


# ----------------------------------------------------------------------------- stats CLI

def stats(trajs: list[Trajectory], count: Count, cfg: SplitConfig, encode: Encode) -> list[dict]:
    """Per trajectory: K, original and split token totals, supervised fraction, duplication."""
    rows = []
    for t in trajs:
        subs = split_trajectory(t, count, cfg)
        tok = [tokenize(s, encode) for s in subs]
        total = sum(len(x.input_ids) for x in tok)
        sup = sum(sum(1 for y in x.labels if y != IGNORE) for x in tok)
        orig = sum(count(m) for m in t.messages)
        rows.append({"id": t.id, "turns": len(turns_of(t.messages, t.prefix_len)),
                     "sub_trajectories": len(subs), "tokens": orig, "split_tokens": total,
                     "supervised_fraction": round(sup / max(total, 1), 4),
                     "duplication": round(total / max(orig, 1), 3)})
    return rows


# ----------------------------------------------------------------------------- show (students)

_PART_STYLE = {               # part -> (label, background colour)
    "p": ("p: pinned prefix", "#dbe9ff"),
    "marker": ("omission marker", "#d9d9d9"),
    "c_cut": ("Cᵢ: older turn, truncated", "#ffe3c2"),
    "c_whole": ("Cᵢ: context turn, whole (overlap)", "#fff6cc"),
    "w_action": ("Wᵢ: supervised action", "#c8f0c8"),
    "w_obs": ("Wᵢ: observation (no loss)", "#eef8ee"),
}


_PART_SHORT = {"p": "p", "marker": "marker", "c_cut": "Cᵢ truncated", "c_whole": "Cᵢ whole",
               "w_action": "Wᵢ actions", "w_obs": "Wᵢ observations"}


def _part_of(traj: Trajectory, sub: SubTrajectory, k: int, w0: int) -> str:
    j = sub.source[k]
    if k < sub.prefix_len:
        return "p"
    if j < 0:
        return "marker"
    if k < w0:
        return "c_whole" if sub.messages[k] == traj.messages[j] else "c_cut"
    return "w_action" if sub.supervised[k] else "w_obs"


def render_html(traj: Trajectory, subs: list[SubTrajectory], count: Count,
                cfg: SplitConfig) -> str:
    """A self-contained HTML page (inline CSS, no scripts) showing τ⁽¹⁾…τ⁽ᴷ⁾ of one trajectory:
    every message coloured by its part (p, the marker, Cᵢ truncated / whole, Wᵢ's supervised
    actions and its observations), a supervised action outside Wᵢ outlined, per-part token
    counts for each sub-trajectory. Wᵢ starts after the last message of τ⁽ⁱ⁻¹⁾."""
    from html import escape
    rows, nxt = [], traj.prefix_len
    legend = "".join(f'<span class="chip" style="background:{c}">{escape(name)}</span>'
                     for name, c in _PART_STYLE.values())
    for sub in subs:
        w0 = next((k for k, j in enumerate(sub.source) if j >= nxt and k >= sub.prefix_len),
                  len(sub.messages))
        nxt = max(sub.source) + 1
        tokens = {part: 0 for part in _PART_STYLE}
        cells = []
        for k, m in enumerate(sub.messages):
            part = _part_of(traj, sub, k, w0)
            n = count(m)
            tokens[part] += n
            j = sub.source[k]
            text = str(m.get("content") or "")
            for call in m.get("tool_calls") or []:
                args = call["function"].get("arguments") or {}
                text += f"\n→ {call['function']['name']}({json.dumps(args)})"
            extra = " trained" if sub.supervised[k] and part != "w_action" else ""
            cells.append(
                f'<div class="msg{extra}" style="background:{_PART_STYLE[part][1]}">'
                f'<div class="meta">{escape(m["role"])} · message {j if j >= 0 else "—"} · '
                f'{n} tokens{" · supervised" if sub.supervised[k] else ""}</div>'
                f'<pre>{escape(text)}</pre></div>')
        total = sum(tokens.values())
        counts = " · ".join(f'<span class="chip" style="background:{_PART_STYLE[p][1]}">'
                            f"{escape(_PART_SHORT[p])} {n}</span>"
                            for p, n in tokens.items() if n)
        rows.append(f'<section><h2>τ<sup>({sub.index + 1})</sup> — {total} / {cfg.context_len} '
                    f'tokens</h2><p class="counts">{counts}</p>{"".join(cells)}</section>')
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>split: {escape(traj.id)}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; }}
section {{ border-top: 2px solid #888; margin-top: 18px; padding-top: 6px; }}
.msg {{ border-radius: 6px; margin: 4px 0; padding: 4px 8px; }}
.msg.trained {{ outline: 2px solid #2a8f2a; }}
.meta {{ font-size: 12px; color: #555; }}
pre {{ margin: 2px 0 0; white-space: pre-wrap; word-break: break-word; font-size: 12px; }}
.chip {{ display: inline-block; border-radius: 4px; padding: 1px 6px; margin: 2px; }}
</style></head><body>
<h1>{escape(traj.id)}: {len(traj.messages)} messages → K = {len(subs)} sub-trajectories</h1>
<p>L_max = {cfg.context_len}, overlap {cfg.overlap}, history {cfg.history}, keep {list(cfg.keep)},
reserve {cfg.reserve}, supervise_overlap {cfg.supervise_overlap}, mode {escape(cfg.mode)}.
KLong §3.3: τ⁽ⁱ⁾ = p ⊕ Cᵢ ⊕ Wᵢ; the loss is on Wᵢ's actions (split.py, resolutions 1–3).</p>
<p>{legend}</p>
{"".join(rows)}
</body></html>
"""


def main(argv=None) -> int:
    """`split.py stats FILE` / `split.py show FILE --index N`; bad input is one line on stderr
    and exit 2 (cli.run)."""
    from cli import run
    return run(_main, argv, user_errors=(RecordError, SplitError), prog="split.py")


def _main(argv) -> int:
    from cli import Parser
    ap = Parser(prog="split.py", description="Inspect trajectory splitting (KLong §3.3).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("stats", help="per-trajectory sub-trajectory counts, token totals, "
                                      "supervised fraction and duplication overhead")
    sh = sub.add_parser("show", help="one trajectory's sub-trajectories as a self-contained HTML "
                                     "page: p, Cᵢ (truncated turns, marker), Wᵢ, token counts")
    sh.add_argument("--index", type=int, default=0, help="which trajectory of the file (from 0)")
    sh.add_argument("--out", default=None, help="HTML file to write (default: FILE.N.html)")
    for x in (st, sh):
        x.add_argument("file", help="trajectories JSONL (docs/ARCHITECTURE.md format)")
        x.add_argument("--context", type=int, default=SplitConfig.context_len,
                       help="L_max in tokens")
        x.add_argument("--overlap", type=int, default=SplitConfig.overlap, help="overlap tokens")
        x.add_argument("--history", type=float, default=SplitConfig.history,
                       help="share of L_max − |p| for the truncated history Cᵢ")
        x.add_argument("--reserve", type=int, default=SplitConfig.reserve,
                       help="tokens kept free after p ⊕ Cᵢ")
        x.add_argument("--mode", default="klong", choices=["klong", "none", "window"])
        x.add_argument("--tokenizer", default=None,
                       help="a saved tokenizer folder (e.g. a checkpoint); default: the tiny one")
    a = ap.parse_args(argv)
    import chat
    if a.tokenizer:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(a.tokenizer)
    else:
        tok = chat.build_tiny_tokenizer()
    cfg = SplitConfig(context_len=a.context, overlap=a.overlap, history=a.history, mode=a.mode,
                      reserve=a.reserve)
    trajs = load_jsonl(a.file)
    cache = chat.MessageCache(tok)
    if a.cmd == "show":
        if not 0 <= a.index < len(trajs):
            raise RecordError(f"{a.file}: --index {a.index}: expected 0..{len(trajs) - 1}")
        t = trajs[a.index]
        out = Path(a.out or f"{a.file}.{a.index}.html")
        out.write_text(render_html(t, split_trajectory(t, cache.count, cfg), cache.count, cfg))
        print(f"wrote {out}")
        return 0
    rows = stats(trajs, cache.count, cfg, cache.encode)
    cols = list(rows[0]) if rows else []
    print("  ".join(f"{c:>20}" for c in cols))
    for r in rows:
        print("  ".join(f"{str(r[c]):>20}" for c in cols))
    if rows:
        n = len(rows)
        print(f"{n} trajectories: mean K {sum(r['sub_trajectories'] for r in rows) / n:.2f}, "
              f"mean duplication {sum(r['duplication'] for r in rows) / n:.3f}, "
              f"supervised fraction {sum(r['supervised_fraction'] for r in rows) / n:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
