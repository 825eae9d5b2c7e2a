"""sampler.py: the batched rollout sampler is exact — greedy equal to the per-episode decoder
(agent.LocalPolicy) token for token, behaviour log-probs equal to a fresh full forward, a request
alone equal to the same request among others — with its KV rows kept across turns, the shared
prefix prefilled once and weights published between actions."""
import copy
import threading
import time

import pytest
import torch

import agent as A
import chat
import sampler as SM

TEMP = 0.7


def _model(kind: str):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    tok = chat.build_tiny_tokenizer()
    torch.manual_seed(0)
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    if kind == "qwen2":                                   # q/k/v biases
        return tok, Qwen2ForCausalLM(Qwen2Config(**common)).eval()
    if kind == "qwen3":                                   # per-head q/k norms
        from transformers import Qwen3Config, Qwen3ForCausalLM
        return tok, Qwen3ForCausalLM(Qwen3Config(**common, head_dim=16)).eval()
    return tok, LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False)).eval()


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def tiny(request):
    return _model(request.param)


@pytest.fixture(scope="module")
def qwen():
    return _model("qwen2")


def full_forward_logprobs(model, sample, temperature):
    ids = torch.tensor([sample.context_ids + sample.action_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(sample.context_ids) - 1:-1]   # (A, V)
    logp = torch.log_softmax(logits.float() / (temperature or 1.0), dim=-1)
    return logp.gather(1, torch.tensor(sample.action_ids)[:, None])[:, 0]


def start(k: int) -> list[dict]:
    """Episode k's first context: lengths differ between episodes."""
    return [{"role": "system", "content": "You are an agent. " * (1 + k)},
            {"role": "user", "content": f"task {k}: " + "read the paper and reproduce it " * (2 + 3 * k)}]


def observe(messages: list[dict], reply: dict, k: int, turn: int) -> list[dict]:
    """The next context: the reply and an observation of a length that depends on k and turn."""
    return messages + [reply, {"role": "user", "content": f"obs {k}.{turn} " + "ok " * (3 + 5 * ((k + turn) % 4))}]


def play(policy, k: int, turns: int, retruncate_at: int | None = None) -> list:
    """A scripted episode loop: `turns` actions; at `retruncate_at` the history is re-truncated to
    the first two messages plus an omission marker (a context that does not extend the last)."""
    messages, samples = start(k), []
    for t in range(turns):
        if t == retruncate_at:
            messages = messages[:2] + [{"role": "user", "content": "[... earlier turns omitted ...]"}]
        reply = policy.act(messages, A.TOOLS)
        samples.append(reply.sample)
        messages = observe(messages, reply.message, k, t)
    return samples


def concurrently(fns) -> list:
    """Run the callables in threads at once; their results in order."""
    out = [None] * len(fns)
    errors = []

    def run(i):
        try:
            out[i] = fns[i]()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


def _last_logits(model, ids: list[int]) -> torch.Tensor:
    """A fresh full forward's logits (V,) at the last position of `ids`."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, -1].float()


@pytest.mark.parametrize("kind", ["qwen2", "llama", "qwen3"])
def test_a_mixed_step_gives_every_row_the_logits_of_a_fresh_forward(kind):
    """One step_forward over 3 decode rows of different lengths and 3 joiners (one from scratch,
    two after a held prefix, prefills of different lengths) at rows in between and beyond stale
    K/V: each row's logits equal a fresh forward of its own sequence (padding, the other rows and
    their prefills change nothing but rounding)."""
    tok, model = _model(kind)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(3, len(tok), (n,), generator=g).tolist() for n in (37, 5, 61, 23, 50, 44)]
    held = [len(seqs[0]) - 1, len(seqs[1]) - 1, len(seqs[2]) - 1, 0, 17, 30]   # K/V a row holds
    w, rope = SM.lean_weights(model), SM.rope_table(model, 128)
    kv, hd = model.config.num_key_value_heads, model.model.layers[0].self_attn.head_dim
    pool = torch.randn(2 * model.config.num_hidden_layers, 8, kv, 128, hd)  # stale K/V everywhere
    order = [0, 1, 2, 5, 3, 4]                                              # pool rows: 3 decode, 3 joiners
    with torch.inference_mode():
        for r, s, n in zip(order, seqs, held):                              # rows hold their prefixes
            if n:
                SM.step_forward(w, pool, rope, torch.tensor(s[:n]), torch.arange(n),
                                torch.full((n,), r), [SM.Join(r, 0, n)])
        joins = [SM.Join(r, n, len(s) - n) for r, s, n in list(zip(order, seqs, held))[3:]]
        ids = [s[-1] for s in seqs[:3]] + [t for s, j in zip(seqs[3:], joins) for t in s[j.start:]]
        pos = held[:3] + [p for j in joins for p in range(j.start, j.start + j.n)]
        rows = [0, 1, 2] + [j.row for j in joins for _ in range(j.n)]
        logits = SM.step_forward(w, pool, rope, torch.tensor(ids), torch.tensor(pos),
                                 torch.tensor(rows), joins)
    assert logits.shape == (6, len(tok))
    for got, s in zip(logits, seqs):
        assert torch.allclose(got, _last_logits(model, s), atol=1e-4)


def _greedy_reference(model, tok, context: list[int], n: int) -> list[int]:
    """Greedy decoding by fresh full forwards (no cache): up to n tokens or the stop token."""
    out, stop = [], chat.stop_token_id(tok)
    while len(out) < n and (not out or out[-1] != stop):
        out.append(int(_last_logits(model, context + out).argmax()))
    return out


def test_requests_arriving_together_are_prefilled_in_one_step(qwen):
    """Four episodes' next contexts (each extending what its row holds by a different number of
    tokens) join in one step while another row decodes: each action equals greedy decoding by
    fresh forwards token for token, and its log-probs a fresh forward's."""
    import random
    from split import Sample
    tok, model = qwen
    smp = SM.BatchedSampler(model, tok)

    def run(reqs):
        later = smp._step(reqs)
        while later or smp._active:
            later = smp._step(later)

    with torch.inference_mode():        # driven here: nothing is submitted, the loop thread idles
        first = [SM._Request(SM._Row(), A.OwnReplies(tok).context(start(k)), 0.0, 6,
                             random.Random(0)) for k in range(5)]
        for q in first:
            run([q])
        nxt = [SM._Request(q.row, q.context + q.action + [7 + k] * (3 + 4 * k), 0.0, 8 + k,
                           random.Random(0)) for k, q in enumerate(first)]
        smp._step(nxt[4:])
        assert smp.max_joins == 1 and len(smp._active) == 1
        run(nxt[:4])
    assert smp.max_joins == 4
    for q in nxt:
        assert q.action == _greedy_reference(model, tok, q.context, q.max_new_tokens)
        sample = Sample(-1, q.context, q.action, q.logprobs, q.version)
        assert torch.allclose(torch.tensor(q.logprobs), full_forward_logprobs(model, sample, 0),
                              atol=1e-4)


