"""The diffusion maths (model/diffusion.py) and samplers (model/sampling.py), checked against closed forms and an
exact denoiser: for data x0 ~ N(mu, s^2) the optimal prediction of x0 (and so of eps and v) from x_t is analytic."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.diffusion import (
    diffusion_loss,
    make_schedule,
    min_snr_weight,
    null_condition,
    predict_x0_and_eps,
    q_sample,
    snr,
    training_target,
)
from model.sampling import guided_predict_fn, sample, sampling_timesteps

MU, STD = 0.3, 0.5


def exact_denoiser(schedule, mu=MU, std=STD):
    """The Bayes-optimal model output for data N(mu, std^2), written out for each prediction type."""

    def predict(x_t, t):
        alpha_bar = schedule.alphas_cumprod[t].reshape((-1,) + (1,) * (x_t.ndim - 1))
        a, s = jnp.sqrt(alpha_bar), jnp.sqrt(1 - alpha_bar)
        var = a**2 * std**2 + s**2  # Var(x_t)
        x0 = mu + a * std**2 / var * (x_t - a * mu)  # E[x0 | x_t]
        eps = s / var * (x_t - a * mu)  # E[eps | x_t]
        return {"eps": eps, "x0": x0, "v": a * eps - s * x0}[schedule.prediction_type]

    return predict


def closed_form_alphas_cumprod(name, num_timesteps=1000):
    """alpha-bar_t for t = 0 .. T-1 in float64, from the papers' formulas."""
    if name == "linear":
        return np.cumprod(1 - np.linspace(1e-4, 0.02, num_timesteps) * 1000 / num_timesteps)

    def f(t):
        return math.cos((t / num_timesteps + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = np.minimum([1 - f(t + 1) / f(t) for t in range(num_timesteps)], 0.999)
    return np.cumprod(1 - betas)


def test_linear_schedule_matches_closed_form():
    schedule = make_schedule("linear", 1000)
    np.testing.assert_allclose(schedule.betas, np.linspace(1e-4, 0.02, 1000), rtol=1e-6)
    np.testing.assert_allclose(schedule.alphas_cumprod, closed_form_alphas_cumprod("linear"), rtol=1e-5)
    # Fewer steps cover the same noise range: both ends scale by 1000 / T.
    short = make_schedule("linear", 250)
    assert short.num_timesteps == 250
    np.testing.assert_allclose(np.asarray(short.betas)[[0, -1]], [4e-4, 0.08], rtol=1e-6)
    np.testing.assert_allclose(short.alphas_cumprod, closed_form_alphas_cumprod("linear", 250), rtol=1e-5)


def test_cosine_schedule_matches_closed_form():
    schedule = make_schedule("cosine", 1000)

    def f(t):
        return math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2

    # Before the 0.999 cap on betas bites, alpha-bar_t is f(t + 1) / f(0) (Nichol & Dhariwal 2021, Eq. 17).
    unclipped = np.array([f(t + 1) / f(0) for t in range(1000)])
    assert np.flatnonzero(np.asarray(schedule.betas) >= 0.999 - 1e-6).tolist() == [999]
    np.testing.assert_allclose(schedule.alphas_cumprod[:999], unclipped[:999], rtol=2e-5, atol=1e-9)
    assert np.all(np.diff(schedule.alphas_cumprod) < 0)
    assert schedule.alphas_cumprod[-1] < 1e-6


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_noise_levels_are_accurate_at_small_t(name):
    # s_t = sqrt(1 - alpha-bar_t) ~ 0.01 at t = 0: it must not be derived from a float32 alpha-bar_t ~ 0.9999.
    schedule = make_schedule(name, 1000)
    alpha_bar = closed_form_alphas_cumprod(name)
    np.testing.assert_allclose(schedule.sqrt_one_minus_alphas_cumprod, np.sqrt(1 - alpha_bar), rtol=1e-5)
    np.testing.assert_allclose(schedule.sqrt_alphas_cumprod, np.sqrt(alpha_bar), rtol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(name="sigmoid"), "unknown noise schedule"),
        (dict(name="linear", prediction_type="epsilon"), "unknown prediction type"),
        (dict(name="linear", num_timesteps=1), "num_timesteps"),
    ],
)
def test_make_schedule_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_schedule(**kwargs)


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("prediction_type", ["eps", "v", "x0"])
def test_conversions_round_trip(name, prediction_type):
    schedule = make_schedule(name, 1000, prediction_type)
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    x0 = jax.random.uniform(k1, (6, 2, 3, 3, 3), minval=-1, maxval=1)
    eps = jax.random.normal(k2, x0.shape)
    t = jnp.array([0, 1, 250, 500, 900, 998])  # avoid t = 999, where a_t ~ 1e-3 and x0 from eps is ill-conditioned
    x_t = q_sample(schedule, x0, eps, t)
    output = training_target(schedule, x0, eps, t)
    x0_back, eps_back = predict_x0_and_eps(schedule, output, x_t, t)
    np.testing.assert_allclose(x0_back, x0, atol=2e-3)
    np.testing.assert_allclose(eps_back, eps, atol=2e-3)
    alpha_bar = closed_form_alphas_cumprod(name)[np.asarray(t)].reshape(-1, 1, 1, 1, 1)
    a, s = np.sqrt(alpha_bar), np.sqrt(1 - alpha_bar)
    np.testing.assert_allclose(x_t, a * x0 + s * eps, atol=1e-5)
    expected = {"eps": eps, "x0": x0, "v": a * eps - s * x0}[prediction_type]
    np.testing.assert_allclose(output, expected, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["eps", "v", "x0"])
