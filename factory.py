"""Research-Factory (KLong paper, "Research-Factory"): papers → tasks → rubric trees → distilled,
rejection-sampled trajectories.

Pipeline, in the paper's order:

1. **Collect** candidate papers (a local folder of PDFs / Markdown with a metadata file, arXiv ids
   over the network, existing PaperBench task folders) and **filter** them (venue in
   ICML / NeurIPS / ICLR, the last N years, an impact threshold, official code). Every rejection is
   logged with its reason.
2. **PDF → Markdown** with pypdf (pure Python, BSD, no model downloads; requirements.txt says why).
3. **Rubric + addendum** by an evaluation agent (judge.py's text backends: an OpenAI-compatible
   endpoint or a local model), given the paper and, when available, a local checkout of the
   official code; validated by judge.py; a malformed reply is sent back with its error, a clear
   failure after N tries. The official code URL goes into `blacklist.txt`.
4. **Distillation with rejection sampling**: a teacher (an endpoint, a local model, or the scripted
   expert of the synthetic tasks) runs k attempts per task through agent.run_episode; the judge
   scores each (Q); the best attempt is kept when Q_best ≥ threshold; every score is recorded.
   Resumable: each finished attempt and task is on disk before the next starts, so a crash loses
   at most the attempts in flight.

Departures and gap-fillers (the paper gives no details of the factory):
- The paper's search agent collects papers; here the candidates are given (folder, ids, tasks).
- pypdf extracts text only: headings are recovered from numbered section lines, wrapped lines
  are joined into paragraphs. Figures, tables and equations come out as plain text.
- arXiv has no venue or citation fields: the venue is read from the comment ("Accepted at ICML
  2026"), the code from a GitHub URL in the abstract, citations stay unknown (0 for the filter).
- Rubric nodes the evaluation agent leaves without an id get a fresh uuid.
- The rejection threshold is unknown in the paper: `threshold` (default 0.9).
- A failed attempt (sandbox died, teacher or judge down) is recorded with score None; it is not
  scored 0 and not kept (docs/ARCHITECTURE.md resolution 6).

The synthetic tasks of the miniature, their scripted expert and its exact simulation are in
synthetic.py; the factory distils them like any other task.
"""
from __future__ import annotations

import datetime
import functools
import json
import logging
import math
import re
import shutil
import tempfile
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import yaml
from tqdm import tqdm

import judge
import agent
import sampler
import sandbox
from cli import Parser, field_docs
from synthetic import (expert_policy, load_spec, make_synthetic_tasks, turns_needed,
                       write_task_folder)

log = logging.getLogger("factory")

# ---------------------------------------------------------------------------------------------
# Collect and filter candidate papers
# ---------------------------------------------------------------------------------------------

class FactoryNetworkError(RuntimeError):
    """A network source (arXiv) cannot be reached; raised quickly, never a hang."""


@dataclass
class Candidate:
    """One candidate paper with the metadata the paper's search agent gathers."""
    id: str
    title: str
    venue: str | None = None      # e.g. "ICML 2024"; None = unknown
    year: int | None = None
    citations: int | None = None  # the impact measure of the filter
    code_url: str | None = None   # the official code: goes into blacklist.txt
    source: str = ""              # a local .pdf/.md path, a PDF URL, or a PaperBench task folder


@dataclass
class FilterRules:
    """The paper's filter: top ML venues of the last N years, impact, official code."""
    venues: tuple[str, ...] = ("ICML", "NeurIPS", "ICLR")   # matched case-insensitively, aliases too
    max_age_years: int = 5                                  # "the last 5 years" (paper)
    min_citations: int = 0                                  # impact threshold (paper: unknown)
    require_code: bool = True                               # an official repo to blacklist
    this_year: int = field(default_factory=lambda: datetime.date.today().year)


@dataclass
class Rejection:
    candidate: Candidate
    reason: str


_VENUE_ALIASES = {"neural information processing systems": "NeurIPS", "nips": "NeurIPS",
                  "international conference on machine learning": "ICML",
                  "international conference on learning representations": "ICLR"}


def normalize_venue(venue: str | None) -> str | None:
    """'Advances in Neural Information Processing Systems 36' → 'NeurIPS'; 'ICML 2024' → 'ICML'."""
    if not venue:
        return None
    low = venue.lower()
    for alias, name in _VENUE_ALIASES.items():
        if alias in low:
            return name
    for name in ("ICML", "NeurIPS", "ICLR"):
        if re.search(rf"\b{name.lower()}\b", low):
            return name
    return venue.strip()


def rejection_reason(c: Candidate, rules: FilterRules) -> str | None:
    """Why `c` fails `rules` (the first failed rule), or None when it passes."""
    venue = normalize_venue(c.venue)
    allowed = {v.lower() for v in rules.venues}
    if venue is None or venue.lower() not in allowed:
        return f"venue {c.venue!r} is not one of {', '.join(rules.venues)}"
    if c.year is None:
        return "year unknown"
    if rules.this_year - c.year > rules.max_age_years:
        return (f"year {c.year} is older than {rules.max_age_years} years "
                f"(before {rules.this_year - rules.max_age_years})")
    if (c.citations or 0) < rules.min_citations:
        return f"citations {c.citations} below the impact threshold {rules.min_citations}"
    if rules.require_code and not c.code_url:
        return "no official code URL"
    return None