def test_greedy_output_equals_the_per_episode_decoder_token_for_token(tiny):
    """Five episodes of different lengths and action budgets decode at once (rows join and leave
    at different steps, their caches are kept across 3 turns): each equals LocalPolicy alone."""
    tok, model = tiny
    budgets = [5, 9, 14, 7, 11]
    ref = [play(A.LocalPolicy(model, tok, temperature=0, max_new_tokens=n), k, 3)
           for k, n in enumerate(budgets)]
    smp = SM.BatchedSampler(model, tok)
    got = concurrently([lambda k=k, n=n: play(smp.policy(0, n), k, 3) for k, n in enumerate(budgets)])
    assert smp.step_rows > smp.steps, "no decode step ran more than one row"
    for r, g in zip(ref, got):
        assert [s.context_ids for s in g] == [s.context_ids for s in r]
        assert [s.action_ids for s in g] == [s.action_ids for s in r]
        for a, b in zip(r, g):
            assert torch.allclose(torch.tensor(b.logprobs), torch.tensor(a.logprobs), atol=1e-4)


def test_sampled_logprobs_equal_a_fresh_full_forward(tiny):
    tok, model = tiny
    smp = SM.BatchedSampler(model, tok)
    runs = concurrently([lambda k=k: play(smp.policy(TEMP, 6 + 3 * k, seed=k), k, 3)
                         for k in range(4)])
    for samples in runs:
        for s in samples:
            assert len(s.logprobs) == len(s.action_ids) and s.policy_version == 0
            assert torch.allclose(torch.tensor(s.logprobs), full_forward_logprobs(model, s, TEMP),
                                  atol=1e-4)


def test_a_request_alone_equals_the_same_request_among_others(qwen):
    """Padding, other rows' lengths and the batch size change nothing but rounding."""
    tok, model = qwen
    alone = play(SM.BatchedSampler(model, tok).policy(0, 12), 2, 3)
    smp = SM.BatchedSampler(model, tok)
    others = [lambda k=k: play(smp.policy(TEMP, 4 + 5 * k, seed=k), k, 2 + k % 3)
              for k in (0, 1, 3, 4, 5)]
    mixed = concurrently(others[:3] + [lambda: play(smp.policy(0, 12), 2, 3)] + others[3:])[3]
    assert smp.step_rows > smp.steps
    assert [s.action_ids for s in mixed] == [s.action_ids for s in alone]
    for a, b in zip(alone, mixed):
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5)


