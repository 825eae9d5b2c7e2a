"""The sandbox backends: docs/SANDBOX.md's ten failure modes on every backend present (the local tiers
this machine allows, Docker when an engine answers), file round trips, timeout clamping,
concurrent sandboxes, and the output cleaning/cutting properties."""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
from hypothesis import given
from hypothesis import strategies as st

import sandbox as S
from tests.strategies import sandbox_relpaths, shell_outputs

REPO = Path(__file__).resolve().parents[1]


DOCKER_PROBLEM = S.docker_problem()   # no engine, or no image: skipped, never an error
BACKENDS = [pytest.param(t, marks=pytest.mark.skipif(S.tier_problem(t) is not None,
                                                       reason=f"{t}: {S.tier_problem(t)}"))
            for t in S.TIERS]
BACKENDS.append(pytest.param("docker", marks=pytest.mark.skipif(
    DOCKER_PROBLEM is not None, reason=f"docker: {DOCKER_PROBLEM}")))
ISOLATED = [b for b in BACKENDS if b.values[0] != "plain"]


@pytest.fixture
def box(request):
    """A fresh sandbox of the parametrised backend, short kill grace so timeouts are quick."""
    b = S.open_sandbox(request.param, kill_grace_s=0.5)
    yield b
    b.close()


def survivors(box: S.Sandbox, pattern: str) -> int:
    """Processes matching `pattern` (a `pgrep -f` regex written so it does not match itself)."""
    r = box.exec(f"pgrep -f '{pattern}' | wc -l", 10)
    return int(r.output.strip())


def init_process(box: S.LocalSandbox) -> psutil.Process:
    top = psutil.Process(box._proc.pid)
    return next(p for p in [top] + top.children(recursive=True) if p.cmdline()[1:3] == ["-I", "-S"])


# ----------------------------------------------------------------------------- 1, 2: timeouts kill everything

@pytest.mark.parametrize("box", BACKENDS, indirect=True)
def test_timeout_kills_children_background_jobs_and_setsid_daemons(box):
    cmd = ("sleep 3011 & setsid sleep 3012 & (setsid sh -c 'sleep 3013 & wait' &) ; "
           "python3 -c \"import os, time\nif os.fork(): os._exit(0)\nos.setsid()\n"
           "if os.fork(): os._exit(0)\ntime.sleep(3014)\" ; echo started; sleep 3015")
    r = box.exec(cmd, timeout=1)
    assert r.timed_out and r.exit_code is None
    assert "started" in r.output                       # partial output is kept
    assert r.duration_s < 1 + 0.5 + 2
    assert survivors(box, "slee[p] 301[1-5]|time.slee[p].3014") == 0
    assert box.exec("echo next", 5).output == "next\n"


@pytest.mark.parametrize("box", BACKENDS, indirect=True)
def test_a_process_ignoring_sigterm_is_sigkilled_after_the_grace(box):
    r = box.exec("trap '' TERM; sleep 3021 & while :; do sleep 0.05; done", timeout=1)
    assert r.timed_out
    assert 1 + 0.5 - 0.1 <= r.duration_s < 1 + 0.5 + 2   # TERM ignored: waited the grace, then KILL
    assert survivors(box, "slee[p] 3021") == 0


# ----------------------------------------------------------------------------- 3: background jobs

@pytest.mark.parametrize("box", BACKENDS, indirect=True)
def test_background_job_holding_stdout_neither_hangs_nor_dies_of_sigpipe(box):
    t0 = time.monotonic()
    r = box.exec("(for i in $(seq 40); do echo bg $i; sleep 0.02; done; echo finished > bg_done) & "
                 "echo main done", timeout=30)
    assert time.monotonic() - t0 < 0.6                   # did not wait for the pipe to close
    assert r.exit_code == 0 and "main done" in r.output
    for _ in range(100):                                  # it kept running (its output drained)
        if box.exec("cat bg_done 2>/dev/null", 5).output == "finished\n":
            break
        time.sleep(0.05)
    else:
        pytest.fail("the background job did not finish: killed by a broken pipe?")