def filter_candidates(candidates: list[Candidate], rules: FilterRules
                      ) -> tuple[list[Candidate], list[Rejection]]:
    """Split candidates into kept and rejected; each rejection is logged with its reason."""
    kept, rejected = [], []
    for c in candidates:
        reason = rejection_reason(c, rules)
        if reason is None:
            kept.append(c)
        else:
            log.info("rejected %s (%s): %s", c.id, c.title, reason)
            rejected.append(Rejection(c, reason))
    return kept, rejected


def _read_metadata(folder: Path) -> dict[str, dict]:
    """metadata.json (a list of records with "file" or "id", or a dict by id) or metadata.jsonl."""
    for name in ("metadata.json", "metadata.jsonl"):
        path = folder / name
        if not path.exists():
            continue
        if name.endswith(".jsonl"):
            records = []
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from e
        else:
            data = json.loads(path.read_text())
            records = [{"id": k, **v} for k, v in data.items()] if isinstance(data, dict) else data
        out = {}
        for n, r in enumerate(records):
            key = r.get("id") or (Path(r["file"]).stem if r.get("file") else None)
            if not key:
                raise ValueError(f"{path}: record {n} has neither 'id' nor 'file'")
            out[key] = r
        return out
    return {}


def collect_local(folder: Path) -> list[Candidate]:
    """PDFs and Markdown files of `folder`, with fields from an optional metadata file
    (id or file, title, venue, year, citations, code_url)."""
    folder = Path(folder)
    meta = _read_metadata(folder)
    out = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in (".pdf", ".md") or path.stem.startswith("metadata"):
            continue
        m = meta.get(path.stem, {})
        out.append(Candidate(id=m.get("id", path.stem), title=m.get("title", path.stem),
                             venue=m.get("venue"), year=m.get("year"),
                             citations=m.get("citations"), code_url=m.get("code_url"),
                             source=str(path)))
    return out


def collect_paperbench(folder: Path, metadata: dict[str, dict] | None = None) -> list[Candidate]:
    """Existing PaperBench task folders (each with config.yaml); the code URL from blacklist.txt."""
    out = []
    for task in sorted(p for p in Path(folder).iterdir() if (p / "config.yaml").exists()):
        config = yaml.safe_load((task / "config.yaml").read_text()) or {}
        black = task / "blacklist.txt"
        urls = [u.strip() for u in black.read_text().splitlines()] if black.exists() else []
        urls = [u for u in urls if u and u.lower() != "none"]
        m = (metadata or {}).get(config.get("id", task.name), {})
        out.append(Candidate(id=config.get("id", task.name), title=config.get("title", task.name),
                             venue=m.get("venue"), year=m.get("year"), citations=m.get("citations"),
                             code_url=urls[0] if urls else m.get("code_url"), source=str(task)))
    return out


_ATOM = {"a": "http://www.w3.org/2005/Atom", "arxiv": "http://arxiv.org/schemas/atom"}
_GITHUB = re.compile(r"https?://github\.com/[\w.-]+/[\w.-]+[\w]")


def _get(url: str, timeout_s: float, **params) -> httpx.Response:
    try:
        r = httpx.get(url, params=params or None, timeout=timeout_s, follow_redirects=True)
        r.raise_for_status()
        return r
    except httpx.HTTPStatusError as e:
        raise FactoryNetworkError(f"GET {url}: HTTP {e.response.status_code}") from e
    except httpx.HTTPError as e:
        raise FactoryNetworkError(
            f"GET {url} failed ({type(e).__name__}: {e}) within {timeout_s:g} s; the network may "
            f"be off here: put the PDFs in a local folder and use collect_local instead") from e


def collect_arxiv(ids: list[str], base_url: str = "http://export.arxiv.org",
                  timeout_s: float = 10.0) -> list[Candidate]:
    """arXiv ids → candidates via the arXiv API (Atom). Venue from the comment ("Accepted at ICML
    2024"), year from the first version, a GitHub URL in the abstract or comment as the code.
    arXiv has no citation counts: `citations` stays None (the filter counts it as 0)."""
    r = _get(f"{base_url.rstrip('/')}/api/query", timeout_s, id_list=",".join(ids),
             max_results=len(ids))
    try:
        root = ET.fromstring(r.text)
    except ET.ParseError as e:
        raise FactoryNetworkError(f"arXiv answered something that is not Atom XML: {e}") from e
    def text(entry, tag: str) -> str:
        return " ".join((entry.findtext(tag, "", _ATOM) or "").split())

    out = []
    for entry in root.findall("a:entry", _ATOM):
        comment, summary = text(entry, "arxiv:comment"), text(entry, "a:summary")
        venue = normalize_venue(comment)
        pdf = next((link.get("href") for link in entry.findall("a:link", _ATOM)
                    if link.get("title") == "pdf"), None)
        code = _GITHUB.search(summary + " " + comment)
        published = text(entry, "a:published")
        out.append(Candidate(id=text(entry, "a:id").rsplit("/abs/", 1)[-1],
                             title=text(entry, "a:title"),
                             venue=venue if venue in ("ICML", "NeurIPS", "ICLR") else None,
                             year=int(published[:4]) if published[:4].isdigit() else None,
                             code_url=code.group(0) if code else None, source=pdf or ""))
    return out


