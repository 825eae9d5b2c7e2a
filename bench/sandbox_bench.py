"""Benchmarks of sandbox.py (docs/BENCH.md, CPU targets):

1. Sandbox command round trip (`true`), p50 per local tier (and Docker when an engine answers),
   against `subprocess.run` of the same command (`bash -lc true`, same environment) and of a bare
   `true`. Target: p50 ≤ 20 ms on the namespace or bubblewrap tier, ≤ 3× the bare subprocess.
2. One rollout turn at turn 200 of an episode with LocalPolicy (tiny random Qwen2 + the tiny
   tokenizer): the KV cache kept across turns (prompt caching) against re-encoding the whole
   context every turn (`prompt_cache=False`), and the whole 200-turn episode. Target: ≥ 3× faster
   per episode. Both sides see identical contexts (the driver appends the same canned action and
   observation after every turn, so the policy's cache is reused up to the end of the previous
   context, as with a real re-tokenisation drift) and sample greedily the same number of tokens.

Usage: OMP_NUM_THREADS=1 python bench/sandbox_bench.py [--turns 200] [--repeats 50]
Writes bench/results/sandbox-<device>.json (figures, machine, versions, shapes).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
import torch  # noqa: E402

import agent as A  # noqa: E402
import sandbox as S  # noqa: E402


def interleaved_p50_ms(fns: list, repeats: int, warmup: int = 5) -> list[float]:
    """p50 of each function, timed in turns (f1, f2, f3, f1, …) so that load from other processes
    on the shared machine hits every side alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [1000 * statistics.median(ts) for ts in times]


def round_trip(repeats: int) -> dict:
    """p50 of exec('true') per backend, with the bare subprocess anchors of the same process."""
    out = {"load_average_1min": os.getloadavg()[0]}
    backends = [t for t in S.TIERS if S.tier_problem(t) is None]
    problem = S.docker_problem()          # an engine with the sandbox image (scripts/docker-setup.sh)
    if problem is None:
        backends.append("docker")
    else:
        out["docker"] = f"skipped: {problem}"
    for backend in backends:
        with S.open_sandbox(backend) as box:
            env = box._env(None)
            ours, bash, bare = interleaved_p50_ms([
                lambda: box.exec("true", 10),
                lambda: subprocess.run(["bash", "-lc", "true"], env=env, stdin=subprocess.DEVNULL),
                lambda: subprocess.run(["true"], stdin=subprocess.DEVNULL)], repeats)
        out[backend] = {"sandbox_p50_ms": ours, "subprocess_bash_lc_p50_ms": bash,
                        "subprocess_true_p50_ms": bare, "ratio_vs_bash_lc": ours / bash}
    return out


def tiny_policy_pair(seed: int = 0):
    import chat
    from transformers import Qwen2Config, Qwen2ForCausalLM
    tok = chat.build_tiny_tokenizer()
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=128, intermediate_size=512,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=32768)
    model = Qwen2ForCausalLM(cfg).eval()
    return tok, model, cfg


