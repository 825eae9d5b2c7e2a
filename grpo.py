"""Progressive RL (KLong §3.4): staged rollout timeouts, partial rollouts, group advantage over
sub-trajectories, PPO-clip + KL. Also the evaluation stage (`klong.py --stage eval`).

Stages m = 1…M with timeouts T⁽¹⁾ < … < T⁽ᴹ⁾ (paper: 2 h, 4 h, 6 h). In stage m, every task of a
step gets n rollouts, each forcibly stopped at T⁽ᵐ⁾ and judged as it is; rollout j's code gets the
reward Q_j = 𝒥(Ĉ_j, 𝒦) (judge.py), and each of its K_j sub-trajectories i gets that reward:

    Â_{j,i} = Q_j − 1/(Σ_j' K_j') Σ_j' Σ_i' Q_j'            (group mean over all n·K, no std)
    L_RL    = − 1/(n·K) Σ_j Σ_i Σ_t min(r_t Â, clip(r_t, 1−ε, 1+ε) Â)  +  β·KL(π_θ ‖ π_ref)
    r_t     = π_θ(a_t | τ⁽ⁱ⁾_<t) / π_old(a_t | τ⁽ⁱ⁾_<t)

Resolutions where the paper is silent (docs/ARCHITECTURE.md 4-8), each repeated where it is coded:
 4. The sub-trajectories are the contexts the policy actually sampled from, token for token: the
    episode loop builds contexts with split.build_context, and every run of turns whose context
    only grew is one training sequence (no re-tokenisation).
 5. Every sub-trajectory of rollout j gets Q_j; K_j may differ between rollouts (the paper writes
    n·K), so the baseline is the K-weighted mean. No std division (flag `std_norm` adds it).
 6. Failed rollouts (sandbox crash, judge failure after retries) leave the group, counted.
 7. Partial rollouts: the next step's rollouts run while the current ones are judged and while the
    policy trains; every token keeps the behaviour log-prob it was sampled with (π_old in r_t), so
    rollouts sampled under older weights are corrected by the ratio; staler than `max_staleness`
    versions are dropped, counted.
 8. Judging goes through the priority queue as TRAIN jobs (evaluation jobs jump ahead).
Numerical choices: KL estimator k3 (Schulman): with Δ = log π_ref − log π_θ, KL ≈ e^Δ − Δ − 1
(alternatives k1 = −Δ, k2 = Δ²/2 are not implemented). Normaliser: the paper's 1/(n·K) per task,
averaged over the tasks of a step (alternatives: per-token mean as in GRPO/DAPO — not implemented).
"""
from __future__ import annotations

import json
import math
import random
import shutil
import statistics
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import dist
import judge
import judge_queue
import agent
import sandbox
import split
from sampler import BatchedSampler, Unsupported
from model import (_truncate_log, checkpoint_dtype, latest_checkpoint, load_checkpoint, load_model,
                   packed_logprobs, rng_state, save_checkpoint, set_rng_state)

TIMEOUTS = ("max_turns", "max_seconds")      # a rollout stopped by its stage's timeout

# ----------------------------------------------------------------------------- the math (pure)


def group_advantages(Q: list[float], K: list[int], std_norm: bool = False) -> list[float]:
    """Â_j for each rollout j of one task (shared by its K_j sub-trajectories).

    Â_j = Q_j − Σ_j' K_j' Q_j' / Σ_j' K_j'  — the mean over all n·K sub-trajectories (paper).
    std_norm divides by the K-weighted std (+1e-6): GRPO's variant, off by default (paper).
    """
    total = sum(K)
    if total == 0:
        return [0.0] * len(Q)
    mean = sum(k * q for k, q in zip(K, Q)) / total
    adv = [q - mean for q in Q]
    if std_norm:
        std = math.sqrt(sum(k * a * a for k, a in zip(K, adv)) / total)
        adv = [a / (std + 1e-6) for a in adv]
    return adv


