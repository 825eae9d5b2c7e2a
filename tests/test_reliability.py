"""The README's reliability table (issue 21.6) is generated from bench/results JSON, never typed:
the committed block equals what bench/reliability.py renders from the committed JSON, each
figure in the table comes from its file, and a missing file reads "not measured"."""
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("reliability", ROOT / "bench" / "reliability.py")
reliability = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reliability)


def test_the_readme_block_is_the_rendering_of_the_committed_json():
    text = (ROOT / "README.md").read_text()
    block = text.split(reliability.BEGIN, 1)[1].split(reliability.END, 1)[0]
    assert block.strip() == reliability.render().strip(), \
        "README reliability table is stale: run python bench/reliability.py --table"


def test_each_figure_comes_from_its_json_and_missing_files_read_not_measured(tmp_path):
    empty = reliability.render(tmp_path)
    assert empty.count("not measured") == 4
    (tmp_path / "reliability-cpu.json").write_text(json.dumps({
        "profile": "thorough",
        "fuzz": {"cases": 6123, "cases_by_property": {"trajectory records": 2041, "rubric trees": 2041,
                                                       "config values": 2041},
                 "properties": 3, "properties_failed": 0, "passed": True, "wall_s": 321.0},
        "kill": {"stages": {"sft": {"points": 57, "killed": 51, "passed": True},
                            "rl": {"points": 58, "killed": 3, "passed": False}},
                 "tests": {"test_rl_killed_anywhere": {"passed": False, "message":
                                                       "AssertionError: [1.5]\nassert [1, 1, 2] == [1, 2]"}},
                 "passed": False, "wall_s": 1200.0}}))
    (tmp_path / "judge_faults-cpu.json").write_text(json.dumps({
        "calls": 417, "injected": {"http_500": 11, "hang": 13}, "retries": 29, "unavailable": 1,
        "silent_scores": 0, "run_completed": True, "wall_s": 88.0}))
    (tmp_path / "soak-local-cpu.json").write_text(json.dumps({
        "backend": "local", "tier": "namespace", "sandboxes": 16, "commands_per_sandbox": 1000,
        "commands": 16000, "modes": {"flood": {"count": 1291}}, "undocumented": 0,
        "errors": {"timeout: raised SandboxError": 2}, "left_behind": {"total": 0},
        "rss": {"peak_mb": 47.3, "growth_mb": 1.2}, "wall_s": 600.0}))
    md = reliability.render(tmp_path)
    assert "not measured" not in md
    for figure in ["6,123 cases", "2,041", "sft: 57 points (51 killed mid-run)", "rl: 58 points",
                   "**FAILED** (`assert [1, 1, 2] == [1, 2]`)", "417 calls", "24 injected failures",
                   "http_500 11", "29 retries", "0 silent scores",
                   "16 sandboxes × 1,000 commands = 16,000", "flood 1,291", "0 left behind", "peak RSS 47 MB",
                   "+1.2 MB", "timeout: raised SandboxError 2", "namespace tier",
                   "factory: not finished"]:
        assert figure in md, figure