# ---------------------------------------------------------------------------------------------
# PDF → Markdown
# ---------------------------------------------------------------------------------------------

_NUMBERED = re.compile(r"^(\d+(?:\.\d+)*)\.?\s+([A-Z][^.!?]{0,80})$")
_NAMED = re.compile(r"^(Abstract|Introduction|Related Work|Method|Methods|Experiments|Results|"
                    r"Discussion|Conclusion|Conclusions|References|Acknowledgements|Appendix)$",
                    re.IGNORECASE)


def pdf_to_markdown(pdf: Path | bytes) -> str:
    """Text of every page via pypdf, then Markdown structure from the text alone: the first line
    is the title (`#`), numbered section lines are headings (`##`, `###` by depth), named
    sections (Abstract, References, …) are `##`, words hyphenated across lines are rejoined and
    wrapped lines are joined into paragraphs."""
    import io

    from pypdf import PdfReader

    reader = PdfReader(io.BytesIO(pdf) if isinstance(pdf, bytes) else str(pdf))
    lines = [ln.strip() for page in reader.pages for ln in (page.extract_text() or "").splitlines()]
    blocks: list[str] = []
    para: list[str] = []

    def flush():
        if para:
            blocks.append(re.sub(r"(\w)- (\w)", r"\1\2", " ".join(para)))
            para.clear()

    for ln in lines:
        numbered, named = _NUMBERED.match(ln), _NAMED.match(ln)
        if not ln:
            flush()
        elif not blocks and not para:
            blocks.append(f"# {ln}")
        elif numbered or named:
            flush()
            depth = numbered.group(1).count(".") + 2 if numbered else 2
            blocks.append(f"{'#' * min(depth, 4)} {ln}")
        else:
            para.append(ln)
    flush()
    return "\n\n".join(blocks) + "\n"


def paper_markdown(c: Candidate, timeout_s: float = 60.0) -> str:
    """The Markdown text of a candidate (converting its PDF, local or downloaded)."""
    src = c.source
    if src.startswith(("http://", "https://")):
        return pdf_to_markdown(_get(src, timeout_s).content)
    path = Path(src)
    if path.is_dir():
        path = path / "paper.md" if (path / "paper.md").exists() else path / "paper.pdf"
    if path.suffix.lower() == ".md":
        return path.read_text()
    return pdf_to_markdown(path)


# ---------------------------------------------------------------------------------------------
# Rubric + addendum generation (the evaluation agent)
# ---------------------------------------------------------------------------------------------

class RubricGenerationError(RuntimeError):
    """The evaluation agent gave no valid rubric in `tries` replies; lists every error."""


def evaluator(spec: str) -> judge.ChatModel:
    """The evaluation agent's model, any text backend of judge.py: `openai:MODEL@URL` (an
    OpenAI-compatible endpoint, retried with backoff) or `hf:PATH` (a local transformers model)."""
    kind, _, rest = spec.partition(":")
    model, _, url = rest.partition("@")
    if kind == "openai" and model and url:
        return judge.OpenAIChat(url, model)
    if kind == "hf" and rest:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        return judge.HFChat(AutoModelForCausalLM.from_pretrained(rest),
                            AutoTokenizer.from_pretrained(rest), max_new_tokens=4096, name=spec)
    raise ValueError(f"evaluator {spec!r}: expected openai:MODEL@URL or hf:PATH")


RUBRIC_SYSTEM = """You are the evaluation agent of a paper-replication benchmark (PaperBench format).
Read the paper (and the official code when given) and write:
1. a hierarchical rubric tree grading a replication of the paper: every node has "id" (a string),
   "requirements" (one checkable statement), "weight" (a number >= 0) and "sub_tasks" (a list of
   nodes); leaves have "task_category" (one of "Code Development", "Code Execution",
   "Result Analysis") and may have "finegrained_task_category"; internal nodes have
   "task_category": null. Cover the method, the experimental setup and each main result.
2. an addendum: clarifications and scope a replicator needs that the paper leaves out.
Reply with one JSON object only: {"addendum": "<markdown>", "rubric": {<root node>}}."""


