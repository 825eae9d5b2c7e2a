"""The batched rollout sampler: every concurrently running episode decodes in one forward per token
(KLong §3.4: RL's time goes to sampling; vLLM/SGLang-style continuous batching, on one process).

Episode threads call `EpisodePolicy.act` (the interface of agent.LocalPolicy: a PolicyReply with
the same split.Sample) and block; one decode loop (a thread of the `BatchedSampler`) serves them:

1. **Continuous batching.** Requests join and leave between decode steps. Each step runs the
   decoder once over all decoding rows, B × 1 new token, and samples every row.
2. **One KV cache per episode, kept across turns** (the paper's prompt caching, as LocalPolicy):
   the pool holds K/V tensors (S, kv, L, hd) per layer, one row per live episode. A new context
   keeps the longest common prefix with the ids the row holds (the next context usually extends
   context + action; when the context builder re-truncates the history the row is cropped to what
   is shared, at least p) and only the rest is prefilled (one forward per joining request).
3. **Join / leave without rebuilding the batch.** Decoding rows are kept at the front of the
   pool, rows 0..B−1, so a step reads the view pool[:B] and appends each row's new K/V in place at
   its own length (ragged rows, right padding; an attention mask and explicit positions make
   padding invisible). A request that joins or leaves swaps its row with the boundary row:
   O(L) copied per turn boundary, never O(B·L).
4. **Shared prefix.** A row prefilled from scratch leaves its ids and K/V in a small LRU store;
   a later context with a longer common prefix with a stored entry copies that K/V instead of
   recomputing it, so the n rollouts of a task prefill their common start (system, instructions)
   once.
5. **Exact behaviour log-probs.** Each sampled token's log-prob is log softmax(logits / T) of the
   row's own logits (T = 0: greedy, log-probs at T = 1), as LocalPolicy; padding and the other
   rows change nothing but floating-point rounding (tested: greedy equal token for token to
   LocalPolicy, log-probs equal a fresh full forward within 1e-4).
6. **Weights.** `publish(state_dict, version)` stops admitting requests, lets the requests in
   flight finish (≤ max_new_tokens steps), loads the weights, then admits again; rows whose K/V
   came from an older version are prefilled again. So every action is sampled from one version
   with a cache of that version, and its Sample records it: PPO's π_old is exactly the behaviour
   policy (agent.LocalPolicy instead keeps an older version's cache across a publish).

The decoder is a lean loop over the Hugging Face model's own modules (embedding, RMSNorms, q/k/v/o
projections, rotary embedding, MLP, LM head) for the Llama / Qwen2 / Qwen3 family; the HF forward's
per-call overhead (cache objects, mask building) dominated a decode step at the tiny model's size.
Other architectures raise `Unsupported` (grpo then falls back to one LocalPolicy at a time).

Departures: sampled tokens depend on batch composition only through floating-point rounding
(a near-tie may break differently from LocalPolicy); the KV pool keeps every live episode's cache
(memory ∝ live episodes × context, as LocalPolicy's per-episode caches).
Dimension letters: B decoding rows, S pool rows, n new tokens, L cache capacity, T attended
positions, H hidden, kv key/value heads, hd head dim, V vocabulary.
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


# ----------------------------------------------------------------------------- the decoder

def decoder_forward(model, K: list[torch.Tensor], V: list[torch.Tensor], ids: torch.Tensor,
                    start: torch.Tensor) -> torch.Tensor:
    """Last-position logits (B, V) fp32 of `ids` (B, n) at positions start_b + i, i < n.

    K[l], V[l] (B, kv, L, hd) hold each row's earlier keys/values at positions < start_b; the new
    ones are written in place at start_b … start_b + n − 1. Row b attends to positions
    j ≤ start_b + i only, so whatever lies beyond a row's length (padding, stale K/V) is never
    read. n > 1 (a prefill) needs B = 1."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    m = model.model
    B, n = ids.shape
    assert n == 1 or B == 1, "prefill runs one row at a time"
    pos = start[:, None] + torch.arange(n, device=ids.device)              # (B, n)
    T = int(start.max()) + n
    mask = (torch.arange(T, device=ids.device) <= pos[:, :, None])[:, None]  # (B, 1, n, T)
    h = m.embed_tokens(ids)                                                 # (B, n, H)
    cos, sin = m.rotary_emb(h, pos)                                         # (B, n, hd)
    rows = torch.arange(B, device=ids.device)
    for l, layer in enumerate(m.layers):
        a = layer.self_attn
        x = layer.input_layernorm(h)
        q = a.q_proj(x).view(B, n, -1, a.head_dim)                          # (B, n, heads, hd)
        k = a.k_proj(x).view(B, n, -1, a.head_dim)                          # (B, n, kv, hd)
        v = a.v_proj(x).view(B, n, -1, a.head_dim).transpose(1, 2)          # (B, kv, n, hd)
        if getattr(a, "q_norm", None) is not None:                          # Qwen3: per-head norm
            q, k = a.q_norm(q), a.k_norm(k)
        q, k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        if n == 1:                                                          # ragged append
            K[l][rows, :, start] = k[:, :, 0]
            V[l][rows, :, start] = v[:, :, 0]
        else:
            s = int(start[0])
            K[l][0, :, s:s + n] = k[0]
            V[l][0, :, s:s + n] = v[0]
        o = F.scaled_dot_product_attention(q, K[l][:, :, :T], V[l][:, :, :T], attn_mask=mask,
                                           scale=a.scaling, enable_gqa=True)  # (B, heads, n, hd)
        h = h + a.o_proj(o.transpose(1, 2).reshape(B, n, -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.lm_head(m.norm(h[:, -1])).float()


# ----------------------------------------------------------------------------- records

@dataclass
class _Row:
    """An episode's place in the KV pool: its row, the ids whose K/V the row holds, their version."""
    index: int | None = None
    ids: list[int] = field(default_factory=list)
    version: int = -1


@dataclass
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
        self.version = version
        self.prefix_entries = prefix_entries
        self._stop = chat.stop_token_id(tokenizer)
        p = next(model.parameters())
        self._device, self._dtype = p.device, p.dtype
        cfg = model.config
        self._kv = cfg.num_key_value_heads
        self._hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self._layers = cfg.num_hidden_layers
        self._K: list[torch.Tensor] = []              # per layer (S, kv, L, hd)
        self._V: list[torch.Tensor] = []
        self._owner: list[_Row | None] = []           # per pool row
        self._active: list[_Request] = []             # request decoding in row r, r < B
        self._store: OrderedDict[tuple, tuple] = OrderedDict()   # ids -> (K, V) per layer
        self._alloc(4, 256)
        self._cv = threading.Condition()
        self._pending: list[_Request] = []
        self._released: list[_Row] = []
        self._weights: tuple[dict, int] | None = None
        self.steps = 0                                # decode steps run (batched forwards)
        self.step_rows = 0                            # Σ rows over decode steps
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
        """Grow the pool to S rows × L positions, keeping what it holds."""
        shape = (S, self._kv, L, self._hd)
        old = (self._K, self._V)
        self._K = [torch.zeros(shape, device=self._device, dtype=self._dtype)
                   for _ in range(self._layers)]
        self._V = [torch.zeros(shape, device=self._device, dtype=self._dtype)
                   for _ in range(self._layers)]
        for new, prev in zip((self._K, self._V), old):
            for a, b in zip(new, prev):
                a[:b.shape[0], :, :b.shape[2]] = b
        self._owner += [None] * (S - len(self._owner))

    def _ensure(self, row: _Row, length: int) -> None:
        """`row` has a pool row with room for `length` positions."""
        S, L = self._K[0].shape[0], self._K[0].shape[2]
        if length > L:
            self._alloc(S, max(length, 2 * L))
        if row.index is None:
            free = [i for i in range(len(self._active), S) if self._owner[i] is None]
            if not free:
                self._alloc(2 * S, self._K[0].shape[2])
                free = [S]
            row.index, row.ids, row.version = free[0], [], -1
            self._owner[free[0]] = row

    def _swap(self, i: int, j: int) -> None:
        """Exchange pool rows i and j (their valid K/V, owners and row indices)."""
        if i == j:
            return
        a, b = self._owner[i], self._owner[j]
        n = max(len(a.ids) if a else 0, len(b.ids) if b else 0)
        for t in self._K + self._V:
            t[[i, j], :, :n] = t[[j, i], :, :n]
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
                    for q in joins:
                        self._admit(q)
                    if self._active:
                        self._step()
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

    def _admit(self, q: _Request) -> None:
        """Prefill what the row does not hold of q's context, sample the first token, and join
        the decoding rows unless the action already ended."""
        row, ctx = q.row, q.context
        self._ensure(row, len(ctx) + q.max_new_tokens)
        i = row.index
        keep = _common_prefix(row.ids, ctx) if row.version == self.version else 0
        keep = min(keep, len(ctx) - 1)               # the last context token is always fed
        fresh = keep == 0
        n, kv = self._prefix_hit(ctx)
        if n > keep:                                 # shared prefix: copy its K/V
            for t, s in zip(self._K + self._V, kv[0] + kv[1]):
                t[i, :, :n] = s[:, :n]
            keep, fresh = n, False
        row.ids, row.version, q.version = ctx[:keep], self.version, self.version
        ids = torch.tensor([ctx[keep:]], device=self._device)             # (1, n)
        K, V = [t[i:i + 1] for t in self._K], [t[i:i + 1] for t in self._V]
        logits = decoder_forward(self.model, K, V, ids, torch.tensor([keep], device=self._device))
        q.fed += ids.shape[1]
        row.ids = list(ctx)
        if fresh and self.prefix_entries:            # remember this start for the next rollouts
            self._store[tuple(ctx)] = ([t[i, :, :len(ctx)].clone() for t in self._K],
                                       [t[i, :, :len(ctx)].clone() for t in self._V])
            while len(self._store) > self.prefix_entries:
                self._store.popitem(last=False)
        if not self._sample([q], logits)[0]:
            self._swap(i, len(self._active))
            self._active.append(q)

    def _step(self) -> None:
        """One batched forward over the decoding rows 0..B−1, then sample each row."""
        B = len(self._active)
        tok = torch.tensor([[q.action[-1]] for q in self._active], device=self._device)  # (B, 1)
        start = torch.tensor([len(q.row.ids) for q in self._active], device=self._device)
        logits = decoder_forward(self.model, [t[:B] for t in self._K], [t[:B] for t in self._V],
                                 tok, start)
        for q in self._active:
            q.row.ids.append(q.action[-1])
            q.fed += 1
        self.steps += 1
        self.step_rows += B
        finished = self._sample(self._active, logits)
        for r in reversed(range(B)):                 # highest first: lower rows keep their place
            if finished[r]:
                self._swap(r, len(self._active) - 1)
                self._active[r] = self._active[-1]
                self._active.pop()

    def _sample(self, reqs: list[_Request], logits: torch.Tensor) -> list[bool]:
        """Sample one token per request from logits (B, V); a finished request is answered.

        log π(·|ctx) = log softmax(logits / T) at the sampling temperature (T = 0: argmax, log-probs
        at T = 1), the behaviour log-probs PPO's ratio r_t divides by. Sampling by inversion:
        a_b = min{v : CDF_b(v) > u_b}, u_b ~ U(0, 1) from the episode's own random stream (one
        batched search instead of B multinomial draws; the CDF in float64)."""
        dev = logits.device
        temps = torch.tensor([q.temperature or 1.0 for q in reqs], device=dev)
        logp = torch.log_softmax(logits / temps[:, None], dim=-1)               # (B, V)
        cdf = logp.double().exp().cumsum(-1)                                    # (B, V)
        u = torch.tensor([[q.rng.random()] if q.temperature else [0.0] for q in reqs],
                         dtype=torch.float64, device=dev)                       # (B, 1)
        drawn = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp(max=cdf.shape[1] - 1)
        greedy = torch.tensor([q.temperature == 0 for q in reqs], device=dev)
        tok = torch.where(greedy, logp.argmax(-1), drawn[:, 0])                 # (B,)
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
