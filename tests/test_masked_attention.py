"""kernels/masked_attention.py: the shared-prefix mask, its tile classes, the Triton kernels
(forward and backward, under TRITON_INTERPRET=1) and the per-run reference path against the dense
SDPA definition, and tiny Hugging Face models whose packed loss and gradients equal those of the
separate sequences."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.masked_attention import (FULL, PARTIAL, SKIP, allowed, classify_tiles,
                                      dense_reference_attention, make_plan, masked_attention,
                                      reference_attention, register_hf, resolve_impl, tile_plan)
from tests.strategies import pack_layout, packed_layouts

# Tolerances, relative to the largest reference value (at least 1): fp32 kernels use exact fp32
# dots (only the summation order differs); bf16 rounds P and dS to bf16 before their products, as
# FlashAttention does.
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}


def _ids(layout):
    doc, seg = layout
    return torch.tensor(doc), torch.tensor(seg)                            # (B, S) each


def _rule(doc, seg, q, k):
    """The rule of docs/ARCHITECTURE.md, written out for one pair."""
    return k <= q and doc[k] == doc[q] and (seg[k] == seg[q] or seg[k] == 0)


def _qkv(B, Hq, Hkv, S, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda H: torch.randn(B, H, S, D, generator=g).to(dtype).requires_grad_()  # noqa: E731
    return make(Hq), make(Hkv), make(Hkv), torch.randn(B, Hq, S, D, generator=g).to(dtype)


def _assert_matches_reference(q, k, v, do, doc, seg, scale=None, impl="triton"):
    """Output and dq, dk, dv of `impl` against the dense definition run in fp32 on the same
    inputs."""
    o = masked_attention(q, k, v, doc, seg, scale=scale, impl=impl)
    grads = torch.autograd.grad(o, (q, k, v), do)
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    o_ref = dense_reference_attention(q32, k32, v32, doc, seg, scale=scale)
    grads_ref = torch.autograd.grad(o_ref, (q32, k32, v32), do.float())
    assert o.dtype == q.dtype and o.shape == q.shape
    for name, got, ref in zip(("o", "dq", "dk", "dv"), (o, *grads), (o_ref, *grads_ref)):
        err = (got.float() - ref).abs().max() / ref.abs().max().clamp(min=1.0)
        assert err <= TOL[q.dtype], f"{name}: relative error {err:.2e} > {TOL[q.dtype]:.0e}"


# --------------------------------------------------------------------------- the mask

@given(packed_layouts(max_rows=1, max_len=40))
def test_allowed_is_the_rule_of_the_architecture(layout):
    doc, seg = layout[0][0], layout[1][0]
    mask = allowed(torch.tensor(doc), torch.tensor(seg))
    S = len(doc)
    expected = torch.tensor([[_rule(doc, seg, q, k) for k in range(S)] for q in range(S)])
    assert torch.equal(mask, expected)


def test_packed_row_sees_what_each_separate_sequence_sees():
    """Token j of segment i sees exactly p and the earlier tokens of segment i."""
    doc, seg = _ids(([[0] * 12], [[0] * 5 + [1] * 3 + [2] * 4]))
    mask = allowed(doc, seg)[0]
    assert mask[9].tolist() == [True] * 5 + [False] * 3 + [True] * 2 + [False] * 2
    assert mask[4].tolist() == [True] * 5 + [False] * 7


# --------------------------------------------------------------------------- tile classes

@given(packed_layouts(max_len=96), st.sampled_from([(16, 16), (8, 16), (16, 8), (5, 7)]))
def test_tile_classes_are_sound(layout, blocks):
    """SKIP tiles hold no allowed pair, FULL tiles only allowed pairs (incl. ragged last tiles)."""
    doc, seg = _ids(layout)
    bq, bk = blocks
    cls = classify_tiles(doc, seg, bq, bk)
    mask = allowed(doc, seg)                                               # (B, S, S)
    S = doc.shape[1]
    for b, m, n in torch.nonzero(cls != PARTIAL).tolist():
        tile = mask[b, m * bq:(m + 1) * bq, n * bk:(n + 1) * bk]
        if cls[b, m, n] == SKIP:
            assert not tile.any(), (b, m, n)
        else:
            assert tile.all() and (m + 1) * bq <= S and (n + 1) * bk <= S, (b, m, n)


def test_segment_pairs_are_skipped_and_segment_prefix_tiles_are_full():
    """p of 64 tokens + 4 segments of 64, tiles of 16: segment i × segment j (i ≠ j) is never
    visited, segment × prefix needs no mask work; the prefix's key tiles are visited by every
    segment's query tiles (that is where dK/dV of p sum over segments)."""
    doc, seg = _ids(pack_layout([(64, [64, 64, 64, 64])]))
    doc, seg = doc[None], seg[None]
    plan = make_plan(doc, seg, 16, 16)
    tile_seg = seg[0, ::16]                                                # (20,) seg of each tile
    cls = plan.cls[0]
    for m in range(20):
        for n in range(20):
            sq, sk = tile_seg[m].item(), tile_seg[n].item()
            if sq != sk and sq != 0 and sk != 0:
                assert cls[m, n] == SKIP
            if sq != 0 and sk == 0:
                assert cls[m, n] == FULL
    # visit lists: ascending, exactly the non-skipped tiles, FULL flags match
    for m in range(20):
        c = plan.kv_count[0, m].item()
        visited = plan.kv_index[0, m, :c]
        assert visited.tolist() == torch.nonzero(cls[m] != SKIP).flatten().tolist()
        assert plan.kv_full[0, m, :c].tolist() == (cls[m, visited] == FULL).int().tolist()
    assert (plan.q_count[0, :4] == 20 - torch.arange(4)).all()   # prefix key tile n: all q tiles ≥ n
    visited, causal = plan.kv_count.sum().item(), 20 * 21 // 2
    # p × p causal (10 tiles) + per segment: its 4 q tiles × 4 prefix tiles + its own 10
    assert visited == 10 + 4 * (4 * 4 + 10) and visited < causal


