"""A training workdir's checkpoints: the layout, the writer the trainer uses (`Checkpointer`), and the read-only
reader that evaluation and inference use (`CheckpointReader`). Orbax, asynchronous, atomic, with retention.

A checkpoint is `WORKDIR/checkpoints/STEP/` with four items (ITEMS):
    state/   the TrainState (step, params, optimizer state, EMA params), sharded arrays (OCDBT)
    rng/     the run's base PRNG key (step s draws from fold_in(rng, s))
    data/    the input iterator's state (JSON); the same on every process (train/input.py), so it is written once
             and a run can resume on a different number of processes
    config/  the config of the run that wrote it (JSON): readers build the model from it

Orbax writes each checkpoint to a temporary folder and renames it when every process has finished, so a crash
mid-save leaves no step folder; `cleanup_tmp_directories` removes the leftovers on the next start. Orbax writes
COMMIT_FILE into the folder as the last step of a save (before the rename, where there is one): readers count a
checkpoint as finished only when it is there, the only mark of completion on filesystems without atomic rename.

A step folder can still be damaged afterwards (a disk error, a partial copy): the trainer's restore walks back from
the newest step and, once an older checkpoint restores, moves the newer ones that failed to
`WORKDIR/checkpoints_corrupt/` with a warning. If none restores, nothing is moved and the run stops: then the likelier
cause is a config that no longer matches the checkpoints (another model size, say), not damage.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any, Protocol

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from contracts import storage

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
CORRUPT_DIR = "checkpoints_corrupt"
ITEMS = ("state", "rng", "data", "config")
COMMIT_FILE = "commit_success.txt"


class CheckpointError(RuntimeError):
    """The workdir has checkpoints but none of them restores into the state this config describes."""


class ReadError(ValueError):
    """A checkpoint cannot be read as asked: none finished, a wrong folder, parameters that do not fit the model."""


class CheckpointDeletedError(ReadError):
    """A checkpoint vanished while it was being read (training's retention deleted it)."""


class DataIterator(Protocol):
    """What the writer needs of the input iterator (a Grain DatasetIterator): a JSON-able position."""

    def get_state(self) -> Any: ...

    def set_state(self, state: Any) -> None: ...


class Checkpointer:
    """Orbax CheckpointManager for one workdir: keeps the newest `keep` checkpoints plus every `keep_every`-th step."""

    def __init__(self, workdir: str, *, keep: int, keep_every: int | None) -> None:
        if keep < 1:
            raise ValueError(f"keep_checkpoints={keep}: keep at least the newest checkpoint")
        self.workdir = workdir
        self.directory = _checkpoints(workdir)
        self._options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            keep_period=keep_every or None,
            enable_async_checkpointing=True,  # the arrays are written while training goes on
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=self._options)

    def latest_step(self) -> int | None:
        """The newest step written and finalized so far (a save still in flight does not count)."""
        return self._manager.latest_step()

    def save(
        self,
        step: int,
        state: Any,
        rng: jax.Array,
        data_iterator: DataIterator,
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
        self, abstract_state: Any, abstract_rng: jax.ShapeDtypeStruct, data_iterator: DataIterator
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
        target = storage.join(self.workdir, CORRUPT_DIR, str(step))
        log.warning("moving the incomplete or corrupt checkpoint %s to %s", self.directory / str(step), target)
        if jax.process_index() == 0:
            storage.makedirs(storage.join(self.workdir, CORRUPT_DIR))
            storage.remove(target)
            storage.move(os.fspath(self.directory / str(step)), target)
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


# ----------------------------------------------------------------------------------------------------------------------
# Reading, while a trainer may still be writing.


def _handlers() -> dict[str, Any]:
    # Every item the trainer writes has a handler, even those a reader never restores (the rng and the data
    # position): Orbax warns about each item it finds without one, on every restore.
    return {
        "state": ocp.PyTreeCheckpointHandler(),
        "config": ocp.JsonCheckpointHandler(),
        "rng": ocp.StandardCheckpointHandler(),
        "data": ocp.JsonCheckpointHandler(),
    }


class CheckpointReader:
    """Read-only access to the finished checkpoints of `WORKDIR/checkpoints/` while training may still write there.

    The Orbax manager is opened read-only and never cleans temporary folders: those belong to the trainer.
    """

    def __init__(self, workdir: str) -> None:
        self.directory = _checkpoints(workdir)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(read_only=True),
            item_handlers=_handlers(),
        )

    def steps(self) -> list[int]:
        """The finished checkpoints' steps, ascending, as of now."""
        self._manager.reload()
        return sorted(s for s in self._manager.all_steps() if self.is_finished(s))

    def is_finished(self, step: int) -> bool:
        return (self.directory / str(step) / COMMIT_FILE).exists()

    def config(self, step: int) -> ml_collections.ConfigDict:
        """The config of the run that wrote checkpoint `step` (the checkpoint's `config` item)."""
        with self._deletion_is_reported(step):
            stored = self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
        return ml_collections.ConfigDict(stored)

    def params(self, step: int, abstract: Any, *, raw: bool = False) -> Any:
        """The EMA (or, with `raw`, the trained) parameters of checkpoint `step`, restored into `abstract`'s shardings.

        `abstract` is the model's parameter tree of ShapeDtypeStructs; a checkpoint whose arrays differ from it in
        names or shapes raises ReadError listing the differences (Orbax itself would restore them silently).
        """
        name = "params" if raw else "ema_params"
        with self._deletion_is_reported(step):
            stored = self._manager.item_metadata(step)["state"].tree[name]
            check_same_arrays(stored, abstract, where=self.directory / str(step))
            item = {name: abstract}
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.PyTreeRestore(
                        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True
                    )
                ),
            )
        return restored["state"][name]

    @contextlib.contextmanager
    def _deletion_is_reported(self, step: int) -> Iterator[None]:
        try:
            yield
        except ReadError:
            raise
        # Broad on purpose: a folder deleted mid-read fails in many ways (missing file, truncated metadata). If the
        # folder is gone, retention won the race; if it is still there, the error is real and propagates.
        except Exception as e:
            if self.is_finished(step):
                raise
            raise CheckpointDeletedError(f"checkpoint {self.directory / str(step)} was deleted while being read") from e


