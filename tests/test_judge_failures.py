"""Never a silent zero (issue 17): invalid leaves are counted and too many make a JudgeFailure;
401/403/404 stop at the first call; the CLI exits non-zero with the count. PaperBench's data as
it is: every shared rubric loads, graded trees with numeric valid_score load, duplicate ids on
different branches are rejected naming both paths, and graded trees derived from the real
rubrics aggregate to their recorded scores."""
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given

import judge
import judge_queue
from tests.strategies import graded_rubrics
from tests.test_judge_llm import FAST, GOOD, canned, criterion, grader  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "paperbench"
RUBRICS = sorted(SHARED.glob("papers/*/rubric.json")) + sorted(SHARED.glob("fixtures/rubrics/*.json"))
BAD = "I would rather not say."   # no Score section: the leaf is invalid after its parse attempts


def flat_task(root: Path, n: int) -> tuple[Path, Path]:
    """A task whose rubric has n Code Development leaves of weight 1 (REQ-0 … REQ-{n-1})."""
    leaves = [{"id": f"l{i}", "requirements": f"REQ-{i}", "weight": 1, "sub_tasks": [],
               "task_category": "Code Development"} for i in range(n)]
    task, sub = root / "task", root / "sub"
    task.mkdir()
    sub.mkdir()
    (task / "rubric.json").write_text(json.dumps(
        {"id": "root", "requirements": "all", "weight": 1, "sub_tasks": leaves}))
    (task / "paper.md").write_text("PAPER")
    (sub / "main.py").write_text("print(1)\n")
    return task, sub


# ----------------------------------------------------------------------------- invalid leaves


@pytest.mark.parametrize("n_bad", [2, 3])
def test_more_invalid_weight_than_the_threshold_is_a_failure_not_a_score(canned, tmp_path, n_bad):
    bad = {f"REQ-{i}" for i in range(n_bad)}
    server = canned(lambda body: (200, BAD if criterion(body) in bad else GOOD))
    task, sub = flat_task(tmp_path, 20)
    if n_bad == 2:                        # 10 % of the weight: at the threshold, still a judgment
        graded = judge.grade_submission(task, sub, grader(server, parse_attempts=1))
        assert graded.invalid_leaves() == 2 and graded.score == pytest.approx(18 / 20)
        return
    with pytest.raises(judge.InvalidJudgment) as err:
        judge.grade_submission(task, sub, grader(server, parse_attempts=1))
    e = err.value
    assert isinstance(e, judge.JudgeFailure)
    assert (e.invalid, e.leaves, e.share) == (3, 20, pytest.approx(0.15))
    assert "3 of 20 leaves could not be graded" in str(e) and "no Score section" in str(e)
    assert e.graded.invalid_leaves() == 3   # the partial tree is kept for the record


def test_the_threshold_counts_weight_not_leaves():
    """Real rubric, resources-provided variant: the Dataset and Model Acquisition leaves weigh 0,
    so their being invalid costs nothing; in the full rubric the same leaves hold weight."""
    rubric = judge.load_rubric(SHARED / "papers/self-expansion/rubric.json")
    acquisition = {p for p, n in rubric.leaves()
                   if n.finegrained_task_category == "Dataset and Model Acquisition"}
    verdicts = {p: judge.Verdict(1.0, p not in acquisition, "") for p, _ in rubric.leaves()}
    variant = judge.aggregate(judge.resources_provided_rubric(rubric), verdicts)
    full = judge.aggregate(rubric, verdicts)
    assert variant.invalid_leaves() == full.invalid_leaves() == 4
    assert judge.invalid_share(variant) == 0.0 and variant.score == pytest.approx(1.0)
    assert judge.invalid_share(full) == pytest.approx(1.0 - full.score) and full.score < 1.0


@given(graded_rubrics())
def test_score_plus_invalid_share_is_the_whole_weight_when_valid_leaves_pass(case):
    """With every valid leaf passing, score(root) = Σ shares of valid leaves, so score + invalid
    share = Σ leaf shares (1, less what sits under zero-weight nodes)."""
    tree, grades = case
    rubric = judge.rubric_from_dict(tree)
    graded = judge.aggregate(rubric, {p: judge.Verdict(1.0, grades[n.id][1], "")
                                      for p, n in rubric.leaves()})
    shares = judge.leaf_shares(rubric)
    assert sum(shares.values()) <= 1 + 1e-9
    if sum(shares.values()) > 0:
        assert graded.score + judge.invalid_share(graded) == pytest.approx(sum(shares.values()))


