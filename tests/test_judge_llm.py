"""judge.py's LLM graders: prompt building by category, file ranking, answer parsing, retries and
outages against a loopback OpenAI-compatible server with canned replies; the local transformers
grader with a tiny random model."""
import json
import os
import time
from pathlib import Path

import pytest

import judge
import judge_queue
from tests.loopback import JsonEndpoint

GOOD = "# Expectations\nA loss function as in eq. 3.\n# Reality\nmain.py defines it.\n# Score\n1"
FAST = judge.Backoff(attempts=3, base_s=0.01, factor=2.0)


class CannedJudge(JsonEndpoint):
    """A loopback /v1/chat/completions server: `respond(body) -> (status, text)`; every request
    body is recorded."""

    def __init__(self, respond):
        def answer(path, body):
            status, text = respond(body)
            return status, ({"choices": [{"message": {"role": "assistant", "content": text}}],
                             "usage": {"prompt_tokens": 10, "completion_tokens": 5}}
                            if status == 200 else {"error": text})
        super().__init__(answer, poll_interval=0.05)
        self.url += "/v1"

    @property
    def requests(self) -> list[dict]:
        return [body for _, body in self.calls]

    def grading_requests(self) -> list[dict]:
        return [r for r in self.requests if r["messages"][0]["content"] != judge.RANKING_PROMPT]


@pytest.fixture
def canned():
    servers = []

    def start(respond):
        servers.append(CannedJudge(respond))
        return servers[-1]
    yield start
    for s in servers:
        s.close()


def criterion(body: dict) -> str:
    """The criterion text of a grading request."""
    text = body["messages"][-2]["content"]
    return text.split("<criterion>\n")[1].split("\n</criterion>")[0]


def make_task(root: Path) -> tuple[Path, Path]:
    """A task with one leaf of each category under two sections, and a submission whose
    reproduction (stamped 1,000 s ago) wrote results.csv but not old.csv."""
    leaf = lambda i, cat: {"id": i, "requirements": f"REQ-{i}", "weight": 1,  # noqa: E731
                           "sub_tasks": [], "task_category": cat}
    rubric = {"id": "root", "requirements": "REQ-root", "weight": 1, "task_category": None,
              "sub_tasks": [{"id": "s1", "requirements": "REQ-s1", "weight": 1, "task_category": None,
                             "sub_tasks": [leaf("cd", "Code Development"), leaf("ce", "Code Execution")]},
                            {"id": "s2", "requirements": "REQ-s2", "weight": 1, "task_category": None,
                             "sub_tasks": [leaf("ra", "Result Analysis")]}]}
    task, sub = root / "task", root / "sub"
    task.mkdir()
    sub.mkdir()
    (task / "rubric.json").write_text(json.dumps(rubric))
    (task / "paper.md").write_text("PAPER-TEXT: we minimise eq. 3.")
    (task / "addendum.md").write_text("ADDENDUM-TEXT")
    (sub / "main.py").write_text("def loss():  # CODE-TEXT\n    return 3\n")
    (sub / "README.md").write_text("README-TEXT")
    (sub / "reproduce.sh").write_text("python main.py  # SCRIPT-TEXT\n")
    (sub / "reproduce.log").write_text("LOG-TEXT\n" + "step 1 loss 0.5\n" * 50)
    start = int(time.time()) - 1000
    (sub / "reproduce.log.creation_time").write_text(str(start))
    (sub / "results.csv").write_text("RESULTS-TEXT,0.9\n")
    (sub / "old.csv").write_text("OLD-TEXT\n")
    os.utime(sub / "old.csv", (start - 50, start - 50))
    return task, sub


def grader(server: CannedJudge, **config) -> judge.LLMGrader:
    return judge.LLMGrader(judge.OpenAIChat(server.url, "judge-model", backoff=FAST, timeout_s=10),
                           judge.JudgeConfig(**config))


