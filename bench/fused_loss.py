"""Fused-loss benchmark (issue 3; docs/KERNELS.md §1, docs/BENCH.md). Not a timed test.

On a GPU (the figures docs/KERNELS.md targets): in one process, on the same bf16 inputs, forward +
backward time and peak memory of
    naive    full logits, fp32 log_softmax, gather (PyTorch autograd)               6NHV
    ref-sft  our chunked PyTorch reference, gradients in the forward (SFT path)     6NHV
    ker-sft  our Triton row kernel, gradients in the forward (SFT path)             6NHV
    ker-rl   our Triton row kernel, any per-token upstream gradient (RL path)      8NHV
    liger    liger_kernel's LigerFusedLinearCrossEntropyLoss (sum)                  6NHV
    cce      Apple's cut_cross_entropy.linear_cross_entropy (sum), if importable    8NHV
at N ∈ {4K, 16K, 32K}, H = 4096, V = 151,936; target: ker-sft time ≤ 1.0× liger's.
Without a GPU the same suite runs at a small size (Triton under TRITON_INTERPRET=1) and the
output says its figures are not performance results.

Always (CPU row of docs/BENCH.md): per-token log-probs at N = 8,192, H = 256, V = 32K, fp32, our
chunked reference against full logits + log_softmax + gather (and TRL's selective_log_softmax
when trl is importable: bench/requirements.txt), forward (no grad) and forward + backward with a
random per-token upstream gradient. Peak memory: one call per fresh subprocess (growth of the
resident-set high-water mark); time: all variants in one process on the same inputs, median of
interleaved repeats. Targets: peak memory ≤ 1/8 of the full logits, time ≤ 1.3×.

    OMP_NUM_THREADS=1 python bench/fused_loss.py [--quick] [--skip-cpu-row]

Writes bench/results/fused_loss-<device>.json (device name, versions, shapes, ms, GB, TFLOP/s).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
import torch  # noqa: E402

ON_GPU = torch.cuda.is_available()
if not ON_GPU:  # Triton kernels (ours, Liger's) run in the interpreter; set before they import
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels.fused_loss import token_logprobs, weighted_logprob_sum  # noqa: E402

GPU_SIZES = dict(n=[4096, 16384, 32768], h=4096, v=151936, dtype="bfloat16")
CPU_SMALL = dict(n=[256], h=64, v=4096, dtype="float32")
CPU_ROW = dict(n=8192, h=256, v=32768)


# ------------------------------------------------------------------------------- GPU-style suite
def make_inputs(n, h, v, dtype, device, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    hs = torch.randn(n, h, generator=gen).to(device, dtype).requires_grad_()
    W = (torch.randn(v, h, generator=gen) / h**0.5).to(device, dtype).requires_grad_()
    y = torch.randint(0, v, (n,), generator=gen).to(device)
    g = torch.randn(n, generator=gen).to(device)  # a per-token upstream gradient (RL path)
    return hs, W, y, g


def variants(hs, W, y, g):
    """name -> (fwd+bwd closure returning the loss, FLOPs multiple of NHV)."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    liger = LigerFusedLinearCrossEntropyLoss(reduction="sum")

    def naive():
        logp = torch.log_softmax((hs @ W.T).float(), dim=-1).gather(1, y[:, None]).squeeze(1)
        loss = -logp.sum()
        loss.backward()
        return loss

    def ours_sft(impl):
        def run():
            loss = -weighted_logprob_sum(hs, W, y, torch.ones_like(g), impl=impl)
            loss.backward()
            return loss
        return run

    def ker_rl():
        logp = token_logprobs(hs, W, y, impl="triton")
        (-(g * logp).sum()).backward()
        return -logp.sum()

    def liger_run():
        loss = liger(W, hs, y)
        loss.backward()
        return loss

    table = {"naive": (naive, 6), "ref-sft": (ours_sft("reference"), 6),
             "ker-sft": (ours_sft("triton"), 6), "ker-rl": (ker_rl, 8), "liger": (liger_run, 6)}
    if ON_GPU:
        try:
            from cut_cross_entropy import linear_cross_entropy
        except ImportError:
            print("  (cut-cross-entropy not importable: cce skipped; bench/requirements.txt)")
        else:
            def cce():
                loss = linear_cross_entropy(hs, W, y, reduction="sum")
                loss.backward()
                return loss
            table["cce"] = (cce, 8)
    return table


