"""Joining a job of several processes (hosts, or CPU processes on one machine) before anything touches a backend.

Used by `yagg train` and `yagg eval`, which take the same three flags: --coordinator_address HOST:PORT of process 0,
--num_processes N and --process_id I. On a Cloud TPU VM the processes find each other without them.
"""

from __future__ import annotations

import argparse
import glob


def add_flags(parser: argparse.ArgumentParser) -> None:
    """The three flags that place a process in a job of several."""
    parser.add_argument(
        "--coordinator_address",
        help="HOST:PORT of process 0, for a job of several processes (not needed on Cloud TPU VMs)",
    )
    parser.add_argument("--num_processes", type=int, help="number of processes in the job (with --coordinator_address)")
    parser.add_argument("--process_id", type=int, help="this process's index, 0..N-1 (with --coordinator_address)")


def _on_cloud_tpu_vm() -> bool:
    # TPU VMs expose their chips as /dev/accel* (v2-v4) or /dev/vfio/N (v5e and later).
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def initialize_distributed(coordinator_address: str | None, num_processes: int | None, process_id: int | None) -> None:
    """Joins the multi-process job (before anything touches a JAX backend); a single process needs nothing.

    Raises ConfigError for an incomplete or inconsistent set of the three flags."""
    import jax

    from yagg.config import ConfigError  # these flags configure the run as much as the config file does

    explicit = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise ConfigError("--coordinator_address, --num_processes and --process_id go together: give all three")
        if not 0 <= process_id < num_processes:
            raise ConfigError(f"--process_id must be in [0, {num_processes}), got {process_id}")
        # CPU processes exchange data over gloo (TCP); the default CPU backend has no cross-process collectives.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    elif _on_cloud_tpu_vm():
        jax.distributed.initialize()  # the TPU runtime tells every worker the coordinator, count and index
