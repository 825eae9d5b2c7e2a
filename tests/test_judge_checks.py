"""judge.py with the sandbox: executable checks on PaperBench's fixture submissions, the
reproduction step, and `judge.py grade --grader check`. Everything runs in a real sandbox
(sandbox.py's embedded backend here)."""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import judge
import sandbox

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "paperbench"
FLAG = re.compile(r"file named '([^']+)' (?:at the root of the directory|in the directory '([^']+)') "
                  r"and has contents '([^']+)'")


def flag_check(requirements: str) -> str:
    """A shell check written from a hex-flag fixture's requirement text."""
    name, directory, value = FLAG.search(requirements).groups()
    path = f"{directory}/{name}" if directory else name
    return f"test \"$(cat '{path}')\" = '{value}'"


def make_task(root: Path, rubric: dict, paper: str = "# A paper\n") -> Path:
    task = root / "task"
    task.mkdir()
    (task / "rubric.json").write_text(json.dumps(rubric, indent=4))
    (task / "paper.md").write_text(paper)
    return task


def with_checks(name: str) -> dict:
    rubric = json.loads((SHARED / f"fixtures/rubrics/{name}.json").read_text())
    stack = [rubric]
    while stack:
        node = stack.pop()
        if not node["sub_tasks"]:
            node["check"] = flag_check(node["requirements"])
        stack += node["sub_tasks"]
    return rubric


@pytest.mark.parametrize("name", ["hex_flag", "hex_flags", "nested_hex_flags"])
def test_fixture_gold_passes_and_an_emptied_copy_fails(name, tmp_path):
    task = make_task(tmp_path, with_checks(name))
    gold = SHARED / f"fixtures/submissions/{name}/gold"
    graded = judge.grade_submission(task, gold, judge.CheckGrader())
    assert graded.score == 1.0 and graded.invalid_leaves() == 0
    leaf = next(g for _, g in graded.leaves())
    assert leaf.judge_metadata["exit_code"] == 0 and leaf.judge_metadata["grader"] == "check"
    assert leaf.judge_metadata["sandbox_tier"] in sandbox.TIERS + ("docker",)
    empty = tmp_path / "empty"
    empty.mkdir()
    graded = judge.grade_submission(task, empty, judge.CheckGrader())
    assert graded.score == 0.0 and graded.invalid_leaves() == 0   # a real 0: every check ran and failed


def test_partial_submission_scores_by_the_weights(tmp_path):
    task = make_task(tmp_path, with_checks("nested_hex_flags"))
    sub = tmp_path / "sub"
    shutil.copytree(SHARED / "fixtures/submissions/nested_hex_flags/gold", sub)
    (sub / "directory/nested_directory/flag.txt").write_text("0xdeadbeef")
    graded = judge.grade_submission(task, sub, judge.CheckGrader())
    # root: flag(1) + other_directory(1) + directory(1)=[flag 1, nested=[flag 0, other_nested 1]/2]
    #   directory = (1 + 0.5) / 2 = 0.75 → root = (1 + 1 + 0.75) / 3
    assert graded.sub_tasks[2].sub_tasks[1].score == 0.5
    assert graded.score == pytest.approx((1 + 1 + 0.75) / 3)


def test_trivial_impossible_and_empty_fixtures(tmp_path):
    cases = {"trivial": "true", "impossible": "false",
             "empty": "test -z \"$(ls -A | grep -vx .git)\""}   # the sandbox may git-init the folder
    empty = tmp_path / "empty_submission"
    empty.mkdir()
    gold = SHARED / "fixtures/submissions/hex_flag/gold"
    for name, check in cases.items():
        rubric = json.loads((SHARED / f"fixtures/rubrics/{name}.json").read_text())
        rubric["check"] = check
        (tmp_path / name).mkdir()
        task = make_task(tmp_path / name, rubric)   # tmp_path/<name>/task
        on_gold = judge.grade_submission(task, gold, judge.CheckGrader()).score
        on_empty = judge.grade_submission(task, empty, judge.CheckGrader()).score
        expected = {"trivial": (1.0, 1.0), "impossible": (0.0, 0.0), "empty": (0.0, 1.0)}[name]
        assert (on_gold, on_empty) == expected, name


def test_a_hanging_check_times_out_as_zero_and_unchecked_leaves_are_invalid(tmp_path):
    rubric = with_checks("hex_flags")
    rubric["sub_tasks"][0]["check"] = "sleep 30"
    del rubric["sub_tasks"][1]["check"]
    task = make_task(tmp_path, rubric)
    t0 = time.monotonic()
    graded = judge.grade_submission(task, SHARED / "fixtures/submissions/hex_flags/gold",
                                    judge.CheckGrader(timeout_s=1.0), max_invalid=1.0)
    assert time.monotonic() - t0 < 20
    hung, unchecked = graded.sub_tasks[0], graded.sub_tasks[1]
    assert hung.score == 0.0 and hung.valid_score and hung.judge_metadata["timed_out"]
    assert not unchecked.valid_score and "no configured grader" in unchecked.explanation
    assert graded.invalid_leaves() == 1 and graded.score == pytest.approx(3 / 5)


