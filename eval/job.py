"""`evaluate(config, workdir, *, follow, step)`: the eval job, a process of its own beside training.

    yagg eval --config configs/demo.py --workdir runs/demo/train --follow

For every finished checkpoint of `WORKDIR/checkpoints/`, once: restore the EMA parameters -> sample the fixed prompt
set (`config.eval.prompts`, sample i from seed `eval.seed + i`) -> run the evaluators (eval/evaluators.py) -> write

    WORKDIR/eval/STEP/NNN-<prompt>.gif   the samples, at the dataset's frame rate
    WORKDIR/eval/STEP/samples.json      [{"file", "prompt", "seed", "scores"}], scores per sample
    WORKDIR/eval/metrics.jsonl          one row per step: {"step": N, "<name>": value, ...}
    WORKDIR/eval/events.out.tfevents.*  the same scalars for TensorBoard
    WORKDIR/eval/index.html             the gallery (eval/gallery.py), rebuilt after every step
    WORKDIR/eval/evaluated.json         {"steps": [...]}: the steps done, so a restart does not redo them

Only process 0 writes files. A step's files are written before the step enters evaluated.json, so a crash at worst
redoes one step (its metrics.jsonl row is replaced, never duplicated).

Clips come from the inference core (inference/generator.py) with the config's sampling settings, so
`yagg sample PROMPT --seed S` on the same checkpoint writes the same GIF as the eval job's sample of PROMPT with seed
S. Checkpoints are read only once finished (contracts/checkpoint.py::CheckpointReader: never a temporary folder).
Training's retention may delete a checkpoint while it is being read: that step is skipped with a warning. With
`follow`, the job polls every `eval.poll_seconds` and stops once training has finished: the newest checkpoint's step
is the `num_train_steps` of the config stored in it (the trainer always saves its last step; a preempted run stops
earlier and is resumed later, so eval keeps waiting) and every checkpoint up to it has been seen.
`eval.follow_timeout_s` bounds the wait for a trainer that died.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from clu import metric_writers
from jax.experimental import multihost_utils

from contracts import media, scores, storage
from contracts.checkpoint import CheckpointDeletedError, CheckpointReader, check_config_matches
from contracts.conditioning import load_conditioner
from contracts.dataset import DataFacts, local_shards, read_dataset_info
from eval import evaluators as evaluators_lib
from eval.gallery import write_gallery
from inference.generator import GenerateError, Generator, placement
from parallel import mesh as mesh_lib
from pipeline.shapes import all_combinations, caption_for
from yagg.config import ConfigError

log = logging.getLogger(__name__)

EVAL_DIR = scores.EVAL_DIR
LEDGER_FILE = "evaluated.json"
SAMPLES_FILE = "samples.json"
PROMPT_SETS = ("sampling", "shapes")


@dataclasses.dataclass(frozen=True)
class PromptSet:
    """The clips sampled at every checkpoint: prompts[i] from seeds[i] (targets[i] for the shapes set)."""

    prompts: list[str]
    seeds: list[int]
    targets: list[tuple[str, str, str]] | None  # (colour, shape, direction)


def prompt_set(config: ml_collections.ConfigDict) -> PromptSet:
    """`config.eval.prompts` expanded: each prompt `eval.samples_per_prompt` times, seeds eval.seed, eval.seed + 1, ...

    "shapes" is every colour x shape x direction combination of pipeline/shapes.py (`all_combinations`: held-out ones
    included, so each colour, shape and direction is asked for equally often).
    """
    e = config.eval
    if e.prompts == "shapes":
        targets = all_combinations()
        base = [caption_for(shape, color, direction) for color, shape, direction in targets]
    elif e.prompts == "sampling":
        base, targets = [str(p) for p in config.sampling.prompts], None
    else:
        raise ConfigError(f"eval.prompts must be one of {PROMPT_SETS}, got {e.prompts!r}")
    repeats = int(e.samples_per_prompt)
    if not base or repeats < 1:
        raise ConfigError(
            f"the eval prompt set is empty: eval.prompts={e.prompts!r} gives {len(base)} prompt(s) and "
            f"eval.samples_per_prompt={repeats}"
        )
    prompts = [p for p in base for _ in range(repeats)]
    return PromptSet(
        prompts=prompts,
        seeds=[int(e.seed) + i for i in range(len(prompts))],
        targets=None if targets is None else [t for t in targets for _ in range(repeats)],
    )


class EvalError(ValueError):
    """The eval job cannot do what it was asked (no checkpoints, an unknown step, mutually exclusive options)."""


# ----------------------------------------------------------------------------------------------------------------------
# Files.


def _write_json(path: str, value: Any) -> None:
    storage.write_text(path, json.dumps(value, indent=1) + "\n")  # written whole: readers never see half a file


def read_evaluated(eval_dir: str) -> set[int]:
    path = storage.join(eval_dir, LEDGER_FILE)
    return set(json.loads(storage.read_text(path))["steps"]) if storage.is_file(path) else set()


def _file_name(index: int, prompt: str) -> str:
    return f"{index:03d}-{media.prompt_slug(prompt)}.gif"


# ----------------------------------------------------------------------------------------------------------------------
# Agreement between processes: each one lists the folder at a slightly different moment, so process 0 decides.


def _from_process_0(values: Sequence[int]) -> list[int]:
    if jax.process_count() == 1:
        return list(values)
    count = int(multihost_utils.broadcast_one_to_all(np.int32(len(values))))
    if not count:
        return []
    padded = np.zeros(count, np.int32)
    padded[: len(values)] = values[:count]
    return [int(v) for v in multihost_utils.broadcast_one_to_all(padded)]


def _all_true(flag: bool) -> bool:
    if jax.process_count() == 1:
        return flag
    return bool(np.asarray(multihost_utils.process_allgather(np.int32(flag))).min())


# ----------------------------------------------------------------------------------------------------------------------
# The job.


class _Job:
    """Everything built once per eval job; `evaluate_step` then scores one checkpoint."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, reader: CheckpointReader) -> None:
        self.config = config
        self.workdir = workdir
        self.eval_dir = storage.join(workdir, EVAL_DIR)
        self.is_writer = jax.process_index() == 0
        self.reader = reader
        self.prompts = prompt_set(config)

        data_path = str(config.data.path)
        info = read_dataset_info(data_path)
        info.check_fits(config.data)
        self.mesh, self.abstract, shardings = placement(config, mesh_lib.make_mesh(config.mesh))
        facts = DataFacts.of_dataset(data_path, info)
        self.generator = Generator(
            config=config,
            facts=facts,
            conditioner=_conditioner(facts.text_encoder.name),
            params=None,
            step=0,
            mesh=self.mesh,
            param_shardings=shardings,
        )
        e = config.eval
        self.evaluators = evaluators_lib.build_evaluators(
            config,
            model=self.generator.model,
            schedule=self.generator.schedule,
            mesh=self.mesh,
            param_shardings=shardings,
            val_paths=local_shards(data_path, info, "val"),
            clip_name=e.clip or facts.text_encoder.name,
            shapes_prompts=self.prompts.targets is not None,
            num_samples=len(self.prompts.prompts),
        )
        if self.is_writer:
            storage.makedirs(self.eval_dir)
        # TensorFlow writes the events: to a local mirror of eval_dir when that is remote, synced after each step.
        self._events = storage.LocalMirror(self.eval_dir) if self.is_writer else None
        logdir = self._events.local if self._events else self.eval_dir
        self.writer = metric_writers.create_default_writer(logdir, just_logging=not self.is_writer)
        self.evaluated = set(_from_process_0(sorted(read_evaluated(self.eval_dir))))  # process 0's ledger
        self._final_steps: dict[int, int] = {}  # checkpoint step -> num_train_steps of its config

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
        if self._events is not None:
            self._events.sync()

    def evaluate_step(self, step: int) -> bool:
        """Scores checkpoint `step` and writes its files; False if the checkpoint vanished before it was read."""
        started = time.perf_counter()
        where = self.reader.directory / str(step)
        try:
            trained = self.reader.config(step)
            check_config_matches(self.config, trained, where)
            params = self.reader.params(step, self.abstract)
            deleted = None
        except CheckpointDeletedError as e:
            deleted = e
        if not _all_true(deleted is None):
            log.warning("skipping step %d: %s", step, deleted or "another process could not read it")
            return False
        self._final_steps[step] = int(trained.num_train_steps)

        p = self.prompts
        clips = self.generator.with_params(params, step).generate(p.prompts, p.seeds)
        ctx = evaluators_lib.EvalContext(
            step=step, params=params, prompts=p.prompts, seeds=p.seeds, clips=clips.raw, targets=p.targets
        )
        step_scores: dict[str, float | int | str] = {}
        per_sample: list[dict[str, float]] = [{} for _ in p.prompts]
        for evaluator in self.evaluators:
            step_scores.update(evaluator.run(ctx))
            for name, values in evaluator.per_sample(ctx).items():
                for row, value in zip(per_sample, values, strict=True):
                    row[name] = value
        self.evaluated.add(step)  # on every process: they all decide what is left to do the same way
        if self.is_writer:
            self._write(step, clips, step_scores, per_sample)
        summary = ", ".join(f"{k} {v:.4g}" for k, v in step_scores.items() if isinstance(v, float))
        log.info("step %d evaluated in %.1f s: %s", step, time.perf_counter() - started, summary)
        return True

    def _write(
        self, step: int, clips: Any, step_scores: dict[str, float | int | str], per_sample: list[dict[str, float]]
    ) -> None:
        folder = storage.join(self.eval_dir, str(step))
        p = self.prompts
        samples = []
        for i, (pixels, prompt, seed, sample_scores) in enumerate(
            zip(clips.pixels, p.prompts, p.seeds, per_sample, strict=True)
        ):
            name = _file_name(i, prompt)
            media.write_gif(storage.join(folder, name), pixels, clips.fps)
            samples.append({"file": name, "prompt": prompt, "seed": seed, "scores": sample_scores})
        _write_json(storage.join(folder, SAMPLES_FILE), samples)
        scores.replace_row(self.eval_dir, {"step": step, **step_scores})
        self.writer.write_scalars(step, {k: v for k, v in step_scores.items() if isinstance(v, float)})
        self.writer.flush()
        if self._events is not None:
            self._events.sync()
        _write_json(storage.join(self.eval_dir, LEDGER_FILE), {"steps": sorted(self.evaluated)})
        write_gallery(self.eval_dir, title=f"yagg evaluation of {self.workdir}")

    def training_finished(self, steps: Sequence[int], skipped: set[int]) -> bool:
        """True once the newest checkpoint is the run's last step and every checkpoint has been dealt with."""
        if not steps or any(s not in self.evaluated and s not in skipped for s in steps):
            return False
        newest = steps[-1]
        if newest not in self._final_steps:
            try:
                self._final_steps[newest] = int(self.reader.config(newest).num_train_steps)
            except CheckpointDeletedError:
                return False
        return newest >= self._final_steps[newest]


def evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, follow: bool = False, step: int | None = None
) -> list[int]:
    """Evaluates the finished checkpoints of `workdir` not evaluated yet (or only `step`, again if need be); with
    `follow`, keeps waiting for new ones until training has finished (module docstring). Returns the steps evaluated.

    Raises EvalError, GenerateError, ReadError, DataError or ConfigError for problems the user can fix.
    """
    if follow and step is not None:
        raise EvalError("--follow and --step exclude each other: follow a run, or evaluate one step of it")
    workdir = storage.check(workdir, "--workdir")
    for name in ("data.path", "data.text_encoder", "eval.clip", "eval.fvd_cache"):
        value = config.data.get(name.split(".")[1]) if name.startswith("data.") else config.eval.get(name.split(".")[1])
        if value:
            storage.check(value, name)
    reader = CheckpointReader(workdir)
    if not follow:  # answer a wrong --workdir or --step before the minute of set-up
        steps = reader.steps()
        if not steps:
            raise EvalError(
                f"no finished checkpoint in {reader.directory}: check --workdir, or pass --follow to wait for one"
            )
        if step is not None and step not in steps:
            raise EvalError(f"--step {step}: no finished checkpoint of that step in {reader.directory} (has {steps})")
    job = _Job(config, workdir, reader)
    try:
        if step is not None:
            if not job.evaluate_step(step):
                raise EvalError(f"--step {step}: the checkpoint was deleted while it was being read")
            return [step]
        return _evaluate_all(job, follow)
    finally:
        job.close()


