"""judge.py, the pure parts: rubric trees (load / validate / save / variants) on PaperBench's real
rubrics, aggregation by hand and as properties, judge agreement, and the validate / aggregate /
agree CLI."""
import copy
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import judge
from tests.strategies import graded_rubrics, rubric_dicts, rubric_leaf_ids

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "paperbench"
RUBRICS = sorted(SHARED.glob("papers/*/rubric.json")) + sorted(SHARED.glob("fixtures/rubrics/*.json"))


def raw_counts(d: dict) -> dict:
    """The counts `validate` must print, computed from the raw JSON with an explicit stack."""
    nodes, by_cat, depth, stack = 0, {}, 0, [(d, 0)]
    while stack:
        node, k = stack.pop()
        nodes, depth = nodes + 1, max(depth, k)
        if not node["sub_tasks"]:
            by_cat[node["task_category"]] = by_cat.get(node["task_category"], 0) + 1
        stack += [(c, k + 1) for c in node["sub_tasks"]]
    return {"nodes": nodes, "leaves": sum(by_cat.values()), "by_category": by_cat, "max_depth": depth}


def verdicts(rubric: judge.RubricNode, grades: dict) -> dict:
    """Tree-position verdicts from {leaf id: (score, valid)}."""
    return {p: judge.Verdict(*grades[n.id], "") for p, n in rubric.leaves()}


def root_score(tree: dict, grades: dict) -> float:
    rubric = judge.rubric_from_dict(tree)
    return judge.aggregate(rubric, verdicts(rubric, grades)).score


# ----------------------------------------------------------------------------- real rubrics


def test_shared_rubrics_are_present():
    assert len(RUBRICS) == 10, RUBRICS   # 3 dev-split papers + 7 fixtures


@pytest.mark.parametrize("path", RUBRICS, ids=lambda p: p.parent.name + "/" + p.name)
def test_every_shared_rubric_loads_validates_and_counts(path):
    raw = json.loads(path.read_text())
    rubric = judge.load_rubric(path)
    judge.validate_rubric(rubric)
    assert judge.rubric_stats(rubric) == raw_counts(raw)


def test_paper_rubric_counts_match_the_published_sizes():
    counts = {p.parent.name: raw_counts(json.loads(p.read_text()))
              for p in SHARED.glob("papers/*/rubric.json")}
    assert counts["self-composing-policies"]["leaves"] == 275
    assert counts["self-expansion"]["leaves"] == 253
    assert counts["semantic-self-consistency"]["leaves"] == 77


@pytest.mark.parametrize("path", RUBRICS, ids=lambda p: p.parent.name + "/" + p.name)
def test_round_trip_gives_the_same_json_and_key_order(path, tmp_path):
    judge.save_rubric(judge.load_rubric(path), tmp_path / "r.json")
    before, after = path.read_text(), (tmp_path / "r.json").read_text()
    assert json.loads(after) == json.loads(before)
    assert json.dumps(json.loads(after), indent=4) == json.dumps(json.loads(before), indent=4)
    if path.parent.name != "rubrics":   # the papers' files are PaperBench's own dumps: byte for byte
        assert after == before


def test_unknown_fields_and_absent_categories_survive_a_round_trip(tmp_path):
    raw = json.loads((SHARED / "fixtures/rubrics/hex_flag_context.json").read_text())
    assert "task_category" not in raw   # this fixture's root has no category field at all
    raw["x_note"] = {"kept": [1, 2]}
    raw["sub_tasks"][0]["sub_tasks"][0]["check"] = "test -f flag.txt"
    rubric = judge.rubric_from_dict(raw)
    assert rubric.extra == {"x_note": {"kept": [1, 2]}}
    judge.save_rubric(rubric, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text()) == raw


