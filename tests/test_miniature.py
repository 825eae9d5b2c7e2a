"""bench/miniature.py --quick: the whole miniature pipeline (simulated factory → three SFT arms →
progressive and single-stage RL → real evaluation episodes of every arm) runs end to end with
tiny budgets and produces the ablation table (Markdown + JSON + plot). It asserts that the
pipeline runs, not what the numbers are (that is the full benchmark's job). ~3 minutes."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_miniature_produces_the_ablation_table(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "miniature.py"), "--quick",
                        "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "FAILED" not in r.stdout, r.stdout[-3000:]
    res = json.loads((tmp_path / "miniature.json").read_text())
    assert set(res["arms"]) == {"A", "A+p", "B", "C", "P", "S", "C+long"}
    for arm, row in res["arms"].items():          # every arm trained, evaluated and judged
        assert row["seeds"] == 1 and 0.0 <= row["score_mean"] <= 1.0, (arm, row)
        assert 0 < row["turns"] <= res["config"]["eval_timeout"]
    assert all(res["rl"][a]["rollout_turns"][0] > 0 for a in ("P", "S"))
    c, p = res["arms"]["C"]["per_seed_score"][0], res["arms"]["P"]["per_seed_score"][0]
    assert res["paired"]["P-C"]["per_seed"] == [p - c]         # paired on the same seed
    assert all(0.0 <= row["end_share"] <= 1.0 for row in res["arms"].values())   # all evaluated
    md = (tmp_path / "miniature.md").read_text()
    assert md.count("\n| ") >= 7 + 5 + 5 and "paired difference" in md and "trajectory-splitting SFT" in md and "38.63" in md
    assert (tmp_path / "miniature.png").stat().st_size > 1000
