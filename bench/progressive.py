"""Progressive RL vs one long stage at equal wall time, in the paper's regime (issue 15 item 3).

The paper's reason for progressive timeouts (§3.4): full-horizon rollouts are expensive and rarely
rewarded early in RL, so the first stages use short rollouts (2 h, then 4 h, then 6 h of a 12 h
evaluation). The regime here:

  task variant  the synthetic two-phase family (synthetic.py) with M = 32 items per phase for every
                task (`--task-items 32,32`): a perfect agent needs 2M + 2 = 66 assistant turns of
                the 68-turn evaluation budget; the starting checkpoint (checkpoints/tiny-sft, the
                trajectory-splitting SFT model) copies the teacher's flaw (a wasted `step s` after
                every even item), needs ~98 turns and runs out of budget in phase 2.
  horizon       full horizon T = 68 turns ≥ 3 × the first stage's timeout (22 turns): a stage-1
                rollout costs about a third of a full one.
  early reward  partial credit: every rubric leaf is one item, so a 22-turn rollout is rewarded
                for the items it wrote (≈ 0.2-0.3), never for finishing.
  P             progressive stages T = 22, 45, 68 turns, each a third of the RL wall budget.
  S             one stage at T = 68 turns for the whole budget.

Both arms get the same RL wall-clock budget (`klong.py --rl-wall-s`: grpo.py's "Stages by wall
clock"; greedy evaluations are outside it), start from the same checkpoint, train on the same
seed's tasks and are evaluated greedily (`klong.py --stage eval`) on the same 16 held-out tasks
(family 10,000, M = 32) under the 68-turn budget. Per seed the two arms run at the same time, so
they share the machine's load (on a machine others use, wall-time equality is approximate: each
arm's RL clock and CPU seconds are reported). Writes bench/results/progressive-cpu.json and the
README block between the progressive markers.

    python bench/progressive.py --seeds 3        # 9 min of RL per arm, ~16 min per seed
    python bench/progressive.py --quick          # the pipeline with tiny budgets (smoke test)
    python bench/progressive.py --report-only    # the JSON and the README block from the runs

A finished arm (its eval results on disk) is not run again.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import common  # noqa: E402
import synthetic  # noqa: E402

BEGIN, END = "<!-- progressive:begin -->", "<!-- progressive:end -->"


@dataclass
class ProgConfig:
    """The comparison's budgets (the full run; --quick shrinks them)."""
    out: Path = ROOT / "runs" / "progressive"
    seeds: int = 3
    """RL seeds (training tasks, task order, sampling); the SE of P − S is over them."""
    init: str = "checkpoints/tiny-sft"
    """The starting checkpoint (trajectory-splitting SFT), the same for both arms."""
    task_items: tuple[int, int] = (32, 32)
    """M per task: 32 items per phase, a 66-turn horizon for a perfect agent."""
    eval_tasks: int = 16
    """Held-out tasks (family 10,000), the same for every seed and arm."""
    eval_timeout: int = 68
    """Evaluation budget and full horizon T (turns)."""
    p_timeouts: tuple[int, ...] = (22, 45, 68)
    """P's stage timeouts: T/3, 2T/3, T."""
    rl_wall_s: float = 540.0
    """RL wall budget of each arm (seconds of the RL loop; P's stages get a third each)."""
    n_rollouts: int = 4
    tasks_per_step: int = 2
    threads: int = 1
    """torch threads per arm process (the two arms of a seed run at once)."""
    quick: bool = False


QUICK = dict(seeds=1, eval_tasks=2, eval_timeout=12, p_timeouts=(4, 8, 12), rl_wall_s=20.0,
             n_rollouts=2, tasks_per_step=1, quick=True)
ARMS = ("P", "S")


def _run(argv: list[str], log: Path, threads: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, str(ROOT / "klong.py"), *argv], cwd=ROOT, env=env,
                                stdout=f, stderr=subprocess.STDOUT)


