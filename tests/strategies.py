"""Every hypothesis strategy of the suite lives here (one place, docs/STYLE.md).

Sections: trajectories (split), kernels (shapes, layouts), rubric trees (judge), RL (advantages).
Each section is owned by the module it tests; add to your section only.
"""
from hypothesis import strategies as st  # noqa: F401


# ----------------------------------------------------------------------------- split
import random  # noqa: E402

from hypothesis import settings  # noqa: E402

SPLIT_EXAMPLES = max(200, settings.default.max_examples)
"""Examples per splitting invariant: ≥ 200 in the "ci" profile, the profile's count above that
("thorough": 2,000; tests/conftest.py)."""


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
    """(trajectory record, SplitConfig kwargs) with L_max 160-1024 and a prefix that leaves room
    for the reserve (48-64 tokens: ≥ the shortest cut of any generated turn, 48) plus the newest
    turn cut to its shortest and the omission marker (p is 22 tokens + the paper reading)."""
    context_len = draw(st.integers(160, 1024))
    n_turns = draw(st.one_of(st.integers(1, 30), st.integers(1, max_turns)))
    prefix_obs = draw(st.integers(0, max(0, min(context_len // 3, context_len - 160))))
    long_len = draw(st.integers(context_len, 2 * context_len))
    rec = make_trajectory(draw(st.integers(0, 2**31)), n_turns, prefix_obs,
                          draw(st.sampled_from([0.0, 0.01, 0.1])), long_len)
    cfg = dict(context_len=context_len, overlap=draw(st.integers(0, 96)),
               history=draw(st.sampled_from([0.0, 0.25, 0.5])),
               keep=draw(st.sampled_from([(1.0, 0.5, 0.25, 0.1), (1.0,), (0.5, 0.0), (0.3, 0.2)])),
               supervise_overlap=draw(st.booleans()), reserve=draw(st.integers(48, 64)))
    return rec, cfg


# ----------------------------------------------------------------------------- factory


@st.composite
def synthetic_specs(draw, m_range: tuple[int, int] = (2, 12)):
    """A synthetic task spec (synthetic.SyntheticSpec): two tags from their pools, M items."""
    from synthetic import TAGS_R, TAGS_W, SyntheticSpec
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


# ----------------------------------------------------------------------------- kernels: fused_loss
@st.composite
def fused_loss_cases(draw, max_n: int = 96, max_h: int = 48, max_v: int = 1200):
    """Shapes and options of one fused-loss call: N tokens (1..max_n), hidden H, vocabulary V
    (awkward sizes: rarely multiples of the kernel's blocks), tokens per chunk, temperature,
    share of ignored targets, bias or not, entropy or not, dtype name, and a seed for the tensors."""
    n = draw(st.integers(1, max_n))
    return dict(n=n, h=draw(st.integers(1, max_h)), v=draw(st.integers(2, max_v)),
                chunk_rows=draw(st.integers(1, n)),
                temperature=draw(st.sampled_from([1.0, 0.6, 1.7])),
                ignore_frac=draw(st.sampled_from([0.0, 0.3, 1.0])),
                bias=draw(st.booleans()), entropy=draw(st.booleans()),
                dtype=draw(st.sampled_from(["float32", "bfloat16"])),
                seed=draw(st.integers(0, 2**31 - 1)))


# ----------------------------------------------------------------------------- judge: rubric trees
JUDGE_CATEGORIES = ("Code Development", "Code Execution", "Result Analysis")


@st.composite
def rubric_dicts(draw, max_depth: int = 4, max_children: int = 4, max_weight: int = 3):
    """A PaperBench rubric.json tree as a dict: ids "n0", "n1", … (unique, in creation order),
    integer weights 0..max_weight (0 included: legal and frequent enough to matter), categories on
    leaves only, internal nodes with 1..max_children children down to max_depth."""
    ids = iter(range(10**9))

    def node(depth: int) -> dict:
        nid = f"n{next(ids)}"
        weight = draw(st.integers(0, max_weight))
        n_kids = 0 if depth == max_depth else draw(st.integers(0, max_children))
        if n_kids == 0:
            return {"id": nid, "requirements": f"requirement {nid}", "weight": weight,
                    "sub_tasks": [], "task_category": draw(st.sampled_from(JUDGE_CATEGORIES)),
                    "finegrained_task_category": None}
        return {"id": nid, "requirements": f"requirement {nid}", "weight": weight,
                "sub_tasks": [node(depth + 1) for _ in range(n_kids)], "task_category": None,
                "finegrained_task_category": None}
    return node(0)


def rubric_leaf_ids(tree: dict) -> list[str]:
    """Leaf ids of a rubric dict, depth first."""
    if not tree["sub_tasks"]:
        return [tree["id"]]
    return [i for c in tree["sub_tasks"] for i in rubric_leaf_ids(c)]


@st.composite
def graded_rubrics(draw, **kwargs):
    """(rubric dict, {leaf id: (score 0/1, valid)}) with about one leaf in eight invalid."""
    tree = draw(rubric_dicts(**kwargs))
    grades = {i: (float(draw(st.booleans())), draw(st.integers(0, 7)) > 0)
              for i in rubric_leaf_ids(tree)}
    return tree, grades


# ----------------------------------------------------------------------------- sandbox
_OUTPUT_PIECES = [b"plain text ", b"line\n", b"\x1b[31mred\x1b[0m", b"\x1b]0;title\x07",
                  b"\rprogress 10%", b"\rprogress 100%", b"\r\n", b"\xff\xfe", b"\xe2\x82",
                  "caf\u00e9 \u00fc\u4e2d\n".encode(), b"\t", b"x" * 300]


@st.composite
def shell_outputs(draw, max_pieces: int = 400):
    """Raw bytes a command may print: text, ANSI escapes (CSI and OSC), `\\r` progress bars,
    CRLF, invalid or cut UTF-8, long runs; up to ~120 KB."""
    pieces = draw(st.lists(st.sampled_from(_OUTPUT_PIECES), max_size=max_pieces))
    return b"".join(pieces) + draw(st.binary(max_size=64))


def sandbox_relpaths():
    """Relative file paths under the submission folder: 1-3 safe components."""
    part = st.text("abcdefghijklmnopqrstuvwxyz0123456789_-", min_size=1, max_size=12)
    return st.lists(part, min_size=1, max_size=3).map("/".join)


@st.composite
def blacklist_urls(draw):
    """(a blacklisted repository URL, a spelling of it that must match, a near miss that must not)."""
    name = st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=2, max_size=10)
    owner, repo = draw(name), draw(name)
    url = f"https://github.com/{owner}/{repo}"
    spelling = draw(st.sampled_from([
        f"https://github.com/{owner}/{repo}", f"http://github.com/{owner}/{repo}.git",
        f"git clone https://www.github.com/{owner}/{repo}/", f"git@github.com:{owner}/{repo}.git",
        f"github.com/{owner}/{repo}/tree/main", f"HTTPS://GITHUB.COM/{owner.upper()}/{repo}"]))
    near_miss = draw(st.sampled_from([f"https://github.com/{owner}/{repo}2",
                                      f"https://github.com/{owner}/{repo}-fork",
                                      f"https://github.com/{owner}x/{repo}",
                                      f"https://gitlab.com/{owner}/{repo}"]))
    return url, spelling, near_miss
