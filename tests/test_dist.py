"""dist.py: `torchrun --nproc_per_node 2` with gloo and FSDP2 on CPU does what one process does.

Two launches (each ~10 s of imports on 2 cores); the one-process references run in this process.
Tolerance: fp32 weights after the step agree to 1e-6 absolute (weights are O(1); the two runs
differ only in the order of float sums: across ranks, and within DTensor norms). Measured: 6e-8.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

import klong
from tests import dist_worker
from tests.strategies import make_trajectory

ROOT = Path(__file__).resolve().parents[1]
ATOL = 1e-6


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    env.pop("WORLD_SIZE", None)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node", "2", *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=ATOL, rtol=0), (k, (a[k] - b[k]).abs().max())


def _final(run: Path) -> dict:
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(run / "sft" / "final").state_dict()


def _log(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "sft" / "log.jsonl").read_text().splitlines()]


def test_two_process_sft_equals_one_process_and_its_sharded_checkpoint_resumes_in_one(tmp_path,
                                                                                       capsys):
    """2 SFT steps of 3 micro-batches (rank 0 gets 2, rank 1 one + a padding micro-batch), clip
    binding, activation checkpointing in the 2-process run only. Then the 2-process checkpoint of
    step 1 (one shard file per rank) resumes in one process and finishes step 2."""
    data = tmp_path / "trajs.jsonl"
    data.write_text("".join(json.dumps(make_trajectory(s, 30, 15, 0.0, 0, tid=f"t{s}")) + "\n"
                            for s in range(6)))
    args = ["--stage", "sft", "--data", str(data), "--sft-steps", "2", "--save-every", "1",
            "--hidden-size", "32", "--intermediate-size", "64", "--context-len", "256",
            "--overlap", "32", "--pack-len", "768", "--batch-rows", "2", "--grad-accum", "3",
            "--warmup", "1", "--clip", "0.05"]
    _torchrun("klong.py", *args, "--run-dir", str(tmp_path / "two"), "--activation-checkpointing",
              "true")
    klong.main(args + ["--run-dir", str(tmp_path / "one")])
    two, one = _log(tmp_path / "two"), _log(tmp_path / "one")
    assert [r["supervised_tokens"] for r in two] == [r["supervised_tokens"] for r in one]
    for a, b in zip(two, one):
        assert abs(a["loss"] - b["loss"]) < 1e-4 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-4
        assert a["grad_norm"] > 0.05                                     # the clip binds
    _assert_same_weights(_final(tmp_path / "two"), _final(tmp_path / "one"))

    ck = tmp_path / "two" / "sft" / "checkpoint-1"
    assert sorted(p.name for p in (ck / "dcp").glob("*.distcp")) == ["__0_0.distcp",
                                                                    "__1_0.distcp"]
    resumed = tmp_path / "resumed" / "sft"
    resumed.mkdir(parents=True)
    shutil.copytree(ck, resumed / ck.name)
    shutil.copy(tmp_path / "two" / "sft" / "log.jsonl", resumed / "log.jsonl")
    capsys.readouterr()
    klong.main(args + ["--run-dir", str(tmp_path / "resumed")])
    assert f"resumed from {resumed / ck.name} at step 1" in capsys.readouterr().out
    assert [r["step"] for r in _log(tmp_path / "resumed")] == [1, 2]
    _assert_same_weights(_final(tmp_path / "resumed"), _final(tmp_path / "one"))


def test_two_process_rl_update_equals_one_process(tmp_path):
    """grpo.rl_update on the same canned groups: FSDP over 2 ranks (tasks dealt 2 + 1 + padding)
    against one process; the updated weights and the step's statistics agree."""
    _torchrun("tests/dist_worker.py", str(tmp_path / "two.pt"))
    two = torch.load(tmp_path / "two.pt", weights_only=False)
    cfg = dist_worker.config()
    tok, model, ref = dist_worker.build(cfg)
    one = dist_worker.update(model, ref, cfg, len(tok), tok.pad_token_id)
    assert two["world"] == 2
    assert one["grad_norm"] > cfg.clip and one["kl"] > 0 and one["clip_frac"] > 0
    for k in ("kl", "clip_frac", "grad_norm"):
        assert abs(two["stats"][k] - one[k]) < 1e-5, (k, two["stats"][k], one[k])
    for k in ("action_tokens", "sub_trajectories"):
        assert two["stats"][k] == one[k]
    _assert_same_weights(two["weights"], {k: v.detach() for k, v in model.state_dict().items()})
