"""The splitter's invariants (resolutions 1-4 in split.py's docstring) as properties over
generated trajectories, exact hand-made examples that a broken splitter cannot pass, records,
tokenisation and packing.

The deterministic, exact tests come first: tests/test_split_mutants.py runs this file with -x
against deliberately broken splitters, and each must fail here (fast when they fail early)."""
import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import split
from split import SplitConfig, SplitError
from tests.strategies import SPLIT_EXAMPLES, make_trajectory, split_cases, word_count

MARK = re.compile(r"\n\[\.\.\. (\d+) characters omitted \.\.\.\]\n")
invariant = settings(max_examples=SPLIT_EXAMPLES)


def _split(rec, cfg):
    traj = split.trajectory_from_dict(rec)
    return traj, split.split_trajectory(traj, word_count, SplitConfig(**cfg))


def _tokens(messages):
    return sum(word_count(m) for m in messages)


def _turn_of(traj):
    """message index -> turn number (−1 inside p)."""
    out = [-1] * len(traj.messages)
    for t, (a, b) in enumerate(split.turns_of(traj.messages, traj.prefix_len)):
        out[a:b] = [t] * (b - a)
    return out


def _head_tail(text: str, keep: int) -> str:
    """The documented head+tail cut of `text` keeping `keep` characters (written here from the
    format in split.py's docstring, not with the splitter's code)."""
    return (text[:keep - keep // 2] + f"\n[... {len(text) - keep} characters omitted ...]\n"
            + (text[len(text) - keep // 2:] if keep // 2 else ""))


def _kept(orig: str, cut: str) -> int:
    """Characters of `orig` that `cut` still holds (all of them when it is not cut)."""
    m = MARK.search(cut)
    if m is None:
        assert cut == orig, "a kept message was altered without the omission marker"
        return len(orig)
    assert int(m.group(1)) == len(orig) - (len(cut) - len(m.group(0)))
    return len(cut) - len(m.group(0))


def _windows(traj, subs):
    """Per sub-trajectory, the index in its messages where Wᵢ starts. Derived from the sources
    alone: Wᵢ starts at the message after the last one of τ⁽ⁱ⁻¹⁾ (τ⁽¹⁾: after p), because each
    window continues where the previous one ended."""
    out, nxt = [], traj.prefix_len
    for s in subs:
        out.append(next(k for k, j in enumerate(s.source) if j >= nxt and k >= s.prefix_len))
        nxt = max(s.source) + 1
    return out


# ----------------------------------------------------------------------------- exact examples

def _uniform(n_turns: int, prefix: bool = True) -> dict:
    """p = system (6 tokens) + user (3); then n_turns turns: an action "a{t}" (3 tokens) and an
    observation of 20 three-letter words (22 tokens, 79 characters): 25 tokens a turn."""
    obs = " ".join(f"x{k:02d}" for k in range(20))
    msgs = [{"role": "system", "content": "you are an agent"}, {"role": "user", "content": "task"}]
    for t in range(n_turns):
        msgs += [{"role": "assistant", "content": f"a{t}"}, {"role": "tool", "content": obs}]
    return {"id": "u", "task_id": "t", "messages": msgs, "prefix_len": 2 if prefix else 0}


def test_exact_subtrajectories_of_a_uniform_trajectory():
    """Worked by hand (split.py's budgets): L = 200, |p| = 9, B = 191, reserve 30, marker 8
    tokens, overlap 30, history 0.75 → C's share H = 143.
    τ⁽¹⁾: p + turns 0-6 (9 + 7·25 = 184; an 8th turn would make 209).
    τ⁽²⁾ (window from turn 7): V = turns 5, 6 (50 ≥ 30 tokens); older budget 143 − 8 − 50 = 85:
    turn 4 at keep 1.0 (25), turn 3 at 0.5 (39 of 79 characters: 20 tokens), turns 2 and 1 at
    0.25 (19 characters: 16 tokens each), turn 0 no longer fits (85 − 77 = 8 < 16): dropped
    behind the marker. Used 9 + 8 + 77 + 50 = 144, W = turns 7, 8 (194; a third makes 219)."""
    traj, subs = _split(_uniform(12), dict(context_len=200, overlap=30, history=0.75,
                                           keep=(1.0, 0.5, 0.25), reserve=30))
    obs = traj.messages[3]["content"]
    assert [len(s.messages) for s in subs][:2] == [2 + 14, 2 + 1 + 12 + 4]
    assert subs[0].messages == traj.messages[:16]
    assert subs[0].supervised == [m["role"] == "assistant" for m in traj.messages[:16]]
    second = subs[1]
    assert second.messages[2] == {"role": "user", "content": "[... 1 earlier turns omitted ...]"}
    assert second.source == [0, 1, -1] + list(range(4, 20))
    expect_obs = {5: _head_tail(obs, 19), 7: _head_tail(obs, 19), 9: _head_tail(obs, 39)}
    for k, j in enumerate(second.source):
        if j >= 0 and traj.messages[j]["role"] == "tool":
            assert second.messages[k]["content"] == expect_obs.get(j, obs), f"message {j}"
        elif j >= 0:
            assert second.messages[k] == traj.messages[j]
    assert second.supervised == [False] * 15 + [True, False, True, False]
    assert _tokens(second.messages) == 194


def test_exact_overlap_is_supervised_again_only_on_request():
    """supervise_overlap=True trains V's actions (turns 5, 6) again in τ⁽²⁾, and nothing else."""
    traj, subs = _split(_uniform(12), dict(context_len=200, overlap=30, history=0.75,
                                           keep=(1.0, 0.5, 0.25), reserve=30,
                                           supervise_overlap=True))
    sup = [j for j, x in zip(subs[1].source, subs[1].supervised) if x]
    assert sup == [12, 14, 16, 18]           # actions of turns 5, 6 (again) and 7, 8


def test_a_subtrajectory_may_fill_l_max_exactly_but_never_pass_it():
    """L = 9 + 8·25 − 1 = 208: 7 turns make 184 and an eighth 209, one token over."""
    traj, subs = _split(_uniform(30), dict(context_len=208, overlap=30, history=0.25, reserve=30))
    assert len(subs[0].messages) == 2 + 14 and _tokens(subs[0].messages) == 184
    assert all(_tokens(s.messages) <= 208 for s in subs)
    traj, subs = _split(_uniform(30), dict(context_len=209, overlap=30, history=0.25, reserve=30))
    assert _tokens(subs[0].messages) == 209


def test_a_short_observation_is_never_lengthened_by_shortening():
    """The review's case: a 5-token observation at keep 0.5 came out at 13 tokens."""
    short = {"role": "tool", "content": "ok done 3 files"}
    msgs = [{"role": "user", "content": "task"}, {"role": "assistant", "content": "a"}, short]
    sp = split._Splitter(msgs, 1, word_count, SplitConfig(context_len=200, reserve=0))
    for frac in (0.0, 0.1, 0.5, 0.9):
        msg, n = sp.shorten(2, frac)
        assert msg == short and n == word_count(short) == 6


def test_the_live_context_keeps_an_over_long_newest_turn_cut_head_and_tail():
    """The newest observation is 300 words, longer than L: the restarted context still holds
    the newest action verbatim and its observation cut head+tail (the review found both gone)."""
    rec = _uniform(6)
    big = " ".join(f"y{k:03d}" for k in range(300))
    rec["messages"] += [{"role": "assistant", "content": "look"}, {"role": "tool", "content": big}]
    traj = split.trajectory_from_dict(rec)
    cfg = SplitConfig(context_len=200, overlap=30, history=0.25, reserve=30)
    ctx, start = split.build_context(traj.messages, 2, 2, word_count, cfg)
    assert start == len(traj.messages)
    assert ctx[-2] == traj.messages[-2]
    cut = ctx[-1]["content"]
    kept = _kept(big, cut)
    assert 0 < kept < len(big) and cut == _head_tail(big, kept)
    assert _tokens(ctx) + cfg.reserve <= cfg.context_len


def _pair(p_len: int, body: list[int], sup_from: int, index: int) -> split.TokenizedSub:
    ids = list(range(100, 100 + p_len)) + body
    labels = [-100] * (p_len + sup_from) + body[sup_from:]
    return split.TokenizedSub("t", index, ids, labels, p_len)


def test_exact_packing_of_two_subtrajectories_sharing_p():
    """Written out by hand: p = 3 tokens, τ⁽¹⁾ body [1 2 3] (2, 3 supervised), τ⁽²⁾ body [4 5]
    (5 supervised). One row: p once, positions restart at |p| for each segment."""
    a, b = _pair(3, [1, 2, 3], 1, 0), _pair(3, [4, 5], 1, 1)
    packed = split.pack([a, b], 64)
    assert packed.input_ids.tolist() == [[100, 101, 102, 1, 2, 3, 4, 5]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 3, 4]]
    assert packed.seg.tolist() == [[0, 0, 0, 1, 1, 1, 2, 2]]
    assert packed.targets.tolist() == [[-100, -100, -100, 2, 3, -100, 5, -100]]
    allowed = packed.allowed()[0].int().tolist()
    assert allowed[6] == [1, 1, 1, 0, 0, 0, 1, 0]      # τ⁽²⁾ sees p and itself, not τ⁽¹⁾


def test_exact_labels_of_a_tokenized_subtrajectory():
    """tokenize with a hand-made encoder (role id, then one id per word; assistant words
    supervised): the labels are written out, not recomputed with chat.py."""
    ids = {"system": 1, "user": 2, "assistant": 3, "tool": 4}

    def encode(m):
        words = [10 + len(w) for w in str(m.get("content") or "").split()]
        return [ids[m["role"]]] + words, [0] + [int(m["role"] == "assistant")] * len(words)
    sub = split.SubTrajectory("t", 1, [
        {"role": "system", "content": "s"}, {"role": "assistant", "content": "in p"},
        {"role": "assistant", "content": "old act"}, {"role": "tool", "content": "seen"},
        {"role": "assistant", "content": "new"}], [False, False, False, False, True],
        [0, 1, 2, 3, 4], 2)
    tok = split.tokenize(sub, encode)
    assert tok.input_ids == [1, 11, 3, 12, 11, 3, 13, 13, 4, 14, 3, 13]
    assert tok.labels == [-100] * 11 + [13]
    assert tok.prefix_tokens == 5


# ----------------------------------------------------------------------------- properties

@invariant
@given(split_cases())
def test_every_subtrajectory_fits_the_context(case):
    rec, cfg = case
    _, subs = _split(rec, cfg)
    assert all(_tokens(s.messages) <= cfg["context_len"] for s in subs)


@invariant
@given(split_cases())
def test_pinned_prefix_is_the_exact_start_of_every_subtrajectory(case):
    rec, cfg = case
    traj, subs = _split(rec, cfg)
    for s in subs:
        assert s.messages[:traj.prefix_len] == traj.messages[:traj.prefix_len]
        assert s.source[:traj.prefix_len] == list(range(traj.prefix_len))


@invariant
@given(split_cases())
def test_windows_tile_the_trajectory_and_each_action_is_supervised_exactly_once(case):
    """W₁ … W_K cover every message after p once, in order; each action is supervised in its
    window only (== 1), or, with supervise_overlap, also in the overlap after it."""
    rec, cfg = case
    traj, subs = _split(rec, cfg)
    w = _windows(traj, subs)
    tiled = [j for s, k in zip(subs, w) for j in s.source[k:]]
    assert tiled == list(range(traj.prefix_len, len(traj.messages)))
    times = {}
    for s, k0 in zip(subs, w):
        for k, (msg, sup, j) in enumerate(zip(s.messages, s.supervised, s.source)):
            if sup:
                assert msg == traj.messages[j], "a supervised message was altered"
                assert msg["role"] == "assistant"
                times[j] = times.get(j, 0) + 1
                assert k >= k0 or cfg["supervise_overlap"] or s.index == 0 and k < s.prefix_len
    for j in range(traj.prefix_len, len(traj.messages)):
        if traj.messages[j]["role"] == "assistant" and not cfg["supervise_overlap"]:
            assert times.get(j, 0) == 1, f"action {j} supervised {times.get(j, 0)} times"
        elif traj.messages[j]["role"] == "assistant":
            assert times.get(j, 0) >= 1


@invariant
@given(split_cases())
def test_actions_inside_p_are_supervised_in_the_first_subtrajectory_only(case):
    rec, cfg = case
    traj, subs = _split(rec, cfg)
    for s in subs:
        in_p = [sup for sup, m in zip(s.supervised[:traj.prefix_len], s.messages)
                if m["role"] == "assistant"]
        assert all(in_p) if s.index == 0 else not any(in_p)


@invariant
@given(split_cases())
def test_turn_order_is_preserved_and_no_message_appears_twice(case):
    rec, cfg = case
    _, subs = _split(rec, cfg)
    for s in subs:
        src = [j for j in s.source if j >= 0]
        assert src == sorted(set(src))
        assert s.source.count(-1) <= 1 and (-1 not in s.source
                                            or s.source.index(-1) == s.prefix_len)


@invariant
@given(split_cases())
def test_the_context_holds_the_newest_turn_the_overlap_and_a_marker_for_what_it_drops(case):
    """Resolution 2 on every τ⁽ⁱ⁾, i > 1: (1) the turn just before Wᵢ is there with its actions
    verbatim, and supervised again exactly when supervise_overlap; (2) the whole turns just
    before Wᵢ hold ≥ `overlap` tokens, unless the next older one would not fit the room
    min(B − reserve, max(H, 2·overlap)) − marker (split._Splitter) or the newest turn itself had
    to be cut; (3) turns after p missing from the context are exactly the oldest ones, announced
    by one marker that counts them."""
    rec, cfg = case
    traj, subs = _split(rec, cfg)
    turn = _turn_of(traj)
    P, L = traj.prefix_len, cfg["context_len"]
    p_tok = _tokens(traj.messages[:P])
    B = L - p_tok
    H = min(int(cfg["history"] * B), B - cfg["reserve"])
    room = min(B - cfg["reserve"], max(H, 2 * cfg["overlap"])) - word_count(split.omitted_marker(1))
    turns = split.turns_of(traj.messages, P)
    for s, k0 in list(zip(subs, _windows(traj, subs)))[1:]:
        w_turn = turn[s.source[k0]]
        newest = [k for k in range(P, k0) if s.source[k] >= 0 and turn[s.source[k]] == w_turn - 1]
        a, b = turns[w_turn - 1]
        assert [s.source[k] for k in newest] == list(range(a, b)), "the newest turn is missing"
        for k in newest:
            m = traj.messages[s.source[k]]
            if m["role"] == "assistant":
                assert s.messages[k] == m
                assert s.supervised[k] == cfg["supervise_overlap"]
        whole, t, k = 0, w_turn, k0
        newest_cut = any(s.messages[k] != traj.messages[s.source[k]] for k in newest)
        while t > 0 and not newest_cut:
            idx = [x for x in range(P, k) if s.source[x] >= 0 and turn[s.source[x]] == t - 1]
            a, b = turns[t - 1]
            if [s.source[x] for x in idx] != list(range(a, b)) or any(
                    s.messages[x] != traj.messages[s.source[x]] for x in idx):
                break
            whole, t, k = whole + _tokens(traj.messages[a:b]), t - 1, idx[0]
        if not newest_cut and t > 0 and whole < cfg["overlap"]:
            a, b = turns[t - 1]
            assert whole + _tokens(traj.messages[a:b]) > room, "the overlap stopped early"
        kept_turns = sorted({turn[j] for j in s.source[P:k0] if j >= 0})
        assert kept_turns == list(range(kept_turns[0], w_turn))
        if kept_turns[0] > 0:
            assert s.messages[P] == split.omitted_marker(kept_turns[0])
        else:
            assert -1 not in s.source


@invariant
@given(split_cases())
def test_progressive_truncation_invariant(case):
    """split._Splitter.context's invariant, on every example: for sub-trajectories i < i',
    (a) every turn τ⁽ⁱ⁾ drops behind its marker is missing from τ⁽ⁱ'⁾ too; (b) a message in the
    contexts of both keeps no more characters in τ⁽ⁱ'⁾; and within one context (c) a message is
    never longer in tokens than its original, and an observation older than the whole turns
    before Wᵢ keeps at most ⌊keep[age]·len⌋ characters, or all of them when that cut would not be
    shorter in tokens."""
    rec, cfg = case
    traj, subs = _split(rec, cfg)
    turn, P, keep = _turn_of(traj), traj.prefix_len, cfg["keep"]
    w = _windows(traj, subs)
    dropped_before, kept_chars = 0, {}
    for s, k0 in zip(subs, w):
        first = min([turn[j] for j in s.source[P:k0] if j >= 0], default=turn[s.source[k0]])
        assert first >= dropped_before, "a turn dropped earlier came back"
        dropped_before = first if -1 in s.source else dropped_before
        whole_from = turn[s.source[k0]]
        for k in range(k0 - 1, P - 1, -1):
            j = s.source[k]
            if j >= 0 and s.messages[k] != traj.messages[j]:
                whole_from = turn[j] + 1
                break
            if j >= 0:
                whole_from = turn[j]
        for k in range(P, k0):
            j = s.source[k]
            if j < 0:
                continue
            orig, msg = traj.messages[j], s.messages[k]
            assert word_count(msg) <= word_count(orig), "shortening lengthened a message"
            if orig["role"] == "assistant":
                assert msg == orig
                continue
            text = str(orig.get("content") or "")
            kept = _kept(text, str(msg.get("content") or ""))
            assert kept <= kept_chars.get(j, len(text)), f"message {j} got characters back"
            kept_chars[j] = kept
            age = whole_from - 1 - turn[j]
            if age >= 0 and turn[j] < turn[s.source[k0]] - 1:
                frac = keep[min(age, len(keep) - 1)]
                limit = int(frac * len(text))
                cut_longer = word_count({**orig, "content": _head_tail(text, limit)}) >= \
                    word_count(orig)
                assert kept <= limit or (kept == len(text) and cut_longer)


@invariant
@given(split_cases(max_turns=300), st.data())
def test_live_context_keeps_the_newest_turn_and_the_reserve(case, data):
    """Resolution 4 over a random episode: at every step the context fits L_max − reserve, starts
    with p, holds the newest action verbatim and the newest observation whole or cut head+tail,
    and between restarts only grows (so a KV cache stays valid)."""
    rec, cfg = case
    traj = split.trajectory_from_dict(rec)
    c = SplitConfig(**cfg)
    P, start, prev = traj.prefix_len, traj.prefix_len, None
    ends = [e for e in range(P + 2, len(traj.messages) + 1)
            if traj.messages[e - 1]["role"] != "assistant"
            and (e == len(traj.messages) or traj.messages[e]["role"] == "assistant")]
    for end in ends[:data.draw(st.integers(1, 60))]:
        hist = traj.messages[:end]
        ctx, new_start = split.build_context(hist, P, start, word_count, c)
        assert _tokens(ctx) + c.reserve <= c.context_len
        assert ctx[:P] == hist[:P]
        last_action = max(j for j in range(P, end) if hist[j]["role"] == "assistant")
        assert hist[last_action] in ctx
        tail = ctx[len(ctx) - (end - last_action):]
        assert tail[0] == hist[last_action]
        for got, orig in zip(tail[1:], hist[last_action + 1:end]):
            text = str(orig.get("content") or "")
            assert got["content"] == _head_tail(text, _kept(text, got["content"])) \
                or got == orig
        if new_start == start and prev is not None:
            assert ctx[:len(prev)] == prev, "context must only grow between restarts"
        start, prev = new_start, ctx


@invariant
@given(st.text(max_size=400), st.floats(0, 1))
def test_shortening_never_lengthens_arbitrary_text(text, frac):
    """Item 1 with the stand-in counter and with the real tiny tokenizer."""
    import chat
    msgs = [{"role": "user", "content": "task"}, {"role": "assistant", "content": "a"},
            {"role": "tool", "content": text}]
    for count in (word_count, _tiny_count()):
        sp = split._Splitter(msgs, 1, count, SplitConfig(context_len=10_000, reserve=0))
        msg, n = sp.shorten(2, frac)
        assert n == count(msg) <= count(msgs[2])
        assert msg == msgs[2] or _kept(text, msg["content"]) == int(frac * len(text))
    assert chat is not None


_TINY = []


def _tiny_count():
    if not _TINY:
        import chat
        _TINY.append(chat.count_tokens(chat.build_tiny_tokenizer()))
    return _TINY[0]


@given(st.integers(0, 2**31), st.integers(1, 12))
def test_a_trajectory_that_fits_gives_one_subtrajectory_equal_to_itself(seed, n_turns):
    rec = make_trajectory(seed, n_turns, 10, 0.0, 0)
    traj, subs = _split(rec, dict(context_len=100_000))
    assert len(subs) == 1
    assert subs[0].messages == traj.messages
    assert subs[0].supervised == [m["role"] == "assistant" for m in traj.messages]


@given(split_cases(max_turns=300))
def test_splitting_is_deterministic(case):
    rec, cfg = case
    _, a = _split(rec, cfg)
    _, b = _split(json.loads(json.dumps(rec)), cfg)
    assert a == b


def test_too_small_context_is_a_clear_error():
    rec = make_trajectory(0, 10, 200, 0.0, 0)
    with pytest.raises(SplitError, match="context_len|too small"):
        _split(rec, dict(context_len=100))


def test_head_truncation_baseline_is_one_sequence_of_whole_messages():
    rec = make_trajectory(1, 200, 20, 0.0, 0)
    traj, subs = _split(rec, dict(context_len=300, mode="none"))
    assert len(subs) == 1
    n = len(subs[0].messages)
    assert subs[0].messages == traj.messages[:n] and _tokens(subs[0].messages) <= 300
    assert _tokens(traj.messages[:n + 1]) > 300


def test_window_mode_has_no_pinned_prefix_and_slides():
    rec = make_trajectory(2, 200, 20, 0.0, 0)
    traj, subs = _split(rec, dict(context_len=300, mode="window"))
    assert len(subs) > 3
    assert all(s.prefix_len == 0 for s in subs)
    assert subs[-1].messages[0] != traj.messages[0]


# ----------------------------------------------------------------------------- the context builder

def test_live_context_grows_then_restarts_by_the_splitter_rule():
    """Resolution 4: the live context only grows until it would pass L_max − reserve; then it is
    p ⊕ C built exactly as the training C of a window starting at the next action."""
    rec = make_trajectory(3, 120, 30, 0.0, 0)
    traj = split.trajectory_from_dict(rec)
    cfg = SplitConfig(context_len=400, overlap=40, reserve=30)
    start, prev, restarts = traj.prefix_len, None, 0
    for end in range(traj.prefix_len + 2, len(traj.messages)):
        if traj.messages[end]["role"] != "assistant":
            continue
        ctx, new_start = split.build_context(traj.messages[:end], traj.prefix_len, start,
                                             word_count, cfg)
        assert _tokens(ctx) + cfg.reserve <= cfg.context_len
        assert ctx[:traj.prefix_len] == traj.messages[:traj.prefix_len]
        if new_start == start and prev is not None:
            assert ctx[:len(prev)] == prev, "context must only grow between restarts"
        elif prev is not None:
            restarts += 1
            assert new_start == end
        start, prev = new_start, ctx
    assert restarts >= 2


def test_live_context_after_restart_equals_training_context_of_that_window():
    rec = make_trajectory(4, 80, 30, 0.0, 0)
    traj = split.trajectory_from_dict(rec)
    cfg = SplitConfig(context_len=300, overlap=40, reserve=0)
    subs = split.split_trajectory(traj, word_count, cfg)
    assert len(subs) >= 3
    for s, w in list(zip(subs, _windows(traj, subs)))[1:]:
        end = s.source[w]
        ctx, start = split.build_context(traj.messages[:end], traj.prefix_len, end, word_count, cfg)
        assert ctx == s.messages[:w]


# ----------------------------------------------------------------------------- records

def test_jsonl_round_trip(tmp_path):
    trajs = [split.trajectory_from_dict(make_trajectory(i, 5, 5, 0.0, 0, tid=f"t{i}"))
             for i in range(3)]
    trajs[0].samples.append(split.Sample(4, [1, 2], [3], [-0.5], 2))
    path = tmp_path / "t.jsonl"
    split.save_jsonl(path, trajs)
    assert split.load_jsonl(path) == trajs


@pytest.mark.parametrize("line,field", [
    ('{"id": "a", "task_id": "t", "messages": [], "prefix_len": "2"}', "prefix_len"),
    ('{"id": "a", "messages": [], "prefix_len": 0}', "task_id"),
    ('{"id": "a", "task_id": "t", "messages": [{"role": "robot"}], "prefix_len": 0}',
     "messages[0].role"),
    ('{"id": "a", "task_id": "t", "messages": [], "prefix_len": 3}', "prefix_len"),
    ('{"id": "a", "task_id": "t", "messages": [{"role": "assistant", "tool_calls": [{}]}], '
     '"prefix_len": 0}', "tool_calls[0]"),
    ('{"id": "a", ', "not valid JSON"),
])
def test_malformed_record_names_file_line_and_field(tmp_path, line, field):
    path = tmp_path / "bad.jsonl"
    good = json.dumps(make_trajectory(0, 2, 2, 0.0, 0))
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(split.RecordError) as e:
        split.load_jsonl(path)
    assert f"{path}:2" in str(e.value) and field in str(e.value)


def test_stats_cli_reports_counts_tokens_and_duplication(tmp_path, capsys):
    path = tmp_path / "t.jsonl"
    split.save_jsonl(path, [split.trajectory_from_dict(make_trajectory(i, 40, 10, 0.0, 0,
                                                                       tid=f"t{i}")) for i in range(2)])
    assert split.main(["stats", str(path), "--context", "400", "--overlap", "40"]) == 0
    out = capsys.readouterr().out
    assert "sub_trajectories" in out and "duplication" in out and "t1" in out
    assert "2 trajectories: mean K" in out


def test_stats_cli_names_the_bad_line(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": 1}\n')
    assert split.main(["stats", str(path)]) == 2                 # a user error (issue 21.1)
    err = capsys.readouterr().err
    assert f"{path}:1" in err and len(err.strip().splitlines()) == 1


def test_sliding_window_agent_sees_the_start_of_the_episode_like_its_first_training_window():
    """Modes window/none pin nothing, so before the first restart the live context is the whole
    history from the first message (system, instructions, paper reading), as in the first
    training window; it must not start after p (that agent would act blind)."""
    rec = make_trajectory(5, 80, 30, 0.0, 0)
    traj = split.trajectory_from_dict(rec)
    for mode in ("window", "none"):
        cfg = SplitConfig(context_len=300, overlap=40, reserve=0, mode=mode)
        first = split.split_trajectory(traj, word_count, cfg)[0]
        end = traj.prefix_len + 2
        ctx, start = split.build_context(traj.messages[:end], traj.prefix_len, traj.prefix_len,
                                         word_count, cfg)
        assert ctx == traj.messages[:end] and start == 0
        assert first.messages[:end] == ctx


def test_show_writes_a_self_contained_page_with_every_part_and_its_token_counts(tmp_path, capsys):
    """`split.py show FILE --index N` (students): one section per sub-trajectory, headed by its
    token total (= the tiny tokenizer's count of its messages); p, the marker, truncated Cᵢ
    turns and Wᵢ's supervised actions each carry their own colour; nothing is fetched."""
    import chat
    path, out = tmp_path / "t.jsonl", tmp_path / "page.html"
    trajs = [split.trajectory_from_dict(make_trajectory(i, 40, 40, 0.1, 400, tid=f"t{i}"))
             for i in range(2)]
    split.save_jsonl(path, trajs)
    assert split.main(["show", str(path), "--index", "1", "--context", "384", "--overlap", "40",
                       "--out", str(out)]) == 0
    page = out.read_text()
    count = chat.MessageCache(chat.build_tiny_tokenizer()).count
    subs = split.split_trajectory(trajs[1], count, SplitConfig(context_len=384, overlap=40))
    totals = [int(x) for x in re.findall(r"</sup> — (\d+) / 384 tokens", page)]
    assert totals == [sum(count(m) for m in s.messages) for s in subs] and len(subs) >= 3
    for part, (_, colour) in split._PART_STYLE.items():
        assert f"background:{colour}" in page, part
    assert "earlier turns omitted" in page and "characters omitted" in page
    assert "<script" not in page and "src=" not in page and "href=" not in page
    assert split.main(["show", str(path), "--index", "2"]) == 2
    assert "--index 2" in capsys.readouterr().err
