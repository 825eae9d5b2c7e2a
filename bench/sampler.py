"""Rollout tokens/s: the batched sampler (sampler.py) vs today's per-episode decoding (issue 16).

Same model (the tiny preset: model.load_model on klong.Config()), same synthetic tasks, in one
process, with N = 1, 4, 8, 16 episodes running at once (threads, as RolloutManager's
`rollout_workers`; each worker runs `--per-worker` episodes back to back, as RL's workers do):

- per-episode (the anchor, grpo's pre-batching path): each episode has its own agent.LocalPolicy
  (KV cache kept across turns) and one action is sampled at a time under the shared lock;
- batched: each episode has a sampler.EpisodePolicy on one BatchedSampler.

Two settings, each rollout tokens/s = sampled action tokens of all N episodes / their wall time:
- `episodes`: agent.run_episode on the local sandbox, contexts by split.build_context as in RL,
  `--turns` turns (default 24: the first RL stage); sandboxes from a sandbox_pool.SandboxPool of
  N filled before the clock (as grpo.RolloutManager's in a running RL job; `--pool cold`: it
  starts empty with the clock; `--pool none`: each episode opens its own);
  sandbox start-up, tools and context building count for both arms, so this is what RL sees
  (the share of the wall time outside the span in which episodes ask for actions is recorded:
  the batched sampler idles through it). The sandboxes' processes share the two cores with the
  decoder: that costs the batched arm (it keeps a core busy) more than the per-episode one;
- `sampler`: the same episode contexts without a sandbox (each observation a fixed short text),
  so the ratio is the decoders' alone.
One intra-op thread (torch.set_num_threads(1)) for both, so the ratio is the decoder's, not the
thread count's. On a shared machine other processes' load moves wall-clock ratios a lot: each
N runs `--rounds` rounds (default 3) of per-episode then batched back to back, and the quoted
ratio is the median of the rounds' ratios (each round's is kept in the JSON); each is also given
per CPU-second of this process (tokens / process CPU time; sandbox processes are children and
not counted, for both).

    python bench/sampler.py            # N = 1, 4, 8, 16; writes bench/results/sampler-cpu.json
    python bench/sampler.py --quick    # N = 8, 2 episodes a worker (≤ 3 min); last line: JSON with "speedup"
                                       # (RL episodes) and "speedup_sampler" (the sampler alone)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import agent  # noqa: E402
import grpo  # noqa: E402
import klong  # noqa: E402
import sampler  # noqa: E402
import sandbox  # noqa: E402
import split  # noqa: E402
import synthetic  # noqa: E402
from common import header, write  # noqa: E402
from sandbox_pool import SandboxPool  # noqa: E402
from model import load_model  # noqa: E402


def at_once(fn, n: int) -> tuple[float, float]:
    """fn(0), …, fn(n − 1) in n threads at once; (wall time, this process's CPU time) (the first
    error is raised)."""
    errors = []

    def run(k):
        try:
            fn(k)
        except Exception as e:  # noqa: BLE001  (raised below, in the main thread)
            errors.append(e)
    t0, c0 = time.perf_counter(), time.process_time()
    threads = [threading.Thread(target=run, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit(f"bench/sampler.py: {len(errors)} episode(s) failed: {errors[0]!r}")
    return time.perf_counter() - t0, time.process_time() - c0


def rates(n: int, tokens: int, wall: float, cpu: float) -> dict:
    return {"episodes": n, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "cpu_s": cpu, "tokens_per_cpu_s": tokens / cpu}


class _Timed:
    """A policy that records when its episode's first action was asked for and its last answered."""

    def __init__(self, policy):
        self.policy, self.first, self.last = policy, None, None

    def __getattr__(self, name):
        return getattr(self.policy, name)

    def act(self, messages, tools):
        self.first = self.first or time.perf_counter()
        reply = self.policy.act(messages, tools)
        self.last = time.perf_counter()
        return reply


