"""sandbox_pool.SandboxPool on the real local sandbox (and Docker when an engine runs): what an
episode takes from the pool is what open_sandbox(task=...) gives, fresh and handed out once; the
pool refills in the background, never starts more than `limit`, discards sandboxes that died while
waiting, refuses what open_sandbox refuses, and leaves nothing behind when closed."""
import os
import signal
import time

import psutil
import pytest

import agent as A
import sandbox as S
from sandbox_pool import SandboxPool
from tests.test_sandbox_agent import DOCKER, GOLD_FLAG, HEX_PAPER, TIERS, flag_expert, make_task

LOCAL = "local"


def _until(cond, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_a_taken_sandbox_is_fresh_and_holds_the_task_layout(tmp_path):
    task = S.load_task(make_task(tmp_path, HEX_PAPER))
    with SandboxPool(2, LOCAL) as pool:
        assert pool.wait_ready(timeout=60)
        names = set()
        for k in range(4):                                   # more than the pool holds at once
            with pool.take(task) as box:
                assert box.name not in names                 # never handed out twice
                names.add(box.name)
                paper = box.exec("ls -A /home/paper", 30).output.split()
                assert "paper.md" in paper and "blacklist.txt" in paper
                assert not {"rubric.json", "config.yaml"} & set(paper)       # issue 21
                assert box.read_file("/home/instructions.txt").decode() == task.instructions
                assert box.exec("ls -A /home/submission", 30).output == ".git\n"   # nothing earlier
                log = box.exec("git -C /home/submission log", 30)
                assert log.exit_code != 0 and "does not have any commits yet" in log.output
                box.exec("echo x > /home/submission/earlier", 30)
        assert len(names) == 4 and pool.stats["hits"] >= 2


def test_the_pool_refills_in_the_background_and_counts_every_take(tmp_path):
    with SandboxPool(2, LOCAL) as pool:
        assert pool.wait_ready(timeout=60) and pool.ready() == 2
        pool.take().close()
        assert pool.stats["hits"] == 1
        assert _until(lambda: pool.ready() == 2)             # the replacement, unasked
        assert pool.stats["started"] == 3 and pool.stats["opened"] == 0


def test_limit_bounds_the_sandboxes_ever_started(tmp_path):
    """limit = the takes to come: started by fillers + opened by takes == limit, none left."""
    with SandboxPool(2, LOCAL, limit=3) as pool:
        for _ in range(3):
            pool.take().close()
        time.sleep(0.5)                                      # a filler that would overshoot
        st = pool.stats
        assert st["started"] + st["opened"] == 3 and pool.ready() == 0
        assert st["hits"] + st["waited"] + st["opened"] == 3


def test_a_ready_sandbox_that_died_is_discarded_not_handed_out():
    with SandboxPool(1, LOCAL, fillers=1) as pool:
        assert pool.wait_ready(timeout=60)
        dead = pool._ready[0]
        os.killpg(dead._proc.pid, signal.SIGKILL)            # its init and everything below
        assert _until(lambda: not dead.alive())
        with pool.take() as box:
            assert box is not dead and box.alive()
            assert box.exec("echo alive", 30).output == "alive\n"
        assert pool.stats["discarded"] == 1
        assert not dead.dir.exists()                         # closed: its workspace removed


def test_close_closes_the_ready_sandboxes_and_later_takes_fail():
    with SandboxPool(2, LOCAL) as pool:
        assert pool.wait_ready(timeout=60)
        ready = list(pool._ready)
        inits = [psutil.Process(b._proc.pid) for b in ready]
    assert all(not b.alive() and not b.dir.exists() for b in ready)
    assert _until(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE
                                  for p in inits))
    with pytest.raises(S.SandboxError, match="closed"):
        pool.take()
    pool.close()                                             # idempotent


def test_the_unisolated_tier_is_refused_as_open_sandbox_refuses_it():
    with pytest.raises(S.SandboxError) as direct:
        S.open_sandbox("plain", allow_unisolated=False)
    with SandboxPool(1, "plain", allow_unisolated=False, retry_s=0.05) as pool:
        with pytest.raises(S.SandboxError) as pooled:
            pool.take()
        assert _until(lambda: pool.stats["failed"] >= 1)
        assert "plain tier" in pool.last_error
    assert str(pooled.value) == str(direct.value)


@pytest.mark.parametrize("tier", TIERS + [DOCKER])
def test_an_episode_on_a_pooled_sandbox_sees_what_it_sees_on_its_own(tier, tmp_path):
    """The same scripted episode, with and without the pool: the same observations, submission."""
    task = make_task(tmp_path, HEX_PAPER)
    own = A.run_episode(A.ScriptedPolicy(flag_expert), task, A.Budget(max_turns=10), backend=tier,
                        submission_out=tmp_path / "own", allow_unisolated=True)
    with SandboxPool(1, tier, allow_unisolated=True) as pool:
        pooled = A.run_episode(A.ScriptedPolicy(flag_expert), task, A.Budget(max_turns=10),
                               submission_out=tmp_path / "pooled", sandboxes=pool)
        assert pool.stats["hits"] + pool.stats["waited"] + pool.stats["opened"] == 1
    assert pooled.stop_reason == own.stop_reason == "end_task" and pooled.tier == own.tier == tier

    def seen(ep):
        return [m["content"] for m in ep.trajectory.messages if m["role"] != "system"]
    if tier == "plain":                       # its home is a host folder named per sandbox
        assert len(seen(pooled)) == len(seen(own))
    else:
        assert seen(pooled) == seen(own)
    assert (pooled.submission_dir / "flag.txt").read_text().strip() == GOLD_FLAG
    assert (pooled.submission_dir / ".git").is_dir()


@pytest.mark.parametrize("tier", TIERS + [DOCKER])
def test_init_repository_makes_what_git_init_makes_inside(tier):
    """The local tiers copy an empty repository the host's git made once (no command per
    sandbox); it must be what `git init -q --template=` makes inside: same files, modes and
    contents, and a repository git accepts (a first commit works)."""
    with S.open_sandbox(tier, allow_unisolated=True) as box:
        box.init_repository("/home/submission")
        sub, ref_dir = box.inside("/home/submission"), f"{box.tmp}/ref"     # (plain: host paths)
        r = box.exec(f"mkdir -p {ref_dir} && cd {ref_dir} && git init -q --template=", 30)
        assert r.exit_code == 0, r.output
        listing = ("cd {} && find .git -printf '%P %y %m\\n' | sort && "
                   "cat .git/HEAD .git/config")
        made = box.exec(listing.format(sub), 30)
        ref = box.exec(listing.format(ref_dir), 30)
        assert made.exit_code == ref.exit_code == 0
        assert made.output == ref.output and "hooks" not in made.output
        commit = box.exec(f"cd {sub} && echo x > f && git add f && "
                          "git commit -qm first && git log --oneline | wc -l", 30)
        assert commit.exit_code == 0 and commit.output.strip() == "1", commit.output