def ppo_kl_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor,
                adv: torch.Tensor, mask: torch.Tensor, eps: float, beta: float
                ) -> tuple[torch.Tensor, dict]:
    """Σ_t over masked tokens of −min(r_t Â, clip(r_t, 1−ε, 1+ε) Â) + β·k3(π_θ‖π_ref); all [N].

    Returns the *sum* (the caller applies the 1/(n·K) normaliser) and diagnostics.
    """
    mask = mask.float()
    ratio = torch.exp(logp - old_logp)                                  # r_t
    pg_loss1 = -adv * ratio
    pg_loss2 = -adv * torch.clamp(ratio, 1 - eps, 1 + eps)
    pg_loss = torch.max(pg_loss1, pg_loss2)                             # = −min(r Â, clip(r) Â)
    delta = ref_logp - logp                                             # Δ = log π_ref − log π_θ
    kl = torch.exp(delta) - delta - 1                                   # k3 estimator, ≥ 0
    loss = ((pg_loss + beta * kl) * mask).sum()
    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        clipped = ((ratio - 1).abs() > eps).float()
        diag = {"kl": float((kl * mask).sum() / n), "clip_frac": float((clipped * mask).sum() / n),
                "ratio": float((ratio * mask).sum() / n)}
    return loss, diag


@dataclass
class SampledSeq:
    """One sub-trajectory as sampled: a context that only grew, and the actions taken in it."""
    ids: list[int]
    action_mask: list[int]          # 1 on sampled action tokens
    old_logp: list[float]           # behaviour log-probs on action tokens (0 elsewhere)
    versions: list[int]             # policy versions of the samples in it


def sampled_subtrajectories(samples: list[split.Sample]) -> list[SampledSeq]:
    """Resolution 4: consecutive samples whose context extends the previous context + action
    form one sequence (the KV cache was valid across them); a re-truncation starts a new one."""
    seqs: list[SampledSeq] = []
    for s in samples:
        cur = seqs[-1] if seqs else None
        if cur is not None and s.context_ids[:len(cur.ids)] == cur.ids:
            grow = s.context_ids[len(cur.ids):]
            cur.ids += grow + s.action_ids
            cur.action_mask += [0] * len(grow) + [1] * len(s.action_ids)
            cur.old_logp += [0.0] * len(grow) + list(s.logprobs)
            cur.versions.append(s.policy_version)
        else:
            seqs.append(SampledSeq(list(s.context_ids) + list(s.action_ids),
                                   [0] * len(s.context_ids) + [1] * len(s.action_ids),
                                   [0.0] * len(s.context_ids) + list(s.logprobs),
                                   [s.policy_version]))
    return seqs


def _as_packed(seqs: list[SampledSeq], pad_id: int) -> tuple[split.Packed, split.Packed]:
    """(batch with action targets, the same layout with targets = global token index)."""
    real, index, base = [], [], 0
    for k, s in enumerate(seqs):
        labels = [t if m else split.IGNORE for t, m in zip(s.ids, s.action_mask)]
        idx = [base + j if m else split.IGNORE for j, m in enumerate(s.action_mask)]
        base += len(s.ids)
        real.append(split.TokenizedSub(str(k), 0, s.ids, labels, 0))
        index.append(split.TokenizedSub(str(k), 0, s.ids, idx, 0))
    row = max(len(s.ids) for s in seqs)
    return (split.pack(real, row, pad_id, share_prefix=False),
            split.pack(index, row, pad_id, share_prefix=False))


@dataclass
class Rollout:
    """One judged rollout of a group."""
    group: str
    task_id: str
    score: float | None
    trajectory: split.Trajectory
    stop_reason: str
    turns: int
    wall_s: float
    judge_wait_s: float
    failed: str = ""

    @property
    def min_version(self) -> int:
        return min((s.policy_version for s in self.trajectory.samples), default=0)