def test_cli_grade_on_a_real_rubric_without_a_grader_for_its_leaves_exits_non_zero(tmp_path):
    """The issue's first symptom: `--grader check` on a PaperBench rubric (no leaf has a check)
    printed score 0.0 and exited 0."""
    task, sub = tmp_path / "task", tmp_path / "sub"
    task.mkdir()
    sub.mkdir()
    (task / "rubric.json").write_text((SHARED / "papers/semantic-self-consistency/rubric.json").read_text())
    out = subprocess.run([sys.executable, str(REPO / "judge.py"), "grade", str(task), str(sub),
                          "--grader", "check", "--no-reproduce", "--out", str(tmp_path / "g.json")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and out.stdout == ""
    assert "no score: 77 of 77 leaves could not be graded" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert judge.load_graded(tmp_path / "g.json").invalid_leaves() == 77


# ----------------------------------------------------------------------------- access errors


@pytest.mark.parametrize("status", [401, 403, 404])
def test_access_errors_stop_at_the_first_call(canned, tmp_path, status):
    server = canned(lambda body: (status, "no such model" if status == 404 else "denied"))
    task, sub = flat_task(tmp_path, 40)
    g = grader(server, concurrency=8)
    with pytest.raises(judge.JudgeAccessError, match=f"HTTP {status}"):
        judge.grade_submission(task, sub, g)
    assert len(server.requests) == 1                       # no retry, no parallel request
    with pytest.raises(judge.JudgeAccessError):            # and every later call fails at once
        g.chat.complete([{"role": "user", "content": "hi"}])
    assert len(server.requests) == 1


def test_an_access_error_in_the_queue_is_not_retried_and_reaches_the_caller_as_it_is(canned, tmp_path):
    server = canned(lambda body: (401, "bad key"))
    task, sub = flat_task(tmp_path, 3)
    with judge_queue.JudgeQueue(workers=1, backoff=judge.Backoff(attempts=3, base_s=0.01)) as q:
        job = q.submit(lambda: judge.grade_submission(task, sub, grader(server)))
        with pytest.raises(judge.JudgeAccessError, match="HTTP 401"):
            job.result(timeout=30)
    assert job.attempts == 1 and len(server.requests) == 1


def test_cli_grade_with_a_rejected_key_says_so_in_one_line(canned, tmp_path):
    server = canned(lambda body: (401, "invalid api key"))
    task, sub = flat_task(tmp_path, 5)
    out = subprocess.run([sys.executable, str(REPO / "judge.py"), "grade", str(task), str(sub),
                          "--grader", f"openai:judge-model@{server.url}"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stdout == ""      # the user's key to fix: exit 2
    assert len(out.stderr.strip().splitlines()) == 1
    assert "HTTP 401" in out.stderr and "OPENAI_API_KEY" in out.stderr
    assert len(server.requests) == 1


# ----------------------------------------------------------------------------- PaperBench data


@pytest.mark.parametrize("path", RUBRICS, ids=lambda p: p.parent.name + "/" + p.name)
def test_graded_trees_of_the_real_rubrics_load_leniently_and_aggregate_to_their_scores(path):
    """A graded tree as PaperBench writes it, from each real rubric: leaf grades drawn at random,
    internal scores recorded by PaperBench's rule; valid_score written as numbers (1.0 / 0.0, as
    JudgeEval's pinn tree has it) and an extra field. It loads and recomputes to the record."""
    rng = random.Random(path.name)

    def grade(d: dict) -> dict:
        if not d["sub_tasks"]:
            valid = rng.random() > 0.1
            score = float(rng.random() < 0.5) if valid else 0.0
            return {**d, "score": score, "valid_score": 1.0 if valid else 0.0,
                    "explanation": "x", "judge_metadata": None, "x_extra": [1]}
        kids = [grade(c) for c in d["sub_tasks"]]
        total = sum(k["weight"] for k in kids)
        score = sum(k["weight"] * k["score"] for k in kids) / total if total else 0.0
        return {**d, "sub_tasks": kids, "score": score,
                "valid_score": float(all(k["valid_score"] for k in kids)), "explanation": "agg"}
    tree = grade(json.loads(path.read_text()))
    graded = judge.GradedNode.from_dict(tree)
    again = judge.recompute(graded)
    assert again.score == pytest.approx(tree["score"])
    assert [g.score for _, g in again.leaves()] == [g.score for _, g in graded.leaves()]
    assert next(again.leaves())[1].node.extra == {"x_extra": [1]}


def test_a_valid_score_that_is_not_0_or_1_is_rejected():
    leaf = {"id": "a", "requirements": "r", "weight": 1, "sub_tasks": [],
            "task_category": "Code Development", "score": 1.0, "valid_score": 0.5}
    with pytest.raises(judge.RubricError, match="valid_score.*got 0.5"):
        judge.GradedNode.from_dict(leaf)


def test_duplicate_ids_on_different_branches_are_rejected_naming_both_paths(tmp_path):
    raw = json.loads((SHARED / "papers/semantic-self-consistency/rubric.json").read_text())
    a, b = raw["sub_tasks"][0], raw["sub_tasks"][1]
    while b["sub_tasks"]:
        b = b["sub_tasks"][-1]
    b["id"] = a["id"]
    (tmp_path / "rubric.json").write_text(json.dumps(raw))
    with pytest.raises(judge.RubricError) as err:
        judge.load_rubric(tmp_path / "rubric.json")
    msg = str(err.value)
    assert "$.sub_tasks[0]" in msg and "$.sub_tasks[1].sub_tasks[" in msg and a["id"] in msg
    assert str(tmp_path / "rubric.json") in msg
    # the shipped fixture that restates its root's id down one path still loads
    judge.load_rubric(SHARED / "fixtures/rubrics/hex_flag_context.json")
