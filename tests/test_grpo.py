"""Progressive RL: advantage and loss properties, sampled sub-trajectories, staleness, learning."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from hypothesis import given
from hypothesis import strategies as st

import grpo
import klong
from model import load_model
import split

ROOT = Path(__file__).resolve().parents[1]
rewards = st.lists(st.floats(0, 1, allow_nan=False), min_size=1, max_size=8)


@given(rewards, st.data())
def test_advantage_sums_to_zero_over_the_group_weighted_by_subtrajectories(Q, data):
    K = data.draw(st.lists(st.integers(1, 6), min_size=len(Q), max_size=len(Q)))
    A = grpo.group_advantages(Q, K)
    assert abs(sum(k * a for k, a in zip(K, A))) < 1e-9


@given(st.floats(0, 1), st.lists(st.integers(1, 6), min_size=1, max_size=8))
def test_equal_rewards_give_zero_advantage(q, K):
    assert all(abs(a) < 1e-12 for a in grpo.group_advantages([q] * len(K), K))
    assert all(abs(a) < 1e-6 for a in grpo.group_advantages([q] * len(K), K, std_norm=True))


@given(rewards, st.floats(-5, 5), st.data())
def test_advantage_is_shift_invariant(Q, c, data):
    K = data.draw(st.lists(st.integers(1, 6), min_size=len(Q), max_size=len(Q)))
    a, b = grpo.group_advantages(Q, K), grpo.group_advantages([q + c for q in Q], K)
    assert all(abs(x - y) < 1e-9 for x, y in zip(a, b))


def _loss_inputs(n, seed):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(n, generator=g) * 3).requires_grad_()
    old = logp.detach() + torch.randn(n, generator=g) * 0.3
    ref = logp.detach() + torch.randn(n, generator=g) * 0.3
    adv = torch.randn(n, generator=g)
    mask = torch.rand(n, generator=g) > 0.3
    return logp, old, ref, adv, mask


@given(st.integers(2, 40), st.integers(0, 10_000))
def test_masked_tokens_do_not_change_the_loss(n, seed):
    logp, old, ref, adv, mask = _loss_inputs(n, seed)
    base, _ = grpo.ppo_kl_loss(logp, old, ref, adv, mask, 0.2, 0.04)
    junk = torch.where(mask, 0.0, 7.0)
    other, _ = grpo.ppo_kl_loss(logp + junk, old - junk, ref + junk, adv + junk, mask, 0.2, 0.04)
    assert torch.allclose(base, other)


@given(st.integers(1, 40), st.integers(0, 10_000))
def test_ratio_one_and_zero_advantage_give_zero_gradient(n, seed):
    logp, _, _, _, mask = _loss_inputs(n, seed)
    loss, _ = grpo.ppo_kl_loss(logp, logp.detach(), logp.detach(), torch.zeros(n), mask, 0.2, 0.04)
    loss.backward()
    assert torch.allclose(logp.grad, torch.zeros(n), atol=1e-7)


@given(st.floats(0.05, 0.4), st.floats(0.5, 2.0), st.sampled_from([1.0, -1.0]))
def test_clipping_stops_the_gradient_beyond_one_plus_minus_eps(eps, excess, sign):
    """Â > 0 and r > 1+ε (or Â < 0 and r < 1−ε): the objective is flat, zero gradient."""
    old = torch.tensor([-1.0])
    r = (1 + eps) * (1 + excess) if sign > 0 else (1 - eps) / (1 + excess)
    logp = (old + torch.log(torch.tensor([r]))).requires_grad_()
    loss, d = grpo.ppo_kl_loss(logp, old, logp.detach(), torch.tensor([sign]),
                               torch.tensor([True]), eps, 0.0)
    loss.backward()
    assert logp.grad.abs().item() < 1e-9 and d["clip_frac"] == 1.0
    inside = old.clone().requires_grad_()                 # r = 1: unclipped, gradient −Â
    loss, _ = grpo.ppo_kl_loss(inside, old, old, torch.tensor([sign]), torch.tensor([True]), eps, 0)
    loss.backward()
    assert abs(inside.grad.item() + sign) < 1e-6


def test_sampled_subtrajectories_follow_the_contexts_actually_sampled():
    S = split.Sample
    samples = [S(0, [1, 2, 3], [4, 5], [-0.1, -0.2], 0),
               S(2, [1, 2, 3, 4, 5, 6], [7], [-0.3], 0),          # context grew: same sequence
               S(4, [1, 2, 9], [8], [-0.4], 1)]                   # re-truncated: a new one
    seqs = grpo.sampled_subtrajectories(samples)
    assert [s.ids for s in seqs] == [[1, 2, 3, 4, 5, 6, 7], [1, 2, 9, 8]]
    assert seqs[0].action_mask == [0, 0, 0, 1, 1, 0, 1]
    assert seqs[0].old_logp == [0, 0, 0, -0.1, -0.2, 0, -0.3]
    assert [s.versions for s in seqs] == [[0, 0], [1]]


def test_schedule_grows_timeouts_and_is_deterministic():
    cfg = klong.Config(rl_timeouts=(5, 10, 20), rl_steps=(2, 1, 3), tasks_per_step=2)
    a, b = grpo.schedule(cfg, 7), grpo.schedule(cfg, 7)
    assert [(s.stage, s.timeout) for s in a] == [(0, 5), (0, 5), (1, 10), (2, 20), (2, 20), (2, 20)]
    assert a == b and all(len(s.groups) == 2 for s in a)


def _rollout(score, versions, group="g"):
    t = split.Trajectory("r", "task", [], 0, samples=[
        split.Sample(0, [1, 2], [3], [-1.0], v) for v in versions])
    return grpo.Rollout(group, "task", score, t, "end_task", 1, 0.1, 0.0)


def test_staleness_is_measured_from_the_oldest_sample_of_a_rollout():
    assert _rollout(1.0, [3, 4, 5]).min_version == 3
    assert _rollout(1.0, []).min_version == 0


# ----------------------------------------------------------------------------- learning

def test_a_few_rl_steps_raise_the_reward_of_a_tiny_model():
    """Reward 1 when the sampled token id is even; tiny random model, fixed seed. The mean reward
    over 256 samples must rise from ~0.5 by well beyond its noise (SE ≈ 0.03)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    mk = lambda: LlamaForCausalLM(LlamaConfig(  # noqa: E731
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64))
    model = mk()
    ref = mk()
    ref.load_state_dict(model.state_dict())
    cfg = klong.Config(clip_eps=0.2, kl_beta=0.01, temperature=1.0, clip=1.0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    prompt = [5, 9, 11, 3]

    def sample(n, gen):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt])).logits[0, -1]
        logp = torch.log_softmax(logits, -1)
        toks = torch.multinomial(logp.exp(), n, replacement=True, generator=gen)
        return toks.tolist(), logp[toks].tolist()

    def mean_reward():
        toks, _ = sample(256, torch.Generator().manual_seed(123))
        return sum(t % 2 == 0 for t in toks) / 256

    before = mean_reward()
    gen = torch.Generator().manual_seed(1)
    for step in range(6):
        groups = []
        for task in range(4):
            toks, lps = sample(8, gen)
            groups.append([grpo.Rollout(f"s{step}t{task}", "even", float(t % 2 == 0),
                                        split.Trajectory(f"r{k}", "even", [], 0, samples=[
                                            split.Sample(0, prompt, [t], [lp], step)]),
                                        "end_task", 1, 0.0, 0.0)
                           for k, (t, lp) in enumerate(zip(toks, lps))])
        grpo.rl_update(model, ref, opt, groups, cfg, pad_id=0)
    after = mean_reward()
    print(f"mean reward {before:.3f} -> {after:.3f}")
    assert after > before + 0.2, (before, after)


