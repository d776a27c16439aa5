"""The eval job (eval/job.py) on the session's tiny run (tests/conftest.py), which `--follow` evaluated as it trained:
outputs, the gallery in a real browser, restarts, `--step`, checkpoints that vanish or are unfinished, and errors.

Tests that run the job again work on a copy of the run; the ones that only need set-up restrict it to the cheap
"video" evaluator.
"""

import json
import shutil
from pathlib import Path

import browser
import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util

from contracts.checkpoint import CheckpointReader
from eval.job import EvalError, evaluate, prompt_set
from eval.main import main as main_eval
from pipeline.shapes import all_combinations, is_heldout
from yagg.config import ConfigError, load_config

BASE = Path(__file__).resolve().parents[1] / "configs" / "base.py"
CHEAP = ["eval.evaluators=('video',)"]


def _config(tiny_run, *extra):
    return load_config(BASE, [*tiny_run.overrides, *extra])


def _copy(tiny_run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(tiny_run.workdir, workdir)
    return workdir


def _rows(workdir):
    return [json.loads(line) for line in (workdir / "eval" / "metrics.jsonl").read_text().splitlines()]


def test_follow_evaluated_each_checkpoint_written_after_it_started_then_stopped(tiny_run):
    assert tiny_run.eval_returncode == 0, tiny_run.eval_output[-4000:]
    assert "training has finished (step 4): stopping" in tiny_run.eval_output
    assert "evaluated 2 checkpoint(s) [2, 4]" in tiny_run.eval_output
    eval_dir = tiny_run.workdir / "eval"
    assert json.loads((eval_dir / "evaluated.json").read_text()) == {"steps": [2, 4]}


def test_tensorboard_has_the_scalars_of_metrics_jsonl(tiny_run):
    (events,) = (tiny_run.workdir / "eval").glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    rows = _rows(tiny_run.workdir)
    scalars = {k for k, v in rows[0].items() if k != "step" and isinstance(v, float)}
    assert set(accumulator.Tags()["tensors"]) == scalars  # clu writes scalars as tensor summaries
    for name in ("val/loss", "clipsim/cos"):
        logged = [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in accumulator.Tensors(name)]
        assert logged == [(r["step"], pytest.approx(r[name])) for r in rows]


def test_each_step_has_a_metrics_row_with_every_evaluator(tiny_run):
    rows = _rows(tiny_run.workdir)
    assert [r["step"] for r in rows] == [2, 4]
    buckets = ["val/loss_t00-24", "val/loss_t25-49", "val/loss_t50-74", "val/loss_t75-99"]
    for row in rows:
        scores = {*buckets, "val/loss", "video/flicker", "video/static_fraction", "clipsim/cos", "frechet_clip"}
        assert scores <= set(row)
        words = ("color", "shape", "direction")
        probe = {f"probe/{split}{w}_acc" for split in ("", "heldout_", "real_") for w in words}
        assert probe <= set(row)
        assert row["val/loss"] == pytest.approx(np.mean([row[b] for b in buckets]))
        assert row["clipsim/backbone"] == str(tiny_run.clip)  # the dataset's text encoder, by default
        assert all(np.isfinite(v) for k, v in row.items() if not k.endswith("/backbone"))


def test_each_step_has_a_gif_and_scores_per_prompt_of_the_shapes_set(tiny_run):
    for step in (2, 4):
        folder = tiny_run.workdir / "eval" / str(step)
        samples = json.loads((folder / "samples.json").read_text())
        assert len(samples) == len(all_combinations())
        assert [s["seed"] for s in samples] == list(range(len(samples)))
        asked = [tuple(s["prompt"].split()[i] for i in (1, 2, 4)) for s in samples]
        assert asked == all_combinations() and any(is_heldout(*a) for a in asked)
        for s in samples:
            assert set(s["scores"]) == {"probe/color", "probe/shape", "probe/direction", "clipsim/cos"}
            with Image.open(folder / s["file"]) as gif:
                assert gif.size == (16, 16) and gif.n_frames == 4


@pytest.mark.skipif(browser.CHROMIUM is None, reason=browser.NEEDS_CHROMIUM)
def test_the_gallery_loads_every_sample_in_a_real_browser(tiny_run):
    with browser.page() as page:
        page.goto((tiny_run.workdir / "eval" / "index.html").as_uri())
        page.wait_for_load_state("load")
        assert page.evaluate(browser.IMAGES) == {"count": 144, "broken": []}  # 72 samples at each of the two steps


def test_a_restart_evaluates_nothing_again(tiny_run, tmp_path, caplog):
    workdir = _copy(tiny_run, tmp_path)
    before = (workdir / "eval" / "metrics.jsonl").read_text()
    caplog.set_level("INFO", logger="eval.job")
    assert evaluate(_config(tiny_run, *CHEAP), workdir) == []
    assert "every checkpoint" in caplog.text and "is evaluated already" in caplog.text
    assert (workdir / "eval" / "metrics.jsonl").read_text() == before


def test_step_evaluates_one_checkpoint_again_and_replaces_its_row(tiny_run, tmp_path):
    workdir = _copy(tiny_run, tmp_path)
    config = _config(tiny_run, *CHEAP, "eval.prompts='sampling'")
    assert evaluate(config, workdir, step=2) == [2]
    rows = {r["step"]: r for r in _rows(workdir)}
    assert sorted(rows) == [2, 4]  # replaced, not appended
    assert "video/flicker" in rows[2] and "val/loss" not in rows[2]
    assert "val/loss" in rows[4]
    samples = json.loads((workdir / "eval" / "2" / "samples.json").read_text())
    assert [s["prompt"] for s in samples] == ["a red circle moving left", "a blue square moving up"]
    with pytest.raises(EvalError, match="exclude each other"):
        evaluate(config, workdir, step=2, follow=True)
    with pytest.raises(EvalError, match="--step 3: no finished checkpoint"):
        evaluate(config, workdir, step=3)


def test_a_checkpoint_deleted_while_it_is_read_is_skipped(tiny_run, tmp_path, monkeypatch, caplog):
    workdir = _copy(tiny_run, tmp_path)
    (workdir / "eval" / "evaluated.json").write_text(json.dumps({"steps": [2]}))
    read = CheckpointReader.params

    def deleted_first(self, step, abstract, **kwargs):
        shutil.rmtree(self.directory / str(step))  # retention wins the race, mid-read
        return read(self, step, abstract, **kwargs)

    monkeypatch.setattr(CheckpointReader, "params", deleted_first)
    caplog.set_level("WARNING", logger="eval.job")
    assert evaluate(_config(tiny_run, *CHEAP), workdir) == []
    assert "skipping step 4" in caplog.text and "deleted while being read" in caplog.text
    assert json.loads((workdir / "eval" / "evaluated.json").read_text()) == {"steps": [2]}


def test_unfinished_checkpoint_folders_are_never_listed(tiny_run, tmp_path):
    workdir = _copy(tiny_run, tmp_path)
    checkpoints = workdir / "checkpoints"
    # An Orbax save in flight (its temporary name), and a step folder without Orbax's commit marker.
    shutil.copytree(checkpoints / "4", checkpoints / "6.orbax-checkpoint-tmp-1700000000000000")
    shutil.copytree(checkpoints / "4", checkpoints / "8")
    (checkpoints / "8" / "commit_success.txt").unlink()
    assert CheckpointReader(workdir).steps() == [2, 4]


def test_a_config_that_does_not_match_the_checkpoint_exits_2_naming_the_field(tiny_run, tmp_path, capsys):
    workdir = _copy(tiny_run, tmp_path)
    (workdir / "eval" / "evaluated.json").write_text(json.dumps({"steps": [2]}))
    overrides = [f"--config.{o}" for o in [*tiny_run.overrides, *CHEAP, "diffusion.prediction_type='eps'"]]
    assert main_eval(["--config", str(BASE), "--workdir", str(workdir), *overrides]) == 2
    err = capsys.readouterr().err
    assert "diffusion.prediction_type='eps' but the checkpoint has 'v'" in err


def test_a_workdir_without_checkpoints_exits_2(tiny_run, tmp_path, capsys):
    overrides = [f"--config.{o}" for o in tiny_run.overrides]
    assert main_eval(["--config", str(BASE), "--workdir", str(tmp_path), *overrides]) == 2
    assert "no finished checkpoint in" in capsys.readouterr().err


def test_the_shapes_prompt_set_asks_for_every_combination_with_consecutive_seeds(tiny_run):
    prompts = prompt_set(_config(tiny_run, "eval.samples_per_prompt=2", "eval.seed=10"))
    assert len(prompts.prompts) == 2 * len(all_combinations())
    assert prompts.seeds == list(range(10, 10 + len(prompts.prompts)))
    assert prompts.prompts[0] == prompts.prompts[1] and prompts.targets[0] == prompts.targets[1]
    for prompt, (color, shape, direction) in zip(prompts.prompts, prompts.targets, strict=True):
        assert prompt == f"a {color} {shape} moving {direction}"
    assert prompts.targets[::2] == all_combinations()
    with pytest.raises(ConfigError, match="eval.prompts must be one of"):
        prompt_set(_config(tiny_run, "eval.prompts='everything'"))
