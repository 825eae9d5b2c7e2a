"""Sandboxes under load (issue 21.5): N concurrent sandboxes × M commands each, the sandbox
failure modes of docs/SANDBOX.md mixed in with ordinary commands, then a count of what was left
behind. KLong's RL runs many sandboxes at once for hours (the unified sandbox of its RL
infrastructure); the paper gives no figure for this, so the targets are the issue's: 0 processes
left behind, bounded memory.

    python scripts/soak.py                                 # 16 × 1,000 on the local backend
    python scripts/soak.py --backend docker --commands 200 # Docker (scripts/docker-setup.sh)
    python scripts/soak.py --sandboxes 4 --commands 40 --out /tmp/soak.json   # CI size
    python scripts/soak.py --budget-min 25                 # stop drawing calls after 25 minutes

The modes and the answer each must get (docs/SANDBOX.md failure modes 1, 2, 4, 6; `check_answer`):

    ordinary   `echo`, a file write and read, a chosen exit code: that exit code and exactly that output
    flood      1–4 MB on stdout (or one huge line): head and tail kept, total byte count exact,
               the shown output bounded (limit + the elision note)
    timeout    sleeps, a background job and `setsid` daemons past a short timeout: timed out, no
               exit code, partial output kept, back within timeout + grace + slack
    term       the same with SIGTERM ignored: SIGKILLed after the grace (never before it)
    zombie     a parent that never reaps its children: exit 0, and no zombie left in the sandbox
    forkbomb   forks until the sandbox's process limit stops it: stopped below the limit, timed out

After every timeout, term and forkbomb call no process of that call may exist (each call's
processes carry KLONG_SOAK=<run>/<call> in their environment; the whole host's /proc is scanned, so
an escapee reparented outside the sandbox counts too). At the end, after every sandbox is closed:
the harness's descendants, processes of this run anywhere on the host, workspaces, cgroups and
(Docker) containers of this harness: all must be 0.

Memory: the harness's RSS after every call (psutil) and its peak (VmHWM); growth is
the mean RSS over the last 10% of calls minus the mean over the first 10%.
Errors by kind: exceptions from the sandbox (their type) and answers not as documented
("<mode>: <what>"). A sandbox whose init died is closed and replaced, and that counts as an error.

Departures: calls are drawn with a seeded RNG per sandbox, so a run is repeatable in its mix,
not in its timings. The duration bounds get `--slack-s` (default 5 s) on top of the documented
timeout + grace, as the shared 2-core machine can stall a call for seconds under this load.
Writes bench/results/soak-<backend>-cpu.json (bench/common.header) unless --out says otherwise.
"""
from __future__ import annotations

import argparse
import os
import random
import socket
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import common  # noqa: E402
import sandbox as S  # noqa: E402

MIX = {"ordinary": 0.70, "flood": 0.08, "timeout": 0.06, "term": 0.04, "zombie": 0.08, "forkbomb": 0.04}
"""Share of each mode among the calls (drawn per call)."""
PIDS = 64           # the soak sandboxes' process limit: what stops the fork bombs
GRACE = 0.5         # seconds between SIGTERM and SIGKILL on a timeout (short: the soak has many)
TIMEOUT = 1.0       # the timeout of the timeout / term calls (time to start the daemons under load)
BOMB_TIMEOUT = 4.0  # the fork bomb's: long enough to reach the limit on a loaded machine (at 2 s,
                    # 6 of 697 bombs had not reached it at a load average of ~29)

BOMB = ("python3 -c \"import os, time\nn = 0\ntry:\n    while n < 400:\n        if os.fork() == 0:\n"
        "            time.sleep(600); os._exit(0)\n        n += 1\nexcept OSError as e:\n"
        "    print('stopped after', n, 'forks', flush=True)\ntime.sleep(600)\"")
ZOMBIES = ("python3 -c \"import os, time\nfor _ in range(5):\n    if os.fork() == 0: os._exit(0)\n"
           "time.sleep(0.3)\" & (sleep 0.1 &) ; sleep 0.4")
DAEMONS = ("echo started; sleep 600 & setsid sleep 601 & (setsid sh -c 'sleep 602 & wait' &) ; "
           "python3 -c \"import os, time\nif os.fork(): os._exit(0)\nos.setsid()\n"
           "if os.fork(): os._exit(0)\ntime.sleep(603)\" ; sleep 604")