def _wait(p: subprocess.Popen, what: str, log: Path) -> dict:
    """Wait for one command; its wall time and CPU seconds (its own and its children's)."""
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"{what} failed (exit {p.returncode}): see {log}")
    return {"cpu_s": ru.ru_utime + ru.ru_stime}


def _eval_argv(pc: ProgConfig, model: str, run_dir: Path) -> list[str]:
    return ["--stage", "eval", "--model", model, "--run-dir", str(run_dir),
            "--tasks", str(pc.out / "eval_tasks"), "--eval-timeout", str(pc.eval_timeout),
            "--seeds", "1", "--sandbox", "local"]


def _rl_argv(pc: ProgConfig, arm: str, seed: int, run_dir: Path) -> list[str]:
    timeouts = pc.p_timeouts if arm == "P" else (pc.eval_timeout,)
    return ["--stage", "rl", "--run-dir", str(run_dir), "--init", str(ROOT / pc.init),
            "--seed", str(seed), "--task-items", ",".join(map(str, pc.task_items)),
            "--rl-timeouts", ",".join(map(str, timeouts)),
            "--rl-steps", ",".join("1" for _ in timeouts),        # equal shares of the budget
            "--rl-wall-s", str(pc.rl_wall_s), "--n-rollouts", str(pc.n_rollouts),
            "--tasks-per-step", str(pc.tasks_per_step), "--eval-timeout", str(pc.eval_timeout),
            "--rl-eval", "false", "--sandbox", "local"]


def run_before(pc: ProgConfig) -> None:
    """The held-out tasks and the starting checkpoint's greedy score on them (once: greedy
    decoding is deterministic, so every seed's "before" is this)."""
    tasks = pc.out / "eval_tasks"
    if not tasks.exists():
        synthetic.make_synthetic_tasks(tasks, pc.eval_tasks, seed=10_000,
                                       m_range=pc.task_items)
    rd = pc.out / "before"
    if (rd / "eval" / "results.json").exists():
        return
    rd.mkdir(parents=True, exist_ok=True)
    log = pc.out / "before.log"
    _wait(_run(_eval_argv(pc, str(ROOT / pc.init), rd), log, 2), "eval before RL", log)


def run_seed(pc: ProgConfig, seed: int) -> None:
    """P and S of one seed, at the same time (they share the load), then their evaluations."""
    d = pc.out / f"seed{seed}"
    todo = [a for a in ARMS if not (d / f"eval-{a}" / "eval" / "results.json").exists()]
    if not todo:
        return
    procs = {}
    for arm in todo:
        rd = d / f"rl-{arm}"
        rd.mkdir(parents=True, exist_ok=True)
        log = d / f"rl-{arm}.log"
        t0 = time.perf_counter()
        procs[arm] = (_run(_rl_argv(pc, arm, seed, rd), log, pc.threads), log, t0)
    for arm, (p, log, t0) in procs.items():
        cost = _wait(p, f"seed {seed} RL {arm}", log)
        (d / f"rl-{arm}" / "command.json").write_text(json.dumps(
            {"argv": _rl_argv(pc, arm, seed, d / f"rl-{arm}"), "command_wall_s":
             time.perf_counter() - t0, "command_cpu_s": cost["cpu_s"],
             "load_average_1min_at_end": os.getloadavg()[0]}))
    procs = {}
    for arm in todo:                                 # the two evaluations at once, too
        log = d / f"eval-{arm}.log"
        procs[arm] = (_run(_eval_argv(pc, str(d / f"rl-{arm}" / "rl" / "final"),
                                      d / f"eval-{arm}"), log, pc.threads), log)
    for arm, (p, log) in procs.items():
        _wait(p, f"seed {seed} eval {arm}", log)


# ----------------------------------------------------------------------------- the report

def _mean_se(xs: list[float]) -> tuple[float | None, float]:
    if not xs:
        return None, 0.0
    return statistics.fmean(xs), (statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else 0.0)


