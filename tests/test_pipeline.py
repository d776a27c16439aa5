"""The preprocessing job end to end (pipeline/run.py, job.py, embed.py, clip_frames.py) with the tiny CLIP.

Most runs use Beam's in-process mode (`--direct_running_mode=in_memory`, the local default, decoding in a
pool of child processes); two more run through `main` as `yagg preprocess` does, on Beam's multi-thread and
multi-process modes, and one on Beam's portable runner against a worker pool in its own process, as Dataflow runs
SDK workers: all must write the same bytes.
"""

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from apache_beam import TaggedOutput
from array_record.python.array_record_module import ArrayRecordReader
from conftest import upload
from gcs_emulator import BUCKET
from PIL import Image

from contracts import records, storage
from contracts.dataset import DatasetInfo, read_dataset_info
from model.clip import TextEncoder
from model.tiny_clip import make_tiny_clip
from pipeline import gif, job, shards, timelimit
from pipeline.clip_frames import ClipError, ClipSpec, clip_frames
from pipeline.manifest import Item
from pipeline.run import Settings, main, preprocess
from pipeline.shapes import make_shapes
from pipeline.sources import FetchPolicy

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "corpus"
IN_PROCESS = ["--direct_running_mode=in_memory"]
SPEC = ClipSpec(num_frames=6, size=24, fps=None)
LONG_CAPTION = " ".join(["word"] * 100)  # beyond CLIP's 77 tokens


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """16 moving-shapes GIFs plus one line for every way a line can fail, a duplicate and a second caption."""
    root = tmp_path_factory.mktemp("shapes")
    lines = make_shapes(root, num=16, seed=0).read_text(encoding="utf-8").splitlines()
    Image.new("P", (20, 20)).save(root / "gifs" / "still.gif")
    (root / "gifs" / "text.gif").write_bytes(b"this is a text file named .gif")
    whole = (root / "gifs" / "00004.gif").read_bytes()
    (root / "gifs" / "truncated.gif").write_bytes(whole[: len(whole) // 2])
    name = {i: line.split("\t")[0] for i, line in enumerate(lines)}
    extra = [
        lines[0],  # the identical line again
        f"{name[1]}\ta second caption for the same gif",
        "gifs/missing.gif\ta missing file",
        "gifs/text.gif\tnot a gif at all",
        "gifs/truncated.gif\ta truncated gif",
        "gifs/still.gif\ta still image",
        "a line without a tab",
        f"{name[2]}\t   ",
        f"{name[3]}\t{LONG_CAPTION}",
    ]
    data = "".join(f"{line}\n" for line in lines + extra).encode() + f"{name[5]}\tcaf\xe9".encode("latin-1")
    (root / "manifest.tsv").write_bytes(data)
    return SimpleNamespace(root=root, manifest=root / "manifest.tsv", lines=lines)


@pytest.fixture(scope="module")
def shapes_run(shapes, tiny_clip, tmp_path_factory):
    output = tmp_path_factory.mktemp("run") / "data"
    info = preprocess(
        Settings(
            manifests=(str(shapes.manifest),),
            output=str(output),
            text_encoder=str(tiny_clip),
            frames=SPEC.num_frames,
            size=SPEC.size,
            val_fraction=0.3,
            num_shards=2,
        ),
        pipeline_args=IN_PROCESS,
    )
    return SimpleNamespace(output=output, info=info)


def _read_split(output: Path, info: DatasetInfo, split: str) -> list[dict]:
    examples = []
    for shard in info.splits[split].shards:
        reader = ArrayRecordReader(str(output / shard.file))
        assert "group_size:1," in reader.writer_options_string()
        decoded = [records.decode(r) for r in reader.read_all()]
        assert [e["key"] for e in decoded] == sorted(e["key"] for e in decoded)  # sorted within the shard
        assert len(decoded) == shard.examples
        examples += decoded
    return examples


def test_every_line_is_accounted_for(shapes_run):
    accounting = dataclasses.asdict(shapes_run.info.accounting)
    assert accounting == {
        "lines_read": 26,
        "examples_written": 17,  # 16 GIFs, one of them with two captions
        "duplicates_removed": 1,
        "dead_lettered": 8,
        "dead_lettered_by_reason": {
            "blank caption": 1,
            "caption too long": 1,
            "file not found": 1,
            "malformed line (no tab)": 1,
            "non-UTF-8 text": 1,
            "not a gif": 1,
            "still image": 1,
            "truncated": 1,
        },
        "dead_lettered_by_stage": {"decode": 2, "embed": 1, "fetch": 1, "frames": 1, "manifest": 3},
    }


def test_dead_letters_point_back_to_their_manifest_lines(shapes, shapes_run):
    rows = []
    for name in shapes_run.info.dead_letter_files:
        rows += [json.loads(line) for line in (shapes_run.output / name).read_text(encoding="utf-8").splitlines()]
    assert [r["line"] for r in rows] == [19, 20, 21, 22, 23, 24, 25, 26]
    manifest_lines = shapes.manifest.read_bytes().split(b"\n")
    for row in rows:
        assert set(row) == {"source", "caption", "stage", "reason", "detail", "manifest", "line"}
        assert row["manifest"] == str(shapes.manifest)
        if row["reason"] != "non-UTF-8 text":
            assert row["caption"].strip() in manifest_lines[row["line"] - 1].decode()
    assert {r["reason"]: r["source"] for r in rows}["file not found"] == str(shapes.root / "gifs" / "missing.gif")


def test_records_hold_the_clip_frames_and_the_encoder_embeddings(shapes, shapes_run, tiny_clip):
    info = shapes_run.info
    examples = _read_split(shapes_run.output, info, "train") + _read_split(shapes_run.output, info, "val")
    expected_captions = {line.split("\t")[1] for line in shapes.lines} | {"a second caption for the same gif"}
    assert sorted(e["caption"] for e in examples) == sorted(expected_captions)
    assert len({e["key"] for e in examples}) == len(examples)

    encoder = TextEncoder.from_pretrained(str(tiny_clip))
    reference = encoder.encode([e["caption"] for e in examples])
    for i, example in enumerate(examples):
        for field, spec in info.features.items():
            if spec["dtype"] != "str":
                assert example[field].dtype == np.dtype(spec["dtype"]) and list(example[field].shape) == spec["shape"]
        frames, times = clip_frames((shapes.root / example["source"]).read_bytes(), SPEC)
        np.testing.assert_array_equal(example["frames"], frames)
        np.testing.assert_array_equal(example["frame_times_ms"], times)
        np.testing.assert_allclose(example["text_pooled"], reference["pooled"][i], rtol=1e-4, atol=1e-5)
        mask = reference["mask"][i].astype(bool)
        np.testing.assert_array_equal(example["text_mask"], mask)
        # Real tokens as the encoder gives them (each caption is encoded at its own length); padding is zero.
        np.testing.assert_allclose(example["text_tokens"][mask], reference["tokens"][i][mask], rtol=2e-3, atol=2e-3)
        assert not example["text_tokens"][~mask].any()


def test_split_follows_the_stable_source_hash(shapes_run):
    info = shapes_run.info
    for split in ("train", "val"):
        examples = _read_split(shapes_run.output, info, split)
        assert examples, f"no {split} examples"
        assert all(shards.split_of(e["source"], 0.3) == split for e in examples)
    assert info.splits["train"].examples + info.splits["val"].examples == 17
    assert info.val_fraction == 0.3 and info.text_encoder.max_length == 77


@pytest.mark.parametrize(
    "runner_args",
    [["--direct_running_mode=multi_threading"], ["--direct_running_mode=multi_processing"]],
    ids=["threads", "processes"],
)
def test_other_runner_modes_with_config_write_byte_identical_files(
    shapes, shapes_run, tiny_clip, tmp_path, capsys, runner_args
):
    """Settings from a config (one flag overriding it), on the local runner's other modes: the same bytes."""
    output = tmp_path / "again"
    config = tmp_path / "config.py"
    config.write_text(
        "import ml_collections\n\n"
        "def get_config():\n"
        "    c = ml_collections.ConfigDict()\n"
        f"    c.data = ml_collections.ConfigDict(dict(path={str(output)!r}, frames={SPEC.num_frames}, size=99,\n"
        f"        fps=None, val_fraction=0.3, num_shards=2, text_encoder={str(tiny_clip)!r}, keep_stills=False))\n"
        "    return c\n"
    )
    argv = ["--config", str(config), "--manifest", str(shapes.manifest), "--size", str(SPEC.size), *runner_args]
    assert main(argv) == 0
    assert "26 manifest lines read" in capsys.readouterr().out
    first = sorted(p.name for p in shapes_run.output.iterdir())
    assert sorted(p.name for p in output.iterdir()) == first
    for name in first:
        assert (output / name).read_bytes() == (shapes_run.output / name).read_bytes(), name


@pytest.fixture
def worker_pool(tmp_path):
    """Beam's SDK worker pool (what `--environment_type=EXTERNAL` connects to) in a process of its own, on a free
    loopback port: (port, its log). It starts SDK workers as `python ...`: this venv's python comes first on PATH."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        **os.environ,
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "PYTHONPATH": str(REPO),
    }
    log = tmp_path / "worker-pool.log"
    with open(log, "w") as out:
        pool = subprocess.Popen(
            [sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main", f"--service_port={port}"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert pool.poll() is None, f"the worker pool exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"the worker pool did not listen within 120 s:\n{log.read_text()}"
            with socket.socket() as client:
                if client.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.2)
        yield port, log
    finally:
        pool.send_signal(signal.SIGINT)  # it stops its server and its workers on the way out
        try:
            pool.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pool.kill()
            pool.wait()


def test_portable_runner_on_a_worker_pool_writes_byte_identical_files(shapes, shapes_run, tiny_clip, worker_pool):
    """Dataflow's execution model: the job service hands the pipeline, pickled, to SDK worker processes that a
    separate service started, which share nothing with the launcher (their own setup, text encoder and decoding
    children) and exchange data with the runner over the Fn API. Local paths are allowed: the workers are here."""
    port, log = worker_pool
    output = shapes_run.output.parent / "portable"
    argv = ["--manifest", str(shapes.manifest), "--output", str(output), "--text-encoder", str(tiny_clip)]
    argv += ["--frames", str(SPEC.num_frames), "--size", str(SPEC.size), "--val-fraction", "0.3", "--num-shards", "2"]
    argv += ["--runner=PortableRunner", "--job_endpoint=embed", "--environment_type=EXTERNAL"]
    assert main([*argv, f"--environment_config=localhost:{port}"]) == 0
    assert "Starting worker" in log.read_text()  # the pool started the SDK worker that ran the job
    info = read_dataset_info(str(output))
    assert info.accounting == shapes_run.info.accounting
    first = sorted(p.name for p in shapes_run.output.iterdir())
    assert sorted(p.name for p in output.iterdir()) == first
    for name in first:
        assert (output / name).read_bytes() == (shapes_run.output / name).read_bytes(), name


@pytest.mark.parametrize(
    "runner_args",
    [
        ["--runner=DataflowRunner", "--project=p", "--region=r", "--temp_location=gs://b/tmp"],
        ["--runner=PortableRunner", "--job_endpoint=embed", "--environment_type=DOCKER"],
        [
            "--runner=PortableRunner",
            "--job_endpoint=embed",
            "--environment_type=EXTERNAL",
            "--environment_config=pool.example.com:50000",
        ],
        [
            "--runner=PortableRunner",
            "--job_endpoint=jobs.example.com:8099",
            "--environment_type=EXTERNAL",
            "--environment_config=localhost:50000",
        ],
    ],
    ids=["dataflow", "portable-docker", "portable-remote-pool", "portable-remote-job-service"],
)
def test_workers_elsewhere_are_refused_local_paths(shapes, tiny_clip, tmp_path, capsys, runner_args):
    argv = ["--manifest", str(shapes.manifest), "--output", str(tmp_path / "out"), "--text-encoder", str(tiny_clip)]
    assert main(argv + runner_args) == 2
    assert "workers cannot read local paths" in capsys.readouterr().err


def test_manifests_gifs_output_and_text_encoder_in_cloud_storage(shapes, shapes_run, tiny_clip, gcs):
    """Everything on gs:// (a local Cloud Storage emulator): the same shards as from local paths."""
    bucket = f"gs://{BUCKET}/pipeline"
    upload(shapes.root, f"{bucket}/shapes")
    clip = upload(Path(tiny_clip), f"{bucket}/clip")
    remote = f"{bucket}/data"
    info = preprocess(
        Settings(
            manifests=(f"{bucket}/shapes/{shapes.manifest.name}",),
            output=remote,
            text_encoder=clip,
            frames=SPEC.num_frames,
            size=SPEC.size,
            val_fraction=0.3,
            num_shards=2,
        ),
        pipeline_args=IN_PROCESS,
    )
    assert info.accounting == shapes_run.info.accounting
    assert info.splits == shapes_run.info.splits
    for split in ("train", "val"):
        for shard in info.splits[split].shards:
            assert storage.read_bytes(f"{remote}/{shard.file}") == (shapes_run.output / shard.file).read_bytes()
    assert not [name for name in storage.list_names(remote) if name.startswith(".staging-")]  # every object moved
    with pytest.raises(ValueError, match="not empty"):  # the folder "exists" only as a prefix, and is still refused
        preprocess(
            Settings(manifests=(f"{bucket}/shapes/{shapes.manifest.name}",), output=remote, text_encoder=clip),
            pipeline_args=IN_PROCESS,
        )


@pytest.mark.parametrize("output", ["s3://bucket/data", "gs:/bucket/data", "gcs://bucket/data"])
def test_a_scheme_yagg_does_not_speak_is_refused_before_anything_runs(shapes, tiny_clip, output, tmp_path, capsys):
    argv = ["--manifest", str(shapes.manifest), "--output", output, "--text-encoder", str(tiny_clip)]
    assert main(argv) == 2
    assert "yagg preprocess: error" in capsys.readouterr().err
    assert not list(Path.cwd().glob("gs:*")) and not list(Path.cwd().glob("s3:*"))


def test_a_second_run_into_the_same_folder_needs_overwrite(shapes, shapes_run, tiny_clip, capsys):
    argv = ["--manifest", str(shapes.manifest), "--output", str(shapes_run.output), "--text-encoder", str(tiny_clip)]
    assert main(argv) == 2
    assert "not empty" in capsys.readouterr().err
    assert (shapes_run.output / shards.INFO_FILE).is_file()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--frame", "8"], "unrecognised argument(s) --frame"),
        (["stray"], "unrecognised argument(s) stray"),
        (["--frames", "0"], "--frames must be at least 1"),
        (["--val-fraction", "1"], r"--val-fraction must be in \[0, 1\)"),
        (["--fps", "-2"], "--fps must be positive"),
        (["--max-decode-mb", "0"], "--max-decode-mb must be positive"),
    ],
)
def test_bad_arguments_are_refused_before_any_work(shapes, tiny_clip, tmp_path, capsys, argv, message):
    base = ["--manifest", str(shapes.manifest), "--output", str(tmp_path / "out"), "--text-encoder", str(tiny_clip)]
    assert main(base + argv) == 2
    assert message.replace("\\", "") in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_missing_inputs_are_named(tmp_path, tiny_clip, capsys):
    assert main(["--manifest", str(tmp_path / "*.tsv"), "--output", str(tmp_path / "o"), "--text-encoder", "x"]) == 2
    assert "matches no file" in capsys.readouterr().err
    (tmp_path / "m.tsv").write_text("a.gif\ta cat\n")
    assert main(["--manifest", str(tmp_path / "m.tsv"), "--output", str(tmp_path / "o")]) == 2
    assert "--text-encoder is required" in capsys.readouterr().err


