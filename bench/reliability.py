"""The reliability figures of issue 21 (items 2, 3 and 6): runs the fuzzing and kill-anywhere tests
under a hypothesis profile, counts what they did, and writes the README's reliability table from
bench/results/{reliability,judge_faults,soak-*}-cpu.json (the README quotes JSON, never numbers
typed by hand: docs/BENCH.md).

    python bench/reliability.py                  # thorough: >= 1,000 fuzz cases a property, 50 kills a stage
    python bench/reliability.py --profile ci     # the CI sizes (25 cases a property, 10 kills a stage)
    python bench/reliability.py --only fuzz      # one of fuzz | kill
    python bench/reliability.py --only kill --stage rl   # one stage's kill test, merged into the JSON
    python bench/reliability.py --table          # only rewrite the README block from the JSON present

How the figures are counted (no guessing from pytest's output): tests/test_fuzz.py and
tests/test_kill.py append one JSON line per case / per stage to $KLONG_RELIABILITY_LOG
(`count_case`, a no-op without it); pass/fail and each test's time come from pytest's JUnit XML.
A passing fuzz property means no exception other than the documented ones in any case run (the
property asserts it); a passing kill test means nothing lost, duplicated or corrupt after every
kill point and the resumed run equal to the uninterrupted one (weights bit-equal for SFT, kept
trajectories for the factory, judged-rollout groups and log steps for RL).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import common  # noqa: E402

RESULTS = ROOT / "bench" / "results"
BEGIN, END = "<!-- reliability:begin -->", "<!-- reliability:end -->"
SUITES = {"fuzz": "tests/test_fuzz.py", "kill": "tests/test_kill.py"}
KILL_CHECKS = {"sft": "log steps 1..N once each; final weights bit-equal to the uninterrupted run",
               "factory": "no attempt recorded twice; kept trajectories equal to the uninterrupted run",
               "rl": "every judged-rollout group once, complete; log steps once each"}


def junit_cases(path: Path) -> dict[str, dict]:
    """test name -> {"passed", "wall_s", "message"} from a pytest JUnit XML file."""
    out = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        bad = case.find("failure")
        bad = bad if bad is not None else case.find("error")
        skipped = case.find("skipped")
        out[case.get("name")] = {
            "passed": bad is None and skipped is None, "skipped": skipped is not None,
            "wall_s": round(float(case.get("time", 0)), 2),
            "message": None if bad is None else (bad.get("message") or "")[:500]}
    return out


def run_suite(which: str, profile: str, select: str | None = None) -> dict:
    """Run one test file under `profile` (only the tests `-k select` picks, if given); its tests'
    outcomes and the counted cases."""
    with tempfile.TemporaryDirectory() as d:
        log, xml = Path(d) / "counts.jsonl", Path(d) / "junit.xml"
        env = {**os.environ, "HYPOTHESIS_PROFILE": profile, "KLONG_RELIABILITY_LOG": str(log)}
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pytest", SUITES[which], "-q", "-p", "no:cacheprovider",
                               f"--junitxml={xml}", *(["-k", select] if select else [])], cwd=ROOT, env=env)
        wall = time.perf_counter() - t0
        cases = junit_cases(xml) if xml.exists() else {}
        counts = [json.loads(ln) for ln in log.read_text().splitlines()] if log.exists() else []
    return {"exit_code": proc.returncode, "wall_s": round(wall, 1), "tests": cases, "counts": counts}


def summarise_fuzz(raw: dict) -> dict:
    per = {}
    for c in raw["counts"]:
        per[c["fuzz"]] = per.get(c["fuzz"], 0) + 1
    return {"cases": sum(per.values()), "cases_by_property": per,
            "properties": len(raw["tests"]),
            "properties_failed": sum(not t["passed"] for t in raw["tests"].values()),
            "passed": raw["exit_code"] == 0 and bool(raw["tests"]),
            "wall_s": raw["wall_s"], "tests": raw["tests"]}


def summarise_kill(raw: dict) -> dict:
    stages = {}
    for c in raw["counts"]:
        test = next((t for name, t in raw["tests"].items() if f"_{c['kill']}_" in name), None)
        stages[c["kill"]] = {"points": c["points"], "killed": c["killed"],
                             "uninterrupted_run_s": c["run_s"], "checks": KILL_CHECKS.get(c["kill"]),
                             "passed": bool(test and test["passed"]),
                             "wall_s": test["wall_s"] if test else None}
    for name, t in raw["tests"].items():                # a stage that failed before counting
        stage = next((s for s in KILL_CHECKS if f"_{s}_" in name), name)
        stages.setdefault(stage, {"points": None, "killed": None, "passed": t["passed"],
                                  "checks": KILL_CHECKS.get(stage), "wall_s": t["wall_s"],
                                  "message": t["message"]})
    return {"stages": stages, "passed": raw["exit_code"] == 0 and bool(raw["tests"]),
            "wall_s": raw["wall_s"], "tests": raw["tests"]}


# ------------------------------------------------------------------------------ the README table

def _load(name: str, results: Path) -> dict | None:
    path = results / name
    return json.loads(path.read_text()) if path.exists() else None


def _fuzz_row(r: dict | None) -> tuple[str, str, str]:
    what = "fuzzing (issue 21.2): malformed records, rubric trees, config values"
    f = (r or {}).get("fuzz")
    if not f:
        return what, "not measured", "≥ 1,000 cases a property; 0 undocumented exceptions"
    per = ", ".join(f"{k} {v:,}" for k, v in f["cases_by_property"].items())
    undocumented = "0 undocumented exceptions" if f["passed"] else \
        f"**{f['properties_failed']} of {f['properties']} properties failed**"
    return (what, f"{f['cases']:,} cases ({per}; profile {r['profile']}): {undocumented}; "
                  f"{f['wall_s'] / 60:.1f} min", "≥ 1,000 cases a property; 0 undocumented exceptions")


def _failed_assert(k: dict, stage: str) -> str | None:
    """The `assert ...` line of a failed kill test's message (what was lost or duplicated)."""
    for name, t in (k.get("tests") or {}).items():
        if f"_{stage}_" in name and t.get("message"):
            return next((ln.strip() for ln in t["message"].splitlines() if ln.strip().startswith("assert ")), None)
    return None