def test_grading_prompts_carry_the_evidence_of_each_category(canned, tmp_path):
    server = canned(lambda body: (200, GOOD))
    task, sub = make_task(tmp_path)
    graded = judge.grade_submission(task, sub, grader(server), reproduce=False)
    assert graded.score == 1.0 and graded.invalid_leaves() == 0
    prompts = {criterion(r): "\n".join(m["content"] for m in r["messages"]) for r in server.requests}
    assert set(prompts) == {"REQ-cd", "REQ-ce", "REQ-ra"} and len(server.requests) == 3
    for text in prompts.values():
        assert "PAPER-TEXT" in text and "ADDENDUM-TEXT" in text and "SCRIPT-TEXT" in text
        assert "README-TEXT" in text and "OLD-TEXT" not in text
        assert "Expectations" in text and "Reality" in text and "# Score" in text
    assert "CODE-TEXT" in prompts["REQ-cd"] and "LOG-TEXT" not in prompts["REQ-cd"]
    assert "LOG-TEXT" in prompts["REQ-ce"] and "CODE-TEXT" in prompts["REQ-ce"]
    assert "RESULTS-TEXT" in prompts["REQ-ra"] and "CODE-TEXT" not in prompts["REQ-ra"]
    assert "RESULTS-TEXT" not in prompts["REQ-cd"]   # tables are not code
    assert "similar lines omitted" in prompts["REQ-ce"]   # the repeated log lines were collapsed
    # preceding criteria: ancestors and earlier siblings (of the leaf and of its ancestors)
    assert " -> REQ-root\n -> REQ-s1\n -> REQ-cd\n" in prompts["REQ-ce"]
    assert " -> REQ-root\n -> REQ-s1\n -> REQ-s2\n" in prompts["REQ-ra"]
    assert judge.CATEGORY_QUESTIONS["Code Execution"] in prompts["REQ-ce"]
    leaf = graded.sub_tasks[0].sub_tasks[0]
    assert leaf.explanation.startswith("# Expectations") and "main.py defines it." in leaf.explanation
    meta = leaf.judge_metadata
    assert meta["full_judge_response"] == GOOD and meta["attempts"] == 1 and meta["http_retries"] == 0
    assert meta["grader"] == "openai:judge-model" and "main.py" in meta["files"] and not meta["ranked"]


def test_code_dev_prompts_hold_neither_script_nor_log(canned, tmp_path):
    server = canned(lambda body: (200, GOOD))
    task, sub = make_task(tmp_path)
    graded = judge.grade_submission(task, sub, grader(server), code_dev=True)
    assert [n.id for _, n in judge.code_dev_rubric(judge.load_rubric(task / "rubric.json")).leaves()] == ["cd"]
    (request,) = server.requests
    text = "\n".join(m["content"] for m in request["messages"])
    assert "CODE-TEXT" in text and "LOG-TEXT" not in text
    assert "<reproduce.sh>" not in text and "<reproduce.log>" not in text   # (the script is still a code file)
    assert "code-only evaluation" in request["messages"][0]["content"]
    assert graded.score == 1.0


def test_malformed_replies_make_the_leaf_invalid_after_a_retry(canned, tmp_path):
    replies = {"REQ-cd": ["I think it is fine."] * 5,
               "REQ-ce": ["# Expectations\nx\n# Score\nseven", GOOD],
               "REQ-ra": ["# Reality\nnothing\n**Score:** 0"]}
    server = canned(lambda body: (200, replies[criterion(body)].pop(0)))
    task, sub = make_task(tmp_path)
    graded = judge.grade_submission(task, sub, grader(server, parse_attempts=2), reproduce=False,
                                    max_invalid=1.0)
    cd, ce = graded.sub_tasks[0].sub_tasks
    ra = graded.sub_tasks[1].sub_tasks[0]
    assert not cd.valid_score and cd.score == 0.0 and cd.judge_metadata["attempts"] == 2
    assert "no Score section" in cd.explanation
    assert ce.valid_score and ce.score == 1.0 and ce.judge_metadata["attempts"] == 2
    assert ra.valid_score and ra.score == 0.0 and ra.judge_metadata["attempts"] == 1
    assert len(server.requests) == 5 and graded.invalid_leaves() == 1
    assert graded.score == pytest.approx((0.5 + 0.0) / 2)


def test_endpoint_errors_are_retried_with_backoff_and_counted(canned, tmp_path):
    fails = {"REQ-cd": 2, "REQ-ce": 0, "REQ-ra": 1}

    def respond(body):
        c = criterion(body)
        if fails[c]:
            fails[c] -= 1
            return 503, "overloaded"
        return 200, GOOD
    server = canned(respond)
    task, sub = make_task(tmp_path)
    graded = judge.grade_submission(task, sub, grader(server), reproduce=False)
    retries = {g.node.id: g.judge_metadata["http_retries"] for _, g in graded.leaves()}
    assert retries == {"cd": 2, "ce": 0, "ra": 1} and graded.score == 1.0