def test_help_lists_the_flags_and_mentions_beam_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    flags = "--manifest --output --text-encoder --frames --size --fps --val-fraction --num-shards --target-shard-mb"
    for flag in [*flags.split(), "--keep-stills", "--overwrite", "--config", "--max-decode-mb", "DataflowRunner"]:
        assert flag in out


@pytest.mark.skipif(not (CORPUS / "pillow-gifs").is_dir(), reason=f"the shared corpus is not at {CORPUS}")
def test_pillow_edge_cases_each_become_an_example_or_a_dead_letter(tmp_path, tiny_clip):
    files = sorted((CORPUS / "pillow-gifs").glob("*.gif"))
    manifest = tmp_path / "pillow.tsv"
    manifest.write_text("".join(f"{f}\tan edge case named {f.stem}\n" for f in files))
    out = tmp_path / "out"
    info = preprocess(
        Settings(
            manifests=(str(manifest),),
            output=str(out),
            text_encoder=str(tiny_clip),
            frames=4,
            size=16,
            keep_stills=True,
        ),
        pipeline_args=IN_PROCESS,
    )
    examples = _read_split(out, info, "train") + _read_split(out, info, "val")
    dead = [json.loads(line) for line in (out / info.dead_letter_files[0]).read_text().splitlines()]
    assert len(files) == 39 and len(examples) + len(dead) == 39
    assert {e["source"] for e in examples} | {d["source"] for d in dead} == {str(f) for f in files}
    reasons = {Path(d["source"]).name: d["reason"] for d in dead}
    assert reasons["decompression_bomb.gif"] == reasons["decompression_bomb_extents.gif"] == "decompression bomb"
    assert "zero_width.gif" in reasons and "still image" not in reasons.values()
    # With --keep-stills a single-frame GIF becomes a clip of one repeated frame.
    hopper = next(e for e in examples if e["source"].endswith("/hopper.gif"))
    assert (hopper["frames"] == hopper["frames"][:1]).all() and not hopper["frame_times_ms"].any()


