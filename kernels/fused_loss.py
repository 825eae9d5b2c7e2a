"""Fused linear + per-token log-prob: the "fused long-context loss" (docs/KERNELS.md §1, issue 3).

Both training stages need log p(y_n | h_n) for every token of a 64K-token sub-trajectory: SFT
(cross-entropy on the supervised tokens, docs/PAPER.md) and RL (PPO-clip ratios and the KL term use
per-token log-probs). With a 150K vocabulary the [N, V] logits of one sub-trajectory are 38 GB in
fp32, so they are never stored: this module goes from the hidden states straight to log-probs.

Dimensions: N tokens, H hidden size, V vocabulary, C tokens per chunk.

Math (temperature T, per token n, vocabulary entry v):
    x_n = W h_n + b                                   raw logits            [V]
    z_n = x_n / T                                     tempered logits       [V]
    lse_n = log Σ_v exp z_nv
    log p(y_n) = z_{n,y_n} - lse_n                    returned, fp32        [N]
    H_n = -Σ_v p_nv log p_nv = log Σ_v e^{z_nv - m} - Σ_v p_nv (z_nv - m)   (entropy, any shift m)
Backward, for ANY upstream gradients g_n = ∂L/∂log p(y_n) and e_n = ∂L/∂H_n (PPO-clip, KL and
entropy bonuses give a different g_n per token):
    ∂L/∂z_nv = g_n (1[v = y_n] - p_nv) - e_n p_nv (log p_nv + H_n)
    δ_nv = ∂L/∂x_nv = (∂L/∂z_nv) / T
    dh_n = Σ_v δ_nv W_v          dW = Σ_n δ_n h_nᵀ          db = Σ_n δ_n
Rows whose target is `ignore_index` get log p = 0, H = 0 and no gradient: they are dropped before
any arithmetic (SFT skips the unsupervised tokens' vocabulary work entirely).

Memory argument. Tokens are processed in chunks of C rows. Per chunk one fp32 buffer x [C, V]
holds h Wᵀ (the GEMM's fp32 output; b and 1/T are applied as it is read). The Triton row kernel
reads it once for lse, log p(y) and H (an online pass: running max m, Σ e^{z-m}, Σ e^{z-m}(z-m))
and, when gradients are wanted, a second time, overwriting it in place with δ in h's dtype. δ
feeds two GEMMs, dh_c = δ W and dW += δᵀ h_c. The reference does the same row work with torch
ops on the chunk (a fused log_softmax, then p = exp log p), using a few [C, V] temporaries.
Peak extra memory: a few C·V·4 bytes (C·V ≤ 2^28 on CUDA, 2^21 on CPU), the fp32 dW accumulator
[V, H] and O(N) statistics; never [N, V]. Arithmetic (docs/KERNELS.md): the RL path
(`token_logprobs`) keeps only lse and H per token and recomputes the logits in the backward:
2NHV forward + 6NHV backward = 8NHV. The SFT path (`weighted_logprob_sum`) knows g_n = w_n in the
forward and computes the gradients there, as Liger does: 6NHV.

Precision. Logits, softmax statistics, dW and db accumulate in fp32 (bf16 accumulation of dW
destabilises training, docs/KERNELS.md). The one rounding step: δ is stored in h's dtype so the two
backward GEMMs run on bf16 tensor cores (as in Liger); for fp32 inputs everything is fp32.

Backends (one switch): `impl="reference"` runs the per-chunk row work in PyTorch, `impl="triton"`
runs `_logprob_rows_kernel`. Both share the chunk loop, the GEMMs and the autograd functions, so
the reference is just as frugal with memory (the CPU training loops use it). `impl="auto"` reads
the environment variable KLONG_KERNELS (auto | triton | reference); auto means Triton when the
tensors are on CUDA, the reference otherwise. An explicit `impl` argument wins over the variable.

Departures: none from the paper (it does not describe its loss kernels). Logits must be finite:
mask vocabulary entries with a large negative bias, not -inf (the reference recovers lse as
z_y - log p(y), and an all -inf block would stall the kernel's running max).

File order (docs/STYLE.md): this docstring, the reference, the Triton kernel, its launcher, the shared
chunk loop and the autograd functions, then the public API.
"""
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

KERNEL_ENV = "KLONG_KERNELS"
IMPLS = ("auto", "triton", "reference")

