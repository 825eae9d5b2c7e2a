"""The architecture stays as docs/ARCHITECTURE.md draws it (issue 20).

- Imports go one way: the import graph, derived from the source by AST (module-level and
  function-level imports alike) over every top-level module and kernels/, has no cycle, nothing
  imports klong, the lower modules never import the higher ones, and every edge goes down the
  intended layers (LAYERS, the same table as docs/ARCHITECTURE.md's).
- Every document the code cites (`NAME.md` in any .py or .md) exists in docs/ (or is the
  README), every "resolution N" it cites is a numbered entry of docs/ARCHITECTURE.md, and every
  `file.py:name` of docs/PAPER_MAP.md names a function or class that exists.

Each checker is also run on a small broken tree in tmp_path, so a checker that sees nothing
cannot pass."""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

# Lowest first. A module may import modules of lower layers, or of its own layer without a cycle.
LAYERS: list[set[str]] = [
    {"chat", "split", "kernels", "dist", "cli", "task", "sandbox_init", "tracking",   # plumbing,
     "endpoint"},                                   # the OpenAI-compatible client,
                                                    # splitting math, the task layout, the
                                                    # in-sandbox init, metrics logging
    {"sandbox", "sandbox_pool"},                    # backends + PaperBench task layout;
                                                    # sandboxes started ahead of episodes
    {"judge"},                                      # rubric trees, graders, aggregation
    {"judge_queue", "agent"},                       # the priority queue; the agent scaffold
    {"sampler", "synthetic", "rollout_server"},     # batched rollout sampler; the miniature's
                                                    # tasks; rollouts from a vLLM/SGLang server
    {"model"},                                      # model loading, packed log-probs, checkpoints
    {"factory"},                                    # Research-Factory
    {"sft"},                                        # SFT (stages 1 and 3)
    {"grpo"},                                       # progressive RL + evaluation
    {"klong"},                                      # CLI, Config, stage dispatch: nothing imports it
]
LOWER = {"split", "chat", "kernels", "sandbox", "judge"}
HIGHER = {"grpo", "factory", "agent", "klong", "sft", "synthetic"}
SKIP_DIRS = {".git", ".hypothesis", ".benchmarks", "__pycache__", "runs", ".pytest_cache"}
CLIENTS = {"tests", "bench", "scripts"}    # use the modules; not part of the graph


# ----------------------------------------------------------------------------- the checkers

def module_files(root: Path) -> dict[str, list[Path]]:
    """Project modules: each top-level *.py, and each package folder with an __init__.py
    (kernels/) as one module; tests/, bench/ and scripts/ are clients, not modules."""
    mods = {p.stem: [p] for p in sorted(root.glob("*.py"))}
    for init in sorted(root.glob("*/__init__.py")):
        if init.parent.name not in CLIENTS:
            mods[init.parent.name] = sorted(init.parent.glob("*.py"))
    return mods


def imported_modules(path: Path, local: set[str]) -> set[str]:
    """The project modules a file imports, anywhere in it (module level, in functions, under if)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out & local


def import_graph(root: Path) -> dict[str, set[str]]:
    mods = module_files(root)
    return {m: set().union(*(imported_modules(f, set(mods)) for f in files)) - {m}
            for m, files in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle as [a, b, …, a], or None."""
    state: dict[str, int] = {}          # 1 = on the stack, 2 = done

    def visit(m: str, stack: list[str]) -> list[str] | None:
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (c := visit(n, stack + [n])):
                return c
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m, [m])):
            return c
    return None


def layer_violations(graph: dict[str, set[str]], layers: list[set[str]]) -> list[str]:
    """Modules missing from the layers, and imports that go up a layer."""
    level = {m: i for i, layer in enumerate(layers) for m in layer}
    out = [f"{m}: in no layer (add it to LAYERS and docs/ARCHITECTURE.md)"
           for m in sorted(graph) if m not in level]
    out += [f"{m} (layer {level[m]}) imports {n} (layer {level[n]})"
            for m in sorted(graph) for n in sorted(graph[m])
            if m in level and n in level and level[n] > level[m]]
    return out


def text_files(root: Path, suffixes=(".py", ".md")) -> list[Path]:
    """The .py and .md files of a tree; not this file (its examples cite documents on purpose)."""
    return [p for p in sorted(root.rglob("*")) if p.suffix in suffixes and p.is_file()
            and not SKIP_DIRS & set(p.relative_to(root).parts) and p != Path(__file__).resolve()]


def missing_documents(root: Path) -> list[str]:
    """`NAME.md` citations (upper-case names) that are neither docs/NAME.md nor root/NAME.md."""
    out = []
    for p in text_files(root):
        for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
            for name in re.findall(r"(?<![\w/.-])([A-Z][A-Z0-9_]*\.md)\b", line):
                if not (root / "docs" / name).is_file() and not (root / name).is_file():
                    out.append(f"{p.relative_to(root)}:{n}: {name}")
    return out