def _kill_row(r: dict | None) -> tuple[str, str, str]:
    what = "kill anywhere (issue 21.3): SIGKILL at random moments, then the same command again"
    k = (r or {}).get("kill")
    if not k:
        return what, "not measured", "≥ 50 points a stage; 0 lost / duplicated / corrupt; resumed = uninterrupted"
    parts = []
    for stage in [*KILL_CHECKS, *(x for x in k["stages"] if x not in KILL_CHECKS)]:
        s = k["stages"].get(stage)
        if s is None:
            parts.append(f"{stage}: not finished within the session")
        elif s.get("points") is None:
            parts.append(f"{stage}: **failed before counting**")
        else:
            checks = s.get("checks", "0 lost / duplicated / corrupt")   # what the test asserted
            parts.append(f"{stage}: {s['points']} points ({s['killed']} killed mid-run), "
                         f"{'passed: ' + checks if s['passed'] else '**FAILED**'}"
                         + (f" (`{_failed_assert(k, stage)}`)" if not s["passed"] and _failed_assert(k, stage) else ""))
    return (what, "; ".join(parts) + f" (profile {r['profile']}; {k['wall_s'] / 60:.1f} min)",
            "≥ 50 points a stage; 0 lost / duplicated / corrupt; resumed = uninterrupted")


def _judge_row(j: dict | None) -> tuple[str, str, str]:
    what = "judge endpoint faults (issue 21.4): a loopback endpoint failing 30% of calls"
    target = "run completes; 0 silent scores; every failure retried and counted"
    if not j:
        return what, "not measured", target
    inj = j.get("injected") or j.get("injected_failures") or j.get("failures") or {}   # by kind
    by_kind = ", ".join(f"{k} {v}" for k, v in inj.items()) if isinstance(inj, dict) else str(inj)
    total = sum(inj.values()) if isinstance(inj, dict) else inj
    return (what, f"{j.get('calls')} calls, {total} injected failures ({by_kind}), "
                  f"{j.get('retries')} retries, {j.get('unavailable')} unavailable, "
                  f"{j.get('silent_scores')} silent scores, run "
                  f"{'completed' if j.get('run_completed') else '**did not complete**'}"
                  + (f", {j['wall_s']:.0f} s" if isinstance(j.get("wall_s"), (int, float)) else ""), target)