def test_an_outage_raises_instead_of_scoring_zero(canned, tmp_path):
    server = canned(lambda body: (503, "down"))
    task, sub = make_task(tmp_path)
    with pytest.raises(judge.JudgeUnavailable, match="failed 3 times; last error: HTTP 503"):
        judge.grade_submission(task, sub, grader(server), reproduce=False)
    # a dead port is an outage too
    chat = judge.OpenAIChat("http://127.0.0.1:9/v1", "m", backoff=FAST, timeout_s=2)
    with pytest.raises(judge.JudgeUnavailable, match="ConnectError"):
        chat.complete([{"role": "user", "content": "hi"}])


def test_an_outage_through_the_judge_queue_is_a_failed_job(canned, tmp_path):
    """What the RL loop does: jobs are `lambda: grade_submission(...)`; a dead judge endpoint
    ends as JudgeFailure after the queue's retries (docs/ARCHITECTURE.md 6), never as a score."""
    up = canned(lambda body: (200, GOOD))
    down = canned(lambda body: (503, "down"))
    task, sub = make_task(tmp_path)
    with judge_queue.JudgeQueue(workers=2, backoff=judge.Backoff(attempts=2, base_s=0.01)) as q:
        ok = q.submit(lambda: judge.grade_submission(task, sub, grader(up), reproduce=False),
                      judge_queue.Priority.EVAL)
        bad = q.submit(lambda: judge.grade_submission(task, sub, grader(down), reproduce=False),
                       judge_queue.Priority.TRAIN)
        assert ok.result(timeout=30).score == 1.0
        with pytest.raises(judge.JudgeFailure) as err:
            bad.result(timeout=30)
    assert isinstance(err.value.__cause__, judge.JudgeUnavailable) and bad.attempts == 2
    assert len(down.requests) >= 2 * FAST.attempts   # each queue attempt retried the endpoint


def test_a_refused_request_is_an_invalid_leaf(canned, tmp_path):
    server = canned(lambda body: (400, "context too long") if criterion(body) == "REQ-cd" else (200, GOOD))
    task, sub = make_task(tmp_path)
    graded = judge.grade_submission(task, sub, grader(server), reproduce=False, max_invalid=1.0)
    cd = graded.sub_tasks[0].sub_tasks[0]
    assert not cd.valid_score and "HTTP 400" in cd.explanation and graded.invalid_leaves() == 1
    assert len(server.requests) == 3   # a 4xx is not retried


def test_result_analysis_without_fresh_outputs_scores_zero_without_a_call(canned, tmp_path):
    server = canned(lambda body: (200, GOOD))
    task, sub = make_task(tmp_path)
    (sub / "reproduce.log.creation_time").write_text(str(int(time.time()) + 1000))
    graded = judge.grade_submission(task, sub, grader(server), reproduce=False)
    ra = graded.sub_tasks[1].sub_tasks[0]
    assert ra.score == 0.0 and ra.valid_score and "no result files" in ra.explanation
    assert {criterion(r) for r in server.requests} == {"REQ-cd", "REQ-ce"}


def test_files_are_ranked_and_read_in_order_when_they_do_not_fit(canned, tmp_path):
    def respond(body):
        if body["messages"][0]["content"] == judge.RANKING_PROMPT:
            listing = body["messages"][-1]["content"]
            assert "src/big_a.py" in listing and "src/big_c.py" in listing
            return 200, "1. src/big_b.py\n- `src/big_a.py`\nnot/a/file.py"
        return 200, GOOD
    server = canned(respond)
    task, sub = make_task(tmp_path)
    (sub / "src").mkdir()
    for name in "abc":   # 3 files of ~3,450 tokens each, ~9,000 tokens of room for files
        (sub / f"src/big_{name}.py").write_text(f"# FILE-{name.upper()}\n" + "x = 1\n" * 2300)
    g = grader(server, reserve_tokens=1000, max_files=10)
    g.chat.context_tokens = 10_000
    graded = judge.grade_submission(task, sub, g, code_dev=True)
    ranking, grading = server.requests
    assert ranking["messages"][0]["content"] == judge.RANKING_PROMPT
    files = grading["messages"][3]["content"]
    assert files.index("FILE-B") < files.index("FILE-A") and "FILE-C" not in files
    meta = graded.sub_tasks[0].sub_tasks[0].judge_metadata
    assert meta["ranked"] and meta["files"] == ["src/big_b.py", "src/big_a.py"]


