"""Issue 21.2: malformed input through the public entry points never raises anything but the
documented error types. Hypothesis profiles (tests/conftest.py): `ci` (the default, 25 cases a
property, fast) and `thorough` (HYPOTHESIS_PROFILE=thorough: 2,000 cases a property, >= 1,000 as
the issue asks).

- trajectory records -> split.load_jsonl / split.trajectory_from_dict: a Trajectory or RecordError
  (never KeyError, TypeError, UnicodeDecodeError, ...); a RecordError names the file and line;
- rubric and graded trees -> `judge.py validate` / `judge.py aggregate` (judge.main, in process):
  exit 0 with JSON, or exit 2 with one line on stderr; never a traceback;
- config values -> klong's command line in process (cli.run over parse_args and check_config,
  the front of klong.main that every stage goes through): a Config or exit 2 with one line.
"""
import json
import math
import os

from hypothesis import given
from hypothesis import strategies as st

import cli
import judge
import klong
import split
from tests.strategies import make_trajectory

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True)
    | st.text(max_size=12),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=20)
GOOD = make_trajectory(0, 3, 3, 0.0, 0)


def count_case(**fields) -> None:
    """bench/reliability.py counts the cases run: one JSON line each to $KLONG_RELIABILITY_LOG."""
    if os.environ.get("KLONG_RELIABILITY_LOG"):
        with open(os.environ["KLONG_RELIABILITY_LOG"], "a") as f:
            f.write(json.dumps(fields) + "\n")


@st.composite
def mutated_records(draw):
    """A valid trajectory record with some fields replaced by arbitrary JSON, deleted, or
    deep fields (a message, a tool call, a sample) broken; or arbitrary JSON altogether."""
    if draw(st.integers(0, 9)) == 0:
        return draw(JSON)
    rec = json.loads(json.dumps(GOOD))
    rec["samples"] = [{"message_index": 2, "context_ids": [1, 2], "action_ids": [3],
                       "logprobs": [-0.5], "policy_version": 0}]
    for _ in range(draw(st.integers(1, 4))):
        where = draw(st.sampled_from(["top", "message", "call", "sample", "delete"]))
        if where == "top":
            rec[draw(st.sampled_from(["id", "task_id", "messages", "prefix_len", "score", "meta",
                                      "samples"]))] = draw(JSON)
        elif where == "delete" and rec:
            rec.pop(draw(st.sampled_from(sorted(rec))), None)
        elif where == "message" and isinstance(rec.get("messages"), list) and rec["messages"]:
            k = draw(st.integers(0, len(rec["messages"]) - 1))
            if isinstance(rec["messages"][k], dict):
                rec["messages"][k][draw(st.sampled_from(["role", "content", "tool_calls"]))] = draw(JSON)
            else:
                rec["messages"][k] = draw(JSON)
        elif where == "call" and isinstance(rec.get("messages"), list) and len(rec["messages"]) > 2 \
                and isinstance(rec["messages"][2], dict):
            rec["messages"][2]["tool_calls"] = [draw(JSON)]
        elif where == "sample" and isinstance(rec.get("samples"), list) and rec["samples"]:
            if isinstance(rec["samples"][0], dict):
                rec["samples"][0][draw(st.sampled_from(["message_index", "context_ids", "action_ids",
                                                        "logprobs", "policy_version", "extra"]))] = draw(JSON)
    return rec


@given(recs=st.lists(mutated_records(), min_size=1, max_size=3),
       raw=st.one_of(st.none(), st.binary(max_size=40), st.text(max_size=40)))
def test_trajectory_files_raise_only_record_errors(tmp_path_factory, recs, raw):
    count_case(fuzz="trajectory records")
    path = tmp_path_factory.mktemp("fuzz") / "data.jsonl"
    body = "".join(json.dumps(r) + "\n" for r in recs).encode()
    if raw is not None:                                   # a torn / binary / non-JSON line too
        body += raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogatepass")
    path.write_bytes(body)
    try:
        trajs = split.load_jsonl(path)
    except split.RecordError as e:
        assert str(path) in str(e) and "\n" not in str(e)
        return
    for t in trajs:                                       # accepted records are usable as such
        assert isinstance(t.messages, list) and 0 <= t.prefix_len <= len(t.messages)
        assert all(isinstance(m.get("role"), str) for m in t.messages)