_RESOLUTION = re.compile(r"\bresolutions?\s+(\d+(?:\s*(?:[-–]|,|and)\s*\d+)*)"
                         r"|ARCHITECTURE\.md\s+(\d+(?:\s*(?:[-–]|,|and)\s*\d+)*)", re.I)


def cited_resolutions(root: Path) -> dict[int, str]:
    """{N: where} for each "resolution N", "resolutions N–M", "ARCHITECTURE.md N and M" in the
    code and the README (docs/ is the definition, not a citation)."""
    out: dict[int, str] = {}
    for p in text_files(root):
        if p.parts[len(root.parts)] == "docs":
            continue
        for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
            for m in _RESOLUTION.finditer(line):
                spec = m[1] or m[2]
                for a, b in re.findall(r"(\d+)(?:\s*[-–]\s*(\d+))?", spec):
                    for k in range(int(a), int(b or a) + 1):
                        out.setdefault(k, f"{p.relative_to(root)}:{n}")
    return out


def numbered_resolutions(architecture: Path) -> set[int]:
    """The numbered entries of the "Resolutions" section of ARCHITECTURE.md."""
    text = architecture.read_text()
    start = text.index("\n## Resolutions")
    section = text[start:text.find("\n## ", start + 1)]
    return {int(n) for n in re.findall(r"^(\d+)\. ", section, re.M)}


def map_entries(paper_map: Path) -> list[str]:
    """Every `file.py:name` (or `file.py:Class.method`) cell of PAPER_MAP.md."""
    return re.findall(r"`([\w/]+\.py):([\w.]+)`", paper_map.read_text())


def missing_map_entries(root: Path, entries: list[tuple[str, str]]) -> list[str]:
    """Entries whose file is gone, or whose name is not a top-level def/class of it (or a method
    of that class)."""
    out = []
    for file, name in entries:
        path = root / file
        if not path.is_file():
            out.append(f"{file}:{name}: no such file")
            continue
        scope = ast.parse(path.read_text()).body
        for part in name.split("."):
            node = next((n for n in scope if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                             ast.ClassDef)) and n.name == part), None)
            if node is None:
                out.append(f"{file}:{name}: no def or class {part}")
                break
            scope = node.body
    return out


def documented_layers(architecture: Path) -> list[set[str]]:
    """The layer table under "Imports go one way" in ARCHITECTURE.md."""
    text = architecture.read_text()
    start = text.index("### Imports go one way")
    rows = re.findall(r"^\| (\d+) \| (.+) \|$", text[start:text.find("\n## ", start)], re.M)
    return [set(re.findall(r"`(\w+)`", cells)) for _, cells in rows]


# ----------------------------------------------------------------------------- the real tree

def test_the_import_graph_has_no_cycle():
    assert find_cycle(import_graph(ROOT)) is None


def test_nothing_imports_klong():
    graph = import_graph(ROOT)
    assert "klong" in graph and "grpo" in graph["klong"]      # the graph sees real imports
    assert [m for m, deps in graph.items() if "klong" in deps] == []


def test_lower_modules_never_import_higher_ones():
    graph = import_graph(ROOT)
    assert {m: graph[m] & HIGHER for m in LOWER if graph[m] & HIGHER} == {}
    assert "factory" not in graph["grpo"]          # the tasks reach RL through synthetic.py


def test_every_import_goes_down_the_layers():
    assert layer_violations(import_graph(ROOT), LAYERS) == []


def test_the_documented_layers_are_the_tested_ones():
    assert documented_layers(DOCS / "ARCHITECTURE.md") == LAYERS


def test_every_module_is_in_the_module_map():
    text = (DOCS / "ARCHITECTURE.md").read_text()
    table = text[text.index("## Module map"):text.index("### Imports go one way")]
    listed = set(re.findall(r"^\| `(\w+)(?:\.py|/)` \|", table, re.M))
    assert set(module_files(ROOT)) - listed == set()


def test_every_cited_document_exists():
    assert missing_documents(ROOT) == []


def test_every_cited_resolution_is_numbered_in_architecture():
    cited = cited_resolutions(ROOT)
    assert {4, 6, 8} <= set(cited)                  # the code does cite them
    numbered = numbered_resolutions(DOCS / "ARCHITECTURE.md")
    assert {k: where for k, where in cited.items() if k not in numbered} == {}


def test_every_function_in_the_paper_map_exists():
    entries = map_entries(DOCS / "PAPER_MAP.md")
    assert len(entries) >= 60, "the map's `file.py:name` cells were not found"
    assert missing_map_entries(ROOT, entries) == []