def code_digest(code_dir: Path, budget_chars: int = 60_000) -> str:
    """The official code for the evaluation agent: a file list, then README and source files,
    smallest first, until the character budget is spent."""
    code_dir = Path(code_dir)
    skip = {".git", "__pycache__", "node_modules", "venv", ".venv", "wandb"}
    files = sorted((p for p in code_dir.rglob("*") if p.is_file()
                    and not skip.intersection(p.relative_to(code_dir).parts)),
                   key=lambda p: (not p.name.lower().startswith("readme"), p.stat().st_size))
    out = ["Files: " + ", ".join(str(p.relative_to(code_dir)) for p in files)]
    used = len(out[0])
    for p in files:
        if p.suffix not in (".py", ".md", ".txt", ".yaml", ".yml", ".json", ".sh", ".cfg", ".toml"):
            continue
        text = p.read_text(errors="replace")
        if used + len(text) > budget_chars:
            continue
        out.append(f"--- {p.relative_to(code_dir)} ---\n{text}")
        used += len(text)
    return "\n".join(out)


def parse_rubric_reply(reply: str) -> tuple[dict, str]:
    """(rubric, addendum) from the agent's reply; raises ValueError saying what is wrong.
    Accepts the JSON bare or in a ``` fence; nodes without an id get a fresh uuid."""
    start, end = reply.find("{"), reply.rfind("}")
    if start < 0:
        raise ValueError("the reply holds no JSON object")
    try:
        data = json.loads(reply[start:end + 1] if end > start else reply[start:])
    except json.JSONDecodeError as e:
        raise ValueError(f"the JSON does not parse: {e.msg} at line {e.lineno} "
                         f"column {e.colno}") from None
    if not isinstance(data, dict) or not isinstance(data.get("rubric"), dict):
        raise ValueError('field "rubric" missing or not an object; expected '
                         '{"addendum": str, "rubric": {...}}')
    if not isinstance(data.get("addendum"), str):
        raise ValueError('field "addendum" missing or not a string')
    stack = [data["rubric"]]
    while stack:
        node = stack.pop()
        node.setdefault("id", str(uuid.uuid4()))
        stack += [n for n in node.get("sub_tasks") or [] if isinstance(n, dict)]
    judge.validate_rubric(data["rubric"])   # RubricError (a ValueError): path, field, expected
    return data["rubric"], data["addendum"]


def generate_rubric(paper_md: str, model: judge.ChatModel, code_dir: Path | None = None,
                    tries: int = 3) -> tuple[dict, str]:
    """Ask the evaluation agent for (rubric, addendum). A malformed or invalid reply is answered
    with its error and asked again; after `tries` replies, RubricGenerationError lists them all.
    An endpoint that stays down raises judge.JudgeUnavailable."""
    user = f"# Paper\n\n{paper_md}"
    if code_dir is not None:
        user += f"\n\n# Official code\n\n{code_digest(code_dir)}"
    messages = [{"role": "system", "content": RUBRIC_SYSTEM}, {"role": "user", "content": user}]
    errors = []
    for attempt in range(1, tries + 1):
        reply = model.complete(messages).text
        try:
            return parse_rubric_reply(reply)
        except ValueError as e:
            errors.append(f"reply {attempt}: {e}")
            log.warning("rubric reply %d/%d rejected: %s", attempt, tries, e)
            messages += [{"role": "assistant", "content": reply},
                         {"role": "user", "content": f"That reply cannot be used: {e}. Reply again "
                                                     "with the complete JSON object only."}]
    raise RubricGenerationError(f"no valid rubric from {model.name} after {tries} replies:\n"
                                + "\n".join(errors))


def _task_folder(out_dir: Path, c: Candidate) -> Path:
    return Path(out_dir) / re.sub(r"[^\w.-]", "_", c.id)      # old arXiv ids hold a "/"


def build_paper_task(c: Candidate, out_dir: Path, model: judge.ChatModel,
                     code_dir: Path | None = None, tries: int = 3) -> Path:
    """One filtered candidate → a PaperBench task folder out_dir/<id>/ (the official code URL
    in blacklist.txt; the PDF copied beside paper.md when there is a local one)."""
    paper_md = paper_markdown(c)
    rubric, addendum = generate_rubric(paper_md, model, code_dir=code_dir, tries=tries)
    task_dir = write_task_folder(_task_folder(out_dir, c), task_id=c.id, title=c.title,
                                 paper_md=paper_md, rubric=rubric, addendum=addendum,
                                 blacklist=[c.code_url] if c.code_url else None)
    if c.source.lower().endswith(".pdf") and Path(c.source).exists():
        shutil.copy(c.source, task_dir / "paper.pdf")
    return task_dir


def build_tasks(candidates: list[Candidate], out_dir: Path, model: judge.ChatModel,
                rules: FilterRules, code_root: Path | None = None, tries: int = 3
                ) -> tuple[list[Path], list[Rejection]]:
    """Filter, then one task folder per kept paper (the official code from code_root/<id>/ when
    it is there). A paper whose rubric cannot be made is rejected with that reason; folders that
    already hold a rubric.json are kept as they are (a re-run resumes)."""
    kept, rejected = filter_candidates(candidates, rules)
    tasks = []
    for c in tqdm(kept, desc="papers", unit="paper"):
        done = _task_folder(out_dir, c)
        if (done / "rubric.json").exists():
            tasks.append(done)
            continue
        code = Path(code_root) / c.id if code_root and (Path(code_root) / c.id).is_dir() else None
        try:
            tasks.append(build_paper_task(c, out_dir, model, code_dir=code, tries=tries))
        except (RubricGenerationError, FactoryNetworkError, judge.JudgeUnavailable,
                judge.JudgeRequestError) as e:
            log.warning("rejected %s: %s", c.id, e)
            rejected.append(Rejection(c, f"no task: {e}"))
    return tasks, rejected