def _submission_with_reproduce(root: Path, script: str) -> Path:
    sub = root / "sub"
    sub.mkdir()
    (sub / "reproduce.sh").write_text(script)
    (sub / "README.md").write_text("run reproduce.sh\n")
    (sub / "old.csv").write_text("stale,1\n")
    day_ago = time.time() - 86400
    os.utime(sub / "old.csv", (day_ago, day_ago))
    return sub


def test_reproduction_writes_log_start_time_and_fresh_results(tmp_path):
    sub = _submission_with_reproduce(tmp_path, "echo starting\necho acc,0.9 > results.csv\necho finished\n")
    rep = judge.run_reproduction(sub, tmp_path / "out", timeout_s=60)
    assert rep.exit_code == 0 and not rep.timed_out and rep.sandbox_tier in sandbox.TIERS + ("docker",)
    log = (rep.dir / "reproduce.log").read_text()
    assert "starting" in log and "finished" in log
    start = int((rep.dir / "reproduce.log.creation_time").read_text())
    assert start <= (rep.dir / "results.csv").stat().st_mtime
    ev = judge.collect_evidence(tmp_path, rep.dir)
    assert ev.repro_start == start and ev.touched
    assert "results.csv" in ev.files["Result Analysis"] and "old.csv" not in ev.files["Result Analysis"]
    assert "README.md" in ev.files["Result Analysis"]   # docs are always shown
    assert not (sub / "reproduce.log").exists()         # the original submission is untouched


def test_reproduction_leaves_big_outputs_behind_but_brings_the_log_back(tmp_path):
    sub = _submission_with_reproduce(tmp_path, "head -c 11000000 /dev/zero > big.bin\n"
                                               "head -c 11000000 /dev/zero | tr '\\0' x\necho END\n")
    rep = judge.run_reproduction(sub, tmp_path / "out", timeout_s=60)
    assert rep.exit_code == 0 and not (rep.dir / "big.bin").exists()
    assert (rep.dir / "reproduce.log").stat().st_size > judge.SNAPSHOT_FILE_BYTES
    log = judge.collect_evidence(tmp_path, rep.dir).reproduce_log
    assert len(log) < 2 * judge.TEXT_CAP_BYTES and log.rstrip().endswith("END")   # head and tail


def test_reproduction_time_limit_keeps_the_partial_log(tmp_path):
    sub = _submission_with_reproduce(tmp_path, "echo begun\nsleep 60\necho never\n")
    t0 = time.monotonic()
    rep = judge.run_reproduction(sub, tmp_path / "out", timeout_s=2)
    assert rep.timed_out and time.monotonic() - t0 < 30
    log = (rep.dir / "reproduce.log").read_text()
    assert "begun" in log and "never" not in log
    assert not judge.collect_evidence(tmp_path, rep.dir).touched


def test_grade_with_reproduction_sees_its_outputs(tmp_path):
    sub = _submission_with_reproduce(tmp_path, "echo 0.93 > accuracy.txt\n")
    leaf = {"id": "a", "requirements": "accuracy written", "weight": 1, "sub_tasks": [],
            "task_category": "Result Analysis", "check": "grep -qx 0.93 accuracy.txt"}
    task = make_task(tmp_path, leaf)
    assert judge.grade_submission(task, sub, judge.CheckGrader()).score == 0.0
    graded = judge.grade_submission(task, sub, judge.CheckGrader(), reproduce=True,
                                    reproduce_timeout_s=60)
    assert graded.score == 1.0
    assert graded.judge_metadata["reproduction"]["exit_code"] == 0
    # Code-Dev never reproduces (and here leaves nothing to grade: a clear error)
    with pytest.raises(judge.RubricError, match="Code Development"):
        judge.grade_submission(task, sub, judge.CheckGrader(), code_dev=True, reproduce=True)


def test_cli_grade_with_checks_writes_the_graded_tree(tmp_path):
    task = make_task(tmp_path, with_checks("hex_flags"))
    out = subprocess.run([sys.executable, str(REPO / "judge.py"), "grade", str(task),
                          str(SHARED / "fixtures/submissions/hex_flags/gold"), "--grader", "check",
                          "--out", str(tmp_path / "graded.json")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"score": 1.0, "leaves": 5, "invalid": 0}
    graded = judge.load_graded(tmp_path / "graded.json")
    assert graded.score == 1.0 and all(g.judge_metadata["exit_code"] == 0 for _, g in graded.leaves())
    assert graded.sub_tasks[0].node.check == with_checks("hex_flags")["sub_tasks"][0]["check"]