def test_a_context_that_does_not_extend_the_last_is_still_right(qwen):
    """A re-truncated history crops the row to the shared prefix: only the new tail is fed,
    and the result equals LocalPolicy's and a fresh forward."""
    tok, model = qwen
    ref = play(A.LocalPolicy(model, tok, temperature=0, max_new_tokens=10), 1, 4, retruncate_at=3)
    pol = SM.BatchedSampler(model, tok).policy(0, 10)
    got, fed = [], []
    messages = start(1)
    for t in range(4):
        if t == 3:
            messages = messages[:2] + [{"role": "user", "content": "[... earlier turns omitted ...]"}]
        before = pol.encoded_tokens
        reply = pol.act(messages, A.TOOLS)
        got.append(reply.sample)
        fed.append(pol.encoded_tokens - before - (len(reply.sample.action_ids) - 1))
        messages = observe(messages, reply.message, 1, t)
    assert [s.action_ids for s in got] == [s.action_ids for s in ref]
    held = got[2].context_ids + got[2].action_ids[:-1]
    assert fed[3] == len(got[3].context_ids) - A._common_prefix(held, got[3].context_ids)
    assert fed[1] == len(got[1].context_ids) - len(got[0].context_ids + got[0].action_ids[:-1])
    for s in got:
        assert torch.allclose(torch.tensor(s.logprobs), full_forward_logprobs(model, s, 0), atol=1e-4)


def test_the_rollouts_of_a_task_prefill_their_shared_start_once(qwen):
    tok, model = qwen
    smp = SM.BatchedSampler(model, tok)
    pols = [smp.policy(TEMP, 8, seed=j) for j in range(4)]
    replies = concurrently([lambda p=p: p.act(start(3), A.TOOLS) for p in pols])
    prefill = sorted(p.encoded_tokens - (len(r.sample.action_ids) - 1) for p, r in zip(pols, replies))
    assert prefill == [1, 1, 1, len(replies[0].sample.context_ids)]   # one full prefill, then copies
    for r in replies:
        assert torch.allclose(torch.tensor(r.sample.logprobs),
                              full_forward_logprobs(model, r.sample, TEMP), atol=1e-4)


def test_published_weights_apply_between_actions_and_samples_record_their_version(qwen):
    """Actions in flight finish on the weights they started with; later actions (their caches
    recomputed) are exact under the new weights, with the new version recorded."""
    tok, model = qwen
    model = copy.deepcopy(model)
    old = copy.deepcopy(model)
    new = copy.deepcopy(model)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    smp = SM.BatchedSampler(model, tok)
    pols = [smp.policy(TEMP, 40, seed=k) for k in range(3)]
    first = [p.act(start(k), A.TOOLS) for k, p in enumerate(pols)]   # rows hold old-weight K/V
    started = threading.Event()

    def episode(k):
        messages = observe(start(k), first[k].message, k, 0)
        out = []
        for t in range(1, 4):
            started.set()
            reply = pols[k].act(messages, A.TOOLS)
            out.append(reply.sample)
            messages = observe(messages, reply.message, k, t)
        return out

    def publisher():
        started.wait()
        smp.publish(new.state_dict(), 1)
    runs = concurrently([lambda k=k: episode(k) for k in range(3)] + [publisher])[:3]
    versions = sorted({s.policy_version for r in runs for s in r})
    assert versions == [0, 1] and all(s.policy_version == 0 for s in (r.sample for r in first))
    for s in [r.sample for r in first] + [s for r in runs for s in r]:
        weights = new if s.policy_version == 1 else old
        assert torch.allclose(torch.tensor(s.logprobs), full_forward_logprobs(weights, s, TEMP),
                              atol=1e-4)


def test_finished_episodes_give_their_rows_back(qwen):
    tok, model = qwen
    smp = SM.BatchedSampler(model, tok)
    for _ in range(3):
        concurrently([lambda k=k: len(play(smp.policy(0, 4), k, 2)) for k in range(5)])
    for _ in range(200):                                  # the loop frees released rows
        if all(o is None for o in smp._owner):
            break
        time.sleep(0.01)
    assert len(smp._owner) <= 8 and all(o is None for o in smp._owner)


def test_an_unsupported_architecture_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(SM.Unsupported, match="gpt2"):
        SM.BatchedSampler(model, chat.build_tiny_tokenizer())


def test_tokens_are_drawn_from_the_distribution_their_logprobs_state():
    """Sampling by inversion draws a ~ softmax(logits / T) (frequencies within 4σ over 20,000
    rows), greedy rows take the argmax, and every log-prob is log softmax(logits / T)[a]."""
    import random
    from types import SimpleNamespace
    logits = torch.tensor([[2.0, 0.5, -1.0, 1.5, 0.0]])
    n, T = 20_000, 0.8
    reqs = [SM._Request(SM._Row(), [1], T if k < n else 0.0, 99, random.Random(k))
            for k in range(n + 3)]
    done = SM.BatchedSampler._sample(SimpleNamespace(_stop=-1), reqs, logits.expand(n + 3, 5))
    probs = torch.softmax(logits[0] / T, -1)
    freq = torch.bincount(torch.tensor([q.action[0] for q in reqs[:n]]), minlength=5) / n
    assert (freq - probs).abs().max() < 4 * (0.25 / n) ** 0.5
    assert [q.action[0] for q in reqs[n:]] == [0, 0, 0] and not any(done)
    logp = torch.log_softmax(logits[0] / T, -1)
    assert all(abs(q.logprobs[0] - float(logp[q.action[0]])) < 1e-6 for q in reqs[:n])
    assert abs(reqs[n].logprobs[0] - float(torch.log_softmax(logits[0], -1)[0])) < 1e-6
