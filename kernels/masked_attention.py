"""Masked sub-trajectory attention: the K sub-trajectories of one trajectory share the prefix p.

Beyond the paper (docs/ARCHITECTURE.md, "Packing with a shared prefix"; docs/KERNELS.md §2). KLong splits a
long trajectory into K sub-trajectories [p Cᵢ Wᵢ] that all start with the same pinned prefix p
(task + paper). Trained as K separate sequences, p is encoded K times. Packed as one row

    [p | C₁W₁ | C₂W₂ | … | C_KW_K]        token j carries doc[j] and seg[j] (seg 0 = the prefix p)

with the attention rule

    allowed(q, k)  =  k ≤ q  and  doc[k] = doc[q]  and  (seg[k] = seg[q]  or  seg[k] = 0)

and positions 0…|p|−1 on p, each segment continuing from |p|, every token of segment i sees
exactly what it sees in the separate sequence [p Cᵢ Wᵢ], so the logits, the loss and the
gradients are those of the K separate sequences, while p is computed once. Several documents
(trajectories) may share a row: `doc` keeps them apart.

Attention (per batch row b, query head h, with kv head h // G for grouped-query attention):

    s_qk = scale · ⟨q_q, k_k⟩         (scale = D^-½ unless given)
    P   = softmax over k of s, restricted to allowed(q, k)
    o_q = Σₖ P_qk v_k

computed flash-attention style (online softmax, never materialising [S, S]) in base 2:
s' = s·log₂e, m = running max, l = Σ 2^(s'−m), lse₂ = m + log₂ l, stored for the backward.
Backward (FlashAttention-2): Δ_q = ⟨o_q, dO_q⟩, P_qk = 2^(s'_qk − lse₂_q),
dV_k = Σ_q P_qk dO_q, dS_qk = P_qk (⟨dO_q, v_k⟩ − Δ_q), dQ_q = scale Σ_k dS_qk k_k,
dK_k = scale Σ_q dS_qk q_q. For a prefix key, the Σ_q runs over the prefix and every segment that
sees it: the prefix's dK/dV sum the contributions of all K segments.

Tile classes. The [S, S] grid is cut into tiles of block_q queries × block_k keys. Once per batch
(`tile_plan`, cached for the same doc/seg tensors), each tile is classified from per-tile ranges
of positions, doc ids and seg ids:
    SKIP     no pair can be allowed: keys after all queries, disjoint doc ranges, or segment i × j
             with no prefix key in the tile. Skipped tiles are never visited (not even loaded).
    FULL     every pair is allowed: keys before all queries, one doc, and the keys are all prefix
             or all the queries' own segment. No mask work.
    PARTIAL  anything else (diagonal tiles, boundaries, the ragged last tile): the rule above is
             evaluated element-wise.
Each query tile gets the ascending list of key tiles it visits (and each key tile the list of
query tiles that see it, for dK/dV), like FlexAttention's block masks. The classification is
conservative (a tile it cannot prove FULL or SKIP is PARTIAL), so it is exact for any ids.

Switch: `impl` = "triton" | "reference" | "auto"; "auto" reads the environment variable
KLONG_KERNELS (auto | triton | reference) and, if that is auto too, takes Triton on CUDA tensors,
the reference elsewhere. On CPU the Triton kernels run only under TRITON_INTERPRET=1 (tests).

Two pure-PyTorch versions, both SDPA with explicit boolean masks:
- `dense_reference_attention`: one SDPA call with the whole [B, 1, S, S] mask: the definition,
  the tests' oracle, the benchmark's dense anchor. It pays for all S² pairs, so on CPU a packed
  row would cost more attention than the K separate sequences.
- `reference_attention` (impl="reference", what runs on CPU): one SDPA call per run of equal
  (doc, seg) ids (short neighbouring runs share one), over only the keys those rows may see (their
  document's prefix and themselves) with that block's boolean mask. p's keys are gathered into
  every segment's call, so autograd sums their dK/dV over the segments; p's own rows are computed
  once. Work ≈ the visible pairs.

Hugging Face wiring (`register_hf`): registers `hf_attention_forward` under the attention
implementation key "klong_prefix". transformers hands every extra keyword argument of
`model(...)` down to the attention function, so the caller passes `doc_ids=` and `seg_ids=`
([B, S] integer tensors) with `position_ids=` (as above) and no `attention_mask`. Because
"klong_prefix" has no mask function in transformers' AttentionMaskInterface, the model builds no
[S, S] mask at all. Padding: give pad tokens their own doc id (they then see only themselves) and
label them -100 (a 2D attention_mask is dropped by transformers for this key; a 4D one is refused).
Loss: do not pass `labels=` (transformers would shift them across segment boundaries); use
targets already shifted within each sub-trajectory (split.pack), or `shift_labels=`.

Departures: head dims must be powers of two in 16…256; no dropout, no sliding window, no KV
cache (training-time attention; generation uses "sdpa"); fp32 inputs use exact fp32 dots
(input_precision="ieee"), not TF32.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

# Dimension letters: B batch rows, Hq query heads, Hkv key/value heads (G = Hq / Hkv), S packed
# length, D head dim; nQ / nK number of query / key tiles.

SKIP, PARTIAL, FULL = 0, 1, 2
HF_KEY = "klong_prefix"
IMPLS = ("auto", "triton", "reference")


# ---------------------------------------------------------------------------------------------
# The mask and the reference
# ---------------------------------------------------------------------------------------------

def allowed(doc: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """The attention rule as a dense boolean mask: [..., S] ids -> [..., S(q), S(k)].

    allowed[q, k] = k ≤ q and doc[k] = doc[q] and (seg[k] = seg[q] or seg[k] = 0).
    """
    if doc.shape != seg.shape:
        raise ValueError(f"masked_attention.allowed: doc {tuple(doc.shape)} and seg "
                         f"{tuple(seg.shape)} must have the same shape [..., S]")
    S = doc.shape[-1]
    pos = torch.arange(S, device=doc.device)
    causal = pos[None, :] <= pos[:, None]                                  # (S, S)
    same_doc = doc[..., None, :] == doc[..., :, None]                      # (..., S, S)
    seen_seg = (seg[..., None, :] == seg[..., :, None]) | (seg[..., None, :] == 0)
    return causal & same_doc & seen_seg


def dense_reference_attention(q, k, v, doc, seg, scale: float | None = None) -> torch.Tensor:
    """Pure PyTorch, the definition: SDPA with the explicit boolean mask [B, 1, S, S]. Same
    contract as `masked_attention`."""
    mask = allowed(doc, seg)[:, None]                                      # (B, 1, S, S)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


MERGE_PAIRS = 4096  # reference path: one more SDPA call costs about as much as this many pairs


def reference_attention(q, k, v, doc, seg, scale: float | None = None) -> torch.Tensor:
    """Pure PyTorch: SDPA per group of consecutive (doc, seg) runs, over the keys it may see.

    For a run R of ids (d, s), the keys K_R = {j < end of R : doc[j] = d and (seg[j] = s or
    seg[j] = 0)} (a prefix run, s = 0, gets p only); allowed() restricted to the rows of R is
    False outside K_R. Consecutive runs share one call (rows G = ∪R, keys K_G = ∪K_R, mask =
    allowed on G × K_G) when that costs at most MERGE_PAIRS more pairs than two calls and both
    are alike: self-contained (no key before their first row: a prefix, a document without
    segments, a padding token that is its own document) or both not (segments). So padding and
    one-token segments do not cost one call each, while p and segments of realistic lengths get
    a call each. Same contract as `masked_attention`.
    """
    B, S = doc.shape
    gqa = q.shape[1] != k.shape[1]
    pos = torch.arange(S, device=doc.device)
    rows = []
    for b in range(B):
        d, s = doc[b], seg[b]
        starts = torch.nonzero((d[1:] != d[:-1]) | (s[1:] != s[:-1])).flatten() + 1
        bounds = [0] + starts.tolist() + [S]
        groups = []                                     # [first row, end row, key mask over S]
        for a, e in zip(bounds[:-1], bounds[1:]):
            keys = (d == d[a]) & ((s == s[a]) | (s == 0)) & (pos < e)         # (S,) K_R
            if groups:
                g0, g1, g_keys = groups[-1]
                union = g_keys | keys
                merged = (e - g0) * int(union.sum())
                separate = (g1 - g0) * int(g_keys.sum()) + (e - a) * int(keys.sum())
                alike = bool(g_keys[:g0].any()) == bool(keys[:a].any())
                if alike and merged <= separate + MERGE_PAIRS:
                    groups[-1] = [g0, e, union]
                    continue
            groups.append([a, e, keys])
        outs = []
        for a, e, keys in groups:
            kj = torch.nonzero(keys).flatten()                                  # (|K_G|,) key positions
            qd, qs = d[a:e, None], s[a:e, None]                                 # (|G|, 1)
            mask = (kj <= pos[a:e, None]) & (d[kj] == qd) & ((s[kj] == qs) | (s[kj] == 0))
            outs.append(F.scaled_dot_product_attention(
                q[b:b + 1, :, a:e], k[b:b + 1, :, kj], v[b:b + 1, :, kj],
                attn_mask=mask, scale=scale, enable_gqa=gqa))                  # (1, Hq, |G|, D)
        rows.append(torch.cat(outs, dim=2))
    return torch.cat(rows, dim=0)                                          # (B, Hq, S, D)


# ---------------------------------------------------------------------------------------------
# Tile classification (once per batch)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TilePlan:
    """Which key tiles each query tile visits, and the transpose, for one doc/seg layout."""
    block_q: int
    block_k: int
    doc: torch.Tensor       # [B, S] int32, contiguous (what the kernels read)
    seg: torch.Tensor       # [B, S] int32
    cls: torch.Tensor       # [B, nQ, nK] int8: SKIP / PARTIAL / FULL
    kv_count: torch.Tensor  # [B, nQ] int32: number of key tiles query tile m visits
    kv_index: torch.Tensor  # [B, nQ, nK] int32: those key tiles, ascending, then the skipped ones
    kv_full: torch.Tensor   # [B, nQ, nK] int8: 1 where that visited tile is FULL
    q_count: torch.Tensor   # [B, nK] int32: number of query tiles that see key tile n
    q_index: torch.Tensor   # [B, nK, nQ] int32
    q_full: torch.Tensor    # [B, nK, nQ] int8


def _tiles(x: torch.Tensor, block: int) -> torch.Tensor:
    """[B, S] -> [B, n, block], the ragged last tile padded by repeating the last id (adds no
    new id, so per-tile min/max stay exact)."""
    B, S = x.shape
    pad = -S % block
    if pad:
        x = torch.cat([x, x[:, -1:].expand(B, pad)], dim=1)
    return x.view(B, -1, block)


def classify_tiles(doc: torch.Tensor, seg: torch.Tensor, block_q: int, block_k: int) -> torch.Tensor:
    """[B, S] ids -> [B, nQ, nK] int8 tile classes (SKIP 0, PARTIAL 1, FULL 2), from per-tile
    ranges only (O(B·nQ·nK), never O(S²)). Sound for any integer ids: SKIP tiles hold no allowed
    pair, FULL tiles only allowed pairs."""
    B, S = doc.shape
    dev = doc.device
    q_lo = torch.arange(0, S, block_q, device=dev)                         # (nQ,) first position
    k_lo = torch.arange(0, S, block_k, device=dev)                         # (nK,)
    q_hi = (q_lo + block_q).clamp(max=S) - 1                               # last position
    k_hi = (k_lo + block_k).clamp(max=S) - 1
    q_whole = (q_lo + block_q <= S)[None, :, None]                         # (1, nQ, 1)
    k_whole = (k_lo + block_k <= S)[None, None, :]                         # (1, 1, nK)

    dq, sq = _tiles(doc, block_q), _tiles(seg, block_q)                    # (B, nQ, block_q)
    dk, sk = _tiles(doc, block_k), _tiles(seg, block_k)                    # (B, nK, block_k)
    Q = lambda t: t[:, :, None]                                            # noqa: E731  (B, nQ, 1)
    K = lambda t: t[:, None, :]                                            # noqa: E731  (B, 1, nK)
    dq_min, dq_max, sq_min, sq_max = dq.amin(-1), dq.amax(-1), sq.amin(-1), sq.amax(-1)
    dk_min, dk_max, sk_min, sk_max = dk.amin(-1), dk.amax(-1), sk.amin(-1), sk.amax(-1)
    k_prefix = sk == 0
    k_any_prefix, k_all_prefix = k_prefix.any(-1), k_prefix.all(-1)        # (B, nK)
    big = torch.iinfo(sk.dtype).max
    sk_nz_min = sk.masked_fill(k_prefix, big).amin(-1)                     # non-prefix seg range
    sk_nz_max = sk.masked_fill(k_prefix, -big).amax(-1)

    # SKIP: keys all after the queries, or no shared doc, or no shared segment and no prefix key
    after = k_lo[None, None, :] > q_hi[None, :, None]
    other_doc = (K(dk_max) < Q(dq_min)) | (K(dk_min) > Q(dq_max))
    other_seg = ~K(k_any_prefix) & ((K(sk_max) < Q(sq_min)) | (K(sk_min) > Q(sq_max)))
    skip = after | other_doc | other_seg
    # FULL: keys all at or before the first query, one doc, keys all prefix or all the queries'
    # single segment
    before = k_hi[None, None, :] <= q_lo[None, :, None]
    one_doc = (Q(dq_min) == Q(dq_max)) & (K(dk_min) == K(dk_max)) & (K(dk_min) == Q(dq_min))
    own_seg = (Q(sq_min) == Q(sq_max)) & (K(sk_nz_min) == Q(sq_min)) & (K(sk_nz_max) == Q(sq_min))
    full = before & one_doc & (K(k_all_prefix) | own_seg) & q_whole & k_whole
    cls = torch.full(skip.shape, PARTIAL, dtype=torch.int8, device=dev)
    return cls.masked_fill_(full, FULL).masked_fill_(skip, SKIP)


def _visit_lists(cls: torch.Tensor):
    """[B, R, C] classes -> per row: count [B, R], the visited columns ascending [B, R, C]
    (skipped ones after them), and whether each is FULL [B, R, C]."""
    visible = cls != SKIP
    index = torch.sort((~visible).to(torch.uint8), dim=-1, stable=True).indices
    full = torch.gather(cls, -1, index) == FULL
    return (visible.sum(-1, dtype=torch.int32), index.to(torch.int32).contiguous(),
            full.to(torch.int8).contiguous())


def make_plan(doc: torch.Tensor, seg: torch.Tensor, block_q: int, block_k: int) -> TilePlan:
    """Classify the tiles of one batch and build both visit lists."""
    doc32 = doc.to(torch.int32).contiguous()
    seg32 = seg.to(torch.int32).contiguous()
    cls = classify_tiles(doc32, seg32, block_q, block_k)
    kv_count, kv_index, kv_full = _visit_lists(cls)
    q_count, q_index, q_full = _visit_lists(cls.transpose(1, 2))
    return TilePlan(block_q, block_k, doc32, seg32, cls, kv_count, kv_index, kv_full,
                    q_count, q_index, q_full)


_last_plans: dict = {}  # (block_q, block_k) -> (doc, seg, versions, TilePlan) of the last batch


def tile_plan(doc: torch.Tensor, seg: torch.Tensor, block_q: int, block_k: int) -> TilePlan:
    """`make_plan`, cached for the last batch: every layer of a model forward (and its
    backward) passes the same doc/seg tensors, so the tiles are classified once per batch.
    The cache holds the tensors themselves (identity + in-place version counter), so a freed
    tensor's address can never be mistaken for a new batch."""
    key = (block_q, block_k)
    hit = _last_plans.get(key)
    versions = (doc._version, seg._version)
    if hit is not None and hit[0] is doc and hit[1] is seg and hit[2] == versions:
        return hit[3]
    plan = make_plan(doc, seg, block_q, block_k)
    _last_plans[key] = (doc, seg, versions, plan)
    return plan


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _allowed(pos_q, pos_k, doc_q, doc_k, seg_q, seg_k, S):
    """The rule on a tile, for broadcastable pieces (rows × columns in either role)."""
    rule = (pos_k <= pos_q) & (doc_k == doc_q) & ((seg_k == seg_q) | (seg_k == 0))
    return rule & (pos_q < S) & (pos_k < S)