# ---------------------------------------------------------------------------------------------
# Distillation with rejection sampling
# ---------------------------------------------------------------------------------------------

@dataclass
class FactoryConfig:
    """Research-Factory run: synthetic tasks (or given task folders) distilled by a teacher."""
    out_dir: Path
    """Writes tasks/<task_id>/, attempts.jsonl, tasks.jsonl, trajectories.jsonl, summary.json,
    run.json (the settings a resume must keep)."""
    n_tasks: int = 48
    """Synthetic tasks to generate (ignored when `tasks` names a folder)."""
    seed: int = 0
    """Synthetic task family (held-out tasks use another seed) and the expert's randomness."""
    attempts: int = 2
    """k: teacher attempts per task; rejection sampling keeps the best one."""
    threshold: float = 0.9
    """Keep a task's best attempt when its judge score Q ≥ threshold (paper: value unknown)."""
    noise: float = 0.05
    """Scripted expert: rate of random wrong actions (refused by the environment; costs a turn)."""
    flaw: float = 0.65
    """Scripted expert: probability of a neutral `step s` after each even-numbered item."""
    m_range: tuple[int, int] = (24, 32)
    """Synthetic tasks: M, items per phase, uniform in this range (inclusive). A turn costs ~20
    tiny-tokenizer tokens, p ~200: expert trajectories of ~1,450-2,100 tokens, ~4-5.5 × L = 384."""
    log_words: int = 0
    """Synthetic tasks: words of log output after each accepted step (observation length)."""
    turn_slack: float = 1.5
    """Synthetic tasks: the teacher's turn budget is turn_slack × turns_needed (2M + 2)."""
    max_hours: float | None = None
    """Wall-clock budget per attempt (real tasks); None = turns only."""
    max_turns: int | None = None
    """Turn budget per attempt for non-synthetic tasks; None = no turn limit."""
    grader: str = "check"
    """judge.parse_grader spec: check (executable checks), openai:MODEL@URL or hf:PATH."""
    min_end_fraction: float = 0.5
    """KLong's scaffold guard: the teacher's end_task is refused before this share of its budget
    (klong.Config.min_end_fraction)."""
    code_dev: bool = False
    """Judge PaperBench's Code-Dev variant (no reproduction); off: reproduce.sh runs first when the
    rubric has Code Execution / Result Analysis leaves graded from evidence."""
    max_invalid: float = 0.10
    """An attempt whose invalid leaves hold more of the rubric's weight is not judged (failed)."""
    reproduce_timeout: float = 3600.0
    """Seconds reproduce.sh may run before judging."""
    policy_context_len: int = 0
    """An endpoint teacher's window in tokens (agent.OpenAIPolicy: prompts built to fit it);
    0: unknown (the whole history, rebuilt smaller when the endpoint says it is too long)."""
    tasks: str = ""
    """A folder of existing PaperBench task folders to distil; empty = make synthetic tasks."""
    reminder_every: int = 0
    """Sandbox time reminders every N turns (0 = none: a synthetic task has no clock to watch and
    each reminder costs ~25 tokens of the tiny window). RL and evaluation should use the same."""
    workers: int = 4
    """Tasks in flight at once, each attempt in its own sandbox. Episodes mostly wait on sandbox
    round trips, so 4 workers run ~2.7× faster than 1 even on 2 cores (measured)."""
    limit: int | None = None
    """Process at most this many unfinished tasks, then stop (a later run resumes)."""


@dataclass
class FactorySummary:
    """What a factory run produced (all runs of out_dir together: the summary survives resumes)."""
    tasks: int              # tasks finished (all k attempts done)
    attempts: int           # attempts run, failed ones included
    failed: int             # attempts with no score (sandbox or judge failure; not scored 0)
    kept: int               # tasks whose best attempt passed the threshold
    threshold: float
    mean_score: float       # mean judge score over scored attempts
    score_hist: list[int]   # scored attempts per score bin [0, .1), …, [.9, 1.0]
    mean_turns: float       # assistant turns per attempt
    mean_hours: float       # wall hours per attempt
    kept_turns: float       # assistant turns per kept trajectory
    skipped: int            # tasks this run found already finished (resume)
    wall_s: float           # this run's wall time

    def __str__(self) -> str:
        return (f"{self.kept}/{self.tasks} tasks kept (Q ≥ {self.threshold}), {self.attempts} "
                f"attempts ({self.failed} failed), mean score {self.mean_score:.3f}, "
                f"{self.mean_turns:.1f} turns/attempt, {self.kept_turns:.1f} turns/kept, "
                f"{self.skipped} skipped, {self.wall_s:.1f} s")