@pytest.mark.parametrize("box", [b for b in BACKENDS if b.values[0] != "docker"], indirect=True)
def test_a_background_job_outlives_its_call_s_deadline_and_init_stays_idle(box):
    assert box.exec("sleep 3051 > /dev/null 2>&1 & sleep 3052 &", timeout=0.3).exit_code == 0
    init = init_process(box)
    cpu0 = sum(init.cpu_times()[:2])
    time.sleep(1.0)                                       # past the call's deadline
    assert sum(init.cpu_times()[:2]) - cpu0 < 0.2         # no busy loop on a passed deadline
    assert survivors(box, "slee[p] 305[12]") == 2         # background jobs are not timed out


# ----------------------------------------------------------------------------- 4: output floods

@pytest.mark.parametrize("box", BACKENDS, indirect=True)
def test_output_floods_stay_bounded_and_show_head_and_tail(box):
    limit = box.limits.output_chars
    r = box.exec("echo FIRST; head -c 50000000 /dev/zero | tr '\\0' a; echo; echo LAST", 60)
    assert r.total_bytes == 50_000_000 + len("FIRST\n\nLAST\n")
    assert r.truncated and len(r.output) < limit + 300
    assert r.output.startswith("FIRST\n") and r.output.endswith("LAST\n")
    assert "characters elided" in r.output
    if isinstance(box, S.LocalSandbox):                   # the capture never held the flood
        status = Path(f"/proc/{init_process(box).pid}/status").read_text()
        peak_kb = int(status.split("VmHWM:")[1].split()[0])
        assert peak_kb < 64 * 1024
    line = box.exec("python3 -c \"print('x' * 3_000_000)\"", 30)     # one huge line
    assert line.truncated and line.total_bytes == 3_000_001 and len(line.output) < limit + 300
    bars = box.exec("for i in $(seq 100); do printf '\\rprogress %d%%' $i; done; echo", 10)
    assert bars.output == "progress 100%\n"
    junk = box.exec("printf 'ok \\xff\\xfe \\033[31mred\\033[0m end'", 10)
    assert junk.output == "ok \ufffd\ufffd red end"


@pytest.mark.parametrize("tier", BACKENDS)
def test_concurrent_floods_arrive_whole(tier):
    """Output still in flight when the command exits is waited for: 8 sandboxes flooding 4 MB
    three times at once, every byte counted and the last line kept. (Docker lost the last 16-64 KB
    of 6 in 64 such floods at load ~20 when its reader stopped at 10 ms of quiet after the exit;
    with the machine less loaded that bug rarely shows, so this test guards it only under load.)"""
    n, boxes = 4 << 20, [S.open_sandbox(tier, kill_grace_s=0.5) for _ in range(8)]
    cmd = f"echo FIRST; head -c {n} /dev/zero | tr '\\0' a; echo; echo LAST"
    try:
        with ThreadPoolExecutor(len(boxes)) as pool:
            results = list(pool.map(lambda b: [b.exec(cmd, 60) for _ in range(3)], boxes))
    finally:
        for b in boxes:
            b.close()
    for r in (r for rs in results for r in rs):
        assert not r.timed_out and r.exit_code == 0
        assert r.total_bytes == n + len("FIRST\n\nLAST\n")
        assert r.output.startswith("FIRST\n") and r.output.endswith("\nLAST\n")


# ----------------------------------------------------------------------------- 5: interactive programs

@pytest.mark.parametrize("box", BACKENDS, indirect=True)
def test_interactive_programs_return_or_are_cut_off(box):
    sub = S.SUBMISSION
    assert box.exec("git init -q && git commit -q --allow-empty -m first", 10, cwd=sub).exit_code == 0
    returns = ["read x; echo got:$x", "cat", "python3 -c \"input('proceed? [y/N] ')\"", "git log",
               "less /etc/hostname", "more /etc/hostname", "cat /dev/tty", "touch f && rm -i f",
               "git commit -q --allow-empty && git rebase -i HEAD~1", "python3 -i -c x=1", "top"]
    for cmd in returns + ["vi f.txt"]:      # stdin is /dev/null, no terminal, PAGER/EDITOR=cat/true
        r = box.exec(cmd, timeout=2, cwd=sub)
        assert r.duration_s < (1 if cmd in returns else 2 + 0.5 + 2), cmd
        assert box.exec("echo alive", 5).output == "alive\n", f"after {cmd!r}"