@triton.jit
def _fwd_kernel(
    Q, K, V,                 # q [B, Hq, S, D]; k, v [B, Hkv, S, D] (last dim contiguous)
    O, LSE,                  # out: o like q; lse₂ [B, Hq, S] fp32
    DOC, SEG,                # [B, S] int32
    COUNT, INDEX, FULL_,     # plan: [B, nQ], [B, nQ, nK], [B, nQ, nK]
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_os,
    S, n_q_tiles, n_k_tiles, qk_scale,           # qk_scale = scale · log₂e
    HQ: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    m = tl.program_id(0)                          # query tile
    bh = tl.program_id(1)
    b = bh // HQ
    h = bh % HQ
    hk = h // GROUP                               # grouped-query attention: shared kv head
    b64 = b.to(tl.int64)
    Q += b64 * stride_qb + h.to(tl.int64) * stride_qh
    K += b64 * stride_kb + hk.to(tl.int64) * stride_kh
    V += b64 * stride_vb + hk.to(tl.int64) * stride_vh
    O += b64 * stride_ob + h.to(tl.int64) * stride_oh

    offs_m = m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    in_q = offs_m < S
    q = tl.load(Q + offs_m[:, None] * stride_qs + offs_d[None, :], mask=in_q[:, None], other=0.0)
    doc_q = tl.load(DOC + b * S + offs_m, mask=in_q, other=-1)
    seg_q = tl.load(SEG + b * S + offs_m, mask=in_q, other=-1)

    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)    # running max of s' (finite: see masked rows)
    l_i = tl.zeros([BLOCK_M], tl.float32)             # running Σ 2^(s' − m)
    acc = tl.zeros([BLOCK_M, D], tl.float32)          # running Σ 2^(s' − m) v

    row = b * n_q_tiles + m
    count = tl.load(COUNT + row)
    for i in range(0, count):
        n = tl.load(INDEX + row * n_k_tiles + i)
        is_full = tl.load(FULL_ + row * n_k_tiles + i)
        offs_n = n * BLOCK_N + tl.arange(0, BLOCK_N)
        in_k = offs_n < S
        k = tl.load(K + offs_n[:, None] * stride_ks + offs_d[None, :], mask=in_k[:, None], other=0.0)
        v = tl.load(V + offs_n[:, None] * stride_vs + offs_d[None, :], mask=in_k[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale   # (BLOCK_M, BLOCK_N)
        if is_full == 0:  # PARTIAL tile: evaluate the rule
            doc_k = tl.load(DOC + b * S + offs_n, mask=in_k, other=-2)
            seg_k = tl.load(SEG + b * S + offs_n, mask=in_k, other=-2)
            ok = _allowed(offs_m[:, None], offs_n[None, :], doc_q[:, None], doc_k[None, :],
                          seg_q[:, None], seg_k[None, :], S)
            s = tl.where(ok, s, float("-inf"))
        # online softmax: m_new = max(m, rowmax s'), rescale the old sums by 2^(m − m_new)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    l_i = tl.where(in_q, l_i, 1.0)                 # every row sees itself: l_i > 0 (rows past S: 0)
    o = acc / l_i[:, None]
    tl.store(O + offs_m[:, None] * stride_os + offs_d[None, :], o.to(O.dtype.element_ty),
             mask=in_q[:, None])
    tl.store(LSE + bh.to(tl.int64) * S + offs_m, m_i + tl.log2(l_i), mask=in_q)


@triton.jit
def _bwd_delta_kernel(
    O, DO, DELTA,            # o, dO [B, Hq, S, D]; out: Δ [B, Hq, S] fp32
    stride_ob, stride_oh, stride_os, stride_db, stride_dh, stride_ds,
    S, HQ: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // HQ).to(tl.int64)
    h = (bh % HQ).to(tl.int64)
    offs_m = m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    in_q = offs_m < S
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :],
                mask=in_q[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_db + h * stride_dh + offs_m[:, None] * stride_ds + offs_d[None, :],
                 mask=in_q[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * S + offs_m, tl.sum(o * do, 1), mask=in_q)   # Δ = ⟨o, dO⟩


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO,             # q, dO [B, Hq, S, D]; k, v [B, Hkv, S, D]
    LSE, DELTA,              # [B, Hq, S] fp32
    DK, DV,                  # out: [B, Hkv, S, D], contiguous
    DOC, SEG,                # [B, S] int32
    COUNT, INDEX, FULL_,     # plan transpose: [B, nK], [B, nK, nQ], [B, nK, nQ]
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs, stride_db, stride_dh, stride_ds,
    S, n_q_tiles, n_k_tiles, qk_scale, scale,
    HKV: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    n = tl.program_id(0)                          # key tile
    bh = tl.program_id(1)
    b = bh // HKV
    hk = bh % HKV
    b64 = b.to(tl.int64)
    offs_n = n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    in_k = offs_n < S
    kv_rows = offs_n[:, None] * stride_ks + offs_d[None, :]
    k = tl.load(K + b64 * stride_kb + hk.to(tl.int64) * stride_kh + kv_rows, mask=in_k[:, None], other=0.0)
    v = tl.load(V + b64 * stride_vb + hk.to(tl.int64) * stride_vh
                + offs_n[:, None] * stride_vs + offs_d[None, :], mask=in_k[:, None], other=0.0)
    doc_k = tl.load(DOC + b * S + offs_n, mask=in_k, other=-2)
    seg_k = tl.load(SEG + b * S + offs_n, mask=in_k, other=-2)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)

    row = b * n_k_tiles + n
    count = tl.load(COUNT + row)
    for g in range(GROUP):                        # every query head that reads this kv head
        h = (hk * GROUP + g).to(tl.int64)
        Qh = Q + b64 * stride_qb + h * stride_qh
        DOh = DO + b64 * stride_db + h * stride_dh
        stats = (b64 * HKV * GROUP + h) * S       # offset of LSE / DELTA rows of (b, h)
        for i in range(0, count):                 # the query tiles that see this key tile
            m = tl.load(INDEX + row * n_q_tiles + i)
            is_full = tl.load(FULL_ + row * n_q_tiles + i)
            offs_m = m * BLOCK_M + tl.arange(0, BLOCK_M)
            in_q = offs_m < S
            q = tl.load(Qh + offs_m[:, None] * stride_qs + offs_d[None, :], mask=in_q[:, None], other=0.0)
            do = tl.load(DOh + offs_m[:, None] * stride_ds + offs_d[None, :], mask=in_q[:, None], other=0.0)
            lse = tl.load(LSE + stats + offs_m, mask=in_q, other=0.0)
            delta = tl.load(DELTA + stats + offs_m, mask=in_q, other=0.0)
            sT = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale   # (BLOCK_N, BLOCK_M)
            if is_full == 0:
                doc_q = tl.load(DOC + b * S + offs_m, mask=in_q, other=-1)
                seg_q = tl.load(SEG + b * S + offs_m, mask=in_q, other=-1)
                ok = _allowed(offs_m[None, :], offs_n[:, None], doc_q[None, :], doc_k[:, None],
                              seg_q[None, :], seg_k[:, None], S)
                sT = tl.where(ok, sT, float("-inf"))
            pT = tl.exp2(sT - lse[None, :])                                  # Pᵀ
            dv += tl.dot(pT.to(do.dtype), do, input_precision=PRECISION)    # dV = Pᵀ dO
            dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)        # (dO Vᵀ)ᵀ
            dsT = pT * (dpT - delta[None, :])                                # dSᵀ = Pᵀ ∘ (dPᵀ − Δ)
            dk += tl.dot(dsT.to(q.dtype), q, input_precision=PRECISION)     # dK = dSᵀ Q (· scale)

    out = b64 * HKV * S * D + hk.to(tl.int64) * S * D + offs_n[:, None] * D + offs_d[None, :]
    tl.store(DK + out, (dk * scale).to(DK.dtype.element_ty), mask=in_k[:, None])
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=in_k[:, None])


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO,             # q, dO [B, Hq, S, D]; k, v [B, Hkv, S, D]
    LSE, DELTA,              # [B, Hq, S] fp32
    DQ,                      # out: [B, Hq, S, D], contiguous
    DOC, SEG,                # [B, S] int32
    COUNT, INDEX, FULL_,     # plan: [B, nQ], [B, nQ, nK], [B, nQ, nK]
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs, stride_db, stride_dh, stride_ds,
    S, n_q_tiles, n_k_tiles, qk_scale, scale,
    HQ: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    m = tl.program_id(0)                          # query tile
    bh = tl.program_id(1)
    b = bh // HQ
    h = bh % HQ
    hk = h // GROUP
    b64 = b.to(tl.int64)
    K += b64 * stride_kb + hk.to(tl.int64) * stride_kh
    V += b64 * stride_vb + hk.to(tl.int64) * stride_vh
    offs_m = m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    in_q = offs_m < S
    q = tl.load(Q + b64 * stride_qb + h.to(tl.int64) * stride_qh + offs_m[:, None] * stride_qs
                + offs_d[None, :], mask=in_q[:, None], other=0.0)
    do = tl.load(DO + b64 * stride_db + h.to(tl.int64) * stride_dh + offs_m[:, None] * stride_ds
                 + offs_d[None, :], mask=in_q[:, None], other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * S + offs_m, mask=in_q, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * S + offs_m, mask=in_q, other=0.0)
    doc_q = tl.load(DOC + b * S + offs_m, mask=in_q, other=-1)
    seg_q = tl.load(SEG + b * S + offs_m, mask=in_q, other=-1)
    dq = tl.zeros([BLOCK_M, D], tl.float32)

    row = b * n_q_tiles + m
    count = tl.load(COUNT + row)
    for i in range(0, count):
        n = tl.load(INDEX + row * n_k_tiles + i)
        is_full = tl.load(FULL_ + row * n_k_tiles + i)
        offs_n = n * BLOCK_N + tl.arange(0, BLOCK_N)
        in_k = offs_n < S
        k = tl.load(K + offs_n[:, None] * stride_ks + offs_d[None, :], mask=in_k[:, None], other=0.0)
        v = tl.load(V + offs_n[:, None] * stride_vs + offs_d[None, :], mask=in_k[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if is_full == 0:
            doc_k = tl.load(DOC + b * S + offs_n, mask=in_k, other=-2)
            seg_k = tl.load(SEG + b * S + offs_n, mask=in_k, other=-2)
            ok = _allowed(offs_m[:, None], offs_n[None, :], doc_q[:, None], doc_k[None, :],
                          seg_q[:, None], seg_k[None, :], S)
            s = tl.where(ok, s, float("-inf"))
        p = tl.exp2(s - lse[:, None])                                        # P
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)             # dP = dO Vᵀ
        ds = p * (dp - delta[:, None])                                       # dS = P ∘ (dP − Δ)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)          # dQ = dS K (· scale)

    out = bh.to(tl.int64) * S * D + offs_m[:, None] * D + offs_d[None, :]
    tl.store(DQ + out, (dq * scale).to(DQ.dtype.element_ty), mask=in_q[:, None])


# ---------------------------------------------------------------------------------------------
# Launchers and autograd
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TileConfig:
    """Tile sizes and launch settings. GPU values follow the Triton flash-attention tutorial
    (not tuned here: no GPU); the interpreter uses small tiles so tests reach every tile class."""
    block_m: int        # forward: queries per tile
    block_n: int        # forward: keys per tile
    block_m_bwd: int    # backward (dK/dV and dQ kernels): queries per tile
    block_n_bwd: int    # backward: keys per tile
    num_warps: int
    num_stages: int


def tile_config(q: torch.Tensor) -> TileConfig:
    if not q.is_cuda:                                  # TRITON_INTERPRET=1
        return TileConfig(16, 16, 16, 16, 1, 1)
    D = q.shape[-1]
    if q.dtype == torch.float32:                       # 2× the bytes per element: smaller tiles
        return TileConfig(64, 32, 32, 32, 4, 2)
    return TileConfig(128, 64, 64, 64, 4 if D <= 64 else 8, 3 if D <= 64 else 2)


def _check(q, k, v, doc, seg):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"masked_attention: q, k, v must be [B, heads, S, D], got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, Hq, S, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[2] != S or k.shape[3] != D:
        raise ValueError(f"masked_attention: k {tuple(k.shape)} and v {tuple(v.shape)} must be "
                         f"[B={B}, Hkv, S={S}, D={D}] (self-attention over the packed row)")
    if Hq % k.shape[1]:
        raise ValueError(f"masked_attention: query heads {Hq} must be a multiple of kv heads {k.shape[1]}")
    if doc.shape != (B, S) or seg.shape != (B, S):
        raise ValueError(f"masked_attention: doc {tuple(doc.shape)} and seg {tuple(seg.shape)} "
                         f"must be [B={B}, S={S}]")
    if doc.dtype.is_floating_point or seg.dtype.is_floating_point:
        raise ValueError(f"masked_attention: doc/seg must be integer ids, got {doc.dtype}/{seg.dtype}")


def _check_triton(q, k, v):
    D = q.shape[-1]
    if D < 16 or D > 256 or D & (D - 1):
        raise ValueError(f"masked_attention(impl='triton'): head dim {D} must be a power of two "
                         f"in 16..256; use impl='reference'")
    floats = (torch.float32, torch.bfloat16, torch.float16)
    if q.dtype not in floats or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"masked_attention(impl='triton'): q, k, v must share a float dtype, "
                         f"got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("masked_attention(impl='triton') needs CUDA tensors, or TRITON_INTERPRET=1 "
                           "set before triton is imported; on CPU use impl='reference'")