# ----------------------------------------------------------------------------- rollouts for real

def _episode(tmp_path, context):
    import agent
    import synthetic
    cfg = klong.Config(hidden_size=32, intermediate_size=64, context_len=384, max_new_tokens=24)
    tok, model = load_model(cfg, for_training=False)
    task = synthetic.make_synthetic_tasks(tmp_path / "tasks", 1, seed=3)[0]
    policy = agent.LocalPolicy(model, tok, temperature=1.0, max_new_tokens=cfg.max_new_tokens,
                               seed=0)
    budget = agent.Budget(max_turns=14, context=cfg.split if context else None, reminder_every=0)
    return cfg, agent.run_episode(policy, task, budget, backend="auto",
                                    submission_out=tmp_path / "sub")


def test_a_local_rollout_without_retruncation_is_one_training_sequence(tmp_path):
    """Resolution 4: the policy's own replies are kept as sampled, so the contexts of an episode
    extend each other token for token and RL trains on them without re-tokenisation."""
    _, ep = _episode(tmp_path, context=False)
    samples = ep.trajectory.samples
    assert len(samples) == ep.turns >= 10
    for a, b in zip(samples, samples[1:]):
        assert b.context_ids[:len(a.context_ids) + len(a.action_ids)] == a.context_ids + a.action_ids
    seqs = grpo.sampled_subtrajectories(samples)
    assert len(seqs) == 1
    assert sum(seqs[0].action_mask) == sum(len(s.action_ids) for s in samples)