def time_and_memory(fn, params, repeats):
    """(median ms, all ms, peak extra GB or None on CPU, loss value)."""
    def clear():
        for p in params:
            p.grad = None

    clear()
    if ON_GPU:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    loss = float(fn().detach())
    peak = None
    if ON_GPU:
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    times = []
    for _ in range(repeats):
        clear()
        if ON_GPU:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    clear()
    return statistics.median(times), times, peak, loss


def fused_suite(sizes, repeats):
    device = "cuda" if ON_GPU else "cpu"
    rows = []
    for n in sizes["n"]:
        hs, W, y, g = make_inputs(n, sizes["h"], sizes["v"], getattr(torch, sizes["dtype"]), device)
        nhv = n * sizes["h"] * sizes["v"]
        for name, (fn, flops) in variants(hs, W, y, g).items():
            try:
                ms, all_ms, gb, loss = time_and_memory(fn, (hs, W), repeats)
                row = dict(variant=name, n=n, ms=round(ms, 3), ms_all=[round(t, 3) for t in all_ms],
                           peak_gb=None if gb is None else round(gb, 3), loss=loss,
                           flops=f"{flops}NHV", tflops=round(flops * nhv / (ms * 1e-3) / 1e12, 2))
            except torch.cuda.OutOfMemoryError:
                row = dict(variant=name, n=n, ms=None, peak_gb=None, error="out of memory")
                torch.cuda.empty_cache()
            rows.append(row)
            shown = row["error"] if row.get("ms") is None else (
                f"{row['ms']:>10.2f} ms  {row['tflops']:>7.2f} TFLOP/s  "
                f"peak {row['peak_gb'] or 'n/a'} GB  loss {row['loss']:.4f}")
            print(f"  N={n:>6} {name:<8} {shown}", flush=True)
        liger_ms = next(r["ms"] for r in rows if r["n"] == n and r["variant"] == "liger")
        for r in rows:
            if r["n"] == n and r.get("ms") and liger_ms:
                r["time_vs_liger"] = round(r["ms"] / liger_ms, 3)
        del hs, W, y, g
    return rows


# ------------------------------------------------------------------------------- CPU row (docs/BENCH.md)
def logprob_variant(variant: str, mode: str, n: int, h: int, v: int):
    """A closure running one CPU-row variant on seeded inputs (the same for every variant); it
    returns log p [n]. fwd: no grad; fwd+bwd: also ∂/∂h and ∂/∂W of Σ g·log p, g random."""
    gen = torch.Generator().manual_seed(0)
    hs = torch.randn(n, h, generator=gen).requires_grad_(mode == "fwd+bwd")
    W = (torch.randn(v, h, generator=gen) / h**0.5).requires_grad_(mode == "fwd+bwd")
    y, g = torch.randint(0, v, (n,), generator=gen), torch.randn(n, generator=gen)
    if variant == "full":
        def logp_fn():
            return torch.log_softmax(hs @ W.T, dim=-1).gather(1, y[:, None]).squeeze(1)
    elif variant == "trl":
        from trl.trainer.utils import selective_log_softmax

        def logp_fn():
            return selective_log_softmax(hs @ W.T, y)
    else:
        def logp_fn():
            return token_logprobs(hs, W, y, impl="reference")

    def run():
        if mode == "fwd":
            with torch.no_grad():
                return logp_fn()
        logp = logp_fn()
        torch.autograd.grad((g * logp).sum(), [hs, W])
        return logp.detach()
    return run


def peak_rss_growth_mb(run) -> float:
    """Peak resident-set growth during run(): reset the kernel's high-water mark (clear_refs 5,
    Linux ≥ 4.0), run, read VmHWM; falls back to ru_maxrss growth."""
    def vm_hwm_kb():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = vm_hwm_kb()
        run()
        peak = vm_hwm_kb()
    except OSError:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        run()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (peak - before) / 1024


def cpu_child(variant: str, mode: str) -> dict:
    """In a fresh process: the peak memory of one call, and a checksum of its log-probs."""
    run = logprob_variant(variant, mode, CPU_ROW["n"], CPU_ROW["h"], CPU_ROW["v"])
    out = []
    peak_mb = peak_rss_growth_mb(lambda: out.append(run()))
    return dict(peak_mb=round(peak_mb, 1), checksum=float(out[0].double().sum()))