def test_min_snr_weighting_is_min_snr_gamma_times_x0_error_for_every_target(prediction_type):
    # An output whose implied x0 is off by delta must cost min(SNR, gamma) * delta^2, whatever is predicted.
    schedule = make_schedule("cosine", 1000, prediction_type)
    gamma = 5.0
    t = jnp.array([0, 100, 400, 700, 950])  # SNR ~ 1e-13 at t = 999 is below float32's resolution of these sums
    x0 = jnp.full((5, 4), 0.2)
    eps = jnp.linspace(-1, 1, 20).reshape(5, 4)
    delta = 0.01
    x_t = q_sample(schedule, x0, eps, t)
    exact = training_target(schedule, x0, eps, t)
    x0_wrong = x0 + delta
    eps_wrong = (x_t - jnp.sqrt(schedule.alphas_cumprod[t])[:, None] * x0_wrong) / jnp.sqrt(
        1 - schedule.alphas_cumprod[t]
    )[:, None]
    wrong = training_target(schedule, x0_wrong, eps_wrong, t)
    weighted = min_snr_weight(schedule, t, gamma) * jnp.mean((wrong - exact) ** 2, axis=1)
    np.testing.assert_allclose(weighted, jnp.minimum(snr(schedule, t), gamma) * delta**2, rtol=2e-3)


def _condition(batch, tokens=5):
    return {
        "text_pooled": jnp.ones((batch, 4)),
        "text_tokens": jnp.ones((batch, tokens, 3)),
        "text_mask": jnp.ones((batch, tokens), jnp.bool_),
    }


def test_null_condition_is_zeros_and_an_empty_mask():
    null = null_condition(_condition(2))
    assert null["text_pooled"].shape == (2, 4) and not null["text_pooled"].any()
    assert null["text_tokens"].shape == (2, 5, 3) and not null["text_tokens"].any()
    assert null["text_mask"].dtype == jnp.bool_ and not null["text_mask"].any()


@pytest.mark.parametrize("prediction_type", ["eps", "v", "x0"])
def test_loss_is_zero_for_the_exact_model_and_positive_otherwise(prediction_type):
    # Constant data: the exact prediction follows from x_t and t alone, so the loss is 0 only if the model is shown
    # the same t and x_t that the target was made from.
    schedule = make_schedule("linear", 1000, prediction_type)
    x0 = jnp.full((16, 2, 4, 4, 3), 0.5)
    seen = []

    def apply_fn(variables, x_t, t, *, text_pooled, text_tokens, text_mask, train, rngs):
        assert train and variables == {"params": "p"} and rngs == {"dropout": "d"}
        seen.append(text_mask)
        return exact_denoiser(schedule, mu=0.5, std=0.0)(x_t, t)

    loss, aux = diffusion_loss(
        apply_fn, "p", schedule, x0, _condition(16), jax.random.PRNGKey(0), cond_drop_prob=0.0, rngs={"dropout": "d"}
    )
    assert aux["per_example_loss"].shape == (16,) and aux["t"].shape == (16,)
    assert int(aux["t"].min()) >= 0 and int(aux["t"].max()) < 1000 and len(np.unique(aux["t"])) > 8
    assert float(loss) < 1e-6
    assert bool(seen[0].all()), "cond_drop_prob=0 keeps every condition"

    def zero_fn(variables, x_t, t, **kwargs):
        return jnp.zeros_like(x_t)

    loss, aux = diffusion_loss(zero_fn, "p", schedule, x0, _condition(16), jax.random.PRNGKey(0), cond_drop_prob=0.0)
    assert float(loss) > 0.01
    np.testing.assert_allclose(loss, aux["per_example_loss"].mean(), rtol=1e-6)


