"""Runs yagg's benchmarks and writes `bench/results/latest.json` and `bench/results/latest.md`.

    python -m bench.run            # make bench: every benchmark, full size
    python -m bench.run --quick    # make bench-quick: smaller inputs, fewer repeats, no multi-process run
    python -m bench.run --only clip_embed loader

Each benchmark runs as `python -m bench.NAME [--quick] --json TMP` in its own process (see bench/common.py); a
benchmark that fails is recorded with its error and the others still run. The exit status is 1 if any benchmark
failed to run; a missed goal is reported, not an error (the numbers are the product).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import time

from bench.common import REPO, Metric

# Run order: cheap and independent first.
BENCHMARKS = (
    "preprocess",
    "clip_embed",
    "loader",
    "train_mfu",
    "sampling",
    "serve",
    "attention_memory",
    "fvd",
    "multiprocess",
    "gpu_mfu",
)
# Not run by --quick, with the reason recorded in place of each metric: each takes minutes even in its own quick mode,
# more than the quick run's whole budget (multiprocess: each of its three processes compiles the demo train step, 2-3
# minutes together on 2 cores; fvd: the I3D at 224 x 224 takes seconds per clip on a CPU).
FULL_ONLY = {
    "multiprocess": (
        ("multiprocess_step_overhead",),
        "full run only: its three processes each compile the train step; run `make bench`",
    ),
    "fvd": (
        ("fvd_i3d_batched_vs_one_clip", "fvd_share_of_demo_eval_pass"),
        "full run only: the I3D takes seconds per clip on a CPU; run `make bench` or `python -m bench.fvd --quick`",
    ),
}
RESULTS = REPO / "bench" / "results"


def _machine() -> dict:
    import jax  # noqa: PLC0415  (only to record versions and devices)

    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "devices": [str(d) for d in jax.devices()],
    }


def _git_commit() -> str | None:
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False)
    return out.stdout.strip() or None


def _run_one(name: str, quick: bool) -> tuple[list[dict], dict]:
    tmp = RESULTS / f"{name}.json.tmp"
    tmp.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", f"bench.{name}", "--json", str(tmp)] + (["--quick"] if quick else [])
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, check=False)
    run = {"name": name, "seconds": round(time.perf_counter() - start, 1), "returncode": proc.returncode}
    if proc.returncode != 0 or not tmp.exists():
        return [], run
    metrics = json.loads(tmp.read_text())
    tmp.unlink()
    return metrics, run


def _table(results: dict) -> str:
    lines = [
        f"Benchmarks at commit `{results['commit']}`, {results['date']}, "
        f"{'quick' if results['quick'] else 'full'} run, {results['machine']['cpu_count']} CPUs, "
        f"devices {', '.join(results['machine']['devices'])}.",
        "",
        "| metric | value | goal | met | command |",
        "| --- | --- | --- | --- | --- |",
    ]
    for m in results["metrics"]:
        value = f"skipped: {m['skipped']}" if m["value"] is None else f"{m['value']:.3g}"
        met = {True: "yes", False: "**no**", None: "-"}[m["met"]]
        lines.append(f"| `{m['name']}` | {value} | {m['goal'] or 'informational'} | {met} | `{m['command']}` |")
    failed = [r["name"] for r in results["runs"] if r["returncode"] != 0]
    if failed:
        lines += ["", f"Failed to run: {', '.join(failed)}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller inputs and fewer repeats (under 5 minutes)")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, help="run only these benchmarks")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    metrics, runs = [], []
    for name in args.only or BENCHMARKS:
        if args.quick and name in FULL_ONLY:
            names, why = FULL_ONLY[name]
            for metric in names:
                skipped = Metric(metric, None, None, f"python -m bench.{name}", skipped=why)
                metrics.append(dataclasses.asdict(skipped) | {"met": None})
            continue
        print(f"== bench.{name}", flush=True)
        got, run = _run_one(name, args.quick)
        metrics += got
        runs.append(run)
    results = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": _git_commit(),
        "quick": args.quick,
        "machine": _machine(),
        "runs": runs,
        "metrics": metrics,
    }
    (RESULTS / "latest.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "latest.md").write_text(_table(results))
    print(_table(results))
    sys.exit(1 if any(r["returncode"] != 0 for r in runs) else 0)


if __name__ == "__main__":
    main()