@dataclass
class Call:
    """One command of the soak and what its answer must show."""
    mode: str
    cmd: str
    timeout: float
    expect: dict = field(default_factory=dict)


def make_call(mode: str, k: int, rng: random.Random) -> Call:
    """The k-th call of a sandbox in `mode` (sizes and exit codes drawn from rng)."""
    if mode == "ordinary":
        code = rng.choice([0, 0, 0, 1, 3])
        return Call(mode, f"echo call-{k} > note.txt && cat note.txt; exit {code}", 30,
                    {"exit_code": code, "output": f"call-{k}\n"})
    if mode == "flood":
        n = rng.randint(1, 4) << 20
        if rng.random() < 0.5:
            return Call(mode, f"echo FIRST; head -c {n} /dev/zero | tr '\\0' a; echo; echo LAST", 60,
                        {"total": n + len("FIRST\n\nLAST\n"), "head": "FIRST\n", "tail": "LAST\n"})
        return Call(mode, f"python3 -c \"print('x' * {n})\"", 60, {"total": n + 1, "head": "x", "tail": "x\n"})
    if mode == "timeout":
        return Call(mode, DAEMONS, TIMEOUT, {"partial": "started"})
    if mode == "term":
        return Call(mode, "trap '' TERM; sleep 605 & echo started; while :; do sleep 0.05; done",
                    TIMEOUT, {"partial": "started", "min_duration": TIMEOUT + GRACE - 0.1})
    if mode == "zombie":
        return Call(mode, ZOMBIES, 30, {"exit_code": 0})
    if mode == "forkbomb":
        return Call(mode, BOMB, BOMB_TIMEOUT, {"stopped_below": PIDS})
    raise ValueError(f"unknown mode {mode!r}")


def check_answer(call: Call, r: S.ExecResult, output_chars: int, slack_s: float,
                 grace_s: float = GRACE) -> list[str]:
    """What in `r` is not the documented answer to `call` (empty: all as documented). grace_s:
    the backend's real grace (Docker's `timeout -k` counts whole seconds: at least 1)."""
    e, bad = call.expect, []
    if call.mode in ("timeout", "term", "forkbomb"):
        if not r.timed_out or r.exit_code is not None:
            bad.append("not reported as timed out")
        if r.duration_s > call.timeout + grace_s + slack_s:
            bad.append("came back later than timeout + grace + slack")
    elif r.timed_out:
        bad.append("timed out")
    if "exit_code" in e and r.exit_code != e["exit_code"]:
        bad.append("wrong exit code")
    if "output" in e and r.output != e["output"]:
        bad.append("wrong output")
    if "partial" in e and e["partial"] not in r.output:
        bad.append("partial output lost")
    if "min_duration" in e and r.duration_s < e["min_duration"]:
        bad.append("killed before the grace")
    if "total" in e:
        if r.total_bytes != e["total"]:
            bad.append("wrong byte count")
        if not r.truncated or len(r.output) > output_chars + 300 or "characters elided" not in r.output:
            bad.append("flood not cut to head + tail")
        if not (r.output.startswith(e["head"]) and r.output.endswith(e["tail"])):
            bad.append("head or tail lost")
    if "stopped_below" in e:
        try:
            n = int(r.output.split("stopped after")[1].split()[0])
        except (IndexError, ValueError):
            n = None
        if n is None:
            bad.append("fork bomb did not reach the process limit before its timeout")
        elif n >= e["stopped_below"]:
            bad.append("fork bomb not stopped by the process limit")
    return bad


# ------------------------------------------------------------------------------ what is left behind

def marked(tag: str) -> list[int]:
    """PIDs anywhere on the host whose environment holds KLONG_SOAK=<tag> or <tag>/... (a run's tag
    finds all its calls' processes, a call's tag only that call's)."""
    want = f"KLONG_SOAK={tag}".encode()
    found = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and int(p.name) != os.getpid():
            try:
                env = (p / "environ").read_bytes()
            except OSError:
                continue
            if any(v == want or v.startswith(want + b"/") for v in env.split(b"\0")):
                found.append(int(p.name))
    return found