def _read_jsonl(path: Path) -> list[dict]:
    """Records of a log this module appends to. A last line cut by a crash is dropped (and cut
    from the file); a bad line elsewhere is an error naming the file and line."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    out = []
    for n, line in enumerate(lines, 1):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            if n < len(lines):
                raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from e
            log.warning("%s:%d: dropping a line cut by an interrupted run", path, n)
            path.write_text("".join(ln + "\n" for ln in lines[:-1]))
    return out


def _append(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()


@functools.lru_cache(maxsize=2)
def _local_model(path: str):
    """A local teacher's model and tokenizer, loaded once for all attempts (offline)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


@functools.lru_cache(maxsize=2)
def _local_sampler(path: str) -> sampler.BatchedSampler | None:
    """One batched sampler per local teacher: concurrent attempts decode in one forward per
    token (sampler.py); None for an architecture it does not know (LocalPolicy then)."""
    try:
        return sampler.BatchedSampler(*_local_model(path))
    except sampler.Unsupported:
        return None


def make_teacher(teacher: str, task: sandbox.Task, cfg: FactoryConfig, attempt: int
                 ) -> agent.Policy:
    """`expert` (synthetic tasks), `openai:MODEL@URL` (an OpenAI-compatible endpoint; the paper's
    teacher was Claude 4.5 Sonnet Thinking) or `hf:PATH` (a local model in chat.py's format)."""
    seed = cfg.seed * 1000 + attempt
    if teacher == "expert":
        return expert_policy(task, noise=cfg.noise, flaw=cfg.flaw, seed=seed)
    kind, _, rest = teacher.partition(":")
    model, _, url = rest.partition("@")
    if kind == "openai" and model and url:
        return agent.OpenAIPolicy(url, model, context_len=cfg.policy_context_len or None)
    if kind == "hf" and rest:
        batched = _local_sampler(rest)
        return batched.policy(temperature=1.0, seed=seed) if batched else \
            agent.LocalPolicy(*_local_model(rest), temperature=1.0, seed=seed)
    raise ValueError(f"teacher {teacher!r}: expected expert, openai:MODEL@URL or hf:PATH")


def attempt_budget(task: sandbox.Task, cfg: FactoryConfig) -> agent.Budget:
    """Synthetic tasks: turn_slack × turns_needed; other tasks: max_turns / max_hours."""
    seconds = cfg.max_hours * 3600 if cfg.max_hours else None
    try:
        turns = math.ceil(cfg.turn_slack * turns_needed(load_spec(task.dir)))
    except ValueError:
        turns = cfg.max_turns
    return agent.Budget(max_turns=turns, max_seconds=seconds, reminder_every=cfg.reminder_every,
                        min_end_fraction=cfg.min_end_fraction)


def run_attempt(task: sandbox.Task, teacher: str, cfg: FactoryConfig, attempt: int,
                grader, backend: str) -> dict:
    """One teacher attempt, judged: its trajectory record with the score Q, or, when the sandbox
    or the judge failed, a record with score None (docs/ARCHITECTURE.md 6: failed, not scored 0).
    Judged as RL and evaluation judge (agent.score_episode): reproduce.sh first when the rubric
    needs it, a blacklist hit scores 0 with its reason (meta["disqualified"]); a judge that
    refuses our key or model (judge.JudgeAccessError) stops the run."""
    record = {"id": f"{task.id}/{attempt}", "task_id": task.id, "score": None,
              "meta": {"teacher": teacher, "attempt": attempt}}
    with tempfile.TemporaryDirectory(prefix="klong_factory_") as tmp:
        episode = agent.run_episode(make_teacher(teacher, task, cfg, attempt), task,
                                      attempt_budget(task, cfg), backend=backend,
                                      submission_out=Path(tmp) / "submission")
        traj = episode.trajectory
        traj.id, traj.task_id = record["id"], task.id
        traj.meta.update(record["meta"])
        traj.samples = []   # a local teacher's sampled ids: RL needs them, SFT data does not
        if episode.failed:
            log.warning("task %s attempt %d failed: %s", task.id, attempt, traj.meta.get("error"))
            return asdict(traj)
        try:
            scored = agent.score_episode(episode, task, grader, backend=backend,
                                         code_dev=cfg.code_dev, max_invalid=cfg.max_invalid,
                                         reproduce_timeout_s=cfg.reproduce_timeout)
        except (judge.JudgeFailure, sandbox.SandboxError) as e:
            traj.meta["error"] = f"judge: {type(e).__name__}: {e}"
            log.warning("task %s attempt %d not judged: %s", task.id, attempt, e)
            return asdict(traj)
    traj.score = scored.score
    if scored.disqualified:
        traj.meta["disqualified"] = scored.disqualified
        log.warning("task %s attempt %d disqualified: %s", task.id, attempt, scored.disqualified)
    else:
        traj.meta["invalid_leaves"] = scored.graded.invalid_leaves()
    return asdict(traj)