@pytest.mark.parametrize("text, expected", [
    (GOOD, (1.0, True)),
    ("# Expectations\na\n# Reality\nb\n# Score\n\n0\n", (0.0, True)),
    ("Expectations: a\nReality: b\nScore: 1", (1.0, True)),
    ("## Expectations\na\n## Reality\nb\n## Score\n**1**", (1.0, True)),
    ("**Expectations**\na\n**Score:** 0", (0.0, True)),
    ("# Reality\nScore reported: 0.93\n# Score\n1.0", (1.0, True)),
    ("# Expectations\na\n# Score\n0.5", (0.0, False)),
    ("# Expectations\na\n# Score\nyes", (0.0, False)),
    ("looks good to me", (0.0, False)),
    ("", (0.0, False)),
])
def test_parse_verdict(text, expected):
    v = judge.parse_verdict(text)
    assert (v.score, v.valid) == expected


def test_long_inputs_are_cut_to_the_context():
    count = lambda s: (len(s) + 3) // 4  # noqa: E731
    text = "HEAD " + "word " * 5000 + " TAIL"
    head = judge.fit_tokens(text, 500, count)
    both = judge.fit_tokens(text, 500, count, tail=True)
    assert count(head) <= 500 and count(both) <= 500 and count(head) > 450
    assert head.startswith("HEAD") and "TAIL" not in head and both.endswith("TAIL")
    assert judge.fit_tokens("short", 500, count) == "short"


def test_reduce_log_collapses_runs_of_similar_lines():
    log = "start\n" + "".join(f"epoch {i} loss 0.{i}\n" for i in range(100)) + "acc 0.9\n"
    reduced = judge.reduce_log(log).splitlines()
    assert reduced == ["start", "epoch 0 loss 0.0", "[... 98 similar lines omitted ...]",
                       "epoch 99 loss 0.99", "acc 0.9"]
    assert judge.reduce_log("a\rb\rc\nx\r\nx\n") == "c\nx\nx\n"


def test_local_transformers_grader_uses_the_same_prompts(tmp_path):
    chat = pytest.importorskip("chat", reason="chat.py (the tiny tokenizer) is not importable")
    from transformers import LlamaConfig, LlamaForCausalLM
    import torch
    torch.manual_seed(0)
    tok = chat.build_tiny_tokenizer()
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2,
                                         num_key_value_heads=2, max_position_embeddings=256,
                                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id))
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    grader = judge.parse_grader(f"hf:{tmp_path / 'tiny'}")   # what `--grader hf:PATH` builds
    grader.chat.max_new_tokens = 24
    task, sub = make_task(tmp_path)
    graded = judge.grade_submission(task, sub, grader, reproduce=False, max_invalid=1.0)
    leaves = [g for _, g in graded.leaves()]
    assert len(leaves) == 3
    for g in leaves:
        meta = g.judge_metadata
        text = meta["full_judge_response"]
        assert isinstance(text, str) and meta["grader"] == f"hf:{tmp_path / 'tiny'}"
        assert (g.score, g.valid_score) == (lambda v: (v.score, v.valid))(judge.parse_verdict(text))
        assert meta["usage"]["prompt_tokens"] + meta["usage"]["completion_tokens"] <= 256
    # the same grading conversation, rendered with the tokenizer's chat template
    ev = judge.collect_evidence(task, sub)
    msgs = judge.grading_messages(ev, judge.load_rubric(task / "rubric.json"), (0, 0), "P", "L", "")
    prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert prompt.startswith("<|system|>You are judging one criterion") and prompt.endswith("<|assistant|>")


def test_cli_grade_with_an_openai_compatible_judge(canned, tmp_path):
    import subprocess
    import sys
    server = canned(lambda body: (200, GOOD))
    task, sub = make_task(tmp_path)
    out = subprocess.run([sys.executable, str(Path(judge.__file__)), "grade", str(task), str(sub),
                          "--grader", f"openai:judge-model@{server.url}", "--code-dev",
                          "--out", str(tmp_path / "graded.json")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"score": 1.0, "leaves": 1, "invalid": 0}
    assert [r["model"] for r in server.requests] == ["judge-model"]
    graded = judge.load_graded(tmp_path / "graded.json")
    assert graded.sub_tasks[0].sub_tasks[0].judge_metadata["full_judge_response"] == GOOD
    for bad in ("openai:model-without-url", "hf:", "gpt"):
        with pytest.raises(ValueError, match="expected check, openai:MODEL@URL or hf:PATH"):
            judge.parse_grader(bad)
