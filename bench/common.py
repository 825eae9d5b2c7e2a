"""The header every bench/results/*.json starts with, and how a result is written.

A figure is quoted only with the machine and the versions that produced it (docs/BENCH.md), so
every bench script builds its result as `{**header("name", ...), ...its figures}`:

    bench          the script's name
    device         cpu or cuda (what ran the measured code)
    device_name    the GPU's name on cuda, else the CPU model (/proc/cpuinfo)
    cpu            the CPU model (bench/report.py lists the machines by it)
    cpu_count      logical CPUs; torch_threads: torch's intra-op threads (when torch is loaded)
    versions       python and each named package (importlib.metadata; None when not installed)
    commit         the git commit of the tree that ran (None outside a checkout), date (UTC)
"""
from __future__ import annotations

import datetime
import importlib.metadata as md
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what the platform module knows."""
    info = Path("/proc/cpuinfo")
    for line in info.read_text().splitlines() if info.exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "cpu"


def slug(name: str) -> str:
    """A file-name piece for a device name: `NVIDIA H100 80GB HBM3` → `nvidia-h100-80gb-hbm3`."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def header(bench: str, device: str = "cpu",
           packages: tuple[str, ...] = ("torch", "transformers")) -> dict:
    """The machine, versions and tree a result comes from (the fields in the module docstring)."""
    torch = sys.modules.get("torch")
    gpu = device == "cuda" and torch is not None and torch.cuda.is_available()
    versions = {"python": platform.python_version()}
    for pkg in packages:
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {"bench": bench, "device": "cuda" if gpu else "cpu",
            "device_name": torch.cuda.get_device_name() if gpu else cpu_model(),
            "cpu": cpu_model(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads() if torch is not None else None,
            "versions": versions, "commit": _commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")}


def write(path: Path, result: dict) -> Path:
    """result as indented JSON at path (folders made); returns path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def write_readme_block(begin: str, end: str, md: str) -> None:
    """Replace what stands between the markers `begin` and `end` in README.md with md (the
    README quotes generated tables, never numbers typed by hand: docs/BENCH.md)."""
    path = ROOT / "README.md"
    text = path.read_text()
    if begin not in text or end not in text:
        raise SystemExit(f"README.md: the markers {begin} … {end} are missing")
    head, rest = text.split(begin, 1)
    path.write_text(head + begin + "\n" + md + "\n" + end + rest.split(end, 1)[1])
