"""`yagg sample` (eval/sample.py, eval/main.py::main_sample) on the session's tiny run (tests/conftest.py)."""

import json
import shutil

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image, ImageSequence

from eval.main import main_sample
from eval.sample import SampleError, abstract_params, build_model, find_checkpoint, output_paths
from pipeline.shards import read_dataset_info
from train import mesh as mesh_lib
from train.input import shard_paths
from train.samples import dataset_frame_rate


def _frames(path):
    with Image.open(path) as gif:
        return np.stack([np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(gif)]), gif.info


def test_sample_writes_upscaled_gifs_per_prompt_and_seed_that_match_the_eval_job(tiny_run, tmp_path, capsys):
    out = tmp_path / "gifs" / "out.gif"
    prompts = ["a red circle moving left", "a blue square moving up"]
    args = ["--checkpoint", str(tiny_run.workdir / "checkpoints" / "4"), *prompts, "--out", str(out)]
    assert main_sample([*args, "--num", "2", "--scale", "3", "--steps", "2", "--seed", "0"]) == 0

    names = ["out-000-00.gif", "out-000-01.gif", "out-001-00.gif", "out-001-01.gif"]
    assert sorted(p.name for p in out.parent.iterdir()) == names
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[2] for line in lines] == ["seed 0", "seed 1", "seed 0", "seed 1"]
    assert all("step 4" in line for line in lines)

    info = read_dataset_info(str(tiny_run.data))
    fps = dataset_frame_rate(info, shard_paths(tiny_run.data, info))
    for name in names:
        frames, gif_info = _frames(out.parent / name)
        assert frames.shape == (4, 48, 48, 3)  # the data's 4 frames of 16x16, upscaled 3x
        # Nearest-neighbour: every 3x3 block is one source pixel.
        blocks = frames.reshape(4, 16, 3, 16, 3, 3)
        assert (blocks == blocks[:, :, :1, :, :1]).all()
        assert abs(gif_info["duration"] - 1000 / fps) <= 10  # GIF delays are whole centiseconds

    # Same prompt, seed, steps and guidance as the eval job's first shapes sample of step 4: the same clip.
    ours, _ = _frames(out.parent / names[0])
    theirs, _ = _frames(tiny_run.workdir / "eval" / "4" / "000-a-red-circle-moving-left.gif")
    assert np.abs(ours[:, ::3, ::3].astype(int) - theirs.astype(int)).max() <= 2  # up to compiler rounding
    assert not np.array_equal(ours, _frames(out.parent / names[1])[0])  # another seed, another clip


def test_raw_params_are_the_trained_parameters_and_the_ema_the_default(tiny_run):
    reader, step = find_checkpoint(workdir=tiny_run.workdir)
    assert step == 4  # the newest
    config = reader.config(step)
    model, _ = build_model(config)
    mesh = mesh_lib.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1}))
    abstract, _ = abstract_params(model, config, mesh, mesh_lib.logical_rules(config.sharding_rules))
    ema, raw = reader.params(step, abstract), reader.params(step, abstract, raw=True)
    assert jax.tree.structure(ema) == jax.tree.structure(raw)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(raw), strict=True))


def test_output_names_are_out_itself_for_one_gif_and_numbered_otherwise(tmp_path):
    assert output_paths(tmp_path / "a.gif", 1, 1) == [[tmp_path / "a.gif"]]
    assert output_paths(tmp_path / "a.gif", 2, 1) == [[tmp_path / "a-000-00.gif"], [tmp_path / "a-001-00.gif"]]
    with pytest.raises(SampleError, match="must be a .gif"):
        output_paths(tmp_path / "a.png", 1, 1)


@pytest.mark.parametrize(
    ("where", "prompt", "message"),
    [
        ("empty", "a red circle moving left", "no finished checkpoint in"),
        ("not-a-step", "a red circle moving left", "expected a step folder"),
        ("run", " ".join(["word"] * 100), "tokens long"),
        ("mismatched", "a red circle moving left", "do not fit the model its config describes"),
    ],
)
def test_user_errors_exit_2_with_a_message_naming_the_fix(tiny_run, tmp_path, capsys, where, prompt, message):
    if where == "empty":
        source = ["--workdir", str(tmp_path)]
    elif where == "not-a-step":
        source = ["--checkpoint", str(tiny_run.workdir)]
    elif where == "run":
        source = ["--workdir", str(tiny_run.workdir)]
    else:
        # A checkpoint whose stored config describes another model than its arrays.
        workdir = tmp_path / "run"
        shutil.copytree(tiny_run.workdir / "checkpoints", workdir / "checkpoints")
        stored = workdir / "checkpoints" / "4" / "config" / "metadata"
        config = json.loads(stored.read_text())
        config["model"]["channels"] = 16
        stored.write_text(json.dumps(config))
        source = ["--checkpoint", str(workdir / "checkpoints" / "4")]
    assert main_sample([*source, prompt, "--out", str(tmp_path / "x.gif")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.gif").exists()