def test_tiles_are_classified_once_per_batch():
    doc, seg = _ids(([[0] * 40], [[0] * 20 + [1] * 20]))
    plan = tile_plan(doc, seg, 16, 16)
    assert tile_plan(doc, seg, 16, 16) is plan                             # same batch: reused
    seg[0, 30:] = 2                                                        # in-place edit: new layout
    assert tile_plan(doc, seg, 16, 16) is not plan


# ------------------------------------------------------------- implementations vs the definition

@given(packed_layouts(max_len=112), st.sampled_from([(2, 2), (4, 2), (4, 1)]), st.integers(0, 2**16))
def test_reference_path_matches_dense_mask(layout, heads, seed):
    """The CPU path (one SDPA call per (doc, seg) run over the keys it may see) equals SDPA with
    the whole [S, S] mask, outputs and gradients."""
    doc, seg = _ids(layout)
    B, S = doc.shape
    q, k, v, do = _qkv(B, heads[0], heads[1], S, 16, torch.float32, seed)
    _assert_matches_reference(q, k, v, do, doc, seg, impl="reference")


def _sdpa_mask_shapes(monkeypatch, doc, seg):
    """The attn_mask shapes of the SDPA calls the reference path makes on one row."""
    seen, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def recording_sdpa(q, k, v, attn_mask=None, **kw):
        seen.append(tuple(attn_mask.shape))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_sdpa)
    q = torch.randn(1, 2, len(doc), 16)
    reference_attention(q, q, q, torch.tensor(doc)[None], torch.tensor(seg)[None])
    return seen


def test_reference_path_never_builds_the_whole_mask(monkeypatch):
    """p once (256 × 256), then each segment × (p + itself) (128 × 384): never S × S."""
    seen = _sdpa_mask_shapes(monkeypatch, *pack_layout([(256, [128, 128, 128, 128])]))
    assert seen == [(256, 256)] + [(128, 384)] * 4


def test_reference_path_merges_short_runs(monkeypatch):
    """Padding where every token is its own document (split.pack) and one-token segments do not
    cost one SDPA call each."""
    doc, seg = pack_layout([(256, [128, 1, 1, 1, 128])])
    seen = _sdpa_mask_shapes(monkeypatch, doc + list(range(1, 101)), seg + [0] * 100)
    assert len(seen) <= 5 and sum(a * b for a, b in seen) < (len(doc) + 100) ** 2 / 2


