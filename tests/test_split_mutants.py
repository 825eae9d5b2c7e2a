"""Mutation check of the splitter's tests (issue 18 item 4): each deliberately broken splitter
below must fail tests/test_split.py.

Each mutant is one source edit of split.py. The test copies the repository's Python files,
tests/ and data/ into a temporary folder, applies the edit there and runs
`pytest tests/test_split.py -x` in a subprocess (the "ci" hypothesis profile). The mutant is
caught when that run reports a failing test (exit status 1); a crash at import or collection
(status 2-4) does not count. The exact, hand-worked tests stand first in test_split.py, so a
caught mutant stops within seconds; all eight take about a minute on two cores.

Run alone: `python -m pytest tests/test_split_mutants.py -q` (README, "Splitting, for students").
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# (name, the exact text in split.py, what the broken splitter has instead)
MUTANTS = [
    ("no truncation of older observations",
     "else (j, *self.older(j, t, age)) for j in range(*self.turns[t])]",
     "else (j, self.m[j], self.n[j]) for j in range(*self.turns[t])]"),
    ("no older history (overlap only)",
     '        if cfg.mode == "klong":\n            budget = self.H',
     '        if False:\n            budget = self.H'),
    ("omission marker never inserted",
     'if self.cfg.mode == "klong" and d > 0:',
     "if False:"),
    ("supervise_overlap ignored",
     "cfg.supervise_overlap and j >= v_start",
     "False and j >= v_start"),
    ("an action supervised twice",
     "trained = k >= w0 or",
     "trained = k >= w0 - 2 or"),
    ("p's actions supervised in every sub-trajectory",
     "(i == 0 and k < self.P)",
     "(k < self.P)"),
    ("packed position ids off by one after the prefix",
     "list(range(P, P + len(body_ids)))",
     "list(range(P + 1, P + 1 + len(body_ids)))"),
    ("a sub-trajectory one token over L_max",
     "if used + size > L:",
     "if used + size > L + 1:"),
]


def _copy_repo(dst: Path) -> None:
    for f in ROOT.glob("*.py"):
        shutil.copy2(f, dst / f.name)
    shutil.copy2(ROOT / "pytest.ini", dst / "pytest.ini")
    ignore = shutil.ignore_patterns("__pycache__", ".hypothesis", "*.pyc")
    for d in ("tests", "data", "kernels"):
        if (ROOT / d).is_dir():
            shutil.copytree(ROOT / d, dst / d, ignore=ignore)


def test_every_mutation_applies_to_the_current_splitter():
    """Each mutant's text occurs exactly once in split.py (else the check below tests nothing)."""
    src = (ROOT / "split.py").read_text()
    for name, old, _ in MUTANTS:
        assert src.count(old) == 1, f"mutant '{name}': its text is not in split.py once"


@pytest.mark.parametrize("name,old,new", MUTANTS, ids=[m[0] for m in MUTANTS])
def test_the_split_tests_catch_a_broken_splitter(tmp_path, name, old, new):
    _copy_repo(tmp_path)
    src = (tmp_path / "split.py").read_text()
    assert src.count(old) == 1
    (tmp_path / "split.py").write_text(src.replace(old, new))
    env = {**os.environ, "HYPOTHESIS_PROFILE": "ci", "PYTHONDONTWRITEBYTECODE": "1",
           "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "pytest", "tests/test_split.py", "-x", "-q",
                          "-p", "no:cacheprovider", "--no-header"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=900)
    tail = (run.stdout + run.stderr)[-1500:]
    assert run.returncode == 1, f"mutant '{name}' survived (exit {run.returncode}):\n{tail}"
    caught = [ln for ln in run.stdout.splitlines() if ln.startswith("FAILED ")]
    assert len(caught) == 1, tail
    print(f"mutant '{name}' caught by {caught[0].split()[1]}")
