"""Supervised fine-tuning: stage 1 (comprehensive SFT) and stage 3 (trajectory-splitting SFT).

Data (`--data PATH[:WEIGHT],...`): trajectory JSONL, chat JSON/JSONL/parquet or a saved `datasets`
folder, mixed by weight; empty = the factory's distilled trajectories. Every trajectory is split
into sub-trajectories (split.py: τ⁽ⁱ⁾ = p ⊕ C_i ⊕ W_i), tokenised, and packed into rows.

    L_SFT = − Σ_i Σ_t log P_θ(a_t | τ⁽ⁱ⁾_<t)        (sft_step: model.packed_logprob_sum, fused)

Departures from the paper, each stated where it is coded:
- the paper's SFT loss is a sum over sub-trajectories; we normalise by the number of supervised
  tokens in the optimizer step (the usual token-mean; it only rescales the learning rate);
- sub-trajectories of one trajectory are packed with a single shared copy of p (split.pack);
  the loss and gradients equal those of the separate sequences (tests/test_sft.py).

Functions take `cfg`, any object with klong.Config's fields (this module never imports klong).
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

import chat
import dist
import split
from cli import UserError
from tracking import Tracker
from model import (checkpoint_dtype, latest_checkpoint, load_checkpoint, load_model,
                   packed_logprob_sum, rng_state, save_checkpoint, set_rng_state, _truncate_log)


def _chat_example(d: dict, where: str) -> split.Trajectory:
    """A comprehensive-SFT chat example ({"messages": [...]}) as a one-prefix-free trajectory."""
    if not isinstance(d, dict):
        raise split.RecordError(f"{where}: expected a JSON object, got {type(d).__name__}")
    if "prefix_len" in d:
        return split.trajectory_from_dict(d, where)
    return split.trajectory_from_dict(
        {"id": str(d.get("id", where)), "task_id": str(d.get("task_id", "chat")),
         "messages": d.get("messages"), "prefix_len": 0}, where)


def load_source(path: str) -> list[split.Trajectory]:
    """Trajectory JSONL, chat JSON/JSONL/parquet, or a saved `datasets` folder."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"--data {path}: no such file or folder")
    if p.suffix == ".jsonl" or (p.suffix == ".json" and p.read_bytes()[:1] != b"["):
        return split.read_records(p, _chat_example)      # every bad line named (RecordError)
    import datasets
    if p.is_dir():
        try:
            ds = datasets.load_from_disk(str(p))
        except FileNotFoundError as e:
            raise UserError(f"--data {path}: a folder that is not a saved `datasets` dataset") from e
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"]
    else:
        kind = {".json": "json", ".parquet": "parquet"}.get(p.suffix)
        if kind is None:
            raise UserError(f"--data {path}: expected .jsonl, .json, .parquet or a folder")
        try:
            ds = datasets.load_dataset(kind, data_files=str(p), split="train")
        except Exception as e:                           # pyarrow/datasets: many types, one cause
            raise UserError(f"--data {path}: not a readable {kind} file ({' '.join(str(e).split())[:200]})") from e
    out = [_chat_example(dict(r), f"{p}:{i + 1}") for i, r in enumerate(ds)]
    if not out:
        raise UserError(f"--data {path}: no records")
    return out