def _last_dim_contiguous(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def _forward(q, k, v, plan: TilePlan, scale: float, cfg: TileConfig):
    B, Hq, S, D = q.shape
    o = torch.empty_like(q, memory_format=torch.contiguous_format)             # (B, Hq, S, D)
    lse = torch.empty((B, Hq, S), device=q.device, dtype=torch.float32)        # lse₂
    nQ, nK = plan.cls.shape[1], plan.cls.shape[2]
    _fwd_kernel[(nQ, B * Hq)](
        q, k, v, o, lse, plan.doc, plan.seg, plan.kv_count, plan.kv_index, plan.kv_full,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        S, nQ, nK, scale * math.log2(math.e),
        HQ=Hq, GROUP=Hq // k.shape[1], D=D, BLOCK_M=plan.block_q, BLOCK_N=plan.block_k,
        PRECISION=_precision(q), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return o, lse


def _backward(do, q, k, v, o, lse, plan: TilePlan, scale: float, cfg: TileConfig):
    B, Hq, S, D = q.shape
    Hkv = k.shape[1]
    do = _last_dim_contiguous(do)
    delta = torch.empty_like(lse)                                              # Δ (B, Hq, S)
    _bwd_delta_kernel[(triton.cdiv(S, 64), B * Hq)](
        o, do, delta, o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2),
        S, HQ=Hq, D=D, BLOCK_M=64)
    dq = torch.empty((B, Hq, S, D), device=q.device, dtype=q.dtype)
    dk = torch.empty((B, Hkv, S, D), device=q.device, dtype=k.dtype)
    dv = torch.empty((B, Hkv, S, D), device=q.device, dtype=v.dtype)
    nQ, nK = plan.cls.shape[1], plan.cls.shape[2]
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2))
    meta = dict(GROUP=Hq // Hkv, D=D, BLOCK_M=plan.block_q, BLOCK_N=plan.block_k,
                PRECISION=_precision(q), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    qk_scale = scale * math.log2(math.e)
    _bwd_dkdv_kernel[(nK, B * Hkv)](
        q, k, v, do, lse, delta, dk, dv, plan.doc, plan.seg, plan.q_count, plan.q_index, plan.q_full,
        *strides, S, nQ, nK, qk_scale, scale, HKV=Hkv, **meta)
    _bwd_dq_kernel[(nQ, B * Hq)](
        q, k, v, do, lse, delta, dq, plan.doc, plan.seg, plan.kv_count, plan.kv_index, plan.kv_full,
        *strides, S, nQ, nK, qk_scale, scale, HQ=Hq, **meta)
    return dq, dk, dv


def _precision(q):
    return "ieee" if q.dtype == torch.float32 else "tf32"   # "tf32" is ignored for 16-bit inputs


class _MaskedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, doc, seg, scale):
        q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
        cfg = tile_config(q)
        plan = tile_plan(doc, seg, cfg.block_m, cfg.block_n)
        o, lse = _forward(q, k, v, plan, scale, cfg)
        ctx.save_for_backward(q, k, v, o, lse, doc, seg)   # autograd flags in-place edits of doc/seg
        ctx.scale, ctx.cfg = scale, cfg
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, doc, seg = ctx.saved_tensors
        cfg = ctx.cfg
        plan = tile_plan(doc, seg, cfg.block_m_bwd, cfg.block_n_bwd)
        dq, dk, dv = _backward(do, q, k, v, o, lse, plan, ctx.scale, cfg)
        return dq, dk, dv, None, None, None


