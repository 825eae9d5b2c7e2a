"""The splitter's invariants (ARCHITECTURE.md resolutions 1-4) as properties over generated
trajectories, plus records, tokenisation and packing."""
import json
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

import split
from split import SplitConfig, SplitError, Trajectory
from tests.strategies import make_trajectory, split_cases, word_count

MARK = re.compile(r"\[\.\.\. (\d+) characters omitted \.\.\.\]")


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


@given(split_cases())
def test_every_subtrajectory_fits_the_context(case):
    rec, cfg = case
    _, subs = _split(rec, cfg)
    assert all(_tokens(s.messages) <= cfg["context_len"] for s in subs)


@given(split_cases())
def test_pinned_prefix_is_the_exact_start_of_every_subtrajectory(case):
    rec, cfg = case
    traj, subs = _split(rec, cfg)
    for s in subs:
        assert s.messages[:traj.prefix_len] == traj.messages[:traj.prefix_len]
        assert s.source[:traj.prefix_len] == list(range(traj.prefix_len))


@given(split_cases())
def test_each_action_after_p_is_supervised_once_and_never_truncated(case):
    rec, cfg = case
    traj, subs = _split(rec, cfg)
    times = {}
    for s in subs:
        for msg, sup, j in zip(s.messages, s.supervised, s.source):
            if sup:
                assert msg == traj.messages[j], "a supervised message was altered"
                times[j] = times.get(j, 0) + 1
    for j, m in enumerate(traj.messages):
        if m["role"] != "assistant":
            assert j not in times
        elif cfg["supervise_overlap"]:
            assert times.get(j, 0) >= 1
        else:
            assert times.get(j, 0) == 1, f"action {j} supervised {times.get(j, 0)} times"


@given(split_cases())
def test_actions_inside_p_are_supervised_in_the_first_subtrajectory_only(case):
    rec, cfg = case
    traj, subs = _split(rec, cfg)
    for s in subs:
        in_p = [sup for sup, m in zip(s.supervised[:traj.prefix_len], s.messages)
                if m["role"] == "assistant"]
        assert all(in_p) if s.index == 0 else not any(in_p)


@given(split_cases())
def test_turn_order_is_preserved_and_no_message_appears_twice(case):
    rec, cfg = case
    _, subs = _split(rec, cfg)
    for s in subs:
        src = [j for j in s.source if j >= 0]
        assert src == sorted(set(src))
        assert s.source.count(-1) <= 1 and (-1 not in s.source
                                            or s.source.index(-1) == s.prefix_len)


def _window_start(s):
    """Index into s.messages of the first supervised-window message (after p and Cᵢ)."""
    first_sup = min(k for k, sup in enumerate(s.supervised) if sup and k >= s.prefix_len)
    return first_sup


@given(split_cases())
def test_consecutive_subtrajectories_overlap_by_the_configured_amount(case):
    rec, cfg = case
    traj, subs = _split(rec, cfg)
    turn = _turn_of(traj)
    L, O = cfg["context_len"], cfg["overlap"]
    p_tok = _tokens(traj.messages[:traj.prefix_len])
    marker = word_count(split.omitted_marker(len(split.turns_of(traj.messages, traj.prefix_len))))
    for prev, cur in zip(subs, subs[1:]):
        w = next(k for k in range(cur.prefix_len, len(cur.messages))
                 if cur.source[k] >= 0 and turn[cur.source[k]] >= 0
                 and cur.source[k] not in prev.source)
        w_turn = turn[cur.source[w]]
        # V: the whole, unaltered turns just before the window
        k, v_tok = w, 0
        while k > cur.prefix_len and cur.source[k - 1] >= 0 and \
                cur.messages[k - 1] == traj.messages[cur.source[k - 1]] and \
                turn[cur.source[k - 1]] >= w_turn - (len({turn[j] for j in cur.source[k - 1:w]})):
            k, v_tok = k - 1, v_tok + word_count(cur.messages[k - 1])
        v_sources = set(cur.source[k:w])
        assert v_sources <= set(prev.source), "the overlap must come from the previous window"
        before = _tokens(traj.messages[traj.prefix_len:cur.source[w]])
        a, b = split.turns_of(traj.messages, traj.prefix_len)[w_turn]
        first_turn = min(_tokens(traj.messages[a:b]), L - p_tok)
        v_first_turn = min((turn[j] for j in v_sources), default=w_turn)
        older = [j for j, t in enumerate(turn) if t == v_first_turn - 1]
        room_limited = p_tok + v_tok + _tokens([traj.messages[j] for j in older]) + first_turn \
            + marker > L
        assert v_tok >= min(O, before) or room_limited


@given(split_cases())
def test_older_context_is_never_kept_more_than_its_schedule_allows(case):
    rec, cfg = case
    traj, subs = _split(rec, cfg)
    keep = cfg["keep"]
    turn = _turn_of(traj)
    for s in subs:
        hist = [k for k in range(s.prefix_len, len(s.messages)) if not s.supervised[k]
                and s.source[k] >= 0 and turn[s.source[k]] >= 0]
        cut = [k for k in hist if s.messages[k] != traj.messages[s.source[k]]]
        if not cut:
            continue
        # turns in C are contiguous up to the window: only the oldest are ever dropped
        turns_in = sorted({turn[s.source[k]] for k in range(s.prefix_len, len(s.messages))
                           if s.source[k] >= 0})
        assert turns_in == list(range(turns_in[0], turns_in[-1] + 1))
        newest_cut = max(turn[s.source[k]] for k in cut)
        for k in cut:
            orig = str(traj.messages[s.source[k]]["content"])
            omitted = int(MARK.search(s.messages[k]["content"]).group(1))
            kept = len(orig) - omitted
            if s.supervised[k] or any(s.source[x] == s.source[k] for x in range(k)):
                continue
            age = newest_cut - turn[s.source[k]]
            frac = keep[min(age, len(keep) - 1)] if kept < len(orig) else 1.0
            # an over-long observation cut to fit (resolution 1) is the only other kind of cut
            assert kept <= int(frac * len(orig)) or word_count(traj.messages[s.source[k]]) > \
                cfg["context_len"] - _tokens(traj.messages[:traj.prefix_len]) - 40


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
    for s in subs[1:]:
        w = _window_start(s)
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
    assert split.main(["stats", str(path)]) == 1
    assert f"{path}:1" in capsys.readouterr().err


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