def test_duplicate_ids_are_tolerated_and_addressed_by_position():
    rubric = judge.load_rubric(SHARED / "fixtures/rubrics/hex_flag_context.json")
    assert rubric.id == rubric.sub_tasks[0].id   # PaperBench ships this fixture with a repeated id
    (path, leaf), = rubric.leaves()
    assert path == (0, 0) and rubric.at(path) is leaf
    graded = judge.aggregate(rubric, {(0, 0): judge.Verdict(1.0, True, "")})
    assert graded.score == 1.0 and graded.sub_tasks[0].score == 1.0


def test_code_dev_variant_keeps_only_code_development_leaves():
    for path in SHARED.glob("papers/*/rubric.json"):
        raw = json.loads(path.read_text())
        cd = judge.code_dev_rubric(judge.load_rubric(path))
        judge.validate_rubric(cd)
        assert {n.task_category for _, n in cd.leaves()} == {"Code Development"}
        assert len(cd.leaves()) == raw_counts(raw)["by_category"]["Code Development"]
        assert all(n.sub_tasks for _, n in cd.walk() if n.task_category is None)  # no empty parents


def test_code_dev_of_a_rubric_without_code_development_is_none():
    leaf = {"id": "a", "requirements": "r", "weight": 1, "sub_tasks": [], "task_category": "Code Execution"}
    tree = {"id": "r", "requirements": "r", "weight": 1, "sub_tasks": [leaf], "task_category": None}
    assert judge.code_dev_rubric(judge.rubric_from_dict(tree)) is None


def test_resources_provided_zeroes_dataset_and_model_acquisition_leaves():
    path = SHARED / "papers/self-expansion/rubric.json"
    rubric = judge.load_rubric(path)
    variant = judge.resources_provided_rubric(rubric)
    acquisition = [p for p, n in rubric.leaves()
                   if n.finegrained_task_category == "Dataset and Model Acquisition"]
    assert len(acquisition) == 4
    for p, n in variant.walk():
        expected = 0 if p in acquisition else rubric.at(p).weight
        assert n.weight == expected
    # all leaves pass except the acquisition ones: with the variant they no longer matter
    grades = {p: judge.Verdict(float(p not in acquisition), True, "") for p, _ in rubric.leaves()}
    assert judge.aggregate(variant, grades).score == 1.0
    assert judge.aggregate(rubric, grades).score < 1.0


# ----------------------------------------------------------------------------- validation errors


def _hex_flags() -> dict:
    return json.loads((SHARED / "fixtures/rubrics/hex_flags.json").read_text())


def _del_weight(d):
    del d["sub_tasks"][2]["weight"]


def _neg_weight(d):
    d["sub_tasks"][2]["weight"] = -1


def _internal_category(d):
    d["task_category"] = "Code Development"


def _leaf_without_category(d):
    d["sub_tasks"][2]["task_category"] = None


def _bad_finegrained(d):
    d["sub_tasks"][2]["finegrained_task_category"] = "Vibes"


def _sub_tasks_not_a_list(d):
    d["sub_tasks"][2]["sub_tasks"] = "none"


@pytest.mark.parametrize("mutate, where, field, expected", [
    (_del_weight, "$.sub_tasks[2]", "weight", "required"),
    (_neg_weight, "$.sub_tasks[2]", "weight", "a number >= 0"),
    (_internal_category, "$", "task_category", "null on an internal node"),
    (_leaf_without_category, "$.sub_tasks[2]", "task_category", "one of"),
    (_bad_finegrained, "$.sub_tasks[2]", "finegrained_task_category", "null or one of"),
    (_sub_tasks_not_a_list, "$.sub_tasks[2]", "sub_tasks", "a list of nodes"),
])
def test_invalid_rubrics_name_the_node_field_and_expectation(mutate, where, field, expected, tmp_path):
    d = _hex_flags()
    mutate(d)
    (tmp_path / "bad.json").write_text(json.dumps(d))
    with pytest.raises(judge.RubricError) as err:
        judge.load_rubric(tmp_path / "bad.json")
    e = err.value
    assert (e.where, e.field) == (where, field) and expected in e.expected
    assert str(tmp_path / "bad.json") in str(e) and f"field '{field}'" in str(e)


