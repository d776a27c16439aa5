"""`multiprocess_step_overhead`: the demo train step's time in 2 processes x 1 CPU device each, divided by its time in
1 process with 2 CPU devices (informational: what running as a multi-process job costs on one machine).

    python -m bench.multiprocess [--quick] [--config configs/demo.py] [--config.batch_size=...]

Both sides run `bench.train_mfu.build_train_step`, i.e. the trainer's own compiled step (train/loop.py), on the same
global batch and the same (data=2, fsdp=1) mesh of two devices:
  * one process with two devices (`XLA_FLAGS=--xla_force_host_platform_device_count=2`);
  * two processes with one device each on localhost, joined by `parallel.distributed.initialize_distributed`, the
    function `yagg train --coordinator_address ... --num_processes 2 --process_id I` calls (gloo collectives over TCP, a
    coordinator port picked free at run time); each process loads only its rows of the batch, as in training.
All three worker processes are started together and compile, then this process drives them in alternation: one step
of the single process, then one step of the pair (both processes told at once; the pair's step time is the slower of
the two), and so on, while the side not being timed waits idle. Each side's best step is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO

from bench.common import REPO, Metric, write_metrics
from bench.train_mfu import DEFAULT_CONFIG, parse_config_args, reproduce_command

MARK = "BENCH "  # prefix of the workers' protocol lines on stdout (libraries may print there too)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(argv: list[str]) -> None:
    """A worker process: builds the step, prints `ready`, then runs one step per `step` line on stdin."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--coordinator_address")
    parser.add_argument("--num_processes", type=int)
    parser.add_argument("--process_id", type=int)
    args, overrides = parser.parse_known_args(argv)

    from parallel.distributed import initialize_distributed  # noqa: PLC0415  (before anything touches a JAX backend)

    initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    import jax  # noqa: PLC0415

    from bench.train_mfu import build_train_step, load, timed  # noqa: PLC0415

    step = build_train_step(load(args.config, overrides))
    info = {"compile_seconds": step.compile_seconds, "flops": step.flops, "processes": jax.process_count()}
    info |= {"devices": jax.device_count(), "mesh": dict(step.mesh.shape), "global_batch": int(step.config.batch_size)}
    print(MARK + json.dumps(info), flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        print(MARK + json.dumps({"seconds": timed(step.run).wall}), flush=True)


class _Worker:
    def __init__(self, cmd: list[str], devices: int, log: IO[str]) -> None:
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
        self.log = log
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True
        )

    def send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def receive(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK) :])
        self.log.flush()
        tail = Path(self.log.name).read_text()[-3000:]
        raise RuntimeError(f"worker {' '.join(self.proc.args[3:])} exited ({self.proc.wait()}):\n{tail}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2:])
        return
    args, overrides = parse_config_args(__doc__.split("\n")[0])
    rounds = 3 if args.quick else 8
    base = [sys.executable, "-m", "bench.multiprocess", "--worker", "--config", args.config, *overrides]
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        logs = [open(Path(tmp) / f"worker{i}.log", "w") for i in range(3)]  # noqa: SIM115  (closed below)
        single = _Worker(base, devices=2, log=logs[0])
        pair = [
            _Worker(
                [*base, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
                devices=1,
                log=logs[1 + i],
            )
            for i in range(2)
        ]
        workers = [single, *pair]
        try:
            ready = [w.receive() for w in workers]
            assert ready[0]["mesh"] == ready[1]["mesh"] == ready[2]["mesh"], ready
            times: dict[str, list[float]] = {"one_process_two_devices": [], "two_processes_one_device": []}
            for _ in range(rounds + 1):  # the first round is the warm-up
                single.send("step")
                times["one_process_two_devices"].append(single.receive()["seconds"])
                for w in pair:
                    w.send("step")
                times["two_processes_one_device"].append(max(w.receive()["seconds"] for w in pair))
        finally:
            for w in workers:
                w.stop()
            for log in logs:
                log.close()
    best = {side: min(t[1:]) for side, t in times.items()}
    metric = Metric(
        name="multiprocess_step_overhead",
        value=best["two_processes_one_device"] / best["one_process_two_devices"],
        goal=None,
        command=reproduce_command("bench.multiprocess", args, overrides, DEFAULT_CONFIG),
        details={
            "config": args.config,
            "overrides": overrides,
            "mesh": ready[0]["mesh"],
            "global_batch": ready[0]["global_batch"],
            "step_seconds": best,
            "step_seconds_all": {side: [round(s, 4) for s in t] for side, t in times.items()},
            "compile_seconds": {
                "one_process_two_devices": ready[0]["compile_seconds"],
                "two_processes_one_device": max(r["compile_seconds"] for r in ready[1:]),
            },
            "flops_per_step_per_device": {"one_process": ready[0]["flops"], "two_processes": ready[1]["flops"]},
            "rounds": rounds,
            "cpu_count": os.cpu_count(),
        },
        unit="ratio of step times",
    )
    write_metrics([metric], args.json)


if __name__ == "__main__":
    main()
