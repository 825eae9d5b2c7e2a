"""The batched rollout sampler: every concurrently running episode decodes in one forward per token
(KLong §3.4: RL's time goes to sampling; vLLM/SGLang-style continuous batching, on one process).

Episode threads call `EpisodePolicy.act` (the interface of agent.LocalPolicy: a PolicyReply with
the same split.Sample) and block; one decode loop (a thread of the `BatchedSampler`) serves them:

1. **Continuous batching.** Requests join and leave between decode steps. Each step runs the
   decoder once over all decoding rows, B × 1 new token, plus the prefill of the J requests
   joining at that step (mixed batching: their n_j new tokens share every linear layer with the
   decode rows, one forward in all), and samples every row.
2. **One KV cache per episode, kept across turns** (the paper's prompt caching, as LocalPolicy):
   the pool holds K/V (2·layers, S, kv, L, hd), one row per live episode. A new context keeps the
   longest common prefix with the ids the row holds (the next context usually extends context +
   action; when the context builder re-truncates the history the row is cropped to what is
   shared, at least p) and only the rest is prefilled.
3. **Join / leave without rebuilding the batch.** Decoding rows are kept at the front of the
   pool, rows 0..B−1, joiners placed right after them, so a step reads the view pool[:, :B] and
   writes each new token's K/V in place at its row and position (ragged rows, right padding; an
   attention mask and explicit positions make padding invisible). A request that joins or leaves
   swaps its row with the boundary row: O(L) copied per turn boundary, never O(B·L).
4. **Shared prefix.** A row prefilled from scratch leaves its ids and K/V in a small LRU store;
   a later context with a longer common prefix with a stored entry copies that K/V instead of
   recomputing it, so the n rollouts of a task prefill their common start (system, instructions)
   once (a request sharing more with a from-scratch joiner of the same step waits one step for
   its copy).
5. **Exact behaviour log-probs.** Each sampled token's log-prob is log softmax(logits / T) of the
   row's own logits (T = 0: greedy, log-probs at T = 1), as LocalPolicy; padding and the other
   rows change nothing but floating-point rounding (tested: greedy equal token for token to
   LocalPolicy, log-probs equal a fresh full forward within 1e-4).
6. **Weights.** `publish(state_dict, version)` stops admitting requests, lets the requests in
   flight finish (≤ max_new_tokens steps), loads the weights, then admits again; rows whose K/V
   came from an older version are prefilled again. So every action is sampled from one version
   with a cache of that version, and its Sample records it: PPO's π_old is exactly the behaviour
   policy (agent.LocalPolicy instead keeps an older version's cache across a publish).

The decoder (`step_forward`) is a lean loop over the Hugging Face model's own parameters
(embedding, RMSNorms, q/k/v/o projections, MLP, LM head; RoPE from a table) for the Llama / Qwen2 /
Qwen3 family: at the tiny model's size a decode step is mostly per-operation overhead (the HF
forward's cache objects and mask building, module calls), so it uses few, flat operations
(F.linear on the parameters, F.rms_norm, one gather for RoPE's half swap, the g query heads of a
kv head as one block of g query rows in decode attention). Other architectures, and modules
other than plain Linear / RMSNorm, raise `Unsupported` (grpo then falls back to one LocalPolicy
at a time).

Departures: sampled tokens depend on batch composition only through floating-point rounding
(a near-tie may break differently from LocalPolicy); the KV pool keeps every live episode's cache
(memory ∝ live episodes × context, as LocalPolicy's per-episode caches).
Dimension letters: B decoding rows, J joining requests, N new tokens of a step, S pool rows, n new
tokens of one request, L cache capacity, T attended positions, H hidden, kv key/value heads, g
query heads per kv head, hd head dim, V vocabulary.
"""
from __future__ import annotations

import os
import random
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import chat
from agent import OwnReplies, PolicyReply, _common_prefix
from split import Sample

SUPPORTED = ("llama", "qwen2", "qwen3")


class Unsupported(ValueError):
    """The lean decoder does not know this architecture."""