def rl_update(model, ref_model, opt, groups: list[list[Rollout]], cfg, pad_id: int) -> dict:
    """One optimizer step on the groups of a step (L_RL above; 1/(n·K) per task, mean over tasks).

    Under torchrun every rank holds all the groups (run_rl broadcasts them) and trains on its share
    of the tasks (dist.share); the normaliser counts the tasks of all ranks and FSDP sums the
    ranks' gradients (dist.shard), so the step equals the one-process step. A rank with one task
    fewer runs a padding task (None: a real task's batch with an empty mask, zero loss)."""
    model.train()
    opt.zero_grad(set_to_none=True)
    stats = {"kl": 0.0, "clip_frac": 0.0, "tasks": 0, "tokens": 0, "sub_trajectories": 0}
    tasks = [g for g in groups if g]
    trainable = [g for g in tasks if any(r.trajectory.samples for r in g)]   # ≥ 1 sequence
    for g in dist.share(trainable):
        real = g is not None
        g = g if real else trainable[0]
        seqs_of = [sampled_subtrajectories(r.trajectory.samples) for r in g]
        K = [len(s) for s in seqs_of]
        A = group_advantages([r.score for r in g], K, std_norm=cfg.std_norm)
        seqs = [s for ss in seqs_of for s in ss]
        adv_of = [a for a, ss in zip(A, seqs_of) for _ in ss]
        batch, index = _as_packed(seqs, pad_id)
        flat_old = torch.tensor([x for s in seqs for x in s.old_logp])
        flat_adv = torch.tensor([a for a, s in zip(adv_of, seqs) for _ in s.ids])
        idx = index.targets.clamp(min=0)                                 # (B, T)
        mask = (index.targets != split.IGNORE) & real
        logp = packed_logprobs(model, batch, cfg.temperature)     # (B, T)
        with torch.no_grad():
            ref_logp = packed_logprobs(ref_model, batch, cfg.temperature)
        dev = logp.device
        loss_sum, d = ppo_kl_loss(logp, flat_old[idx].to(dev), ref_logp, flat_adv[idx].to(dev),
                                  mask.to(dev), cfg.clip_eps, cfg.kl_beta)
        loss = loss_sum / (sum(K) * len(tasks))                         # 1/(n·K), mean over tasks
        loss.backward()
        if real:
            stats["kl"] += d["kl"]
            stats["clip_frac"] += d["clip_frac"]
            stats["tasks"] += 1
            stats["tokens"] += int(mask.sum())
            stats["sub_trajectories"] += sum(K)
    gnorm = dist.clip_grad_norm_(model.parameters(), cfg.clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    kl, clip_frac, n, tokens, subs = dist.all_reduce_sum(
        [stats["kl"], stats["clip_frac"], stats["tasks"], stats["tokens"], stats["sub_trajectories"]])
    return {"kl": kl / n if n else 0.0, "clip_frac": clip_frac / n if n else 0.0,
            "action_tokens": int(tokens), "sub_trajectories": int(subs), "grad_norm": gnorm}


# ----------------------------------------------------------------------------- rollouts

class SharedPolicy:
    """The sampling copy of the policy: rollouts read it, the trainer publishes new weights.

    Episodes sample through sampler.BatchedSampler (all live episodes decode in one batched
    forward per token; weights are published between actions and every Sample records its
    version). A model the lean decoder does not know falls back to one LocalPolicy action at a
    time under a lock (the pre-batching path)."""

    def __init__(self, model, tokenizer, cfg):
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.lock = threading.Lock()
        self._version = 0
        try:
            self.sampler = BatchedSampler(model, tokenizer)
        except Unsupported as e:
            print(f"[rollouts] {e}: episodes sample one action at a time", flush=True)
            self.sampler = None

    @property
    def version(self) -> int:
        return self.sampler.version if self.sampler else self._version

    def publish(self, state_dict: dict, version: int) -> None:
        if self.sampler:
            self.sampler.publish(state_dict, version)
            return
        with self.lock:
            self.model.load_state_dict(state_dict)
            self._version = version

    def policy(self, greedy: bool = False, seed: int | None = None) -> "agent.Policy":
        """A sampler of the current weights; `seed` makes its sampling reproducible (None: fresh)."""
        temperature = 0.0 if greedy else self.cfg.temperature
        if self.sampler:
            return self.sampler.policy(temperature, self.cfg.max_new_tokens, seed)
        return _LockedPolicy(self, agent.LocalPolicy(
            self.model, self.tokenizer, temperature=temperature,
            max_new_tokens=self.cfg.max_new_tokens, version=self.version, seed=seed))


class _LockedPolicy:
    """A LocalPolicy whose every action samples from one consistent version of the weights
    (the fallback for models sampler.py does not know)."""

    def __init__(self, shared: SharedPolicy, inner):
        self.shared, self.inner = shared, inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def act(self, messages, tools):
        with self.shared.lock:
            self.inner.version = self.shared.version
            return self.inner.act(messages, tools)


def budget_for(cfg, timeout: float) -> "agent.Budget":
    turns = cfg.rl_timeout_unit == "turns"
    # no time reminders: the factory's trajectories have none, so contexts look like training
    return agent.Budget(max_turns=int(timeout) if turns else None,
                          max_seconds=None if turns else float(timeout), context=cfg.split,
                          reminder_every=0)


class RolloutManager:
    """Runs rollouts in a thread pool and judges them through the priority queue.

    Partial rollouts (resolution 7): `request` returns at once; episodes of later groups run while
    earlier ones are judged and while the trainer works; `wait_groups` returns whole groups.
    Every judged rollout is appended to `log_path` at once, so a kill loses none.
    """

    def __init__(self, shared: SharedPolicy, queue: judge_queue.JudgeQueue, grader, cfg, log_path: Path,
                 work_dir: Path):
        self.shared, self.queue, self.grader, self.cfg = shared, queue, grader, cfg
        self.pool = ThreadPoolExecutor(cfg.rollout_workers, thread_name_prefix="rollout")
        self.log_path, self.work_dir = log_path, work_dir
        self.groups: dict[str, list[Rollout]] = {}
        self.expected: dict[str, int] = {}
        self.pending: list[Future] = []
        self.lock = threading.Lock()

    def restore(self, rollouts: list[Rollout]) -> None:
        for r in rollouts:
            self.groups.setdefault(r.group, []).append(r)

    def request(self, group: str, task, n: int, timeout: float) -> None:
        """Start the missing rollouts of a group (idempotent; restored rollouts count)."""
        if group in self.expected:
            return
        have = len(self.groups.get(group, []))
        self.expected[group] = n
        for k in range(have, n):
            self.pending.append(self.pool.submit(self._one, group, task, timeout, k))

    def _episode(self, task, timeout: float, out: Path) -> "agent.Episode":
        return agent.run_episode(self.shared.policy(), task, budget_for(self.cfg, timeout),
                                   backend=self.cfg.sandbox, submission_out=out)

    def _grade(self, task, ep) -> float:
        return judge.grade_submission(task.dir, ep.submission_dir, self.grader,
                                      backend=self.cfg.sandbox).score

    def _one(self, group: str, task, timeout: float, k: int) -> None:
        out = self.work_dir / f"{group}-{k}"
        t0 = time.perf_counter()
        try:
            ep = self._episode(task, timeout, out)
        except Exception as e:                                   # resolution 6: leaves the group
            self._add(Rollout(group, task.id, None, split.Trajectory(f"{group}-{k}", task.id, [], 0),
                              "crash", 0, time.perf_counter() - t0, 0.0, failed=f"sandbox: {e}"))
            return
        ep.trajectory.id = f"{group}-{k}"
        if ep.failed or ep.submission_dir is None:                 # resolution 6
            self._add(Rollout(group, task.id, None, ep.trajectory, ep.stop_reason, ep.turns,
                              ep.wall_s, 0.0, failed=ep.stop_reason))
            return

        def judged(job: judge_queue.JudgeJob) -> None:
            try:
                score, failed = float(job.result()), ""
            except judge.JudgeFailure as e:                      # resolution 6
                score, failed = None, f"judge: {e}"
            shutil.rmtree(out, ignore_errors=True)
            self._add(Rollout(group, task.id, score, ep.trajectory, ep.stop_reason, ep.turns,
                              ep.wall_s, job.queue_wait_s, failed))
        # resolution 8: judged as a TRAIN job; this rollout worker is free for the next episode
        # at once (no idle rollout machines while the judge works: the paper's pipeline fix)
        self.queue.submit(lambda: self._grade(task, ep), judge_queue.Priority.TRAIN,
                          deadline_s=600).add_done_callback(judged)

    def _add(self, r: Rollout) -> None:
        with self.lock:
            self.groups.setdefault(r.group, []).append(r)
            with open(self.log_path, "a") as f:
                f.write(json.dumps(asdict(r)) + "\n")

    def wait_groups(self, names: list[str]) -> list[list[Rollout]]:
        while True:
            with self.lock:
                if all(len(self.groups.get(g, [])) >= self.expected.get(g, 0) for g in names):
                    return [list(self.groups.pop(g)) for g in names]
            for f in [f for f in self.pending if f.done()]:
                f.result()                                       # re-raise programming errors
                self.pending.remove(f)
            time.sleep(0.01)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def rollout_from_dict(d: dict) -> Rollout:
    d = dict(d)
    d["trajectory"] = split.trajectory_from_dict(d["trajectory"], f"rollout {d.get('group')}")
    return Rollout(**d)


# ----------------------------------------------------------------------------- the training loop

@dataclass
class Step:
    """One optimizer step of the schedule: its stage, timeout and the groups it trains on."""
    index: int
    stage: int
    timeout: float
    groups: list[tuple[str, int]] = field(default_factory=list)   # (group name, task index)


def schedule(cfg, n_tasks: int) -> list[Step]:
    """Stages with growing timeouts T⁽¹⁾ < … < T⁽ᴹ⁾, each with its number of steps; the tasks of
    each step are drawn deterministically from the seed (so a resumed run asks for the same)."""
    if list(cfg.rl_timeouts) != sorted(cfg.rl_timeouts) or len(cfg.rl_timeouts) != len(cfg.rl_steps):
        raise ValueError("rl_timeouts must grow and have as many entries as rl_steps")
    rng = random.Random(cfg.seed)
    steps = []
    for m, (T, n) in enumerate(zip(cfg.rl_timeouts, cfg.rl_steps)):
        for _ in range(n):
            i = len(steps)
            picks = rng.sample(range(n_tasks), min(cfg.tasks_per_step, n_tasks))
            steps.append(Step(i, m, T, [(f"step{i}-task{t}", t) for t in picks]))
    return steps


def training_tasks(cfg) -> list:
    import synthetic
    tdir = Path(cfg.run_dir) / "factory" / "tasks"
    if not tdir.exists() or not any(tdir.iterdir()):
        synthetic.make_synthetic_tasks(tdir, cfg.n_tasks, cfg.seed)
    return [sandbox.load_task(d) for d in sorted(p for p in tdir.iterdir() if p.is_dir())]


def _init_path(cfg) -> str | None:
    if cfg.init:
        return cfg.init
    sft = Path(cfg.run_dir) / "sft" / "final"
    return str(sft) if sft.exists() else None


def plot_rewards(log: list[dict], path: Path) -> None:
    """Reward by step, coloured by stage (PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for m in sorted({r["stage"] for r in log}):
        recs = [r for r in log if r["stage"] == m]
        ax.errorbar([r["step"] for r in recs], [r["reward_mean"] for r in recs],
                    yerr=[r["reward_std"] for r in recs], marker="o", capsize=3,
                    label=f"stage {m + 1} (T = {recs[0]['timeout']:g})")
    ax.set_xlabel("RL step")
    ax.set_ylabel("judge score Q (mean ± std over rollouts)")
    ax.set_title("Progressive RL: reward by stage")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_rl(cfg) -> Path:
    """All stages on the configured tasks; checkpoint every step; a killed run resumes with every
    judged rollout kept (rollouts.jsonl) and the consumed ones recorded in the checkpoint.

    Under torchrun (dist.py) rank 0 alone samples rollouts (its sampler copy, the sandbox pool and
    the judge queue), logs and plots; it broadcasts each step's judged groups, every rank trains
    on its share (rl_update), and the new weights are gathered on rank 0 for its sampler."""
    from tqdm import tqdm
    out = Path(cfg.run_dir) / "rl"
    out.mkdir(parents=True, exist_ok=True)
    if dist.is_main():
        training_tasks(cfg)                                     # made once, by rank 0
    dist.barrier()
    tasks = training_tasks(cfg)
    steps = schedule(cfg, len(tasks))
    resume = latest_checkpoint(out)
    init = _init_path(cfg)
    tok, model = load_model(cfg, init)
    model = dist.shard(model, cfg)
    _, ref_model = load_model(cfg, init)                  # π_ref: the SFT model
    ref_model = dist.shard(ref_model.eval().requires_grad_(False), cfg)
    if dist.is_main():                                          # rollouts sample from this copy
        _, sampler = load_model(cfg, init, for_training=False)
        sampler.eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.rl_lr, betas=(0.9, 0.95),
                            weight_decay=cfg.weight_decay)
    start, consumed = 0, set()
    if resume:
        st = load_checkpoint(resume, model, opt)
        set_rng_state(st["rng"])
        start, consumed = st["step"], set(st["consumed"])
        if dist.is_main():
            _truncate_log(out / "log.jsonl", start)
        dist.print0(f"[rl] resumed from {resume} at step {start}")
    dist.print0(f"[rl] {len(tasks)} tasks, stages T={list(cfg.rl_timeouts)} ({cfg.rl_timeout_unit}), "
                f"steps {list(cfg.rl_steps)}, n={cfg.n_rollouts}, init={init or 'fresh tiny model'}, "
                f"{dist.world()} process(es)")
    weights = dist.full_state_dict(model)                       # rank 0: the policy to sample
    if dist.is_main():
        shared = SharedPolicy(sampler, tok, cfg)
        shared.publish(weights, start)
        grader = judge.parse_grader(cfg.judge, backend=cfg.sandbox)
        queue = judge_queue.JudgeQueue(workers=cfg.judge_workers)
        work = Path(tempfile.mkdtemp(prefix="klong_rl_"))
        mgr = RolloutManager(shared, queue, grader, cfg, out / "rollouts.jsonl", work)
        if (out / "rollouts.jsonl").exists():
            mgr.restore([r for r in map(rollout_from_dict, map(json.loads,
                         (out / "rollouts.jsonl").read_text().splitlines()))
                         if r.group not in consumed])

    def request(step: Step) -> None:
        for g, t in step.groups:
            mgr.request(g, tasks[t], cfg.n_rollouts, step.timeout)

    def collect(step: Step) -> tuple[list[list[Rollout]], dict]:
        """Rank 0: the step's judged groups without failed or too-stale rollouts, and counts."""
        request(step)                             # no-op when it was started during the last step
        nxt = steps[step.index + 1] if step.index + 1 < len(steps) else None
        if nxt is not None and nxt.stage == step.stage:
            request(nxt)                          # partial rollouts: the next step starts now
        groups = mgr.wait_groups([g for g, _ in step.groups])
        version = shared.version
        kept, dropped, failed, stale = [], 0, 0, []
        for g in groups:
            ok = []
            for r in g:
                if r.failed or r.score is None:
                    failed += 1                       # resolution 6
                elif version - r.min_version > cfg.max_staleness:
                    dropped += 1                      # resolution 7
                else:
                    ok.append(r)
                    stale.append(version - r.min_version)
            kept.append(ok)
        done = [r for g in kept for r in g]
        rewards = [r.score for r in done] or [0.0]
        return kept, {"reward_mean": statistics.fmean(rewards),
                      "reward_std": statistics.pstdev(rewards),
                      "timeout_rate": statistics.fmean([r.stop_reason in TIMEOUTS for r in done] or [0]),
                      "turns": statistics.fmean([r.turns for r in done] or [0]),
                      "judge_wait_s": statistics.fmean([r.judge_wait_s for r in done] or [0]),
                      "staleness": statistics.fmean(stale or [0]), "dropped_stale": dropped,
                      "failed": failed, "rollouts": len(done)}

    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()] \
        if (out / "log.jsonl").exists() else []
    bar = tqdm(total=len(steps), initial=start, desc="rl", unit="step", dynamic_ncols=True,
               disable=not dist.is_main())
    try:
        for step in steps[start:]:
            t0 = time.perf_counter()
            kept, info = collect(step) if dist.is_main() else (None, {})
            kept = dist.broadcast(kept)                   # every rank: all groups of the step
            d = rl_update(model, ref_model, opt, kept, cfg, tok.pad_token_id)
            weights = dist.full_state_dict(model)
            consumed |= {g for g, _ in step.groups}
            if dist.is_main():
                shared.publish(weights, shared.version + 1)
                rec = {"step": step.index + 1, "stage": step.stage, "timeout": step.timeout,
                       **info, "step_s": time.perf_counter() - t0, **d}
                log.append(rec)
                with open(out / "log.jsonl", "a") as f:
                    f.write(json.dumps(rec) + "\n")
            save_checkpoint(out, model, opt, tok, {
                "step": step.index + 1, "rng": rng_state(), "consumed": sorted(consumed),
                "config": asdict(cfg)}, pretrained=checkpoint_dtype(cfg))
            if dist.is_main():
                plot_rewards(log, out / "reward.png")
            bar.update(1)
            bar.set_postfix(stage=step.stage + 1, reward=f"{info.get('reward_mean', 0):.3f}",
                            kl=f"{d['kl']:.4f}")
    finally:
        bar.close()
        if dist.is_main():
            mgr.close()
            queue.close(cancel_pending=True)
            shutil.rmtree(work, ignore_errors=True)
    final = out / "final"
    dist.export_pretrained(final, model, tok, getattr(torch, cfg.dtype))
    dist.print0(f"[rl] done: {final}; metrics {out / 'log.jsonl'}, plot {out / 'reward.png'}")
    return final