@pytest.mark.skipif(not (CORPUS / "tgif").is_dir(), reason=f"the shared corpus is not at {CORPUS}")
def test_tgif_manifest_of_unreachable_urls_is_fully_dead_lettered(tmp_path, tiny_clip, monkeypatch):
    real_getaddrinfo = socket.getaddrinfo

    def loopback_only(host, *args, **kwargs):
        if host not in ("localhost", "127.0.0.1", "::1"):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real_getaddrinfo(host, *args, **kwargs)

    # What this offline machine's resolver answers, made certain: no query leaves the test, wherever it runs.
    monkeypatch.setattr(socket, "getaddrinfo", loopback_only)
    manifest = CORPUS / "tgif" / "tgif-cvpr16-results.tsv"
    info = preprocess(
        Settings(manifests=(str(manifest),), output=str(tmp_path / "out"), text_encoder=str(tiny_clip)),
        pipeline_args=IN_PROCESS,
    )
    accounting = dataclasses.asdict(info.accounting)
    assert (accounting["lines_read"], accounting["examples_written"], accounting["duplicates_removed"]) == (11360, 0, 0)
    assert accounting["dead_lettered_by_reason"] == {"host not found": 11360}
    lines = []
    for name in info.dead_letter_files:
        lines += [json.loads(row)["line"] for row in (tmp_path / "out" / name).read_text().splitlines()]
    assert sorted(lines) == list(range(1, 11361))


