"""factory.py, real papers: filters, collection (local folder, PaperBench folders, arXiv over a
loopback HTTP server), PDF → Markdown on PDFs made with fpdf2, rubric + addendum generation by an
evaluation agent behind a loopback OpenAI-compatible server with canned replies."""
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import factory
import judge
from factory import Candidate, FilterRules

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


class Quiet(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass                   # the slow-server test hangs up first: no broken-pipe tracebacks


class Canned:
    """A loopback HTTP server: answers GETs from `pages` (path → (content type, bytes)) and
    chat-completion POSTs with the next of `replies`; records every request body."""

    def __init__(self, pages=None, replies=(), delay_s=0.0):
        self.pages, self.replies, self.delay_s, self.requests = pages or {}, list(replies), delay_s, []
        canned = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, ctype, body, code=200):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                time.sleep(canned.delay_s)
                canned.requests.append(self.path)
                page = canned.pages.get(self.path.split("?")[0])
                self._send(*page) if page else self._send("text/plain", b"not found", 404)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                canned.requests.append(body)
                reply = canned.replies.pop(0)
                self._send("application/json", json.dumps(
                    {"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode())

        self.server = Quiet(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def canned():
    servers = []
    yield lambda **kw: servers.append(Canned(**kw)) or servers[-1]
    for s in servers:
        s.close()


def make_pdf(path: Path, title: str, pages: list[list[tuple[str, str]]]) -> Path:
    """A real PDF: a title line, then per page (heading, paragraph) pairs."""
    from fpdf import FPDF
    pdf = FPDF()
    pdf.set_font("Helvetica", size=11)
    for n, sections in enumerate(pages):
        pdf.add_page()
        if n == 0:
            pdf.multi_cell(0, 8, title, new_x="LMARGIN", new_y="NEXT")
            pdf.ln(4)
        for heading, text in sections:
            pdf.multi_cell(0, 8, heading, new_x="LMARGIN", new_y="NEXT")
            pdf.multi_cell(0, 6, text, new_x="LMARGIN", new_y="NEXT")
            pdf.ln(4)
    pdf.output(str(path))
    return path


# ----------------------------------------------------------------------------- filters

RULES = FilterRules(min_citations=10, this_year=2026)


@pytest.mark.parametrize("cand, reason", [
    (Candidate("a", "A", "CVPR 2024", 2024, 99, "https://github.com/x/a"), "venue 'CVPR 2024'"),
    (Candidate("b", "B", None, 2024, 99, "https://github.com/x/b"), "venue None"),
    (Candidate("c", "C", "ICML 2018", 2018, 99, "https://github.com/x/c"), "year 2018 is older"),
    (Candidate("d", "D", "ICLR", None, 99, "https://github.com/x/d"), "year unknown"),
    (Candidate("e", "E", "NeurIPS 2023", 2023, 3, "https://github.com/x/e"), "citations 3 below"),
    (Candidate("f", "F", "ICML 2024", 2024, None, "https://github.com/x/f"), "citations None below"),
    (Candidate("g", "G", "ICLR 2025", 2025, 50, None), "no official code URL"),
])
def test_each_rule_rejects_with_its_reason(cand, reason, caplog):
    caplog.set_level("INFO", logger="factory")
    kept, rejected = factory.filter_candidates([cand], RULES)
    assert kept == [] and len(rejected) == 1 and rejected[0].candidate is cand
    assert rejected[0].reason.startswith(reason)
    assert cand.id in caplog.text and rejected[0].reason in caplog.text


def test_filter_keeps_top_venues_by_alias_and_respects_switches():
    good = [Candidate("n", "N", "Advances in Neural Information Processing Systems 36", 2023, 10,
                      "https://github.com/x/n"),
            Candidate("i", "I", "Proceedings of ICML", 2021, 500, "https://github.com/x/i"),
            Candidate("l", "L", "iclr 2026", 2026, 10, "https://github.com/x/l")]
    kept, rejected = factory.filter_candidates(good, RULES)
    assert kept == good and rejected == []
    no_code = Candidate("g", "G", "ICLR 2025", 2025, 50, None)
    assert factory.filter_candidates([no_code], FilterRules(require_code=False, this_year=2026))[0]
    old = Candidate("o", "O", "ICML", 2010, 10, "https://github.com/x/o")
    assert factory.filter_candidates([old], FilterRules(max_age_years=20, this_year=2026))[0]


# ----------------------------------------------------------------------------- collection, PDF

INTRO = ("We study agents that work for hours. Long trajectories do not fit into the context "
         "window of the model, so we split them into overlapping windows that share a prefix.")
METHOD = "The loss is the sum of the log-likelihoods of the actions in every window."


def test_pdf_to_markdown_recovers_title_headings_paragraphs_and_every_page(tmp_path):
    pdf = make_pdf(tmp_path / "p.pdf", "Training Agents for Long Horizons",
                   [[("Abstract", "We train agents."), ("1 Introduction", INTRO)],
                    [("2 Method", METHOD), ("2.1 Splitting", "Windows overlap by two turns.")]])
    md = factory.pdf_to_markdown(pdf)
    assert md.startswith("# Training Agents for Long Horizons\n")
    for heading in ("## Abstract", "## 1 Introduction", "## 2 Method", "### 2.1 Splitting"):
        assert f"\n{heading}\n" in md
    assert INTRO in md and METHOD in md                 # wrapped lines joined into one paragraph
    assert factory.pdf_to_markdown(pdf.read_bytes()) == md


def test_collect_local_reads_pdfs_markdown_and_metadata(tmp_path):
    make_pdf(tmp_path / "split.pdf", "Split", [[("1 Introduction", INTRO)]])
    (tmp_path / "notes.md").write_text("# Notes\n\nnot a paper\n")
    (tmp_path / "metadata.jsonl").write_text(json.dumps(
        {"file": "split.pdf", "title": "Split SFT", "venue": "ICML 2025", "year": 2025,
         "citations": 40, "code_url": "https://github.com/x/split"}) + "\n")
    cands = factory.collect_local(tmp_path)
    assert [c.id for c in cands] == ["notes", "split"]
    notes, split = cands
    assert (split.title, split.venue, split.year, split.citations) == ("Split SFT", "ICML 2025", 2025, 40)
    assert notes.venue is None and factory.paper_markdown(notes).startswith("# Notes")
    assert INTRO in factory.paper_markdown(split)
    kept, rejected = factory.filter_candidates(cands, FilterRules(this_year=2026))
    assert kept == [split] and rejected[0].candidate is notes


def test_bad_metadata_line_names_file_and_line(tmp_path):
    (tmp_path / "metadata.jsonl").write_text('{"id": "a"}\n{oops\n')
    with pytest.raises(ValueError, match=r"metadata.jsonl:2: not JSON"):
        factory.collect_local(tmp_path)


def test_collect_paperbench_takes_the_code_url_from_the_blacklist():
    cands = factory.collect_paperbench(SHARED / "paperbench" / "papers",
                                       {"self-composing-policies": {"venue": "ICML 2024",
                                                                    "year": 2024}})
    by_id = {c.id: c for c in cands}
    assert set(by_id) == {"self-composing-policies", "self-expansion", "semantic-self-consistency"}
    assert by_id["self-composing-policies"].code_url == "https://github.com/mikelma/componet"
    assert by_id["self-expansion"].code_url is None
    kept, _ = factory.filter_candidates(cands, FilterRules(this_year=2026))
    assert [c.id for c in kept] == ["self-composing-policies"]


ATOM = """<?xml version="1.0" encoding="UTF-8"?>
<feed xmlns="http://www.w3.org/2005/Atom" xmlns:arxiv="http://arxiv.org/schemas/atom">
  <entry>
    <id>http://arxiv.org/abs/2602.17547v1</id>
    <published>2026-02-19T00:00:00Z</published>
    <title>KLong: Training LLM Agent for
      Extremely Long-horizon Tasks</title>
    <summary>We train agents. Code: https://github.com/example/klong.</summary>
    <arxiv:comment>Accepted at ICML 2026</arxiv:comment>
    <link title="pdf" href="{url}/pdf/2602.17547v1" rel="related" type="application/pdf"/>
  </entry>
</feed>"""


def test_collect_arxiv_parses_metadata_and_downloads_the_pdf(tmp_path, canned):
    pdf = make_pdf(tmp_path / "k.pdf", "KLong", [[("1 Introduction", INTRO)]]).read_bytes()
    server = canned()
    server.pages = {"/api/query": ("application/atom+xml", ATOM.replace("{url}", server.url).encode()),
                    "/pdf/2602.17547v1": ("application/pdf", pdf)}
    [c] = factory.collect_arxiv(["2602.17547"], base_url=server.url, timeout_s=5)
    assert c.id == "2602.17547v1" and c.title.startswith("KLong: Training LLM Agent for Extremely")
    assert (c.venue, c.year, c.code_url) == ("ICML", 2026, "https://github.com/example/klong")
    assert INTRO in factory.paper_markdown(c)


def test_arxiv_without_network_fails_fast_with_a_clear_error(canned):
    import socket
    with socket.socket() as s:                          # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(factory.FactoryNetworkError, match="network may be off"):
        factory.collect_arxiv(["2602.17547"], base_url=closed, timeout_s=2)
    slow = canned(delay_s=3.0)                          # accepts, then never answers in time
    t0 = time.monotonic()
    with pytest.raises(factory.FactoryNetworkError, match="within 0.5 s"):
        factory.collect_arxiv(["2602.17547"], base_url=slow.url, timeout_s=0.5)
    assert time.monotonic() - t0 < 2.5


# ----------------------------------------------------------------------------- rubric generation

def chat_model(server, model="m"):
    """judge.py's endpoint backend on the loopback server, with no retries."""
    return judge.OpenAIChat(server.url + "/v1", model, timeout_s=5, backoff=judge.Backoff(attempts=1))


def good_reply() -> str:
    rubric = {"requirements": "The paper is replicated.", "weight": 1, "sub_tasks": [
        {"requirements": "Trajectories are split into windows that share the prefix.", "weight": 2,
         "sub_tasks": [], "task_category": "Code Development",
         "finegrained_task_category": "Method Implementation"},
        {"requirements": "The split SFT model beats the truncation baseline.", "weight": 1,
         "sub_tasks": [], "task_category": "Result Analysis"}]}
    return "Here it is:\n```json\n" + json.dumps(
        {"addendum": "Use any small model.", "rubric": rubric}) + "\n```"


def test_rubric_generation_retries_a_malformed_reply_with_its_error(tmp_path, canned):
    bad_category = json.loads(good_reply().split("```json\n")[1].split("\n```")[0])
    bad_category["rubric"]["sub_tasks"][0]["task_category"] = "Vibes"
    server = canned(replies=['{"addendum": "x", "rubric": ', json.dumps(bad_category), good_reply()])
    code = tmp_path / "code"
    code.mkdir()
    (code / "README.md").write_text("official code")
    (code / "train.py").write_text("def split_trajectory(): pass\n")
    rubric, addendum = factory.generate_rubric("# Paper\n\nText.", chat_model(server, "evaluator"),
                                               code_dir=code, tries=3)
    assert addendum == "Use any small model." and len(rubric["sub_tasks"]) == 2
    assert all(n.get("id") for n in [rubric, *rubric["sub_tasks"]])
    first, second, third = server.requests
    assert first["model"] == "evaluator" and "def split_trajectory" in first["messages"][1]["content"]
    assert "does not parse" in second["messages"][-1]["content"]
    assert second["messages"][-2] == {"role": "assistant", "content": '{"addendum": "x", "rubric": '}
    assert "field 'task_category'" in third["messages"][-1]["content"]
    assert "'Vibes'" in third["messages"][-1]["content"]


def test_rubric_generation_fails_clearly_after_n_tries(canned):
    server = canned(replies=["no json here", '{"rubric": {}}', "{nope"])
    with pytest.raises(factory.RubricGenerationError) as err:
        factory.generate_rubric("# Paper", chat_model(server, "evaluator"), tries=3)
    text = str(err.value)
    assert "from openai:evaluator after 3 replies" in text
    assert "reply 1: the reply holds no JSON object" in text
    assert "reply 2:" in text and "reply 3: the JSON does not parse" in text
    assert len(server.requests) == 3


def test_build_paper_task_writes_a_valid_paperbench_folder(tmp_path, canned):
    pdf = make_pdf(tmp_path / "k.pdf", "KLong", [[("1 Introduction", INTRO)]])
    server = canned(replies=[good_reply()])
    c = Candidate("klong", "KLong", "ICML 2026", 2026, 10, "https://github.com/example/klong", str(pdf))
    task = factory.build_paper_task(c, tmp_path / "tasks", chat_model(server))
    assert (task / "blacklist.txt").read_text() == "https://github.com/example/klong\n"
    assert INTRO in (task / "paper.md").read_text() and (task / "paper.pdf").exists()
    assert (task / "addendum.md").read_text() == "Use any small model."
    judge.validate_rubric(judge.load_rubric(task / "rubric.json"))


def test_build_tasks_filters_reports_failed_papers_and_resumes(tmp_path, canned):
    pdf = make_pdf(tmp_path / "k.pdf", "KLong", [[("1 Introduction", INTRO)]])
    (tmp_path / "other.md").write_text("# Other\n\nA paper.\n")
    good = Candidate("klong", "KLong", "ICML 2026", 2026, 10, "https://github.com/x/klong", str(pdf))
    no_code = Candidate("nocode", "N", "ICLR 2025", 2025, 10, None, str(pdf))
    failing = Candidate("other", "O", "NeurIPS 2025", 2025, 10, "https://github.com/x/o",
                        str(tmp_path / "other.md"))
    server = canned(replies=[good_reply(), "junk", "more junk"])
    endpoint = chat_model(server)
    rules = FilterRules(this_year=2026)
    tasks, rejected = factory.build_tasks([good, no_code, failing], tmp_path / "tasks", endpoint,
                                          rules, tries=2)
    assert tasks == [tmp_path / "tasks" / "klong"]
    reasons = {r.candidate.id: r.reason for r in rejected}
    assert reasons["nocode"] == "no official code URL"
    assert reasons["other"].startswith("no task: no valid rubric") and "after 2 replies" in reasons["other"]
    server.replies = [good_reply()]                  # a re-run builds only what is missing
    tasks, rejected = factory.build_tasks([good, no_code, failing], tmp_path / "tasks", endpoint,
                                          rules, tries=2)
    assert sorted(t.name for t in tasks) == ["klong", "other"] and len(server.requests) == 4