def run_episodes(make_policy, tasks, budget, n: int, backend: str, per_worker: int = 1,
                 pool: str = "warm") -> dict:
    """n workers at once, each running `per_worker` episodes back to back (as RL's rollout
    workers do; episode j of worker k on tasks[(k + j·n) % len], policy seed k + j·n): their
    sampled tokens per second, and how much of the wall time lies outside the span in which any
    episode asked for actions (sandbox start-up before the first action, submission download and
    clean-up after the last). `pool`: "warm" (the episodes take their sandboxes from a
    sandbox_pool.SandboxPool of n, as grpo's RolloutManager does, filled before the clock starts:
    RL's pool is filled once at the start of a run and kept full while episodes run), "cold" (the
    same pool, started empty with the clock: the first wave waits for start-up) or "none" (each
    episode opens its own sandbox). Both arms get the same sandbox machinery."""
    eps, timed = [None] * (n * per_worker), [None] * (n * per_worker)
    boxes = SandboxPool(n, backend, limit=n * per_worker) if pool != "none" else None
    if pool == "warm" and not boxes.wait_ready(timeout=300):
        raise SystemExit(f"bench/sampler.py: the sandbox pool did not fill: {boxes.last_error}")

    def one(k):
        for j in range(per_worker):
            e = k + j * n
            with tempfile.TemporaryDirectory(prefix="klong_bench_") as tmp:
                timed[e] = _Timed(make_policy(e))
                eps[e] = agent.run_episode(timed[e], tasks[e % len(tasks)], budget, backend=backend,
                                           submission_out=Path(tmp) / "sub", sandboxes=boxes)
                if eps[e].failed:
                    raise RuntimeError(eps[e].trajectory.meta.get("error"))
    t0 = time.perf_counter()
    try:
        wall, cpu = at_once(one, n)
    finally:
        stats = boxes.stats if boxes else {}
        if boxes:
            boxes.close()
    span = max(t.last for t in timed) - min(t.first for t in timed)
    return {**rates(n, sum(len(s.action_ids) for e in eps for s in e.trajectory.samples), wall, cpu),
            "episodes_run": len(eps), "sandbox_pool": stats,
            "before_first_action_s": min(t.first for t in timed) - t0,
            "outside_action_span_share": 1 - span / wall}


def run_contexts(make_policy, tasks, budget, n: int, _backend: str, per_worker: int = 1,
                 _pool: str = "none") -> dict:
    """n workers at once, each running `per_worker` episode loops back to back without a sandbox:
    the same contexts (build_context over a growing history), each observation a fixed short
    text."""
    counts = [0] * n

    def one(k):
        for j in range(per_worker):
            loop(k, k + j * n)

    def loop(k, e):
        policy, task = make_policy(e), tasks[e % len(tasks)]
        messages = [{"role": "system", "content": agent.SYSTEM_PROMPT},
                    {"role": "user", "content": task.instructions}]
        window = 2
        for turn in range(budget.max_turns):
            context, window = split.build_context(messages, 2, window, policy.count_tokens,
                                                  budget.context)
            reply = policy.act(context, agent.TOOLS)
            counts[k] += len(reply.sample.action_ids)
            messages += [agent._normalise(reply.message, turn), {"role": "user", "content": OBS}]
    wall, cpu = at_once(one, n)
    return rates(n, sum(counts), wall, cpu)


OBS = "[exit code 1]\nbash: command not found"