@settings(max_examples=15)
@given(packed_layouts(max_len=112), st.sampled_from([(2, 2), (4, 2), (4, 1)]), st.integers(0, 2**16))
def test_triton_matches_reference_fp32(layout, heads, seed):
    doc, seg = _ids(layout)
    B, S = doc.shape
    q, k, v, do = _qkv(B, heads[0], heads[1], S, 64, torch.float32, seed)
    _assert_matches_reference(q, k, v, do, doc, seg)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_matches_reference_awkward_layout(dtype):
    """Two rows: an empty prefix, one-token segments, lengths off the tile size, three
    documents, a padding document; GQA 4:2, head dim 64, a non-default scale."""
    rows = [pack_layout([(0, [3, 1, 17]), (23, [1, 1, 30]), (5, [])]),
            pack_layout([(37, [9, 20, 1, 7, 6])])]
    S = max(len(d) for d, _ in rows)
    doc = torch.tensor([d + [9] * (S - len(d)) for d, _ in rows])
    seg = torch.tensor([s + [0] * (S - len(s)) for _, s in rows])
    q, k, v, do = _qkv(2, 4, 2, S, 64, dtype, seed=1)
    _assert_matches_reference(q, k, v, do, doc, seg, scale=0.2)


def test_triton_matches_reference_head_dim_128():
    doc, seg = _ids(([[0] * 50 + [1] * 45], [[0] * 21 + [1] * 16 + [2] * 13 + [0] * 30 + [1] * 15]))
    q, k, v, do = _qkv(1, 2, 1, 95, 128, torch.float32, seed=2)
    _assert_matches_reference(q, k, v, do, doc, seg)


def test_triton_accepts_non_contiguous_heads():
    """Hugging Face hands q/k/v as [B, S, H, D] memory viewed as [B, H, S, D]."""
    doc, seg = _ids(([[0] * 40], [[0] * 13 + [1] * 14 + [2] * 13]))
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 40, 4, 32, generator=g).transpose(1, 2).requires_grad_()
    k = torch.randn(1, 40, 2, 32, generator=g).transpose(1, 2).requires_grad_()
    v = torch.randn(1, 40, 2, 32, generator=g).transpose(1, 2).requires_grad_()
    _assert_matches_reference(q, k, v, torch.randn(1, 4, 40, 32, generator=g), doc, seg)


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_packed_attention_equals_separate_sequences(impl):
    """[p | s₁ | s₂ | s₃] packed: outputs equal causal attention over each [p sᵢ], and the
    prefix's dK/dV are the sum of the three sequences' prefix dK/dV."""
    lengths = (19, [7, 1, 12])
    doc, seg = (torch.tensor(x)[None] for x in pack_layout([lengths]))
    S, P = doc.shape[1], lengths[0]
    q, k, v, do = _qkv(1, 4, 2, S, 32, torch.float32, seed=4)
    o = masked_attention(q, k, v, doc, seg, impl=impl)
    packed_grads = torch.autograd.grad((o * do).sum(), (q, k, v))

    loss, start = 0.0, P
    for n in lengths[1]:
        rows = torch.cat([torch.arange(P), torch.arange(start, start + n)])   # [p sᵢ]
        qi, ki, vi = (x[:, :, rows] for x in (q, k, v))
        oi = torch.nn.functional.scaled_dot_product_attention(qi, ki, vi, is_causal=True, enable_gqa=True)
        torch.testing.assert_close(o[:, :, rows], oi, rtol=0, atol=1e-5)
        # each token's loss counted once: the prefix rows in the first sequence only
        w = do[:, :, rows].clone()
        if start != P:
            w[:, :, :P] = 0
        loss = loss + (oi * w).sum()
        start += n
    separate_grads = torch.autograd.grad(loss, (q, k, v))
    for got, ref in zip(packed_grads, separate_grads):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- the switch

