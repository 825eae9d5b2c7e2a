"""Rubric-tree judging: PaperBench rubrics, leaf graders, the reproduction step, aggregation and
judge agreement (the priority queue that runs judge jobs is judge_queue.py).

Paper: KLong trains and evaluates on PaperBench (Starace et al., arXiv 2504.01848; see
docs/PAPERBENCH.md). A replication is scored by a rubric tree: each leaf is graded 0 or 1
by a judge, an internal node is the weighted mean of its children, and the paper's score is the
root's. In progressive RL that root score is the reward Q_j of rollout j (docs/ARCHITECTURE.md 5); KLong
judged with gpt-oss-120b after checking that it ranks submissions like o3-mini (section 7 here).

    score(leaf) ∈ {0, 1}   (an invalid leaf counts 0 and is counted)
    score(n)    = Σ_c w_c · score(c) / Σ_c w_c,   and 0 when Σ_c w_c = 0

Sections: 1 rubric trees, 2 graded trees and aggregation, 3 evidence, 4 leaf graders (LLM endpoint,
local transformers model, executable checks), 5 reproduction, 6 grade_submission, 7 agreement, 8 CLI.

Departures from PaperBench's SimpleJudge, and gaps it leaves (each repeated where it happens):
- Executable checks: a leaf may carry `"check": "<shell command>"`, a field of our own (PaperBench
  ignores it), run with cwd=/home/submission in a sandbox holding a copy of the submission; exit 0
  scores 1. Synthetic tasks are graded exactly and offline this way.
- Token budgets: the endpoint judge counts ≈ 4 characters per token (no tiktoken here); the local
  model counts with its own tokenizer.
- The answer is parsed from its Expectations / Reality / Score sections directly; PaperBench asks a
  second model to turn it into JSON. An unparsable answer is asked again (`parse_attempts`), then
  the leaf is invalid.
- Long logs keep head and tail around a marker (PaperBench keeps the head); repeated lines that
  differ only in their digits are collapsed first.
- The file listing shown for ranking is one path per line, cut to the budget (PaperBench draws a tree
  and retries at depth 4). Symlinks in the submission are never read (they could point at the host).
- Never a silent 0 (docs/ARCHITECTURE.md 6: a failed rollout leaves the group, it is not scored
  0). An endpoint still failing after its retries raises JudgeUnavailable: the whole grading
  fails. A leaf's own unusable answer (or a request the endpoint refuses) makes that leaf invalid
  and counted; when invalid leaves hold more than `max_invalid` (10 %) of the rubric's weight
  (invalid_share), grade_submission raises InvalidJudgment instead of returning a score. HTTP
  401/403/404 raise JudgeAccessError at the first call (the first leaf is judged alone) and every
  later call fails at once. PaperBench scores invalid leaves 0 and reports the run.
- Reproduction runs by default when Code Execution / Result Analysis leaves are graded from
  evidence (PaperBench: whenever the rubric has them); a leaf with an executable check reads the
  submission as it is, so synthetic tasks (all checks, no reproduce.sh) are not reproduced.
- Duplicate ids on different branches are rejected, naming both tree paths; an id repeated down
  one path (PaperBench's hex_flag_context fixture restates its root) is accepted. Nodes are
  addressed by tree position, a tuple of child indices from the root.
- Graded trees are read as leniently as PaperBench's models: `valid_score` may be the number 0 or
  1 (JudgeEval's `pinn` tree has 1.0); fields we do not know are kept.
- Agreement: invalid leaves are left out of the F1 and counted (PaperBench drops any subtree that
  holds an invalid leaf).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Mapping, Protocol, Sequence

from tqdm import tqdm

from cli import Parser, UserError, is_user_error, one_line
from endpoint import (ChatEndpoint, EndpointAccessError, EndpointRequestError,
                      EndpointUnavailable)

NodePath = tuple[int, ...]   # a node's address: child indices from the root; () is the root

CATEGORIES = ("Code Development", "Code Execution", "Result Analysis")
CODE_DEV, CODE_EXEC, RESULT_ANALYSIS = CATEGORIES
FINEGRAINED = ("Environment & Infrastructure Setup", "Dataset and Model Acquisition",
               "Data Processing & Preparation", "Method Implementation", "Experimental Setup",
               "Evaluation, Metrics & Benchmarking", "Logging, Analysis & Presentation")
GRADED_FIELDS = ("score", "valid_score", "explanation", "judge_metadata")
SUBMISSION = "/home/submission"   # the submission's path inside every sandbox tier

# ============================================================================ 1. rubric trees


class RubricError(ValueError):
    """A rubric or graded tree that breaks the format: which file, where in the tree, which field,
    what was expected and what was found."""

    def __init__(self, where: str, field: str, expected: str, got: object = None,
                 node_id: object = None, file: str | os.PathLike | None = None):
        self.where, self.field, self.expected, self.got, self.file = where, field, expected, got, file
        got_s = repr(got)
        got_s = got_s if len(got_s) <= 80 else got_s[:77] + "..."
        ident = f" (id {node_id!r})" if node_id is not None else ""
        prefix = f"{file}: " if file else ""
        super().__init__(f"{prefix}node {where}{ident}: field '{field}': expected {expected}, "
                         f"got {got_s}")


@dataclass
class RubricNode:
    """One node of a PaperBench rubric.json. Unknown fields and the source's key order are kept, so
    a load/save round trip gives the same JSON."""
    id: str
    requirements: str
    weight: int | float
    sub_tasks: list[RubricNode] = field(default_factory=list)
    task_category: str | None = None              # leaves only: one of CATEGORIES
    finegrained_task_category: str | None = None  # leaves only, optional: one of FINEGRAINED
    check: str | None = None                      # leaves only, ours: shell command, exit 0 = pass
    extra: dict = field(default_factory=dict)     # fields this module does not know, as they came
    key_order: tuple[str, ...] = ()               # the source's key order ("" for built nodes)

    @property
    def is_leaf(self) -> bool:
        return not self.sub_tasks

    def walk(self, path: NodePath = ()) -> Iterator[tuple[NodePath, RubricNode]]:
        """Every node with its position, depth first, parents before children."""
        yield path, self
        for i, child in enumerate(self.sub_tasks):
            yield from child.walk(path + (i,))

    def leaves(self) -> list[tuple[NodePath, RubricNode]]:
        return [(p, n) for p, n in self.walk() if n.is_leaf]

    def at(self, path: NodePath) -> RubricNode:
        node = self
        for i in path:
            node = node.sub_tasks[i]
        return node

    def prior_nodes(self, path: NodePath) -> list[RubricNode]:
        """Context for grading the node at `path` (PaperBench's preceding criteria): its ancestors,
        the earlier siblings of it and of each ancestor, in tree order."""
        nodes, node = [self], self
        for i in path:
            nodes += node.sub_tasks[: i + 1]
            node = node.sub_tasks[i]
        return nodes[:-1]

    def to_dict(self) -> dict:
        values = {"id": self.id, "requirements": self.requirements, "weight": self.weight,
                  "sub_tasks": [c.to_dict() for c in self.sub_tasks],
                  "task_category": self.task_category,
                  "finegrained_task_category": self.finegrained_task_category,
                  "check": self.check, **self.extra}
        always = ("id", "requirements", "weight", "sub_tasks", "task_category")
        out = {k: values[k] for k in self.key_order if k in values}
        for k, v in values.items():   # fields the source did not have: only when they say something
            if k not in out and (v is not None or (not self.key_order and k in always)):
                out[k] = v
        return out


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_tree(d: object, where: str, graded: bool, file) -> None:
    """Raise RubricError at the first node (depth first) that breaks PaperBench's format."""
    if not isinstance(d, dict):
        raise RubricError(where, "(node)", "a JSON object", d, file=file)
    nid = d.get("id")

    def need(name: str, ok: Callable[[object], bool], expected: str) -> object:
        if name not in d:
            raise RubricError(where, name, expected + " (the field is required)", None, nid, file)
        if not ok(d[name]):
            raise RubricError(where, name, expected, d[name], nid, file)
        return d[name]

    need("id", lambda v: isinstance(v, str) and v != "", "a non-empty string")
    need("requirements", lambda v: isinstance(v, str), "a string")
    need("weight", lambda v: _is_number(v) and v >= 0, "a number >= 0")
    subs = need("sub_tasks", lambda v: isinstance(v, list), "a list of nodes")
    cat, fine, check = d.get("task_category"), d.get("finegrained_task_category"), d.get("check")
    if subs:
        for name, v in (("task_category", cat), ("finegrained_task_category", fine)):
            if v is not None:
                raise RubricError(where, name, "null on an internal node (categories belong to "
                                  "leaves)", v, nid, file)
        if check is not None:
            raise RubricError(where, "check", "no check on an internal node", check, nid, file)
    else:
        if cat not in CATEGORIES:
            raise RubricError(where, "task_category", f"one of {list(CATEGORIES)} on a leaf",
                              cat, nid, file)
        if fine is not None and fine not in FINEGRAINED:
            raise RubricError(where, "finegrained_task_category",
                              f"null or one of {list(FINEGRAINED)}", fine, nid, file)
        if check is not None and not (isinstance(check, str) and check.strip()):
            raise RubricError(where, "check", "a non-empty shell command", check, nid, file)
    if graded:   # lenient as PaperBench's models: valid_score may be a number 0 or 1
        need("score", lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]")
        need("valid_score", lambda v: isinstance(v, bool) or (_is_number(v) and v in (0, 1)),
             "true or false (or the number 0 or 1)")
    for i, child in enumerate(subs):
        _check_tree(child, f"{where}.sub_tasks[{i}]", graded, file)


def _check_ids(d: dict, file) -> None:
    """Raise RubricError naming both tree paths when two nodes on different branches share an id.
    An id repeated down one path (a node restating an ancestor, as PaperBench's own
    hex_flag_context fixture does) is accepted: no grade or context lookup can confuse them."""
    seen: dict[str, list[str]] = {}   # id -> paths of the nodes holding it
    stack = [(d, "$")]
    while stack:
        node, where = stack.pop()
        for other in seen.get(node["id"], []):
            if not (where.startswith(other + ".") or other.startswith(where + ".")):
                first, second = sorted((other, where))
                raise RubricError(second, "id", f"an id of its own (node {first} has it too)",
                                  node["id"], file=file)
        seen.setdefault(node["id"], []).append(where)
        stack += [(c, f"{where}.sub_tasks[{i}]") for i, c in enumerate(node["sub_tasks"])]


def _node_from_dict(d: dict) -> RubricNode:
    known = ("id", "requirements", "weight", "sub_tasks", "task_category",
             "finegrained_task_category", "check") + GRADED_FIELDS
    return RubricNode(id=d["id"], requirements=d["requirements"], weight=d["weight"],
                      sub_tasks=[_node_from_dict(c) for c in d["sub_tasks"]],
                      task_category=d.get("task_category"),
                      finegrained_task_category=d.get("finegrained_task_category"),
                      check=d.get("check"),
                      extra={k: v for k, v in d.items() if k not in known},
                      key_order=tuple(k for k in d if k not in GRADED_FIELDS))


def validate_rubric(rubric: RubricNode | dict, file: str | os.PathLike | None = None) -> None:
    """Raise RubricError (file, tree path, field, expectation) unless `rubric` is a valid tree."""
    d = rubric.to_dict() if isinstance(rubric, RubricNode) else rubric
    _check_tree(d, "$", False, file)
    _check_ids(d, file)


def rubric_from_dict(d: dict, file: str | os.PathLike | None = None) -> RubricNode:
    validate_rubric(d, file)
    return _node_from_dict(d)


def _read_json(path: str | os.PathLike) -> object:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise RubricError(f"at line {e.lineno} column {e.colno}", "(JSON)", "valid JSON", e.msg,
                          file=path) from None
    except UnicodeDecodeError as e:          # a binary file given as JSON
        raise RubricError(f"at byte {e.start + 1}", "(JSON)", "UTF-8 JSON text",
                          "bytes that are not UTF-8 (a binary file?)", file=path) from None


def load_rubric(path: str | os.PathLike) -> RubricNode:
    return rubric_from_dict(_read_json(path), file=path)


def save_rubric(rubric: RubricNode, path: str | os.PathLike) -> None:
    """Write rubric.json as PaperBench does (4-space indent); refuses an invalid tree."""
    validate_rubric(rubric, path)
    Path(path).write_text(json.dumps(rubric.to_dict(), indent=4, ensure_ascii=False))


def rubric_stats(rubric: RubricNode) -> dict:
    """What `judge.py validate` prints: node and leaf counts, leaves per category, depth (root 0)."""
    nodes = list(rubric.walk())
    by_category: dict[str, int] = {}
    for _, leaf in rubric.leaves():
        by_category[leaf.task_category] = by_category.get(leaf.task_category, 0) + 1
    return {"nodes": len(nodes), "leaves": sum(by_category.values()),
            "by_category": {c: by_category[c] for c in CATEGORIES if c in by_category},
            "max_depth": max(len(p) for p, _ in nodes)}


def code_dev_rubric(rubric: RubricNode) -> RubricNode | None:
    """PaperBench's Code-Dev variant: only Code Development leaves; an internal node left without
    children goes too (None when nothing is left)."""
    if rubric.is_leaf:
        return rubric if rubric.task_category == CODE_DEV else None
    kept = [c for c in (code_dev_rubric(s) for s in rubric.sub_tasks) if c is not None]
    return replace(rubric, sub_tasks=kept) if kept else None


def resources_provided_rubric(rubric: RubricNode) -> RubricNode:
    """PaperBench's "resources provided" variant: Dataset and Model Acquisition leaves weigh 0."""
    if rubric.is_leaf:
        acquired = rubric.finegrained_task_category == "Dataset and Model Acquisition"
        return replace(rubric, weight=0) if acquired else rubric
    return replace(rubric, sub_tasks=[resources_provided_rubric(s) for s in rubric.sub_tasks])

# ============================================================ 2. graded trees and aggregation


@dataclass
class Verdict:
    """One leaf's grade: PaperBench's {valid_score, score, explanation} and what the grader saw."""
    score: float             # 0 or 1; counted as 0 when not valid
    valid: bool              # False: the grading failed for this leaf (it counts 0 and is counted)
    explanation: str
    metadata: dict | None = None


@dataclass
class GradedNode:
    """A rubric node with PaperBench's graded fields (score, valid_score, explanation,
    judge_metadata)."""
    node: RubricNode
    score: float
    valid_score: bool
    explanation: str
    judge_metadata: dict | None
    sub_tasks: list[GradedNode]

    def leaves(self, path: NodePath = ()) -> Iterator[tuple[NodePath, GradedNode]]:
        if not self.sub_tasks:
            yield path, self
        for i, child in enumerate(self.sub_tasks):
            yield from child.leaves(path + (i,))

    def invalid_leaves(self) -> int:
        return sum(not g.valid_score for _, g in self.leaves())

    def to_dict(self) -> dict:
        """PaperBench's graded JSON: the rubric fields, the graded fields, then sub_tasks."""
        out = {k: v for k, v in self.node.to_dict().items() if k != "sub_tasks"}
        out.update(score=self.score, valid_score=self.valid_score, explanation=self.explanation,
                   judge_metadata=self.judge_metadata,
                   sub_tasks=[c.to_dict() for c in self.sub_tasks])
        return out

    @classmethod
    def from_dict(cls, d: dict, file: str | os.PathLike | None = None) -> GradedNode:
        _check_tree(d, "$", True, file)
        _check_ids(d, file)
        return cls._build(d)

    @classmethod
    def _build(cls, d: dict) -> GradedNode:
        node = _node_from_dict({**d, "sub_tasks": []})
        kids = [cls._build(c) for c in d["sub_tasks"]]
        node.sub_tasks = [k.node for k in kids]
        return cls(node, d["score"], bool(d["valid_score"]), d.get("explanation", ""),
                   d.get("judge_metadata"), kids)


def load_graded(path: str | os.PathLike) -> GradedNode:
    return GradedNode.from_dict(_read_json(path), file=path)


def weighted_mean(scores: Sequence[float], weights: Sequence[float]) -> float:
    """Σ w·s / Σ w, and 0 when the weights sum to 0 (PaperBench's score_from_children)."""
    total = sum(weights)
    return sum(w * s for w, s in zip(weights, scores)) / total if total > 0 else 0.0


def recompute(graded: GradedNode) -> GradedNode:
    """Every internal score again from the leaves; an invalid leaf counts 0. A node is valid when
    all its children are."""
    if not graded.sub_tasks:
        return replace(graded, score=graded.score if graded.valid_score else 0.0)
    kids = [recompute(c) for c in graded.sub_tasks]
    return replace(graded, sub_tasks=kids, valid_score=all(k.valid_score for k in kids),
                   score=weighted_mean([k.score for k in kids], [k.node.weight for k in kids]))


def leaf_shares(node: RubricNode | GradedNode, share: float = 1.0,
                path: NodePath = ()) -> dict[NodePath, float]:
    """Each leaf's share of the root score: the product down its path of w_c / Σ_siblings w
    (0 under a node whose children weigh 0 in all). The shares sum to 1 unless weights are 0."""
    kids = node.sub_tasks
    rubric_kids = [k.node if isinstance(k, GradedNode) else k for k in kids]
    if not kids:
        return {path: share}
    total = sum(k.weight for k in rubric_kids)
    out: dict[NodePath, float] = {}
    for i, (k, rk) in enumerate(zip(kids, rubric_kids)):
        out.update(leaf_shares(k, share * rk.weight / total if total > 0 else 0.0, path + (i,)))
    return out


def invalid_share(graded: GradedNode) -> float:
    """The share of the root score held by invalid leaves (leaf_shares). When every leaf weighs
    0 (a degenerate tree), the share of invalid leaves by count instead."""
    shares = leaf_shares(graded)
    leaves = dict(graded.leaves())
    if sum(shares.values()) == 0:
        return sum(not g.valid_score for g in leaves.values()) / len(leaves)
    return sum(s for p, s in shares.items() if not leaves[p].valid_score)


def aggregate(rubric: RubricNode, verdicts: Mapping[NodePath, Verdict]) -> GradedNode:
    """The graded tree of `rubric` from one verdict per leaf (keyed by tree position)."""
    def build(node: RubricNode, path: NodePath) -> GradedNode:
        if node.is_leaf:
            if path not in verdicts:
                raise ValueError(f"no verdict for the leaf at {list(path)} (id {node.id!r})")
            v = verdicts[path]
            return GradedNode(node, v.score, v.valid, v.explanation, v.metadata, [])
        return GradedNode(node, 0.0, True, f"Aggregated from {len(node.sub_tasks)} sub-tasks.",
                          None, [build(c, path + (i,)) for i, c in enumerate(node.sub_tasks)])
    return recompute(build(rubric, ()))

# ============================================================================ 3. evidence

SKIP_DIRS = ("venv", ".venv", ".env", "wandb", ".egg-info", ".git", ".github", "__pycache__",
             "node_modules")   # a directory whose name contains one of these is not read
DOC_EXT = {".md", ".txt", ".rst"}
CODE_EXT = {".py", ".R", ".Rmd", ".m", ".jl", ".c", ".h", ".cpp", ".hpp", ".cc", ".cxx", ".hxx",
            ".java", ".js", ".ts", ".scala", ".go", ".rs", ".sh", ".config", ".cfg", ".json",
            ".yaml", ".yml", ".toml", ".ini"}
TABLE_EXT = {".csv", ".tsv", ".psv", ".json", ".jsonl", ".html", ".xml", ".yaml", ".yml", ".toml",
             ".arff", ".tex", ".svm", ".libsvm"}
FILE_CAP_BYTES = 200_000   # PaperBench reads at most 200 kB of a file
MISSING = "(does not exist)"


TEXT_CAP_BYTES = 2_000_000  # paper, addendum, log: head and tail (a log's results come last)


def read_text(path: Path, cap: int = FILE_CAP_BYTES, tail: bool = False) -> str:
    """At most `cap` bytes of a file, decoded with replacement: its head, or head and tail."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size <= cap or not tail:
            return f.read(cap).decode("utf-8", errors="replace")
        head = f.read(cap // 2)
        f.seek(size - cap // 2)
        return (head + f"\n[... {size - cap} bytes omitted ...]\n".encode() + f.read()).decode(
            "utf-8", errors="replace")


def eligible_files(root: Path, category: str, since: float) -> list[str]:
    """Files the judge may read for a leaf of `category` (relative POSIX paths, sorted walk):
    docs and code for Code Development / Execution; docs, plus tables written at or after `since`
    (the reproduction's start), for Result Analysis. Symlinks are skipped."""
    exts = DOC_EXT | (TABLE_EXT if category == RESULT_ANALYSIS else CODE_EXT)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not any(s in d for s in SKIP_DIRS))
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if p.suffix not in exts or p.is_symlink():
                continue
            if category == RESULT_ANALYSIS and p.suffix not in DOC_EXT and p.stat().st_mtime < since:
                continue
            out.append(p.relative_to(root).as_posix())
    return out


def reduce_log(text: str) -> str:
    """A log as the judge sees it: `\\r` progress redraws keep their last state, and runs of more
    than three lines that differ only in their digits keep the first and last line."""
    lines = [ln.rstrip("\r").rsplit("\r", 1)[-1] for ln in text.split("\n")]
    shape = [re.sub(r"\d+", "#", ln) for ln in lines]
    out, i = [], 0
    while i < len(lines):
        j = i
        while j + 1 < len(lines) and shape[j + 1] == shape[i]:
            j += 1
        if j - i + 1 > 3:
            out += [lines[i], f"[... {j - i - 1} similar lines omitted ...]", lines[j]]
        else:
            out += lines[i: j + 1]
        i = j + 1
    return "\n".join(out)


@dataclass
class Evidence:
    """What a judge may see of one submission: read once, shared by every leaf."""
    dir: Path                    # the submission (after reproduction, when it ran)
    paper: str                   # the task's paper.md
    addendum: str                # the task's addendum.md
    reproduce_sh: str            # MISSING when absent
    reproduce_log: str           # reduced (reduce_log); MISSING when absent
    repro_start: float           # epoch s: reproduce.log.creation_time, else the log's mtime, else now
    code_dev: bool               # Code-Dev run: no script or log in the prompts
    files: dict[str, list[str]]  # category -> eligible relative paths
    touched: bool                # reproduction wrote some Result Analysis file after it started


def collect_evidence(task_dir: str | os.PathLike, submission_dir: str | os.PathLike,
                     code_dev: bool = False) -> Evidence:
    task, sub = Path(task_dir), Path(submission_dir)

    def text(p: Path, default: str, cap: int = TEXT_CAP_BYTES) -> str:
        return read_text(p, cap, tail=True) if p.is_file() and not p.is_symlink() else default

    log_path, stamp = sub / "reproduce.log", sub / "reproduce.log.creation_time"
    start = time.time()   # no reproduction: nothing counts as written by it (PaperBench)
    if log_path.is_file():
        start = log_path.stat().st_mtime
    if stamp.is_file() and text(stamp, "").strip().isdigit():
        start = float(text(stamp, "").strip())
    files = {c: eligible_files(sub, c, start) for c in CATEGORIES}
    touched = any((sub / f).stat().st_mtime >= start for f in files[RESULT_ANALYSIS])
    return Evidence(dir=sub, paper=text(task / "paper.md", "(no paper.md in the task folder)"),
                    addendum=text(task / "addendum.md", "(no addendum given)"),
                    reproduce_sh=text(sub / "reproduce.sh", MISSING, FILE_CAP_BYTES),
                    reproduce_log=reduce_log(text(log_path, MISSING)),
                    repro_start=start, code_dev=code_dev, files=files, touched=touched)

# ========================================================================= 4. leaf graders


class LeafGrader(Protocol):
    """Grades the leaves given to it (the ones it `accepts`) for one submission."""
    name: str

    def accepts(self, leaf: RubricNode) -> bool: ...

    def grade(self, evidence: Evidence, rubric: RubricNode,
              leaves: list[tuple[NodePath, RubricNode]]) -> dict[NodePath, Verdict]: ...


class JudgeFailure(RuntimeError):
    """No score could be made (never a score of 0): too many invalid leaves, an endpoint down after
    its retries, a judge job past its deadline (judge_queue.py). `job` is the queue's job, if any;
    `__cause__` holds the last error."""

    def __init__(self, message: str, job: object = None):
        super().__init__(message)
        self.job = job


class JudgeUnavailable(JudgeFailure):
    """The judge endpoint failed even after its retries (an outage, not a grade)."""


class JudgeRequestError(RuntimeError):
    """The endpoint refused one request (HTTP 4xx other than 401/403/404/429): that leaf is
    invalid."""


class JudgeAccessError(UserError):
    """The judge cannot work at all: HTTP 401/403 (key) or 404 (unknown model or wrong URL). Not a
    JudgeFailure: nothing is retried or dropped, the run stops at the first call; a user error
    (the key, model or URL to fix), so the CLIs print it as one line and exit 2."""


@dataclass
class Backoff:
    """Exponential backoff: attempt k (0-based) waits base_s · factor^k, capped at max_s."""
    attempts: int = 4       # tries in all (1 = no retry)
    base_s: float = 1.0
    factor: float = 2.0
    max_s: float = 60.0

    def delay(self, k: int) -> float:
        return min(self.max_s, self.base_s * self.factor ** k)


@dataclass
class CheckGrader:
    """Executable checks: a leaf's `check` command runs with cwd=/home/submission in a sandbox that
    holds a copy of the submission; exit 0 scores 1, anything else (or a timeout) 0. One sandbox
    per submission; checks run in rubric order, so a check must not change the submission."""
    backend: str = "auto"     # sandbox backend: auto | docker | local
    timeout_s: float = 60.0   # per check
    name: str = "check"

    def accepts(self, leaf: RubricNode) -> bool:
        return leaf.check is not None

    def grade(self, evidence: Evidence, rubric: RubricNode,
              leaves: list[tuple[NodePath, RubricNode]]) -> dict[NodePath, Verdict]:
        from sandbox import open_sandbox   # imported here: validating or aggregating needs no sandbox
        out = {}
        with open_sandbox(self.backend) as box:
            box.upload(evidence.dir, SUBMISSION)
            for path, leaf in leaves:
                r = box.exec(leaf.check, timeout=self.timeout_s, cwd=SUBMISSION)
                passed = r.exit_code == 0 and not r.timed_out
                status = "timed out" if r.timed_out else f"exited {r.exit_code}"
                out[path] = Verdict(float(passed), True, f"check `{leaf.check}` {status}",
                                    {"grader": self.name, "check": leaf.check,
                                     "exit_code": r.exit_code, "timed_out": r.timed_out,
                                     "duration_s": r.duration_s, "output": r.output[-2000:],
                                     "sandbox_tier": box.tier})
        return out


@dataclass
class Reply:
    text: str
    usage: dict | None = None
    retries: int = 0          # endpoint errors retried before this reply


class ChatModel(Protocol):
    """What the LLM grader needs of a model: chat completion and a token count."""
    name: str
    context_tokens: int

    def count_tokens(self, text: str) -> int: ...

    def complete(self, messages: list[dict]) -> Reply: ...


class OpenAIChat:
    """An OpenAI-compatible chat endpoint (vLLM, SGLang, hosted APIs) through endpoint.ChatEndpoint,
    with `backoff` as its retry policy: connection errors, timeouts, HTTP 429 (its Retry-After
    honoured), 5xx and malformed replies are retried; after the last try the endpoint is
    unavailable (JudgeUnavailable). 401/403/404: JudgeAccessError at once, and at once again for
    every later call. Other 4xx: JudgeRequestError (that leaf is invalid). `stats`: the endpoint's
    running counts (calls, retries, failures by kind), which RL and evaluation log."""

    def __init__(self, url: str, model: str, *, context_tokens: int = 131_072,
                 max_tokens: int | None = None, timeout_s: float = 600.0,
                 backoff: Backoff | None = None, api_key: str | None = None):
        b = backoff or Backoff()
        self.client = ChatEndpoint(url, model, api_key=api_key, timeout_s=timeout_s,
                                   attempts=b.attempts, backoff_s=b.base_s, max_backoff_s=b.max_s,
                                   backoff_factor=b.factor)
        self.model, self.context_tokens, self.max_tokens = model, context_tokens, max_tokens
        self.name = f"openai:{model}"

    @property
    def stats(self) -> dict:
        return self.client.stats

    def count_tokens(self, text: str) -> int:
        return (len(text) + 3) // 4   # ≈ 4 characters per token (PaperBench counts with tiktoken)

    def complete(self, messages: list[dict]) -> Reply:
        try:
            c = self.client.create(messages, max_tokens=self.max_tokens or None)
        except EndpointAccessError as e:
            raise JudgeAccessError(f"judge endpoint {e}") from None
        except EndpointRequestError as e:
            raise JudgeRequestError(str(e)) from None
        except EndpointUnavailable as e:
            raise JudgeUnavailable(str(e)) from e
        return Reply(c.message.get("content") or "", c.usage, c.retries)


class HFChat:
    """A local transformers causal LM judging with the same prompts, offline; greedy decoding.
    A prompt longer than the context keeps its head (instructions) and tail (criterion and answer
    request). Calls are serialised: one model, one generation at a time."""

    def __init__(self, model, tokenizer, *, max_new_tokens: int = 512,
                 context_tokens: int | None = None, name: str = "hf"):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.max_new_tokens = max_new_tokens
        self.context_tokens = context_tokens or model.config.max_position_embeddings
        self._lock = threading.Lock()

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def complete(self, messages: list[dict]) -> Reply:
        import torch
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                    tokenize=False)
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        room = self.context_tokens - self.max_new_tokens
        if len(ids) > room:
            ids = ids[: room // 2] + ids[len(ids) - (room - room // 2):]
        with self._lock, torch.no_grad():
            x = torch.tensor([ids], device=self.model.device)   # (1, T)
            y = self.model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                    max_new_tokens=self.max_new_tokens,
                                    eos_token_id=self.tokenizer.eos_token_id,
                                    pad_token_id=self.tokenizer.pad_token_id)   # (1, T + new)
        new = y[0, len(ids):].tolist()
        return Reply(self.tokenizer.decode(new, skip_special_tokens=True),
                     {"prompt_tokens": len(ids), "completion_tokens": len(new)})


