"""What every benchmark shares: the result record, the JSON hand-off to `bench/run.py`, and the rules of measuring.

A benchmark is a module `bench/NAME.py` with `main()` that takes `--quick` and `--json PATH` and writes a list of
`Metric`s there (`write_metrics`). `bench/run.py` runs each one in its own Python process (so XLA flags, device
counts and memory never leak between them) and merges the lists into `bench/results/latest.json`.

Rules, because the development machine is shared and noisy: a figure is a ratio of two rates measured in the same
process, interleaved where possible, each rate the best of several repeats after a warm-up; absolute times are kept in
`details` for reading, never compared across runs. A benchmark times the code path users run (the Beam job, the
Grain pipeline, the jitted train step), never a re-implementation of it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class Metric:
    """One reported figure. `goal` is a comparison such as ">= 1.5" or "<= 0.10", or None when informational."""

    name: str
    value: float | None
    goal: str | None
    command: str  # the command that reproduces this figure, from the repository root
    details: dict[str, Any] = dataclasses.field(default_factory=dict)
    unit: str = "ratio"
    skipped: str | None = None  # why no value was measured (e.g. no GPU), when value is None

    def met(self) -> bool | None:
        """Whether the goal is met; None when there is no goal or no value."""
        if self.goal is None or self.value is None:
            return None
        op, bound = self.goal.split()
        assert op in (">=", "<="), f"goal {self.goal!r} must be '>= X' or '<= X'"
        return self.value >= float(bound) if op == ">=" else self.value <= float(bound)


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and smaller inputs (make bench-quick)")
    parser.add_argument("--json", type=Path, help="write the metrics here as JSON (bench/run.py reads it)")
    return parser.parse_args()


def write_metrics(metrics: list[Metric], path: Path | None) -> None:
    """Prints each metric and, given a path, writes them all as a JSON list."""
    for m in metrics:
        value = "skipped: " + str(m.skipped) if m.value is None else f"{m.value:.4g}"
        verdict = {True: "goal met", False: "goal MISSED", None: ""}[m.met()]
        print(f"{m.name}: {value} {m.unit} (goal {m.goal}) {verdict}".rstrip(), flush=True)
    if path is not None:
        path.write_text(json.dumps([dataclasses.asdict(m) | {"met": m.met()} for m in metrics], indent=2) + "\n")


def best_time(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """The minimum wall time of `repeats` calls of `fn` after `warmup` untimed ones (the least-disturbed run)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)
