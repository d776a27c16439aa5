"""Every path on gs://, against a real Cloud Storage API served locally (tests/gcs_emulator.py): preprocess -> train
(killed with -9 and resumed: the same losses as the same run on local disk) -> eval -> export -> sample -> serve, each
step a `yagg` subprocess as a user runs it. Also: the gs:// workdir that once became a local folder named `gs:`, and
schemes yagg refuses."""

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
from conftest import REPO, TINY, upload
from gcs_emulator import BUCKET

from contracts import storage
from model.tiny_clip import make_tiny_clip
from pipeline.shapes import make_shapes

ROOT = f"gs://{BUCKET}/chain"
STEPS = 4
# The tiny run's config (tests/conftest.py), every checkpoint kept, samples during training, the cheap evaluators.
CONFIG = [*TINY, "sample_every=2", "keep_checkpoints=3", "log_every=1", "eval.evaluators=('val_loss','video')"]


def _yagg(gcs, *args, cwd, timeout=600, **popen):
    env = dict(os.environ, **gcs.environment(), JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0")
    env["HF_HUB_OFFLINE"] = "1"
    command = [sys.executable, "-c", "import sys; from yagg.cli import main; sys.exit(main(sys.argv[1:]))", *args]
    if popen:
        return subprocess.Popen(command, cwd=cwd, env=env, **popen)
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _config_flags(data):
    return [
        "--config",
        str(REPO / "configs" / "base.py"),
        *(f"--config.{o}" for o in CONFIG),
        f"--config.data.path={data}",
    ]


def _losses(text):
    return [{k: v for k, v in json.loads(line).items() if k.startswith("loss")} for line in text.splitlines()]


@pytest.fixture(scope="module")
def chain(gcs, tmp_path_factory):
    """The data and a tiny CLIP in the bucket, preprocessed there by the job; a local run to compare with."""
    local = tmp_path_factory.mktemp("gcs-chain")
    make_shapes(local / "shapes", num=16, seed=0)
    upload(local / "shapes", f"{ROOT}/shapes")
    upload(make_tiny_clip(local / "clip"), f"{ROOT}/clip")
    result = _yagg(
        gcs,
        "preprocess",
        *("--manifest", f"{ROOT}/shapes/manifest.tsv", "--output", f"{ROOT}/data", "--text-encoder", f"{ROOT}/clip"),
        *("--frames", "4", "--size", "16", "--num-shards", "1", "--val-fraction", "0.25"),
        cwd=local,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "examples written" in result.stdout
    return local


def test_the_whole_chain_runs_on_gs(chain, gcs):
    workdir, data = f"{ROOT}/run", f"{ROOT}/data"
    # Training on local disk from the same bucket data: the losses the gs:// run must log.
    reference = _yagg(gcs, "train", *_config_flags(data), "--workdir", str(chain / "local-run"), cwd=chain)
    assert reference.returncode == 0, reference.stderr[-3000:]

    # Training on gs://, killed with -9 once checkpoint 2 is committed and step 3 is logged, then resumed.
    with open(chain / "train.log", "w") as log:
        process = _yagg(gcs, "train", *_config_flags(data), "--workdir", workdir, cwd=chain, stdout=log, stderr=log)
    metrics = f"{workdir}/metrics.jsonl"
    deadline = time.monotonic() + 400
    while not (
        storage.exists(f"{workdir}/checkpoints/2/commit_success.txt")
        and storage.is_file(metrics)
        and len(storage.read_text(metrics).splitlines()) >= 3
    ):
        assert process.poll() is None, (chain / "train.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "checkpoint 2 was not committed in time"
        time.sleep(0.1)
    process.kill()
    assert process.wait() == -signal.SIGKILL
    resumed = _yagg(gcs, "train", *_config_flags(data), "--workdir", workdir, cwd=chain)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step" in resumed.stderr
    assert _losses(storage.read_text(metrics)) == _losses((chain / "local-run" / "metrics.jsonl").read_text())
    names = storage.list_names(workdir)
    assert {"checkpoints", "metrics.jsonl", "samples"} <= names and any(n.startswith("events.out") for n in names)
    assert storage.list_names(f"{workdir}/checkpoints") == {"2", "4"}
    assert storage.is_file(f"{workdir}/samples/4/samples.json")
    assert not [p for p in chain.iterdir() if p.name.startswith("gs:")]  # nothing local is named after the URL

    # Eval, export and sampling, all on gs://.
    evaluated = _yagg(gcs, "eval", *_config_flags(data), "--workdir", workdir, cwd=chain)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert storage.is_file(f"{workdir}/eval/index.html") and storage.is_file(f"{workdir}/eval/4/samples.json")
    assert [
        row["step"] for row in map(json.loads, storage.read_text(f"{workdir}/eval/metrics.jsonl").splitlines())
    ] == [
        2,
        4,
    ]
    model = f"{ROOT}/model"
    exported = _yagg(gcs, "export", "--workdir", workdir, "--out", model, cwd=chain)
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert {"yagg_model.json", "params.safetensors", "README.md", "text_encoder"} == storage.list_names(model)
    prompt = "a red circle moving left"
    sample_args = [prompt, "--seed", "3"]
    for source, out in (("--model", model), ("--checkpoint", f"{workdir}/checkpoints/4")):
        sampled = _yagg(gcs, "sample", source, out, *sample_args, "--out", f"{ROOT}/gifs/{source[2:]}.gif", cwd=chain)
        assert sampled.returncode == 0, sampled.stderr[-3000:]
    assert storage.read_bytes(f"{ROOT}/gifs/model.gif") == storage.read_bytes(f"{ROOT}/gifs/checkpoint.gif")
    # The training sample of step 4 is the one `yagg sample` draws from checkpoint 4 with the run's seed.
    first = json.loads(storage.read_text(f"{workdir}/samples/4/samples.json"))[0]
    again = _yagg(gcs, "sample", "--workdir", workdir, first["prompt"], "--seed", str(first["seed"]), "--out",
                  str(chain / "again.gif"), cwd=chain)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert (chain / "again.gif").read_bytes() == storage.read_bytes(f"{workdir}/samples/4/{first['file']}")

    # The server, from the export in the bucket: the same bytes as `yagg sample`.
    server = _yagg(gcs, "serve", "--model", model, "--port", "0", "--compile-cache", str(chain / "jax-cache"),
                   cwd=chain, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    try:
        url = next(line for line in server.stdout if "listening on" in line).split("listening on ")[1].strip()
        deadline = time.monotonic() + 300
        while httpx.get(f"{url}/readyz", timeout=30).status_code != 200:
            assert server.poll() is None and time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.2)
        answer = httpx.post(f"{url}/v1/generate", json={"prompt": prompt, "seed": 3}, timeout=120)
        assert answer.status_code == 200
        assert answer.content == storage.read_bytes(f"{ROOT}/gifs/model.gif")
    finally:
        server.kill()
        server.wait()


@pytest.mark.parametrize("workdir", ["s3://bucket/run", "gs:/bucket/run", "gcs://bucket/run"])
def test_an_unsupported_or_mistyped_workdir_is_refused_at_start(workdir, gcs, tmp_path):
    result = _yagg(gcs, "train", *_config_flags(f"{ROOT}/data"), "--workdir", workdir, cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert "--workdir" in result.stderr and ("not supported" in result.stderr or "not a valid" in result.stderr)
    assert list(tmp_path.iterdir()) == []  # no local folder named after the URL