def zombies_in(box: S.Sandbox) -> int:
    """Zombies among the sandbox's processes (local: its process tree; Docker: `ps` inside)."""
    if isinstance(box, S.LocalSandbox):
        try:
            tree = psutil.Process(box._proc.pid).children(recursive=True)
        except psutil.Error:
            return 0
        n = 0
        for p in tree:
            try:
                n += p.status() == psutil.STATUS_ZOMBIE
            except psutil.Error:
                pass
        return n
    r = box.exec("ps -eo stat= | grep -c '^Z' || true", 10)
    return int(r.output.strip() or 0)


def left_behind(run: str, pid: int) -> dict:
    """After every sandbox is closed: what of this run still exists."""
    me = psutil.Process(pid)
    out = {"descendants": len(me.children(recursive=True)), "marked_processes": len(marked(run)),
           "workspaces": len(list(S._ROOT.glob(f"{pid}-*"))) if S._ROOT.exists() else 0,
           "cgroups": 0, "containers": 0}
    base = Path("/sys/fs/cgroup")
    out["cgroups"] = sum(1 for d in base.rglob(f"klong-{pid}-*") if d.is_dir()) if base.exists() else 0
    try:
        client = S.docker_client()
        owner = f"{socket.gethostname()}:{pid}"
        out["containers"] = sum(c.labels.get("klong.owner") == owner
                                for c in client.containers.list(all=True, filters={"label": S._LABEL}))
        client.close()
    except (S.SandboxError, ImportError):
        pass
    out["total"] = sum(out.values())
    return out


def peak_rss_kb() -> int:
    """This process's peak RSS (VmHWM). Not getrusage's ru_maxrss: that survives execve, so a
    harness started from a big parent (pytest with torch loaded) would report the parent's."""
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0])


# ------------------------------------------------------------------------------ the soak

