"""Reproduction before grading (issue 17, PaperBench's rule): when the rubric has Code Execution /
Result Analysis leaves graded from evidence, reproduce.sh runs in a fresh sandbox first and the
judge sees the reproduce.log and the files that run made, never a log the agent wrote itself. The
judge here is a loopback endpoint that passes a criterion only when the evidence it is shown
holds the result (a stand-in for an LLM judge reading the same prompt)."""
import json
import os
import time
from pathlib import Path

import judge
from tests.test_judge_llm import FAST, canned, criterion  # noqa: F401 (fixture)

LOG_RESULT, FILE_RESULT = "RESULT accuracy=0.93", "acc,0.93"


def section(text: str, tag: str) -> str:
    return text.split(f"<{tag}>")[1].split(f"</{tag}>")[0] if f"<{tag}>" in text else ""


def evidence_judge(body: dict) -> tuple[int, str]:
    """Passes REQ-ce when the log it is shown holds the result, REQ-ra when the files do."""
    text = "\n".join(m["content"] for m in body["messages"])
    passed = {"REQ-cd": True, "REQ-ce": LOG_RESULT in section(text, "reproduce.log"),
              "REQ-ra": FILE_RESULT in section(text, "files")}[criterion(body)]
    return 200, f"# Expectations\nthe result\n# Reality\nseen\n# Score\n{int(passed)}"


def make_task(root: Path) -> Path:
    leaf = lambda i, cat: {"id": i, "requirements": f"REQ-{i}", "weight": 1,  # noqa: E731
                           "sub_tasks": [], "task_category": cat}
    task = root / "task"
    task.mkdir()
    (task / "rubric.json").write_text(json.dumps(
        {"id": "root", "requirements": "all", "weight": 1, "task_category": None,
         "sub_tasks": [leaf("cd", "Code Development"), leaf("ce", "Code Execution"),
                       leaf("ra", "Result Analysis")]}))
    (task / "paper.md").write_text("We reach 0.93 accuracy.")
    return task


def submission(root: Path, script: str, forged: bool = False) -> Path:
    """main.py and reproduce.sh; `forged`: a reproduce.log and results the agent wrote itself."""
    sub = root / "sub"
    sub.mkdir()
    (sub / "main.py").write_text("print('accuracy', 0.93)\n")
    (sub / "reproduce.sh").write_text(script)
    if forged:
        (sub / "reproduce.log").write_text(LOG_RESULT + "\n")
        (sub / "results.csv").write_text(FILE_RESULT + "\n")
        old = time.time() - 3600
        os.utime(sub / "results.csv", (old, old))
    return sub


def grader(server) -> judge.LLMGrader:
    return judge.LLMGrader(judge.OpenAIChat(server.url, "judge", backoff=FAST, timeout_s=30))


def scores(graded: judge.GradedNode) -> dict[str, float]:
    return {g.node.id: g.score for _, g in graded.leaves()}


def test_a_reproduce_sh_that_produces_the_result_gets_execution_and_analysis_credit(canned, tmp_path):
    server = canned(evidence_judge)
    task = make_task(tmp_path)
    sub = submission(tmp_path, f"python3 main.py\necho '{LOG_RESULT}'\necho '{FILE_RESULT}' > results.csv\n")
    assert judge.needs_reproduction(judge.load_rubric(task / "rubric.json"))
    graded = judge.grade_submission(task, sub, grader(server), backend="local",
                                    reproduce_timeout_s=60)
    assert scores(graded) == {"cd": 1.0, "ce": 1.0, "ra": 1.0}
    assert graded.judge_metadata["reproduction"]["exit_code"] == 0
    assert not (sub / "reproduce.log").exists()           # the run happened in a copy


def test_a_failing_reproduce_sh_gets_none_even_with_a_forged_log(canned, tmp_path):
    server = canned(evidence_judge)
    task = make_task(tmp_path)
    sub = submission(tmp_path, "echo 'No module named torch' >&2\nexit 1\n", forged=True)
    graded = judge.grade_submission(task, sub, grader(server), backend="local",
                                    reproduce_timeout_s=60)
    assert scores(graded) == {"cd": 1.0, "ce": 0.0, "ra": 0.0}
    assert graded.judge_metadata["reproduction"]["exit_code"] == 1
    ce_prompt = next(r for r in server.requests if criterion(r) == "REQ-ce")
    log = section("\n".join(m["content"] for m in ce_prompt["messages"]), "reproduce.log")
    assert "No module named torch" in log and LOG_RESULT not in log
    # without the reproduction the forged log would have earned the execution leaf
    unreproduced = judge.grade_submission(task, sub, grader(server), reproduce=False)
    assert scores(unreproduced)["ce"] == 1.0


def test_the_code_dev_variant_never_reproduces(canned, tmp_path):
    server = canned(evidence_judge)
    task = make_task(tmp_path)
    sub = submission(tmp_path, "exit 1\n")
    graded = judge.grade_submission(task, sub, grader(server), code_dev=True, backend="local")
    assert scores(graded) == {"cd": 1.0} and "reproduction" not in (graded.judge_metadata or {})
    assert [criterion(r) for r in server.requests] == ["REQ-cd"]