class _Ledger:
    """The three append-only logs of a factory run, readable after any interruption.

    attempts.jsonl: every finished attempt (trajectory + score, or a failure); tasks.jsonl: a line
    per finished task (all k scores, the kept id); trajectories.jsonl: the kept trajectories."""

    def __init__(self, out: Path):
        self.attempts_path, self.tasks_path = out / "attempts.jsonl", out / "tasks.jsonl"
        self.kept_path = out / "trajectories.jsonl"
        self.done = {r["task_id"] for r in _read_jsonl(self.tasks_path)}
        self.kept_ids = {r["id"] for r in _read_jsonl(self.kept_path)}
        self.attempts: dict[str, list[dict]] = {}
        for r in _read_jsonl(self.attempts_path):
            self.attempts.setdefault(r["task_id"], []).append(r)
        self.lock = threading.Lock()

    def add_attempt(self, record: dict) -> None:
        with self.lock:
            _append(self.attempts_path, record)
            self.attempts.setdefault(record["task_id"], []).append(record)

    def finish(self, task_id: str, threshold: float) -> dict | None:
        """Rejection sampling: keep the best attempt when Q_best ≥ threshold; the task is done."""
        with self.lock:
            records = self.attempts.get(task_id, [])
            scored = [r for r in records if r["score"] is not None]
            best = max(scored, key=lambda r: r["score"], default=None)
            kept = best if best is not None and best["score"] >= threshold else None
            if kept is not None and kept["id"] not in self.kept_ids:   # not twice after a crash
                _append(self.kept_path, {**kept, "meta": {
                    **kept["meta"], "scores": [r["score"] for r in records]}})
                self.kept_ids.add(kept["id"])
            _append(self.tasks_path, {"task_id": task_id, "scores": [r["score"] for r in records],
                                      "kept": kept["id"] if kept else None})
            self.done.add(task_id)
            return kept


# Settings that decide what a finished task's records mean: a resume must not change them.
_RUN_FIELDS = ("seed", "attempts", "threshold", "noise", "flaw", "m_range", "log_words", "turn_slack",
               "max_hours", "max_turns", "grader", "tasks", "reminder_every")


def _check_same_run(path: Path, cfg: FactoryConfig, teacher: str) -> None:
    """Write the run's settings on the first run; refuse to resume under different ones."""
    now = json.loads(json.dumps({"teacher": teacher, **{k: getattr(cfg, k) for k in _RUN_FIELDS}}))
    if not path.exists():
        path.write_text(json.dumps(now, indent=2) + "\n")
        return
    before = json.loads(path.read_text())
    changed = [f"{k}: {before.get(k)!r} then, {v!r} now" for k, v in now.items() if before.get(k) != v]
    if changed:
        raise ValueError(f"{path}: {path.parent} holds a factory run with other settings "
                         f"({'; '.join(changed)}); resume with the same settings or use a new out_dir")


def distill(task_dirs: list[Path], cfg: FactoryConfig, teacher: str = "expert",
            backend: str = "auto") -> FactorySummary:
    """k attempts per task, each judged; keep the best when Q_best ≥ threshold (rejection sampling).

    Resumable: every finished attempt and task is on disk (_Ledger) before the next starts; a
    re-run skips finished tasks and attempts, so a crash loses at most the attempts in flight.
    """
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_same_run(out / "run.json", cfg, teacher)
    ledger = _Ledger(out)
    tasks = [sandbox.load_task(d) for d in task_dirs]
    skipped = sum(t.id in ledger.done for t in tasks)
    todo = [t for t in tasks if t.id not in ledger.done][: cfg.limit]
    grader = judge.parse_grader(cfg.grader, backend)
    t0 = time.monotonic()

    def work(task: sandbox.Task) -> dict | None:
        for attempt in range(len(ledger.attempts.get(task.id, [])), cfg.attempts):
            ledger.add_attempt(run_attempt(task, teacher, cfg, attempt, grader, backend))
        return ledger.finish(task.id, cfg.threshold)

    with ThreadPoolExecutor(max_workers=cfg.workers) as pool, \
            tqdm(total=len(todo), desc="factory", unit="task", dynamic_ncols=True) as bar:
        for future in as_completed([pool.submit(work, t) for t in todo]):
            future.result()
            bar.update()
            bar.set_postfix(kept=len(ledger.kept_ids))
    summary = summarize(out, cfg.threshold, skipped=skipped, wall_s=time.monotonic() - t0)
    (out / "summary.json").write_text(json.dumps(asdict(summary), indent=2) + "\n")
    return summary


def summarize(out_dir: Path, threshold: float, skipped: int = 0, wall_s: float = 0.0
              ) -> FactorySummary:
    """The summary of everything out_dir holds (so it is whole after any number of resumes)."""
    out_dir = Path(out_dir)
    tasks = _read_jsonl(out_dir / "tasks.jsonl")
    attempts = _read_jsonl(out_dir / "attempts.jsonl")
    kept = _read_jsonl(out_dir / "trajectories.jsonl")
    ran = [a for a in attempts if a["score"] is not None]
    hist = [0] * 10
    for a in ran:
        hist[min(int(a["score"] * 10), 9)] += 1
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    return FactorySummary(
        tasks=len(tasks), attempts=len(attempts), failed=len(attempts) - len(ran),
        kept=sum(t["kept"] is not None for t in tasks), threshold=threshold,
        mean_score=mean([a["score"] for a in ran]), score_hist=hist,
        mean_turns=mean([a["meta"]["turns"] for a in ran]),
        mean_hours=mean([a["meta"]["wall_s"] / 3600 for a in ran]),
        kept_turns=mean([k["meta"]["turns"] for k in kept]), skipped=skipped, wall_s=wall_s)