def measure(model, tok, cfg, tasks, budget, n: int, backend: str, run, rounds: int,
            per_worker: int, pool: str) -> dict:
    """`rounds` rounds, each per-episode then batched back to back (load from other processes moves
    between rounds more than within one): the ratio of each round, and their median."""
    lock = SimpleNamespace(lock=threading.Lock(), version=0)     # grpo's _LockedPolicy needs these
    per, bat = [], []
    for _ in range(rounds):
        per.append(run(lambda k: grpo._LockedPolicy(lock, agent.LocalPolicy(
            model, tok, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, seed=k)),
            tasks, budget, n, backend, per_worker, pool))
        smp = sampler.BatchedSampler(model, tok)
        bat.append(run(lambda k: smp.policy(cfg.temperature, cfg.max_new_tokens, seed=k),
                       tasks, budget, n, backend, per_worker, pool))
        bat[-1]["mean_batch_rows"] = smp.step_rows / max(smp.steps, 1)
    ratios = [b["tokens_per_s"] / a["tokens_per_s"] for a, b in zip(per, bat)]
    ratios_cpu = [b["tokens_per_cpu_s"] / a["tokens_per_cpu_s"] for a, b in zip(per, bat)]
    k = ratios.index(statistics.median_low(ratios))              # the median round
    r = {"episodes": n, "per_episode": per[k], "batched": bat[k],
         "speedup": statistics.median(ratios), "speedup_cpu": statistics.median(ratios_cpu),
         "rounds": [{"per_episode_tokens_per_s": a["tokens_per_s"],
                     "batched_tokens_per_s": b["tokens_per_s"], "speedup": x, "speedup_cpu": c}
                    for a, b, x, c in zip(per, bat, ratios, ratios_cpu)]}
    outside = "" if run is not run_episodes else (
        f"; wall outside the action span: per-episode "
        f"{100 * per[k]['outside_action_span_share']:.0f}%, batched "
        f"{100 * bat[k]['outside_action_span_share']:.0f}%")
    print(f"{'episodes' if run is run_episodes else 'sampler':8s} N={n:2d}: per-episode "
          f"{per[k]['tokens_per_s']:6.0f} tok/s, batched {bat[k]['tokens_per_s']:6.0f} tok/s "
          f"(mean {bat[k]['mean_batch_rows']:.1f} rows/step) → {r['speedup']:.2f}× median of "
          f"{rounds} [{', '.join(f'{x:.2f}×' for x in ratios)}] (per CPU-second "
          f"{r['speedup_cpu']:.2f}×){outside}", flush=True)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="N = 8 only, 2 episodes per worker (≤ 3 minutes on a quiet machine)")
    ap.add_argument("--episodes", default="1,4,8,16", help="concurrent episodes to measure")
    ap.add_argument("--turns", type=int, default=24,
                    help="assistant turns per episode (default: the first RL stage, rl_timeouts[0])")
    ap.add_argument("--backend", default="local", help="sandbox backend (local | docker | auto)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds of (per-episode, batched) back to back; the median ratio is quoted")
    ap.add_argument("--per-worker", type=int, default=3,
                    help="episodes each of the N workers runs back to back (RL's rollout workers "
                         "run one episode after another)")
    ap.add_argument("--pool", choices=("warm", "cold", "none"), default="warm",
                    help="sandboxes from a SandboxPool filled before the clock starts (warm: RL's "
                         "steady state), started empty with it (cold), or none: each episode "
                         "opens its own")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "sampler-cpu.json",
                    help="where the full run writes its JSON (not with --quick)")
    ap.add_argument("--config", default="",
                    help="klong.Config fields for another model size, e.g. "
                         "hidden_size=512,layers=4,heads=8,kv_heads=4,intermediate_size=2048 "
                         "(a fresh random model of that shape; default: the tiny preset)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    ns = [8] if a.quick else [int(x) for x in a.episodes.split(",")]
    per_worker = min(a.per_worker, 2) if a.quick else a.per_worker
    try:
        cfg = klong.Config(**{k: int(v) for k, v in (kv.split("=") for kv in a.config.split(",")
                                                     if kv)})
    except (ValueError, TypeError) as e:      # not KEY=INT, or no such Config field
        ap.error(f"--config {a.config!r}: expected FIELD=INT,... of klong.Config ({e})")
    tok, model = load_model(cfg, for_training=False)
    model.eval().requires_grad_(False)
    budget = agent.Budget(max_turns=a.turns, context=cfg.split, reminder_every=0)
    with tempfile.TemporaryDirectory(prefix="klong_bench_tasks_") as tmp:
        tasks = [sandbox.load_task(d) for d in
                 synthetic.make_synthetic_tasks(Path(tmp) / "tasks", 4, seed=cfg.seed)]
        run_episodes(lambda k: agent.LocalPolicy(model, tok, max_new_tokens=4, seed=k), tasks,
                     agent.Budget(max_turns=1, reminder_every=0), 1, a.backend)      # warm-up
        results = {name: [measure(model, tok, cfg, tasks, budget, n, a.backend, run, a.rounds,
                                  per_worker, a.pool) for n in ns]
                   for name, run in (("sampler", run_contexts), ("episodes", run_episodes))}
    at8 = {name: next((r for r in rs if r["episodes"] == 8), None) for name, rs in results.items()}
    res = {**header("sampler"),
           "model": {"hidden": cfg.hidden_size, "layers": cfg.layers, "heads": cfg.heads,
                     "intermediate": cfg.intermediate_size,
                     "kv_heads": cfg.kv_heads, "vocab": len(tok), "dtype": cfg.dtype},
           "params": {"turns": a.turns, "max_new_tokens": cfg.max_new_tokens,
                      "context_len": cfg.context_len, "temperature": cfg.temperature,
                      "backend": a.backend, "quick": a.quick, "rounds": a.rounds,
                      "per_worker": per_worker, "sandbox_pool": a.pool},
           "results": results, "speedup": at8["episodes"] and at8["episodes"]["speedup"],
           "speedup_sampler": at8["sampler"] and at8["sampler"]["speedup"], "target_speedup": 5.0}
    if not a.quick:
        print(f"wrote {write(a.out, res)}")
    print(json.dumps({"speedup": res["speedup"], "speedup_sampler": res["speedup_sampler"],
                      "episodes": 8, "tokens_per_s": {
                          name: {k: r[k]["tokens_per_s"] for k in ("per_episode", "batched")}
                          for name, r in at8.items() if r}}))


if __name__ == "__main__":
    main()