def test_broken_json_names_file_and_line(tmp_path):
    (tmp_path / "bad.json").write_text('{\n  "id": "a",\n  "weight": ,\n}')
    with pytest.raises(judge.RubricError, match=r"bad.json: node at line 3"):
        judge.load_rubric(tmp_path / "bad.json")


def test_save_refuses_an_invalid_tree(tmp_path):
    rubric = judge.load_rubric(SHARED / "fixtures/rubrics/hex_flags.json")
    rubric.sub_tasks[0].weight = -2
    with pytest.raises(judge.RubricError, match="weight"):
        judge.save_rubric(rubric, tmp_path / "r.json")
    assert not (tmp_path / "r.json").exists()


# ----------------------------------------------------------------------------- aggregation


def test_aggregation_by_hand():
    # root(1): A(1)=1, B(3)=[B1(1)=1, B2(1)=0] → B = 0.5, root = (1·1 + 3·0.5) / 4 = 0.625
    leaf = lambda i, w: {"id": i, "requirements": i, "weight": w, "sub_tasks": [],  # noqa: E731
                         "task_category": "Code Development"}
    tree = {"id": "root", "requirements": "r", "weight": 1, "task_category": None,
            "sub_tasks": [leaf("A", 1), {"id": "B", "requirements": "b", "weight": 3,
                                         "task_category": None,
                                         "sub_tasks": [leaf("B1", 1), leaf("B2", 1)]}]}
    graded = judge.aggregate(judge.rubric_from_dict(tree),
                             verdicts(judge.rubric_from_dict(tree),
                                      {"A": (1.0, True), "B1": (1.0, True), "B2": (0.0, True)}))
    assert graded.sub_tasks[1].score == 0.5 and graded.score == 0.625 and graded.valid_score


def test_zero_total_weight_scores_zero_and_invalid_leaves_count_zero():
    leaf = lambda i, w: {"id": i, "requirements": i, "weight": w, "sub_tasks": [],  # noqa: E731
                         "task_category": "Code Execution"}
    tree = {"id": "root", "requirements": "r", "weight": 1, "task_category": None,
            "sub_tasks": [leaf("A", 0), leaf("B", 0)]}
    assert root_score(tree, {"A": (1.0, True), "B": (1.0, True)}) == 0.0
    tree["sub_tasks"][1]["weight"] = 2
    rubric = judge.rubric_from_dict(tree)
    graded = judge.aggregate(rubric, verdicts(rubric, {"A": (1.0, True), "B": (1.0, False)}))
    assert graded.score == 0.0 and graded.invalid_leaves() == 1 and not graded.valid_score
    assert graded.sub_tasks[1].score == 0.0   # an invalid leaf's claimed 1 counts as 0


def test_a_missing_verdict_is_an_error_not_a_zero():
    rubric = judge.load_rubric(SHARED / "fixtures/rubrics/hex_flags.json")
    with pytest.raises(ValueError, match=r"no verdict for the leaf at \[4\]"):
        judge.aggregate(rubric, {(i,): judge.Verdict(1.0, True, "") for i in range(4)})


@given(graded_rubrics())
def test_root_score_is_in_unit_interval(case):
    tree, grades = case
    assert 0.0 <= root_score(tree, grades) <= 1.0


@given(graded_rubrics(), st.data())
def test_root_score_is_monotone_in_leaf_grades(case, data):
    tree, grades = case
    leaf = data.draw(st.sampled_from(sorted(grades)))
    low = {**grades, leaf: (0.0, True)}
    high = {**grades, leaf: (1.0, True)}
    assert root_score(tree, low) <= root_score(tree, high) + 1e-12
    # making a leaf invalid can only lower the score (it counts 0)
    assert root_score(tree, {**grades, leaf: (1.0, False)}) <= root_score(tree, high) + 1e-12


