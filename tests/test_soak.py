"""Sandboxes under load (issue 21.5), CI-sized: scripts/soak.py with 4 sandboxes × 40 calls on the
strongest local tier, every failure mode of its mix drawn at least once. Afterwards nothing of the
run exists anywhere on the host (looked up from outside the harness too), every call got its
documented answer, and the harness's memory stayed bounded.

The answer checker is the soak's judge: it is also run on doctored answers (canned records, the
deterministic fault injection), so a checker that accepts anything cannot let the soak pass.
"""
import dataclasses
import importlib.util
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

import sandbox as S

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("soak", ROOT / "scripts" / "soak.py")
soak = sys.modules[spec.name] = importlib.util.module_from_spec(spec)   # (dataclasses look it up)
spec.loader.exec_module(soak)


@pytest.fixture(scope="module")
def ci_soak(tmp_path_factory):
    out = tmp_path_factory.mktemp("soak") / "soak.json"
    proc = subprocess.run([sys.executable, "scripts/soak.py", "--sandboxes", "4", "--commands", "40",
                           "--backend", "local", "--out", str(out), "--quiet"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.exists(), proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


def test_a_small_soak_leaves_nothing_behind(ci_soak):
    proc, r = ci_soak
    assert r["left_behind"]["total"] == 0, r["left_behind"]
    assert all(v == 0 for k, v in r["left_behind"].items() if k != "first_look")
    assert soak.marked(r["run"]) == []                    # looked up again, from outside the harness
    assert not list(S._ROOT.glob(f"{r['harness_pid']}-*"))
    assert proc.returncode == 0, proc.stdout[-2000:]


def test_every_failure_mode_is_answered_as_documented(ci_soak):
    _, r = ci_soak
    assert r["commands"] == 4 * 40 and not r["stopped_by_budget"]
    assert set(r["modes"]) == set(soak.MIX)
    for mode, m in r["modes"].items():
        assert m["count"] >= 1, f"{mode} never drawn: the CI soak does not exercise it"
        assert m["as_documented"] == m["count"], (mode, r["errors"])
    assert r["undocumented"] == 0 and r["errors"] == {}


def test_the_harness_memory_stays_bounded(ci_soak):
    _, r = ci_soak
    rss = r["rss"]
    assert rss["peak_mb"] < 200                          # 4 MB floods were never held whole, ×4
    assert abs(rss["growth_mb"]) < 20, rss


def test_the_survivor_scan_finds_a_marked_process_anywhere_on_the_host():
    tag = f"probe-{os.getpid()}"
    proc = subprocess.Popen(["sleep", "60"], env={**os.environ, "KLONG_SOAK": f"{tag}/0-0"})
    try:
        for _ in range(100):                              # (exec may not have happened yet)
            if soak.marked(tag) == [proc.pid]:
                break
            time.sleep(0.02)
        assert soak.marked(tag) == [proc.pid] and soak.marked(f"{tag}/0-1") == []
    finally:
        proc.kill()
        proc.wait()
    assert soak.marked(tag) == []


def _answer(**kw) -> S.ExecResult:
    base = dict(output="", exit_code=0, timed_out=False, truncated=False, total_bytes=0, duration_s=0.1)
    return S.ExecResult(**{**base, **kw})


def test_the_checker_refuses_answers_that_are_not_documented():
    rng = random.Random(0)
    ordinary = soak.make_call("ordinary", 7, rng)
    good = _answer(output="call-7\n", exit_code=ordinary.expect["exit_code"])
    assert soak.check_answer(ordinary, good, 10_000, 5) == []
    assert soak.check_answer(ordinary, dataclasses.replace(good, output="call-8\n"), 10_000, 5)
    assert soak.check_answer(ordinary, dataclasses.replace(good, exit_code=99), 10_000, 5)

    timeout = soak.make_call("timeout", 0, rng)
    late = timeout.timeout + soak.GRACE + 5 + 1
    killed = _answer(output="started\n", exit_code=None, timed_out=True, duration_s=0.6)
    assert soak.check_answer(timeout, killed, 10_000, 5) == []
    assert soak.check_answer(timeout, dataclasses.replace(killed, timed_out=False, exit_code=0), 10_000, 5)
    assert soak.check_answer(timeout, dataclasses.replace(killed, duration_s=late), 10_000, 5)
    assert soak.check_answer(timeout, dataclasses.replace(killed, output=""), 10_000, 5)

    term = soak.make_call("term", 0, rng)           # SIGKILL before the grace is a broken kill
    assert soak.check_answer(term, dataclasses.replace(killed, duration_s=term.timeout + soak.GRACE), 10_000, 5) == []
    assert soak.check_answer(term, dataclasses.replace(killed, duration_s=term.timeout), 10_000, 5)

    bomb = soak.make_call("forkbomb", 0, rng)
    stopped = dataclasses.replace(killed, output="stopped after 40 forks\n", duration_s=2.5)
    assert soak.check_answer(bomb, stopped, 10_000, 5) == []
    assert soak.check_answer(bomb, dataclasses.replace(stopped, output="stopped after 400 forks\n"), 10_000, 5)
    assert soak.check_answer(bomb, dataclasses.replace(stopped, output=""), 10_000, 5)

    flood = soak.make_call("flood", 0, rng)
    n = flood.expect["total"]
    shown = flood.expect["head"] + "\n[... 9 characters elided ...]\n" + flood.expect["tail"]
    cut = _answer(output=shown, truncated=True, total_bytes=n)
    assert soak.check_answer(flood, cut, 10_000, 5) == []
    assert soak.check_answer(flood, dataclasses.replace(cut, total_bytes=n - 1), 10_000, 5)
    assert soak.check_answer(flood, dataclasses.replace(cut, output="x" * 20_000), 10_000, 5)
    assert soak.check_answer(flood, dataclasses.replace(cut, output=shown[1:]), 10_000, 5)
