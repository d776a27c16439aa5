"""`make demo` end to end, shortened: the Makefile's own commands (tiny CLIP, shapes, preprocessing, training,
`yagg sample`, `yagg eval`) on 48 clips and 4 training steps of the demo config, in a temporary workdir.

What is shortened comes in through the Makefile's DEMO, DEMO_CLIPS and DEMO_OVERRIDES variables; the commands
themselves are the ones `make demo` runs. `-o .venv/.installed` tells make not to (re)create the virtual
environment: the test runs the `yagg` of the Python that runs the tests.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
STEPS = 4
SHORTENED = [
    f"--config.num_train_steps={STEPS}",
    "--config.batch_size=4",
    "--config.log_every=2",
    "--config.checkpoint_every=2",
    "--config.sample_every=4",
    "--config.keep_checkpoints=2",
    "--config.optimizer.warmup_steps=1",
    "--config.sampling.num_steps=2",
    "--config.eval.samples_per_prompt=1",
    "--config.eval.val_batches=1",
]


@pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")
def test_make_demo_shortened(tmp_path):
    demo = tmp_path / "demo"
    yagg = Path(sys.executable).parent / "yagg"
    assert yagg.exists(), f"the yagg command is not installed beside {sys.executable} (pip install -e .)"
    result = subprocess.run(
        [
            "make",
            "--no-print-directory",
            "-o",
            ".venv/.installed",
            "demo",
            f"YAGG={yagg}",
            f"DEMO={demo}",
            "DEMO_CLIPS=48",
            f"DEMO_OVERRIDES={' '.join(SHORTENED)}",
        ],
        cwd=REPO,
        # Offline (every CLIP here is a local folder), and XLA at optimisation level 0: it compiles several times
        # faster, and this test checks that the chain runs, not how fast.
        env=dict(os.environ, HF_HUB_OFFLINE="1", XLA_FLAGS="--xla_backend_optimization_level=0"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    info = json.loads((demo / "data" / "dataset_info.json").read_text())
    assert info["accounting"]["lines_read"] == 48
    assert (demo / "checkpoints" / str(STEPS)).is_dir()
    assert (demo / "samples" / str(STEPS)).is_dir(), "in-training samples at sample_every"

    samples = sorted((demo / "gifs").glob("sample-*.gif"))
    assert len(samples) == 3, samples
    with Image.open(samples[0]) as gif:
        assert gif.n_frames == 6 and gif.size == (16 * 8, 16 * 8)  # the demo's 6 frames of 16 x 16, scaled 8x

    rows = [json.loads(line) for line in (demo / "eval" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [2, 4]
    probe = {f"probe/{split}{word}_acc" for split in ("", "heldout_") for word in ("color", "shape", "direction")}
    assert probe | {"val/loss"} <= set(rows[-1])
    assert (demo / "eval" / "index.html").is_file()

    lines = result.stdout.strip().splitlines()
    assert any(f"gallery: {demo}/eval/index.html" in line for line in lines)
    assert lines[-1].startswith(f"step {STEPS}: probe/color_acc "), lines[-1]