def test_the_paper_map_covers_the_papers_equations_and_choices():
    text = (DOCS / "PAPER_MAP.md").read_text()
    for thing, where in [("L_SFT", "sft.py:sft_step"), ("Â = Q", "grpo.py:group_advantages"),
                         ("1/(n·K)", "grpo.py:rl_update"), ("clip(r_t", "grpo.py:ppo_kl_loss"),
                         ("β·KL", "grpo.py:ppo_kl_loss"), ("T⁽¹⁾", "grpo.py:schedule"),
                         ("priority", "judge_queue.py:Priority"), ("overlap", "split.py:"),
                         ("progressive truncation", "split.py:_Splitter.older"),
                         ("pinned prefix p", "agent.py:"), ("sub-trajectory τ⁽ⁱ⁾", "split.py:"),
                         ("evidence by rubric category", "judge.py:eligible_files")]:
        rows = [ln for ln in text.splitlines() if ln.startswith("| ") and thing in ln.split(" | ")[0]]
        assert any(where in row for row in rows), f"no row for {thing!r} naming {where}"


# ----------------------------------------------------------------------------- the checkers fail

def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_a_cycle_through_a_function_level_import_is_found(tmp_path):
    _tree(tmp_path, {"a.py": "import b\n", "b.py": "def f():\n    from c import x\n",
                     "c.py": "import os\nif True:\n    import a\n", "d.py": "import a\n"})
    graph = import_graph(tmp_path)
    assert graph == {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    cycle = find_cycle(graph)
    assert cycle and cycle[0] == cycle[-1] and set(cycle) == {"a", "b", "c"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) is None


def test_a_package_is_one_module_and_its_imports_count(tmp_path):
    _tree(tmp_path, {"pkg/__init__.py": "from pkg.k import f\n", "pkg/k.py": "import top\n",
                     "top.py": "from pkg import f\n"})
    graph = import_graph(tmp_path)
    assert graph == {"pkg": {"top"}, "top": {"pkg"}} and find_cycle(graph)


def test_an_upward_import_and_an_unlisted_module_are_reported(tmp_path):
    _tree(tmp_path, {"low.py": "def f():\n    import high\n", "high.py": "import low\n",
                     "new.py": ""})
    found = layer_violations(import_graph(tmp_path), [{"low"}, {"high"}])
    assert found == ["new: in no layer (add it to LAYERS and docs/ARCHITECTURE.md)",
                     "low (layer 0) imports high (layer 1)"]


def test_a_cited_document_that_is_missing_is_reported(tmp_path):
    _tree(tmp_path, {"README.md": "see docs/GUIDE.md\n", "docs/GUIDE.md": "",
                     "m.py": '"""As GUIDE.md and README.md say; MISSING.md does not exist."""\n',
                     "notes/x.md": "See OTHER.md.\n"})
    assert missing_documents(tmp_path) == ["m.py:1: MISSING.md", "notes/x.md:1: OTHER.md"]


def test_a_cited_resolution_that_is_not_numbered_is_reported(tmp_path):
    _tree(tmp_path, {"docs/ARCHITECTURE.md": "# A\n## Resolutions here\n1. one\n2. two\n"
                                             "## Next\n3. not a resolution\n",
                     "m.py": "# resolutions 1–2 and (ARCHITECTURE.md 2 and 3)\n",
                     "n.py": "# Resolution 9: see ARCHITECTURE.md 1-2\n"})
    cited = cited_resolutions(tmp_path)
    assert cited == {1: "m.py:1", 2: "m.py:1", 3: "m.py:1", 9: "n.py:1"}
    numbered = numbered_resolutions(tmp_path / "docs" / "ARCHITECTURE.md")
    assert numbered == {1, 2} and set(cited) - numbered == {3, 9}


def test_a_paper_map_entry_that_is_gone_is_reported(tmp_path):
    _tree(tmp_path, {"m.py": "class C:\n    def f(self):\n        pass\n\ndef g():\n    def inner():\n"
                             "        pass\n",
                     "MAP.md": "| x | `m.py:C.f`, `m.py:g` | `m.py:C.h` `m.py:inner` `gone.py:g` |\n"})
    entries = map_entries(tmp_path / "MAP.md")
    assert entries == [("m.py", "C.f"), ("m.py", "g"), ("m.py", "C.h"), ("m.py", "inner"),
                       ("gone.py", "g")]
    assert missing_map_entries(tmp_path, entries) == [
        "m.py:C.h: no def or class h", "m.py:inner: no def or class inner", "gone.py:g: no such file"]


@pytest.mark.parametrize("text,expected", [("| 0 | `a`, `b` |\n| 1 | `c` |\n", [{"a", "b"}, {"c"}])])
def test_the_documented_layer_table_is_parsed(tmp_path, text, expected):
    arch = _tree(tmp_path, {"A.md": f"### Imports go one way\n\n| layer | modules |\n|---|---|\n{text}"
                                    "\n## Next\n| 2 | `z` |\n"}) / "A.md"
    assert documented_layers(arch) == expected