class _CountingDecoder(timelimit.TimeLimitedFunction):
    calls = 0

    def map(self, calls):
        _CountingDecoder.calls += len(calls)
        return super().map(calls)


def _run_dofn(dofn, batches):
    """FetchAndDecode's outputs for `batches` (each a list of groups), in order, as one bundle: the examples one by
    one (each batch's list opened) and the dead letters, finish_bundle's without their windows."""
    dofn.setup()
    try:
        outputs = [output for batch in batches for output in dofn.process(batch)]
        for output in dofn.finish_bundle():
            if isinstance(output, TaggedOutput):
                outputs.append(TaggedOutput(output.tag, output.value.value))
            else:
                outputs.append(output.value)
        return [one for output in outputs for one in (output if isinstance(output, list) else [output])]
    finally:
        dofn.teardown()


def test_a_gif_with_several_captions_is_decoded_once(shapes, monkeypatch):
    monkeypatch.setattr(timelimit, "TimeLimitedFunction", _CountingDecoder)
    source = str(shapes.root / "gifs" / "00001.gif")
    items = [Item(source, "gifs/00001.gif", caption, str(shapes.manifest), n) for n, caption in enumerate("abc")]
    out = _run_dofn(job.FetchAndDecode(SPEC, FetchPolicy(), timeout_s=60, threads=2), [[(source, items)]])
    assert _CountingDecoder.calls == 1
    assert [p.item.caption for p in out] == ["a", "b", "c"]
    assert all(p.frames is out[0].frames for p in out)


