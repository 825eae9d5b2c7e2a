"""SFT throughput, supervised tokens/s: our loop vs TRL's `SFTTrainer` (docs/BENCH.md row 4).

Both sides train the same tiny Llama (model.load_model, fp32, same seed, so the same initial
weights) on the SAME tokenized sub-trajectories (sft.build_rows → split.tokenize: input_ids and
labels, −100 off the supervised assistant tokens), with the same optimizer (one torch AdamW +
warm-up/cosine LambdaLR built as run_sft builds it, handed to TRL through `optimizers=`), the same
gradient clip, the same number of optimizer steps and the same row capacity per step:

- ours: sft.sft_step on `batch_rows` rows of ≤ `pack_len` tokens per step, packed by split.pack
  with one shared copy of p per trajectory and row ([p | C₁W₁ | C₂W₂ | …]); attention through the
  additive 4D mask (sdpa) on CPU; the loss through the chunked fused log-prob reference.
- TRL: `SFTTrainer` on a pre-tokenized dataset (`input_ids`, `labels`), `packing=True` with the
  best-fit-decreasing strategy into bins of `max_length = pack_len` tokens, which turns on its
  padding-free collator (sequences flattened, `position_ids` restarting at 0 per sequence, no
  attention mask: transformers builds the block-diagonal causal mask from the position ids);
  `per_device_train_batch_size=1` with `gradient_accumulation_steps = batch_rows`, so each forward
  sees one bin of ≤ pack_len tokens, like one of our rows. (Flattening 4 bins into one row of
  4·pack_len tokens would cost TRL 4× the attention on CPU, where no varlen kernel exists.)
  Its loss is the token mean over the accumulated step, like ours. fp32 and no activation
  checkpointing, like ours (SFTConfig defaults to bf16 autocast and checkpointing). TRL's fused LM
  head also computes the entropy and top-1 accuracy it logs: its default loop, kept as is.

Figure: supervised tokens trained per second of wall time per optimizer step (collation, forward,
backward, clip, AdamW, scheduler), after warm-up steps; median over the timed steps; ratio =
ours / TRL. The sides alternate step by step in one process (one of our steps runs between two
of TRL's, outside its clock), so load from other processes falls on both alike; process CPU time
per step is recorded as well. Every sub-trajectory is ≤ L_max tokens and TRL repeats p in each
of them, while our rows hold p once per trajectory: the gain grows with |p| / L_max. Two
settings, same window and rows, p sized by the paper read in p (split_bench.agent_trajectory):
`typical` (|p| ≈ 25% of L_max, about the least this generator makes) and `half` (|p| ≈ 50%).
Targets: ≥ 1.0× and ≥ 1.5×.

Before timing, a check that TRL's packing keeps sequences apart on CPU: the log-probs of one
packed bin equal those of its sequences run one by one.

    pip install -r bench/requirements.txt          # trl (+ accelerate), nothing else
    OMP_NUM_THREADS=1 python bench/sft_vs_trl.py [--steps 8] [--warmup 2] [--context-len 512]

Writes bench/results/sft_vs_trl-<device>.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import common  # noqa: E402
import chat  # noqa: E402
import klong  # noqa: E402
from model import load_model, tiny_tokenizer  # noqa: E402
import sft  # noqa: E402
import split  # noqa: E402
from split_bench import agent_trajectory  # noqa: E402

SETTINGS = {"typical": 0.25, "half": 0.5}     # target |p| / L_max


def paper_words_for(tok, p_tokens: int, seeds: range) -> int:
    """The fewest words of the paper read in p (agent_trajectory) for which the median |p| over
    these trajectory seeds reaches p_tokens."""
    count = chat.count_tokens(tok)

    def size(w: int) -> float:
        return statistics.median(sum(count(m) for m in t.messages[:t.prefix_len])
                                 for t in (agent_trajectory(s, 1, paper_words=w) for s in seeds))
    lo, hi = 0, 4096
    while lo < hi:                           # smallest w with |p| ≥ p_tokens (|p| grows with w)
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if size(mid) < p_tokens else (lo, mid)
    return lo


def n_supervised(subs: list[split.TokenizedSub]) -> int:
    """Supervised targets of separate sequences (the first label never is one: it has no context)."""
    return sum(sum(1 for y in s.labels[1:] if y != split.IGNORE) for s in subs)


# ----------------------------------------------------------------------------- the two loops

@dataclass
class StepLog:
    """Per optimizer step of one side: wall and process-CPU seconds, supervised targets, tokens."""
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    sup: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)


class OurLoop:
    """sft.sft_step on `batch_rows` shared-prefix rows per step, as run_sft does."""

    def __init__(self, cfg: klong.Config, rows: list[list[split.TokenizedSub]], steps: int,
                 pad_id: int):
        self.cfg, self.rows, self.pad_id, self.k = cfg, rows, pad_id, 0
        _, self.model = load_model(cfg)
        self.model.train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, betas=(0.9, 0.95),
                                     weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, sft.lr_lambda(cfg, steps))
        self.log = StepLog()

    def step(self) -> None:
        picked = [self.rows[(self.k + j) % len(self.rows)] for j in range(self.cfg.batch_rows)]
        self.k += self.cfg.batch_rows
        t0, c0 = time.perf_counter(), time.process_time()
        batch = split.pack([s for r in picked for s in r], self.cfg.pack_len, self.pad_id,
                           share_prefix=True)
        sft.sft_step(self.model, self.opt, [batch], self.cfg.clip)
        self.sched.step()
        self.log.wall.append(time.perf_counter() - t0)
        self.log.cpu.append(time.process_time() - c0)
        self.log.sup.append(batch.n_supervised)
        self.log.tokens.append(int((batch.doc < 1_000_000).sum()))     # real tokens, not padding


def trl_trainer(cfg: klong.Config, subs: list[split.TokenizedSub], steps: int, out_dir: str):
    """SFTTrainer on the pre-tokenized sub-trajectories with padding-free BFD packing."""
    import datasets
    from trl import SFTConfig, SFTTrainer

    class CountingSFTTrainer(SFTTrainer):
        """Records the supervised targets of every micro-batch it trains on."""
        supervised = 0
        tokens = 0

        def training_step(self, model, inputs, num_items_in_batch=None):
            self.supervised += int((inputs["labels"][..., 1:] != split.IGNORE).sum())
            self.tokens += int(inputs["input_ids"].numel())             # batch 1: no padding
            return super().training_step(model, inputs, num_items_in_batch)

    tok, model = load_model(cfg)
    data = datasets.Dataset.from_dict({"input_ids": [s.input_ids for s in subs],
                                       "labels": [s.labels for s in subs]})
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95),
                            weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, sft.lr_lambda(cfg, steps))
    args = SFTConfig(output_dir=out_dir, max_steps=steps, per_device_train_batch_size=1,
                     gradient_accumulation_steps=cfg.batch_rows, max_length=cfg.pack_len,
                     packing=True, packing_strategy="bfd", padding_free=True,
                     max_grad_norm=cfg.clip, learning_rate=cfg.lr, seed=cfg.seed, use_cpu=True,
                     bf16=False, activation_checkpointing=False,   # TRL defaults: bf16, checkpointing
                     logging_strategy="no", save_strategy="no", report_to="none",
                     disable_tqdm=True, dataloader_num_workers=0, dataloader_pin_memory=False)
    return CountingSFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                              optimizers=(opt, sched))


def trl_separation_error(trainer) -> float:
    """max |Δ log p| over the supervised targets of one packed bin: TRL's padding-free forward
    vs each of its sequences alone (0 up to float error iff sequences do not see each other)."""
    batch = next(iter(trainer.get_train_dataloader()))
    model = trainer.model
    ids, pos, labels = batch["input_ids"], batch["position_ids"], batch["labels"]   # (1, T)
    cu = batch["cu_seq_lens_q"].tolist()
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos).logits.log_softmax(-1)       # (1, T, V)
        err = 0.0
        for a, b in zip(cu, cu[1:]):
            alone = model(input_ids=ids[:, a:b]).logits.log_softmax(-1)               # (1, n, V)
            y = labels[:, a + 1:b]                                                    # targets
            keep = y != split.IGNORE
            if keep.any():
                got = packed[:, a:b - 1].gather(-1, y.clamp(min=0)[..., None])[..., 0][keep]
                want = alone[:, :-1].gather(-1, y.clamp(min=0)[..., None])[..., 0][keep]
                err = max(err, float((got - want).abs().max()))
    return err


def run_both(cfg: klong.Config, rows: list[list[split.TokenizedSub]], steps: int, warmup: int,
             pad_id: int) -> tuple[dict, dict]:
    """TRL's trainer.train(), with one step of our loop run between two of its steps (outside
    its clock), so load from other processes on a shared machine falls on both sides alike."""
    from transformers import TrainerCallback
    subs = [s for r in rows for s in r]
    ours = OurLoop(cfg, rows, warmup + steps, pad_id)
    log = StepLog()

    class Interleave(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.bar = tqdm(total=warmup + steps, desc="steps (TRL + ours)", unit="step")
            self.t, self.c, self.s, self.n = time.perf_counter(), time.process_time(), 0, 0

        def on_train_end(self, args, state, control, **kw):
            self.bar.close()

        def on_step_end(self, args, state, control, **kw):
            log.wall.append(time.perf_counter() - self.t)
            log.cpu.append(time.process_time() - self.c)
            log.sup.append(trainer.supervised - self.s)
            log.tokens.append(trainer.tokens - self.n)
            ours.step()
            self.t, self.c = time.perf_counter(), time.process_time()
            self.s, self.n = trainer.supervised, trainer.tokens
            self.bar.update(1)

    with tempfile.TemporaryDirectory() as out_dir:
        trainer = trl_trainer(cfg, subs, warmup + steps, out_dir)
        bins = trainer.train_dataset
        info = {"bins": len(bins),
                "bins_supervised_tokens": sum(sum(1 for y in r[1:] if y != split.IGNORE)
                                              for r in bins["labels"]),
                "separation_max_abs_logp_diff": trl_separation_error(trainer),
                "effective": {"bf16": trainer.args.bf16, "padding_free": trainer.padding_free,
                              "activation_checkpointing": trainer.model.is_activation_checkpointing,
                              "attention": trainer.model.config._attn_implementation}}
        trainer.add_callback(Interleave())
        trainer.train()
    mine = {"attention": ours.model.config._attn_implementation + " + additive 4D mask"}
    return {**summarise(ours.log, warmup), **mine}, {**summarise(log, warmup), **info}


# ----------------------------------------------------------------------------- report

def summarise(log: StepLog, warmup: int) -> dict:
    """Figures over the steps after the warm-up: per-step rates (median) and totals."""
    wall, cpu, sup, tokens = log.wall[warmup:], log.cpu[warmup:], log.sup[warmup:], log.tokens[warmup:]
    return {"steps_timed": len(wall), "wall_s_total": sum(wall),
            "step_s_median": statistics.median(wall),
            "step_cpu_s_median": statistics.median(cpu),
            "supervised_tokens_per_step_mean": statistics.mean(sup),
            "tokens_per_step_mean": statistics.mean(tokens),
            "supervised_tokens_per_s_median": statistics.median(s / t for s, t in zip(sup, wall)),
            "supervised_tokens_per_cpu_s_median": statistics.median(s / t for s, t in zip(sup, cpu)),
            "supervised_tokens_per_s_total": sum(sup) / sum(wall),
            "tokens_per_s_total": sum(tokens) / sum(wall)}


def run_setting(name: str, p_frac: float, cfg: klong.Config, tok, a) -> dict:
    seeds = range(100, 100 + a.trajectories)
    words = paper_words_for(tok, round(p_frac * cfg.context_len), seeds)
    trajs = [agent_trajectory(s, a.turns, paper_words=words) for s in seeds]
    rows = sft.build_rows(trajs, tok, cfg)
    subs = [s for r in rows for s in r]
    p = [s.prefix_tokens for s in subs]
    lengths = [len(s.input_ids) for s in subs]
    shapes = {"trajectories": len(trajs), "turns": a.turns, "paper_words": words,
              "sub_trajectories": len(subs), "rows_ours": len(rows),
              "p_tokens_median": statistics.median(p),
              "p_fraction_of_window": statistics.median(p) / cfg.context_len,
              "sub_tokens_median": statistics.median(lengths), "tokens_unpacked": sum(lengths),
              "supervised_tokens": n_supervised(subs)}
    print(f"[{name}] |p| ≈ {shapes['p_tokens_median']} tokens "
          f"({100 * shapes['p_fraction_of_window']:.0f}% of L_max {cfg.context_len}), "
          f"{len(subs)} sub-trajectories, {len(rows)} rows", flush=True)
    ours, trl = run_both(cfg, rows, a.steps, a.warmup, tok.pad_token_id)
    print(f"[{name}] ours: {ours['step_s_median']:.2f} s/step, "
          f"{ours['supervised_tokens_per_s_median']:.0f} supervised tokens/s", flush=True)
    print(f"[{name}] TRL:  {trl['step_s_median']:.2f} s/step, "
          f"{trl['supervised_tokens_per_s_median']:.0f} supervised tokens/s "
          f"({trl['bins']} bins; separation check |Δ log p| ≤ "
          f"{trl['separation_max_abs_logp_diff']:.1e})", flush=True)
    ours_sup = sum(split.pack(r, cfg.pack_len, tok.pad_token_id).n_supervised for r in rows)
    if not trl["bins_supervised_tokens"] == ours_sup == shapes["supervised_tokens"]:
        raise RuntimeError(f"[{name}] supervised tokens in one epoch: TRL's bins "
                           f"{trl['bins_supervised_tokens']}, our rows {ours_sup}, the "
                           f"sub-trajectories {shapes['supervised_tokens']}: expected equal")
    target = 1.5 if p_frac >= 0.5 else 1.0
    ratio = ours["supervised_tokens_per_s_median"] / trl["supervised_tokens_per_s_median"]
    return {"shapes": shapes, "ours": ours, "trl": trl, "ratio": ratio, "target": target,
            "ratio_total": ours["supervised_tokens_per_s_total"] / trl["supervised_tokens_per_s_total"],
            "ratio_cpu": ours["supervised_tokens_per_cpu_s_median"]
            / trl["supervised_tokens_per_cpu_s_median"],
            "meets_target": ratio >= target}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=8, help="timed optimizer steps per side")
    ap.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first")
    ap.add_argument("--context-len", type=int, default=512, help="L_max; rows hold 4 windows")
    ap.add_argument("--trajectories", type=int, default=16, help="synthetic trajectories")
    ap.add_argument("--turns", type=int, default=60, help="tool turns per trajectory")
    ap.add_argument("--settings", default=",".join(SETTINGS), help="typical,half")
    a = ap.parse_args()
    cfg = replace(klong.Config(), context_len=a.context_len, pack_len=4 * a.context_len,
                  device="cpu", attention="mask")
    tok = tiny_tokenizer(cfg)
    res = {**common.header("sft_vs_trl", packages=("torch", "transformers", "trl", "accelerate")),
           "model": {"hidden_size": cfg.hidden_size, "layers": cfg.layers, "heads": cfg.heads,
                     "kv_heads": cfg.kv_heads, "intermediate_size": cfg.intermediate_size,
                     "vocab": len(tok), "dtype": cfg.dtype},
           "config": {"context_len": cfg.context_len, "pack_len": cfg.pack_len,
                      "rows_per_step": cfg.batch_rows, "overlap": cfg.overlap,
                      "history": cfg.history, "lr": cfg.lr, "clip": cfg.clip,
                      "steps": a.steps, "warmup": a.warmup},
           "trl_setup": {"packing": True, "packing_strategy": "bfd", "padding_free": True,
                         "max_length": cfg.pack_len, "per_device_train_batch_size": 1,
                         "gradient_accumulation_steps": cfg.batch_rows,
                         "dataset": "pre-tokenized input_ids + labels"},
           "settings": {}}
    for name in a.settings.split(","):
        res["settings"][name] = run_setting(name, SETTINGS[name], cfg, tok, a)
    print(f"\nsupervised tokens/s, median of {a.steps} steps after {a.warmup} warm-up "
          f"(CPU, {os.cpu_count()} cores, {torch.get_num_threads()} thread(s))")
    print(f"{'setting':<9} {'|p|/L':>6} {'ours tok/s':>11} {'TRL tok/s':>10} {'ratio':>6} "
          f"{'(CPU time)':>10} {'target':>7}")
    for name, r in res["settings"].items():
        print(f"{name:<9} {r['shapes']['p_fraction_of_window']:>6.2f} "
              f"{r['ours']['supervised_tokens_per_s_median']:>11.0f} "
              f"{r['trl']['supervised_tokens_per_s_median']:>10.0f} {r['ratio']:>5.2f}× "
              f"{r['ratio_cpu']:>9.2f}× "
              f"{'≥ %.1f×' % r['target']:>7} {'ok' if r['meets_target'] else 'MISSED'}")
    out = common.write(ROOT / "bench" / "results" / "sft_vs_trl-cpu.json", res)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