def episode(policy: A.LocalPolicy, turns: int, obs_words: int) -> tuple[list[float], int]:
    """`turns` greedy turns; returns the seconds of each act() and the tokens sampled."""
    msgs = [{"role": "system", "content": A.SYSTEM_PROMPT}, {"role": "user", "content": S.DEFAULT_INSTRUCTIONS}]
    times, sampled = [], 0
    for t in range(turns):
        t0 = time.perf_counter()
        reply = policy.act(msgs, A.TOOLS)
        times.append(time.perf_counter() - t0)
        sampled += len(reply.sample.action_ids)
        msgs.append({"role": "assistant", "content": "", "tool_calls": [{
            "id": f"c{t}", "type": "function",
            "function": {"name": "bash", "arguments": {"cmd": f"python train.py --step {t}"}}}]})
        msgs.append({"role": "tool", "tool_call_id": f"c{t}", "name": "bash",
                     "content": " ".join(f"loss {t}.{k} ok" for k in range(obs_words // 3))})
    return times, sampled


def prompt_caching(turns: int, obs_words: int, max_new_tokens: int) -> dict:
    tok, model, cfg = tiny_policy_pair()
    out = {"load_average_1min": os.getloadavg()[0], "model": {"hidden": cfg.hidden_size, "layers": cfg.num_hidden_layers,
                     "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads,
                     "vocab": cfg.vocab_size}, "turns": turns, "max_new_tokens": max_new_tokens}
    for name, cache in (("kv_cache_kept", True), ("re_encode", False)):
        pol = A.LocalPolicy(model, tok, temperature=0, max_new_tokens=max_new_tokens,
                            prompt_cache=cache)
        times, sampled = episode(pol, turns, obs_words)
        out[name] = {"episode_s": sum(times), "turn_last_s": times[-1],
                     "turn_last_median_of_5_s": statistics.median(times[-5:]),
                     "tokens_sampled": sampled, "tokens_through_model": pol.encoded_tokens,
                     "final_context_tokens": len(pol._cached) + 1}
    ours, anchor = out["kv_cache_kept"], out["re_encode"]
    out["speedup_episode"] = anchor["episode_s"] / ours["episode_s"]
    out["speedup_turn_last"] = anchor["turn_last_median_of_5_s"] / ours["turn_last_median_of_5_s"]
    out["tokenizer"] = f"chat.build_tiny_tokenizer (vocab {len(tok)})"
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--turns", type=int, default=200)
    p.add_argument("--obs-words", type=int, default=12, help="words per observation (~2 tokens each)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--only", choices=["round_trip", "prompt_caching"],
                   help="measure one row; the other keeps its figures from the last JSON")
    a = p.parse_args()
    out = ROOT / "bench" / "results" / f"sandbox-{'cpu' if not torch.cuda.is_available() else 'cuda'}.json"
    old = json.loads(out.read_text()) if a.only and out.exists() else {}
    res = {**common.header("sandbox_bench"),
           "round_trip": round_trip(a.repeats) if a.only != "prompt_caching" else old["round_trip"],
           "prompt_caching": prompt_caching(a.turns, a.obs_words, a.max_new_tokens)
           if a.only != "round_trip" else old["prompt_caching"]}
    print(f"cpu: {res['cpu']} ({res['cpu_count']} CPUs), torch {res['versions']['torch']}")
    print(f"\nsandbox command round trip (`true`), p50 ms, load {res['round_trip']['load_average_1min']:.1f}"
          f"    target: ≤ 20 ms and ≤ 3× subprocess")
    print(f"{'backend':10s} {'sandbox':>9s} {'bash -lc':>9s} {'true':>7s} {'ratio':>7s}")
    for backend, r in res["round_trip"].items():
        if backend == "load_average_1min":
            continue
        if isinstance(r, str):
            print(f"{backend:10s} {r}")
        else:
            print(f"{backend:10s} {r['sandbox_p50_ms']:9.2f} {r['subprocess_bash_lc_p50_ms']:9.2f} "
                  f"{r['subprocess_true_p50_ms']:7.2f} {r['ratio_vs_bash_lc']:6.2f}×")
    pc = res["prompt_caching"]
    print(f"\nLocalPolicy, {pc['turns']}-turn episode (final context "
          f"{pc['kv_cache_kept']['final_context_tokens']} tokens), load "
          f"{pc.get('load_average_1min', float('nan')):.1f}    target: ≥ 3× per episode")
    for name in ("kv_cache_kept", "re_encode"):
        r = pc[name]
        print(f"{name:14s} episode {r['episode_s']:7.2f} s   turn {pc['turns']}: "
              f"{1000 * r['turn_last_median_of_5_s']:7.1f} ms   tokens through the model "
              f"{r['tokens_through_model']:>9d}   sampled {r['tokens_sampled']}")
    print(f"speed-up: episode {pc['speedup_episode']:.2f}×, turn {pc['turns']} {pc['speedup_turn_last']:.2f}×")
    common.write(out, res)
    print(f"\nwrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