def mix_sources(spec: str, seed: int) -> list[split.Trajectory]:
    """`a.jsonl:0.7,b.parquet:0.3` → examples drawn in proportion to the weights; the mix has as
    many examples as the sources together (a small source is repeated, a large one subsampled)."""
    parts = []
    for item in spec.split(","):
        path, _, w = item.strip().rpartition(":") if ":" in item else (item.strip(), "", "1")
        if not path or not _is_float(w):
            path, w = item.strip(), "1"
        if not float(w) > 0 or float(w) == float("inf"):
            raise UserError(f"--data {item.strip()}: expected a weight > 0 after the last ':'")
        parts.append((load_source(path), float(w)))
    total, wsum = sum(len(s) for s, _ in parts), sum(w for _, w in parts)
    quota = [total * w / wsum for _, w in parts]
    counts = [int(q) for q in quota]            # largest remainder: the counts sum to `total`
    for i in sorted(range(len(parts)), key=lambda i: counts[i] - quota[i])[:total - sum(counts)]:
        counts[i] += 1
    rng = random.Random(seed)
    mixed = []
    for (src, _), k in zip(parts, counts):
        order = [i for _ in range(k // max(len(src), 1) + 1) for i in rng.sample(range(len(src)), len(src))]
        mixed += [src[i] for i in order[:k]]
    rng.shuffle(mixed)
    return mixed


def _is_float(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def build_rows(trajs: list[split.Trajectory], tok, cfg) -> list[list[split.TokenizedSub]]:
    """Split every trajectory (split.py), tokenise, and group sub-trajectories into rows."""
    cache = chat.MessageCache(tok)               # each message encoded once
    count, encode = cache.count, cache.encode
    subs = []
    for t in trajs:
        subs += [split.tokenize(s, encode) for s in split.split_trajectory(t, count, cfg.split)]
    rows, row, used = [], [], 0
    for s in subs:   # greedy: a row's sub-trajectories are consecutive, so p is shared
        shared = cfg.pack and row and row[-1].traj_id == s.traj_id
        need = len(s.input_ids) - (s.prefix_tokens if shared else 0)
        if row and (not cfg.pack or used + need > cfg.pack_len):
            rows.append(row)
            row, used, need = [], 0, len(s.input_ids)
        row.append(s)
        used += need
    return rows + ([row] if row else [])


def sft_step(model, opt, batches: list[split.Packed], clip: float) -> tuple[float, float]:
    """One optimizer step over micro-batches (gradient accumulation); returns (loss, grad norm).

    L_SFT = − Σ_i Σ_t log P_θ(a_t | τ⁽ⁱ⁾_<t) over the supervised tokens of the step, divided by
    their number (the paper sums; the token mean only rescales the learning rate).

    Under torchrun `batches` is this rank's share of the step's micro-batches; the normaliser is
    the step's supervised-token count summed over ranks and FSDP sums the ranks' gradients
    (dist.shard), so the step is the one-process step. Loss and norm are global.
    """
    n_tok = max(dist.all_reduce_sum(sum(b.n_supervised for b in batches)), 1)
    loss_sum = 0.0
    for b in batches:
        loss = -packed_logprob_sum(model, b) / n_tok                     # fused Σ log π
        loss.backward()
        loss_sum += loss.item()
    gnorm = dist.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return dist.all_reduce_sum(loss_sum), gnorm


def lr_lambda(cfg, total: int):
    """Linear warm-up to lr, then cosine to lr × min_lr_ratio."""
    def f(step):
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        t = (step - cfg.warmup) / max(1, total - cfg.warmup)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1)))
    return f


def default_data(cfg) -> str:
    """The factory's trajectories in run_dir; generated (offline, ~1 min, by rank 0) if missing."""
    path = Path(cfg.run_dir) / "factory" / "trajectories.jsonl"
    if dist.is_main() and not path.exists():
        print(f"[sft] no --data and no {path}: running the factory first", flush=True)
        import factory
        factory.run_stage(cfg)
    dist.barrier()
    return str(path)


def _no_loss(b: split.Packed) -> split.Packed:
    """A padding micro-batch (dist.share): the same tokens with no targets, so zero loss and zero
    gradient; it keeps a rank with one micro-batch fewer in step with FSDP's collectives."""
    return replace(b, targets=torch.full_like(b.targets, split.IGNORE))


