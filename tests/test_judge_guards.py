"""KLong's scaffold guards, on in the pipelines (issue 17): end_task refused before a Config share
of the budget in both presets; a blacklist hit in the post-run scan disqualifies (score 0 with the
reason, as PaperBench's monitor does) in RL, evaluation and the factory; one "paper read" rule
for the agent and the factory's expert, that needs the paper opened by a reading tool or command.
Each test fails with its guard removed."""
import json
import random
from pathlib import Path

import pytest

import agent as A
import factory
import grpo
import judge
import judge_queue
import klong
import synthetic

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "paperbench"
GOLD_FLAG = (SHARED / "fixtures/submissions/hex_flag/gold/flag.txt").read_text().strip()
PAPER = f"# The hex flag paper\n\nOur method outputs the flag {GOLD_FLAG}.\n"
URL = (SHARED / "papers/self-composing-policies/blacklist.txt").read_text().strip()


def make_task(root: Path, blacklist: str = "none\n") -> Path:
    """The real hex_flag fixture rubric with a check, a paper stating the flag, a blacklist."""
    d = root / "hex-flag"
    d.mkdir(parents=True)
    (d / "paper.md").write_text(PAPER)
    (d / "addendum.md").write_text("Nothing else.\n")
    (d / "blacklist.txt").write_text(blacklist)
    rubric = json.loads((SHARED / "fixtures/rubrics/hex_flag.json").read_text())
    rubric["check"] = f"grep -q {GOLD_FLAG} flag.txt"
    (d / "rubric.json").write_text(json.dumps(rubric))
    (d / "config.yaml").write_text("id: hex-flag\ntitle: hex flag\n")
    return d


def call(name: str, n: int, **args) -> dict:
    return {"role": "assistant", "content": "", "tool_calls": [
        {"id": f"c{n}", "type": "function", "function": {"name": name, "arguments": args}}]}


def scripted(script: list[dict]) -> A.ScriptedPolicy:
    return A.ScriptedPolicy(lambda m: script[min(sum(x["role"] == "assistant" for x in m),
                                                 len(script) - 1)])


def flag_script(cmd: str) -> list[dict]:
    """Read the paper, run `cmd`, write the right flag, end."""
    return [call("bash", 0, cmd="cat /home/paper/paper.md"), call("bash", 1, cmd=cmd),
            call("write_file", 2, file="flag.txt", content=GOLD_FLAG + "\n"),
            call("end_task", 3, end_message="done")]


def run_flag(tmp_path: Path, task: Path, cmd: str) -> A.Episode:
    return A.run_episode(scripted(flag_script(cmd)), task, A.Budget(max_turns=4), backend="local",
                         submission_out=tmp_path / "sub")


def observations(ep: A.Episode, name: str) -> list[str]:
    return [m["content"] for m in ep.trajectory.messages if m.get("name") == name]


# ----------------------------------------------------------------------------- end_task


@pytest.mark.parametrize("preset", sorted(klong.PRESETS))
def test_both_presets_refuse_an_early_end_task_in_rl_evaluation_and_the_factory(preset, tmp_path):
    cfg = klong.Config(**klong.PRESETS[preset])
    assert cfg.min_end_fraction > 0
    for budget in (grpo.budget_for(cfg, 10), grpo.budget_for(cfg, cfg.eval_timeout)):
        assert budget.min_end_fraction == cfg.min_end_fraction
    fc = factory.FactoryConfig(out_dir=tmp_path, max_turns=20)
    task = A.load_task(make_task(tmp_path))
    assert factory.attempt_budget(task, fc).min_end_fraction == fc.min_end_fraction > 0


def test_an_rl_budget_refuses_end_task_until_its_share_is_used(tmp_path):
    cfg = klong.Config(context_len=4096)
    script = [call("read_file_chunk", 0, file="/home/paper/paper.md")] + \
        [call("end_task", n, end_message="done") for n in range(1, 10)]
    ep = A.run_episode(scripted(script), make_task(tmp_path), grpo.budget_for(cfg, 10),
                       backend="local")
    ends = observations(ep, "end_task")
    assert all(e.startswith("Refused: end_task is allowed once 50%") for e in ends[:-1])
    assert ends[-1] == "Task ended." and ep.turns == 5 and ep.stop_reason == "end_task"


# ----------------------------------------------------------------------------- blacklist


def test_a_blacklist_hit_disqualifies_the_submission_with_its_reason(tmp_path):
    """The agent builds the URL so the tool layer cannot see it; the post-run scan finds it in the
    observation. The flag is right (the check alone would give 1), the score is 0."""
    task = make_task(tmp_path, blacklist=URL + "\n")
    owner_repo = URL.split("github.com/")[1]
    ep = run_flag(tmp_path, task, f"printf 'git clone https://github.com/%s\\n' {owner_repo}")
    assert ep.stop_reason == "end_task" and not ep.failed
    assert judge.grade_submission(task, ep.submission_dir, judge.CheckGrader("local")).score == 1.0
    scored = A.score_episode(ep, A.load_task(task), judge.CheckGrader("local"), backend="local")
    assert scored.score == 0.0 and scored.graded is None
    assert scored.disqualified.startswith(f"blacklist: {URL} near `git clone` in message 5")   # the observation


