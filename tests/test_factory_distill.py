"""factory.py, distillation: teacher attempts through agent.run_episode, judged by judge.py's
executable checks, rejection sampling, resume after an interruption, the prefix-dependence of real
trajectories under split.py's context builder. Everything runs for real in the local sandbox."""
import json

import pytest

import chat
import factory
import synthetic
import judge
import agent
import sandbox
import split
from factory import FactoryConfig
from tests.loopback import JsonEndpoint


def lines(path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines()]


def small(tmp_path, **kw) -> FactoryConfig:
    """Tasks with M = 2..3 (a few seconds per attempt); the expert often errs, and the budget is
    just the turns needed, so some attempts run out of turns and score below 1."""
    return FactoryConfig(**{"out_dir": tmp_path, "n_tasks": 4, "seed": 5, "attempts": 3,
                            "threshold": 0.99, "noise": 0.4, "flaw": 0.0, "m_range": (2, 3),
                            "turn_slack": 1.0, "workers": 2, **kw})


def test_expert_submission_passes_every_check_and_an_empty_one_fails(tmp_path):
    [task_dir] = synthetic.make_synthetic_tasks(tmp_path / "tasks", 1, seed=2, m_range=(3, 3))
    episode = agent.run_episode(synthetic.expert_policy(task_dir, noise=0.3, flaw=0.65, seed=1),
                                  task_dir, agent.Budget(max_turns=40, reminder_every=0),
                                  backend="local", submission_out=tmp_path / "sub")
    assert episode.stop_reason == "end_task" and episode.trajectory.prefix_len == 4
    graded = judge.grade_submission(task_dir, episode.submission_dir, judge.CheckGrader("local"))
    assert graded.score == 1.0 and graded.invalid_leaves() == 0
    (tmp_path / "empty").mkdir()
    empty = judge.grade_submission(task_dir, tmp_path / "empty", judge.CheckGrader("local"))
    assert empty.score == 0.0 and all(leaf.score == 0 for _, leaf in empty.leaves())


def test_rejection_sampling_keeps_the_best_attempt_at_or_above_the_threshold(tmp_path):
    summary = factory.run_factory(small(tmp_path), backend="local")
    attempts, tasks = lines(tmp_path / "attempts.jsonl"), lines(tmp_path / "tasks.jsonl")
    kept = split.load_jsonl(tmp_path / "trajectories.jsonl")   # the SFT stage's reader
    assert len(attempts) == 4 * 3 and len(tasks) == 4
    scores = {t["task_id"]: t["scores"] for t in tasks}
    assert all(len(s) == 3 and all(0 <= q <= 1 for q in s) for s in scores.values())
    assert {t["task_id"] for t in tasks if max(t["scores"]) >= 0.99} == {k.task_id for k in kept}
    assert 0 < len(kept) < 4, "the parameters should give kept and rejected tasks"
    for k in kept:
        assert k.score == max(scores[k.task_id]) and k.meta["scores"] == scores[k.task_id]
        assert k.prefix_len == 4 and k.meta["teacher"] == "expert"
        assert k.messages[k.prefix_len - 1]["name"] == "read_file_chunk"
    assert summary.tasks == 4 and summary.attempts == 12 and summary.kept == len(kept)
    assert sum(summary.score_hist) == 12 and summary.failed == 0
    assert json.loads((tmp_path / "summary.json").read_text())["kept"] == len(kept)


def test_a_rerun_skips_finished_tasks_and_attempts_after_an_interruption(tmp_path):
    first = factory.run_factory(small(tmp_path, limit=2), backend="local")
    assert first.tasks == 2 and first.attempts == 6
    # interrupt the next task after one attempt, and cut a line in the middle of a write
    with (tmp_path / "attempts.jsonl").open("a") as f:
        extra = factory.run_attempt(sandbox.load_task(tmp_path / "tasks" / "syn-5-00002"),
                                    "expert", small(tmp_path), 0, judge.CheckGrader("local"), "local")
        f.write(json.dumps(extra) + "\n" + json.dumps(extra)[:50])
    second = factory.run_factory(small(tmp_path), backend="local")
    attempts = lines(tmp_path / "attempts.jsonl")
    assert second.skipped == 2 and second.tasks == 4 and second.attempts == 12
    ids = [a["id"] for a in attempts]
    assert len(ids) == len(set(ids)) == 12               # nothing redone, nothing lost
    assert [a["meta"]["attempt"] for a in attempts if a["task_id"] == "syn-5-00002"] == [0, 1, 2]
    kept_ids = [t.id for t in split.load_jsonl(tmp_path / "trajectories.jsonl")]
    assert len(kept_ids) == len(set(kept_ids)) == second.kept
    third = factory.run_factory(small(tmp_path), backend="local")
    assert third.skipped == 4 and third.attempts == 12
    with pytest.raises(ValueError, match=r"noise: 0.4 then, 0.1 now"):
        factory.run_factory(small(tmp_path, noise=0.1), backend="local")


class Teacher(JsonEndpoint):
    """A loopback chat-completions server: HTTP 400 (a broken teacher), or always the same reply."""

    def __init__(self, reply: dict | None):
        super().__init__(lambda path, body: (200, {"choices": [{"message": reply}]}) if reply
                         else (400, {"error": "bad request"}), poll_interval=0.05)
        self.url += "/v1"


