"""The PaperBench task: its folder format and its layout in a sandbox (KLong trains and evaluates
on PaperBench-format tasks; docs/PAPERBENCH.md).

A task folder holds paper.md (factory.py converts paper.pdf), addendum.md, blacklist.txt,
config.yaml (id, title), the grading files (rubric.json, judge.*) and optionally
instructions.txt. The agent sees PaperBench's layout in its sandbox: the folder minus the grading
files and config in /home/paper, the instructions in /home/instructions.txt, and a fresh git
repository /home/submission; the rubric never enters (issue 21). Works on any object with the
sandbox interface (`upload`, `write_file`, `init_repository`); nothing here imports sandbox.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

HOME = "/home"                          # the task layout's root inside every isolated tier
SUBMISSION = "/home/submission"
PAPER_DIR = "/home/paper"

DEFAULT_INSTRUCTIONS = """\
You are asked to reproduce the research paper in /home/paper/paper.md (clarifications and scope in
/home/paper/addendum.md). Read the paper through first: the other tools are refused until you have.

Write your reproduction as a git repository in /home/submission/. Its root must hold reproduce.sh,
which runs the whole reproduction (it will be run as `bash reproduce.sh` in a fresh copy of the
repository) and writes the results, and a README.md saying what you did and where the results are.
Commit your work regularly.

Do not use the resources listed in /home/paper/blacklist.txt (such as the paper's official code):
commands that refer to them are refused, and using them disqualifies the run.
Call end_task when you are done.
"""
HIDDEN = ("rubric.json", "config.yaml", "instructions.txt")   # never copied to /home/paper


@dataclass
class Task:
    """A PaperBench-format task folder (docs/ARCHITECTURE.md "Task"), as the agent will see it."""
    id: str
    dir: Path
    title: str
    paper: str                  # paper.md
    addendum: str               # addendum.md ("" when absent)
    blacklist: list[str]        # blacklist.txt, one URL a line ("none" = empty)
    instructions: str           # instructions.txt of the folder, else DEFAULT_INSTRUCTIONS


def load_task(task_dir) -> Task:
    """Read a task folder; errors name the file and what was expected."""
    d = Path(task_dir)
    if not (d / "paper.md").is_file():
        raise FileNotFoundError(f"{d / 'paper.md'}: missing; a task folder needs paper.md "
                                f"(factory.py converts paper.pdf)")
    config = {}
    if (d / "config.yaml").is_file():
        config = yaml.safe_load((d / "config.yaml").read_text()) or {}
        if not isinstance(config, dict):
            raise ValueError(f"{d / 'config.yaml'}: expected a mapping with 'id' and 'title'")
    bl = (d / "blacklist.txt").read_text().split("\n") if (d / "blacklist.txt").is_file() else []
    read = (lambda name: (d / name).read_text() if (d / name).is_file() else "")
    return Task(id=str(config.get("id", d.name)), dir=d, title=str(config.get("title", d.name)),
                paper=read("paper.md"), addendum=read("addendum.md"),
                blacklist=[u.strip() for u in bl if u.strip() and u.strip().lower() != "none"],
                instructions=read("instructions.txt") or DEFAULT_INSTRUCTIONS)


def lay_out_task(box, task: Task, init_submission: bool = True) -> None:
    """PaperBench's layout in `box` (a started sandbox.Sandbox): the task folder (minus rubric,
    config and judge files) in /home/paper, the instructions in /home/instructions.txt, and
    /home/submission as a fresh git repository (`init_submission=False`: the caller already made
    it with `make_submission`, as sandbox_pool does before the task is known)."""
    for item in sorted(task.dir.iterdir()):
        if item.name not in HIDDEN and not item.name.startswith(("judge", ".")):
            box.upload(item, f"{PAPER_DIR}/{item.name}")
    box.write_file(f"{HOME}/instructions.txt", task.instructions)
    if init_submission:
        make_submission(box)


def make_submission(box) -> None:
    """/home/submission as a fresh git repository (the one task-independent part of the layout;
    `box.init_repository`: `git init -q --template=`, or its copy on the local tiers)."""
    box.init_repository(SUBMISSION)
