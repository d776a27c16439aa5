"""The eval job's scores file: `WORKDIR/eval/metrics.jsonl`, one JSON object per evaluated checkpoint step
({"step": N, "<metric>": value, ...}; strings are labels saying how a score was made). The eval job writes it; its
gallery and `yagg export` (a model card's scores) read it.
"""

from __future__ import annotations

import json
from typing import Any

from contracts import storage

EVAL_DIR = "eval"
METRICS_FILE = "metrics.jsonl"


def read_rows(eval_dir: str) -> list[dict[str, Any]]:
    """Every row of `eval_dir/metrics.jsonl`, in file order (none if the file does not exist)."""
    path = storage.join(eval_dir, METRICS_FILE)
    if not storage.exists(path):
        return []
    return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]


def replace_row(eval_dir: str, row: dict[str, Any]) -> None:
    """Appends `row`, dropping any earlier row of the same step (a step redone after a crash or with --step); the
    file is replaced whole, so a reader never sees half of it."""
    kept = [json.dumps(r) for r in read_rows(eval_dir) if r["step"] != row["step"]]
    storage.write_text(storage.join(eval_dir, METRICS_FILE), "".join(line + "\n" for line in [*kept, json.dumps(row)]))
