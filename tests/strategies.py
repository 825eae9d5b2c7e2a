"""Every hypothesis strategy of the suite lives here (one place, STYLE.md).

Sections: trajectories (split), kernels (shapes, layouts), rubric trees (judge), RL (advantages).
Each section is owned by the module it tests; add to your section only.
"""
from hypothesis import strategies as st  # noqa: F401


# ----------------------------------------------------------------------------- split
import random  # noqa: E402


def word_count(message: dict) -> int:
    """A deterministic stand-in tokenizer for splitter properties: 2 tokens of role header and
    end, one per whitespace-separated word, 2 per tool call plus 2 per argument."""
    n = 2 + len(str(message.get("content") or "").split())
    for call in message.get("tool_calls") or []:
        n += 2 + sum(2 + len(str(v).split()) for v in call["function"]["arguments"].values())
    return n


def _words(rng: random.Random, n: int) -> str:
    return " ".join(f"w{rng.randrange(1000)}" for _ in range(n))


def make_trajectory(seed: int, n_turns: int, prefix_obs: int, long_obs_rate: float,
                    long_len: int, tid: str = "t") -> dict:
    """A trajectory record: system + user task + paper reading (p), then n_turns turns whose
    observations are 1-40 words, or `long_len` words with probability long_obs_rate."""
    rng = random.Random(seed)
    call = lambda n, cmd: {"id": f"c{n}", "type": "function",  # noqa: E731
                           "function": {"name": "bash", "arguments": {"cmd": cmd}}}
    msgs = [{"role": "system", "content": "you are an agent"},
            {"role": "user", "content": _words(rng, 5)},
            {"role": "assistant", "content": "", "tool_calls": [call(0, "cat paper.md")]},
            {"role": "tool", "tool_call_id": "c0", "content": _words(rng, prefix_obs)}]
    for n in range(1, n_turns + 1):
        msgs.append({"role": "assistant", "content": _words(rng, rng.randrange(0, 4)),
                     "tool_calls": [call(n, _words(rng, rng.randrange(1, 5)))]})
        k = long_len if rng.random() < long_obs_rate else rng.randrange(1, 40)
        msgs.append({"role": "tool", "tool_call_id": f"c{n}", "content": _words(rng, k)})
        if rng.random() < 0.05:
            msgs.append({"role": "user", "content": "Time used: 1 hour. Time left: 5 hours."})
    return {"id": tid, "task_id": "task", "messages": msgs, "prefix_len": 4}


@st.composite
def split_cases(draw, max_turns: int = 2000):
    """(trajectory record, SplitConfig kwargs) with L_max 160-1024 and a prefix that fits."""
    context_len = draw(st.integers(160, 1024))
    n_turns = draw(st.one_of(st.integers(1, 30), st.integers(1, max_turns)))
    prefix_obs = draw(st.integers(0, context_len // 3))
    long_len = draw(st.integers(context_len, 2 * context_len))
    rec = make_trajectory(draw(st.integers(0, 2**31)), n_turns, prefix_obs,
                          draw(st.sampled_from([0.0, 0.01, 0.1])), long_len)
    cfg = dict(context_len=context_len, overlap=draw(st.integers(0, 96)),
               history=draw(st.sampled_from([0.0, 0.25, 0.5])),
               keep=draw(st.sampled_from([(1.0, 0.5, 0.25, 0.1), (1.0,), (0.5, 0.0), (0.3, 0.2)])),
               supervise_overlap=draw(st.booleans()))
    return rec, cfg


# ----------------------------------------------------------------------------- factory


@st.composite
def synthetic_specs(draw, m_range: tuple[int, int] = (2, 12)):
    """A synthetic task spec (factory.SyntheticSpec): two tags from their pools, M items."""
    from factory import TAGS_R, TAGS_W, SyntheticSpec
    return SyntheticSpec(task_id=f"syn-t-{draw(st.integers(0, 999)):05d}",
                         tag_w=draw(st.sampled_from(TAGS_W)), tag_r=draw(st.sampled_from(TAGS_R)),
                         m=draw(st.integers(*m_range)))


# ----------------------------------------------------------------------------- kernels: masked_attention
def pack_layout(docs: list[tuple[int, list[int]]]) -> tuple[list[int], list[int]]:
    """(doc ids, seg ids) of one packed row [p | s₁ | s₂ | …] per document, documents one after
    another: docs = [(prefix length, [segment lengths]), ...]. seg 0 = the prefix."""
    doc, seg = [], []
    for d, (prefix, segments) in enumerate(docs):
        doc += [d] * (prefix + sum(segments))
        seg += [0] * prefix
        for i, n in enumerate(segments, start=1):
            seg += [i] * n
    return doc, seg


@st.composite
def packed_layouts(draw, max_rows: int = 2, max_docs: int = 4, max_segments: int = 5,
                   max_prefix: int = 40, max_segment: int = 24, max_len: int = 128):
    """[B][S] doc and seg ids of packed shared-prefix rows: per row 1..max_docs documents, each a
    prefix of 0..max_prefix tokens (empty allowed) and 0..max_segments segments of
    1..max_segment tokens (one-token segments included), at most max_len tokens in all; shorter
    rows are padded to the longest with a padding document (its own doc id, seg 0)."""
    rows = []
    for _ in range(draw(st.integers(1, max_rows))):
        docs, left = [], max_len
        for _ in range(draw(st.integers(1, max_docs))):
            if left == 0:
                break
            prefix = draw(st.integers(0, min(max_prefix, left)))
            left -= prefix
            segments = []
            for _ in range(draw(st.integers(0, max_segments))):
                if left == 0:
                    break
                n = draw(st.integers(1, min(max_segment, left)))
                segments.append(n)
                left -= n
            if prefix + sum(segments) == 0:   # a document has at least one token
                prefix, left = 1, left - 1
            docs.append((prefix, segments))
        rows.append(pack_layout(docs))
    S = max(len(doc) for doc, _ in rows)
    doc_ids = [doc + [max(doc) + 1] * (S - len(doc)) for doc, _ in rows]
    seg_ids = [seg + [0] * (S - len(seg)) for _, seg in rows]
    return doc_ids, seg_ids
