"""kernels/fused_loss.py: per-token log-probs without the [N, V] logits (docs/KERNELS.md §1).

The specification is plain PyTorch on the full logits: log_softmax((h Wᵀ + b) / T) gathered at the
targets, its entropy, and autograd's gradients for arbitrary per-token upstream gradients. Both
backends (reference, Triton under TRITON_INTERPRET=1) are held to it, and to each other, on shapes
that are not multiples of the kernel's blocks, with ignored rows, temperature ≠ 1, N = 1.

Tolerances (stated once). The oracle computes in fp32 from the same (possibly bf16) values.
- Forward, fp32 and bf16: log p and H within 2e-5 absolute (|log p| ≲ 10 here): the same fp32
  arithmetic on the same values.
- Gradients, per element, relative to the size of the terms the entry sums (`check_grads`):
  fp32 1e-5; bf16 1e-2, since δ and the result are each rounded once to bf16 (at most
  2 × 2^-8 ≈ 7.8e-3; the interpreter's bf16 casts round to nearest, see triton_interp_patch).
Nothing here needs a GPU: the GPU launch configuration is also run under the interpreter.
"""
import pytest
import torch
from hypothesis import given
from torch.utils._python_dispatch import TorchDispatchMode

from kernels import fused_loss
from kernels.fused_loss import backend, token_logprobs, weighted_logprob_sum
from tests.strategies import fused_loss_cases

IMPLS = ["reference", "triton"]
FWD_ATOL = 2e-5
GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def make_problem(n, h, v, dtype=torch.float32, seed=0, ignore_frac=0.25, bias=True):
    """h [n, h], W [v, h], b [v] (or None), targets [n] with ~ignore_frac rows = -100; logits of
    a realistic spread (std ≈ 3)."""
    gen = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, h, generator=gen).to(dtype).requires_grad_()
    W = (torch.randn(v, h, generator=gen) * 3 / h**0.5).to(dtype).requires_grad_()
    b = (torch.randn(v, generator=gen) * 0.5).to(dtype).requires_grad_() if bias else None
    y = torch.randint(0, v, (n,), generator=gen)
    y[torch.rand(n, generator=gen) < ignore_frac] = -100
    return hs, W, b, y


def plain(h, W, b, y, temperature=1.0, dtype=torch.float32):
    """The specification: full logits (fp32 unless told), log_softmax, gather; entropy; 0 at
    ignored rows."""
    logits = h.to(dtype) @ W.to(dtype).T + (0 if b is None else b.to(dtype))  # (N, V)
    log_p = torch.log_softmax(logits / temperature, dim=-1)
    keep = (y != -100).to(logits.dtype)
    logp = log_p.gather(1, y.clamp(min=0)[:, None]).squeeze(1) * keep
    ent = -(log_p.exp() * log_p).sum(-1) * keep
    return logp, ent


def grads_of(fn, params, g, e=None):
    """Gradients of Σ g·log p (+ Σ e·H) w.r.t. params, for upstream gradients g, e [N]."""
    logp, ent = fn()
    loss = (g * logp).sum() + (0 if e is None else (e * ent).sum())
    return torch.autograd.grad(loss, [p for p in params if p is not None])


def check_grads(got, h, W, b, y, temperature, g, e=None):
    """got = (dh, dW[, db]) against autograd on the full fp32 logits of the same input values,
    element by element: |got - want| ≤ tol · scale. scale is the size of the terms each entry
    sums, what rounding acts on: with the magnitudes of the parts of δ = ∂L/∂(hWᵀ + b),
    |δ|⁺ = (|g| (1[v = y] + p) + |e| p (|log p| + H)) / T, it is |δ|⁺|W|, |δ|⁺ᵀ|h|, Σ_n |δ_n|⁺."""
    h32, W32 = h.detach().float().requires_grad_(), W.detach().float().requires_grad_()
    b32 = None if b is None else b.detach().float().requires_grad_()
    params = [t for t in (h32, W32, b32) if t is not None]
    want = grads_of(lambda: plain(h32, W32, b32, y, temperature), params, g, e)
    with torch.no_grad():
        logits = h32 @ W32.T + (0 if b32 is None else b32)              # (N, V)
        log_p = torch.log_softmax(logits / temperature, dim=-1)
        p, keep = log_p.exp(), (y != -100).float()[:, None]
        ent = -(p * log_p).sum(-1, keepdim=True)
        onehot = torch.nn.functional.one_hot(y.clamp(min=0), logits.shape[1])
        size = g.abs()[:, None] * (onehot + p)
        if e is not None:
            size += e.abs()[:, None] * p * (log_p.abs() + ent)
        size *= keep / temperature                                       # (N, V) |δ|⁺
        scales = [size @ W32.abs(), size.T @ h32.abs(), size.sum(0)]
    tol = GRAD_TOL[h.dtype]
    assert [t.dtype for t in got] == [h.dtype] * len(got)
    for name, a, w, scale in zip(("dh", "dW", "db"), got, want, scales):
        err = ((a.float() - w).abs() / (scale + 1e-30)).max().item()
        assert err <= tol, f"{name}: error {err:.2e} of the terms' size > {tol}"


