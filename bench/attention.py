"""Benchmark: masked sub-trajectory attention (docs/KERNELS.md §2, docs/BENCH.md), shared prefix computed once.

Same process, same inputs, warm-up then the median of repeats:

1. Kernel. A packed row [p | s₁ | … | s_K] (one trajectory's K sub-trajectories sharing the prefix
   p): ours (`kernels.masked_attention`: Triton on CUDA, the per-run reference path on CPU) vs
   FlexAttention with the equivalent block mask vs SDPA with the dense boolean [S, S] mask
   (`dense_reference_attention`, where memory allows). Forward and
   forward+backward ms, TFLOP/s counted on visible (q, k) pairs only (forward 4·D per pair and
   head; backward 2.5× forward, so forward+backward 3.5×), peak memory above the inputs, and the
   once-per-batch tile classification time.
2. End-to-end SFT step (forward, backward, AdamW) of a small Qwen2: the K sub-trajectories packed
   with the shared prefix ("klong_prefix" attention, p once) vs the same K sequences unpacked
   ([p sᵢ] as a batch of K rows, p copied K times, stock "sdpa" causal attention). Both supervise
   the same tokens (each segment's tokens after its first). Target (docs/BENCH.md):
   speed-up ≥ 0.8 × (tokens unpacked / tokens packed). The two variants' steps alternate, so a
   machine shared with other work slows both alike.

On CPU, part 1 runs small: "ours" is the pure-PyTorch reference path (per-run SDPA with boolean
masks), FlexAttention has no CPU backward: those figures are NOT performance results. Part 2 on
CPU is the docs/BENCH.md CPU row (tiny Qwen2, reference attention path), with peak resident-set
growth measured in a fresh subprocess per variant.

Writes bench/results/attention-<device>.json. Usage:
    OMP_NUM_THREADS=1 python bench/attention.py [--repeats 7] [--no-memory]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
from kernels.masked_attention import (dense_reference_attention, make_plan, masked_attention,  # noqa: E402
                                      register_hf, tile_config)


# ----------------------------------------------------------------------------- layouts

@dataclass
class Layout:
    """One packed row: a prefix of `prefix` tokens then segments of `segments` tokens."""
    prefix: int
    segments: list[int]

    @property
    def tokens(self) -> int:
        return self.prefix + sum(self.segments)

    @property
    def unpacked_tokens(self) -> int:
        return sum(self.prefix + n for n in self.segments)

    def visible_pairs(self) -> int:
        """Allowed (q, k) pairs: p causal, each segment sees p and itself causally."""
        P = self.prefix
        return P * (P + 1) // 2 + sum(n * P + n * (n + 1) // 2 for n in self.segments)

    def ids(self, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """doc, seg, position ids, each [1, S]. p: 0…|p|−1; each segment continues from |p|."""
        seg = torch.cat([torch.zeros(self.prefix, dtype=torch.long)]
                        + [torch.full((n,), i, dtype=torch.long) for i, n in enumerate(self.segments, 1)])
        pos = torch.cat([torch.arange(self.prefix)] + [self.prefix + torch.arange(n) for n in self.segments])
        return (torch.zeros_like(seg)[None].to(device), seg[None].to(device), pos[None].to(device))


def split_layout(total: int, prefix_frac: float, k: int) -> Layout:
    """Total length S = |p| + K·L with |p| = prefix_frac · (|p| + L) (the prefix's share of each
    sub-trajectory's window); the last segment absorbs the rounding."""
    prefix = round(total / (1 + k * (1 - prefix_frac) / prefix_frac))
    rest = total - prefix
    segments = [rest // k] * k
    segments[-1] += rest - sum(segments)
    return Layout(prefix, segments)


# ----------------------------------------------------------------------------- timing

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device, repeats: int) -> float:
    """Median wall time of fn() in ms after warm-up: `triton.testing.do_bench` on CUDA (it
    flushes the L2 cache between calls), else two warm-up calls and `repeats` timed ones."""
    if device.type == "cuda":
        import triton
        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
    fn()
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def peak_mib(fn, device) -> float | None:
    """CUDA: peak allocated memory of one fn() above what was allocated before, MiB."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


# ----------------------------------------------------------------------------- part 1: kernel

def bench_kernel(layout: Layout, heads: tuple[int, int], D: int, dtype, device, repeats: int) -> dict:
    Hq, Hkv = heads
    S = layout.tokens
    doc, seg, _ = layout.ids(device)
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, Hq, S, D, device=device, dtype=dtype, generator=g).requires_grad_()
    k = torch.randn(1, Hkv, S, D, device=device, dtype=dtype, generator=g).requires_grad_()
    v = torch.randn(1, Hkv, S, D, device=device, dtype=dtype, generator=g).requires_grad_()
    do = torch.randn(1, Hq, S, D, device=device, dtype=dtype, generator=g)
    pairs = layout.visible_pairs()
    fwd_flop = 4 * D * Hq * pairs

    def variant(attend, anchor: bool) -> dict:
        """Figures of one implementation; an anchor that fails (memory, unsupported) is recorded,
        ours must run."""
        def fwd():
            with torch.no_grad():
                attend()

        def fwd_bwd():
            q.grad = k.grad = v.grad = None
            attend().backward(do)

        row = {}
        try:
            for name, fn, flop in (("fwd", fwd, fwd_flop), ("fwd_bwd", fwd_bwd, 3.5 * fwd_flop)):
                if name == "fwd_bwd" and device.type == "cpu" and attend is flex:
                    row[name] = "n/a: FlexAttention has no CPU backward"
                    continue
                ms = time_ms(fn, device, repeats)
                row[f"{name}_ms"] = round(ms, 3)
                row[f"{name}_tflops_visible"] = round(flop / ms / 1e9, 3)
                row[f"{name}_peak_mib"] = peak_mib(fn, device)
        except Exception as e:  # noqa: BLE001  (an anchor's failure is a figure: "out of memory")
            if not anchor:
                raise
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            if device.type == "cuda":
                torch.cuda.empty_cache()
        return row

    # ours: tiles classified once per batch (cached for these doc/seg tensors)
    ours = lambda: masked_attention(q, k, v, doc, seg)                          # noqa: E731
    cfg = tile_config(q)
    plan_ms = time_ms(lambda: make_plan(doc, seg, cfg.block_m, cfg.block_n), device, repeats)

    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    d0, s0 = doc[0], seg[0]

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (d0[kv_idx] == d0[q_idx]) & ((s0[kv_idx] == s0[q_idx]) | (s0[kv_idx] == 0))

    t = time.perf_counter()
    block_mask = create_block_mask(mask_mod, 1, None, S, S, device=device)
    block_mask_ms = (time.perf_counter() - t) * 1e3
    flex_fn = torch.compile(flex_attention, dynamic=False) if device.type == "cuda" else flex_attention
    fq, fk, fv = (q, k, v) if device.type == "cuda" else (q.detach(), k.detach(), v.detach())
    flex = lambda: flex_fn(fq, fk, fv, block_mask=block_mask, enable_gqa=True)   # noqa: E731
    with torch.no_grad():                  # same answer? (ours vs FlexAttention, forward)
        max_abs_diff = (ours().float() - flex().float()).abs().max().item()

    sdpa_dense = lambda: dense_reference_attention(q, k, v, doc, seg)             # noqa: E731

    return dict(S=S, prefix=layout.prefix, segments=len(layout.segments), Hq=Hq, Hkv=Hkv, D=D,
                dtype=str(dtype).removeprefix("torch."), visible_pairs=pairs,
                causal_pairs=S * (S + 1) // 2, tile_plan_ms=round(plan_ms, 3),
                flex_block_mask_ms=round(block_mask_ms, 3), ours_vs_flex_max_abs_diff=max_abs_diff,
                ours=variant(ours, anchor=False), flex=variant(flex, anchor=True),
                sdpa_dense_mask=variant(sdpa_dense, anchor=True))


# ----------------------------------------------------------------------------- part 2: SFT step

@dataclass
class ModelSize:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int


CPU_MODEL = ModelSize(hidden=128, layers=2, heads=4, kv_heads=2, intermediate=512, vocab=512)
GPU_MODEL = ModelSize(hidden=1024, layers=8, heads=16, kv_heads=4, intermediate=2816, vocab=16384)


def build_model(size: ModelSize, attn: str, device, dtype):
    from transformers import AutoModelForCausalLM, Qwen2Config
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=size.vocab, hidden_size=size.hidden, intermediate_size=size.intermediate,
                      num_hidden_layers=size.layers, num_attention_heads=size.heads,
                      num_key_value_heads=size.kv_heads, max_position_embeddings=1 << 17)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=dtype).to(device)


def sft_batches(layout: Layout, vocab: int, device) -> tuple[dict, dict]:
    """The same K sub-trajectories, packed ([1, |p| + ΣLᵢ], shared p) and unpacked ([K, |p| + L]).
    Targets are shifted; supervised: each segment's tokens after its first, in both."""
    g = torch.Generator().manual_seed(1)
    p = torch.randint(0, vocab, (layout.prefix,), generator=g)
    segs = [torch.randint(0, vocab, (n,), generator=g) for n in layout.segments]
    ids = torch.cat([p] + segs)[None]                                            # (1, S)
    doc, seg, pos = layout.ids("cpu")
    nxt_same_seg = torch.cat([(seg[0, 1:] == seg[0, :-1]) & (seg[0, 1:] > 0), torch.tensor([False])])
    tgt = torch.where(nxt_same_seg, torch.roll(ids[0], -1), -100)[None]
    packed = dict(input_ids=ids, position_ids=pos, doc_ids=doc, seg_ids=seg, targets=tgt)
    rows = torch.stack([torch.cat([p, s]) for s in segs])                         # (K, |p| + L)
    rtgt = torch.roll(rows, -1, dims=1)
    rtgt[:, :layout.prefix] = -100
    rtgt[:, -1] = -100
    unpacked = dict(input_ids=rows, targets=rtgt)
    assert int((tgt != -100).sum()) == int((rtgt != -100).sum())
    move = lambda d: {k: v.to(device) for k, v in d.items()}                     # noqa: E731
    return move(packed), move(unpacked)


def sft_step(model, opt, batch: dict):
    """One SFT step: mean next-token cross-entropy over the supervised tokens, backward, AdamW."""
    targets = batch["targets"]
    logits = model(**{k: v for k, v in batch.items() if k != "targets"}).logits  # (B, S, V)
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def sft_variant(size: ModelSize, layout: Layout, variant: str, device, dtype):
    model = build_model(size, register_hf() if variant == "packed" else "sdpa", device, dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    packed, unpacked = sft_batches(layout, size.vocab, device)
    batch = packed if variant == "packed" else unpacked
    return lambda: sft_step(model, opt, batch)


def bench_sft(size: ModelSize, window: int, prefix_frac: float, k: int, device, dtype,
              repeats: int, memory: bool) -> dict:
    prefix = round(prefix_frac * window)
    layout = Layout(prefix, [window - prefix] * k)
    row = dict(window=window, prefix=prefix, segments=k, tokens_packed=layout.tokens,
               tokens_unpacked=layout.unpacked_tokens,
               token_ratio=round(layout.unpacked_tokens / layout.tokens, 3))
    steps = {v: sft_variant(size, layout, v, device, dtype) for v in ("packed", "unpacked")}
    times = {v: [] for v in steps}
    for v, step in steps.items():                 # warm-up
        step()
    for _ in range(repeats):                      # alternate the variants
        for v, step in steps.items():
            _sync(device)
            t = time.perf_counter()
            step()
            _sync(device)
            times[v].append((time.perf_counter() - t) * 1e3)
    for v, step in steps.items():
        row[f"{v}_ms"] = round(statistics.median(times[v]), 2)
        if device.type == "cuda":
            row[f"{v}_peak_mib"] = round(peak_mib(step, device), 1)
        elif memory:
            row[f"{v}_peak_rss_growth_mib"] = rss_growth_subprocess(window, prefix_frac, k, v)
    row["speedup"] = round(row["unpacked_ms"] / row["packed_ms"], 3)
    row["target_speedup"] = round(0.8 * row["token_ratio"], 3)
    row["meets_target"] = row["speedup"] >= row["target_speedup"]
    return row


def rss_growth_subprocess(window: int, prefix_frac: float, k: int, variant: str) -> float:
    """Peak resident-set growth (MiB) of two SFT steps in a fresh CPU process (docs/BENCH.md)."""
    out = subprocess.run([sys.executable, __file__, "--child", variant, "--window", str(window),
                          "--prefix-frac", str(prefix_frac), "--k", str(k)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_growth_mib"]


def _status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS: resident now; VmHWM: its peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} (Linux only)")


def child(variant: str, window: int, prefix_frac: float, k: int) -> None:
    """Peak RSS above the RSS before two SFT steps. The import peak is reset first (writing 5 to
    /proc/self/clear_refs resets VmHWM), since ru_maxrss would still hold it."""
    torch.set_num_threads(1)
    prefix = round(prefix_frac * window)
    step = sft_variant(CPU_MODEL, Layout(prefix, [window - prefix] * k), variant,
                       torch.device("cpu"), torch.float32)
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    step()
    step()
    print(json.dumps({"peak_rss_growth_mib": round((_status_kib("VmHWM") - before) / 1024, 1)}))


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=9, help="timed repeats per figure (CPU)")
    ap.add_argument("--no-memory", action="store_true", help="CPU: skip the per-variant RSS subprocesses")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON path (default bench/results/attention-<device>.json)")
    ap.add_argument("--child", choices=["packed", "unpacked"], help=argparse.SUPPRESS)
    ap.add_argument("--window", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--prefix-frac", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--k", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, args.window, args.prefix_frac, args.k)
        return 0

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    result = dict(
        **common.header("attention", device.type, packages=("torch", "triton", "transformers")),
        kernel_is_performance_result=gpu,
        notes=[] if gpu else [
            "CPU: the kernel table is NOT a performance result (ours = the pure-PyTorch per-run "
            "reference path, not the Triton kernel; FlexAttention forward only).",
            "CPU: the sft_step table IS the docs/BENCH.md CPU row (tiny Qwen2, reference attention path)."])

    print(f"device: {result['device_name']} ({device.type}), torch {torch.__version__}, "
          f"{result['torch_threads']} threads")
    if gpu:
        cases = [(16384, 0.5, 8), (32768, 0.25, 4), (32768, 0.5, 8), (32768, 0.75, 16),
                 (65536, 0.5, 8), (65536, 0.75, 16)]
        kernel_shapes = [((32, 8), 128, torch.bfloat16)] * len(cases) + [((32, 8), 64, torch.bfloat16)]
        cases.append((32768, 0.5, 8))
    else:
        cases = [(512, 0.5, 4)]
        kernel_shapes = [((4, 2), 64, torch.float32)]
        print("CPU: kernel figures below are NOT performance results")
    result["kernel"] = []
    for (total, frac, k), (heads, D, dtype) in zip(cases, kernel_shapes):
        row = bench_kernel(split_layout(total, frac, k), heads, D, dtype, device, args.repeats)
        result["kernel"].append(row)
        print(json.dumps(row))

    if gpu:
        size, dtype = GPU_MODEL, torch.bfloat16
        sft_cases = [(10240, 0.8, 8)]     # p 8,192 + 8 segments of 2,048 (docs/KERNELS.md's example)
    else:
        size, dtype = CPU_MODEL, torch.float32
        sft_cases = [(512, 0.25, 4), (512, 0.5, 4), (512, 0.75, 4)]
    result["sft_model"] = asdict(size) | dict(dtype=str(dtype).removeprefix("torch."))
    result["sft_step"] = []
    for window, frac, k in sft_cases:
        row = bench_sft(size, window, frac, k, device, dtype, args.repeats, memory=not args.no_memory)
        result["sft_step"].append(row)
        print(json.dumps(row))

    name = common.slug(result["device_name"]) if gpu else "cpu"
    out = common.write(args.out or ROOT / "bench" / "results" / f"attention-{name}.json", result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