def _soak_rows(results: Path) -> list[tuple[str, str, str]]:
    target = "0 processes left behind; bounded memory"
    rows = []
    for path in sorted(results.glob("soak-*-cpu.json")):
        s = json.loads(path.read_text())
        errs = ", ".join(f"{k} {v}" for k, v in sorted(s["errors"].items())) or "none"
        modes = ", ".join(f"{k} {v['count']:,}" for k, v in s["modes"].items())
        answered = "every failure mode answered as documented" if s["undocumented"] == 0 else \
            f"**{s['undocumented']} answers not as documented**"
        rows.append((f"sandboxes under load (issue 21.5), {s['backend']} backend"
                     f"{' (' + s['tier'] + ' tier)' if s.get('tier') and s['tier'] != s['backend'] else ''}",
                     f"{s['sandboxes']} sandboxes × {s['commands_per_sandbox']:,} commands = "
                     f"{s['commands']:,} ({modes}): {s['left_behind']['total']} left behind, {answered}; "
                     f"harness peak RSS {s['rss']['peak_mb']:.0f} MB, growth first→last 10% "
                     f"{s['rss']['growth_mb']:+.1f} MB; sandbox errors: {errs}; {s['wall_s'] / 60:.1f} min",
                     target))
    return rows or [("sandboxes under load (issue 21.5)", "not measured", target)]


def render(results: Path = RESULTS) -> str:
    """The README block (between the markers, exclusive) from the JSON files in `results`."""
    r = _load("reliability-cpu.json", results)
    rows = [_fuzz_row(r), _kill_row(r), _judge_row(_load("judge_faults-cpu.json", results)),
            *_soak_rows(results)]
    lines = ["Generated by `python bench/reliability.py --table` from bench/results/"
             "{reliability,judge_faults,soak-*}-cpu.json (the 2-core CPU machine, shared).", "",
             "| what | measured | target |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def write_table() -> str:
    md = render()
    common.write_readme_block(BEGIN, END, md)
    return md


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", default="thorough", choices=["ci", "dev", "thorough"])
    p.add_argument("--only", choices=sorted(SUITES), help="run one suite; the other's figures are kept")
    p.add_argument("--stage", action="append", choices=sorted(KILL_CHECKS),
                   help="with --only kill: run only this stage's kill test (repeatable); the other "
                        "stages' figures of the same profile are kept")
    p.add_argument("--table", action="store_true", help="only rewrite the README block")
    a = p.parse_args(argv)
    if a.stage and a.only != "kill":
        p.error("--stage needs --only kill")
    if not a.table:
        out = RESULTS / "reliability-cpu.json"
        old = json.loads(out.read_text()) if out.exists() else {}
        result = {**common.header("reliability"), "profile": a.profile,
                  "fuzz": old.get("fuzz") if old.get("profile") == a.profile else None,
                  "kill": old.get("kill") if old.get("profile") == a.profile else None}
        for which in [a.only] if a.only else sorted(SUITES):
            print(f"reliability: {SUITES[which]} (HYPOTHESIS_PROFILE={a.profile})", flush=True)
            select = " or ".join(f"_{s}_killed" for s in a.stage) if a.stage else None
            raw = run_suite(which, a.profile, select)
            result[which] = summarise_fuzz(raw) if which == "fuzz" else summarise_kill(raw)
            for st in result[which].get("stages", {}).values() if which == "kill" else []:
                st["commit"] = result["commit"]               # stages may come from different runs
            if select and result.get("kill") is not None and old.get("kill") and old.get("profile") == a.profile:
                new, kept = result["kill"], old["kill"]     # merge: the stages run now replace theirs
                stages = {**{k: {"commit": old.get("commit"), **v} for k, v in kept["stages"].items()},
                          **new["stages"]}
                result["kill"] = {"stages": stages, "tests": {**kept.get("tests", {}), **new["tests"]},
                                  "passed": all(s["passed"] for s in stages.values())
                                  and set(KILL_CHECKS) <= set(stages),
                                  "wall_s": round(sum(s.get("wall_s") or 0 for s in stages.values()), 1)}
            common.write(out, result)                   # each suite's figures as soon as they exist
        print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "tests"} if isinstance(v, dict) else v
                          for k, v in result.items() if k in ("fuzz", "kill")}, indent=2))
    print(write_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