def test_a_gif_that_takes_too_long_is_dead_lettered_as_timeout(tmp_path):
    # 40 frames of noise take tens of milliseconds to decode, far beyond the 2 ms allowed here.
    rng = np.random.default_rng(0)
    noise = [Image.fromarray(rng.integers(0, 256, (200, 200), dtype=np.uint8), "L") for _ in range(40)]
    path = tmp_path / "noise.gif"
    noise[0].save(path, save_all=True, append_images=noise[1:], duration=40)
    item = Item(str(path), "noise.gif", "static", "m.tsv", 1)
    dofn = job.FetchAndDecode(SPEC, FetchPolicy(), timeout_s=0.002, threads=1)
    (out,) = _run_dofn(dofn, [[(str(path), [item])]])
    assert out.tag == "dead" and (out.value.stage, out.value.reason) == ("decode", "timeout")


def test_clip_frames_rejects_what_is_not_a_clip(shapes):
    data = (shapes.root / "gifs" / "00000.gif").read_bytes()
    frames, times = clip_frames(data, SPEC)
    assert frames.shape == (6, 24, 24, 3) and frames.dtype == np.uint8 and times.dtype == np.float32
    with pytest.raises(ClipError) as e:
        clip_frames(data, ClipSpec(num_frames=6, size=24, fps=0.5))  # 12 s of window, a clip of about 1 s
    assert (e.value.stage, e.value.reason) == ("frames", "shorter than F/fps")
    with pytest.raises(ClipError) as e:
        clip_frames(b"\x89PNG\r\n\x1a\n" + data, SPEC)
    assert (e.value.stage, e.value.reason) == ("decode", "not a gif")
    with pytest.raises(ClipError) as e:
        clip_frames(data, ClipSpec(num_frames=6, size=24, fps=None, limits=gif.DecodeLimits(max_frames=2)))
    assert (e.value.stage, e.value.reason) == ("decode", "too many frames")