def run_factory(cfg: FactoryConfig, teacher: str = "expert", backend: str = "auto") -> FactorySummary:
    """`python klong.py --stage factory`: synthetic tasks (or cfg.tasks) → distilled trajectories."""
    out = Path(cfg.out_dir)
    if cfg.tasks:
        task_dirs = sorted(p for p in Path(cfg.tasks).iterdir() if (p / "rubric.json").exists())
    else:
        task_dirs = make_synthetic_tasks(out / "tasks", cfg.n_tasks, cfg.seed, cfg.m_range,
                                         cfg.log_words)
    return distill(task_dirs, cfg, teacher=teacher, backend=backend)


def run_stage(cfg) -> FactorySummary:
    """`python klong.py --stage factory` (and SFT with no data): the run's config (klong.Config's
    fields) → out_dir run_dir/factory, the expert teacher, the configured sandbox; prints the summary."""
    fc = FactoryConfig(out_dir=Path(cfg.run_dir) / "factory", n_tasks=cfg.n_tasks, seed=cfg.seed,
                       attempts=cfg.attempts, threshold=cfg.threshold, noise=cfg.noise,
                       flaw=cfg.flaw, m_range=tuple(int(x) for x in cfg.task_items),
                       log_words=cfg.task_log_words, min_end_fraction=cfg.min_end_fraction,
                       code_dev=cfg.judge_code_dev, max_invalid=cfg.judge_max_invalid,
                       reproduce_timeout=cfg.reproduce_timeout,
                       policy_context_len=cfg.policy_context_len)
    summary = run_factory(fc, backend=cfg.sandbox)
    print(f"[factory] {summary}", flush=True)
    return summary


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="factory.py",               # bad flags: one line, exit 2 (cli.run)
               description="Research-Factory: paper tasks and distilled trajectories.")
    sub = p.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="make synthetic tasks (or take --tasks) and distil trajectories")
    docs = field_docs(FactoryConfig)
    for f in FactoryConfig.__dataclass_fields__.values():
        kind = {"int": int, "float": float, "bool": lambda s: s.lower() in ("1", "true", "yes")
                }.get(str(f.type).split(" |")[0], str)
        if f.name == "m_range":
            run.add_argument("--m-range", type=int, nargs=2, default=f.default, help=docs[f.name])
        else:
            run.add_argument(f"--{f.name.replace('_', '-')}", type=kind, required=f.name == "out_dir",
                             default=None if f.name == "out_dir" else f.default, help=docs[f.name])
    run.add_argument("--teacher", default="expert", help="expert | openai:MODEL@URL | hf:PATH")
    run.add_argument("--backend", default="auto", help="sandbox: auto | local | docker")
    papers = sub.add_parser("papers", help="collect, filter and turn papers into task folders")
    papers.add_argument("--out", required=True, type=Path)
    papers.add_argument("--local", type=Path, help="a folder of PDFs / Markdown (+ metadata.json[l])")
    papers.add_argument("--arxiv", default="", help="comma-separated arXiv ids (needs the network)")
    papers.add_argument("--paperbench", type=Path, help="a folder of PaperBench task folders")
    papers.add_argument("--evaluator", required=True, help="openai:MODEL@URL or hf:PATH")
    papers.add_argument("--code-root", type=Path, help="official code checkouts as <root>/<paper id>/")
    papers.add_argument("--years", type=int, default=5)
    papers.add_argument("--min-citations", type=int, default=0)
    papers.add_argument("--no-code-ok", action="store_true", help="keep papers without official code")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if a.cmd == "run":
        fields = {k: v for k, v in vars(a).items() if k in FactoryConfig.__dataclass_fields__}
        cfg = FactoryConfig(**{**fields, "out_dir": Path(a.out_dir), "m_range": tuple(a.m_range)})
        print(run_factory(cfg, teacher=a.teacher, backend=a.backend))
        return 0
    cands = (collect_local(a.local) if a.local else []) + \
        (collect_arxiv(a.arxiv.split(",")) if a.arxiv else []) + \
        (collect_paperbench(a.paperbench) if a.paperbench else [])
    rules = FilterRules(max_age_years=a.years, min_citations=a.min_citations,
                        require_code=not a.no_code_ok)
    tasks, rejected = build_tasks(cands, a.out, evaluator(a.evaluator), rules, a.code_root)
    print(json.dumps({"tasks": [str(t) for t in tasks],
                      "rejected": {r.candidate.id: r.reason for r in rejected}}, indent=2))
    return 0


if __name__ == "__main__":
    from cli import run                  # user errors: one line on stderr, exit 2 (--debug: traceback)
    raise SystemExit(run(main, prog="factory.py", user_errors=(FileNotFoundError,)))