# ----------------------------------------------------------------------------- evaluation

def eval_tasks(cfg) -> list:
    import synthetic
    if cfg.tasks:
        root = Path(cfg.tasks)
        dirs = [root] if (root / "paper.md").exists() else sorted(
            p for p in root.iterdir() if (p / "paper.md").exists())
        if not dirs:
            raise FileNotFoundError(f"--tasks {root}: no PaperBench-format task folder")
        return [sandbox.load_task(d) for d in dirs]
    tdir = Path(cfg.run_dir) / "eval" / "tasks"
    if not tdir.exists():
        synthetic.make_synthetic_tasks(tdir, cfg.eval_tasks, cfg.seed + 10_000)   # held out
    return [sandbox.load_task(d) for d in sorted(p for p in tdir.iterdir() if p.is_dir())]


def _model_to_eval(cfg) -> str | None:
    """`--model CKPT` (or `--init`), else the run's RL model, else its SFT model."""
    if cfg.model != "tiny":
        return cfg.model
    for cand in (cfg.init, Path(cfg.run_dir) / "rl" / "final", Path(cfg.run_dir) / "sft" / "final"):
        if cand and Path(cand).exists():
            return str(cand)
    return None


def run_eval(cfg, greedy: bool = True) -> dict:
    """Run the agent on held-out tasks, judge (EVAL priority), report the paper's columns:
    score mean ± standard error over seeds, assistant turns, wall time, timeout rate."""
    from tqdm import tqdm
    out = Path(cfg.run_dir) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    tasks = eval_tasks(cfg)
    path = _model_to_eval(cfg)
    tok, model = load_model(cfg, path, for_training=False)
    model.eval().requires_grad_(False)
    shared = SharedPolicy(model, tok, cfg)
    grader = judge.parse_grader(cfg.judge, backend=cfg.sandbox)
    budget = budget_for(cfg, cfg.eval_timeout)
    if greedy and cfg.seeds > 1:
        print(f"[eval] greedy decoding is deterministic: the {cfg.seeds} seeds repeat the same "
              "episodes (SE 0); for a spread, train and evaluate several seeds (bench/miniature.py)",
              flush=True)
    def episode(seed: int, k: int, task, queue) -> dict:
        """One judged episode; `rollout_workers` of them run at once on the batched sampler."""
        with tempfile.TemporaryDirectory(prefix="klong_eval_") as tmp:
            policy = shared.policy(greedy=greedy, seed=(cfg.seed + seed) * 100_003 + k)
            ep = agent.run_episode(policy, task, budget,
                                   backend=cfg.sandbox, submission_out=Path(tmp) / "sub")
            job = queue.submit(lambda: judge.grade_submission(
                task.dir, ep.submission_dir, grader, backend=cfg.sandbox).score,
                judge_queue.Priority.EVAL, deadline_s=600)
            try:
                score = float(job.result())
            except judge.JudgeFailure as e:
                score = None
                print(f"[eval] judge failed on {task.id}: {e}", flush=True)
        return {"seed": seed, "task": task.id, "score": score, "turns": ep.turns,
                "wall_s": ep.wall_s, "timed_out": ep.stop_reason in TIMEOUTS,
                "stop_reason": ep.stop_reason}

    rows = []
    with judge_queue.JudgeQueue(workers=cfg.judge_workers) as queue, \
            ThreadPoolExecutor(cfg.rollout_workers, thread_name_prefix="eval") as pool:
        bar = tqdm(total=cfg.seeds * len(tasks), desc="eval", unit="episode", dynamic_ncols=True)
        futures = [pool.submit(episode, seed, k, task, queue)
                   for seed in range(cfg.seeds) for k, task in enumerate(tasks)]
        for f in futures:                                  # rows in (seed, task) order
            rows.append(f.result())
            bar.update(1)
        bar.close()
    per_seed = [statistics.fmean([r["score"] for r in rows if r["seed"] == s and r["score"] is not None]
                                 or [0.0]) for s in range(cfg.seeds)]
    se = statistics.stdev(per_seed) / math.sqrt(len(per_seed)) if len(per_seed) > 1 else 0.0
    summary = {"model": path or "fresh tiny model", "tasks": len(tasks), "seeds": cfg.seeds,
               "score_mean": statistics.fmean(per_seed), "score_se": se,
               "turns": statistics.fmean(r["turns"] for r in rows),
               "wall_s": statistics.fmean(r["wall_s"] for r in rows),
               "timeout_rate": statistics.fmean(r["timed_out"] for r in rows),
               "end_rate": statistics.fmean(r["stop_reason"] == "end_task" for r in rows),
               "judge_failures": sum(r["score"] is None for r in rows), "episodes": rows}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    md = ("| model | score (mean ± SE over seeds) | assistant turns | wall time (s) | timeout rate "
          "| END rate |\n|---|---|---|---|---|---|\n"
          f"| {summary['model']} | {summary['score_mean']:.3f} ± {se:.3f} | {summary['turns']:.1f} "
          f"| {summary['wall_s']:.2f} | {summary['timeout_rate']:.2f} | {summary['end_rate']:.2f} |\n")
    (out / "results.md").write_text(md)
    print(md, flush=True)
    return summary