# Logits elements per chunk (C·V): 2^28 fp32 = 1 GiB on a GPU (large chunks keep the GEMMs at
# full speed; Liger's default is ~N·H elements), 2^21 = 8 MiB on CPU (fits the caches; the CPU
# benchmark target is peak memory ≤ 1/8 of the full logits).
CHUNK_ELEMENTS = {"cuda": 2**28, "cpu": 2**21}


@dataclass
class RowWork:
    """One chunk's row work, the interface both backends implement (`_rows_reference`,
    `_rows_triton`). All [C] tensors are fp32; the targets are all valid."""
    x: torch.Tensor             # [C, V] fp32 h Wᵀ (no bias); the row function may overwrite it
    bias: torch.Tensor | None   # [V] in h's dtype
    y: torch.Tensor             # [C] int64 targets in [0, V)
    inv_temp: float             # 1 / T
    lse: torch.Tensor           # [C] log Σ exp z: written if compute_stats, else read
    ent: torch.Tensor           # [C] entropy H: written if compute_stats (and entropy), else read
    logp: torch.Tensor          # [C] log p(y): written if compute_stats
    compute_stats: bool         # False in the RL backward: lse and H come from the forward
    entropy: bool               # H is wanted (the reference skips two passes over x if not)
    g: torch.Tensor | None = None      # [C] ∂L/∂log p(y); given: write δ
    e: torch.Tensor | None = None      # [C] ∂L/∂H, or None
    delta: torch.Tensor | None = None  # [C, V] out δ = ∂L/∂(h Wᵀ + b) in h's dtype; may alias x


# ----------------------------------------------------------------------------------------------
# Reference: one chunk's row work in PyTorch
# ----------------------------------------------------------------------------------------------
def _rows_reference(r: RowWork) -> None:
    """The row work in PyTorch: a fused log_softmax for the statistics, then δ from p."""
    z = r.x                                                             # (C, V), in place
    if r.bias is not None:
        z.add_(r.bias)
    if r.inv_temp != 1.0:
        z.mul_(r.inv_temp)                                              # z = (h Wᵀ + b) / T
    rows = torch.arange(z.shape[0], device=z.device)
    if r.compute_stats:
        log_p = torch.log_softmax(z, dim=1)                             # (C, V) log p
        r.logp.copy_(log_p[rows, r.y])
        r.lse.copy_(z[rows, r.y] - r.logp)                              # lse = z_y - log p(y)
    else:
        log_p = z.sub_(r.lse[:, None])                                  # (C, V) log p, in place
    if r.g is None and not (r.compute_stats and r.entropy):
        return
    keep_log_p = (r.compute_stats and r.entropy) or r.e is not None
    p = log_p.exp() if keep_log_p else log_p.exp_()                     # (C, V)
    if r.compute_stats and r.entropy:
        r.ent.copy_(-(p * log_p).sum(dim=1))                            # H = -Σ p log p
    if r.g is None:
        return
    # ∂L/∂z = g (1[v = y] - p) - e p (log p + H)
    coeff = -r.g[:, None]                                               # (C, 1)
    if r.e is not None:
        coeff = coeff - r.e[:, None] * (log_p + r.ent[:, None])         # (C, V)
    dz = p.mul_(coeff)                                                  # (C, V), in place on p
    dz[rows, r.y] += r.g
    if r.inv_temp != 1.0:
        dz.mul_(r.inv_temp)                                             # δ = ∂L/∂z / T
    r.delta.copy_(dz)                                                   # no-op if δ is this buffer