def test_endpoint_teacher_failures_are_recorded_not_scored_zero(tmp_path):
    broken = Teacher(None)
    reader = Teacher({"role": "assistant", "content": "", "tool_calls": [{
        "id": "c", "type": "function", "function": {
            "name": "read_file_chunk", "arguments": json.dumps({"file": synthetic.PAPER})}}]})
    try:
        failed = factory.run_factory(small(tmp_path / "a", n_tasks=1, attempts=1),
                                     teacher=f"openai:m@{broken.url}", backend="local")
        idle = factory.run_factory(small(tmp_path / "b", n_tasks=1, attempts=1),
                                   teacher=f"openai:m@{reader.url}", backend="local")
    finally:
        for t in (broken, reader):
            t.close()
    assert (failed.attempts, failed.failed, failed.kept, sum(failed.score_hist)) == (1, 1, 0, 0)
    [record] = lines(tmp_path / "a" / "attempts.jsonl")
    assert record["score"] is None and "HTTP 400" in record["meta"]["error"]
    assert (idle.attempts, idle.failed, idle.kept, idle.score_hist[0]) == (1, 0, 0, 1)
    with pytest.raises(ValueError, match="expected expert, openai:MODEL@URL or hf:PATH"):
        factory.make_teacher("claude", None, small(tmp_path), 0)


def test_a_local_model_teacher_is_judged_like_any_other(tmp_path):
    """hf:PATH: a tiny random Qwen2 in chat.py's format, saved and reloaded offline; its attempt
    runs to the turn budget and is judged (score 0: it has not learnt anything)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    tok = chat.build_tiny_tokenizer(synthetic.tokenizer_text())
    config = Qwen2Config(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
                         max_position_embeddings=8192, pad_token_id=tok.pad_token_id)
    Qwen2ForCausalLM(config).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    summary = factory.run_factory(small(tmp_path / "out", n_tasks=1, attempts=1),
                                  teacher=f"hf:{tmp_path / 'model'}", backend="local")
    [attempt] = lines(tmp_path / "out" / "attempts.jsonl")
    assert (summary.attempts, summary.failed, summary.kept) == (1, 0, 0)
    assert attempt["score"] == 0.0 and attempt["meta"]["stop_reason"] == "max_turns"
    assert attempt["meta"]["policy"] == "EpisodePolicy" and attempt["samples"] == []


def test_real_trajectories_need_the_pinned_prefix_at_the_first_run(tmp_path):
    """At the first phase-2 action of a distilled trajectory, the context the splitter builds
    without p (mode "window") holds no tag_R, the KLong context (p pinned) does; the trajectory is
    several times the tiny window (L = 384, klong.py's tiny preset)."""
    defaults = FactoryConfig(out_dir=tmp_path)
    cfg = small(tmp_path, n_tasks=2, attempts=1, m_range=defaults.m_range, noise=0.05, flaw=0.65,
                turn_slack=1.5, threshold=0.9)
    factory.run_factory(cfg, backend="local")
    tok = chat.build_tiny_tokenizer(synthetic.tokenizer_text())
    count = chat.count_tokens(tok)
    for traj in split.load_jsonl(tmp_path / "trajectories.jsonl"):
        spec = synthetic.load_spec(tmp_path / "tasks" / traj.task_id)
        first_run = next(i for i, m in enumerate(traj.messages) if m["role"] == "assistant"
                         and m["tool_calls"][0]["function"]["arguments"].get("cmd", "")
                         .startswith(f"{synthetic.STEP} r "))
        history = traj.messages[:first_run]
        assert sum(map(count, traj.messages)) > 3.5 * 384
        for mode, sees_tag in (("window", False), ("klong", True)):
            cfg_split = split.SplitConfig(context_len=384, overlap=48, history=0.4, mode=mode,
                                          reserve=48)
            context, _ = split.build_context(history, traj.prefix_len, len(history), count,
                                             cfg_split)
            text = json.dumps(context)
            assert (f" r i {spec.tag_r}" in text) is sees_tag, mode
            assert sum(map(count, context)) <= 384


def test_the_factory_stage_writes_the_data_the_sft_stage_reads(tmp_path, capsys):
    """`klong.py --stage factory` reaches factory.run_stage with the run's settings, and the SFT
    stage's default data (sft.default_data) is the file it wrote, found without a second run."""
    import klong
    import sft
    args = ["--run-dir", str(tmp_path), "--n-tasks", "1", "--attempts", "1", "--threshold", "0",
            "--seed", "3", "--sandbox", "local"]
    assert klong.main(["--stage", "factory", *args]) == 0
    assert "1/1 tasks kept" in capsys.readouterr().out
    run = json.loads((tmp_path / "factory" / "run.json").read_text())
    assert (run["seed"], run["attempts"], run["threshold"]) == (3, 1, 0.0)
    [kept] = split.load_jsonl(tmp_path / "factory" / "trajectories.jsonl")
    assert kept.task_id.startswith("syn-3-") and kept.meta["teacher"] == "expert"
    _, cfg = klong.parse_args(["--stage", "sft", *args])
    assert sft.default_data(cfg) == str(tmp_path / "factory" / "trajectories.jsonl")
    assert "running the factory first" not in capsys.readouterr().out