def ours(impl, h, W, b, y, temperature=1.0, **kw):
    return lambda: token_logprobs(h, W, y, b, temperature, return_entropy=True, impl=impl, **kw)


# ------------------------------------------------------------------------------------ forward
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", IMPLS)
def test_forward_matches_full_log_softmax(impl, dtype):
    h, W, b, y = make_problem(77, 40, 1531, dtype)       # V spans 3 blocks of 512, last partial
    logp, ent = token_logprobs(h, W, y, b, temperature=0.7, return_entropy=True, impl=impl,
                               chunk_rows=30)
    want_logp, want_ent = plain(h, W, b, y, 0.7)
    assert logp.dtype == ent.dtype == torch.float32 and logp.shape == (77,)
    torch.testing.assert_close(logp, want_logp, atol=FWD_ATOL, rtol=0)
    torch.testing.assert_close(ent, want_ent, atol=FWD_ATOL, rtol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_ignored_rows_give_zero_and_no_gradient(impl):
    h, W, b, y = make_problem(40, 16, 300, ignore_frac=0.5)
    ignored = y == -100
    logp, ent = ours(impl, h, W, b, y)()
    assert ignored.any() and (logp[ignored] == 0).all() and (ent[ignored] == 0).all()
    assert (logp[~ignored] < 0).all()
    dh, = grads_of(ours(impl, h, W, b, y), [h], torch.randn(40), torch.randn(40))
    assert (dh[ignored] == 0).all() and (dh[~ignored] != 0).any()


# ------------------------------------------------------------------------------------ backward
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", IMPLS)
def test_gradients_for_random_per_token_upstream(impl, dtype):
    """PPO-clip / KL / entropy bonuses give every token its own ∂L/∂log p and ∂L/∂H."""
    h, W, b, y = make_problem(77, 40, 1531, dtype, seed=1)
    gen = torch.Generator().manual_seed(2)
    g, e = torch.randn(77, generator=gen) * 3, torch.rand(77, generator=gen)
    got = grads_of(ours(impl, h, W, b, y, 1.3, chunk_rows=30), [h, W, b], g, e)
    check_grads(got, h, W, b, y, 1.3, g, e)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_at_the_largest_test_size(dtype):
    """N = 256, V = 4000 (8 vocabulary blocks, the last partial), H = 64, one chunk: the size of
    a short sub-trajectory of the tiny model, all tokens supervised, temperature 0.8."""
    h, W, b, y = make_problem(256, 64, 4000, dtype, seed=12, ignore_frac=0.0)
    gen = torch.Generator().manual_seed(13)
    g, e = torch.randn(256, generator=gen), torch.randn(256, generator=gen) * 0.1
    fn = ours("triton", h, W, b, y, 0.8)
    logp, ent = fn()
    want_logp, want_ent = plain(h, W, b, y, 0.8)
    torch.testing.assert_close(logp, want_logp, atol=FWD_ATOL, rtol=0)
    torch.testing.assert_close(ent, want_ent, atol=FWD_ATOL, rtol=0)
    check_grads(grads_of(fn, [h, W, b], g, e), h, W, b, y, 0.8, g, e)


@pytest.mark.parametrize("impl", IMPLS)
def test_gradients_of_log_prob_alone(impl):
    """Without return_entropy the entropy gets no upstream gradient (the common RL call)."""
    h, W, b, y = make_problem(50, 24, 700, seed=3)
    g = torch.randn(50)
    got = torch.autograd.grad((g * token_logprobs(h, W, y, b, impl=impl)).sum(), [h, W, b])
    check_grads(got, h, W, b, y, 1.0, g)


def test_triton_equals_reference():
    h, W, b, y = make_problem(64, 32, 900, seed=4)
    g, e = torch.randn(64), torch.randn(64)
    outs = {impl: ours(impl, h, W, b, y, 0.8)() for impl in IMPLS}
    grads = {impl: grads_of(ours(impl, h, W, b, y, 0.8), [h, W, b], g, e) for impl in IMPLS}
    for a, b_ in zip(outs["triton"], outs["reference"]):
        torch.testing.assert_close(a, b_, atol=5e-6, rtol=0)
    for a, b_ in zip(grads["triton"], grads["reference"]):
        torch.testing.assert_close(a, b_, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_single_token(impl):
    h, W, b, y = make_problem(1, 7, 33, ignore_frac=0.0, seed=5)
    g = torch.tensor([-2.0])
    torch.testing.assert_close(token_logprobs(h, W, y, b, impl=impl), plain(h, W, b, y)[0],
                               atol=FWD_ATOL, rtol=0)
    check_grads(grads_of(ours(impl, h, W, b, y), [h, W, b], g), h, W, b, y, 1.0, g)


@pytest.mark.parametrize("impl", IMPLS)
def test_all_rows_ignored(impl):
    h, W, b, y = make_problem(9, 8, 50, ignore_frac=1.0)
    logp = token_logprobs(h, W, y, b, impl=impl)
    dh, dW, db = torch.autograd.grad((logp * torch.randn(9)).sum(), [h, W, b])
    assert (logp == 0).all() and (dh == 0).all() and (dW == 0).all() and (db == 0).all()


def test_gpu_launch_configuration_under_the_interpreter():
    """The GPU configuration (one row per program, 8K-wide blocks) runs the same kernel code as
    the interpreter's; run it too, on a vocabulary wider than one such block, against the
    reference's row work (statistics and δ with an entropy gradient)."""
    C, V = 6, 9000
    gen = torch.Generator().manual_seed(6)
    x, bias = torch.randn(C, V, generator=gen) * 4, torch.randn(V, generator=gen)
    y, g, e = torch.randint(0, V, (C,), generator=gen), torch.randn(C), torch.randn(C)
    gpu_config = fused_loss._launch_config(V, interpreted=False)
    assert gpu_config[:2] == (1, 8192)
    results = []
    for run in (fused_loss._rows_reference,
                lambda work: fused_loss._rows_triton(work, config=gpu_config)):
        lse, ent, logp = torch.empty(3, C).unbind(0)
        delta = torch.empty(C, V)
        run(fused_loss.RowWork(x.clone(), bias, y, 0.9, lse, ent, logp, compute_stats=True,
                               entropy=True, g=g, e=e, delta=delta))
        results.append((lse, ent, logp, delta))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------ SFT path
@pytest.mark.parametrize("impl", IMPLS)
def test_weighted_sum_equals_token_path(impl):
    """The SFT path (gradients in the forward) equals Σ w log p and the RL path's gradients with
    g = w, scaled by the upstream scalar; ∂/∂w = log p."""
    h, W, b, y = make_problem(60, 24, 800, seed=7)
    w = torch.rand(60).requires_grad_()
    loss = weighted_logprob_sum(h, W, y, w, b, temperature=0.9, impl=impl, chunk_rows=25)
    logp = token_logprobs(h, W, y, b, temperature=0.9, impl=impl)
    torch.testing.assert_close(loss, (w * logp).sum(), atol=1e-4, rtol=1e-6)
    got = torch.autograd.grad(-3.0 * loss, [h, W, b, w])
    check_grads(got[:3], h, W, b, y, 0.9, -3.0 * w.detach())
    torch.testing.assert_close(got[3], -3.0 * logp.detach(), atol=1e-5, rtol=0)


def test_weighted_sum_under_no_grad_computes_no_gradients():
    """Evaluation calls (torch.no_grad) take the forward-only path: no dW-sized allocation."""
    N, H, V = 30, 16, 200
    h, W, b, y = make_problem(N, H, V, seed=11)
    with torch.no_grad(), _LargestAllocation() as mode:
        loss = weighted_logprob_sum(h, W, y, torch.ones(N), b, impl="reference", chunk_rows=4)
    torch.testing.assert_close(loss, plain(h, W, b, y)[0].sum().detach(), atol=1e-4, rtol=1e-6)
    assert mode.largest < V * H


def test_liger_fused_linear_cross_entropy_agrees():
    """Anchor: Liger's fused linear CE (reduction='none') is -log p, and its gradients for a
    random per-token upstream gradient equal ours."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    h, W, _, y = make_problem(64, 32, 500, bias=False, seed=8)
    g = torch.randn(64)
    ce = LigerFusedLinearCrossEntropyLoss(reduction="none")(W, h, y)
    want = torch.autograd.grad((g * ce).sum(), [h, W])
    logp = token_logprobs(h, W, y, impl="triton")
    torch.testing.assert_close(logp, -ce, atol=1e-5, rtol=0)
    for got, liger in zip(torch.autograd.grad((-g * logp).sum(), [h, W]), want):
        torch.testing.assert_close(got, liger, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------ properties
@given(fused_loss_cases())
def test_any_shape_matches_full_log_softmax(case):
    dtype = getattr(torch, case["dtype"])
    h, W, b, y = make_problem(case["n"], case["h"], case["v"], dtype, seed=case["seed"],
                              ignore_frac=case["ignore_frac"], bias=case["bias"])
    gen = torch.Generator().manual_seed(case["seed"])
    g = torch.randn(case["n"], generator=gen)
    e = torch.randn(case["n"], generator=gen) if case["entropy"] else None
    fn = ours("triton", h, W, b, y, case["temperature"], chunk_rows=case["chunk_rows"])
    logp, ent = fn()
    want_logp, want_ent = plain(h, W, b, y, case["temperature"])
    torch.testing.assert_close(logp, want_logp, atol=FWD_ATOL, rtol=0)
    torch.testing.assert_close(ent, want_ent, atol=FWD_ATOL, rtol=0)
    if case["ignore_frac"] < 1.0:
        check_grads(grads_of(fn, [h, W, b], g, e), h, W, b, y, case["temperature"], g, e)


@pytest.mark.parametrize("impl", IMPLS)
def test_large_logits_stay_finite_and_exact(impl):
    """The online softmax is shift-invariant: logits around ±3000 give the same log-probs."""
    h, W, _, y = make_problem(20, 8, 300, ignore_frac=0.0, bias=False, seed=9)
    b = torch.full((300,), 3000.0)
    b[::2] = -3000.0
    logp, ent = ours(impl, h, W, b, y)()
    want_logp, want_ent = plain(h, W, b, y, dtype=torch.float64)
    assert torch.isfinite(logp).all() and torch.isfinite(ent).all()
    torch.testing.assert_close(logp.double(), want_logp, atol=1e-3, rtol=0)
    torch.testing.assert_close(ent.double(), want_ent, atol=1e-3, rtol=0)


class _LargestAllocation(TorchDispatchMode):
    """Records the largest number of elements of any new tensor an aten op returns (views,
    in-place ops and the interpreter's storage copies alias their input: not allocations)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if all(r.alias_info is None for r in func._schema.returns):
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("impl", IMPLS)
def test_never_allocates_full_logits(impl):
    """Forward and backward never create a tensor of [N, V] elements: the largest is one chunk
    of logits [C, V] (or a parameter-sized dW [V, H])."""
    N, H, V, C = 96, 16, 400, 20
    h, W, b, y = make_problem(N, H, V, seed=10)
    with _LargestAllocation() as mode:
        logp, ent = token_logprobs(h, W, y, b, return_entropy=True, impl=impl, chunk_rows=C)
        torch.autograd.grad((logp + ent).sum(), [h, W, b])
        weighted_logprob_sum(h, W, y, torch.ones(N), b, impl=impl, chunk_rows=C).backward()
    assert mode.largest <= max(C * V, V * H) < N * V


# ------------------------------------------------------------------------------------ switch
def test_switch_argument_wins_over_environment(monkeypatch):
    monkeypatch.delenv(fused_loss.KERNEL_ENV, raising=False)
    assert backend("auto", "cpu") == "reference" and backend("auto", "cuda") == "triton"
    monkeypatch.setenv(fused_loss.KERNEL_ENV, "triton")
    assert backend("auto", "cpu") == "triton" and backend("reference", "cpu") == "reference"
    monkeypatch.setenv(fused_loss.KERNEL_ENV, "reference")
    assert backend("auto", "cuda") == "reference" and backend("triton", "cuda") == "triton"
    monkeypatch.setenv(fused_loss.KERNEL_ENV, "fast")
    with pytest.raises(ValueError, match="KLONG_KERNELS='fast'"):
        backend()


def test_environment_switch_reaches_the_call(monkeypatch):
    """An impl='auto' call on CPU tensors follows KLONG_KERNELS to the row function it runs."""
    h, W, b, y = make_problem(10, 8, 40)
    monkeypatch.setenv(fused_loss.KERNEL_ENV, "triton")
    assert fused_loss._check(h, W, y, b, 1.0, -100, "auto") is fused_loss._rows_triton
    monkeypatch.setenv(fused_loss.KERNEL_ENV, "reference")
    assert fused_loss._check(h, W, y, b, 1.0, -100, "auto") is fused_loss._rows_reference
    assert fused_loss._check(h, W, y, b, 1.0, -100, "triton") is fused_loss._rows_triton


@pytest.mark.parametrize("bad, message", [
    (dict(targets=torch.tensor([0, 50])), r"targets must lie in \[0, V=50\)"),
    (dict(targets=torch.tensor([0.0, 1.0])), "integer tensor of shape"),
    (dict(bias=torch.zeros(49)), r"bias must be \[V\]"),
    (dict(temperature=0.0), "temperature must be > 0"),
    (dict(weight=torch.zeros(50, 9)), "h must be"),
    (dict(weight=torch.zeros(50, 8, dtype=torch.bfloat16)), "share a dtype"),
])
def test_bad_arguments_say_what_was_expected(bad, message):
    args = dict(h=torch.zeros(2, 8), weight=torch.zeros(50, 8), targets=torch.tensor([0, 1]))
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        token_logprobs(**args, impl="reference")