# ----------------------------------------------------------------------------- 6: zombies, fork bombs

@pytest.mark.parametrize("box", BACKENDS, indirect=True)
def test_zombies_are_reaped(box):
    r = box.exec("python3 -c \"import os, time\nfor _ in range(5):\n    if os.fork() == 0: "
                 "os._exit(0)\ntime.sleep(0.3)\" & (sleep 0.1 &) ; sleep 0.5", 10)
    assert r.exit_code == 0
    for _ in range(40):
        zombies = box.exec("ps -eo stat=,cmd= | grep -c '^Z' || true", 5).output.strip()
        if isinstance(box, S.LocalSandbox):               # the plain tier sees the whole host:
            tree = psutil.Process(box._proc.pid).children(recursive=True)   # count its own only
            zombies = str(sum(p.status() == psutil.STATUS_ZOMBIE for p in tree))
        if zombies == "0":
            return
        time.sleep(0.05)
    pytest.fail(f"{zombies} zombies left")


BOMB = ("python3 -c \"import os, time\nn = 0\ntry:\n    while n < 500:\n        if os.fork() == 0:\n"
        "            time.sleep(3041); os._exit(0)\n        n += 1\nexcept OSError as e:\n"
        "    print('stopped after', n, 'forks', flush=True)\ntime.sleep(3042)\"")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_fork_bomb_is_contained_by_the_process_limit(backend):
    with S.open_sandbox(backend, kill_grace_s=0.5, pids=48) as box:
        if getattr(box, "limits_via", "cgroup") == "rlimit" and os.geteuid() == 0:
            pytest.skip("no cgroup here and RLIMIT_NPROC does not bind root")
        r = box.exec(BOMB, timeout=2)        # bounded at 500 forks even if containment failed
        assert r.timed_out and "stopped after" in r.output
        assert int(r.output.split("stopped after")[1].split()[0]) < 48
        assert box.exec("echo ok", 5).output == "ok\n"   # the kill freed the process slots
        assert survivors(box, "time.slee[p].304") == 0


# ----------------------------------------------------------------------------- 7: out of memory

@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_memory_is_reported_apart_from_a_timeout(backend):
    hog = "python3 -c \"x = b'x' * (400 << 20); print('survived')\""
    with S.open_sandbox(backend, kill_grace_s=0.5, memory_mb=96) as box:
        r = box.exec(hog, timeout=30)
        assert not r.timed_out and "survived" not in r.output and r.duration_s < 30
        if getattr(box, "limits_via", "cgroup") == "cgroup":
            assert r.oom and r.exit_code == 137
        else:                                   # RLIMIT_AS: the allocation fails, no kill
            assert not r.oom and r.exit_code == 1 and "MemoryError" in r.output
        assert box.exec("echo ok", 5).output == "ok\n"


@pytest.mark.parametrize("tier", [b for b in BACKENDS if b.values[0] != "docker"])
def test_the_rlimit_fallback_reports_memory_errors_without_cgroups(tier):
    with S.open_sandbox(tier, memory_mb=512, use_cgroups=False) as box:
        assert box.limits_via == "rlimit"
        r = box.exec("python3 -c \"x = b'x' * (1 << 30)\"", timeout=30)
        assert not r.timed_out and not r.oom and r.exit_code == 1 and "MemoryError" in r.output


# ----------------------------------------------------------------------------- 8: full disk, workspace removal