def test_a_refused_blacklisted_call_reached_nothing_and_does_not_disqualify(tmp_path):
    task = make_task(tmp_path, blacklist=URL + "\n")
    ep = run_flag(tmp_path, task, f"git clone {URL}")
    assert [h["refused"] for h in ep.trajectory.meta["blacklist_hits"]] == [True]
    scored = A.score_episode(ep, A.load_task(task), judge.CheckGrader("local"), backend="local")
    assert scored.score == 1.0 and scored.disqualified == ""


class ScriptedRollouts(grpo.RolloutManager):
    """grpo's rollout manager with a scripted episode instead of the policy's (the judging path,
    queue, log and failure handling are grpo's own)."""

    def __init__(self, script, *a, **kw):
        super().__init__(*a, **kw)
        self.script, self.episodes = script, 0

    def _episode(self, task, timeout, out):
        self.episodes += 1
        return A.run_episode(scripted(self.script), task, A.Budget(max_turns=4), backend="local",
                             submission_out=out)


def test_rl_scores_a_disqualified_rollout_zero_and_records_why(tmp_path):
    task = A.load_task(make_task(tmp_path, blacklist=URL + "\n"))
    script = flag_script(f"printf 'wget https://github.com/%s\\n' {URL.split('github.com/')[1]}")
    cfg = klong.Config(sandbox="local", rollout_workers=1)
    with judge_queue.JudgeQueue(workers=1) as q:
        mgr = ScriptedRollouts(script, None, q, judge.CheckGrader("local"), cfg,
                               tmp_path / "rollouts.jsonl", tmp_path / "work")
        mgr.request("g", task, 1, 4)
        (r,), = mgr.wait_groups(["g"])
        mgr.close()
    assert r.score == 0.0 and not r.failed and r.disqualified.startswith(f"blacklist: {URL}")
    logged = json.loads((tmp_path / "rollouts.jsonl").read_text())
    assert logged["score"] == 0.0 and logged["disqualified"] == r.disqualified


# ----------------------------------------------------------------------------- paper reading


def test_before_the_paper_is_read_only_commands_that_read_it_run(tmp_path):
    script = [call("bash", 0, cmd="echo paper.md && touch hacked"),
              call("bash", 1, cmd="python3 -c 'open(\"hacked\", \"w\")'  # paper.md"),
              call("bash", 2, cmd="head -n 50 /home/paper/paper.md"),
              call("bash", 3, cmd="touch allowed")]
    ep = A.run_episode(scripted(script), make_task(tmp_path), A.Budget(max_turns=4),
                       backend="local", submission_out=tmp_path / "sub")
    out = observations(ep, "bash")
    assert out[0].startswith("Refused: read the paper first") and out[1].startswith("Refused")
    assert GOLD_FLAG in out[2] and ep.trajectory.meta["paper_read"]
    assert ep.trajectory.prefix_len == 2 + 3 * 2        # p ends with the reading observation
    assert not (tmp_path / "sub/hacked").exists() and (tmp_path / "sub/allowed").exists()


@pytest.mark.parametrize("cmd, reads", [
    ("cat /home/paper/paper.md", True), ("sed -n 1,80p ../paper/paper.md", True),
    ("grep -n flag /home/paper/paper.md", True), ("echo paper.md", False),
    ("cat /home/paper/paper.md; rm -rf /home/submission", False),
    ("cat /home/paper/paper.md > copy.md", False), ("sed -i s/a/b/ /home/paper/paper.md", False),
    ("python3 train.py --paper paper.md", False), ("cat $(echo /home/paper/paper.md)", False)])
def test_which_commands_only_read_the_paper(cmd, reads):
    assert A.is_paper_read_command(cmd) is reads


def test_the_paper_counts_as_read_only_when_the_paper_itself_was_shown():
    """Showing the paper's text from another file, or a failed read, is not reading the paper."""
    spec = synthetic.sample_spec(0, 0, (3, 3))
    text = synthetic.paper_text(spec)
    shown = "File has 3 total lines.\n" + "\n".join(
        f"{k}: {line}" for k, line in enumerate(text.splitlines(), 1))
    other = [call("read_file_chunk", 0, file="/home/submission/notes.md"),
             {"role": "tool", "tool_call_id": "c0", "name": "read_file_chunk", "content": shown}]
    failed = [call("read_file_chunk", 0, file=synthetic.PAPER),
              {"role": "tool", "tool_call_id": "c0", "name": "read_file_chunk",
               "content": "Error: no such file"}]
    paper = [call("read_file_chunk", 0, file=synthetic.PAPER),
             {"role": "tool", "tool_call_id": "c0", "name": "read_file_chunk", "content": shown}]
    assert not A.paper_was_read(other, text) and not A.paper_was_read(failed, text)
    assert A.paper_was_read(paper, text)
    # the factory's expert follows the same rule: after `other` it still reads the paper first
    action = synthetic.expert_action(spec, other, random.Random(0))
    assert action["tool_calls"][0]["function"]["name"] == "read_file_chunk"
    assert action["tool_calls"][0]["function"]["arguments"] == {"file": synthetic.PAPER}
    action = synthetic.expert_action(spec, paper, random.Random(0))
    assert action["tool_calls"][0]["function"]["name"] == "bash"