@given(graded_rubrics(), st.integers(0, 2**31))
def test_root_score_is_invariant_to_sibling_order(case, seed):
    tree, grades = case
    shuffled, rng = copy.deepcopy(tree), random.Random(seed)
    stack = [shuffled]
    while stack:
        node = stack.pop()
        rng.shuffle(node["sub_tasks"])
        stack += node["sub_tasks"]
    assert root_score(shuffled, grades) == pytest.approx(root_score(tree, grades), abs=1e-12)


@given(rubric_dicts(max_depth=3), st.data())
def test_zero_weight_subtrees_do_not_matter(tree, data):
    internal = [n for n in _nodes(tree) if n["sub_tasks"]] or [tree]
    node = data.draw(st.sampled_from(internal))
    if not node["sub_tasks"]:
        return
    child = data.draw(st.sampled_from(node["sub_tasks"]))
    child["weight"] = 0
    inside = set(rubric_leaf_ids(child))
    ids = rubric_leaf_ids(tree)
    base = {i: (float(data.draw(st.booleans())), True) for i in ids}
    flipped = {i: ((1.0 - s, v) if i in inside else (s, v)) for i, (s, v) in base.items()}
    assert root_score(tree, base) == pytest.approx(root_score(tree, flipped), abs=1e-12)


def _nodes(tree: dict) -> list[dict]:
    return [tree] + [n for c in tree["sub_tasks"] for n in _nodes(c)]


@given(graded_rubrics())
def test_graded_json_round_trip_and_recompute(case):
    tree, grades = case
    rubric = judge.rubric_from_dict(tree)
    graded = judge.aggregate(rubric, verdicts(rubric, grades))
    again = judge.GradedNode.from_dict(json.loads(json.dumps(graded.to_dict())))
    assert again.to_dict() == graded.to_dict()
    assert judge.recompute(again).score == pytest.approx(graded.score, abs=1e-12)
    assert again.invalid_leaves() == sum(not v for _, v in grades.values())
    d = graded.to_dict()
    assert {"score", "valid_score", "explanation", "judge_metadata", "sub_tasks"} <= set(d)


# ----------------------------------------------------------------------------- agreement


def test_macro_f1_by_hand():
    # class 1: tp 2, fp 1, fn 1 → 4/6; class 0: tp 1, fp 1, fn 1 → 2/4; macro (2/3 + 1/2) / 2
    assert judge.macro_f1([1, 1, 1, 0, 0], [1, 1, 0, 1, 0]) == pytest.approx(7 / 12)
    assert judge.macro_f1([1, 0, 1], [1, 0, 1]) == 1.0
    assert judge.macro_f1([1, 1], [0, 0]) == 0.0


def _graded(tree: dict, grades: dict) -> judge.GradedNode:
    rubric = judge.rubric_from_dict(tree)
    return judge.aggregate(rubric, verdicts(rubric, grades))


def test_agreement_f1_and_rank_correlations():
    tree = json.loads((SHARED / "fixtures/rubrics/hex_flags.json").read_text())
    ids = rubric_leaf_ids(tree)
    human = [[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]]
    model = [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 1]]
    pairs = [(_graded(tree, {i: (float(a), True) for i, a in zip(ids, h)}),
              _graded(tree, {i: (float(b), True) for i, b in zip(ids, m)})) for h, m in zip(human, model)]
    a = judge.judge_agreement(pairs)
    flat_h, flat_m = sum(human, []), sum(model, [])
    assert a.pairs == 4 and a.leaves == 20 and a.skipped_invalid == 0
    assert a.macro_f1 == pytest.approx(judge.macro_f1(flat_h, flat_m))
    # root scores: human .8 .4 .2 0, model .6 .6 0 .2 → ranks agree except the tie and the last pair
    from scipy import stats
    hs, ms = [sum(h) / 5 for h in human], [sum(m) / 5 for m in model]
    assert a.spearman == pytest.approx(stats.spearmanr(hs, ms).statistic)
    assert a.kendall == pytest.approx(stats.kendalltau(hs, ms).statistic)
    same = judge.judge_agreement([(h, h) for h, _ in pairs])
    assert same.macro_f1 == 1.0 and same.spearman == pytest.approx(1.0) and same.kendall == pytest.approx(1.0)