@pytest.mark.skipif(os.geteuid() != 0, reason="disk_mb (a tmpfs workspace) needs root")
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_full_disk_is_reported_and_the_workspace_is_removed_on_close(backend):
    try:
        box = S.open_sandbox(backend, disk_mb=8)
    except S.SandboxError as e:
        if backend != "docker":
            raise
        pytest.skip(f"this Docker host has no storage quota (overlay2 on xfs with pquota): {e}")
    try:
        r = box.exec("head -c 20000000 /dev/zero > big", 30)
        assert r.exit_code != 0 and "No space left on device" in r.output
        box.exec("rm -f big", 10)
        with pytest.raises(S.SandboxError, match="no space left|No space"):
            box.write_file("/home/submission/big2", b"\0" * (20 << 20))
        assert box.exec("echo still fine > small && cat small", 10).output == "still fine\n"
    finally:
        box.close()
    if isinstance(box, S.LocalSandbox):
        assert not box.dir.exists()
        assert str(box.fs) not in Path("/proc/self/mountinfo").read_text()


# ----------------------------------------------------------------------------- 9: crash, failed start, double close

@pytest.mark.parametrize("tier", [b for b in BACKENDS if b.values[0] != "docker"])
def test_after_a_crash_nothing_runs_and_the_sweep_removes_the_leftovers(tier):
    child = subprocess.run(
        [sys.executable, "-c", f"import json, os, signal, sandbox\n"
         f"box = sandbox.open_sandbox({tier!r})\n"
         f"box.exec('sleep 3091 &', 10)\n"
         f"print(json.dumps([str(box.dir), box.cgroup.dirs and [str(d) for d in box.cgroup.dirs] or []]), flush=True)\n"
         f"os.kill(os.getpid(), signal.SIGKILL)"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert child.returncode == -signal.SIGKILL
    workspace, cgroups = json.loads(child.stdout)
    for _ in range(100):            # init saw EOF on its request pipe and killed everything
        if not [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == ["sleep", "3091"]]:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the sandbox's background job outlived its crashed owner")
    assert Path(workspace).exists()
    removed = S.sweep_local_leftovers()
    assert workspace in removed and not Path(workspace).exists()
    assert all(not Path(d).exists() for d in cgroups)


@pytest.mark.parametrize("tier", [b for b in BACKENDS if b.values[0] != "docker"])
def test_a_failed_start_and_a_double_close_leave_nothing_behind(tier, tmp_path):
    def mine():                 # other processes (and engineers) open sandboxes too
        return {d for d in S._ROOT.glob(f"{os.getpid()}-*")}

    before = mine()
    bad = S.Task("t", tmp_path / "missing", "t", "paper", "", [], "do it")
    with pytest.raises(FileNotFoundError):
        S.open_sandbox(tier, task=bad)              # fails while laying out the task
    if os.geteuid() == 0:                           # the init itself cannot start in 1 MB
        with pytest.raises(S.SandboxError, match="did not start"):
            S.open_sandbox(tier, memory_mb=1)
    box = S.open_sandbox(tier)
    box.close()
    box.close()
    assert not box.alive()
    with pytest.raises(S.SandboxError, match="not running"):
        box.exec("true", 5)
    assert mine() == before


# ----------------------------------------------------------------------------- 10: network

@pytest.mark.parametrize("box", ISOLATED, indirect=True)
def test_without_network_outside_connections_fail_fast_and_loopback_works(box):
    r = box.exec("python3 -c \"import socket; socket.create_connection(('1.1.1.1', 80), timeout=20)\"", 30)
    assert r.exit_code != 0 and r.duration_s < 2
    r = box.exec("python3 -m http.server 8765 --bind 127.0.0.1 >/dev/null 2>&1 & "
                 "python3 -c \"import time, urllib.request\nfor _ in range(100):\n    try:\n"
                 "        print(urllib.request.urlopen('http://127.0.0.1:8765/').status); break\n"
                 "    except OSError: time.sleep(0.05)\"", 30)
    assert r.output.strip() == "200"


def test_the_plain_tier_says_it_cannot_turn_the_network_off(caplog):
    with S.open_sandbox("plain") as box:
        assert box.tier == "plain"
    assert any("NOT a security boundary" in rec.message for rec in caplog.records)


# ----------------------------------------------------------------------------- 0: the agent sees only its task

OWN_ROOT = {"bin", "dev", "etc", "home", "lib", "lib32", "lib64", "libx32", "proc", "root", "run",
            "sbin", "tmp", "usr", "var"}                 # root_plan's tree (local isolated tiers)
IMAGE_ROOT = OWN_ROOT | {"boot", "media", "mnt", "opt", "srv", "sys", ".dockerenv"}   # a Debian image


def secret_task(root: Path) -> tuple[S.Task, list[Path]]:
    """A task folder whose rubric, judge file and run directory hold a canary, beside a run dir."""
    canary = uuid.uuid4().hex
    d = root / "runs" / "r1" / "factory" / "tasks" / "t1"
    d.mkdir(parents=True)
    (d / "paper.md").write_text("# The paper\nReproduce it.\n")
    (d / "addendum.md").write_text("Nothing else.\n")
    (d / "rubric.json").write_text(json.dumps({"id": "root", "answer": canary}))
    (d / "judge.addendum.md").write_text(canary)
    (root / "runs" / "r1" / "log.jsonl").write_text(canary)
    return S.load_task(d), [d / "rubric.json", d / "judge.addendum.md", root / "runs" / "r1" / "log.jsonl",
                            REPO / "sandbox.py", Path.home() / ".bashrc"]


@pytest.mark.parametrize("backend", ISOLATED)
def test_the_agent_sees_its_task_and_nothing_of_the_host(backend, tmp_path):
    task, secrets = secret_task(tmp_path)
    canary = json.loads(secrets[0].read_text())["answer"]
    with S.open_sandbox(backend, task=task) as box:
        layout = box.exec("ls -A /home /home/paper; test -d /home/submission/.git && echo git", 10).output
        assert {"instructions.txt", "paper", "submission", "paper.md", "addendum.md", "git"} <= set(layout.split())
        assert "rubric.json" not in layout and "judge" not in layout
        for path in secrets + [tmp_path / "runs", REPO]:      # by their host paths: not there
            r = box.exec(f"ls -A '{path}'; cat '{path}'", 10)
            assert r.exit_code != 0 and canary not in r.output and "No such file" in r.output, path
        top = set(box.exec("ls -A /", 10).output.split())
        assert top <= (OWN_ROOT if isinstance(box, S.LocalSandbox) else IMAGE_ROOT), top
        assert not top & (set(os.listdir("/")) - IMAGE_ROOT)   # no host-only top-level entry
        found = box.exec("grep -rls --exclude-dir=proc --exclude-dir=sys --exclude-dir=usr "
                         f"--exclude-dir=dev {canary} / | head", 60).output
        assert found == ""                                     # the canary is nowhere inside
        if isinstance(box, S.LocalSandbox):                    # the host's users, secrets, configs
            assert box.exec("ls -A /root", 10).output.split() in ([], [".pyenv"])
            etc = box.exec("cat /etc/passwd; ls /etc/shadow /etc/pip.conf /etc/ssh", 10).output
            assert etc.startswith("root:x:0:0:root:/home:/bin/bash\n") and etc.count("No such file") == 3


def test_the_plain_tier_cannot_hide_the_host_and_is_refused_unless_allowed(tmp_path, monkeypatch):
    task, secrets = secret_task(tmp_path)
    canary = json.loads(secrets[0].read_text())["answer"]
    with S.open_sandbox("plain", task=task) as box:          # named: allowed, and it says so
        assert canary in box.exec(f"cat {secrets[0]}", 10).output
    with pytest.raises(S.SandboxError, match="cannot hide the host"):
        S.open_sandbox("plain", allow_unisolated=False)
    with pytest.raises(S.SandboxError, match="plain tier.*allow_unisolated"):
        S.require_isolation("plain")
    assert S.require_isolation("plain", allow_unisolated=True) == "plain"
    for tier in ("namespace", "bwrap"):                       # a machine with no isolated tier
        monkeypatch.setitem(S._TIER_PROBES, tier, "simulated: unavailable")
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/klong-docker.sock")
    monkeypatch.setattr(S, "_DOCKER_DOWN", "simulated")
    with pytest.raises(S.SandboxError, match="'local' on this machine runs the agent on the plain"):
        S.open_sandbox("local", task=task)                   # never silently unisolated
    with pytest.raises(S.SandboxError, match="'auto'"):
        S.require_isolation("auto")
    with S.open_sandbox("auto", allow_unisolated=True) as box:
        assert box.tier == "plain"


# ----------------------------------------------------------------------------- isolation, files, clamping

@pytest.mark.parametrize("box", ISOLATED, indirect=True)
def test_isolated_tiers_see_the_layout_paths_and_a_read_only_root(box):
    r = box.exec("touch /usr/x; touch /home/ok && echo wrote; ls -A /root; echo $HOME", 10)
    assert "Read-only file system" in r.output and "wrote" in r.output
    assert r.output.strip().endswith("/home")
    if box.tier != "docker":                           # this Python, hidden folder or not, first
        assert box.exec("command -v python3", 10).output.strip() == f"{Path(sys.executable).parent}/python3"
    if box.tier == "namespace":
        caps = box.exec("grep CapEff /proc/self/status", 10).output
        assert caps.split()[1] == "0000000000000000"     # root without capabilities


@pytest.mark.parametrize("box", BACKENDS, indirect=True)
@given(rel=sandbox_relpaths(), data=st.binary(max_size=5000))
def test_file_round_trips(box, rel, data):
    path = f"/home/submission/{uuid.uuid4().hex}/{rel}"
    box.write_file(path, data)
    assert box.read_file(path) == data
    assert box.exec(f"cat {box.inside(path)} | wc -c", 10).output.strip() == str(len(data))
    with pytest.raises(S.SandboxError):                   # a file is no folder
        box.write_file(f"{path}/below", b"x")
    assert box.read_file(path) == data


@pytest.mark.parametrize("box", BACKENDS, indirect=True)
def test_upload_download_and_reads_outside_the_workspace(box, tmp_path):
    src = tmp_path / "src"
    (src / "deep" / "er").mkdir(parents=True)
    (src / "a.txt").write_text("alpha")
    (src / "deep" / "er" / "b.bin").write_bytes(bytes(range(256)))
    (src / "big.bin").write_bytes(b"\0" * 3000)
    box.upload(src, "/home/submission/up")
    sub = S.SUBMISSION
    assert box.exec("cat up/a.txt; wc -c < up/deep/er/b.bin", 10, cwd=sub).output == "alpha256\n"
    box.exec("ln -s a.txt up/link", 10, cwd=sub)
    out = tmp_path / "out"
    box.download("/home/submission/up", out, max_file_bytes=1000)
    assert (out / "a.txt").read_text() == "alpha"
    assert (out / "deep" / "er" / "b.bin").read_bytes() == bytes(range(256))
    assert not (out / "big.bin").exists()                    # over max_file_bytes: left out
    assert os.readlink(out / "link") == "a.txt"              # links stay links
    box.exec("ln -s /etc/hostname up/abs_link", 10, cwd=sub)
    assert box.read_file("/home/submission/up/abs_link") == box.read_file("/etc/hostname")
    box.exec("ln -s ../../../etc/passwd up/deep/climbing", 10, cwd=sub)
    with pytest.raises(S.SandboxError, match=r"2 link\(s\) point outside the folder \(abs_link -> "
                                             r"/etc/hostname, deep/climbing -> \.\./\.\./\.\./etc"):
        box.download("/home/submission/up", tmp_path / "out2")   # no host reader may follow one
    assert not (tmp_path / "out2" / "abs_link").exists()
    with pytest.raises(S.SandboxError):
        box.read_file("/home/submission/nope")
    if isinstance(box, S.LocalSandbox):                       # no writes through links out
        with pytest.raises(S.SandboxError, match="not writable"):
            box.write_file("/home/submission/up/abs_link", "through the link")
        box.exec("ln -s /usr up/usr_link", 10, cwd=sub)
        (src / "usr_link").mkdir()
        (src / "usr_link" / "planted").write_text("x")
        with pytest.raises(S.SandboxError, match="leaves the workspace"):
            box.upload(src, "/home/submission/up")
        assert not Path("/usr/planted").exists()


@pytest.mark.parametrize("backend", BACKENDS)
def test_timeouts_are_clamped_to_the_cap_and_must_be_positive(backend):
    with S.open_sandbox(backend, max_exec_s=1, kill_grace_s=0.5) as box:
        r = box.exec("sleep 30", timeout=1000)
        assert r.timed_out and r.duration_s < 4
        for bad in (0, -1):
            with pytest.raises(ValueError, match="positive"):
                box.exec("true", timeout=bad)


def test_concurrent_sandboxes_are_independent():
    tier = S.best_tier()
    boxes = [S.open_sandbox(tier) for _ in range(3)]
    try:
        out = {}

        def work(i, b):
            out[i] = b.exec(f"echo {i} > mine && sleep 0.5 && cat mine", 10).output

        t0 = time.monotonic()
        threads = [threading.Thread(target=work, args=(i, b)) for i, b in enumerate(boxes)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert out == {i: f"{i}\n" for i in range(3)}
        assert time.monotonic() - t0 < 1.4                   # in parallel, not one after another
    finally:
        for b in boxes:
            b.close()


# ----------------------------------------------------------------------------- Docker refusal and fallback

@pytest.mark.parametrize("box", [S.best_tier()], indirect=True)
def test_the_docker_escapee_sweep_kills_exactly_the_marked_processes(box):
    # Docker's `timeout -k` misses setsid escapees; its sweep script is plain bash + /proc, so it
    # is checked here in a local tier (the same kernel interfaces a container sees).
    box.exec("setsid sleep 3071 & (setsid sleep 3072 &) ; sleep 3073 &", 10, env={"KLONG_EXEC": "m1"})
    box.exec("sleep 3074 &", 10, env={"KLONG_EXEC": "m2"})
    box.exec(S.marked_kill_script("m1"), 10)
    assert survivors(box, "slee[p] 307[123]") == 0 and survivors(box, "slee[p] 3074") == 1


@pytest.mark.skipif(DOCKER_PROBLEM is not None and "engine answers" not in DOCKER_PROBLEM,
                    reason=f"docker: {DOCKER_PROBLEM}")
def test_an_engine_without_the_image_is_a_reason_to_skip_not_an_error():
    assert "missing: run scripts/docker-setup.sh" in S.docker_problem("klong-sandbox:no-such-tag")
    t0 = time.monotonic()
    with pytest.raises(S.SandboxError, match="cannot pull klong-sandbox:no-such-tag .*scripts/docker-setup.sh"):
        S.open_sandbox("docker", image="klong-sandbox:no-such-tag")   # no registry here
    assert time.monotonic() - t0 < 60


def test_docker_refusal_is_clear_and_auto_falls_back(monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/klong-docker.sock")
    with pytest.raises(S.SandboxError, match="no Docker engine answered.*backend='local'"):
        S.open_sandbox("docker")
    with S.open_sandbox("auto") as box:
        assert box.tier == S.best_tier()


# ----------------------------------------------------------------------------- output cleaning and cutting

@given(raw=shell_outputs(), limit=st.integers(40, 4000))
def test_cut_output_is_bounded_and_exact_when_it_fits(raw, limit):
    text, truncated = S.cut_output(raw, b"", len(raw), limit)
    clean = S.clean_output(raw)
    if truncated:
        assert len(text) <= limit + 200
        assert text.startswith(clean[:limit // 2]) and text.endswith(clean[len(clean) - (limit - limit // 2):])
        assert int(re.search(r"\[\.\.\. (\d+) characters elided", text).group(1)) == len(clean) - limit
    else:
        assert text == clean
    assert "\x1b" not in text and "\r" not in text


@given(raw=shell_outputs(), cap=st.integers(1, 5000))
def test_a_bounded_capture_reports_what_it_lost(raw, cap):
    head, tail = raw[:cap], raw[cap:][-cap:] if len(raw) > cap else b""
    text, truncated = S.cut_output(head, tail, len(raw), 10_000)
    assert truncated == (len(raw) > 2 * cap or len(S.clean_output(raw)) > 10_000)
    if len(raw) > 2 * cap:
        assert f"({len(raw)} bytes of output in all)" in text