def _arm(pc: ProgConfig, seed: int, arm: str) -> dict | None:
    d = pc.out / f"seed{seed}"
    res = d / f"eval-{arm}" / "eval" / "results.json"
    if not res.exists():
        return None
    ev = json.loads(res.read_text())
    log = [json.loads(x) for x in (d / f"rl-{arm}" / "rl" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "reward_mean" in r]
    cmd = json.loads((d / f"rl-{arm}" / "command.json").read_text())
    per_stage = {}
    for r in steps:
        per_stage.setdefault(str(r["timeout"]), 0)
        per_stage[str(r["timeout"])] += 1
    return {"score": ev["score_mean"], "end_rate": ev["end_rate"], "turns": ev["turns"],
            "rl_wall_s": steps[-1]["rl_clock_s"] if steps else 0.0,
            "rl_cpu_s": steps[-1]["rl_cpu_s"] if steps else 0.0,
            "command_wall_s": cmd["command_wall_s"], "command_cpu_s": cmd["command_cpu_s"],
            "load_average_at_end": cmd["load_average_1min_at_end"],
            "steps": len(steps), "steps_per_timeout": per_stage,
            "rollout_turns": sum(r["turns"] * r["rollouts"] for r in steps),
            "reward_per_step": [round(r["reward_mean"], 4) for r in steps]}


def collect(pc: ProgConfig) -> dict:
    before = json.loads((pc.out / "before" / "eval" / "results.json").read_text())
    runs = []
    for s in range(pc.seeds):
        p, sa = _arm(pc, s, "P"), _arm(pc, s, "S")
        if p and sa:
            runs.append({"seed": s, "P": p, "S": sa, "P_minus_S": p["score"] - sa["score"]})
    diffs = [r["P_minus_S"] for r in runs]
    m, se = _mean_se(diffs)
    cfg = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(pc).items()}
    return {**common.header("progressive"), "config": cfg,
            "before": {"score": before["score_mean"], "end_rate": before["end_rate"],
                       "turns": before["turns"]},
            "runs": runs,
            "P_minus_S": {"mean": m, "se": se, "n": len(diffs),
                          "P_wins": sum(d > 0 for d in diffs), "ties": sum(d == 0 for d in diffs),
                          "S_wins": sum(d < 0 for d in diffs)},
            "P": dict(zip(("mean", "se"), _mean_se([r["P"]["score"] for r in runs]))),
            "S": dict(zip(("mean", "se"), _mean_se([r["S"]["score"] for r in runs])))}


def verdict(res: dict) -> str:
    """One plain sentence the numbers support: does progressive win at equal wall time here?"""
    d = res["P_minus_S"]
    if not d["n"]:
        return "No seed has finished."
    tally = f"P > S in {d['P_wins']}, ties in {d['ties']}, P < S in {d['S_wins']} of {d['n']} seeds"
    if d["mean"] - d["se"] > 0 and d["S_wins"] == 0:
        return (f"**Progressive wins here**: P − S = {d['mean']:+.3f} ± {d['se']:.3f} "
                f"(mean ± SE over seeds; {tally}).")
    if d["mean"] + d["se"] < 0 and d["P_wins"] == 0:
        return (f"**One long stage wins here**: P − S = {d['mean']:+.3f} ± {d['se']:.3f} "
                f"(mean ± SE over seeds; {tally}).")
    return (f"**Progressive does not win beyond the noise here**: P − S = {d['mean']:+.3f} ± "
            f"{d['se']:.3f} (mean ± SE over seeds; {tally}).")


