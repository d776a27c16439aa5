"""The benchmark harness (bench/common.py, bench/run.py): goals, the results table, the quick run's skips, and the
GPU benchmark's skip path on a machine without a GPU. The benchmarks themselves are run by `make bench`, not here:
their figures are measurements, not test outcomes."""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

# bench/ is a folder of the repository, not part of the installed distribution: import it from the checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, Metric  # noqa: E402
from bench.run import FULL_ONLY, _table  # noqa: E402


@pytest.mark.parametrize(
    ("value", "goal", "met"),
    [(1.6, ">= 1.5", True), (1.4, ">= 1.5", False), (0.06, "<= 0.10", True), (0.2, "<= 0.10", False),
     (1.0, None, None), (None, ">= 1.5", None)],
)  # fmt: skip
def test_metric_goal(value, goal, met):
    assert Metric("m", value, goal, "python -m bench.x").met() is met


def test_table_lists_every_metric_with_its_command_and_verdict():
    results = {
        "commit": "abc",
        "date": "2026-01-01T00:00:00+00:00",
        "quick": True,
        "machine": {"cpu_count": 2, "devices": ["TFRT_CPU_0"]},
        "runs": [{"name": "loader", "returncode": 0}, {"name": "sampling", "returncode": 1}],
        "metrics": [
            {"name": "a", "value": 25.0, "goal": ">= 20", "met": True, "command": "python -m bench.loader"},
            {"name": "b", "value": None, "goal": None, "met": None, "command": "python -m bench.x", "skipped": "why"},
        ],
    }
    table = _table(results)
    assert "| `a` | 25 | >= 20 | yes | `python -m bench.loader` |" in table
    assert "| `b` | skipped: why | informational | - | `python -m bench.x` |" in table
    assert "Failed to run: sampling." in table


def test_gpu_benchmark_records_why_it_skipped_without_a_gpu(tmp_path):
    out = tmp_path / "gpu.json"
    subprocess.run([sys.executable, "-m", "bench.gpu_mfu", "--json", str(out)], cwd=REPO, check=True, timeout=300)
    (metric,) = json.loads(out.read_text())
    assert metric["name"] == "train_gpu_mfu_tgif64"
    assert metric["value"] is None and "GPU" in metric["skipped"]


def test_quick_run_names_what_it_leaves_out():
    assert set(FULL_ONLY) == {"multiprocess", "fvd"}
    assert all("make bench" in why for _, why in FULL_ONLY.values())


@pytest.mark.parametrize("module", sorted(p.stem for p in (REPO / "bench").glob("*.py") if p.stem != "__init__"))
def test_every_benchmark_imports_against_the_code_it_times(module):
    # A benchmark is run by hand, not by the suite: importing it at least catches one left behind by a refactor.
    importlib.import_module(f"bench.{module}")