class Soak:
    """Shared counters of one soak (threads: one per sandbox)."""

    def __init__(self, args, run: str):
        self.a, self.run = args, run
        self.lock = threading.Lock()
        self.errors: Counter = Counter()
        self.examples: dict[str, str] = {}      # error kind -> the output of its first call
        self.modes = {m: Counter() for m in MIX}
        self.rss: list[int] = []          # harness RSS (bytes) after each call, in finishing order
        self.me = psutil.Process()
        self.bar = tqdm(total=args.sandboxes * args.commands, desc=f"soak {args.backend}", unit="call",
                        smoothing=0.05, disable=args.quiet)
        self.opened = 0
        self.deadline = time.monotonic() + 60 * args.budget_min if args.budget_min else None
        self.stopped = False

    def open(self) -> S.Sandbox:
        with self.lock:
            self.opened += 1
        return S.open_sandbox(self.a.backend, kill_grace_s=GRACE, pids=PIDS, memory_mb=self.a.memory_mb)

    def record(self, mode: str, problems: list[str], seconds: float, output: str = "") -> None:
        with self.lock:
            c = self.modes[mode]
            c["count"] += 1
            c["as_documented"] += not problems
            c["seconds"] += seconds
            for p in problems:
                self.errors[f"{mode}: {p}"] += 1
                self.examples.setdefault(f"{mode}: {p}", output[:300])
            self.rss.append(self.me.memory_info().rss)
            self.bar.update(1)

    def worker(self, index: int) -> None:
        rng = random.Random(self.a.seed * 10_007 + index)
        names, weights = list(MIX), list(MIX.values())
        box = None
        try:
            for k in range(self.a.commands):
                if self.deadline and time.monotonic() > self.deadline:
                    self.stopped = True            # --budget-min: report what fitted
                    break
                mode = rng.choices(names, weights)[0]
                call = make_call(mode, k, rng)
                tag = f"{self.run}/{index}-{k}"
                t0 = time.monotonic()
                r, note = None, ""
                try:
                    box = box or self.open()
                    r = box.exec(call.cmd, call.timeout, env={"KLONG_SOAK": tag})
                    grace = GRACE if isinstance(box, S.LocalSandbox) else max(1, round(GRACE))
                    problems = check_answer(call, r, box.limits.output_chars, self.a.slack_s, grace)
                    if mode in ("timeout", "term", "forkbomb") and marked(tag):
                        problems.append("processes of the call survived it")
                    if mode == "zombie":
                        for _ in range(40):
                            if zombies_in(box) == 0:
                                break
                            time.sleep(0.05)
                        else:
                            problems.append("zombies left")
                except Exception as e:                     # noqa: BLE001 (counted by kind)
                    problems, note = [f"raised {type(e).__name__}"], f"{type(e).__name__}: {e}"
                    if box is not None and not box.alive():
                        box.close()
                        box = None
                self.record(mode, problems, time.monotonic() - t0, r.output if r else note)
        finally:
            if box is not None:
                box.close()

    def go(self) -> dict:
        t0 = time.monotonic()
        threads = [threading.Thread(target=self.worker, args=(i,), daemon=True)
                   for i in range(self.a.sandboxes)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.bar.close()
        wall = time.monotonic() - t0
        gone = left_behind(self.run, os.getpid())
        if gone["total"]:                                  # a slow exit, or really left behind?
            time.sleep(5)
            gone = {**left_behind(self.run, os.getpid()), "first_look": gone}
        tenth = max(1, len(self.rss) // 10)
        mb = 1 << 20
        first, last = self.rss[:tenth], self.rss[-tenth:]
        return {"sandboxes": self.a.sandboxes, "commands_per_sandbox": self.a.commands,
                "commands": len(self.rss), "stopped_by_budget": self.stopped,
                "budget_min": self.a.budget_min, "sandboxes_opened": self.opened, "wall_s": round(wall, 1),
                "modes": {m: {"count": c["count"], "as_documented": c["as_documented"],
                              "mean_s": round(c["seconds"] / c["count"], 3) if c["count"] else None}
                          for m, c in self.modes.items()},
                "undocumented": sum(c["count"] - c["as_documented"] for c in self.modes.values()),
                "errors": dict(self.errors), "error_examples": self.examples, "left_behind": gone,
                "rss": {"peak_mb": round(peak_rss_kb() / 1024, 1),
                        "first_10pct_mean_mb": round(sum(first) / len(first) / mb, 1),
                        "last_10pct_mean_mb": round(sum(last) / len(last) / mb, 1),
                        "growth_mb": round((sum(last) / len(last) - sum(first) / len(first)) / mb, 1)}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="local", help=f"local | docker | {' | '.join(S.TIERS)}")
    p.add_argument("--sandboxes", type=int, default=16, help="concurrent sandboxes")
    p.add_argument("--commands", type=int, default=1000, help="commands per sandbox")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slack-s", type=float, default=5.0, help="added to the duration bounds")
    p.add_argument("--memory-mb", type=int, default=512, help="each sandbox's memory limit")
    p.add_argument("--budget-min", type=float, help="stop drawing calls after this many minutes "
                                                    "(the result says so and counts what ran)")
    p.add_argument("--out", type=Path, help="default: bench/results/soak-<backend>-cpu.json")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    if a.sandboxes < 1 or a.commands < 1:
        p.error("--sandboxes and --commands must be at least 1")
    if a.backend == "docker" and S.docker_problem():
        p.error(f"docker: {S.docker_problem()}")
    run = uuid.uuid4().hex[:12]
    probe = S.open_sandbox(a.backend)           # the tier this backend resolves to here
    tier, probe_via = probe.tier, getattr(probe, "limits_via", "docker")
    probe.close()
    result = {**common.header("soak", packages=("psutil",)), "backend": a.backend, "tier": tier,
              "limits_via": probe_via, "run": run, "harness_pid": os.getpid(), "pids_limit": PIDS,
              "kill_grace_s": GRACE, "mix": MIX,
              "seed": a.seed, "slack_s": a.slack_s, **Soak(a, run).go()}
    out = a.out or ROOT / "bench" / "results" / f"soak-{a.backend}-cpu.json"
    common.write(out, result)
    print(f"soak: {result['commands']} calls in {result['wall_s']:.0f} s; "
          f"{result['undocumented']} not as documented; {result['left_behind']['total']} left behind; "
          f"peak RSS {result['rss']['peak_mb']:.0f} MB, growth {result['rss']['growth_mb']:+.1f} MB -> {out}")
    return 0 if result["undocumented"] == 0 and result["left_behind"]["total"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