def fit_tokens(text: str, budget: int, count: Callable[[str], int], tail: bool = False) -> str:
    """`text` cut to at most `budget` tokens around a visible marker: its head, or (tail=True) its
    head and tail. Binary search on the characters kept."""
    if count(text) <= budget:
        return text
    if budget <= 0:
        return ""
    marker = "\n[... cut to fit the judge's context ...]\n"

    def cut(k: int) -> str:
        if not tail:
            return text[:k] + marker
        return text[: k - k // 2] + marker + text[len(text) - k // 2:]
    lo, hi = 0, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if count(cut(mid)) <= budget else (lo, mid - 1)
    return cut(lo)


SYSTEM_PROMPT = (
    "You are judging one criterion of an attempt to replicate a research paper. The paper, with "
    "its addendum (clarifications of scope and of how to judge), is the ground truth. You are shown "
    "the submission's files{run}, then one criterion of the grading rubric with the criteria before "
    "it for context. Judge only that criterion, and strictly: a description, plan or claim is not "
    "an implementation or a result. The submission should have a reproduce.sh at its root that "
    "reproduces its results; a missing reproduce.sh or reproduce.log fails every criterion that "
    "depends on it.")
SYSTEM_RUN = ", its reproduce.sh and, where it matters, the log of running it (reproduce.log)"
SYSTEM_CODE_DEV = ("; this is a code-only evaluation: the code was not run, so judge the code "
                   "itself")
CATEGORY_QUESTIONS = {
    CODE_DEV: "Does the submission contain code that correctly implements this? Instructions or "
              "descriptions of an implementation are not enough: look for actual code.",
    CODE_EXEC: "Does running reproduce.sh lead to this being executed successfully (see the log)?",
    RESULT_ANALYSIS: "Did running reproduce.sh produce outputs that agree with this result?",
}
GRADING_REQUEST = (
    "Answer in exactly three sections with these headings:\n"
    "# Expectations\nWhat a correct replication of this criterion looks like, from the paper and "
    "the addendum.\n"
    "# Reality\nWhat the submission actually contains or produced for it; quote files, code and "
    "log lines.\n"
    "# Score\n1 if the criterion is met, 0 if it is not: a single digit.")
RANKING_PROMPT = (
    "You are helping to judge an attempt to replicate a research paper. The submission holds more "
    "files than can be read, so choose the files most relevant to one criterion of the grading "
    "rubric.")

_HEADING = re.compile(r"^[ \t]*(?:#+[ \t]*|\*\*)?(expectations|reality|score)\b[*: \t]*",
                      re.IGNORECASE | re.MULTILINE)


def parse_verdict(text: str) -> Verdict:
    """Read an Expectations / Reality / Score answer. Valid only when the last Score section
    starts with 0 or 1; the explanation is what comes before it."""
    heads = [m for m in _HEADING.finditer(text) if m.group(1).lower() == "score"]
    if not heads:
        return Verdict(0.0, False, "unparsable judge answer: no Score section")
    head = heads[-1]
    number = re.match(r"\s*(?:\*\*)?\s*(\d+(?:\.\d+)?)", text[head.end():])
    if number is None or float(number.group(1)) not in (0.0, 1.0):
        got = number.group(1) if number else text[head.end():head.end() + 40].strip()
        return Verdict(0.0, False, f"unparsable judge answer: Score must be 0 or 1, got {got!r}")
    return Verdict(float(number.group(1)), True, text[: head.start()].strip())


def format_file(rel: str, content: str) -> str:
    return f'<file path="{rel}">\n{content}\n</file>\n'


def grading_messages(ev: Evidence, rubric: RubricNode, path: NodePath, paper: str, log: str,
                     files_text: str, max_prior_nodes: int | None = None) -> list[dict]:
    """PaperBench's grading conversation for the leaf at `path`: system, paper, addendum, files,
    script and log (by category; neither in a Code-Dev run), criterion with the preceding criteria
    and its category's question, answer request."""
    leaf = rubric.at(path)
    system = SYSTEM_PROMPT.format(run=SYSTEM_CODE_DEV if ev.code_dev else SYSTEM_RUN)
    files_intro = ("Here are the submission's docs and the files written while reproduce.sh ran:"
                   if leaf.task_category == RESULT_ANALYSIS else
                   "Here are the most relevant files of the submission:")
    msgs = [{"role": "system", "content": system},
            {"role": "user", "content": f"The paper:\n<paper>\n{paper}\n</paper>"},
            {"role": "user", "content": f"The addendum:\n<addendum>\n{ev.addendum}\n</addendum>"},
            {"role": "user", "content": f"{files_intro}\n<files>\n{files_text}</files>"}]
    if not ev.code_dev:
        msgs.append({"role": "user", "content": "The submission's reproduce.sh:\n<reproduce.sh>\n"
                     f"{ev.reproduce_sh}\n</reproduce.sh>"})
        if leaf.task_category != CODE_DEV:
            msgs.append({"role": "user", "content": "The log of running it:\n<reproduce.log>\n"
                         f"{log}\n</reproduce.log>"})
    prior = rubric.prior_nodes(path)
    if max_prior_nodes is not None:
        prior = prior[-max_prior_nodes:] if max_prior_nodes > 0 else []
    preceding = "".join(f" -> {n.requirements}\n" for n in prior) or " (none)\n"
    msgs.append({"role": "user", "content": (
        f"The criteria before this one, for context (ancestors and earlier siblings):\n{preceding}\n"
        f"The criterion to grade:\n<criterion>\n{leaf.requirements}\n</criterion>\n"
        f"Its category is {leaf.task_category}: {CATEGORY_QUESTIONS[leaf.task_category]}")})
    msgs.append({"role": "user", "content": GRADING_REQUEST})
    return msgs


@dataclass
class JudgeConfig:
    """Knobs of the LLM judge; defaults are PaperBench's SimpleJudge where it has one."""
    reserve_tokens: int | None = None  # context kept free for prompts, criterion and answer
    #                                    (None: PaperBench's 10k, at most a quarter of the context)
    max_files: int = 10               # files read, most relevant first, when not all fit
    parse_attempts: int = 2           # asks before an unparsable answer makes the leaf invalid
    concurrency: int = 16             # leaves judged at once (PaperBench: 100)
    max_prior_nodes: int | None = None  # preceding criteria shown as context (None = all)


class LLMGrader:
    """PaperBench's SimpleJudge on any ChatModel: evidence by category, file ranking when the files
    do not fit, preceding criteria as context, Expectations / Reality / Score answers."""

    def __init__(self, chat: ChatModel, config: JudgeConfig | None = None):
        self.chat, self.config, self.name = chat, config or JudgeConfig(), chat.name

    def accepts(self, leaf: RubricNode) -> bool:
        return True

    @property
    def reserve(self) -> int:
        r = self.config.reserve_tokens
        return min(10_000, self.chat.context_tokens // 4) if r is None else r

    def _fit_paper_and_log(self, ev: Evidence) -> tuple[str, str]:
        """The log gets at most half the context; if paper and log still leave too little room,
        the log is cut further, then the paper (PaperBench's order)."""
        n_ctx, count = self.chat.context_tokens, self.chat.count_tokens
        log, paper = fit_tokens(ev.reproduce_log, n_ctx // 2, count, tail=True), ev.paper
        room = n_ctx - self.reserve
        over = count(paper) + count(log) - room
        if over > 0:
            log = fit_tokens(log, count(log) - over, count, tail=True)
            over = count(paper) + count(log) - room
        if over > 0:
            paper = fit_tokens(paper, count(paper) - over, count)
        return paper, log

    def grade(self, evidence: Evidence, rubric: RubricNode,
              leaves: list[tuple[NodePath, RubricNode]]) -> dict[NodePath, Verdict]:
        paper, log = self._fit_paper_and_log(evidence)
        contents: dict[str, tuple[str, int]] = {}   # path -> (formatted text, tokens), read once
        for c in CATEGORIES:
            for rel in evidence.files[c]:
                if rel not in contents:
                    text = format_file(rel, read_text(evidence.dir / rel))
                    contents[rel] = (text, self.chat.count_tokens(text))
        if not leaves:
            return {}
        # the first leaf alone: a wrong key, model or URL (JudgeAccessError) or an outage
        # (JudgeUnavailable) stops here, at the first call, before any parallel request
        first = next((p for p, leaf in leaves if leaf.task_category != RESULT_ANALYSIS
                      or evidence.touched), leaves[0][0])   # a leaf that calls the judge
        out = {first: self._grade_leaf(evidence, rubric, first, paper, log, contents)}
        pool = ThreadPoolExecutor(self.config.concurrency)
        try:
            futures = {pool.submit(self._grade_leaf, evidence, rubric, p, paper, log, contents): p
                       for p, _ in leaves if p != first}
            for f in tqdm(as_completed(futures), total=len(futures), desc="judging leaves",
                          disable=None):
                out[futures[f]] = f.result()   # JudgeUnavailable propagates: an outage, not a grade
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return out

    def _files_for(self, ev: Evidence, leaf: RubricNode, paper: str, log: str,
                   contents: dict[str, tuple[str, int]]) -> tuple[str, list[str], int | None]:
        """(files text, paths shown, ranking-call retries or None when every file fit)."""
        count, cat = self.chat.count_tokens, leaf.task_category
        budget = self.chat.context_tokens - self.reserve - count(paper)
        if not ev.code_dev:
            budget -= count(ev.reproduce_sh) + (count(log) if cat != CODE_DEV else 0)
        eligible = ev.files[cat]
        if sum(contents[r][1] for r in eligible) <= budget:
            return "".join(contents[r][0] for r in eligible), eligible, None
        listing = fit_tokens("\n".join(eligible), budget, count)
        reply = self.chat.complete([
            {"role": "system", "content": RANKING_PROMPT},
            {"role": "user", "content": f"The paper:\n<paper>\n{paper}\n</paper>"},
            {"role": "user", "content": f"The addendum:\n<addendum>\n{ev.addendum}\n</addendum>"},
            {"role": "user", "content": f"The criterion:\n<criterion>\n{leaf.requirements}\n"
                                        "</criterion>"},
            {"role": "user", "content": f"The submission's files:\n{listing}\n\nList the "
             f"{self.config.max_files} files most relevant to this criterion, most relevant "
             "first: one path per line, exactly as listed, nothing else."}])
        known, ranked = set(eligible), []
        for line in reply.text.splitlines():
            rel = re.sub(r"^\s*(?:[-*•]|\d+[.)])\s*", "", line).strip().strip("`").strip("/")
            if rel in known and rel not in ranked:
                ranked.append(rel)
        text, shown, budget = "", [], budget - 2000   # PaperBench keeps 2k tokens spare
        for rel in ranked[: self.config.max_files]:
            content, n = contents[rel]
            shown.append(rel)
            if n > budget:   # the last file that fits in part: its head
                text += fit_tokens(content, budget, count)
                break
            text, budget = text + content, budget - n
        return text, shown, reply.retries

    def _grade_leaf(self, ev: Evidence, rubric: RubricNode, path: NodePath, paper: str, log: str,
                    contents: dict[str, tuple[str, int]]) -> Verdict:
        leaf = rubric.at(path)
        if leaf.task_category == RESULT_ANALYSIS and not ev.touched:
            return Verdict(0.0, True, "reproduce.sh wrote no result files after the reproduction "
                           "started, so there are no results to analyse (no judge call).")
        meta: dict = {"grader": self.name}
        try:
            files_text, shown, ranking_retries = self._files_for(ev, leaf, paper, log, contents)
            meta.update(files=shown, ranked=ranking_retries is not None,
                        http_retries=ranking_retries or 0)
            messages = grading_messages(ev, rubric, path, paper, log, files_text,
                                        self.config.max_prior_nodes)
            for attempt in range(1, self.config.parse_attempts + 1):
                reply = self.chat.complete(messages)
                verdict = parse_verdict(reply.text)
                meta.update(full_judge_response=reply.text, usage=reply.usage, attempts=attempt,
                            http_retries=meta["http_retries"] + reply.retries)
                if verdict.valid:
                    break
        except JudgeRequestError as e:
            return Verdict(0.0, False, str(e), meta)
        return replace(verdict, metadata=meta)

# ========================================================================== 5. reproduction

REPRODUCE_TIMEOUT_S = 3600.0
SNAPSHOT_FILE_BYTES = 10 << 20   # larger outputs are not copied back (PaperBench: 10 MB)


@dataclass
class Reproduction:
    """PaperBench's reproduction step: reproduce.sh run in a fresh sandbox."""
    dir: Path                 # host copy of the submission after the run (log and outputs inside)
    exit_code: int | None
    timed_out: bool
    duration_s: float
    sandbox_tier: str


def run_reproduction(submission_dir: str | os.PathLike, out_dir: str | os.PathLike,
                     timeout_s: float = REPRODUCE_TIMEOUT_S, backend: str = "auto") -> Reproduction:
    """Copy the submission into a fresh sandbox, write the start time (epoch seconds) to
    reproduce.log.creation_time, run `bash reproduce.sh` with its output in reproduce.log under a
    time limit, and copy the submission folder back to `out_dir`.

    The stamp is whole seconds (PaperBench's format), so we wait one second first: a file written
    just before, in the same second, would otherwise count as an output of the run."""
    from sandbox import open_sandbox
    with open_sandbox(backend) as box:
        box.upload(Path(submission_dir), SUBMISSION)
        r = box.exec("sleep 1 && date +%s > reproduce.log.creation_time && "
                     "bash reproduce.sh > reproduce.log 2>&1", timeout=timeout_s + 1, cwd=SUBMISSION)
        # files over 10 MB stay behind, as in PaperBench's snapshots; the log always comes back
        box.download(SUBMISSION, Path(out_dir), max_file_bytes=SNAPSHOT_FILE_BYTES)
        box.download(f"{SUBMISSION}/reproduce.log", Path(out_dir) / "reproduce.log")
        return Reproduction(Path(out_dir), r.exit_code, r.timed_out, r.duration_s, box.tier)

# ====================================================================== 6. grade_submission


MAX_INVALID_SHARE = 0.10   # a judgment with more of its weight in invalid leaves is no judgment


class InvalidJudgment(JudgeFailure):
    """Too much of the rubric could not be graded: more than `max_invalid` of the root score's
    weight sits in invalid leaves. Carries the graded tree, for the record."""

    def __init__(self, graded: GradedNode, share: float, max_invalid: float):
        self.graded, self.share, self.max_invalid = graded, share, max_invalid
        leaves = [g for _, g in graded.leaves()]
        self.invalid, self.leaves = sum(not g.valid_score for g in leaves), len(leaves)
        first = next(g for g in leaves if not g.valid_score)
        super().__init__(f"{self.invalid} of {self.leaves} leaves could not be graded ({share:.0%} "
                         f"of the rubric's weight; at most {max_invalid:.0%} allowed), e.g. leaf "
                         f"{first.node.id!r}: {first.explanation[:200]}")


def needs_reproduction(rubric: RubricNode) -> bool:
    """PaperBench reproduces before grading when the rubric has Code Execution or Result Analysis
    leaves. Ours: such leaves graded from evidence, i.e. without an executable check (a check
    reads the submission's files as they are: synthetic tasks, all checks, are not reproduced)."""
    return any(leaf.task_category in (CODE_EXEC, RESULT_ANALYSIS) and leaf.check is None
               for _, leaf in rubric.leaves())


def grade_submission(task_dir: str | os.PathLike, submission_dir: str | os.PathLike,
                     grader: LeafGrader | Sequence[LeafGrader], code_dev: bool = False,
                     reproduce: bool | None = None, *, resources_provided: bool = False,
                     reproduce_timeout_s: float = REPRODUCE_TIMEOUT_S, backend: str = "auto",
                     max_invalid: float = MAX_INVALID_SHARE) -> GradedNode:
    """Grade one submission against the task's rubric.json.

    Reproduction (PaperBench): with `reproduce` None, reproduce.sh runs in a fresh sandbox first
    when needs_reproduction(rubric); True / False force it. Code-Dev keeps only Code Development
    leaves and never reproduces. Each leaf goes to the first grader that accepts it (a CheckGrader
    takes the leaves that carry a check); a leaf no grader accepts is invalid.

    Never a silent 0 (docs/ARCHITECTURE.md 6): raises InvalidJudgment when invalid leaves hold more
    than `max_invalid` of the weight, JudgeUnavailable when a judge endpoint stays down, and
    JudgeAccessError when it refuses our key or model; the caller drops or retries the rollout."""
    task_dir = Path(task_dir)
    rubric = load_rubric(task_dir / "rubric.json")
    if resources_provided:
        rubric = resources_provided_rubric(rubric)
    if code_dev:
        kept = code_dev_rubric(rubric)
        if kept is None:
            raise RubricError("$", "task_category", "at least one Code Development leaf for a "
                              "Code-Dev run", None, rubric.id, task_dir / "rubric.json")
        rubric = kept
    if reproduce is None:
        reproduce = needs_reproduction(rubric)
    graders = list(grader) if isinstance(grader, (list, tuple)) else [grader]
    with tempfile.TemporaryDirectory(prefix="klong_judge_") as tmp:
        sub, meta = Path(submission_dir), None
        if reproduce and not code_dev:
            rep = run_reproduction(sub, Path(tmp) / "submission", reproduce_timeout_s, backend)
            sub, meta = rep.dir, {"reproduction": {k: v for k, v in asdict(rep).items() if k != "dir"}}
        evidence = collect_evidence(task_dir, sub, code_dev)
        verdicts: dict[NodePath, Verdict] = {}
        routed: dict[int, list[tuple[NodePath, RubricNode]]] = {}
        for path, leaf in rubric.leaves():
            i = next((i for i, g in enumerate(graders) if g.accepts(leaf)), None)
            if i is None:
                verdicts[path] = Verdict(0.0, False, "no configured grader takes this leaf "
                                         "(it carries no executable check)")
            else:
                routed.setdefault(i, []).append((path, leaf))
        for i, leaves in routed.items():
            verdicts.update(graders[i].grade(evidence, rubric, leaves))
    graded = aggregate(rubric, verdicts)
    if meta is not None:   # the root may be the only leaf: keep its grader's metadata too
        graded.judge_metadata = {**(graded.judge_metadata or {}), **meta}
    share = invalid_share(graded)
    if share > max_invalid:
        raise InvalidJudgment(graded, share, max_invalid)
    return graded

# ============================================================================= 7. agreement


def macro_f1(truth: Sequence[int], pred: Sequence[int]) -> float:
    """PaperBench JudgeEval's metric: the mean over the classes present of
    F1_c = 2·TP_c / (2·TP_c + FP_c + FN_c) (scikit-learn's macro average)."""
    if len(truth) != len(pred) or not truth:
        raise ValueError(f"need two equal, non-empty label lists, got {len(truth)} and {len(pred)}")
    f1 = []
    for c in sorted(set(truth) | set(pred)):
        tp = sum(t == c and p == c for t, p in zip(truth, pred))
        fp = sum(t != c and p == c for t, p in zip(truth, pred))
        fn = sum(t == c and p != c for t, p in zip(truth, pred))
        f1.append(2 * tp / (2 * tp + fp + fn))
    return sum(f1) / len(f1)


@dataclass
class Agreement:
    """How well judge B agrees with reference A (human grades, or another judge)."""
    pairs: int                  # submissions graded by both
    leaves: int                 # leaf pairs in the F1 (both valid)
    skipped_invalid: int        # leaf pairs left out because either grade is invalid
    macro_f1: float | None      # leaf grades of B against A (score >= 0.5 is a pass)
    spearman: float | None      # rank correlation of root scores (None: < 2 pairs, or constant)
    kendall: float | None


def judge_agreement(pairs: Sequence[tuple[GradedNode, GradedNode]]) -> Agreement:
    """Pairs (A, B): the same submission and rubric graded by A and by B. Leaves are matched by
    tree position; a tree that does not match raises ValueError."""
    from scipy import stats
    truth, pred, skipped = [], [], 0
    for n, (a, b) in enumerate(pairs):
        la, lb = list(a.leaves()), list(b.leaves())
        if [(p, g.node.id) for p, g in la] != [(p, g.node.id) for p, g in lb]:
            raise ValueError(f"pair {n}: the two graded trees are not the same rubric")
        for (_, ga), (_, gb) in zip(la, lb):
            if ga.valid_score and gb.valid_score:
                truth.append(int(ga.score >= 0.5))
                pred.append(int(gb.score >= 0.5))
            else:
                skipped += 1

    def rank(fn) -> float | None:
        if len(pairs) < 2:
            return None
        r = fn([a.score for a, _ in pairs], [b.score for _, b in pairs]).statistic
        return None if math.isnan(r) else float(r)
    return Agreement(len(pairs), len(truth), skipped, macro_f1(truth, pred) if truth else None,
                     rank(stats.spearmanr), rank(stats.kendalltau))

# =================================================================================== 8. CLI


ENDPOINT_OPTIONS = {"timeout": "timeout_s", "backoff": "base_s", "max_backoff": "max_s"}


class GraderSpecError(UserError, ValueError):
    """A `--grader` / `--judge` value that names no grader: one line, exit 2 (a user error)."""


def parse_grader(spec: str, backend: str = "auto", backoff: Backoff | None = None) -> LeafGrader:
    """`check` | `openai:MODEL@URL[,timeout=S][,backoff=S][,max_backoff=S]` (retried with
    `backoff`; the options: seconds a call may take (600), the first wait and the cap of the
    exponential backoff (1, 60)) | `hf:PATH` (a local save_pretrained folder)."""
    kind, _, rest = spec.partition(":")
    if spec == "check":
        return CheckGrader(backend)
    if kind == "openai" and "@" in rest:
        model, _, url = rest.partition("@")
        url, *options = url.split(",")
        given = {}
        for opt in options:
            name, _, value = opt.partition("=")
            try:
                given[ENDPOINT_OPTIONS[name]] = float(value)
            except (KeyError, ValueError):
                raise GraderSpecError(f"--grader {spec!r}: option {opt!r}: expected timeout=S, "
                                 "backoff=S or max_backoff=S (seconds)") from None
        if model and url:
            timeout_s = given.pop("timeout_s", 600.0)
            return LLMGrader(OpenAIChat(url, model, timeout_s=timeout_s,
                                        backoff=replace(backoff or Backoff(), **given)))
    if kind == "hf" and rest:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        return LLMGrader(HFChat(AutoModelForCausalLM.from_pretrained(rest),
                                AutoTokenizer.from_pretrained(rest), name=spec),
                         JudgeConfig(concurrency=1))
    raise GraderSpecError(f"--grader {spec!r}: expected check, openai:MODEL@URL or hf:PATH")


def main(argv: Sequence[str] | None = None) -> int:
    ap = Parser(prog="judge.py", description=__doc__.split("\n\n")[0])   # bad flags: one line, exit 2
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("validate", help="check a rubric.json; print its counts")
    p.add_argument("rubric", type=Path)
    p = sub.add_parser("aggregate", help="recompute a graded tree's scores from its leaves")
    p.add_argument("graded", type=Path)
    p = sub.add_parser("grade", help="grade a submission against a task's rubric.json")
    p.add_argument("task_dir", type=Path)
    p.add_argument("submission_dir", type=Path)
    p.add_argument("--grader", action="append", required=True,
                   help="check | openai:MODEL@URL | hf:PATH; repeat to combine (each leaf goes "
                        "to the first that takes it: `check` takes leaves carrying a check)")
    p.add_argument("--code-dev", action="store_true", help="Code-Dev variant (no reproduction)")
    p.add_argument("--resources-provided", action="store_true",
                   help="Dataset and Model Acquisition leaves weigh 0")
    p.add_argument("--reproduce", action=argparse.BooleanOptionalAction, default=None,
                   help="run reproduce.sh in a fresh sandbox first (default: when the rubric has "
                        "Code Execution / Result Analysis leaves without checks)")
    p.add_argument("--max-invalid", type=float, default=MAX_INVALID_SHARE, metavar="SHARE",
                   help="fail (exit 2) when invalid leaves hold more of the weight than this")
    p.add_argument("--reproduce-timeout", type=float, default=REPRODUCE_TIMEOUT_S, metavar="S")
    p.add_argument("--backend", default="auto", help="sandbox backend: auto | docker | local")
    p.add_argument("--out", type=Path, help="write the graded tree (PaperBench's graded JSON)")
    p = sub.add_parser("agree", help="judge agreement: pairs REF JUDGED of graded trees of the "
                                     "same submissions -> macro-F1, Spearman, Kendall")
    p.add_argument("graded", type=Path, nargs="+", metavar="A.json B.json")
    try:
        args = ap.parse_args(argv)
    except UserError as e:
        print(f"judge.py: error: {e}", file=sys.stderr)
        return 2
    try:
        if args.command == "validate":
            result = rubric_stats(load_rubric(args.rubric))
        elif args.command == "aggregate":
            graded = recompute(load_graded(args.graded))
            result = {"score": graded.score, "leaves": sum(1 for _ in graded.leaves()),
                      "invalid": graded.invalid_leaves()}
        elif args.command == "grade":
            graded = grade_submission(
                args.task_dir, args.submission_dir,
                [parse_grader(s, args.backend) for s in args.grader], args.code_dev,
                args.reproduce, resources_provided=args.resources_provided,
                reproduce_timeout_s=args.reproduce_timeout, backend=args.backend,
                max_invalid=args.max_invalid)
            if args.out:
                args.out.write_text(json.dumps(graded.to_dict(), indent=4, ensure_ascii=False))
            result = {"score": graded.score, "leaves": sum(1 for _ in graded.leaves()),
                      "invalid": graded.invalid_leaves()}
        else:
            if len(args.graded) % 2:
                ap.error("agree takes pairs: REF_1 JUDGED_1 [REF_2 JUDGED_2 ...]")
            trees = [load_graded(f) for f in args.graded]
            result = asdict(judge_agreement(list(zip(trees[::2], trees[1::2]))))
    except InvalidJudgment as e:   # no score: the count, and the partial tree when asked for
        if args.out:
            args.out.write_text(json.dumps(e.graded.to_dict(), indent=4, ensure_ascii=False))
        print(f"judge.py {args.command}: no score: {e}", file=sys.stderr)
        return 2
    except (RubricError, ValueError, UserError, OSError) as e:     # the user's input: exit 2
        if isinstance(e, OSError) and not is_user_error(e):
            raise
        print(f"judge.py {args.command}: {one_line(e)}", file=sys.stderr)
        return 2
    except (JudgeFailure, JudgeAccessError) as e:                  # the judge could not score: 1
        print(f"judge.py {args.command}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