def test_a_batch_of_gifs_comes_back_in_order_with_its_failures_as_dead_letters(shapes, tmp_path):
    # More GIFs than one exchange with a decoding child holds, with failures of each stage among them.
    good = sorted((shapes.root / "gifs").glob("000*.gif"))[: 2 * job.DECODE_CHUNK - 4]
    sources = [str(p) for p in good]
    sources.insert(3, str(tmp_path / "missing.gif"))  # fetch
    sources.insert(job.DECODE_CHUNK + 1, str(shapes.root / "gifs" / "text.gif"))  # decode
    groups = [
        (source, [Item(source, Path(source).name, f"caption {n}", "m.tsv", n)]) for n, source in enumerate(sources)
    ]
    out = _run_dofn(job.FetchAndDecode(SPEC, FetchPolicy(), timeout_s=60, threads=4), [groups[:10], groups[10:]])
    dead = [o.value for o in out if isinstance(o, TaggedOutput)]
    examples = [o for o in out if not isinstance(o, TaggedOutput)]
    assert [(d.line, d.stage, d.reason) for d in dead] == [(3, "fetch", "file not found"), (17, "decode", "not a gif")]
    assert [e.item.line for e in examples] == [n for n in range(len(sources)) if n not in (3, 17)]
    assert all(e.frames.shape == (6, 24, 24, 3) for e in examples)


def test_a_gif_over_the_memory_budget_is_dead_lettered_as_too_large(shapes):
    source = str(shapes.root / "gifs" / "00000.gif")
    item = Item(source, "gifs/00000.gif", "a shape", "m.tsv", 1)
    spec = dataclasses.replace(SPEC, limits=gif.DecodeLimits(max_decoded_bytes=1000))
    (out,) = _run_dofn(job.FetchAndDecode(spec, FetchPolicy(), timeout_s=60, threads=1), [[(source, [item])]])
    assert out.tag == "dead" and (out.value.stage, out.value.reason) == ("decode", "too large")