RUBRIC_KEYS = ["id", "requirements", "weight", "sub_tasks", "task_category", "finegrained_task_category",
               "check"]


@st.composite
def rubric_trees(draw, depth=0):
    """Rubric-shaped dicts: known keys with right or wrong values, sometimes arbitrary JSON."""
    if draw(st.integers(0, 7)) == 0:
        return draw(JSON)
    node = {"id": draw(st.one_of(st.text(max_size=6), JSON)),
            "requirements": draw(st.one_of(st.text(max_size=10), JSON)),
            "weight": draw(st.one_of(st.integers(-2, 5), st.floats(allow_nan=True), JSON))}
    if depth < 3 and draw(st.booleans()):
        node["sub_tasks"] = draw(st.lists(rubric_trees(depth + 1), max_size=3))
    else:
        node["sub_tasks"] = []
        node["task_category"] = draw(st.sampled_from(
            ["Code Development", "Code Execution", "Result Analysis", "Subtree", None, 3]))
        node["finegrained_task_category"] = draw(st.one_of(st.none(), st.text(max_size=8)))
        if draw(st.booleans()):                           # a graded leaf's fields
            node.update(score=draw(st.one_of(st.floats(allow_nan=True), JSON)),
                        valid_score=draw(st.one_of(st.booleans(), JSON)),
                        explanation=draw(st.one_of(st.text(max_size=8), JSON)))
    for _ in range(draw(st.integers(0, 2))):
        key = draw(st.sampled_from(RUBRIC_KEYS))
        if draw(st.booleans()):
            node.pop(key, None)
        else:
            node[key] = draw(JSON)
    return node


@given(tree=rubric_trees(), command=st.sampled_from(["validate", "aggregate"]))
def test_judge_validate_and_aggregate_exit_0_or_2_in_one_line(tmp_path_factory, capsys, tree, command):
    count_case(fuzz="rubric trees")
    path = tmp_path_factory.mktemp("rubric") / "rubric.json"
    path.write_text(json.dumps(tree))
    code = judge.main([command, str(path)])
    out, err = capsys.readouterr()
    assert code in (0, 2), (code, err)
    if code == 0:
        json.loads(out)
    else:
        assert out == "" and len(err.strip().splitlines()) == 1 and "Traceback" not in err


FLAGS = ["--context-len", "--overlap", "--history", "--lr", "--sft-steps", "--batch-rows",
         "--grad-accum", "--rl-timeouts", "--rl-steps", "--n-rollouts", "--pack", "--preset",
         "--seed", "--max-new-tokens", "--heads", "--kv-heads", "--hidden-size", "--threshold",
         "--stage", "--min-lr-ratio", "--save-every", "--warmup"]
VALUES = st.one_of(st.integers(-5, 70000).map(str), st.floats(allow_nan=True).map(str),
                   st.sampled_from(["", "true", "no", "1,2", "3,,4", "-1,5", "tiny", "8gpu", "x",
                                    "inf", "nan", "1e9", "0x10", "sft", "rl"]),
                   st.text(max_size=6))


@given(pairs=st.lists(st.tuples(st.sampled_from(FLAGS), VALUES), max_size=5))
def test_config_values_give_a_config_or_exit_2(capsys, pairs):
    count_case(fuzz="config values")
    argv = ["--stage", "sft"] + [x for flag, value in pairs for x in (flag, value)]
    got = []
    code = cli.run(lambda a: got.append(klong.parse_args(a)) or 0, argv, prog="klong.py")
    err = capsys.readouterr().err
    if code == 2:
        assert len(err.strip().splitlines()) == 1 and err.startswith("klong.py: error: ")
        return
    assert code == 0 and err == ""
    _, cfg = got[0]
    assert cfg.context_len >= 1 and 0 <= cfg.overlap < cfg.context_len and 0 <= cfg.history <= 1
    assert math.isfinite(cfg.lr) and cfg.lr > 0 and cfg.sft_steps >= 1
    assert cfg.split.context_len == cfg.context_len          # the split config builds