def _evaluate_all(job: _Job, follow: bool) -> list[int]:
    e = job.config.eval
    done: list[int] = []
    skipped: set[int] = set()
    last_progress = time.monotonic()
    while True:
        steps = _from_process_0(job.reader.steps())
        todo = [s for s in steps if s not in job.evaluated and s not in skipped]
        for s in todo:
            if job.evaluate_step(s):
                done.append(s)
            else:
                skipped.add(s)  # deleted by retention: it will not come back
        if not follow:
            if not todo:
                log.info("every checkpoint in %s is evaluated already (%s)", job.reader.directory, steps)
            return done
        if _from_process_0([job.training_finished(steps, skipped)])[0]:
            log.info("training has finished (step %d): stopping", steps[-1])
            return done
        if todo:
            last_progress = time.monotonic()
        elif e.follow_timeout_s and time.monotonic() - last_progress > float(e.follow_timeout_s):
            log.warning("no new checkpoint for %.0f s: stopping (eval.follow_timeout_s)", float(e.follow_timeout_s))
            return done
        time.sleep(float(e.poll_seconds))


def _conditioner(name: str) -> Any:
    try:
        return load_conditioner(name)
    except (OSError, ValueError) as e:
        raise GenerateError(f"cannot load the dataset's text encoder {name!r}: {e}") from e
