"""One RL update under torchrun, launched by tests/test_dist.py (`torch.distributed.run
--nproc_per_node 2 tests/dist_worker.py OUT`); the test runs the same functions in one process.

The update is grpo.rl_update on canned groups (random behaviour log-probs, rewards and
sub-trajectory counts) for the tiny model, FSDP2-sharded by dist.shard; 3 trainable tasks over 2
ranks, so rank 1 also runs a padding task. Rank 0 saves the updated weights and the step's stats.
"""
import random
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import dist  # noqa: E402
import grpo  # noqa: E402
import klong  # noqa: E402
from model import load_model  # noqa: E402
import split  # noqa: E402


def config() -> klong.Config:
    """The tiny model, small; clip 0.05 so gradient clipping binds; activation checkpointing on."""
    return klong.Config(hidden_size=32, intermediate_size=64, context_len=256, clip=0.05,
                        activation_checkpointing=True, clip_eps=0.2, kl_beta=0.1)


def build(cfg: klong.Config):
    """(tokenizer, policy, π_ref): the reference has other weights (seed + 1), so KL ≠ 0."""
    tok, model = load_model(cfg)
    _, ref = load_model(replace(cfg, seed=cfg.seed + 1))
    return tok, dist.shard(model, cfg), dist.shard(ref.eval().requires_grad_(False), cfg)


def groups(vocab: int) -> list[list[grpo.Rollout]]:
    """4 tasks: 3 with 2-3 rollouts of 1-3 samples (contexts that grow or are re-truncated), one
    whose rollouts sampled nothing (no sequence: counted in 1/(n·K)'s task mean, not trained)."""
    rng = random.Random(0)
    ids = lambda n: [rng.randrange(10, vocab) for _ in range(n)]  # noqa: E731
    out = []
    for t in range(3):
        group = []
        for j in range(rng.randint(2, 3)):
            samples, ctx = [], ids(rng.randint(8, 20))
            for k in range(rng.randint(1, 3)):
                act = ids(rng.randint(2, 5))
                samples.append(split.Sample(k, list(ctx), act,
                                            [-rng.uniform(0.5, 6.0) for _ in act], 0))
                ctx = ctx + act + ids(3) if rng.random() < 0.6 else ids(rng.randint(8, 20))
            traj = split.Trajectory(f"t{t}-{j}", f"t{t}", [], 0, samples=samples)
            group.append(grpo.Rollout(f"t{t}", f"t{t}", rng.random(), traj, "end_task",
                                      len(samples), 0.0, 0.0))
        out.append(group)
    out.append([grpo.Rollout("t3", "t3", 1.0, split.Trajectory("t3-0", "t3", [], 0), "crash", 0,
                             0.0, 0.0)])
    return out


def update(model, ref, cfg: klong.Config, vocab: int, pad_id: int) -> dict:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.01)
    return grpo.rl_update(model, ref, opt, groups(vocab), cfg, pad_id)


if __name__ == "__main__":
    dist.init("cpu")
    cfg = config()
    tok, model, ref = build(cfg)
    stats = update(model, ref, cfg, len(tok), tok.pad_token_id)
    weights = dist.full_state_dict(model)
    if dist.is_main():
        torch.save({"weights": weights, "stats": stats, "world": dist.world()}, sys.argv[1])
    dist.barrier()          # no rank tears its gloo connections down while another still works
    dist.close()