def resolve_impl(impl: str, device: torch.device) -> str:
    """The argument wins; "auto" defers to KLONG_KERNELS, then to the device."""
    if impl not in IMPLS:
        raise ValueError(f"masked_attention: impl={impl!r}, expected one of {IMPLS}")
    if impl == "auto":
        impl = os.environ.get("KLONG_KERNELS", "auto")
        if impl not in IMPLS:
            raise ValueError(f"environment KLONG_KERNELS={impl!r}, expected one of {IMPLS}")
    if impl == "auto":
        impl = "triton" if device.type == "cuda" else "reference"
    return impl


def masked_attention(q, k, v, doc, seg, scale: float | None = None, impl: str = "auto") -> torch.Tensor:
    """Shared-prefix packed attention.

    q [B, Hq, S, D]; k, v [B, Hkv, S, D] with Hq a multiple of Hkv (GQA); doc, seg int [B, S]
    (seg 0 = the shared prefix). Returns o [B, Hq, S, D] in q's dtype. Differentiable in q, k, v.
    scale defaults to D^-½. impl: "auto" | "triton" | "reference" (see the module docstring).
    """
    _check(q, k, v, doc, seg)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if resolve_impl(impl, q.device) == "reference":
        return reference_attention(q, k, v, doc, seg, scale)
    _check_triton(q, k, v)
    return _MaskedAttention.apply(q, k, v, doc, seg, scale)