def cpu_row(repeats: int) -> dict:
    """Memory: a fresh subprocess per variant. Time: all variants in this process on the same
    inputs, repeats interleaved round-robin (the machine is shared), median per variant."""
    n, h, v = CPU_ROW["n"], CPU_ROW["h"], CPU_ROW["v"]
    try:
        import trl.trainer.utils  # noqa: F401
        names = ["full", "trl", "ours-reference"]
    except ImportError:
        names = ["full", "ours-reference"]
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        mem = {}
        for name in names:
            cmd = [sys.executable, __file__, "--child", name, "--mode", mode]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            mem[name] = json.loads(out.stdout.strip().splitlines()[-1])
        runs = {name: logprob_variant(name, mode, n, h, v) for name in names}
        times = {name: [] for name in names}
        for name in names:  # warm-up
            runs[name]()
        for _ in range(repeats):
            for name in names:
                t0 = time.perf_counter()
                runs[name]()
                times[name].append((time.perf_counter() - t0) * 1e3)
        for name in names:
            r = dict(variant=name, mode=mode, ms=round(statistics.median(times[name]), 1),
                     ms_all=[round(t, 1) for t in times[name]], **mem[name])
            rows.append(r)
            print(f"  {mode:<8} {name:<15} {r['ms']:>9.1f} ms   peak +{r['peak_mb']:>8.1f} MB",
                  flush=True)
        del runs
    full_logits_mb = n * v * 4 / 2**20
    summary = {}
    for mode in ("fwd", "fwd+bwd"):
        by = {r["variant"]: r for r in rows if r["mode"] == mode}
        ours, full = by["ours-reference"], by["full"]
        summary[mode] = dict(time_ratio=round(ours["ms"] / full["ms"], 3),
                             peak_vs_full_logits=round(ours["peak_mb"] / full_logits_mb, 4),
                             peak_ratio_vs_full=round(ours["peak_mb"] / full["peak_mb"], 4),
                             logp_checksum_diff=abs(ours["checksum"] - full["checksum"]))
        if "trl" in by:
            summary[mode]["time_ratio_vs_trl"] = round(ours["ms"] / by["trl"]["ms"], 3)
        summary[mode]["target_met"] = (summary[mode]["time_ratio"] <= 1.3
                                       and summary[mode]["peak_vs_full_logits"] <= 1 / 8)
    return dict(shape=dict(N=n, H=h, V=v, dtype="float32"), full_logits_mb=round(full_logits_mb, 1),
                threads=torch.get_num_threads(), repeats=repeats,
                trl=("used" if "trl" in names else
                     "not importable (pip install -r bench/requirements.txt)"),
                targets="time ≤ 1.3× full logits; peak memory ≤ 1/8 of the full fp32 logits",
                rows=rows, summary=summary)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--skip-cpu-row", action="store_true", help="only the fused-loss suite")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--repeats", type=int, default=None, help="CPU-row repeats (default 5)")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(cpu_child(args.child, args.mode)))
        return

    result = common.header("fused_loss", "cuda" if ON_GPU else "cpu",
                           packages=("torch", "triton", "liger-kernel", "transformers", "trl"))
    name = result["device_name"]
    sizes = GPU_SIZES if ON_GPU else CPU_SMALL
    if not ON_GPU:
        result["note"] = ("no GPU: the fused-loss suite ran at a small size on CPU, Triton kernels "
                          "(ours and Liger's) in the interpreter. These figures are NOT "
                          "performance results; only the cpu_logprobs ratios are.")
        print("*** " + result["note"] + " ***")
    print(f"fused loss, fwd+bwd, {sizes} on {name}")
    result["fused_loss"] = dict(shapes=sizes, rows=fused_suite(sizes, 3 if args.quick else 10),
                                target="ker-sft time ≤ 1.0× liger at every N (GPU only)")
    if not args.skip_cpu_row:
        print(f"per-token log-probs on CPU, {CPU_ROW}, fp32, fresh process per variant")
        result["cpu_logprobs"] = cpu_row(args.repeats or (3 if args.quick else 5))
        for mode, s in result["cpu_logprobs"]["summary"].items():
            print(f"  {mode}: time {s['time_ratio']}× full, peak {s['peak_vs_full_logits']:.3f} of "
                  f"the full logits -> target {'met' if s['target_met'] else 'NOT met'}")
    out = common.write(ROOT / "bench" / "results"
                       / f"fused_loss-{common.slug(name) if ON_GPU else 'cpu'}.json", result)
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