def test_loss_drops_the_condition_to_the_null_condition():
    schedule = make_schedule("cosine", 1000, "eps")
    seen = {}

    def apply_fn(variables, x_t, t, **kwargs):
        seen.update(kwargs)
        return jnp.zeros_like(x_t)

    x0 = jnp.zeros((4000, 1))
    diffusion_loss(apply_fn, None, schedule, x0, _condition(4000), jax.random.PRNGKey(1), cond_drop_prob=0.25)
    dropped = ~seen["text_mask"].any(axis=1)
    assert 0.22 < float(dropped.mean()) < 0.28
    # A dropped example is exactly the null condition; a kept one is untouched.
    assert not seen["text_pooled"][dropped].any() and not seen["text_tokens"][dropped].any()
    assert bool((seen["text_pooled"][~dropped] == 1).all()) and bool(seen["text_mask"][~dropped].all())


def test_loss_applies_min_snr_weights():
    schedule = make_schedule("cosine", 1000, "v")

    def zero_fn(variables, x_t, t, **kwargs):
        return jnp.zeros_like(x_t)

    x0 = jnp.full((8, 2, 2, 2, 3), 0.5)
    args = (zero_fn, None, schedule, x0, _condition(8), jax.random.PRNGKey(3))
    _, plain = diffusion_loss(*args, cond_drop_prob=0.1)
    _, weighted = diffusion_loss(*args, cond_drop_prob=0.1, min_snr_gamma=5.0)
    np.testing.assert_array_equal(plain["t"], weighted["t"])
    np.testing.assert_allclose(
        weighted["per_example_loss"],
        plain["per_example_loss"] * min_snr_weight(schedule, plain["t"], 5.0),
        rtol=1e-6,
    )


def test_trailing_timesteps():
    np.testing.assert_array_equal(sampling_timesteps(1000, 4), [999, 749, 499, 249])
    np.testing.assert_array_equal(sampling_timesteps(10, 10), np.arange(9, -1, -1))
    assert sampling_timesteps(1000, 1).tolist() == [999]
    for bad in (0, 1001):
        with pytest.raises(ValueError, match="num_steps"):
            sampling_timesteps(1000, bad)


def _moments(x):
    return float(jnp.mean(x)), float(jnp.std(x))


SHAPE = (4096, 4)  # 16k independent scalars: the standard error of the mean is 0.004


@pytest.mark.parametrize("prediction_type", ["eps", "v", "x0"])
# Both samplers are exact only in the limit of small steps: each DDIM step shrinks the spread of Gaussian data by the
# cosine of the angle (a_t std, s_t) turns through, and a strided DDPM step ignores the uncertainty of x0 given x_t.
# With 100 steps either gives a std 4% low; full-length DDPM and 500-step DDIM are within 1%.
@pytest.mark.parametrize(("method", "num_steps"), [("ddpm", 1000), ("ddim", 500)])
def test_sampling_with_the_exact_denoiser_reproduces_the_data_distribution(prediction_type, method, num_steps):
    schedule = make_schedule("cosine", 1000, prediction_type)
    x = jax.jit(
        lambda rng: sample(exact_denoiser(schedule), SHAPE, rng, schedule=schedule, method=method, num_steps=num_steps)
    )(jax.random.PRNGKey(0))
    mean, std = _moments(x)
    assert abs(mean - MU) < 0.02 and abs(std - STD) < 0.02, (mean, std)


def test_sampling_with_the_linear_schedule():
    schedule = make_schedule("linear", 1000, "eps")
    x = sample(exact_denoiser(schedule), SHAPE, jax.random.PRNGKey(1), schedule=schedule, num_steps=500)
    mean, std = _moments(x)
    assert abs(mean - MU) < 0.02 and abs(std - STD) < 0.02, (mean, std)


