"""Splitter and tiny-SFT benchmark (issue 2; docs/BENCH.md rows 1-3). Not a timed test.

1. split a 1,000-turn trajectory with token counts known (target ≤ 10 ms);
2. split + tokenise N synthetic trajectories of 700 turns: ms per trajectory and the share of
   the time spent inside the tokenizer;
3. tiny-SFT step throughput with shared-prefix packing vs the same sub-trajectories unpacked
   (each its own sequence, p copied K times); target speed-up ≥ 0.8 × tokens unpacked / packed.

    python bench/split_bench.py [--n 1000] [--steps 6]

Writes bench/results/split_bench-<device>.json.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import common  # noqa: E402
import chat  # noqa: E402
import klong  # noqa: E402
from model import load_model, packed_logprobs, tiny_tokenizer  # noqa: E402
import sft  # noqa: E402
import split  # noqa: E402

CMDS = ["ls -la", "python train.py --epochs 3", "cat results.json", "git add -A && git commit -m wip",
        "grep -n loss log.txt", "pip install numpy", "bash reproduce.sh", "tail -n 20 log.txt"]


def agent_trajectory(seed: int, turns: int, paper_words: int = 300) -> split.Trajectory:
    """A PaperBench-like episode: instructions, a paper read in p, then tool turns whose outputs
    range from one line to long logs."""
    rng = random.Random(seed)
    words = (ROOT / "data" / "tokenizer_corpus.txt").read_text().split()
    text = lambda n: " ".join(rng.choice(words) for _ in range(n))  # noqa: E731
    call = lambda k, name, args: {"id": f"c{k}", "type": "function",  # noqa: E731
                                  "function": {"name": name, "arguments": args}}
    msgs = [{"role": "system", "content": "You are an agent that replicates ML papers."},
            {"role": "user", "content": text(40)},
            {"role": "assistant", "content": "",
             "tool_calls": [call(0, "read_file_chunk", {"file": "/home/paper/paper.md"})]},
            {"role": "tool", "tool_call_id": "c0", "content": text(paper_words)}]
    for k in range(1, turns + 1):
        msgs.append({"role": "assistant", "content": text(rng.randrange(0, 12)),
                     "tool_calls": [call(k, "bash", {"cmd": rng.choice(CMDS)})]})
        n = rng.choice([3, 10, 30, 80]) if rng.random() > 0.03 else 2000
        msgs.append({"role": "tool", "tool_call_id": f"c{k}", "content": text(n)})
    return split.Trajectory(f"traj{seed}", "bench", msgs, 4)


def bench_split_known_counts(tok, cfg: split.SplitConfig, repeats: int = 20) -> dict:
    traj = agent_trajectory(0, 1000)
    count = chat.count_tokens(tok)
    known = {id(m): count(m) for m in traj.messages}
    fast = lambda m: known.get(id(m)) or count(m)  # noqa: E731   (cut messages: real count)
    split.split_trajectory(traj, fast, cfg)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subs = split.split_trajectory(traj, fast, cfg)
        times.append(time.perf_counter() - t0)
    return {"turns": 1000, "sub_trajectories": len(subs), "ms_median": 1e3 * statistics.median(times),
            "target_ms": 10}


def bench_split_tokenise(tok, cfg: split.SplitConfig, n: int) -> dict:
    in_tok = [0.0]

    def timed(fn):
        def wrapped(*a):
            t0 = time.perf_counter()
            r = fn(*a)
            in_tok[0] += time.perf_counter() - t0
            return r
        return wrapped

    enc = timed(lambda m: chat.encode_message(tok, m))
    ids_cache: dict[str, tuple] = {}

    def encode(m):             # one tokenisation per distinct message (p, overlaps hit the cache)
        key = json.dumps(m, sort_keys=True)
        if key not in ids_cache:
            ids_cache[key] = enc(m)
        return ids_cache[key]
    count = lambda m: len(encode(m)[0])  # noqa: E731
    trajs = [agent_trajectory(s, 700) for s in range(n)]
    t0 = time.perf_counter()
    n_subs = n_tokens = 0
    for t in trajs:
        for s in split.split_trajectory(t, count, cfg):
            x = split.tokenize(s, encode)
            n_subs += 1
            n_tokens += len(x.input_ids)
        ids_cache.clear()
    total = time.perf_counter() - t0
    return {"trajectories": n, "turns": 700, "ms_per_trajectory": 1e3 * total / n,
            "tokeniser_share": in_tok[0] / total, "sub_trajectories": n_subs,
            "tokens": n_tokens}


def bench_sft_packing(cfg: klong.Config, steps: int) -> dict:
    tok, model = load_model(cfg)
    trajs = [agent_trajectory(100 + s, 60, paper_words=80) for s in range(4)]
    # the same sub-trajectories, in rows of pack_len tokens: with one shared copy of p per row,
    # or each sub-trajectory its own document (padding-free packing, p copied K times)
    packed = [split.pack(r, cfg.pack_len, tok.pad_token_id, share_prefix=True)
              for r in sft.build_rows(trajs, tok, cfg)]
    flat_cfg = klong.Config(**{**cfg.__dict__, "pack": False})
    subs = [s for r in sft.build_rows(trajs, tok, flat_cfg) for s in r]
    rows, row = [], []
    for s in subs:
        if row and sum(len(x.input_ids) for x in row) + len(s.input_ids) > cfg.pack_len:
            rows.append(split.pack(row, cfg.pack_len, tok.pad_token_id, share_prefix=False))
            row = []
        row.append(s)
    rows.append(split.pack(row, cfg.pack_len, tok.pad_token_id, share_prefix=False))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step_packed():
        for r in packed:
            (-packed_logprobs(model, r).sum()).backward()

    def step_unpacked():
        for r in rows:
            (-packed_logprobs(model, r).sum()).backward()

    out = {}
    for name, fn in (("packed", step_packed), ("unpacked", step_unpacked)):
        fn()
        opt.zero_grad()
        ts = []
        for _ in range(steps):
            t0 = time.perf_counter()
            fn()
            opt.step()
            opt.zero_grad()
            ts.append(time.perf_counter() - t0)
        out[f"{name}_step_s"] = statistics.median(ts)
    tok_unpacked = sum(len(s.input_ids) for s in subs)
    tok_packed = sum(int((r.doc < 1_000_000).sum()) for r in packed)
    sup = sum(sum(1 for y in s.labels if y != split.IGNORE) for s in subs)
    out.update({"sub_trajectories": len(subs), "tokens_unpacked": tok_unpacked,
                "tokens_packed": tok_packed, "supervised_tokens": sup,
                "speedup": out["unpacked_step_s"] / out["packed_step_s"],
                "target_speedup": 0.8 * tok_unpacked / tok_packed,
                "supervised_tokens_per_s_packed": sup / out["packed_step_s"],
                "supervised_tokens_per_s_unpacked": sup / out["unpacked_step_s"]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=1000, help="trajectories of 700 turns to tokenise")
    ap.add_argument("--steps", type=int, default=6, help="timed SFT steps per variant")
    a = ap.parse_args()
    torch.manual_seed(0)
    cfg = klong.Config(context_len=512)   # the SFT rows of this benchmark: p ~286 tokens
    tok = tiny_tokenizer(cfg)
    res = common.header("split_bench")
    big = split.SplitConfig(context_len=4096, overlap=256, history=0.3)   # a 300-word paper in p
    res["split_config"] = {"context_len": big.context_len, "overlap": big.overlap,
                           "history": big.history}
    res["split_1000_turns"] = bench_split_known_counts(tok, big)
    print(f"split 1,000 turns (counts known): {res['split_1000_turns']['ms_median']:.2f} ms "
          f"(target ≤ 10 ms), K = {res['split_1000_turns']['sub_trajectories']}", flush=True)
    res["split_tokenise"] = bench_split_tokenise(tok, big, a.n)
    r = res["split_tokenise"]
    print(f"split + tokenise {a.n} × 700 turns: {r['ms_per_trajectory']:.1f} ms/trajectory, "
          f"tokeniser share {100 * r['tokeniser_share']:.0f}%", flush=True)
    res["sft_packing"] = bench_sft_packing(cfg, a.steps)
    r = res["sft_packing"]
    print(f"tiny SFT step, {r['sub_trajectories']} sub-trajectories: packed {r['packed_step_s']:.3f} s "
          f"vs unpacked {r['unpacked_step_s']:.3f} s → {r['speedup']:.2f}× "
          f"(target ≥ {r['target_speedup']:.2f}×); supervised tokens/s "
          f"{r['supervised_tokens_per_s_packed']:.0f} vs {r['supervised_tokens_per_s_unpacked']:.0f}")
    out = common.write(ROOT / "bench" / "results" / "split_bench-cpu.json", res)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