def test_switch_argument_wins_then_environment_then_device(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv("KLONG_KERNELS", raising=False)
    assert resolve_impl("auto", cpu) == "reference" and resolve_impl("auto", cuda) == "triton"
    monkeypatch.setenv("KLONG_KERNELS", "triton")
    assert resolve_impl("auto", cpu) == "triton" and resolve_impl("reference", cpu) == "reference"
    monkeypatch.setenv("KLONG_KERNELS", "reference")
    assert resolve_impl("auto", cuda) == "reference" and resolve_impl("triton", cuda) == "triton"
    monkeypatch.setenv("KLONG_KERNELS", "fast")
    with pytest.raises(ValueError, match="KLONG_KERNELS"):
        resolve_impl("auto", cpu)


def test_bad_shapes_are_named():
    q = torch.randn(1, 3, 8, 16)
    k = torch.randn(1, 2, 8, 16)
    doc = seg = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        masked_attention(q, k, k, doc, seg)
    with pytest.raises(ValueError, match="doc"):
        masked_attention(q, q, q, doc[:, :5], seg)


# --------------------------------------------------------------------------- Hugging Face

def _tiny_model(attn_implementation, family="qwen2"):
    """Random weights, fp32: hidden 64, 2 layers, 4 heads / 2 KV heads (head dim 16), vocab 300."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config
    torch.manual_seed(0)
    config_class = {"qwen2": Qwen2Config, "llama": LlamaConfig}[family]
    cfg = config_class(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation,
                                            dtype=torch.float32)


def _packed_batch(docs):
    """docs: [(p, [s₁, s₂, …]), …] token tensors -> one packed row and its loss terms.

    The sum over the separate sequences [p sᵢ] of their next-token losses equals, on the packed
    row, Σ_t w_t · CE(logits[src_t], x_t) with: a prefix token predicted by its predecessor,
    counted K times (once per sequence that contains it); a segment's first token predicted by the
    last prefix token; other segment tokens by their predecessor, once."""
    ids, doc, seg, pos, src, tgt, w = [], [], [], [], [], [], []
    for d, (p, segments) in enumerate(docs):
        base, P = len(ids), len(p)
        for j in range(1, P):
            src.append(base + j - 1), tgt.append(base + j), w.append(len(segments))
        ids += p.tolist(); doc += [d] * P; seg += [0] * P; pos += list(range(P))
        for i, s in enumerate(segments, start=1):
            start = len(ids)
            for j in range(len(s)):
                src.append(start + j - 1 if j else base + P - 1), tgt.append(start + j), w.append(1)
            ids += s.tolist(); doc += [d] * len(s); seg += [i] * len(s); pos += range(P, P + len(s))
    row = lambda x: torch.tensor(x)[None]                                  # noqa: E731  (1, S)
    return row(ids), row(doc), row(seg), row(pos), torch.tensor(src), torch.tensor(tgt), torch.tensor(w)


@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_hf_packed_loss_and_gradients_equal_separate_sequences(impl, family, monkeypatch):
    """Tiny Qwen2 / Llama (fp32, 2 layers, 4 heads / 2 KV heads): two trajectories packed in one row,
    [p | s₁ | s₂ | s₃ | p' | s'₁ | s'₂] with "klong_prefix" attention, against the five separate
    sequences [p sᵢ] with the stock "sdpa" attention: the summed token losses agree to 1e-5
    relative, every parameter's gradient to 1e-4 of its largest entry (fp32 summation order)."""
    monkeypatch.setenv("KLONG_KERNELS", impl)
    g = torch.Generator().manual_seed(5)
    tokens = lambda n: torch.randint(0, 300, (n,), generator=g)            # noqa: E731
    docs = [(tokens(20), [tokens(7), tokens(1), tokens(12)]), (tokens(9), [tokens(5), tokens(3)])]

    model = _tiny_model(register_hf(), family)
    ids, doc, seg, pos, src, tgt, w = _packed_batch(docs)
    logits = model(ids, position_ids=pos, doc_ids=doc, seg_ids=seg).logits[0]          # (S, V)
    ce = torch.nn.functional.cross_entropy(logits[src], ids[0, tgt], reduction="none")
    packed_loss = (w * ce).sum()
    packed_loss.backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    model.set_attn_implementation("sdpa")
    separate_loss = 0.0
    for p, segments in docs:
        for s in segments:
            x = torch.cat([p, s])[None]                                    # (1, |p| + |sᵢ|)
            out = model(x, labels=x)                                       # mean over |x| − 1 tokens
            separate_loss = separate_loss + out.loss * (x.shape[1] - 1)
    separate_loss.backward()

    torch.testing.assert_close(packed_loss, separate_loss, rtol=1e-5, atol=0)
    for name, param in model.named_parameters():
        err = (packed_grads[name] - param.grad).abs().max() / param.grad.abs().max()
        assert err <= 1e-4, f"{name}: gradient differs by {err:.1e} of its largest entry"


def test_hf_without_ids_says_what_to_pass():
    model = _tiny_model(register_hf())
    with pytest.raises(ValueError, match="doc_ids= and seg_ids="):
        model(torch.zeros(1, 8, dtype=torch.long))
