"""Metrics of a training stage: `log.jsonl` always, and the user's tracker (`--report-to`).

Every record a stage logs (one per optimizer step, plus evaluation points) is appended to
`log.jsonl` as one JSON line, flushed at once, so a killed run loses none; `--report-to
tensorboard` also writes each numeric field as a TensorBoard scalar with the record's `step`
(open with `tensorboard --logdir RUN_DIR`). The JSON file stays the source of truth that the
plots, the tests and `bench/` read; the tracker is a view of the same numbers.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

REPORTERS = ("none", "tensorboard")


class Tracker:
    """Append-only metrics log of one stage (`out/log.jsonl`) and the optional TensorBoard view.

    `prefix` names the stage in TensorBoard (`sft/loss`, `rl/reward_mean`, ...); `main` is False
    on the ranks > 0 of a distributed run, which log nothing."""

    def __init__(self, out: Path, report_to: str = "none", prefix: str = "", main: bool = True):
        if report_to not in REPORTERS:
            raise ValueError(f"report_to: expected one of {', '.join(REPORTERS)}, got {report_to!r}")
        self.path, self.prefix, self.main = Path(out) / "log.jsonl", prefix, main
        self._tb = None
        if main and report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter   # needs the tensorboard package
            self._tb = SummaryWriter(log_dir=str(Path(out) / "tensorboard"))

    def log(self, rec: dict) -> None:
        """Append `rec` (it must hold an integer `step`) to log.jsonl and the tracker."""
        if not self.main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self._tb is not None:
            for key, value in rec.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) \
                        and math.isfinite(value):
                    self._tb.add_scalar(f"{self.prefix}/{key}" if self.prefix else key, value,
                                        rec["step"])
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