def test_ddim_with_eta_one_is_ddpm_step_for_step():
    schedule = make_schedule("cosine", 1000, "v")
    rng = jax.random.PRNGKey(2)
    common = dict(schedule=schedule, num_steps=40)
    ddpm = sample(exact_denoiser(schedule), (64, 3), rng, method="ddpm", **common)
    ddim = sample(exact_denoiser(schedule), (64, 3), rng, method="ddim", eta=1.0, **common)
    np.testing.assert_allclose(ddim, ddpm, atol=1e-4)


def test_ddim_noise_comes_only_from_eta_and_the_key():
    schedule = make_schedule("cosine", 1000, "eps")
    predict = exact_denoiser(schedule)

    @functools.partial(jax.jit, static_argnums=1)
    def run(rng, eta):
        return sample(predict, (256, 2), rng, schedule=schedule, num_steps=20, eta=eta)

    a, b = jax.random.PRNGKey(0), jax.random.PRNGKey(1)
    np.testing.assert_array_equal(run(a, 0.5), run(a, 0.5))
    assert not np.allclose(run(a, 0.5), run(a, 0.0), atol=1e-3), "eta > 0 adds noise"
    assert not np.allclose(run(a, 0.0), run(b, 0.0), atol=1e-3), "the key draws the starting noise"


def test_clip_x0_bounds_the_samples():
    schedule = make_schedule("cosine", 1000, "eps")
    wide = exact_denoiser(schedule, mu=0.0, std=3.0)
    x = sample(wide, (512, 2), jax.random.PRNGKey(0), schedule=schedule, num_steps=20, clip_x0=1.0)
    assert float(jnp.abs(x).max()) <= 1.0 + 1e-5
    x = sample(wide, (512, 2), jax.random.PRNGKey(0), schedule=schedule, num_steps=20)
    assert float(jnp.abs(x).max()) > 2.0


def test_sample_rejects_bad_arguments():
    schedule = make_schedule("cosine", 100)
    predict = exact_denoiser(schedule)
    with pytest.raises(ValueError, match="sampling method"):
        sample(predict, (2, 2), jax.random.PRNGKey(0), schedule=schedule, method="euler", num_steps=10)
    with pytest.raises(ValueError, match="eta"):
        sample(predict, (2, 2), jax.random.PRNGKey(0), schedule=schedule, num_steps=10, eta=-1.0)
    with pytest.raises(ValueError, match="num_steps"):
        sample(predict, (2, 2), jax.random.PRNGKey(0), schedule=schedule, num_steps=101)


def test_sampler_traces_the_model_once_under_jit():
    schedule = make_schedule("cosine", 1000, "eps")
    traces = []
    denoiser = exact_denoiser(schedule)

    def predict(x_t, t):
        traces.append(x_t.shape)  # a Python side effect: runs once per trace, not per step
        return denoiser(x_t, t)

    run = jax.jit(lambda rng: sample(predict, (8, 3), rng, schedule=schedule, num_steps=50))
    first, second = run(jax.random.PRNGKey(0)), run(jax.random.PRNGKey(1))
    assert len(traces) == 1 and traces[0] == (8, 3)
    assert not np.allclose(first, second)


def test_guidance_combines_conditional_and_unconditional_from_one_batched_call():
    calls = []

    def apply_fn(variables, x, t, *, text_pooled, text_tokens, text_mask, train):
        calls.append((x.shape[0], train))
        # Conditional rows output their pooled embedding's sum; null rows output 0.
        return jnp.broadcast_to(text_pooled.sum(axis=1)[:, None], x.shape)

    condition = _condition(3)
    condition["text_pooled"] = jnp.arange(12.0).reshape(3, 4)
    predict = guided_predict_fn(apply_fn, {"w": 1}, condition, guidance_scale=2.5)
    out = predict(jnp.zeros((3, 2)), jnp.zeros((3,), jnp.int32))
    assert calls == [(6, False)], "one forward pass over cond + uncond"
    np.testing.assert_allclose(out[:, 0], 2.5 * np.array([6.0, 22.0, 38.0]))
    # Scale 1 is the conditional model itself.
    out = guided_predict_fn(apply_fn, {"w": 1}, condition, guidance_scale=1.0)(jnp.zeros((3, 2)), jnp.zeros(3, int))
    np.testing.assert_allclose(out[:, 0], [6.0, 22.0, 38.0])
