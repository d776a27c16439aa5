"""`yagg sample` and the inference core under it (inference/), on the session's tiny run (tests/conftest.py)."""

import json
import shutil

import jax
import numpy as np
import pytest
from PIL import Image, ImageSequence

from contracts import media
from contracts.checkpoint import find_checkpoint
from contracts.dataset import frame_rate, read_dataset_info
from inference.generator import Cancelled, GenerateError, Generator, Request, placement
from inference.sample import main, output_paths

RED_LEFT = "a red circle moving left"


def _frames(path):
    with Image.open(path) as gif:
        return np.stack([np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(gif)]), gif.info


@pytest.fixture(scope="module")
def generator(tiny_run):
    return Generator.load(tiny_run.workdir)


def test_sample_writes_upscaled_gifs_per_prompt_and_seed_that_match_the_eval_job(tiny_run, tmp_path, capsys):
    out = tmp_path / "gifs" / "out.gif"
    prompts = [RED_LEFT, "a blue square moving up"]
    args = ["--checkpoint", str(tiny_run.workdir / "checkpoints" / "4"), *prompts, "--out", str(out)]
    assert main([*args, "--num", "2", "--scale", "3", "--steps", "2", "--seed", "0"]) == 0

    names = ["out-000-00.gif", "out-000-01.gif", "out-001-00.gif", "out-001-01.gif"]
    assert sorted(p.name for p in out.parent.iterdir()) == names
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[2] for line in lines] == ["seed 0", "seed 1", "seed 0", "seed 1"]
    assert all("step 4" in line for line in lines)

    fps = frame_rate(str(tiny_run.data), read_dataset_info(str(tiny_run.data)))
    for name in names:
        frames, gif_info = _frames(out.parent / name)
        assert frames.shape == (4, 48, 48, 3)  # the data's 4 frames of 16x16, upscaled 3x
        # Nearest-neighbour: every 3x3 block is one source pixel.
        blocks = frames.reshape(4, 16, 3, 16, 3, 3)
        assert (blocks == blocks[:, :, :1, :, :1]).all()
        assert abs(gif_info["duration"] - 1000 / fps) <= 10  # GIF delays are whole centiseconds

    # The eval job's first shapes sample of step 4 has this prompt, seed 0 and the run's settings: the same pixels,
    # although the eval job drew it among all the shapes prompts and this command among 4.
    ours, _ = _frames(out.parent / names[0])
    theirs, _ = _frames(tiny_run.workdir / "eval" / "4" / "000-a-red-circle-moving-left.gif")
    np.testing.assert_array_equal(ours[:, ::3, ::3], theirs)
    assert not np.array_equal(ours, _frames(out.parent / names[1])[0])  # another seed, another clip

    # Unscaled, the file itself is the same, byte for byte.
    single = tmp_path / "single.gif"
    assert main(["--workdir", str(tiny_run.workdir), RED_LEFT, "--out", str(single), "--seed", "0"]) == 0
    assert single.read_bytes() == (tiny_run.workdir / "eval" / "4" / "000-a-red-circle-moving-left.gif").read_bytes()


def test_a_clip_never_depends_on_what_else_is_drawn_with_it(generator):
    prompts = [RED_LEFT, "a blue square moving up", "a green triangle moving right"]
    together = generator.generate(prompts * 4, list(range(12)), steps=2)  # 12 clips: several calls, a padded one
    alone = generator.generate([prompts[1]], [1], steps=2)
    np.testing.assert_array_equal(together.raw[1], alone.raw[0])
    last = generator.generate([prompts[2]], [11], steps=2)
    np.testing.assert_array_equal(together.raw[11], last.raw[0])
    # Settings travel per clip: a call mixing guidance values and methods gives each clip what it would get alone.
    mixed = generator.run(
        [
            Request(RED_LEFT, seed=3, guidance=1.0),
            Request(RED_LEFT, seed=3, guidance=6.0),
            Request(RED_LEFT, seed=3, guidance=6.0, method="ddpm"),
        ],
        steps=2,
    )
    np.testing.assert_array_equal(mixed.raw[1], generator.generate([RED_LEFT], [3], steps=2, guidance=6.0).raw[0])
    ddpm = generator.generate([RED_LEFT], [3], steps=2, guidance=6.0, method="ddpm").raw[0]
    np.testing.assert_array_equal(mixed.raw[2], ddpm)
    assert not np.array_equal(mixed.raw[0], mixed.raw[1]) and not np.array_equal(mixed.raw[1], mixed.raw[2])


