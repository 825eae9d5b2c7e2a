"""The main job (`python klong.py --stage rl`, issue 15): it starts from the shipped tiny SFT
checkpoint, measures the greedy held-out score before and after RL, writes rl/summary.json and
the plot, and reports the same scalars to TensorBoard when asked."""
import json
from pathlib import Path

import pytest

import grpo
import klong
from tracking import Tracker

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "checkpoints" / "tiny-sft"


def _cfg(tmp_path, *extra):
    _, cfg = klong.parse_args(["--stage", "rl", "--run-dir", str(tmp_path), *extra])
    return cfg


def test_the_shipped_checkpoint_is_a_tiny_model_with_its_recipe():
    from transformers import AutoConfig
    c = AutoConfig.from_pretrained(SHIPPED)
    cfg = klong.Config()
    assert (c.hidden_size, c.num_hidden_layers, c.vocab_size) == \
        (cfg.hidden_size, cfg.layers, cfg.vocab_size)
    assert (SHIPPED / "model.safetensors").stat().st_size < 8 * 2**20     # small enough to ship
    recipe = (SHIPPED / "README.md").read_text()
    assert "scripts/make_tiny_sft.sh" in recipe and "before" in recipe
    assert (ROOT / "scripts" / "make_tiny_sft.sh").exists()


def test_rl_starts_from_init_then_the_run_sft_then_the_shipped_checkpoint(tmp_path):
    assert grpo._init_path(_cfg(tmp_path)) == str(SHIPPED)
    assert grpo._init_path(_cfg(tmp_path, "--shipped-init", "")) is None        # a fresh model
    assert grpo._init_path(_cfg(tmp_path, "--init", "/x/y")) == "/x/y"
    (tmp_path / "sft" / "final").mkdir(parents=True)
    assert grpo._init_path(_cfg(tmp_path)) == str(tmp_path / "sft" / "final")
    assert grpo._model_to_eval(_cfg(tmp_path / "other")) == str(SHIPPED)


def test_task_score_is_mean_and_standard_error_over_scored_tasks():
    rows = [{"score": s, "stop_reason": r, "turns": t} for s, r, t in
            [(0.5, "max_turns", 10), (1.0, "end_task", 6), (None, "crash", 3), (0.0, "max_turns", 10)]]
    t = grpo.task_score(rows)
    assert t["score"] == pytest.approx(0.5)
    assert t["se"] == pytest.approx(0.5 / 3 ** 0.5)        # stdev(0.5, 1, 0) = 0.5, n = 3
    assert (t["n"], t["unscored"]) == (3, 1)                # the failed episode is not a 0
    assert t["end_rate"] == pytest.approx(0.25) and t["turns"] == pytest.approx(29 / 4)


def test_rl_reports_the_greedy_score_before_and_after_and_they_are_the_models_scores(tmp_path):
    """A two-step RL run from the shipped checkpoint: summary.json holds before/after over the
    held-out tasks, the log holds them as evaluation points at step 0 and the last step, and
    each equals a separate `--stage eval` of the model it claims to measure (greedy decoding is
    deterministic): the SFT checkpoint before, rl/final after."""
    small = ["--rl-timeouts", "6,10", "--rl-steps", "1,1", "--n-rollouts", "2",
             "--tasks-per-step", "1", "--n-tasks", "2", "--eval-tasks", "3", "--eval-timeout", "12"]
    cfg = _cfg(tmp_path, *small)
    grpo.run_rl(cfg)
    out = tmp_path / "rl"
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"before", "after", "wall_s"} and summary["wall_s"] > 0
    for k in ("before", "after"):
        assert set(summary[k]) == {"score", "se", "n"} and summary[k]["n"] == 3
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    evals = [r for r in log if "eval_score" in r]
    assert [r["step"] for r in evals] == [0, 2]
    assert [r["step"] for r in log if "reward_mean" in r] == [1, 2]
    steps = [r for r in log if "reward_mean" in r]           # episodes take pre-started sandboxes
    takes = [r["sandbox_hits"] + r["sandbox_waited"] + r["sandbox_opened"] for r in steps]
    assert takes[-1] >= sum(r["rollouts"] + r["failed"] for r in steps) and takes == sorted(takes)
    assert evals[0]["eval_score"] == pytest.approx(summary["before"]["score"])
    assert evals[1]["eval_score"] == pytest.approx(summary["after"]["score"])
    assert (out / "reward.png").stat().st_size > 1000

    def separate_eval(model: str, where: Path) -> float:
        ev = _cfg(where, "--model", model, *small)
        ev.tasks = str(tmp_path / "eval" / "tasks")                  # the same held-out tasks
        return grpo.run_eval(ev)["score_mean"]
    assert separate_eval(str(SHIPPED), tmp_path / "e0") == pytest.approx(summary["before"]["score"])
    assert separate_eval(str(out / "final"), tmp_path / "e1") == \
        pytest.approx(summary["after"]["score"])


def test_report_to_tensorboard_writes_the_scalars_of_log_jsonl(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    t = Tracker(tmp_path, "tensorboard", prefix="rl")
    recs = [{"step": 1, "reward_mean": 0.25, "kl": 0.01, "stage": 0, "note": "x"},
            {"step": 2, "reward_mean": 0.5, "kl": 0.02, "stage": 1, "flag": True}]
    for r in recs:
        t.log(r)
    t.close()
    assert [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()] == recs
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"rl/reward_mean", "rl/kl", "rl/stage"}   # numbers only
    got = [(e.step, e.value) for e in acc.Scalars("rl/reward_mean")]
    assert got == [(1, 0.25), (2, 0.5)]


def test_an_unknown_tracker_is_a_one_line_user_error(tmp_path, capsys):
    assert klong.main(["--stage", "rl", "--run-dir", str(tmp_path), "--report-to", "wandb"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--report-to" in err[0] and "tensorboard" in err[0]


def test_task_size_flags_reach_the_training_and_held_out_tasks(tmp_path):
    import synthetic
    cfg = _cfg(tmp_path, "--task-items", "5,6", "--task-log-words", "2", "--n-tasks", "3",
               "--eval-tasks", "2")
    specs = [synthetic.load_spec(t.dir) for t in grpo.training_tasks(cfg) + grpo.eval_tasks(cfg)]
    assert len(specs) == 5 and all(5 <= s.m <= 6 and s.log_words == 2 for s in specs)
    assert len({s.task_id for s in specs}) == 5                      # held out: another family