def check_supported(model) -> None:
    """Raise Unsupported unless `model` is a Llama-family causal LM with full attention."""
    cfg = model.config
    if cfg.model_type not in SUPPORTED:
        raise Unsupported(f"sampler: model_type {cfg.model_type!r}; the lean decoder knows "
                          f"{', '.join(SUPPORTED)}")
    if getattr(cfg, "use_sliding_window", False) or \
            any(t != "full_attention" for t in getattr(cfg, "layer_types", None) or []):
        raise Unsupported("sampler: sliding-window attention layers are not supported")
    rope = getattr(model.model.rotary_emb, "rope_type", "default")
    if rope in ("dynamic", "longrope"):           # frequencies depend on each row's length
        raise Unsupported(f"sampler: rope_type {rope!r} (a length-dependent RoPE) is not supported")


# ----------------------------------------------------------------------------- the decoder

def rope_table(model, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin (length, hd) of the model's rotary embedding at positions 0 … length − 1.

    RoPE(x) = x·cos + rot(x)·sin with rot(x) = (−x₂, x₁) over the halves of the head dimension;
    here rot(x)·sin = x[swap]·(±sin): the halves swapped by one gather, the sign folded into the
    table (−sin on the first half). The HF rotary embedding is elementwise in the position, so the
    table's rows equal a per-call computation bit for bit."""
    p = next(model.parameters())
    cos, sin = model.model.rotary_emb(torch.zeros(1, device=p.device, dtype=p.dtype),
                                      torch.arange(length, device=p.device)[None])
    half = sin.shape[-1] // 2
    return cos[0], torch.cat((-sin[0, :, :half], sin[0, :, half:]), dim=-1)


@dataclass
class Join:
    """A request joining the batch: `n` new tokens of pool row `row` at positions start … start+n−1."""
    row: int
    start: int
    n: int


@dataclass
class LayerWeights:
    """One decoder layer's tensors, looked up once: the HF modules' own parameters (not copies), so
    weights loaded in place are seen. Linear maps as (weight, bias or None)."""
    norm1: torch.Tensor                   # input RMSNorm weight (H,)
    q: tuple
    k: tuple
    v: tuple
    q_norm: torch.Tensor | None           # Qwen3: RMSNorm over each head (hd,)
    k_norm: torch.Tensor | None
    o: tuple
    norm2: torch.Tensor                   # post-attention RMSNorm weight (H,)
    gate: tuple
    up: tuple
    down: tuple
    act: object                           # the MLP's activation (SiLU)
    scale: float                          # attention scale 1/√hd
    eps: float                            # RMSNorm ε


@dataclass
class LeanWeights:
    """A Llama-family causal LM as the lean decoder reads it."""
    embed: torch.Tensor                   # (V, H)
    layers: list[LayerWeights]
    norm: torch.Tensor                    # final RMSNorm weight (H,)
    head: tuple                           # LM head (V, H), bias
    heads: int
    eps: float


def lean_weights(model) -> LeanWeights:
    """The tensors of `model` that step_forward reads (Unsupported if a module is not the plain
    Linear / RMSNorm it expects)."""
    m = model.model

    def lin(mod):
        if type(mod) is not torch.nn.Linear:
            raise Unsupported(f"sampler: {type(mod).__name__} where a Linear was expected")
        return mod.weight, mod.bias

    def norm(mod):
        if mod is None:
            return None
        if not hasattr(mod, "variance_epsilon"):
            raise Unsupported(f"sampler: {type(mod).__name__} where an RMSNorm was expected")
        return mod.weight

    layers = []
    for layer in m.layers:
        a, mlp = layer.self_attn, layer.mlp
        layers.append(LayerWeights(
            norm(layer.input_layernorm), lin(a.q_proj), lin(a.k_proj), lin(a.v_proj),
            norm(getattr(a, "q_norm", None)), norm(getattr(a, "k_norm", None)), lin(a.o_proj),
            norm(layer.post_attention_layernorm), lin(mlp.gate_proj), lin(mlp.up_proj),
            lin(mlp.down_proj), mlp.act_fn, a.scaling, layer.input_layernorm.variance_epsilon))
    return LeanWeights(m.embed_tokens.weight, layers, norm(m.norm), lin(model.lm_head),
                       model.config.num_attention_heads, m.norm.variance_epsilon)


def step_forward(w: LeanWeights, pool: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                 ids: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor,
                 joins: list[Join]) -> torch.Tensor:
    """One forward over a mixed batch: logits (B + J, V) fp32 of each row's last new token.

    ids, pos, rows (N,): the new tokens, their positions and pool rows, flat. The first B are one
    decode token each of pool rows 0 … B−1; then each join's n tokens in order (mixed batching:
    the joiners' prefill shares every linear layer with the decode rows). pool (2·layers, S, kv,
    L, hd) holds K (even) and V (odd) of each layer; every new token's K/V is written in place at
    its row and position, and a token at position t attends to its row's positions ≤ t only, so
    whatever lies beyond a row's length (padding, stale K/V) is never read. Attention runs per
    part: one call for the B decode rows (the g query heads of a kv head as one block of g query
    rows, padding masked by −inf), one per join (causal with the join's offset)."""
    N, (cos_t, sin_t) = ids.shape[0], rope          # sin_t signed: rope_table
    B = N - sum(j.n for j in joins)
    heads, kvh, hd = w.heads, pool.shape[2], pool.shape[-1]
    g = heads // kvh                                                        # queries per kv head
    cos, sin = cos_t[pos][:, None], sin_t[pos][:, None]                     # (N, 1, hd)
    swap = torch.arange(hd, device=ids.device).roll(hd // 2)                # (x₂, x₁)
    T = int(pos[:B].max()) + 1 if B else 0                                  # attended by decode rows
    bias = torch.zeros(B, 1, 1, T, device=ids.device, dtype=cos.dtype).masked_fill_(
        torch.arange(T, device=ids.device) > pos[:B, None, None, None], float("-inf"))  # (B, 1, 1, T)
    causal = [torch.ones(j.n, j.start + j.n, dtype=torch.bool, device=ids.device).tril(j.start)
              for j in joins]                                               # (n, start + n) each
    h = F.embedding(ids, w.embed)                                           # (N, H)
    for l, lw in enumerate(w.layers):
        x = _rms_norm(h, lw.norm1, lw.eps)
        q = F.linear(x, *lw.q).view(N, heads, hd)
        k = F.linear(x, *lw.k).view(N, kvh, hd)
        v = F.linear(x, *lw.v).view(N, kvh, hd)
        if lw.q_norm is not None:                                           # Qwen3: per-head norm
            q, k = _rms_norm(q, lw.q_norm, lw.eps), _rms_norm(k, lw.k_norm, lw.eps)
        qk = torch.cat((q, k), dim=1)                                       # (N, heads + kv, hd)
        qk = torch.addcmul(qk * cos, qk[..., swap], sin)                    # RoPE: x·cos + rot(x)·sin
        q, k = qk[:, :heads], qk[:, heads:]
        K, V = pool[2 * l], pool[2 * l + 1]                                 # (S, kv, L, hd)
        K[rows, :, pos] = k
        V[rows, :, pos] = v
        out = []
        if B:                                    # head h = kv head h // g: (B, kv, g, hd) blocks
            o = F.scaled_dot_product_attention(q[:B].view(B, kvh, g, hd), K[:B, :, :T], V[:B, :, :T],
                                               attn_mask=bias, scale=lw.scale)
            out.append(o.reshape(B, heads * hd))
        off = B
        for j, mask in zip(joins, causal):
            qj = q[off:off + j.n].transpose(0, 1)[None]                     # (1, heads, n, hd)
            o = F.scaled_dot_product_attention(qj, K[j.row:j.row + 1, :, :j.start + j.n],
                                               V[j.row:j.row + 1, :, :j.start + j.n],
                                               attn_mask=mask, scale=lw.scale, enable_gqa=True)
            out.append(o[0].transpose(0, 1).reshape(j.n, heads * hd))
            off += j.n
        h = h + F.linear(out[0] if len(out) == 1 else torch.cat(out), *lw.o)   # (N, H)
        x = _rms_norm(h, lw.norm2, lw.eps)
        h = h + F.linear(lw.act(F.linear(x, *lw.gate)) * F.linear(x, *lw.up), *lw.down)
    if joins:                                                               # each row's last token
        last, off = list(range(B)), B
        for j in joins:
            off += j.n
            last.append(off - 1)
        h = h[last]                                                         # (B + J, H)
    return F.linear(_rms_norm(h, w.norm, w.eps), *w.head).float()


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as HF's Llama/Qwen: w · x / √(mean(x²) + ε), computed in fp32 (the weight applied
    after the cast back, as HF)."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return weight * F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)


# ----------------------------------------------------------------------------- records

@dataclass
class _Row:
    """An episode's place in the KV pool: its row, the ids whose K/V the row holds, their version."""
    index: int | None = None
    ids: list[int] = field(default_factory=list)
    version: int = -1


@dataclass(eq=False)
class _Request:
    """One action to sample: submitted by an episode thread, answered by the decode loop."""
    row: _Row
    context: list[int]
    temperature: float
    max_new_tokens: int
    rng: random.Random
    action: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    version: int = 0
    fed: int = 0                          # tokens run through the model for this request
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


# ----------------------------------------------------------------------------- the sampler

class BatchedSampler:
    """One model serving every live episode (see the module docstring). Thread-safe: any number
    of episode threads call their EpisodePolicy.act; a daemon thread runs the decode loop."""

    def __init__(self, model, tokenizer, version: int = 0, prefix_entries: int = 8):
        check_supported(model)
        self.model, self.tokenizer = model.eval(), tokenizer
        self._lean = lean_weights(model)
        self.version = version
        self.prefix_entries = prefix_entries
        self._stop = chat.stop_token_id(tokenizer)
        p = next(model.parameters())
        self._device, self._dtype = p.device, p.dtype
        cfg = model.config
        self._kv = cfg.num_key_value_heads
        self._hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self._layers = cfg.num_hidden_layers
        self._pool = torch.zeros(0)                   # (2·layers, S, kv, L, hd): K, V per layer
        self._rope: tuple[torch.Tensor, torch.Tensor] = (torch.zeros(0), torch.zeros(0))
        self._owner: list[_Row | None] = []           # per pool row
        self._active: list[_Request] = []             # request decoding in row r, r < B
        self._store: OrderedDict[tuple, torch.Tensor] = OrderedDict()  # ids -> (2·layers, kv, n, hd)
        self._alloc(4, 256)
        self._cv = threading.Condition()
        self._pending: list[_Request] = []
        self._released: list[_Row] = []
        self._weights: tuple[dict, int] | None = None
        self.steps = 0                                # decode steps run (batched forwards)
        self.step_rows = 0                            # Σ rows over decode steps
        self.max_joins = 0                            # most requests prefilled in one step
        threading.Thread(target=self._loop, name="sampler", daemon=True).start()

    # -- the episode side
    def policy(self, temperature: float = 1.0, max_new_tokens: int = 256,
               seed: int | None = None) -> "EpisodePolicy":
        """A policy for one episode (its own KV row, random stream and own-reply memory)."""
        return EpisodePolicy(self, temperature, max_new_tokens, seed)

    def submit(self, request: _Request) -> _Request:
        with self._cv:
            self._pending.append(request)
            self._cv.notify_all()
        request.done.wait()
        if request.error is not None:
            raise RuntimeError(f"sampler: {type(request.error).__name__}: {request.error}") \
                from request.error
        return request

    def release(self, row: _Row) -> None:
        """The episode ended: its pool row is free (called by EpisodePolicy's finaliser)."""
        with self._cv:
            self._released.append(row)
            self._cv.notify_all()

    def publish(self, state_dict: dict, version: int) -> None:
        """New weights: applied between actions (see the module docstring, point 6); returns when
        loaded."""
        with self._cv:
            self._weights = (state_dict, version)
            self._cv.notify_all()
            self._cv.wait_for(lambda: self._weights is None)

    # -- the pool
    def _alloc(self, S: int, L: int) -> None:
        """Grow the pool to S rows × L positions, keeping what it holds (and the RoPE table)."""
        old = self._pool
        self._pool = torch.zeros(2 * self._layers, S, self._kv, L, self._hd, device=self._device,
                                 dtype=self._dtype)
        if old.numel():
            self._pool[:, :old.shape[1], :, :old.shape[3]] = old
        if self._rope[0].shape[0] < L:
            self._rope = rope_table(self.model, L)
        self._owner += [None] * (S - len(self._owner))

    def _ensure(self, row: _Row, length: int, busy: int) -> None:
        """`row` has a pool row (not one of rows 0 … busy − 1) with room for `length` positions."""
        S, L = self._pool.shape[1], self._pool.shape[3]
        if length > L:
            self._alloc(S, max(length, 2 * L))
        if row.index is None:
            free = [i for i in range(busy, S) if self._owner[i] is None]
            if not free:
                self._alloc(2 * S, self._pool.shape[3])
                free = [S]
            row.index, row.ids, row.version = free[0], [], -1
            self._owner[free[0]] = row

    def _swap(self, i: int, j: int) -> None:
        """Exchange pool rows i and j (their valid K/V, owners and row indices): O(L) copied."""
        if i == j:
            return
        a, b = self._owner[i], self._owner[j]
        na, nb = (len(a.ids) if a else 0), (len(b.ids) if b else 0)
        held = self._pool[:, i, :, :na].clone()                 # (2·layers, kv, na, hd)
        if nb:
            self._pool[:, i, :, :nb] = self._pool[:, j, :, :nb]
        if na:
            self._pool[:, j, :, :na] = held
        self._owner[i], self._owner[j] = b, a
        for r, k in ((a, j), (b, i)):
            if r is not None:
                r.index = k

    # -- the decode loop
    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cv:
                    self._cv.wait_for(lambda: self._pending or self._active or self._released
                                      or self._weights)
                    released, self._released = self._released, []
                    joins, weights = [], None
                    if self._weights is None:         # new weights wait for a drained batch,
                        joins, self._pending = self._pending, []
                    elif not self._active:            # and hold requests back until loaded
                        weights = self._weights
                for row in released:
                    if row.index is not None:
                        self._owner[row.index], row.index = None, None
                if weights is not None:
                    self._load(*weights)
                    continue                          # requests held back are admitted now
                try:
                    if joins or self._active:
                        later = self._step(joins)
                        if later:                     # they wait one step (see _place)
                            with self._cv:
                                self._pending[:0] = later
                except BaseException as e:            # noqa: BLE001  (fail the requests, not the loop)
                    for q in joins + self._active:
                        if not q.done.is_set():
                            q.error = e
                            q.row.ids, q.row.version = [], -1
                            q.done.set()
                    self._active = []

    def _load(self, state_dict: dict, version: int) -> None:
        with torch.inference_mode(False), torch.no_grad():   # parameters are normal tensors
            self.model.load_state_dict(state_dict)
        self._store.clear()
        with self._cv:
            self.version, self._weights = version, None
            self._cv.notify_all()

    def _prefix_hit(self, context: list[int]) -> tuple[int, tuple | None]:
        """The stored entry sharing the longest prefix with `context` (at most len − 1 tokens)."""
        best, hit = 0, None
        for ids, kv in self._store.items():
            n = min(_common_prefix(ids, context), len(context) - 1)
            if n > best:
                best, hit = n, (ids, kv)
        if hit is not None:
            self._store.move_to_end(hit[0])
        return best, hit and hit[1]

    def _place(self, q: _Request, r: int, fresh: list[_Request]) -> Join | None:
        """Put q's row at pool row r with the K/V it can reuse; the Join of what is left to
        prefill, or None when q waits a step: an earlier fresh joiner of this step (`fresh`,
        prefilled from scratch and then stored) shares a longer prefix with q than anything q
        could reuse now, so q copies it next step instead of recomputing it."""
        row, ctx = q.row, q.context
        keep = _common_prefix(row.ids, ctx) if row.version == self.version else 0
        keep = min(keep, len(ctx) - 1)               # the last context token is always fed
        n, kv = self._prefix_hit(ctx)
        if any(min(_common_prefix(f.context, ctx), len(ctx) - 1) > max(keep, n) for f in fresh):
            return None
        self._ensure(row, len(ctx) + q.max_new_tokens, r)
        self._swap(row.index, r)
        if n > keep:                                 # shared prefix: copy its K/V
            self._pool[:, r, :, :n] = kv[:, :, :n]
            keep = n
        elif keep == 0:
            fresh.append(q)
        row.ids, row.version, q.version = ctx[:keep], self.version, self.version
        return Join(r, keep, len(ctx) - keep)

    def _step(self, pending: list[_Request]) -> list[_Request]:
        """One batched forward: the decoding rows 0 … B−1 (one token each) and the joining
        requests placed at rows B, B+1, … (what their rows do not hold of their contexts); then
        sample every row. Rows that finished leave; the joiners that must wait are returned."""
        B, joins, joined, fresh, later = len(self._active), [], [], [], []
        for q in pending:
            j = self._place(q, B + len(joins), fresh)
            if j is None:
                later.append(q)
            else:
                joins.append(j)
                joined.append(q)
        ids = [q.action[-1] for q in self._active]
        pos = [len(q.row.ids) for q in self._active]
        for q, j in zip(joined, joins):
            ids += q.context[j.start:]
            pos += range(j.start, j.start + j.n)
        rows = list(range(B)) + [j.row for j in joins for _ in range(j.n)]
        logits = step_forward(self._lean, self._pool, self._rope,
                              *torch.tensor([ids, pos, rows], device=self._device), joins)   # (B + J, V)
        for q in self._active:
            q.row.ids.append(q.action[-1])
            q.fed += 1
        for q, j in zip(joined, joins):
            q.row.ids, q.fed = list(q.context), q.fed + j.n
            if q in fresh and self.prefix_entries:   # remember this start for the next rollouts
                self._store[tuple(q.context)] = self._pool[:, j.row, :, :len(q.context)].clone()
                while len(self._store) > self.prefix_entries:
                    self._store.popitem(last=False)
        self.steps += 1
        self.step_rows += B + len(joins)
        self.max_joins = max(self.max_joins, len(joins))
        self._active += joined
        finished = self._sample(self._active, logits)
        for r in reversed(range(len(self._active))):  # highest first: lower rows keep their place
            if finished[r]:
                self._swap(r, len(self._active) - 1)
                self._active[r] = self._active[-1]
                self._active.pop()
        return later

    def _sample(self, reqs: list[_Request], logits: torch.Tensor) -> list[bool]:
        """Sample one token per request from logits (B, V); a finished request is answered.

        log π(·|ctx) = log softmax(logits / T) at the sampling temperature (T = 0: argmax, log-probs
        at T = 1), the behaviour log-probs PPO's ratio r_t divides by. Sampling by inversion:
        a_b = min{v : CDF_b(v) > u_b}, u_b ~ U(0, 1) from the episode's own random stream (one
        batched search instead of B multinomial draws; the CDF in float64)."""
        dev, temps = logits.device, [q.temperature for q in reqs]
        if len(set(temps)) == 1:                    # one temperature: a scalar (none at T = 0, 1)
            z = logits if temps[0] in (0, 1) else logits / temps[0]
        else:
            z = logits / torch.tensor([t or 1.0 for t in temps], device=dev)[:, None]
        logp = torch.log_softmax(z, dim=-1)                                     # (B, V)
        greedy = [t == 0 for t in temps]
        if all(greedy):
            tok = logp.argmax(-1)                                               # (B,)
        else:
            cdf = logp.double().exp().cumsum(-1)                                # (B, V)
            u = torch.tensor([[0.0] if g else [q.rng.random()] for q, g in zip(reqs, greedy)],
                             dtype=torch.float64, device=dev)                   # (B, 1)
            tok = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)[:, 0].clamp_(
                max=cdf.shape[1] - 1)                                           # (B,)
            if any(greedy):
                tok = torch.where(torch.tensor(greedy, device=dev), logp.argmax(-1), tok)
        lp = logp.gather(1, tok[:, None])[:, 0]
        done = []
        for q, t, l in zip(reqs, tok.tolist(), lp.tolist()):
            q.action.append(t)
            q.logprobs.append(l)
            end = t == self._stop or len(q.action) == q.max_new_tokens
            if end:
                q.done.set()
            done.append(end)
        return done


class EpisodePolicy:
    """One episode's policy on a BatchedSampler: agent.LocalPolicy's interface and Samples.

    Its KV row lives as long as this object (a finaliser frees it when the episode drops it)."""

    def __init__(self, sampler: BatchedSampler, temperature: float = 1.0,
                 max_new_tokens: int = 256, seed: int | None = None):
        self.sampler, self.temperature, self.max_new_tokens = sampler, temperature, max_new_tokens
        self._replies = OwnReplies(sampler.tokenizer)
        self.count_tokens = self._replies.count_tokens
        self._row = _Row()
        self._rng = random.Random(seed if seed is not None else os.urandom(8))
        self.version = sampler.version
        self.encoded_tokens = 0                       # tokens run through the model for it
        weakref.finalize(self, sampler.release, self._row)

    def act(self, messages: list[dict], tools: list[dict]) -> PolicyReply:
        context = self._replies.context(messages)
        q = self.sampler.submit(_Request(self._row, context, self.temperature,
                                         self.max_new_tokens, self._rng))
        self.encoded_tokens += q.fed
        self.version = q.version
        return PolicyReply(self._replies.reply(q.action),
                           Sample(-1, context, q.action, q.logprobs, q.version))