# ---------------------------------------------------------------------------------------------
# Hugging Face wiring
# ---------------------------------------------------------------------------------------------

def hf_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                         doc_ids=None, seg_ids=None, sliding_window=None, **kwargs):
    """transformers attention interface: query [B, Hq, S, D], key/value [B, Hkv, S, D] (after
    RoPE) -> (attn_output [B, S, Hq, D], None). doc_ids / seg_ids arrive as extra kwargs of
    model(...)."""
    if doc_ids is None or seg_ids is None:
        raise ValueError(f"attention '{HF_KEY}' needs doc_ids= and seg_ids= ([B, S] ids) passed to "
                         f"model(...); for generation switch the model to 'sdpa' "
                         f"(model.set_attn_implementation('sdpa'))")
    if attention_mask is not None:
        raise ValueError(f"attention '{HF_KEY}': pass no attention_mask; doc_ids/seg_ids are the mask "
                         f"(give padding its own doc id)")
    if query.shape[2] != key.shape[2]:
        raise ValueError(f"attention '{HF_KEY}' is training-time attention over one packed row: "
                         f"{query.shape[2]} queries vs {key.shape[2]} keys (KV cache?) is not supported")
    if (dropout and module.training) or sliding_window is not None:
        raise ValueError(f"attention '{HF_KEY}': dropout={dropout} / sliding_window={sliding_window} "
                         f"are not supported")
    o = masked_attention(query, key, value, doc_ids, seg_ids, scale=scaling)   # (B, Hq, S, D)
    return o.transpose(1, 2).contiguous(), None                              # (B, S, Hq, D)


def register_hf() -> str:
    """Register `hf_attention_forward` with transformers as "klong_prefix"; returns the key.
    Use: `AutoModelForCausalLM.from_config(cfg, attn_implementation=register_hf())` or
    `model.set_attn_implementation(register_hf())`, then
    `model(input_ids, position_ids=pos, doc_ids=doc, seg_ids=seg)`."""
    from transformers import AttentionInterface
    AttentionInterface.register(HF_KEY, hf_attention_forward)
    return HF_KEY