def test_negative_prompts_take_the_place_of_the_null_condition(generator):
    plain = generator.generate([RED_LEFT], [5], steps=2)
    negative = generator.generate([RED_LEFT], [5], steps=2, negative_prompts=["a blue square moving up"])
    assert not np.array_equal(plain.raw, negative.raw)
    # A prompt as its own negative leaves nothing for guidance to amplify: the scale no longer matters.
    own = [generator.generate([RED_LEFT], [5], steps=2, guidance=g, negative_prompts=[RED_LEFT]).raw for g in (2, 9)]
    np.testing.assert_array_equal(own[0], own[1])


def test_progress_is_reported_per_step_and_a_cancelled_call_stops_between_steps(generator):
    seen = []
    generator.generate([RED_LEFT], [0], steps=3, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 3), (2, 3), (3, 3)]
    asked = []
    with pytest.raises(Cancelled):
        generator.generate([RED_LEFT], [0], steps=3, cancelled=lambda: asked.append(1) or len(asked) > 1)
    assert len(asked) == 2  # asked before step 1 (go on) and before step 2 (stop)


def test_settings_out_of_range_are_refused_before_any_work(generator):
    for kwargs, message in [
        ({"steps": 0}, r"steps must be in \[1, 100\]"),
        ({"method": "euler"}, "unknown sampling method"),
        ({"eta": -1.0}, "eta must be >= 0"),
        ({"guidance": float("nan")}, "guidance must be a finite number"),
    ]:
        with pytest.raises(GenerateError, match=message):
            generator.generate([RED_LEFT], [0], **kwargs)
    with pytest.raises(GenerateError, match="seed must be in"):
        generator.generate([RED_LEFT], [2**32])
    with pytest.raises(GenerateError, match="tokens long"):
        generator.generate([" ".join(["word"] * 100)], [0])


def test_raw_params_are_the_trained_parameters_and_the_ema_the_default(tiny_run):
    reader, step = find_checkpoint(workdir=tiny_run.workdir)
    assert step == 4  # the newest
    _, abstract, _ = placement(reader.config(step), None)
    ema, raw = reader.params(step, abstract), reader.params(step, abstract, raw=True)
    assert jax.tree.structure(ema) == jax.tree.structure(raw)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(raw), strict=True))


def test_output_names_are_out_itself_for_one_gif_and_numbered_otherwise(tmp_path):
    assert output_paths(tmp_path / "a.gif", 1, 1) == [[str(tmp_path / "a.gif")]]
    assert output_paths(tmp_path / "a.gif", 2, 1) == [
        [str(tmp_path / "a-000-00.gif")],
        [str(tmp_path / "a-001-00.gif")],
    ]
    with pytest.raises(GenerateError, match="must be a .gif"):
        output_paths(tmp_path / "a.png", 1, 1)


def test_negative_flag_and_gif_media_round_trip(tiny_run, tmp_path):
    out = tmp_path / "neg.gif"
    assert main(["--workdir", str(tiny_run.workdir), RED_LEFT, "--negative", "a blue square", "--out", str(out)]) == 0
    frames, _ = _frames(out)
    assert media.gif_bytes(frames, 8.0) == media.gif_bytes(frames.copy(), 8.0)  # the bytes depend on the pixels only
    assert frames.shape == (4, 16, 16, 3)


@pytest.mark.parametrize(
    ("where", "prompt", "message"),
    [
        ("empty", RED_LEFT, "no finished checkpoint in"),
        ("not-a-step", RED_LEFT, "expected a checkpoint folder"),
        ("not-a-model", RED_LEFT, "not a complete yagg model export"),
        ("run", " ".join(["word"] * 100), "tokens long"),
        ("mismatched", RED_LEFT, "do not fit the model its config describes"),
    ],
)
def test_user_errors_exit_2_with_a_message_naming_the_fix(tiny_run, tmp_path, capsys, where, prompt, message):
    if where == "empty":
        source = ["--workdir", str(tmp_path)]
    elif where == "not-a-step":
        source = ["--checkpoint", str(tiny_run.workdir)]
    elif where == "not-a-model":
        source = ["--model", str(tiny_run.workdir)]
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
    assert main([*source, prompt, "--out", str(tmp_path / "x.gif")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.gif").exists()