def markdown(res: dict) -> str:
    c = res["config"]
    head = ("| seed | P: greedy score | S: greedy score | P − S | episodes ending with end_task "
            "(P / S) | RL wall s (P / S) | RL CPU s (P / S) | RL steps by timeout, P | S steps "
            "| rollout turns (P / S) |\n|---|---|---|---|---|---|---|---|---|---|\n")
    rows = []
    for r in res["runs"]:
        p, s = r["P"], r["S"]
        by_t = " + ".join(f"{n}×{t}" for t, n in p["steps_per_timeout"].items())
        rows.append(f"| {r['seed']} | {p['score']:.3f} | {s['score']:.3f} | {r['P_minus_S']:+.3f} "
                    f"| {p['end_rate']:.2f} / {s['end_rate']:.2f} "
                    f"| {p['rl_wall_s']:.0f} / {s['rl_wall_s']:.0f} "
                    f"| {p['rl_cpu_s']:.0f} / {s['rl_cpu_s']:.0f} | {by_t} | {s['steps']} "
                    f"| {p['rollout_turns']:.0f} / {s['rollout_turns']:.0f} |")
    d, P, S = res["P_minus_S"], res["P"], res["S"]
    mean = (f"| mean ± SE | {P['mean']:.3f} ± {P['se']:.3f} | {S['mean']:.3f} ± {S['se']:.3f} "
            f"| {d['mean']:+.3f} ± {d['se']:.3f} | | | | | | |" if d["n"] else "")
    return (head + "\n".join(rows) + ("\n" + mean if mean else "") + "\n\n" + verdict(res)
            + f"\n\nStart: `{c['init']}`, greedy {res['before']['score']:.3f} on the same held-out "
            f"tasks (it never ends a task: the flaw's wasted turns). Tasks: M = "
            f"{c['task_items'][0]} items per phase (a perfect agent needs "
            f"{2 * c['task_items'][0] + 2} of the {c['eval_timeout']} turns); P stages T = "
            f"{', '.join(map(str, c['p_timeouts']))} turns, a third of the budget each; S one "
            f"stage at T = {c['eval_timeout']}; RL wall budget {c['rl_wall_s']:.0f} s per arm "
            f"(the RL loop's clock, greedy evaluations outside it), n = {c['n_rollouts']} rollouts "
            f"× {c['tasks_per_step']} tasks per step; evaluation: {c['eval_tasks']} held-out "
            f"tasks, greedy, {c['eval_timeout']}-turn budget. The two arms of a seed ran at the "
            f"same time, {c['threads']} torch thread each, on {res['cpu_count']} shared CPU cores "
            f"({res['cpu']}), torch {res['versions']['torch']}; RL CPU s = the RL process's own "
            f"CPU seconds in the loop (its sandboxes' bash processes are not in it). File: "
            f"`bench/results/progressive-cpu.json`, generated by `bench/progressive.py`.")


def parse_args(argv=None) -> tuple[ProgConfig, argparse.Namespace]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=None, help="RL seeds (default 3)")
    ap.add_argument("--rl-wall-s", type=float, default=None,
                    help="RL wall budget per arm in seconds (default 540)")
    ap.add_argument("--out", type=Path, default=None, help="run folders (default runs/progressive)")
    ap.add_argument("--quick", action="store_true", help="tiny budgets, 1 seed: a smoke test")
    ap.add_argument("--report-only", action="store_true", help="only collect and write")
    a = ap.parse_args(argv)
    pc = ProgConfig(**(QUICK if a.quick else {}))
    if a.quick:
        pc.out = ROOT / "runs" / "progressive-quick"
    for k in ("seeds", "rl_wall_s", "out"):
        if getattr(a, k) is not None:
            setattr(pc, k, getattr(a, k))
    return pc, a


def main(argv=None) -> int:
    pc, a = parse_args(argv)
    pc.out.mkdir(parents=True, exist_ok=True)
    if not a.report_only:
        print("[progressive] evaluating the starting checkpoint", flush=True)
        run_before(pc)
        for s in range(pc.seeds):
            print(f"[progressive] seed {s}: P and S, {pc.rl_wall_s:.0f} s of RL each", flush=True)
            run_seed(pc, s)
    res = collect(pc)
    md = markdown(res)
    (pc.out / "progressive.json").write_text(json.dumps(res, indent=2) + "\n")
    if not pc.quick:
        common.write(ROOT / "bench" / "results" / "progressive-cpu.json", res)
        common.write_readme_block(BEGIN, END, md)
    print(md, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