# ----------------------------------------------------------------------------------------------
# Triton kernel: the same row work, one online pass for the statistics, one pass writing δ
# ----------------------------------------------------------------------------------------------
@triton.jit
def _logprob_rows_kernel(
    x_ptr,      # [C, V] fp32 h Wᵀ (no bias), row stride stride_x; read only
    b_ptr,      # [V] bias in h's dtype; read only when HAS_BIAS
    delta_ptr,  # [C, V] out δ = ∂L/∂(h Wᵀ + b), h's dtype, row stride stride_d; may alias x's rows
    y_ptr,      # [C] int64 target ids, all in [0, V)
    lse_ptr,    # [C] fp32 log-sum-exp of z: written when COMPUTE_STATS, read otherwise
    ent_ptr,    # [C] fp32 entropy H: written when COMPUTE_STATS, read otherwise
    logp_ptr,   # [C] fp32 out log p(y): written when COMPUTE_STATS
    g_ptr,      # [C] fp32 upstream ∂L/∂log p(y): read when WRITE_GRAD
    e_ptr,      # [C] fp32 upstream ∂L/∂H: read when WRITE_GRAD and ENTROPY_GRAD
    C, V, stride_x, stride_d,
    inv_temp,   # 1 / T
    HAS_BIAS: tl.constexpr, COMPUTE_STATS: tl.constexpr, WRITE_GRAD: tl.constexpr,
    ENTROPY_GRAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)             # (BM,)
    row_ok = rows < C
    rows = tl.minimum(rows, C - 1)  # a tail program repeats the last row; its stores are masked
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_x               # (BM, 1) pointers
    d_rows = delta_ptr + rows.to(tl.int64)[:, None] * stride_d           # (BM, 1) pointers
    y = tl.load(y_ptr + rows)                                            # (BM,)
    cols0 = tl.arange(0, BLOCK_V)

    if COMPUTE_STATS:
        # Online pass: m = running max of z, s = Σ e^{z-m}, t = Σ e^{z-m} (z-m). When the max
        # moves m -> m', every old term is rescaled by α = e^{m-m'}, and (z-m) becomes (z-m') =
        # (z-m) + (m-m'), so t' = α (t + (m-m') s) + new terms.
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK_M], tl.float32)
        t = tl.zeros([BLOCK_M], tl.float32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + cols0
            z = tl.load(x_rows + cols[None, :], mask=cols[None, :] < V, other=float("-inf"))
            if HAS_BIAS:
                z += tl.load(b_ptr + cols, mask=cols < V, other=0.0).to(tl.float32)[None, :]
            z = z * inv_temp                                             # (BM, BV)
            m_new = tl.maximum(m, tl.max(z, axis=1))
            alpha = tl.exp(m - m_new)                                    # 0 on the first block
            shift = tl.where(s > 0, m - m_new, 0.0)
            p_un = tl.exp(z - m_new[:, None])                            # (BM, BV) e^{z-m'}
            z_m = tl.where(p_un > 0, z - m_new[:, None], 0.0)            # 0 off the vocabulary
            t = alpha * (t + shift * s) + tl.sum(p_un * z_m, axis=1)
            s = alpha * s + tl.sum(p_un, axis=1)
            m = m_new
        lse = m + tl.log(s)
        ent = tl.log(s) - t / s                                          # H = log s - Σ p (z - m)
        z_y = tl.load(x_ptr + rows.to(tl.int64) * stride_x + y)
        if HAS_BIAS:
            z_y += tl.load(b_ptr + y).to(tl.float32)
        tl.store(lse_ptr + rows, lse, mask=row_ok)
        tl.store(ent_ptr + rows, ent, mask=row_ok)
        tl.store(logp_ptr + rows, z_y * inv_temp - lse, mask=row_ok)
    else:
        lse = tl.load(lse_ptr + rows)
        ent = tl.load(ent_ptr + rows)

    if WRITE_GRAD:
        g = tl.load(g_ptr + rows)
        if ENTROPY_GRAD:
            e = tl.load(e_ptr + rows)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + cols0
            in_v = cols[None, :] < V
            z = tl.load(x_rows + cols[None, :], mask=in_v, other=float("-inf"))
            if HAS_BIAS:
                z += tl.load(b_ptr + cols, mask=cols < V, other=0.0).to(tl.float32)[None, :]
            log_p = z * inv_temp - lse[:, None]                          # (BM, BV)
            p = tl.exp(log_p)
            # ∂L/∂z = g (1[v = y] - p) - e p (log p + H)
            dz = tl.where(cols[None, :] == y[:, None], g[:, None], 0.0) - g[:, None] * p
            if ENTROPY_GRAD:
                dz -= e[:, None] * p * tl.where(p > 0, log_p + ent[:, None], 0.0)
            # The block of x was loaded above, before this store; in place (fp32) or into the
            # first half of the row (16-bit δ), later blocks of x are untouched.
            tl.store(d_rows + cols[None, :], (dz * inv_temp).to(delta_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & in_v)


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------
def _launch_config(V, interpreted):
    """(BLOCK_M, BLOCK_V, num_warps). GPU: one row per program streaming 8K-wide vocab blocks
    (16 fp32 per thread at 16 warps). Interpreter: many rows per program, since each program
    instance costs milliseconds on CPU (docs/MACHINE.md)."""
    if interpreted:
        return 16, min(512, triton.next_power_of_2(V)), 1
    return 1, min(8192, triton.next_power_of_2(V)), 16


def _rows_triton(r: RowWork, config=None) -> None:
    """The row work on `_logprob_rows_kernel` (which computes H whether or not it is wanted: it
    costs no extra memory traffic). config: override `_launch_config` (tests run the GPU
    configuration under the interpreter too)."""
    C, V = r.x.shape
    block_m, block_v, num_warps = config or _launch_config(V, r.x.device.type == "cpu")
    write_grad = r.g is not None
    delta = r.delta if write_grad else r.x        # unused pointers get any valid tensor
    _logprob_rows_kernel[(triton.cdiv(C, block_m),)](
        r.x, r.bias if r.bias is not None else r.x, delta, r.y, r.lse, r.ent, r.logp,
        r.g if write_grad else r.lse, r.e if r.e is not None else r.lse,
        C, V, r.x.stride(0), delta.stride(0), r.inv_temp,
        HAS_BIAS=r.bias is not None, COMPUTE_STATS=r.compute_stats, WRITE_GRAD=write_grad,
        ENTROPY_GRAD=r.e is not None, BLOCK_M=block_m, BLOCK_V=block_v, num_warps=num_warps)


# ----------------------------------------------------------------------------------------------
# Chunk loop (shared by both backends) and the autograd functions
# ----------------------------------------------------------------------------------------------
def _mm32(a, b):
    """a @ b as fp32 with fp32 accumulation: cuBLAS `out_dtype` on CUDA, an upcast on CPU."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def _addmm32_(acc, a, b):
    """acc += a @ b with acc an fp32 accumulator."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif a.is_cuda:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.float(), b.float())


@dataclass
class _Setup:
    """What a call fixes for all its sweeps."""
    rows_fn: object    # _rows_reference or _rows_triton
    inv_temp: float    # 1 / T
    chunk_rows: int    # C, tokens per chunk
    entropy: bool      # H is returned (and may receive a gradient)


def _sweep(setup, h, weight, bias, y, lse, ent, logp, compute_stats, g=None, e=None, dh=None,
           dW=None, db=None):
    """One pass over the n valid tokens h [n, H], y [n], in chunks of C rows.

    Writes (compute_stats) or reads lse / ent [n], writes logp [n]; with g [n] (and e [n]), also
    writes dh [n, H] (h's dtype) and accumulates dW [V, H] and db [V] (fp32), those given.
    """
    n, V = h.shape[0], weight.shape[0]
    for c0 in range(0, n, setup.chunk_rows):
        c = slice(c0, min(n, c0 + setup.chunk_rows))
        h_c = h[c]                                                       # (C, H)
        x = _mm32(h_c, weight.T)                                         # (C, V) fp32 h Wᵀ
        # δ overwrites x row by row: in place for fp32, else in the first half of each fp32 row
        delta = x if h.dtype == torch.float32 else x.view(h.dtype)[:, :V]  # (C, V), row stride 2V
        setup.rows_fn(RowWork(
            x, bias, y[c], setup.inv_temp, lse[c], ent[c], logp[c], compute_stats, setup.entropy,
            g=None if g is None else g[c], e=None if e is None else e[c],
            delta=None if g is None else delta))
        if g is None:
            continue
        if dh is not None:
            dh[c] = delta @ weight                                       # (C, H) = (C, V)(V, H)
        if dW is not None:
            _addmm32_(dW, delta.T, h_c)                                  # (V, H) += (V, C)(C, H)
        if db is not None:
            db += delta.sum(dim=0, dtype=torch.float32)                  # (V,)


class _Tokens:
    """Which rows are valid (target != ignore_index), and how to move between [N] and [n]."""

    def __init__(self, targets, ignore_index):
        valid = targets != ignore_index                                  # (N,)
        self.N = targets.shape[0]
        self.idx = None if bool(valid.all()) else valid.nonzero().squeeze(1)   # (n,)
        self.y = self.select(targets).contiguous()                       # (n,)
        self.n = self.y.shape[0]

    def select(self, t):
        """[N, ...] -> [n, ...] (the valid rows; a copy only when some rows are ignored)."""
        return t if self.idx is None else t.index_select(0, self.idx)

    def scatter(self, t):
        """[n, ...] -> [N, ...] with zeros at the ignored rows."""
        if self.idx is None:
            return t
        return t.new_zeros((self.N, *t.shape[1:])).index_copy_(0, self.idx, t)


def _stat_buffers(n, device):
    """lse, ent, logp: [n] fp32 each (zeros: H stays 0 where it is not computed)."""
    return torch.zeros(3, n, dtype=torch.float32, device=device).unbind(0)


def _grad_buffers(needs, n, h, weight):
    """dh [n, H] (h's dtype), dW [V, H] fp32, db [V] fp32; None where needs says no."""
    need_h, need_w, need_b = needs
    dh = torch.empty(n, h.shape[1], dtype=h.dtype, device=h.device) if need_h else None
    dW = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_w else None
    db = torch.zeros(weight.shape[0], dtype=torch.float32, device=h.device) if need_b else None
    return dh, dW, db


class _TokenLogprobs(torch.autograd.Function):
    """log p(y_n) and H_n; the backward recomputes the logits chunk by chunk (8NHV in all)."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, ignore_index, setup):
        tokens = _Tokens(targets, ignore_index)
        lse, ent, logp = _stat_buffers(tokens.n, h.device)
        _sweep(setup, tokens.select(h), weight, bias, tokens.y, lse, ent, logp, compute_stats=True)
        ctx.save_for_backward(h, weight, bias, lse, ent)
        ctx.tokens, ctx.setup = tokens, setup
        ctx.set_materialize_grads(False)
        return tokens.scatter(logp), tokens.scatter(ent)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_logp, g_ent):
        h, weight, bias, lse, ent = ctx.saved_tensors
        tokens = ctx.tokens
        g = (torch.zeros(tokens.n, device=h.device) if g_logp is None
             else tokens.select(g_logp.float()).contiguous())            # (n,)
        e = None if g_ent is None else tokens.select(g_ent.float()).contiguous()
        dh, dW, db = _grad_buffers(ctx.needs_input_grad[:3], tokens.n, h, weight)
        unused_logp = torch.empty_like(lse)                              # not written: stats given
        _sweep(ctx.setup, tokens.select(h), weight, bias, tokens.y, lse, ent, unused_logp,
               compute_stats=False, g=g, e=e, dh=dh, dW=dW, db=db)
        return (None if dh is None else tokens.scatter(dh),
                None if dW is None else dW.to(weight.dtype),
                None if db is None else db.to(bias.dtype), None, None, None)


class _WeightedLogprobSum(torch.autograd.Function):
    """Σ_n w_n log p(y_n) with the gradients computed in the forward (6NHV, as Liger)."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, weights, ignore_index, setup, grad_enabled):
        tokens = _Tokens(targets, ignore_index)
        w = tokens.select(weights.float()).contiguous()                  # (n,) = g_n
        lse, ent, logp = _stat_buffers(tokens.n, h.device)
        # needs_input_grad ignores torch.no_grad(): the caller says whether grad mode was on
        needs = ctx.needs_input_grad[:3] if grad_enabled else (False, False, False)
        dh, dW, db = _grad_buffers(needs, tokens.n, h, weight)
        need_grad = any(t is not None for t in (dh, dW, db))
        _sweep(setup, tokens.select(h), weight, bias, tokens.y, lse, ent, logp, compute_stats=True,
               g=w if need_grad else None, dh=dh, dW=dW, db=db)
        logp_all = tokens.scatter(logp)                                  # (N,) = ∂loss/∂w
        ctx.save_for_backward(None if dh is None else tokens.scatter(dh),
                              None if dW is None else dW.to(weight.dtype),
                              None if db is None else db.to(bias.dtype), logp_all)
        return (w * logp).sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        dh, dW, db, logp_all = ctx.saved_tensors
        scale = lambda t: None if t is None else t * grad_out.to(t.dtype)  # noqa: E731
        d_weights = logp_all * grad_out if ctx.needs_input_grad[4] else None
        return scale(dh), scale(dW), scale(db), None, d_weights, None, None, None


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------
def backend(impl="auto", device=None):
    """Resolve the switch to "triton" or "reference".

    impl: "triton" | "reference" force a backend; "auto" defers to the KLONG_KERNELS environment
    variable, and if that is unset or "auto", picks Triton on CUDA and the reference elsewhere.
    device: where the tensors live (default: CUDA if available).
    """
    for source, value in (("impl", impl), (KERNEL_ENV, os.environ.get(KERNEL_ENV, "auto"))):
        if value not in IMPLS:
            raise ValueError(f"kernels.fused_loss: {source}={value!r}; expected one of {IMPLS}")
    choice = impl if impl != "auto" else os.environ.get(KERNEL_ENV, "auto")
    if choice != "auto":
        return choice
    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    return "triton" if device.type == "cuda" else "reference"


def _check(h, weight, targets, bias, temperature, ignore_index, impl):
    """Validate the arguments; return the backend's row function."""
    where = "kernels.fused_loss"
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(f"{where}: h must be [N, H] and weight [V, H]; got h {tuple(h.shape)}, "
                         f"weight {tuple(weight.shape)}")
    if targets.shape != (h.shape[0],) or targets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{where}: targets must be an integer tensor of shape ({h.shape[0]},); "
                         f"got {targets.dtype} {tuple(targets.shape)}")
    if h.dtype != weight.dtype or (bias is not None and bias.dtype != h.dtype):
        raise ValueError(f"{where}: h, weight and bias must share a dtype; got {h.dtype}, "
                         f"{weight.dtype}, {None if bias is None else bias.dtype}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"{where}: bias must be [V] = ({weight.shape[0]},); "
                         f"got {tuple(bias.shape)}")
    if not temperature > 0:
        raise ValueError(f"{where}: temperature must be > 0; got {temperature}")
    valid = targets[targets != ignore_index]
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= weight.shape[0]):
        raise ValueError(f"{where}: targets must lie in [0, V={weight.shape[0]}) or equal "
                         f"ignore_index={ignore_index}; got range [{int(valid.min())}, "
                         f"{int(valid.max())}]")
    choice = backend(impl, h.device)
    if choice == "triton" and h.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"{where}: impl='triton' on CPU tensors needs TRITON_INTERPRET=1 set "
                           "before kernels is imported (or use impl='reference')")
    return _rows_triton if choice == "triton" else _rows_reference


