"""`yagg train` end to end on a tiny ArrayRecord set made by the real preprocessing job (24 shapes clips, 4 frames of
16x16, the tiny CLIP) and a tiny U-Net: outputs, retention, exact resume after kill -9, SIGTERM, a damaged
checkpoint, a non-finite loss, and a real two-process run matching one process with two devices.

Every run is a `python -m train.main` subprocess, as a user starts it, with XLA's CPU backend at optimisation level 0
(compiling the U-Net at the default level takes minutes on 2 cores) and one persistent compilation cache for the
module, so runs of the same program compile once. The runs are compared by their metrics.jsonl.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from contracts import records
from model.tiny_clip import make_tiny_clip
from pipeline.run import Settings, preprocess
from pipeline.shapes import make_shapes

REPO = Path(__file__).resolve().parents[1]
TOTAL_STEPS = 6
TINY = [
    "--config.data.frames=4",
    "--config.data.size=16",
    "--config.data.text_embed_dim=64",
    "--config.data.text_token_dim=64",
    "--config.model.channels=8",
    "--config.model.channel_mults=(1,)",
    "--config.model.num_res_blocks=1",
    "--config.model.attention_resolutions=()",
    "--config.model.head_dim=8",
    "--config.model.norm_groups=4",
    "--config.model.dtype=float32",
    "--config.diffusion.num_timesteps=100",
    "--config.optimizer.warmup_steps=2",
    "--config.optimizer.learning_rate=0.001",
    "--config.batch_size=4",
    "--config.log_every=1",
    "--config.checkpoint_every=2",
    "--config.keep_checkpoints=1",
    "--config.keep_every=4",
    "--config.sample_every=3",
    "--config.sampling.num_steps=2",
    "--config.sampling.prompts=('a red circle moving left','a blue square moving up')",
    f"--config.num_train_steps={TOTAL_STEPS}",
]
# What a run logs that depends on wall-clock time, not on the computation.
TIMING = {"step_time_s", "examples_per_s", "flops_per_s_per_device", "mfu"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-data")
    manifest = make_shapes(root / "shapes", num=24, seed=0)
    clip = make_tiny_clip(root / "tiny-clip", seed=0)
    preprocess(
        Settings(
            manifests=(str(manifest),),
            output=str(root / "data"),
            text_encoder=str(clip),
            frames=4,
            size=16,
            num_shards=2,
            val_fraction=0.1,
        ),
        pipeline_args=["--direct_running_mode=in_memory"],
    )
    return root / "data"


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("jax-cache")


def _env(compile_cache, devices=2):
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_backend_optimization_level=0 --xla_force_host_platform_device_count={devices}",
        JAX_COMPILATION_CACHE_DIR=str(compile_cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )
    return env


def _command(dataset, workdir, *overrides):
    return [
        sys.executable,
        "-m",
        "train.main",
        "--config",
        str(REPO / "configs" / "base.py"),
        "--workdir",
        str(workdir),
        f"--config.data.path={dataset}",
        *TINY,
        *overrides,
    ]


def _train(dataset, compile_cache, workdir, *overrides, devices=2):
    return subprocess.run(
        _command(dataset, workdir, *overrides),
        cwd=REPO,
        env=_env(compile_cache, devices),
        capture_output=True,
        text=True,
        timeout=400,
    )


def _start(dataset, compile_cache, workdir, *overrides):
    # The child keeps its own copy of the file descriptor; ours can close at once.
    with open(Path(str(workdir) + ".log"), "w") as log:
        return subprocess.Popen(
            _command(dataset, workdir, *overrides), cwd=REPO, env=_env(compile_cache), stdout=log, stderr=log
        )


def _metrics(workdir):
    lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def _wait_until(condition, process, what, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        assert process.poll() is None, f"the run ended (status {process.returncode}) before {what}"
        time.sleep(0.05)
    raise AssertionError(f"not {what} within {timeout} s")


def _logged_steps(workdir):
    path = Path(workdir) / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def _checkpoints(workdir):
    folder = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def _tensorboard_tags(workdir):
    events = list(Path(workdir).glob("events.out.tfevents.*"))
    assert len(events) == 1, events
    tensorboard = EventAccumulator(str(events[0]), size_guidance={"tensors": 0})
    tensorboard.Reload()
    return set(tensorboard.Tags()["tensors"])  # TF2 summaries store scalars and images as tensors


@pytest.fixture(scope="module")
def baseline(dataset, compile_cache, tmp_path_factory):
    """One uninterrupted run with one process and two devices: the reference every other run is compared with."""
    workdir = tmp_path_factory.mktemp("baseline") / "run"
    out = _train(dataset, compile_cache, workdir)
    assert out.returncode == 0, out.stderr[-4000:]
    return workdir


def test_a_run_logs_every_step_and_keeps_the_newest_and_every_kth_checkpoint(baseline):
    metrics = _metrics(baseline)
    assert [m["step"] for m in metrics] == list(range(1, TOTAL_STEPS + 1))
    for m in metrics:
        assert {"loss", "grad_norm", "param_norm", "learning_rate"} <= set(m)
        assert any(k.startswith("loss_t") for k in m)  # per-timestep-bucket loss
    assert metrics[0]["learning_rate"] == 0.0 and metrics[2]["learning_rate"] == pytest.approx(1e-3)  # warmup
    # keep_checkpoints=1 keeps the newest (6); keep_every=4 keeps step 4 for good; step 2 is deleted.
    assert _checkpoints(baseline) == [4, 6]
    assert {"loss", "grad_norm", "learning_rate", "loss_t0of4"} <= _tensorboard_tags(baseline)


def test_samples_are_gifs_at_the_dataset_frame_rate_and_strips_in_tensorboard(baseline, dataset):
    info = json.loads((dataset / "dataset_info.json").read_text())
    assert info["fps"] is None  # time-uniform sampling: the rate is estimated from the records' frame times
    gaps = []
    for shard in info["splits"]["train"]["shards"]:
        reader = ArrayRecordReader(str(dataset / shard["file"]))
        gaps += [np.diff(records.decode(r)["frame_times_ms"]) for r in reader.read_all()]
        reader.close()
    frame_ms = float(np.median(np.concatenate(gaps)))
    for step in (3, 6):
        gifs = sorted((baseline / "samples" / str(step)).glob("*.gif"))
        assert [g.name for g in gifs] == ["00-a-red-circle-moving-left.gif", "01-a-blue-square-moving-up.gif"]
        with Image.open(gifs[0]) as gif:
            assert gif.size == (16, 16) and gif.n_frames == 4
            assert abs(gif.info["duration"] - frame_ms) <= 10  # GIF delays are whole centiseconds
    assert {"samples/00", "samples/01"} <= _tensorboard_tags(baseline)  # one strip of frames per prompt


def test_a_training_sample_is_what_yagg_sample_draws_from_that_checkpoint(baseline, compile_cache, tmp_path):
    samples = json.loads((baseline / "samples" / "6" / "samples.json").read_text())
    assert [s["seed"] for s in samples] == [0, 0]  # every prompt from sampling.seed
    out = tmp_path / "again.gif"
    command = [sys.executable, "-c", "import sys; from yagg.cli import main; sys.exit(main(sys.argv[1:]))"]
    command += ["sample", "--checkpoint", str(baseline / "checkpoints" / "6"), samples[1]["prompt"]]
    command += ["--seed", str(samples[1]["seed"]), "--out", str(out)]
    result = subprocess.run(command, cwd=REPO, env=_env(compile_cache), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert out.read_bytes() == (baseline / "samples" / "6" / samples[1]["file"]).read_bytes()


def test_kill_9_then_restart_logs_exactly_the_uninterrupted_losses(dataset, compile_cache, baseline, tmp_path):
    workdir = tmp_path / "run"
    process = _start(dataset, compile_cache, workdir)
    # Step 3 is followed by sampling (a pause of a second or more): the kill lands after the checkpoint of step 2
    # was committed and step 3 was logged, so the restart must resume from step 2 and drop step 3's line.
    _wait_until(
        lambda: _logged_steps(workdir) >= 3 and (workdir / "checkpoints" / "2").is_dir(), process, "checkpoint 2"
    )
    process.kill()
    assert process.wait() == -signal.SIGKILL
    assert len(_metrics(workdir)) < TOTAL_STEPS

    out = _train(dataset, compile_cache, workdir)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "resumed from step" in out.stderr
    assert _metrics(workdir) == _metrics(baseline)


def test_sigterm_saves_a_checkpoint_at_the_current_step_and_exits_0(dataset, compile_cache, baseline, tmp_path):
    workdir = tmp_path / "run"
    process = _start(dataset, compile_cache, workdir)
    _wait_until(lambda: _logged_steps(workdir) >= 1, process, "the first logged step")
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 0
    log = Path(str(workdir) + ".log").read_text()
    assert "preempted: saved a checkpoint at step" in log
    last = _metrics(workdir)[-1]["step"]
    assert last < TOTAL_STEPS
    assert max(_checkpoints(workdir)) == last


def test_a_damaged_newest_checkpoint_is_set_aside_and_the_previous_one_used(dataset, compile_cache, baseline, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(baseline, workdir)
    damaged = workdir / "checkpoints" / "6" / "state"
    for path in damaged.iterdir():  # keep the folder, lose the arrays: what a partial copy leaves
        shutil.rmtree(path) if path.is_dir() else path.unlink()

    out = _train(dataset, compile_cache, workdir)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "moving the incomplete or corrupt checkpoint" in out.stderr
    assert "resumed from step 4" in out.stderr
    assert (workdir / "checkpoints_corrupt" / "6").is_dir()
    assert _metrics(workdir) == _metrics(baseline)


def test_checkpoints_of_another_model_stop_the_run_and_stay_in_place(dataset, compile_cache, baseline, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(baseline, workdir)
    out = _train(dataset, compile_cache, workdir, "--config.model.channels=16", "--config.model.norm_groups=8")
    assert out.returncode == 2, out.stderr[-4000:]
    assert "none of the 2 checkpoint(s)" in out.stderr and "use a new --workdir" in out.stderr
    assert _checkpoints(workdir) == [4, 6] and not (workdir / "checkpoints_corrupt").exists()


def _poisoned_copy(dataset, out):
    """The dataset with NaN text embeddings in every record: what a broken text encoder would have written."""
    out.mkdir()
    shutil.copy(dataset / "dataset_info.json", out)
    for shard in dataset.glob("*.array_record"):
        reader = ArrayRecordReader(str(shard))
        writer = ArrayRecordWriter(str(out / shard.name), "group_size:1")
        for data in reader.read_all():
            example = dict(records.decode(data))
            example["text_pooled"] = np.full_like(example["text_pooled"], np.nan)
            writer.write(records.encode(example))
        writer.close()
        reader.close()
    return out


def test_a_non_finite_loss_stops_the_run_and_names_the_last_good_checkpoint(dataset, compile_cache, baseline, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(baseline, workdir)
    shutil.rmtree(workdir / "checkpoints" / "6")  # resume from step 4, into the poisoned data
    poisoned = _poisoned_copy(dataset, tmp_path / "poisoned")
    out = _train(dataset, compile_cache, workdir, f"--config.data.path={poisoned}")
    assert out.returncode == 1, out.stderr[-4000:]
    assert "loss is nan at step 5" in out.stderr and "the last good checkpoint is step 4" in out.stderr
    assert _checkpoints(workdir) == [4]  # nothing saved after the loss went bad


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_log_the_losses_of_one_process_with_two_devices(dataset, compile_cache, baseline, tmp_path):
    short = ["--config.num_train_steps=3", "--config.checkpoint_every=3", "--config.sample_every=0"]
    port = _free_port()
    pair = [
        subprocess.Popen(
            [
                *_command(dataset, tmp_path / "two", *short),
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ],
            cwd=REPO,
            env=_env(compile_cache, devices=1),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    errors = [p.communicate(timeout=400)[1] for p in pair]
    assert [p.returncode for p in pair] == [0, 0], errors[0][-3000:] + errors[1][-3000:]
    assert "2 process(es), 2 device(s)" in errors[1]

    # The baseline is the same global batch on one process with two devices; the first 3 steps do not depend on
    # num_train_steps (the cosine decay starts after the 2 warmup steps) nor on checkpoint or sample cadence.
    two_losses = [m["loss"] for m in _metrics(tmp_path / "two")]
    assert len(two_losses) == 3
    assert two_losses == pytest.approx([m["loss"] for m in _metrics(baseline)][:3], rel=1e-4)
