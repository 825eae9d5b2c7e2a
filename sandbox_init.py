"""The program that runs inside a local sandbox (sandbox.py's namespace, bwrap and plain tiers):
one long-lived init per sandbox serving exec requests on a pipe, a reaper per command, tree kills,
and the namespace tier's own root (docs/SANDBOX.md).

These functions run *inside* the sandbox, in one `python -I -S` process started with their source
(`sandbox._init_source`): stdlib only, each imports what it uses, and nothing may refer to a
global of this module or of sandbox.py. sandbox.py ships them; nothing else imports this module.
"""
from __future__ import annotations


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
        _sbx_reap()                            # reap R processes and orphans


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
    while time.monotonic() < end and _sbx_reap():
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
            _sbx_reap()
        time.sleep(0.005)


def _sbx_reap() -> bool:
    """Reap every child that has exited, without waiting; False when no child is left at all."""
    import os

    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
        return True
    except ChildProcessError:
        return False


def _sbx_isolate(libc, cfg: dict) -> list[str]:
    """Namespace tier, as root inside fresh mount + net namespaces: build the sandbox's own root
    from `cfg["plan"]` (see `root_plan`) on a tmpfs, `pivot_root` into it and detach the host's
    root, so no host path is reachable that the plan did not mount; then everything but the
    writable mounts (workspace, tmpfs) becomes read-only and loopback comes up.
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

    def mkpoint(target, like_dir):
        os.makedirs(target if like_dir else os.path.dirname(target), exist_ok=True)
        if not like_dir and not os.path.lexists(target):
            open(target, "a").close()

    new = cfg["root"]
    mount(None, "/", None, REC | PRIVATE)
    mount("tmpfs", new, "tmpfs", NOSUID | NODEV, "size=4m,mode=0755")
    writable = []
    for kind, src, dst in cfg["plan"]:
        t = new + dst
        if kind == "link":
            os.makedirs(os.path.dirname(t), exist_ok=True)
            os.symlink(src, t)
        elif kind == "dir":
            os.makedirs(t, exist_ok=True)
        elif kind in ("ro", "bind"):
            mkpoint(t, os.path.isdir(src))
            mount(src, t, None, BIND | REC)
            if kind == "bind":
                writable.append(dst)
        elif kind == "tmpfs":
            mkpoint(t, True)
            mode = "1777" if dst.endswith(("tmp", "shm")) else "0755"
            mount("tmpfs", t, "tmpfs", NOSUID | NODEV, f"size={src}m,mode={mode}")
            writable.append(dst)
        elif kind == "proc":
            mkpoint(t, True)
            mount("proc", t, "proc", NOSUID | NODEV | NOEXEC)
        elif kind == "dev":                    # a minimal /dev: the harmless nodes, links, pts
            mkpoint(t, True)
            mount("tmpfs", t, "tmpfs", NOSUID, "size=64k,mode=0755")
            for node in ("null", "zero", "full", "random", "urandom", "tty"):
                mkpoint(f"{t}/{node}", False)
                mount(f"/dev/{node}", f"{t}/{node}", None, BIND)
            for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                                 ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2"),
                                 ("ptmx", "pts/ptmx")):
                os.symlink(target, f"{t}/{name}")
            os.makedirs(f"{t}/pts")
    os.chdir(new)                              # pivot_root(".", "."): the host's root ends up
    nr = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}[os.uname().machine]
    if libc.syscall(nr, b".", b".") != 0:      # stacked on ours; detach it for good
        raise OSError(ctypes.get_errno(), "pivot_root failed")
    if libc.umount2(b".", 2) != 0:             # MNT_DETACH
        raise OSError(ctypes.get_errno(), "cannot detach the host's root")
    os.chdir("/")
    warnings = []
    for line in open("/proc/self/mountinfo"):
        fields = line.split()
        mp = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
        if mp in writable or mp.startswith(("/proc", "/dev/")):
            continue                           # (exposed prefixes under them do become read-only)
        flags = sum(per_mount.get(o, 0) for o in fields[5].split(","))
        try:
            mount(None, mp, None, REMOUNT | BIND | RDONLY | flags)
        except OSError as e:
            warnings.append(f"{mp} stays writable: {e.strerror}")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:    # SIOCSIFFLAGS lo UP|LOOPBACK|RUNNING
        fcntl.ioctl(s, 0x8914, struct.pack("16sH22x", b"lo", 0x1 | 0x8 | 0x40))
    return warnings