def test_agreement_skips_invalid_leaves_and_rejects_different_rubrics():
    tree = json.loads((SHARED / "fixtures/rubrics/hex_flags.json").read_text())
    ids = rubric_leaf_ids(tree)
    a = _graded(tree, {i: (1.0, True) for i in ids})
    b = _graded(tree, {i: (1.0, i != ids[0]) for i in ids})
    r = judge.judge_agreement([(a, b)])
    assert (r.leaves, r.skipped_invalid, r.macro_f1, r.spearman) == (4, 1, 1.0, None)
    other = _graded(json.loads((SHARED / "fixtures/rubrics/hex_flag.json").read_text()),
                    {"da2c8cfe-116c-4f74-8583-5af8a36fbee7": (1.0, True)})
    with pytest.raises(ValueError, match="not the same rubric"):
        judge.judge_agreement([(a, other)])


# ----------------------------------------------------------------------------- CLI


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "judge.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_cli_validate_prints_counts_and_fails_on_an_invalid_rubric(tmp_path):
    path = SHARED / "papers/semantic-self-consistency/rubric.json"
    out = run_cli("validate", path)
    assert out.returncode == 0 and json.loads(out.stdout) == raw_counts(json.loads(path.read_text()))
    bad = _hex_flags()
    _neg_weight(bad)
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    out = run_cli("validate", tmp_path / "bad.json")
    assert out.returncode == 2 and out.stdout == ""            # a user error (issue 21.1)
    assert len(out.stderr.strip().splitlines()) == 1
    assert "$.sub_tasks[2]" in out.stderr and "weight" in out.stderr and ">= 0" in out.stderr


def test_cli_aggregate_recomputes_from_leaves(tmp_path):
    tree = _hex_flags()
    ids = rubric_leaf_ids(tree)
    graded = _graded(tree, {i: (1.0, k != 4) for k, i in enumerate(ids)}).to_dict()
    graded["score"] = 0.123   # stale internal score: aggregate must recompute it
    graded["sub_tasks"][4]["score"] = 1.0   # an invalid leaf claiming 1 still counts 0
    (tmp_path / "g.json").write_text(json.dumps(graded))
    out = run_cli("aggregate", tmp_path / "g.json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"score": 0.8, "leaves": 5, "invalid": 1}


def test_cli_agree_takes_pairs(tmp_path):
    tree = _hex_flags()
    ids = rubric_leaf_ids(tree)
    files = []
    for n, (h, m) in enumerate([((1, 1, 1, 0, 0), (1, 1, 0, 0, 0)), ((1, 0, 0, 0, 0), (1, 0, 0, 0, 1)),
                                ((0, 0, 0, 0, 0), (0, 0, 0, 0, 0))]):
        for tag, grades in (("h", h), ("m", m)):
            f = tmp_path / f"{tag}{n}.json"
            f.write_text(json.dumps(_graded(tree, {i: (float(g), True) for i, g in zip(ids, grades)}).to_dict()))
            files.append(f)
    out = run_cli("agree", *files)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["pairs"] == 3 and result["leaves"] == 15
    assert result["macro_f1"] == pytest.approx(judge.macro_f1([1, 1, 1, 0, 0, 1, 0, 0, 0, 0] + [0] * 5,
                                                              [1, 1, 0, 0, 0, 1, 0, 0, 0, 1] + [0] * 5))
    assert set(result) == {"pairs", "leaves", "skipped_invalid", "macro_f1", "spearman", "kendall"}
    assert run_cli("agree", files[0]).returncode != 0
