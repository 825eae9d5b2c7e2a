"""The main job, measured over seeds (issue 15): `python klong.py --stage rl --seed K` on the tiny
default, from a fresh run folder, timed as a whole command. Each run prints and writes the greedy
held-out score before and after RL (rl/summary.json); this script collects them into
bench/results/main_job-cpu.json and writes the README's table between the main-job markers.

    python bench/main_job.py                 # seeds 0,1,2,3 (~4-7 min each on the 2-core machine)
    python bench/main_job.py --seeds 0       # one seed
    python bench/main_job.py --report-only   # the JSON and the README table from finished runs

A finished seed (its summary.json and command time on disk) is not run again. "Learns" is read
as the issue reads it: after − before larger than the larger of the two standard errors.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import common  # noqa: E402

BEGIN, END = "<!-- main-job:begin -->", "<!-- main-job:end -->"


def run_seed(out: Path, seed: int) -> None:
    """One main job in out/seed<K>; its command wall time goes to command.json beside it."""
    rd = out / f"seed{seed}"
    if (rd / "command.json").exists():
        return
    t0 = time.perf_counter()
    with open(out / f"seed{seed}.log", "w") as log:
        rc = subprocess.run([sys.executable, str(ROOT / "klong.py"), "--stage", "rl",
                             "--run-dir", str(rd), "--seed", str(seed)], cwd=ROOT,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
                            stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"seed {seed} failed (exit {rc}): see {out / f'seed{seed}.log'}")
    (rd / "command.json").write_text(json.dumps(
        {"argv": f"python klong.py --stage rl --seed {seed}", "wall_s": time.perf_counter() - t0,
         "load_average_1min_at_end": os.getloadavg()[0]}))


def collect(out: Path, seeds: list[int]) -> dict:
    rows = []
    for s in seeds:
        rd = out / f"seed{s}"
        if not (rd / "command.json").exists():
            continue
        summary = json.loads((rd / "rl" / "summary.json").read_text())
        b, a = summary["before"], summary["after"]
        rows.append({"seed": s, "before": b, "after": a, "gain": a["score"] - b["score"],
                     "learned": a["score"] - b["score"] > max(a["se"], b["se"]),
                     "command_wall_s": json.loads((rd / "command.json").read_text())["wall_s"],
                     "load_average": json.loads((rd / "command.json").read_text()).get(
                         "load_average_1min_at_end"),
                     "rl_wall_s": summary["wall_s"],
                     "note": json.loads((rd / "command.json").read_text()).get("note", "")})
    return {**common.header("main_job"), "runs": rows}


def _load(r: dict) -> str:
    return "–" if r["load_average"] is None else f"{r['load_average']:.0f}"


def markdown(res: dict) -> str:
    head = ("| `--seed` | greedy held-out score before RL | after RL | after − before | "
            "beyond the larger SE | command wall time (load average) |\n|---|---|---|---|---|---|\n")
    lines = [f"| {r['seed']}{' (default)' if r['seed'] == 0 else ''} "
             f"| {r['before']['score']:.3f} ± {r['before']['se']:.3f} "
             f"| {r['after']['score']:.3f} ± {r['after']['se']:.3f} | {r['gain']:+.3f} "
             f"| {'yes' if r['learned'] else 'no'} | {r['command_wall_s'] / 60:.1f} min "
             f"({_load(r)}) |"
             for r in res["runs"]]
    n = res["runs"][0]["before"]["n"] if res["runs"] else 0
    return (head + "\n".join(lines) + f"\n\nMean ± standard error over the {n} held-out tasks "
            f"(greedy, 68-turn budget; each seed draws its own training and held-out tasks). "
            f"Measured by `bench/main_job.py` on {res['cpu_count']} CPU cores ({res['cpu']}), "
            f"torch {res['versions']['torch']}; file: `bench/results/main_job-cpu.json`. The wall "
            f"time is the whole command's, with the machine's 1-minute load average when it ended "
            f"(2 cores: above 2, other work shared them)."
            + "".join(f" Seed {r['seed']}: {r['note']}." for r in res["runs"] if r.get("note")))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1,2,3", help="comma-separated --seed values")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "main-job", help="run folders")
    ap.add_argument("--report-only", action="store_true", help="only collect and write the table")
    a = ap.parse_args(argv)
    seeds = [int(x) for x in a.seeds.split(",")]
    a.out.mkdir(parents=True, exist_ok=True)
    if not a.report_only:
        for s in seeds:
            print(f"[main_job] seed {s}", flush=True)
            run_seed(a.out, s)
    res = collect(a.out, seeds)
    common.write(ROOT / "bench" / "results" / "main_job-cpu.json", res)
    md = markdown(res)
    common.write_readme_block(BEGIN, END, md)
    print(md, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