def check_same_arrays(stored: Any, abstract: Any, where: Any) -> None:
    """ReadError listing how the arrays `stored` (shapes) differ from the model's `abstract` tree, if they do."""

    def shapes(tree: Any) -> dict[str, tuple[int, ...]]:
        return {
            jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
        }

    ours, theirs = shapes(abstract), shapes(stored)
    problems = [f"{k}: missing from the checkpoint" for k in sorted(ours.keys() - theirs.keys())]
    problems += [f"{k}: in the checkpoint, not in the model" for k in sorted(theirs.keys() - ours.keys())]
    problems += [
        f"{k}: {theirs[k]} in the checkpoint, {ours[k]} in the model"
        for k in sorted(ours.keys() & theirs.keys())
        if ours[k] != theirs[k]
    ]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise ReadError(
            f"the parameters in {where} do not fit the model its config describes ({shown}). They were written by a "
            "different model definition: sample with the yagg version that trained them"
        )


def _checkpoints(workdir: str) -> epath.Path:
    """WORKDIR/checkpoints as the path Orbax takes (local paths made absolute: Orbax wants them so)."""
    workdir = storage.check(workdir, "workdir")
    return storage.path(workdir if storage.is_url(workdir) else os.path.abspath(workdir)) / CHECKPOINT_DIR


def find_checkpoint(workdir: str | None = None, checkpoint: str | None = None) -> tuple[CheckpointReader, int]:
    """Reader and step for a workdir (its newest finished checkpoint) or one folder WORKDIR/checkpoints/STEP."""
    if (workdir is None) == (checkpoint is None):
        raise ReadError("give exactly one of a workdir (newest checkpoint) and a checkpoint folder (a given one)")
    if checkpoint is not None:
        path = storage.path(str(checkpoint).rstrip("/"), "checkpoint")
        if not (path.name.isdigit() and path.parent.name == CHECKPOINT_DIR):
            raise ReadError(f"{checkpoint}: expected a checkpoint folder WORKDIR/{CHECKPOINT_DIR}/STEP")
        reader, step = CheckpointReader(os.fspath(path.parent.parent)), int(path.name)
        if not reader.is_finished(step):
            raise ReadError(f"{path} is not a finished checkpoint (no {COMMIT_FILE} in it)")
        return reader, step
    reader = CheckpointReader(str(workdir))
    steps = reader.steps()
    if not steps:
        raise ReadError(
            f"no finished checkpoint in {reader.directory}: train first (yagg train --workdir {workdir} ...) or "
            f"name one checkpoint folder WORKDIR/{CHECKPOINT_DIR}/STEP"
        )
    return reader, steps[-1]


# Fields that decide what a checkpoint's parameters mean, beyond their shapes (which are checked separately).
# Computation-only fields (model.dtype, model.remat, model.dropout) may differ between training and evaluation.
MATCHING_FIELDS = (
    "model.channels",
    "model.channel_mults",
    "model.num_res_blocks",
    "model.attention_resolutions",
    "model.head_dim",
    "model.max_relative_distance",
    "model.conv_mode",
    "model.norm_groups",
    "model.param_dtype",
    "diffusion.schedule",
    "diffusion.num_timesteps",
    "diffusion.prediction_type",
    "data.frames",
    "data.size",
    "data.text_embed_dim",
    "data.text_token_dim",
    "data.text_max_length",
)


def _field(config: ml_collections.ConfigDict, dotted: str) -> Any:
    node = config
    for part in dotted.split("."):
        node = node[part]
    # The stored config went through JSON: tuples came back as lists.
    return list(node) if isinstance(node, tuple | list) else node


def check_config_matches(config: ml_collections.ConfigDict, trained: ml_collections.ConfigDict, where: Any) -> None:
    """ReadError naming every field of MATCHING_FIELDS on which `config` and the checkpoint's config differ."""
    wrong = [
        f"{name}={_field(config, name)!r} but the checkpoint has {_field(trained, name)!r}"
        for name in MATCHING_FIELDS
        if _field(config, name) != _field(trained, name)
    ]
    if wrong:
        raise ReadError(
            f"the config does not match checkpoint {where}: {'; '.join(wrong)}. Use the config the run was trained "
            "with, or override these fields (--config.model.channels=...)"
        )
