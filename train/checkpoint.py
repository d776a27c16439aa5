"""Saving and restoring everything a run needs to continue exactly: Orbax, asynchronous, atomic, with retention.

A checkpoint is `WORKDIR/checkpoints/STEP/` with four items:
    state/   the TrainState (step, params, optimizer state, EMA params), sharded arrays (OCDBT)
    rng/     the run's base PRNG key (step s draws from fold_in(rng, s))
    data/    the Grain iterator state (JSON); the same on every process (train/input.py), so it is written once
             and a run can resume on a different number of processes
    config/  the config of the run that wrote it (JSON; eval reads the model section from here)

Orbax writes each checkpoint to a temporary folder and renames it when every process has finished, so a crash
mid-save leaves no step folder; `cleanup_tmp_directories` removes the leftovers on the next start. A step folder can
still be damaged afterwards (a disk error, a partial copy): restoring walks back from the newest step and, once an
older checkpoint restores, moves the newer ones that failed to `WORKDIR/checkpoints_corrupt/` with a warning. If
none restores, nothing is moved and the run stops: then the likelier cause is a config that no longer matches the
checkpoints (another model size, say), not damage.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
CORRUPT_DIR = "checkpoints_corrupt"


class CheckpointError(RuntimeError):
    """The workdir has checkpoints but none of them restores into the state this config describes."""


class Checkpointer:
    """Orbax CheckpointManager for one workdir: keeps the newest `keep` checkpoints plus every `keep_every`-th step."""

    def __init__(self, workdir: str | Path, *, keep: int, keep_every: int | None) -> None:
        if keep < 1:
            raise ValueError(f"keep_checkpoints={keep}: keep at least the newest checkpoint")
        self.workdir = Path(workdir)
        self.directory = self.workdir / CHECKPOINT_DIR
        self._options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            keep_period=keep_every or None,
            enable_async_checkpointing=True,  # the arrays are written while training goes on
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(self.directory.absolute(), options=self._options)

    def latest_step(self) -> int | None:
        """The newest step written and finalized so far (a save still in flight does not count)."""
        return self._manager.latest_step()

    def save(
        self,
        step: int,
        state: Any,
        rng: jax.Array,
        data_iterator: grain.DatasetIterator,
        config: ml_collections.ConfigDict,
    ) -> None:
        """Starts an asynchronous save; training continues while the arrays are written."""
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                rng=ocp.args.StandardSave({"key": rng}),  # Standard* take trees, not bare arrays
                data=ocp.args.JsonSave(data_iterator.get_state()),
                config=ocp.args.JsonSave(config.to_dict()),
            ),
            force=True,
        )

    def restore_latest(
        self, abstract_state: Any, abstract_rng: jax.ShapeDtypeStruct, data_iterator: grain.DatasetIterator
    ) -> tuple[Any, jax.Array, int] | None:
        """(state, rng, step) of the newest checkpoint that restores cleanly into the abstract shardings, or None.

        `data_iterator` is moved to where the checkpointed run stood.
        """
        failed: list[tuple[int, Exception]] = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                restored = self._manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state),
                        rng=ocp.args.StandardRestore({"key": abstract_rng}),
                        data=ocp.args.JsonRestore(),
                    ),
                )
            # Broad on purpose: a damaged folder fails in many ways (missing file, truncated bytes, bad metadata).
            except Exception as e:
                log.warning("checkpoint %s does not restore: %s", self.directory / str(step), _first_line(e))
                failed.append((step, e))
                continue
            for bad_step, _ in failed:
                self._set_aside(bad_step)
            data_iterator.set_state(restored["data"])
            return restored["state"], restored["rng"]["key"], step
        if failed:
            step, error = failed[0]
            raise CheckpointError(
                f"none of the {len(failed)} checkpoint(s) in {self.directory} restores into the state this config "
                f"describes (step {step}: {_first_line(error)}). If the model, optimizer or mesh config changed, run "
                "with the config that wrote them, or use a new --workdir"
            )
        return None

    def _set_aside(self, step: int) -> None:
        target = self.workdir / CORRUPT_DIR / str(step)
        log.warning("moving the incomplete or corrupt checkpoint %s to %s", self.directory / str(step), target)
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                shutil.rmtree(target)
            shutil.move(str(self.directory / str(step)), str(target))
        multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
        self._manager.reload()

    def reached_preemption(self, step: int) -> bool:
        """In a multi-process job: True once every process has reached the step JAX's preemption service agreed on
        after one of them got SIGTERM (they must all save at the same step)."""
        return self._manager.reached_preemption(step)

    def wait(self) -> None:
        """Blocks until the save in flight (if any) is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:300] if text else ''}"