def _setup(rows_fn, temperature, chunk_rows, weight, entropy):
    if chunk_rows is None:   # C·V ≤ CHUNK_ELEMENTS for the device
        chunk_rows = max(1, CHUNK_ELEMENTS["cuda" if weight.is_cuda else "cpu"] // weight.shape[0])
    return _Setup(rows_fn, 1.0 / float(temperature), int(chunk_rows), entropy)


def token_logprobs(h, weight, targets, bias=None, temperature=1.0, ignore_index=-100,
                   return_entropy=False, impl="auto", *, chunk_rows=None):
    """Per-token log p(y_n | h_n) [N] fp32 (and the entropy H_n [N] fp32 if return_entropy).

    h [N, H], weight [V, H] (the LM head), bias [V] or None, all of one dtype (fp32 / bf16 / fp16);
    targets [N] int. Rows with targets == ignore_index give 0 and get no gradient. Differentiable
    w.r.t. h, weight and bias for any upstream gradient of log p and of H. chunk_rows: tokens per
    chunk (default: C·V ≤ CHUNK_ELEMENTS for the device).
    """
    rows_fn = _check(h, weight, targets, bias, temperature, ignore_index, impl)
    setup = _setup(rows_fn, temperature, chunk_rows, weight, return_entropy)
    logp, ent = _TokenLogprobs.apply(h, weight, bias, targets.long(), ignore_index, setup)
    return (logp, ent) if return_entropy else logp


def weighted_logprob_sum(h, weight, targets, weights, bias=None, temperature=1.0,
                         ignore_index=-100, impl="auto", *, chunk_rows=None):
    """Σ_n w_n log p(y_n | h_n), a scalar fp32 (SFT: w = supervision weights).

    Same arguments as `token_logprobs` plus weights [N]. The gradients w.r.t. h, weight, bias
    are computed during the forward (when any of them requires grad) and scaled in the backward;
    the gradient w.r.t. weights is log p(y_n).
    """
    rows_fn = _check(h, weight, targets, bias, temperature, ignore_index, impl)
    if weights.shape != (h.shape[0],):
        raise ValueError(f"kernels.fused_loss: weights must be [N] = ({h.shape[0]},); "
                         f"got {tuple(weights.shape)}")
    setup = _setup(rows_fn, temperature, chunk_rows, weight, False)
    return _WeightedLogprobSum.apply(h, weight, bias, targets.long(), weights, ignore_index,
                                     setup, torch.is_grad_enabled())