def run_sft(cfg) -> Path:
    """Stage 1 (comprehensive SFT, with --data sources) and stage 3 (trajectory-splitting SFT):
    AdamW, warm-up + cosine, accumulation, clipping, loss on labels only. Resumes from the last
    complete checkpoint in run_dir/sft. Returns the final save_pretrained folder.

    Under torchrun (dist.py) every rank runs this function: each takes its share of a step's
    micro-batches, rank 0 alone prints, logs and shows the progress bar."""
    from tqdm import tqdm
    out = Path(cfg.run_dir) / "sft"
    out.mkdir(parents=True, exist_ok=True)
    resume = latest_checkpoint(out)
    trajs = mix_sources(cfg.data or default_data(cfg), cfg.seed)   # bad data fails before the model loads
    tok, model = load_model(cfg)
    model = dist.shard(model, cfg)
    rows = build_rows(trajs, tok, cfg)
    n_sup = sum(sum(1 for y in s.labels if y != split.IGNORE) for r in rows for s in r)
    dist.print0(f"[sft] {len(trajs)} trajectories → {sum(len(r) for r in rows)} sub-trajectories "
                f"in {len(rows)} rows, {n_sup} supervised tokens; mode={cfg.split_mode} "
                f"L_max={cfg.context_len} pack={cfg.pack}; {dist.world()} process(es)")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95),
                            weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, cfg.sft_steps))
    step = 0
    if resume:
        st = load_checkpoint(resume, model, opt)
        sched.load_state_dict(st["scheduler"])
        set_rng_state(st["rng"])
        step = st["step"]
        dist.print0(f"[sft] resumed from {resume} at step {step}")
    else:
        torch.manual_seed(cfg.seed)
    if dist.is_main():   # records of steps the checkpoint lacks are redone (none yet: all of them)
        _truncate_log(out / "log.jsonl", step)
    model.train()
    micro = cfg.batch_rows
    per_epoch = max(1, len(rows) // micro)

    def batch(i: int) -> split.Packed:      # deterministic order: epoch e shuffled with seed + e
        epoch, k = divmod(i, per_epoch)
        order = random.Random(cfg.seed + epoch).sample(range(len(rows)), len(rows))
        subs = [s for r in order[k * micro:(k + 1) * micro] for s in rows[r]]
        return split.pack(subs, cfg.pack_len if cfg.pack else max(len(s.input_ids) for s in subs),
                          pad_id=tok.pad_token_id, share_prefix=cfg.pack)

    tracker = Tracker(out, cfg.report_to, prefix="sft", main=dist.is_main())   # log.jsonl (+ tracker)
    bar = tqdm(total=cfg.sft_steps, initial=step, desc="sft", unit="step", dynamic_ncols=True,
               disable=not dist.is_main())
    while step < cfg.sft_steps:
        t0 = time.perf_counter()
        first = step * cfg.grad_accum                    # micro-batches first … first+grad_accum−1
        ids = dist.share(list(range(first, first + cfg.grad_accum)))   # this rank's; None = pad
        batches = [batch(i) if i is not None else _no_loss(batch(first)) for i in ids]
        loss_sum, gnorm = sft_step(model, opt, batches, cfg.clip)
        sched.step()
        step += 1
        dt = time.perf_counter() - t0
        n_tok, tokens = map(int, dist.all_reduce_sum(
            [sum(b.n_supervised for b in batches),
             sum(int(b.input_ids.numel()) for i, b in zip(ids, batches) if i is not None)]))
        rec = {"step": step, "loss": round(loss_sum, 5), "lr": sched.get_last_lr()[0],
               "grad_norm": round(float(gnorm), 4), "tokens": tokens, "supervised_tokens": n_tok,
               "tokens_per_s": round(tokens / dt, 1)}
        tracker.log(rec)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{tokens / dt:.0f}")
        if step % cfg.save_every == 0 or step == cfg.sft_steps:
            save_checkpoint(out, model, opt, tok, {"step": step, "scheduler": sched.state_dict(),
                                                   "rng": rng_state(), "config": asdict(cfg)},
                            pretrained=checkpoint_dtype(cfg))
    bar.close()
    tracker.close()
    final = out / "final"
    dist.export_pretrained(final, model, tok, getattr(torch, cfg.dtype))
    dist.print0(f"[sft] done: {final}")
    return final
