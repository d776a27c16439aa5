"""Session fixtures shared by the eval and sample tests.

`tiny_run` is a real tiny training run, made once per session: the moving-shapes GIFs, the tiny CLIP, the real
preprocessing job (4 frames of 16x16), then `python -m train.main` with a tiny U-Net for 4 steps (checkpoints 2 and 4).
The eval job follows it from before the first checkpoint exists (`--follow`), as a user runs the two side by side.

Both jobs are subprocesses with XLA's CPU backend at optimisation level 0, which halves compile times here; tests that
call eval or sampling functions in-process compile at the default level.
"""

import ast
import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

# Tests compile many small U-Nets and run them on tiny inputs: XLA's CPU backend at optimisation level 0 compiles
# several times faster, and the tests check results, not speed. Set before any test module imports jax.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import pytest  # noqa: E402

from model.tiny_clip import make_tiny_clip
from pipeline.run import Settings, preprocess
from pipeline.shapes import make_shapes

REPO = Path(__file__).resolve().parents[1]
TRAIN_STEPS = 4
# The tiny run's config: configs/base.py with these overrides (also what the eval job is given).
TINY = [
    "data.frames=4",
    "data.size=16",
    "data.text_embed_dim=64",
    "data.text_token_dim=64",
    "model.channels=8",
    "model.channel_mults=(1,)",
    "model.num_res_blocks=1",
    "model.attention_resolutions=()",
    "model.head_dim=8",
    "model.norm_groups=4",
    "model.dtype=float32",
    "diffusion.num_timesteps=100",
    "optimizer.warmup_steps=1",
    "optimizer.learning_rate=0.001",
    "batch_size=4",
    "log_every=2",
    "checkpoint_every=2",
    "keep_checkpoints=5",
    "keep_every=0",
    "sample_every=0",
    f"num_train_steps={TRAIN_STEPS}",
    "sampling.num_steps=2",
    "sampling.prompts=('a red circle moving left','a blue square moving up')",
    "eval.prompts='shapes'",
    "eval.evaluators=('val_loss','video','probe','clipsim','frechet_clip')",
    "eval.val_batches=1",
    "eval.val_loss_buckets=4",
    "eval.poll_seconds=0.2",
    "eval.follow_timeout_s=300.0",
]


def imported_modules(path: Path, *, members: bool = False) -> set[str]:
    """Every absolute module name a Python file imports, lazy imports inside functions included; with `members`, also
    `module.name` for each `from module import name` (which may be a submodule)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            if members:
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@dataclasses.dataclass(frozen=True)
class TinyRun:
    data: Path  # the preprocessed dataset
    clip: Path  # the tiny CLIP that embedded it
    workdir: Path  # checkpoints/2, checkpoints/4, eval/
    overrides: list[str]  # TINY plus data.path, as "a.b=value"
    eval_returncode: int
    eval_output: str  # the eval job's stdout and stderr


def subprocess_env() -> dict[str, str]:
    # HF_HUB_OFFLINE: nothing may download; every CLIP here is a local folder.
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0", HF_HUB_OFFLINE="1")


def _config_args(overrides):
    return ["--config", str(REPO / "configs" / "base.py"), *(f"--config.{o}" for o in overrides)]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> TinyRun:
    root = tmp_path_factory.mktemp("tiny-run")
    manifest = make_shapes(root / "shapes", num=24, seed=0)
    clip = make_tiny_clip(root / "tiny-clip", seed=0)
    data = root / "data"
    preprocess(
        Settings(
            manifests=(str(manifest),),
            output=str(data),
            text_encoder=str(clip),
            frames=4,
            size=16,
            num_shards=1,
            val_fraction=0.25,
        ),
        pipeline_args=["--direct_running_mode=in_memory"],
    )
    workdir = root / "run"
    overrides = [*TINY, f"data.path={data}"]
    eval_log = root / "eval.log"
    with open(eval_log, "w") as log:
        evaluator = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys; from eval.main import main; sys.exit(main(sys.argv[1:]))",
                *_config_args(overrides),
                "--workdir",
                str(workdir),
                "--follow",
            ],
            cwd=REPO,
            env=subprocess_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        # The eval job creates WORKDIR/eval when it is set up and starts looking for checkpoints; only then does
        # training start, so every checkpoint it evaluates was written after it started.
        deadline = time.monotonic() + 300
        while not (workdir / "eval").is_dir():
            assert evaluator.poll() is None, f"the eval job ended early:\n{eval_log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, "the eval job did not start within 300 s"
            time.sleep(0.2)
        train = subprocess.run(
            [sys.executable, "-m", "train.main", *_config_args(overrides), "--workdir", str(workdir)],
            cwd=REPO,
            env=subprocess_env(),
            capture_output=True,
            text=True,
            timeout=400,
        )
        assert train.returncode == 0, train.stderr[-4000:]
        returncode = evaluator.wait(timeout=300)
    finally:
        if evaluator.poll() is None:
            evaluator.kill()
            evaluator.wait()
    return TinyRun(
        data=data,
        clip=clip,
        workdir=workdir,
        overrides=overrides,
        eval_returncode=returncode,
        eval_output=eval_log.read_text(),
    )


@pytest.fixture(scope="session")
def tiny_export(tiny_run, tmp_path_factory) -> Path:
    """The tiny run's newest checkpoint exported with `yagg export` (a self-contained model folder)."""
    from inference.export import main as export_main

    out = tmp_path_factory.mktemp("export") / "model"
    assert export_main(["--workdir", str(tiny_run.workdir), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
    """A real Cloud Storage API on localhost (tests/gcs_emulator.py), with this process's clients pointed at it;
    yields the emulator (its `environment()` is what subprocesses need). Skips, saying why, if it cannot start."""
    from gcs_emulator import Emulator

    try:
        emulator = Emulator()
    except RuntimeError as e:
        pytest.skip(f"the Cloud Storage emulator (PyPI gcp-storage-emulator) could not start: {e}")
    emulator.apply()
    os.environ["YAGG_CACHE"] = str(tmp_path_factory.mktemp("yagg-cache"))  # local copies of gs:// files
    try:
        yield emulator
    finally:
        emulator.stop()


def upload(local: Path, url: str) -> str:
    """Copies a local folder's files to `url` (gs://...) and returns `url`."""
    from contracts import storage

    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        storage.write_bytes(storage.join(url, path.relative_to(local).as_posix()), path.read_bytes())
    return url
