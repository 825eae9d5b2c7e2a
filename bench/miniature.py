"""The miniature: the paper's ablation table measured on a 2-core CPU (docs/MINIATURE.md, issue
9). Not a timed test: a benchmark of what each stage of KLong buys.

Every arm is klong's own pipeline, run as subprocesses `python klong.py --stage sft|rl|eval`:

  data   synthetic.simulate_distill: the scripted expert on synthetic two-phase tasks (tag_R only in
         the prefix p; phase 2 only late in a trajectory), rejection-sampled. The simulation equals
         the sandbox-distilled trajectories message for message (tests/test_factory_sim.py), so
         thousands of trajectories cost seconds instead of ~1.5 s of CPU each.
  A      baseline SFT, `--split-mode none`: one head-truncated sequence per trajectory (paper's
         baseline); evaluated with its own context (a sliding window, no p) and also with the
         pinned-prefix context (`A+p`), to separate what training does from what the context does.
  B      sliding windows without the pinned prefix, `--split-mode window`.
  C      trajectory-splitting SFT, `--split-mode klong` (the paper's "+ trajectory-splitting SFT").
  P      progressive RL from C: stages with rollout budgets T = 1/3, 2/3, 1 of the evaluation
         budget (the paper's 2 h → 4 h → 6 h of a 12 h evaluation, in assistant turns).
  S      one RL stage at the full budget, with the same rollout compute as P (Σ steps × T equal).

Same data and the same number of optimizer steps for A, B, C (per seed); each seed draws its own
task family, data order and initial weights. Evaluation runs real episodes (sandbox +
LocalPolicy, greedy, + the judge's executable checks) on held-out tasks under the evaluation
budget; the table gives the mean ± standard error over seeds of the per-seed means. The expert's
own score under that budget (simulated) is the reference the flaw leaves below 1.

    python bench/miniature.py                # the full benchmark (~30 CPU-minutes per seed)
    python bench/miniature.py --quick        # the pipeline in ~2 minutes (CI: tests/test_miniature.py)
    python bench/miniature.py --report-only  # rebuild the table from what has finished

Jobs run as 1-thread processes, `--jobs` at once; a finished job (its output on disk) is skipped,
so a killed run resumes. Writes OUT/miniature.{json,md,png}; the full run also
bench/results/miniature-cpu.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
import factory  # noqa: E402
import synthetic  # noqa: E402

# The paper's ablation (docs/PAPER.md): PaperBench score, assistant turns, run time.
PAPER_ROWS = {"A": ("baseline SFT", 38.63, 114.9, "1.52 h"),
              "C": ("+ trajectory-splitting SFT", 55.92, 732.7, "8.88 h"),
              "P": ("+ RL 2 h → 4 h → 6 h", 62.59, None, None)}
ARMS = [  # key, label, what evaluates it
    ("A", "A: baseline SFT (head truncation), own context (sliding window)", "none"),
    ("A+p", "A: baseline SFT, evaluated with the pinned-prefix context", "klong"),
    ("B", "B: sliding-window SFT without the pinned prefix", "window"),
    ("C", "C: trajectory-splitting SFT (KLong)", "klong"),
    ("P", "C + progressive RL (T = ⅓, ⅔, 1 of the evaluation budget)", "klong"),
    ("S", "C + one long-timeout RL stage, same rollout compute", "klong"),
    ("C+long", "C on a variant it never trained on: accepted-step observations 1.6× longer", "klong"),
]
LONG_LOG_WORDS = 3      # `w 3 ok` (5 tokens with its header) → `w 3 ok log log log` (8 tokens)


@dataclass
class MiniConfig:
    """Budgets of the miniature (the full benchmark; --quick shrinks them)."""
    out: Path = ROOT / "runs" / "miniature"
    """Every run folder goes below it: seed<k>/{data,sft-<mode>,rl-<P|S>,eval-<arm>}."""
    seeds: int = 3
    """Training seeds (task family, data order, initial weights); the SE is over them."""
    n_train: int = 1000
    """Synthetic training tasks per seed, each distilled (2 expert attempts, rejection sampling)."""
    sft_steps: int = 2500
    """Optimizer steps of every SFT arm (~7.7M tokens: the copy from p is learned late and
    suddenly; at 1,000 steps it had not been in 2 of 3 seeds, at 2,500 it has in every seed tried)."""
    batch_rows: int = 2
    """Packed rows of 1,536 tokens per step (~2 expert trajectories in the KLong arm)."""
    warmup: int = 50
    """SFT warm-up steps (then cosine to 10%; lr 2e-3, klong's default)."""
    context_len: int = 384
    """L_max. Expert trajectories are ~1,770 tokens (p ~200 of them): ~4.6 × L, close to the
    probe's ~5 × L; at 512 they would be 3.5 × L and the head alone would hold a third."""
    max_new_tokens: int = 24
    """Longest action (actions are ≤ 15 tokens); the live context keeps this + 1 free."""
    eval_tasks: int = 16
    """Held-out tasks (another task family) every arm is evaluated on."""
    eval_timeout: int = 68
    """Evaluation budget in assistant turns (tasks need 2M+2 = 50-66; the flawed expert ~79)."""
    rl_p: tuple[int, ...] = (24, 48, 68)
    """Progressive RL: stage timeouts T⁽ᵐ⁾ (turns)."""
    rl_p_steps: tuple[int, ...] = (2, 2, 2)
    """Progressive RL: steps per stage."""
    rl_s_steps: int = 4
    """Single-stage RL at T = eval_timeout: steps (4 × 68 ≈ 2 × (24 + 48 + 68): same turns)."""
    n_rollouts: int = 4
    """n: rollouts per task in a group."""
    tasks_per_step: int = 2
    """Tasks per RL step."""
    jobs: int = 2
    """Processes at once (each 1 thread)."""
    quick: bool = False
    """Tiny budgets, 1 seed: checks that the pipeline runs and the table is produced."""


QUICK = dict(seeds=1, n_train=24, sft_steps=4, warmup=2, eval_tasks=2, eval_timeout=10,
             rl_p=(4, 7, 10), rl_p_steps=(1, 1, 1), rl_s_steps=2, n_rollouts=2, tasks_per_step=1,
             quick=True)


@dataclass
class Job:
    name: str
    argv: list[str]
    done: Path                       # exists = finished (skipped on a re-run)
    deps: list[str] = field(default_factory=list)
    priority: tuple = ()


def _common(mc: MiniConfig, seed: int) -> list[str]:
    return ["--seed", str(seed), "--context-len", str(mc.context_len),
            "--max-new-tokens", str(mc.max_new_tokens), "--eval-timeout", str(mc.eval_timeout),
            "--sandbox", "local"]


def plan(mc: MiniConfig) -> list[Job]:
    """The job graph: per seed three SFT arms, two RL runs from C, and an evaluation per arm.
    Order: seed k's SFT arms and their evaluations, then seed k+1's, then seed k's RL runs (so a
    run cut short has whole SFT rows for as many seeds as possible)."""
    jobs, tasks = [], mc.out / "eval_tasks"
    for s in range(mc.seeds):
        d = mc.out / f"seed{s}"
        com = _common(mc, s)
        sft = {m: d / f"sft-{m}" for m in ("none", "window", "klong")}
        for k, (m, rd) in enumerate(sft.items()):
            jobs.append(Job(f"s{s}-sft-{m}", ["--stage", "sft", "--run-dir", str(rd), "--data",
                                               str(d / "data" / "trajectories.jsonl"),
                                               "--split-mode", m, "--sft-steps", str(mc.sft_steps),
                                               "--batch-rows", str(mc.batch_rows),
                                               "--warmup", str(min(mc.warmup, mc.sft_steps)),
                                               "--save-every", str(mc.sft_steps), *com],
                            rd / "sft" / "final" / "config.json", priority=(s, 0, k)))
        rl = {"P": (mc.rl_p, mc.rl_p_steps), "S": ((mc.eval_timeout,), (mc.rl_s_steps,))}
        for k, (arm, (T, n)) in enumerate(rl.items()):
            rd = d / f"rl-{arm}"
            jobs.append(Job(f"s{s}-rl-{arm}", [
                "--stage", "rl", "--run-dir", str(rd), "--init", str(sft["klong"] / "sft" / "final"),
                "--rl-timeouts", ",".join(map(str, T)), "--rl-steps", ",".join(map(str, n)),
                "--n-rollouts", str(mc.n_rollouts), "--tasks-per-step", str(mc.tasks_per_step),
                "--n-tasks", str(max(mc.tasks_per_step, 32)), "--rl-eval", "false", *com],
                rd / "rl" / "final" / "config.json", [f"s{s}-sft-klong"], priority=(s + 1, 5, k)))
        ckpt = {"A": ("none", sft["none"] / "sft"), "A+p": ("none", sft["none"] / "sft"),
                "B": ("window", sft["window"] / "sft"), "C": ("klong", sft["klong"] / "sft"),
                "P": ("klong", d / "rl-P" / "rl"), "S": ("klong", d / "rl-S" / "rl"),
                "C+long": ("klong", sft["klong"] / "sft")}
        dep = {"A": "sft-none", "A+p": "sft-none", "B": "sft-window", "C": "sft-klong",
               "P": "rl-P", "S": "rl-S", "C+long": "sft-klong"}
        for k, (arm, _, mode) in enumerate(ARMS):
            rd = d / f"eval-{arm}"
            jobs.append(Job(f"s{s}-eval-{arm}", [
                "--stage", "eval", "--run-dir", str(rd), "--model", str(ckpt[arm][1] / "final"),
                "--tasks", str(mc.out / "eval_tasks_long" if arm == "C+long" else tasks),
                "--split-mode", mode, "--seeds", "1", *com],
                rd / "eval" / "results.json", [f"s{s}-{dep[arm]}"],
                priority=(s, 1, k) if arm in ("A", "A+p", "B", "C") else (s + 1, 6, k)))
    return jobs


def make_data(mc: MiniConfig) -> None:
    """Held-out evaluation tasks (family 10,000) and each seed's distilled trajectories."""
    tasks = mc.out / "eval_tasks"
    if not tasks.exists():
        synthetic.make_synthetic_tasks(tasks, mc.eval_tasks, seed=10_000)
    if not (mc.out / "eval_tasks_long").exists():        # the same tasks, longer observations
        synthetic.make_synthetic_tasks(mc.out / "eval_tasks_long", mc.eval_tasks, seed=10_000,
                                       log_words=LONG_LOG_WORDS)
    for s in range(mc.seeds):
        out = mc.out / f"seed{s}" / "data"
        if not (out / "trajectories.jsonl").exists():
            synthetic.simulate_distill(factory.FactoryConfig(out_dir=out, n_tasks=mc.n_train, seed=s))


def run_job(job: Job, log_dir: Path) -> tuple[str, int, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    with open(log_dir / f"{job.name}.log", "w") as log:
        rc = subprocess.run([sys.executable, str(ROOT / "klong.py"), *job.argv], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT).returncode
    return job.name, rc, time.perf_counter() - t0


def run_all(mc: MiniConfig, on_done=lambda: None) -> dict[str, float]:
    """Run the job graph, `mc.jobs` at once, highest priority (seed, stage) first."""
    jobs = {j.name: j for j in plan(mc)}
    log_dir = mc.out / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    finished = {n for n, j in jobs.items() if j.done.exists()}
    failed, running, times = set(), {}, {}
    with ThreadPoolExecutor(mc.jobs) as pool:
        while True:
            blocked = {n for n, j in jobs.items() if any(d in failed for d in j.deps)}
            ready = sorted((j for n, j in jobs.items() if n not in finished | failed | blocked
                            and n not in running and all(d in finished for d in j.deps)),
                           key=lambda j: j.priority)
            for j in ready[:mc.jobs - len(running)]:
                print(f"[miniature] start {j.name}", flush=True)
                running[j.name] = pool.submit(run_job, j, log_dir)
            if not running:
                break
            done, _ = wait(running.values(), return_when=FIRST_COMPLETED)
            for f in done:
                name, rc, dt = f.result()
                del running[name]
                times[name] = dt
                ok = rc == 0 and jobs[name].done.exists()
                (finished if ok else failed).add(name)
                print(f"[miniature] {'done' if ok else 'FAILED'} {name} in {dt:.0f} s"
                      + ("" if ok else f" (rc {rc}; see {log_dir / (name + '.log')})"), flush=True)
                on_done()
    if failed:
        print(f"[miniature] failed: {sorted(failed)}", flush=True)
    return times


# ----------------------------------------------------------------------------- the table

def _mean_se(xs: list[float]) -> tuple[float | None, float | None]:
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else 0.0)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def expert_reference(mc: MiniConfig) -> dict:
    """The teacher on the held-out tasks under the evaluation budget (simulated, exact): what
    copying it perfectly scores. Its flaw (extra `step s` turns) leaves it below 1."""
    cfg = factory.FactoryConfig(out_dir=mc.out)
    rows = []
    for d in sorted((mc.out / "eval_tasks").iterdir()):
        spec = synthetic.load_spec(d)
        rng = random.Random(f"expert-{spec.task_id}-0")
        t = synthetic.simulate_episode(spec, lambda m: synthetic.expert_action(
            spec, m, rng, cfg.noise, cfg.flaw), mc.eval_timeout)
        rows.append((t.score, t.meta["turns"], t.meta["stop_reason"]))
    return {"score": statistics.fmean(r[0] for r in rows), "turns": statistics.fmean(r[1] for r in rows),
            "end_rate": statistics.fmean(r[2] == "end_task" for r in rows),
            "timeout_rate": statistics.fmean(r[2] == "max_turns" for r in rows)}


def collect(mc: MiniConfig, times: dict[str, float] | None = None) -> dict:
    """Per arm: mean ± SE over the seeds that finished, of score, turns, wall time, rates."""
    arms = {}
    for arm, label, mode in ARMS:
        per = [json.loads(p.read_text()) for s in range(mc.seeds)
               if (p := mc.out / f"seed{s}" / f"eval-{arm}" / "eval" / "results.json").exists()]
        row = {"label": label, "eval_context": mode, "seeds": len(per)}
        for key in ("score_mean", "turns", "wall_s", "timeout_rate", "end_rate"):
            m, se = _mean_se([r[key] for r in per if key in r])
            row[key], row[key + "_se"] = m, se
        row["per_seed_score"] = [r["score_mean"] for r in per]
        ends = [e for r in per for e in r.get("episodes", []) if e["stop_reason"] == "end_task"]
        n_eps = sum(len(r.get("episodes", [])) for r in per)
        row["end_share"] = len(ends) / n_eps if n_eps else None
        row["end_turns"] = statistics.fmean(e["turns"] for e in ends) if ends else None
        arms[arm] = row
    paired = {}          # per-seed differences on the same seed's tasks: the claims of issue 15
    for hi, lo in (("C", "B"), ("B", "A"), ("P", "C"), ("S", "C"), ("P", "S")):
        d = [arms[hi]["per_seed_score"][i] - arms[lo]["per_seed_score"][i]
             for i in range(min(len(arms[hi]["per_seed_score"]), len(arms[lo]["per_seed_score"])))]
        m, se = _mean_se(d)
        paired[f"{hi}-{lo}"] = {"per_seed": d, "mean": m, "se": se}
    sft = {}
    for m in ("none", "window", "klong"):
        logs = [_jsonl(mc.out / f"seed{s}" / f"sft-{m}" / "sft" / "log.jsonl") for s in range(mc.seeds)]
        logs = [lg for lg in logs if lg]
        sft[m] = {"final_loss": [lg[-1]["loss"] for lg in logs],
                  "supervised_tokens": [sum(r["supervised_tokens"] for r in lg) for lg in logs],
                  "tokens_per_s": [statistics.median(r["tokens_per_s"] for r in lg) for lg in logs]}
    rl = {}
    for arm in ("P", "S"):
        logs = [_jsonl(mc.out / f"seed{s}" / f"rl-{arm}" / "rl" / "log.jsonl") for s in range(mc.seeds)]
        logs = [lg for lg in logs if lg]
        logs = [[r for r in lg if "reward_mean" in r] for lg in logs]   # steps, not eval points
        rl[arm] = {"rollout_turns": [round(sum(r["turns"] * r["rollouts"] for r in lg)) for lg in logs],
                   "reward_by_step": [[round(r["reward_mean"], 3) for r in lg] for lg in logs]}
    return {**common.header("miniature"), "quick": mc.quick, "config": {k: str(v) if isinstance(v, Path)
                                                               else v for k, v in asdict(mc).items()},
            "arms": arms, "paired": paired, "sft": sft, "rl": rl,
            "expert": expert_reference(mc) if (mc.out / "eval_tasks").exists() else None,
            "job_seconds": times or {}}


def _fmt(v, se=None, nd=3) -> str:
    if v is None:
        return "–"
    return f"{v:.{nd}f}" + (f" ± {se:.{nd}f}" if se is not None else "")


def markdown(res: dict) -> str:
    mc = res["config"]
    head = ("| arm | score (mean ± SE over seeds) | per seed | assistant turns | wall time (s) "
            "| episodes ending with end_task | their turns | seeds |\n"
            "|---|---|---|---|---|---|---|---|\n")
    lines = []
    for arm, _, _ in ARMS:
        r = res["arms"][arm]
        per = " / ".join(f"{x:.3f}" for x in r["per_seed_score"]) or "–"
        lines.append(f"| {r['label']} | {_fmt(r['score_mean'], r['score_mean_se'])} | {per} "
                     f"| {_fmt(r['turns'], nd=1)} | {_fmt(r['wall_s'], nd=2)} "
                     f"| {_fmt(r.get('end_share'), nd=2)} | {_fmt(r.get('end_turns'), nd=1)} "
                     f"| {r['seeds']} |")
    e = res.get("expert")
    if e:
        lines.append(f"| teacher (scripted expert with its flaw; simulated) | {e['score']:.3f} | – "
                     f"| {e['turns']:.1f} | – | {e['end_rate']:.2f} | – | – |")
    pairs = "\n\n| paired difference (same seed, same tasks) | per seed | mean ± SE |\n|---|---|---|\n" + \
        "\n".join(f"| {k} | {' / '.join(f'{x:+.3f}' for x in v['per_seed']) or '–'} "
                  f"| {_fmt(v['mean'], v['se'])} |" for k, v in res.get("paired", {}).items())
    paper = ("| paper (PaperBench) | score | assistant turns | run time |\n|---|---|---|---|\n"
             "| baseline SFT | 38.63 | 114.9 | 1.52 h |\n"
             "| + trajectory-splitting SFT | 55.92 | 732.7 | 8.88 h |\n"
             "| + RL 2 h | 57.29 | | |\n| + RL 4 h | 58.65 | | |\n| + RL 6 h | 62.59 | | |\n")
    rl = res["rl"]
    notes = (f"\nL_max = {mc['context_len']} tokens; {mc['n_train']} expert trajectories per seed; "
             f"{mc['sft_steps']} SFT steps × {mc['batch_rows']} rows of 1,536 tokens per arm; "
             f"evaluation: {mc['eval_tasks']} held-out tasks, "
             f"greedy, budget {mc['eval_timeout']} turns. RL: P stages T = {mc['rl_p']} × steps "
             f"{mc['rl_p_steps']}, S T = {mc['eval_timeout']} × {mc['rl_s_steps']} steps; "
             f"n = {mc['n_rollouts']} rollouts × {mc['tasks_per_step']} tasks per step; rollout "
             f"turns used: P {rl['P']['rollout_turns']}, S {rl['S']['rollout_turns']}. "
             f"Machine: {res['cpu_count']} CPU cores ({res['cpu']}), torch {res['versions']['torch']}, "
             f"1 thread per process.\n")
    return "## Miniature (measured)\n\n" + head + "\n".join(lines) + pairs + "\n" + notes + \
        "\n## Paper (PaperBench, KLong 106B)\n\n" + paper


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = [a for a, _, _ in ARMS if res["arms"][a]["score_mean"] is not None]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, yl in ((ax1, "score_mean", "judge score (mean ± SE over seeds)"),
                        (ax2, "turns", "assistant turns")):
        ax.bar(keys, [res["arms"][a][key] for a in keys],
               yerr=[res["arms"][a][key + "_se"] or 0 for a in keys], capsize=4,
               color=["#bbb", "#999", "#8ab", "#37a", "#2a6", "#a62", "#7ad"][:len(keys)])
        ax.set_ylabel(yl)
    if res.get("expert"):
        ax1.axhline(res["expert"]["score"], ls="--", c="k", lw=1, label="teacher under the budget")
        ax1.legend(loc="lower right", fontsize=8)
    ax1.set_title("The miniature: KLong's ablation on a CPU")
    ax2.set_title(f"budget {res['config']['eval_timeout']} turns")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(mc: MiniConfig, times: dict | None = None) -> dict:
    res = collect(mc, times)
    md = markdown(res)
    (mc.out / "miniature.json").write_text(json.dumps(res, indent=2))
    (mc.out / "miniature.md").write_text(md)
    plot(res, mc.out / "miniature.png")
    if not mc.quick:
        results = ROOT / "bench" / "results"
        for ext in ("json", "md", "png"):
            shutil.copy(mc.out / f"miniature.{ext}", results / f"miniature-cpu.{ext}")
    return res


def parse_args(argv=None) -> tuple[MiniConfig, bool]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny budgets, 1 seed (CI)")
    ap.add_argument("--report-only", action="store_true", help="only rebuild the table")
    for f in ("out", "seeds", "n_train", "sft_steps", "eval_tasks", "jobs"):
        ap.add_argument("--" + f.replace("_", "-"), default=None,
                        type=Path if f == "out" else int)
    a = ap.parse_args(argv)
    mc = MiniConfig(**(QUICK if a.quick else {}))
    if a.quick and a.out is None:
        a.out = ROOT / "runs" / "miniature-quick"
    for f in ("out", "seeds", "n_train", "sft_steps", "eval_tasks", "jobs"):
        if getattr(a, f) is not None:
            setattr(mc, f, getattr(a, f))
    return mc, a.report_only


def main(argv=None) -> int:
    mc, report_only = parse_args(argv)
    mc.out.mkdir(parents=True, exist_ok=True)
    times = {}
    if not report_only:
        make_data(mc)
        times = run_all(mc, on_done=lambda: report(mc))
    res = report(mc, times)
    print(markdown(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