def test_rollout_subtrajectories_fit_the_window_the_policy_sampled_in(tmp_path):
    cfg, ep = _episode(tmp_path, context=True)
    seqs = grpo.sampled_subtrajectories(ep.trajectory.samples)
    assert len(seqs) >= 2, "the episode should have passed the 384-token window"
    assert all(len(s.ids) <= cfg.context_len for s in seqs)


def _rl_cmd(run_dir):
    return [sys.executable, "klong.py", "--stage", "rl", "--run-dir", str(run_dir),
            "--hidden-size", "32", "--intermediate-size", "64", "--context-len", "384",
            "--max-new-tokens", "16", "--rl-timeouts", "3,5", "--rl-steps", "2,2",
            "--n-rollouts", "2", "--tasks-per-step", "2", "--n-tasks", "4",
            "--rollout-workers", "2", "--rl-eval", "false", "--shipped-init", ""]


def test_rl_killed_and_rerun_resumes_with_no_judged_rollout_lost_or_redone(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    out = tmp_path / "rl"
    proc = subprocess.Popen(_rl_cmd(tmp_path), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list(out.glob("checkpoint-*/COMPLETE")) and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "final").exists(), "the run finished before it could be killed"
    before = (out / "rollouts.jsonl").read_text().splitlines()
    again = subprocess.run(_rl_cmd(tmp_path), cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout
    after = (out / "rollouts.jsonl").read_text().splitlines()
    assert after[:len(before)] == before, "judged rollouts were rewritten"
    groups = {}
    for line in after:
        r = json.loads(line)
        groups[r["group"]] = groups.get(r["group"], 0) + 1
    steps = grpo.schedule(klong.Config(rl_timeouts=(3, 5), rl_steps=(2, 2), tasks_per_step=2), 4)
    assert set(groups) == {g for s in steps for g, _ in s.groups}
    assert all(n == 2 for n in groups.values()), f"a rollout was lost or redone: {groups}"
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert {"reward_mean", "reward_std", "timeout_rate", "kl", "clip_frac", "judge_wait_s",
            "staleness", "dropped_stale", "failed", "turns"} <= set(log[0])
    assert (out / "reward.png").stat().st_size > 1000
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(out / "final")


# ----------------------------------------------------------------------------- exact values

def test_ppo_kl_loss_value_on_a_hand_computed_example():
    """One live token: r = 0.5/0.25 = 2, Â = 1, ε = 0.2 → −min(2, 1.2) = −1.2; Δ = log 0.25 −
    log 0.5 = −ln 2 → k3 = 0.5 + ln 2 − 1; β = 0.5. A masked second token changes nothing."""
    import math
    ln = math.log
    loss, d = grpo.ppo_kl_loss(torch.tensor([ln(0.5), 3.0]), torch.tensor([ln(0.25), -9.0]),
                               torch.tensor([ln(0.25), 5.0]), torch.tensor([1.0, 4.0]),
                               torch.tensor([True, False]), 0.2, 0.5)
    k3 = 0.5 + ln(2) - 1
    assert abs(loss.item() - (-1.2 + 0.5 * k3)) < 1e-6
    assert abs(d["kl"] - k3) < 1e-6 and d["clip_frac"] == 1.0 and abs(d["ratio"] - 2) < 1e-6


def test_staleness_screen_drops_failed_and_too_stale_rollouts_and_counts_them():
    """Policy version 5, max_staleness 1: staleness = 5 − the oldest sample's version."""
    fresh, edge = _rollout(1.0, [5]), _rollout(0.0, [4, 5])          # staleness 0 and 1: kept
    old = _rollout(1.0, [3, 5])                                       # staleness 2: dropped
    crashed = _rollout(1.0, [5])
    crashed.failed = "sandbox crash"
    unjudged = _rollout(None, [5])
    kept, failed, dropped, stale = grpo.screen_groups(
        [[fresh, old, crashed], [edge, unjudged]], version=5, max_staleness=1)
    assert kept == [[fresh], [edge]]
    assert (failed, dropped, stale) == (2, 1, [0, 1])
    kept, _, dropped, _ = grpo.screen_groups([[fresh, old, edge]], version=5, max_staleness=2)
    assert kept == [[fresh, old, edge]] and dropped == 0


def test_rl_update_normalises_by_the_subtrajectories_of_each_task_and_averages_tasks():
    """1/(n·K) on a hand-computed example. The LM head is zero with a trainable bias b = 0 over a
    2-token vocabulary, so log π(a) = log ½ at every position and ∂ log π(a)/∂b = e_a − ½.
    Task A: rollout 1 (Q = 1) sampled token 0 in two contexts (R₁ = 2 sub-trajectories),
    rollout 2 (Q = 0) token 1 once (R₂ = 1): mean 2/3, Â = (1/3, −2/3). Task B: equal rewards,
    Â = 0. Ratio 1 and π_ref = π_θ, so ∂L/∂b = 1/(ΣR_A · 2 tasks) · Σ_t −Â_t (e_{a_t} − ½)
    = 1/6 · (−2/3, 2/3) = (−1/9, 1/9); one SGD step at lr 1 gives b = (1/9, −1/9).
    (A single 1/ΣR over both tasks would give ±2/15, a per-token mean ±1/6; std_norm, the tiny
    preset's default, would scale Â by 1/std.)"""
    import copy
    import math
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=2, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
        tie_word_embeddings=False))
    for p in model.parameters():
        p.requires_grad_(False)
    model.lm_head.weight.zero_()
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(2))
    ref = copy.deepcopy(model)
    half = math.log(0.5)
    S = split.Sample

    def rollout(score, samples):
        return grpo.Rollout("g", "task", score, split.Trajectory("r", "task", [], 0,
                                                                 samples=samples),
                            "end_task", len(samples), 0.0, 0.0)
    task_a = [rollout(1.0, [S(0, [0], [0], [half], 0), S(2, [1], [0], [half], 0)]),
              rollout(0.0, [S(0, [0], [1], [half], 0)])]
    task_b = [rollout(0.5, [S(0, [1], [1], [half], 0)]), rollout(0.5, [S(0, [0], [0], [half], 0)])]
    assert [len(grpo.sampled_subtrajectories(r.trajectory.samples)) for r in task_a] == [2, 1]
    cfg = klong.Config(clip_eps=0.2, kl_beta=0.1, temperature=1.0, clip=1e9, std_norm=False)
    opt = torch.optim.SGD([model.lm_head.bias], lr=1.0)
    stats = grpo.rl_update(model, ref, opt, [task_a, task_b], cfg, pad_id=0)
    assert torch.allclose(model.lm_head.bias.detach(), torch.tensor([1 / 9, -1 / 9]), atol=1e-6)
    assert stats["sub_trajectories"] == 5 and stats["action_tokens"] == 5
